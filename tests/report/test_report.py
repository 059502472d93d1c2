"""The HTML report of a tiny run: sections in order, numbers equal to metrics.json, only embedded images, no
web address; comparisons with deltas; critical taxa; OOD; graceful degradation; the `report` command."""
from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser

import pandas as pd
import pytest

from taxonomist.cli.main import main
from taxonomist.errors import DataError, UnknownLabelError
from taxonomist.report import load_run, write_report

SECTIONS = ["summary", "ranks", "confusions", "mistakes", "calibration", "data", "config"]


class Page(HTMLParser):
    """Collects what the tests look at: section ids, URLs, table rows by their data-* key, card values."""

    def __init__(self, html: str):
        super().__init__()
        self.sections, self.urls, self.tags = [], [], set()
        self.rows: dict[str, list[dict]] = {}
        self.cards: dict[str, str] = {}
        self._row = self._cell = self._card = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.sections.append(a.get("id"))
        for key in ("src", "href", "action", "poster", "data"):
            if key in a:
                self.urls.append((tag, key, a[key]))
        if tag == "tr":
            key = next((v for k, v in a.items() if k.startswith("data-")), None)
            self._row = None if key is None else self.rows.setdefault(key, []) and None or {"cells": []}
            if key is not None:
                self.rows[key].append(self._row)
        if tag == "td" and self._row is not None:
            self._cell = {"text": "", "class": a.get("class") or ""}
            self._row["cells"].append(self._cell)
        if tag == "div" and "data-metric" in a:
            self._card = a["data-metric"]
            self.cards[self._card] = ""

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if tag == "td":
            self._cell = None
        if tag == "div":
            self._card = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._card is not None:
            self.cards[self._card] += data.strip()


def cells(page: Page, key: str, which: int = 0) -> list[str]:
    return [c["text"].strip() for c in page.rows[key][which]["cells"]]


def test_sections_in_order_and_self_contained(reports, offline_page):
    page = Page(reports.single)
    assert page.sections == SECTIONS
    images = [u for tag, key, u in page.urls if tag == "img"]
    assert len(images) >= 8
    assert all(u.startswith("data:image/png;base64,") or u.startswith("data:image/jpeg;base64,") for u in images)
    assert any(u.startswith("data:image/jpeg") for u in images)  # the gallery thumbnails
    # the only links are the table of contents' anchors; nothing is fetched
    assert all(u.startswith("#") for tag, key, u in page.urls if key == "href")
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    offline_page(reports.single)  # no src/href/url()/@import/script address outside the page
    assert len(reports.single) < 3_000_000


def test_numbers_match_metrics_json(reports):
    m = json.loads((reports.run / "metrics.json").read_text())
    page = Page(reports.single)
    assert page.cards["mean hierarchical distance"] == f"{m['mhd']:.3f}"
    assert page.cards["top-1"] == f"{m['top1']:.3f}"
    assert page.cards["macro-F1"] == f"{m['macro_f1']:.3f}"
    assert page.cards["hierarchical accuracy"] == f"{m['hierarchical_accuracy']:.3f}"
    assert page.cards["log loss"] == f"{m['log_loss']:.3f}"
    assert page.cards["ECE"] == f"{m['ece']:.3f}"
    for level, v in m["per_rank"].items():
        row = cells(page, level)
        assert row[0] == level
        assert row[2:7] == [f"{v['n']:,}", f"{v['top1']:.3f}", f"{v['top5']:.3f}", f"{v['macro_f1']:.3f}",
                            f"{v['avg_confidence']:.3f}"]
    ood = m["ood"]["energy"]
    row = cells(page, "energy")
    assert row[:3] == ["energy", f"{ood['auroc']:.3f}", f"{ood['fpr95']:.3f}"]
    assert f"{m['n']} examples of the test split" in reports.single


def test_critical_taxa_accuracy_along_the_lineage(reports):
    pred = pd.read_csv(reports.run / "predictions.csv", keep_default_na=False)
    html = reports.single
    start = html.index(f'data-taxon="{reports.genus}"')
    block = html[start:html.index('data-taxon=', start + 20) if 'data-taxon=' in html[start + 20:] else None]
    rows = dict((level, float(acc)) for level, acc in
                re.findall(r"<tr><td>(\w+)</td><td>[^<]*</td><td>([\d.]+)</td>", block))
    mine = pred[pred["label_genus"] == reports.genus]
    assert len(mine) and set(rows) >= {"kingdom", "phylum", "class", "order", "family", "genus"}
    for level, acc in rows.items():
        expected = (mine[f"prediction_{level}"] == mine[f"label_{level}"]).mean()
        assert acc == pytest.approx(expected, abs=5e-4), level
    assert "species" not in rows  # below the taxon: not on its lineage
    assert f'data-taxon="{reports.species}"' in html
    with pytest.raises(UnknownLabelError, match="did you mean"):
        write_report([reports.run], reports.run / "x.html", critical=[reports.species[:-1]])


def test_comparison_has_deltas_and_marks_the_best(reports, offline_page):
    base = json.loads((reports.run / "metrics.json").read_text())
    other = json.loads((reports.min_risk / "metrics.json").read_text())
    page = Page(reports.compare)
    assert page.sections == SECTIONS
    for key, better in (("mhd", min), ("top1", max), ("log_loss", min)):
        first, second = page.rows[key][0]["cells"][1:3]  # after the metric's name
        assert first["text"].strip() == f"{base[key]:.3f}"
        delta = other[key] - base[key] if abs(other[key] - base[key]) >= 5e-4 else 0.0
        assert second["text"].strip() == f"{other[key]:.3f}{delta:+.3f}"
        best = better(round(base[key], 6), round(other[key], 6))
        assert ("best" in first["class"]) == (round(base[key], 6) == best)
        assert ("best" in second["class"]) == (round(other[key], 6) == best)
    assert "per_rank.species.top1" in page.rows and "ood.energy.auroc" in page.rows
    # per-run sections of both runs, and the evaluation settings that differ
    assert reports.compare.count('<div class="run">') >= 2 * 6
    assert "<td>evaluate.decision</td><td>argmax</td><td>min-risk</td>" in reports.compare
    offline_page(reports.compare)


def test_missing_images_and_optional_files_degrade_with_notes(reports, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(reports.min_risk, copy)
    m = json.loads((copy / "metrics.json").read_text())
    m["data"] = str(tmp_path / "gone")
    m["run_dir"] = None
    (copy / "metrics.json").write_text(json.dumps(m))
    html = write_report([copy], copy / "report.html").read_text()
    page = Page(html)
    assert page.sections == SECTIONS
    assert "is not on this machine" in html and "no image" in html
    assert not any(u.startswith("data:image/jpeg") for tag, key, u in page.urls)
    assert "No metrics.csv" in html  # training curves live in the run directory, which is gone


def test_load_run_errors(reports, tmp_path):
    with pytest.raises(DataError, match="no metrics.json"):
        load_run(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_run(bad)


def test_report_command(reports, tmp_path, capsys):
    out = tmp_path / "cmp.html"
    assert main(["report", str(reports.min_risk), "--out", str(out), "--title", "min-risk on the tiny run"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(out))
    assert "taxonomist report — min-risk on the tiny run" in out.read_text()
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "metrics.json" in err[0]


def test_context_priors_are_described_with_the_figures_without_them(reports, tmp_path):
    copy = tmp_path / "priors"
    shutil.copytree(reports.min_risk, copy)
    m = json.loads((copy / "metrics.json").read_text())
    m["priors"] = {"file": "sites/priors.csv", "sha256": "0" * 64, "strength": 1.0, "floor": 0.1, "applied": 7,
                   "conflicts": 0, "changed": 3, "unknown_taxa": ["Nemo"],
                   "without": {"mhd": 1.25, "top1": 0.5, "macro_f1": 0.4}}
    (copy / "metrics.json").write_text(json.dumps(m))
    html = write_report([copy], copy / "report.html").read_text()
    text = re.sub(r"\s+", " ", html)
    assert "Context priors (sites/priors.csv, strength 1, floor 0.1) reweighted 7 of the" in text
    assert "changed 3 answers" in text and "mean hierarchical distance 1.250" in text
    assert "1 taxa of the priors file are not in the model's taxonomy" in text
