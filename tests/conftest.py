"""Shared test fixtures: small, made in the test, no network, no reads outside the repository."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The session's own cache root (XDG_CACHE_HOME): the ONNX engine's exports and saved tracebacks land in the
    session's temporary folder, never in the user's ~/.cache, and CLI subprocesses inherit it."""
    import os

    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """`make(n_taxa, per_class, seed, val, test)`: a small synthetic dataset (32 px images) split by seed, made once
    per argument set in the session's temporary folder."""
    from taxonomist.data.split import split_dataset
    from taxonomist.data.synth import synthesize

    made: dict[tuple, Path] = {}

    def make(n_taxa: int = 5, per_class: int = 12, seed: int = 0, val: float = 0.25, test: float = 0.0) -> Path:
        key = (n_taxa, per_class, seed, val, test)
        if key not in made:
            root = tmp_path_factory.mktemp("synth") / "data"
            synthesize(root, n_taxa=n_taxa, per_class=per_class, image_size=32, seed=seed)
            split_dataset(root, val=val, test=test, seed=0)
            made[key] = root
        return made[key]
    return make


@pytest.fixture
def fixtures_dir() -> Path:
    """tests/fixtures: copies of reference files (e.g. the official FathomNet 2025 taxonomy table)."""
    return FIXTURES


# ---------------------------------------------------------------------------------------------- offline pages
# Attributes through which HTML makes a browser load or open another resource.
URL_ATTRIBUTES = {"src", "href", "action", "formaction", "poster", "data", "srcset", "background", "cite",
                  "longdesc", "manifest", "ping", "codebase", "archive", "xlink:href", "imagesrcset"}
CSS_URL = re.compile(r"""url\(\s*(['"]?)(.*?)\1\s*\)""", re.I | re.S)
CSS_IMPORT = re.compile(r"""@import\s+(?:url\(\s*)?['"]?([^'")\s;]+)""", re.I)
# a string literal in a script that holds an absolute or protocol-relative address
SCRIPT_ADDRESS = re.compile(r"""['"`]((?:[a-z][a-z0-9+.-]*:)?//[^'"`\s]*)""", re.I)


class _References(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, str]] = []   # (where, url)
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        a = {k.lower(): v or "" for k, v in attrs}
        for key, value in a.items():
            if key in URL_ATTRIBUTES:
                # srcset: candidates "URL [descriptor]" separated by commas and spaces (a data: URI holds a comma)
                urls = [u.split()[0] for u in re.split(r",\s+", value.strip()) if u.strip()] if "srcset" in key \
                    else [value.strip()]
                self.found += [(f"<{tag} {key}>", u) for u in urls]
            if key == "style":
                self._css(f"<{tag} style>", value)
        if tag == "meta" and a.get("http-equiv", "").lower() == "refresh" and "url=" in a.get("content", "").lower():
            self.found.append(("<meta refresh>", a["content"].lower().split("url=", 1)[1].strip()))
        self._in = tag if tag in ("style", "script") else None

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "style":
            self._css("<style>", data)
        elif self._in == "script":
            self.found += [("<script> string", u) for u in SCRIPT_ADDRESS.findall(data)]

    def _css(self, where, text):
        self.found += [(f"{where} url()", m.group(2).strip()) for m in CSS_URL.finditer(text)]
        self.found += [(f"{where} @import", u) for u in CSS_IMPORT.findall(text)]


def external_references(html: str, same_origin: bool = False) -> list[str]:
    """What in an HTML page (its tags, inline CSS and inline scripts) would make a browser reach past the page:
    every reference that is not a `#fragment` or a `data:` URI. With `same_origin`, paths on the page's own
    server (`/static/app.js`, `predict`) are allowed too, but never an address with a scheme or a host."""
    parser = _References()
    parser.feed(html)
    parser.close()
    out = []
    for where, url in parser.found:
        low = url.lower()
        if not url or low.startswith("#") or low.startswith("data:"):
            continue
        has_host = low.startswith("//") or re.match(r"[a-z][a-z0-9+.-]*:", low) is not None
        if same_origin and not has_host:
            continue
        out.append(f"{where} {url[:80]}")
    return out


@pytest.fixture
def find_external_references():
    """`external_references` as a fixture (test modules cannot import conftest under importlib mode)."""
    return external_references


@pytest.fixture
def offline_page():
    """`check(html, same_origin=False)`: asserts that a page references nothing outside itself (see
    `external_references`), and returns the html for chaining."""
    def check(html: str, same_origin: bool = False) -> str:
        found = external_references(html, same_origin)
        assert found == [], f"external references: {found[:5]}"
        return html
    return check
