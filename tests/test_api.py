"""The public Python API at the top level: each name is the library's own function, imported on first use, and
`import taxonomist` imports no torch."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import taxonomist


def test_import_taxonomist_and_the_numpy_parts_import_no_torch():
    script = ("import sys, json, taxonomist; import taxonomist.cli.main; "
              "before = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')); "
              "taxonomist.Taxonomy, taxonomist.decide.min_risk_decision, taxonomist.load_config, taxonomist.evaluate; "
              "after = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')); "
              "print(json.dumps([before, after]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [[], []]


@pytest.mark.parametrize("name, module, attribute", [
    ("fit", "taxonomist.pipeline", "fit"),
    ("load_config", "taxonomist.config", "load_config"),
    ("Config", "taxonomist.config", "Config"),
    ("load_model", "taxonomist.inference.model_file", "load_model"),
    ("predict", "taxonomist.inference.predict", "predict"),
    ("Taxonomy", "taxonomist.taxonomy", "Taxonomy"),
])
def test_each_name_is_the_library_function(name, module, attribute):
    assert getattr(taxonomist, name) is getattr(importlib.import_module(module), attribute)
    assert name in taxonomist.__all__ and name in dir(taxonomist)


def test_decide_is_the_numpy_decision_package():
    import numpy as np

    from taxonomist import decide
    from taxonomist.taxonomy import lca_distance

    assert decide is sys.modules["taxonomist.decide"] is taxonomist.decide
    tax = taxonomist.Taxonomy.from_parents({"R": None, "A": "R", "B": "R", "a1": "A", "a2": "A", "b1": "B"})
    choice, _ = decide.min_risk_decision(np.array([[0.4, 0.4, 0.2]]), lca_distance(tax, tax.labels, tax.names))
    assert tax.names[int(choice[0])] == "A"   # the genus beats either 0.4 species


def test_evaluate_calls_evaluate_run_before_and_after_its_package_is_imported(monkeypatch):
    from taxonomist import evaluate
    import taxonomist.evaluate.run as run   # binds taxonomist.evaluate to the package: it stays callable
    calls = []
    monkeypatch.setattr(run, "evaluate_run", lambda *a, **k: calls.append((a, k)) or "evaluation")
    assert evaluate is taxonomist.evaluate
    assert taxonomist.evaluate("runs/x", split="val") == "evaluation"
    assert evaluate("runs/y", data="d") == "evaluation"
    assert calls == [(("runs/x",), {"split": "val"}), (("runs/y",), {"data": "d"})]


def test_the_cli_trains_through_taxonomist_fit(monkeypatch, tmp_path):
    from taxonomist.cli.main import main
    from taxonomist.pipeline import FitResult

    seen = {}

    def fake_fit(cfg, **kwargs):
        seen.update(cfg=cfg, **kwargs)
        return FitResult(tmp_path, training=None)

    monkeypatch.setattr(taxonomist, "fit", fake_fit)
    assert main(["train", "--set", f"data.root={tmp_path}", "--set", f"out={tmp_path / 'run'}", "--no-calibrate"]) == 0
    assert seen["cfg"].out == str(tmp_path / "run") and seen["calibrate"] is False and seen["evaluate"] is True


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'train_model'"):
        taxonomist.train_model  # noqa: B018


@pytest.mark.slow
def test_the_python_api_example_of_docs_index_runs(tmp_path):
    import os
    import re
    from pathlib import Path

    index = (Path(__file__).resolve().parents[1] / "docs" / "index.md").read_text(encoding="utf-8")
    section = index.split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^test MHD \d", proc.stdout, flags=re.M) and "min-risk MHD" in proc.stdout
    assert "an unsure model answers" in proc.stdout
    assert (tmp_path / "runs/api/report.html").is_file() and (tmp_path / "runs/api/answers.csv").is_file()
    assert (tmp_path / "runs/api/min-risk/metrics.json").is_file()
