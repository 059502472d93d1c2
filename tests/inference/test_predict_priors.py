"""Context priors through predict, evaluate and their command lines: the raw answer beside the final one, the
`context` column, a resumed run that must not mix priors, and clear errors."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from taxonomist.cli.main import main
from taxonomist.decide import ContextPriors, DecisionOptions, answer
from taxonomist.errors import DataError
from taxonomist.evaluate.run import evaluate_run, run_decision_options
from taxonomist.inference import predict
from taxonomist.inference.model_file import read_card

FAST = dict(device="cpu", num_workers=0, progress=False, engine="torch")


@pytest.fixture(scope="module")
def sites(tmp_path_factory, tiny_data):
    """The test rows as an images CSV with two sites, and a priors table that blocks every label at site A but
    the first two (a label's genus-mates stay allowed), with site B absent from the table."""
    rows = pd.read_csv(tiny_data / "annotations.csv", keep_default_na=False)
    rows = rows[rows["split"] == "test"].reset_index(drop=True)
    rows["context"] = ["site=A;depth=shallow" if k % 2 == 0 else "site=B" for k in range(len(rows))]
    folder = tmp_path_factory.mktemp("sites")
    csv = folder / "images.csv"
    rows.assign(path=[str(tiny_data / p) for p in rows["path"]])[["path", "annotation_id", "context"]].to_csv(
        csv, index=False)
    return csv, rows


def priors_file(tmp_path, allowed: list[str]):
    path = tmp_path / "priors.csv"
    lines = ["context,taxon,weight"] + [f"site=A,{name},1" for name in allowed] + ["depth=shallow,Nemo,0"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_predict_writes_the_raw_answer_beside_the_one_with_priors(tiny_run, sites, tmp_path):
    csv, rows = sites
    card = read_card(tiny_run)
    allowed = list(card.taxonomy.labels[:2])
    priors = priors_file(tmp_path, allowed)
    out = tmp_path / "p.csv"
    options = DecisionOptions("argmax", priors=priors, prior_floor=0.0)
    summary = predict(tiny_run, csv, out, options, **FAST)
    frame = pd.read_csv(out, keep_default_na=False)
    plain = pd.read_csv(predict(tiny_run, csv, tmp_path / "plain.csv", DecisionOptions("argmax"), **FAST).out,
                        keep_default_na=False)
    assert {"raw_prediction", "prior_applied", "context"} <= set(frame.columns)
    site_a = frame["context"].str.startswith("site=A")
    assert frame["prior_applied"].tolist() == site_a.tolist()
    # site A: only the allowed labels; site B (not in the table): untouched
    assert set(frame.loc[site_a, "prediction"]) <= set(allowed)
    assert frame.loc[~site_a, "prediction"].tolist() == frame.loc[~site_a, "raw_prediction"].tolist()
    assert frame["raw_prediction"].tolist() == plain["prediction"].tolist()
    changed = int((frame["prediction"] != frame["raw_prediction"]).sum())
    assert summary.priors["applied"] == int(site_a.sum()) and summary.priors["changed"] == changed
    assert summary.priors["unknown_taxa"] == ["Nemo"]
    assert f"applied to {int(site_a.sum())} of {len(frame)} images, changing {changed} answers" in summary.summary()
    assert "ignored 1 taxa the model does not know: Nemo" in summary.summary()


def test_predict_matches_the_decision_path_on_the_same_probabilities(tiny_run, sites, tmp_path):
    """predict's answers with priors are `decide.answer`'s on the model's probabilities with the card's prior."""
    from taxonomist.inference.images import read_images
    from taxonomist.inference.members import Member, run_member
    from taxonomist.inference.model_file import load_model, resolve_model

    csv, _ = sites
    card = read_card(tiny_run)
    priors = priors_file(tmp_path, list(card.taxonomy.labels[:3]))
    options = DecisionOptions("min-risk", candidates="all", priors=priors)
    frame = pd.read_csv(predict(tiny_run, csv, tmp_path / "p.csv", options, **FAST).out, keep_default_na=False)
    ckpt = resolve_model(tiny_run)
    model, card, taxonomy = load_model(ckpt, device="cpu", engine="torch")
    images = read_images(csv)
    (output, positions), _ = run_member(Member(ckpt, model, card, taxonomy), images, torch.device("cpu"), None,
                                        "mean_probs", 64, 0)
    resolved = options.resolve(taxonomy, model_metric=card.metric, label_prior=card.label_prior)
    expected = answer(output.probs, taxonomy, resolved, contexts=images.rows["context"].to_numpy()[positions])
    assert frame["prediction"].tolist() == expected.names
    assert frame["raw_prediction"].tolist() == expected.raw_names


def test_priors_need_a_context_column(tiny_run, tiny_data, tmp_path):
    priors = priors_file(tmp_path, ["x"])
    with pytest.raises(DataError, match="no 'context' column; --priors applies to each image's context"):
        predict(tiny_run, tiny_data / "images", tmp_path / "p.csv", DecisionOptions(priors=priors), **FAST)
    assert not (tmp_path / "p.csv").exists()


def test_resume_does_not_keep_parts_predicted_with_other_priors(tiny_run, sites, tmp_path):
    csv, _ = sites
    card = read_card(tiny_run)
    first = priors_file(tmp_path, list(card.taxonomy.labels[:1]))
    out = tmp_path / "p.csv"
    predict(tiny_run, csv, out, DecisionOptions(priors=first, prior_floor=0.0), chunk_size=4, **FAST)
    (tmp_path / "other").mkdir()
    second = priors_file(tmp_path / "other", list(card.taxonomy.labels[1:2]))
    summary = predict(tiny_run, csv, out, DecisionOptions(priors=second, prior_floor=0.0), chunk_size=4,
                      resume=True, **FAST)
    assert summary.chunks_resumed == 0
    site_a = pd.read_csv(out, keep_default_na=False).query("prior_applied")
    assert set(site_a["prediction"]) == {card.taxonomy.labels[1]}


def test_evaluate_reports_the_figures_without_the_priors(tiny_run, tiny_data, tmp_path):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(tiny_data, data)
    ann = pd.read_csv(data / "annotations.csv", keep_default_na=False)
    ann["context"] = "site=A"
    ann.to_csv(data / "annotations.csv", index=False)
    card = read_card(tiny_run)
    priors = priors_file(tmp_path, list(card.taxonomy.labels))   # every label: the floor is moot
    options = run_decision_options(tiny_run, decision="min-risk", priors=priors)
    ev = evaluate_run(tiny_run, data=data, out=tmp_path / "ev", device="cpu", num_workers=0, progress=False,
                      options=options)
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["priors"]["applied"] == m["n"] and m["priors"]["unknown_taxa"] == ["Nemo"]
    assert set(m["priors"]["without"]) == {"mhd", "top1", "macro_f1"}
    preds = pd.read_csv(tmp_path / "ev" / "predictions.csv", keep_default_na=False)
    assert {"raw_prediction", "raw_distance", "prior_applied", "context"} <= set(preds.columns)
    assert np.isclose(preds["raw_distance"].mean(), m["priors"]["without"]["mhd"])
    assert "without the priors: MHD" in ev.summary()


def test_cli_flags_and_errors(tiny_run, sites, tmp_path, capsys):
    csv, _ = sites
    card = read_card(tiny_run)
    priors = priors_file(tmp_path, list(card.taxonomy.labels[:2]))
    out = tmp_path / "p.csv"
    code = main(["predict", str(tiny_run), "--images", str(csv), "--out", str(out), "--priors", str(priors),
                 "--prior-strength", "0.5", "--decision", "min-risk", "--candidates", "all", "--engine", "torch",
                 "--device", "cpu", "--workers", "0"])
    assert code == 0 and "priors " in capsys.readouterr().out
    assert "raw_prediction" in pd.read_csv(out).columns
    bad = tmp_path / "bad.csv"
    bad.write_text("context,taxon,weight\nsite=A,x,-2\n")
    assert main(["predict", str(tiny_run), "--images", str(csv), "--out", str(tmp_path / "q.csv"),
                 "--priors", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "bad.csv: row 2: weight '-2' must be a finite number ≥ 0" in err and "Traceback" not in err
    assert main(["predict", str(tiny_run), "--images", str(csv), "--out", str(tmp_path / "q.csv"),
                 "--prior-floor", "0.2"]) != 0
    assert "give --priors" in capsys.readouterr().err


def test_priors_table_in_code(tiny_run, sites, tmp_path):
    csv, _ = sites
    card = read_card(tiny_run)
    leaf = [name for name in card.taxonomy.labels if not card.taxonomy.descendants(name)][0]
    table = ContextPriors.from_rows([("site=B", leaf, 1)])
    frame = pd.read_csv(predict(tiny_run, csv, tmp_path / "p.csv", DecisionOptions(priors=table, prior_floor=0),
                                **FAST).out, keep_default_na=False)
    assert set(frame.loc[frame["context"] == "site=B", "prediction"]) == {leaf}


def test_evaluate_needs_a_context_column_and_reads_the_table_first(tiny_run, tiny_data, tmp_path, capsys):
    priors = priors_file(tmp_path, ["x"])
    options = run_decision_options(tiny_run, priors=priors)
    with pytest.raises(DataError, match="annotations.csv: no 'context' column; --priors applies to each example"):
        evaluate_run(tiny_run, data=tiny_data, out=tmp_path / "ev", device="cpu", num_workers=0, progress=False,
                     options=options)
    assert not (tmp_path / "ev" / "metrics.json").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("context,taxon\nsite=A,x\n")
    assert main(["evaluate", str(tiny_run), "--data", str(tiny_data), "--out", str(tmp_path / "ev2"),
                 "--priors", str(bad)]) != 0
    assert "bad.csv: no column 'weight'" in capsys.readouterr().err
