"""The check behind "the report opens offline": it finds every way a page can reach past itself, and nothing in
an embedded image's base64 text (which may spell any word) counts."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("html, where", [
    ('<img src="https://example.org/a.png">', "<img src>"),
    ('<img srcset="data:image/png;base64,AAAA 1x, //cdn.example.org/b.png 2x">', "<img srcset>"),
    ('<link rel="stylesheet" href="http://example.org/s.css">', "<link href>"),
    ('<script src="https://example.org/x.js"></script>', "<script src>"),
    ('<style>body { background: url("https://example.org/bg.png") }</style>', "<style> url()"),
    ("<style>@import 'https://fonts.example.org/f.css';</style>", "<style> @import"),
    ('<div style="background-image: url(//example.org/p.png)"></div>', "<div style> url()"),
    ('<script>fetch("https://example.org/track")</script>', "<script> string"),
    ('<meta http-equiv="refresh" content="0; url=https://example.org/">', "<meta refresh>"),
    ('<a href="report2.html">next</a>', "<a href>"),  # another file: not self-contained either
])
def test_every_kind_of_external_reference_is_found(find_external_references, html, where):
    found = find_external_references(f"<html><head></head><body>{html}</body></html>")
    assert len(found) == 1 and found[0].startswith(where), found


def test_data_uris_fragments_and_words_in_text_are_not_references(find_external_references):
    # base64 text can spell any word, "http" included: an embedded image is part of the page, not a reference
    html = ('<img src="data:image/png;base64,iVBORw0KGgoAhttpSUhEUg=="><a href="#summary">summary</a>'
            '<p>see https://example.org in the text</p>'
            '<style>.x { background: url(data:image/png;base64,iVBORhttpAA) }</style>')
    assert find_external_references(html) == []


def test_same_origin_allows_server_paths_but_not_other_hosts(find_external_references):
    html = '<script src="/static/app.js"></script><form action="predict"></form><img src="http://evil.example/x">'
    assert find_external_references(html, same_origin=True) == ["<img src> http://evil.example/x"]
