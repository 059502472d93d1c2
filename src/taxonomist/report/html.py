"""Assemble the report: figures, galleries and tables of one run (or several, side by side with deltas)
rendered through one Jinja2 template into a single self-contained HTML file.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from taxonomist.errors import ConfigError, DataError
from taxonomist.report import figures as F
from taxonomist.report.galleries import Gallery, check_critical, critical_taxon, recognised_taxa, worst_mistakes
from taxonomist.report.runs import RunResults, load_run
from taxonomist.utils.files import atomic_write_text

TEMPLATE = "report.html.j2"
#: Rows of the per-label table; a taxonomy with more labels lists the worst ones (lowest F1).
MAX_PER_LABEL_ROWS = 1000

#: Key metrics of the comparison table: (metrics.json key, label, better = "lower" | "higher").
KEY_METRICS = (
    ("mhd", "mean hierarchical distance", "lower"),
    ("top1", "top-1 (exact label)", "higher"),
    ("top5", "top-5", "higher"),
    ("macro_f1", "macro-F1", "higher"),
    ("hierarchical_accuracy", "hierarchical accuracy", "higher"),
    ("log_loss", "log loss", "lower"),
    ("ece", "ECE (reported probabilities)", "lower"),
    ("ece_uncalibrated", "ECE before temperature", "lower"),
)

DECISION_TEXT = {
    "argmax": "argmax — the single most probable label.",
    "min-risk": "min-risk — the answer (any candidate taxon) with the smallest expected taxonomic distance "
                "under the model's probabilities; it may be a genus or family when the species is uncertain.",
    "backoff": "back-off — the most probable label, replaced by its nearest ancestor whose probability "
               "reaches the rank's threshold.",
    "selective": "selective — the deepest taxon whose probability reaches the threshold (0.5 unless set).",
}


def format_number(value, digits: int = 3) -> str:
    """A number as the reports print it: "–" for none or not finite, integers with thousands separators, floats
    with `digits` decimals (the sweep report uses it too).

    >>> format_number(None), format_number(12345), format_number(0.12345), format_number(float("nan"))
    ('–', '12,345', '0.123', '–')
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------- one run
def _summary_cards(m: dict) -> list[dict]:
    metric = m.get("metric", "")
    cards = [
        ("mean hierarchical distance", m.get("mhd"),
         f"Average taxonomic distance between the answer and the true taxon ({metric} rule); 0 means every "
         "answer was exact, confusing close relatives costs little, distant ones a lot. Lower is better."),
        ("top-1", m.get("top1"), "Share of examples whose answer is exactly the true label."),
        ("macro-F1", m.get("macro_f1"),
         "F1 score averaged over the true labels, each weighing the same: rare taxa count as much as common ones."),
        ("hierarchical accuracy", m.get("hierarchical_accuracy"),
         "Share of examples whose most probable taxon is right at every rank, from kingdom (or the top level) down."),
        ("log loss", m.get("log_loss"),
         "Mean negative log probability given to the true label; punishes confident mistakes. Lower is better."),
        ("ECE", m.get("ece"),
         "Expected calibration error of the reported probabilities: the gap between confidence and accuracy "
         f"(before temperature scaling: {format_number(m.get('ece_uncalibrated'))}). Lower is better."),
    ]
    for method, v in (m.get("ood") or {}).items():
        cards.append((f"OOD AUROC ({method})", v.get("auroc"),
                      "How well the unknown-taxon score separates taxa never seen in training from known ones: "
                      "1 = perfectly, 0.5 = chance."))
    return [{"label": a, "value": format_number(b), "text": c} for a, b, c in cards]


def _per_rank_rows(run: RunResults) -> list[dict]:
    m = run.metrics
    roc = (m.get("curves") or {}).get("roc", {})
    by_level = (m.get("answers") or {}).get("by_level", {})
    p = run.predictions
    rows = []
    for level, v in m.get("per_rank", {}).items():
        col = f"label_{level}"
        taxa = int(p.loc[p[col] != "", col].nunique()) if col in p.columns else None
        rows.append({"level": level, "taxa": format_number(taxa) if taxa is not None else "–",
                     "n": format_number(v.get("n")), "top1": format_number(v.get("top1")),
                     "top5": format_number(v.get("top5")), "macro_f1": format_number(v.get("macro_f1")),
                     "avg_confidence": format_number(v.get("avg_confidence")),
                     "auc": format_number((roc.get(level) or {}).get("auc")),
                     "answers": format_number(by_level.get(level)) if by_level else "–"})
    return rows


def _per_label_rows(m: dict) -> tuple[list[dict], int]:
    table = m.get("per_label") or {}
    items = sorted(table.items(), key=lambda kv: (kv[1]["support"] == 0, kv[1]["f1"], -kv[1]["support"], kv[0]))
    rows = [{"name": k, "precision": format_number(v["precision"]), "recall": format_number(v["recall"]),
             "f1": format_number(v["f1"]), "support": format_number(int(v["support"]))}
            for k, v in items[:MAX_PER_LABEL_ROWS]]
    return rows, len(items)


def _group_map(run: RunResults, level: str) -> dict[str, str]:
    p = run.predictions
    col = f"label_{level}"
    out = dict(zip(p["label"], p[col])) if col in p.columns else {}
    tax = run.taxonomy
    if tax is not None and tax.has_ranks and level in ("kingdom", "phylum", "class", "order", "family", "genus"):
        for name in set(p.get("argmax", p["prediction"])) - set(out):
            if name in tax:
                out[name] = tax.ancestor_at(name, level) or "?"
    elif tax is not None and level.startswith("depth") and level[5:].isdigit():
        depth = int(level[5:])
        for name in set(p.get("argmax", p["prediction"])) - set(out):
            if name in tax:
                lineage = tax.lineage(name)
                out[name] = lineage[depth] if depth < len(lineage) else "?"
    return {k: (v or "?") for k, v in out.items()}


def _confusions(run: RunResults) -> dict:
    p = run.predictions
    out = {"levels": [], "grouped": None}
    for level in run.levels:
        t_col, p_col = f"label_{level}", f"prediction_{level}"
        if t_col not in p.columns:
            continue
        keep = (p[t_col] != "").to_numpy()
        truth, pred = p.loc[keep, t_col].to_numpy(dtype=object), p.loc[keep, p_col].to_numpy(dtype=object)
        if len(set(truth) | set(pred)) < 2:
            continue  # one taxon at this rank (e.g. one kingdom): nothing to confuse
        uri, info = F.confusion_matrix_figure(truth, pred, f"{level}: true vs predicted")
        subset = (f"the {info['shown']} most-confused of {info['classes']} taxa; '(other)' collects the rest"
                  if info["shown"] < info["classes"] else f"all {info['classes']} taxa")
        out["levels"].append({"level": level, "uri": uri, "subset": subset, "wide": info["shown"] > 16})
    group = run.metrics.get("group_level")
    if group:
        pred_col = "argmax" if "argmax" in p.columns else "prediction"
        tax = run.taxonomy
        names = set(p["label"]) | set(p[pred_col])
        lineage = {n: tuple(tax.lineage(n)) for n in names if n in tax} if tax is not None else None
        made = F.grouped_confusion_figure(p["label"].to_numpy(dtype=object), p[pred_col].to_numpy(dtype=object),
                                          _group_map(run, group), group, order_key=lineage)
        if made:
            out["grouped"] = {"uri": made[0], "level": group, **made[1]}
    return out


def _data_section(run: RunResults) -> dict:
    out = {"explore": [], "counts": None, "source": None, "table": []}
    if run.explore_dir is not None:
        try:
            summary = json.loads((run.explore_dir / "summary.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError, UnicodeDecodeError, RecursionError):
            summary = {}
        plots = summary.get("plots") if isinstance(summary, dict) else None
        for key, file in (plots if isinstance(plots, dict) else {}).items():
            # summary.json is data from disk: a plot is a PNG file inside the exploration folder, nothing else
            if not isinstance(file, str) or Path(file).name != file:
                continue
            try:
                out["explore"].append({"title": str(key).replace("_", " "),
                                       "uri": F.png_file_uri(run.explore_dir / file)})
            except (OSError, ValueError):
                continue
        out["source"] = str(run.explore_dir)
    if run.data_root is not None and (run.data_root / "annotations.csv").is_file():
        from taxonomist.data.dataset import read_annotations
        try:
            frame = read_annotations(run.data_root / "annotations.csv")
        except DataError as e:
            run.notes.append(str(e))
            frame = None
        if frame is not None:
            frame = frame[frame["label"] != ""]
            split = frame["split"].replace("", "(none)") if "split" in frame.columns else \
                pd.Series("(all)", index=frame.index)
            counts = pd.crosstab(frame["label"], split)
            order = [s for s in ("train", "val", "test", "ood", "(none)", "(all)") if s in counts.columns]
            counts = counts[order]
            out["counts"] = F.label_counts_figure(counts)
            out["table"] = [{"split": s, "examples": format_number(int(counts[s].sum())),
                             "labels": format_number(int((counts[s] > 0).sum()))} for s in counts.columns]
            out["where"] = "the whole dataset"
    if out["counts"] is None:
        counts = run.predictions["label"].value_counts().to_frame(run.metrics.get("split", "evaluated"))
        out["counts"] = F.label_counts_figure(counts)
        out["where"] = f"the evaluated {run.metrics.get('split', '')} split only (the dataset is not available)"
    return out


def _settings(run: RunResults) -> list[tuple[str, str]]:
    m = run.metrics
    keys = [("checkpoint", "checkpoint"), ("epoch", "epoch"), ("data", "dataset"), ("split", "split"),
            ("n", "examples"), ("decision", "decision"), ("candidates", "candidates"), ("thresholds", "thresholds"),
            ("metric", "distance"), ("temperature", "temperature"), ("taxonomy_hash", "taxonomy sha256")]
    out = []
    for key, label in keys:
        if key in m and m[key] not in (None, ""):
            value = m[key]
            out.append((label, json.dumps(value) if isinstance(value, (dict, list)) else str(value)))
    return out


def run_view(run: RunResults, critical: Sequence[str] = (), compact: bool = False) -> dict:
    """Everything the template shows of one run."""
    m = run.metrics
    curves = m.get("curves") or {}
    gallery = Gallery(run)
    n_mistakes = 12 if compact else 24
    view = {
        "name": run.name, "path": str(run.path), "metrics": m,
        "cards": _summary_cards(m),
        "decision": m.get("decision", "argmax"),
        "decision_text": DECISION_TEXT.get(m.get("decision", "argmax"), ""),
        "argmax": m.get("argmax"),
        "answers": m.get("answers") or {},
        "per_rank": _per_rank_rows(run),
        "confusions": _confusions(run),
        "fig_decision": F.decision_figure(m),
        "fig_confidence": F.confidence_figure(run.predictions, run.levels),
        "fig_reliability": F.reliability_figure(curves.get("reliability") or {}),
        "fig_roc": F.roc_figure(curves.get("roc") or {}),
        "fig_ood": F.ood_roc_figure(curves.get("ood_roc") or {}, m.get("ood") or {}),
        "fig_coverage": F.coverage_risk_figure(curves.get("coverage_risk") or {}, m),
        "fig_training": F.training_figure({run.name: run.history}),
        "ood": [{"method": k, **{f: format_number(v.get(f))
                                 for f in ("auroc", "fpr95", "threshold", "precision", "recall", "f1",
                                           "known_flagged", "unknown_missed")},
                 "source": v.get("threshold_source", ""), "n_known": format_number(v.get("n_known")),
                 "n_unknown": format_number(v.get("n_unknown"))} for k, v in (m.get("ood") or {}).items()],
        "mistakes": worst_mistakes(gallery, n_mistakes),
        "recognised": recognised_taxa(gallery, 4 if compact else 8),
        "critical": [critical_taxon(gallery, name, 6 if compact else 12) for name in critical],
        "data": _data_section(run),
        "config_text": run.config_text,
        "settings": _settings(run),
        "history_rows": len(run.history),
    }
    view["per_label"], view["n_per_label"] = _per_label_rows(m)
    note = gallery.note()
    view["notes"] = list(m.get("notes") or []) + run.notes + ([note] if note else [])
    return view


# ---------------------------------------------------------------------------------------------- comparison
def comparison_table(runs: Sequence[RunResults]) -> list[dict]:
    """Key metrics side by side: each cell the value and its delta against the first run; the best run per
    metric is marked. Per-rank top-1 and OOD AUROC/FPR95 follow the headline metrics."""
    metrics = list(KEY_METRICS)
    levels = list(dict.fromkeys(lv for r in runs for lv in r.metrics.get("per_rank", {})))
    metrics += [(f"per_rank.{lv}.top1", f"top-1 at {lv}", "higher") for lv in levels]
    methods = list(dict.fromkeys(k for r in runs for k in (r.metrics.get("ood") or {})))
    for method in methods:
        metrics += [(f"ood.{method}.auroc", f"OOD AUROC ({method})", "higher"),
                    (f"ood.{method}.fpr95", f"OOD FPR at 95 % TPR ({method})", "lower")]
    rows = []
    for key, label, better in metrics:
        values = [_lookup(r.metrics, key) for r in runs]
        finite = [v for v in values if v is not None]
        if not finite:
            continue
        # rounded first: two runs with the same probabilities differ in the 16th digit of their log loss
        values = [None if v is None else round(v, 6) for v in values]
        best = (min if better == "lower" else max)(v for v in values if v is not None)
        base = values[0]
        cells = []
        for k, v in enumerate(values):
            delta = None if (v is None or base is None or k == 0) else v - base
            if delta is not None and abs(delta) < 5e-4:
                delta = 0.0  # shown as +0.000, neither better nor worse
            good = None if not delta else ((delta < 0) == (better == "lower"))
            cells.append({"value": format_number(v), "delta": "" if delta is None else f"{delta:+.3f}",
                          "good": good, "best": v is not None and len(finite) > 1 and v == best})
        rows.append({"key": key, "label": label, "better": better, "cells": cells})
    return rows


def _lookup(metrics: dict, dotted: str):
    value = metrics
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def config_differences(runs: Sequence[RunResults]) -> list[dict]:
    """Config keys (dotted) whose values differ between the runs, plus the evaluation settings that differ."""
    import yaml

    from taxonomist.utils.safe_parse import parse_yaml
    flat = []
    for r in runs:
        try:  # a run folder is data from disk: its config.yaml gets the same limits as a user's config
            cfg = parse_yaml(r.config_text) if r.config_text else {}
        except yaml.YAMLError:
            cfg = {}
        entries = _flatten(cfg if isinstance(cfg, dict) else {})
        entries.update({f"evaluate.{k}": v for k, v in _settings(r) if k in ("decision", "candidates", "split",
                                                                              "distance", "temperature", "epoch")})
        flat.append(entries)
    keys = sorted(set().union(*flat))
    out = []
    for key in keys:
        values = [json.dumps(f[key]) if isinstance(f.get(key), (dict, list)) else
                  ("–" if key not in f else str(f[key])) for f in flat]
        if len(set(values)) > 1:
            out.append({"key": key, "cells": values})
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------- render
def _environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined
    env = Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = format_number
    return env


def render_report(runs: Sequence[RunResults], critical: Sequence[str] = (), title: str | None = None) -> str:
    """The HTML text of the report of one run, or of several runs compared (the first is the baseline)."""
    import matplotlib
    from taxonomist import __version__

    if not runs:
        raise ConfigError("no run to report on")
    for r in runs:
        check_critical(critical, r.taxonomy, r.predictions)
    compare = len(runs) > 1
    with warnings.catch_warnings(), matplotlib.rc_context({"font.family": "DejaVu Sans"}):
        warnings.simplefilter("ignore")  # tight_layout complaints about crowded tick labels
        views = [run_view(r, critical, compact=compare) for r in runs]
        comparison = None
        if compare:
            comparison = {
                "table": comparison_table(runs),
                "fig_per_rank": F.per_rank_compare_figure({r.name: r.metrics.get("per_rank", {}) for r in runs}),
                "fig_training": F.training_figure({r.name: r.history for r in runs}),
                "config": config_differences(runs),
                "critical": _critical_compare(views),
            }
    names = [v["name"] for v in views]
    return _environment().get_template(TEMPLATE).render(
        title=title or ("comparison of " + ", ".join(names) if compare else names[0]),
        runs=views, compare=compare, comparison=comparison, critical=list(critical),
        generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), version=__version__)


def _critical_compare(views: list[dict]) -> list[dict]:
    out = []
    for k, name in enumerate(views[0]["critical"] and [c["name"] for c in views[0]["critical"]] or []):
        levels = list(dict.fromkeys(r["level"] for v in views for r in v["critical"][k]["ranks"]))
        rows = []
        for level in levels:
            cells = []
            for v in views:
                hit = next((r for r in v["critical"][k]["ranks"] if r["level"] == level), None)
                cells.append(format_number(hit["accuracy"]) if hit else "–")
            rows.append({"level": level, "cells": cells})
        rows.append({"level": "recall (found as itself)",
                     "cells": [format_number(v["critical"][k]["recall"]) for v in views]})
        rows.append({"level": "precision", "cells": [format_number(v["critical"][k]["precision"]) for v in views]})
        out.append({"name": name, "rows": rows})
    return out


def write_report(runs: Sequence[str | Path | RunResults], out: str | Path, critical: Sequence[str] = (),
                 title: str | None = None) -> Path:
    """Render the report of one run (or the comparison of several) into `out`, atomically.

    >>> write_report(["runs/demo/run"], "runs/demo/run/report.html")                  # doctest: +SKIP
    >>> write_report(["runs/flat", "runs/multirank"], "compare.html", critical=["Sebastes"])  # doctest: +SKIP
    """
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out}: is a directory; give the report's file name (e.g. {out / 'report.html'})")
    loaded = [r if isinstance(r, RunResults) else load_run(r) for r in runs]
    _unique_names(loaded)
    atomic_write_text(out, render_report(loaded, critical, title))
    return out


def _unique_names(runs: list[RunResults]) -> None:
    """Runs named alike (two `run` folders) get their parent folder's name in front."""
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
    for r in runs:
        if seen[r.name] > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"


__all__ = ["render_report", "write_report", "run_view", "comparison_table", "config_differences", "KEY_METRICS"]
