"""The sweep's report.html: trials ranked, Optuna's parameter importances, the optimisation history and the
validation curves that pruning cut short (PNG figures embedded as in the run report), and the best run's
per-rank table. One self-contained file, in the run report's look.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import re
import warnings
from pathlib import Path

from taxonomist.report.figures import COLORS, figure_uri
from taxonomist.report.html import format_number
from taxonomist.utils.files import atomic_write_text

STATE_ORDER = {"complete": 0, "pruned": 1, "running": 2, "fail": 3, "interrupted": 4}

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>taxonomist sweep — {{ study }}</title>
<style>{{ style }}</style>
</head>
<body class="single">
<header class="top">
  <h1>taxonomist sweep — {{ study }}</h1>
  <div class="meta">generated {{ generated }} by taxonomist {{ version }}; {{ direction }} validation {{ metric }}</div>
  <nav><a href="#summary">Summary</a><a href="#trials">Trials</a><a href="#importance">Importance</a><a href="#history">History</a><a href="#best">Best run</a></nav>
</header>
<main>
<section id="summary">
  <h2>Summary</h2>
  <div class="cards">
  {% for c in cards %}<div class="card"><div class="label">{{ c.label }}</div><div class="value">{{ c.value }}</div><div class="text">{{ c.text }}</div></div>
  {% endfor %}
  </div>
</section>
<section id="trials">
  <h2>Trials, best first</h2>
  <p class="lead">Complete trials ranked by validation {{ metric }} ({{ 'lower' if direction == 'minimize' else 'higher' }} is better), then the pruned ones by their last reported value, then the others. Each trial is a run directory under <code>{{ trials_dir }}</code>.</p>
  <div class="scroll"><table class="trials">
    <thead><tr><th>rank</th><th>trial</th><th>state</th><th>{{ metric }}</th><th>epochs</th><th>seconds</th>{% for p in params %}<th>{{ p }}</th>{% endfor %}<th>note</th></tr></thead>
    <tbody>{% for r in trials %}<tr><td>{{ r.rank }}</td><td>{{ r.trial }}</td><td>{{ r.state }}</td><td{% if r.best %} class="best"{% endif %}>{{ r.value }}</td><td>{{ r.epochs }}</td><td>{{ r.seconds }}</td>{% for v in r.params %}<td>{{ v }}</td>{% endfor %}<td style="text-align:left">{{ r.note }}</td></tr>
    {% endfor %}</tbody>
  </table></div>
</section>
<section id="importance">
  <h2>Parameter importance</h2>
  {% if importance_fig %}
  <figure><img src="{{ importance_fig }}" alt="parameter importances"><figcaption>Optuna's fANOVA importance evaluator over the {{ n_complete }} complete trials: the share of the variance of validation {{ metric }} explained by each parameter (a random forest fitted to the trials; few trials make it rough).</figcaption></figure>
  {% else %}<p class="muted">{{ importance_note }}</p>{% endif %}
</section>
<section id="history">
  <h2>Optimisation history</h2>
  <div class="figs">
  {% if history_fig %}<figure><img src="{{ history_fig }}" alt="optimisation history"><figcaption>Validation {{ metric }} of each complete trial in the order they started (dots) and the best so far (line); pruned trials (×) at their last reported value.</figcaption></figure>{% endif %}
  {% if curves_fig %}<figure><img src="{{ curves_fig }}" alt="validation curves"><figcaption>{{ step_column }} after each epoch, one line per trial: complete trials in colour, pruned trials grey and dashed, stopped where the {{ pruner }} pruner judged them.</figcaption></figure>{% endif %}
  </div>
</section>
<section id="best">
  <h2>Best run</h2>
  {% if best %}
  <p class="lead">Trial {{ best.trial }} ({{ best.run_dir }}): {% for k, v in best.params.items() %}<code>{{ k }}={{ v }}</code>{% if not loop.last %}, {% endif %}{% endfor %}. Its full config is <code>best.yaml</code>.</p>
  {% if per_rank %}
  <table class="per-rank"><thead><tr><th>rank</th><th>examples</th><th>top-1</th><th>top-5</th><th>macro-F1</th><th>mean confidence</th></tr></thead>
  <tbody>{% for r in per_rank %}<tr><td>{{ r.level }}</td><td>{{ r.n }}</td><td>{{ r.top1 }}</td><td>{{ r.top5 }}</td><td>{{ r.macro_f1 }}</td><td>{{ r.avg_confidence }}</td></tr>
  {% endfor %}</tbody></table>
  <p class="muted">Validation rows, best checkpoint: MHD {{ best_metrics.mhd }}, top-1 {{ best_metrics.top1 }}, log loss {{ best_metrics.log_loss }}, {{ best_metrics.n }} examples.</p>
  {% else %}<p class="muted">{{ per_rank_note }}</p>{% endif %}
  {% else %}<p class="muted">No trial completed yet.</p>{% endif %}
</section>
</main>
</body>
</html>
"""


def _style() -> str:
    """The run report's stylesheet, so that both reports look alike."""
    path = Path(__file__).resolve().parent.parent / "report" / "templates" / "report.html.j2"
    found = re.search(r"<style>(.*?)</style>", path.read_text(encoding="utf-8"), re.S) if path.is_file() else None
    return found.group(1) if found else "body { font-family: sans-serif; }"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def history_figure(rows: list[dict], metric: str, direction: str) -> str | None:
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    pruned = [r for r in rows if r["state"] == "pruned" and r["intermediate"]]
    if not done and not pruned:
        return None
    fig, ax = _figure(6.4, 3.6)
    if done:
        ax.plot([r["trial"] for r in done], [r["value"] for r in done], "o", color=COLORS[0], label="complete")
        best, xs, ys = None, [], []
        for r in done:
            if best is None or (r["value"] < best if direction == "minimize" else r["value"] > best):
                best = r["value"]
            xs.append(r["trial"])
            ys.append(best)
        ax.step(xs, ys, where="post", color=COLORS[1], label="best so far")
    if pruned:
        ax.plot([r["trial"] for r in pruned], [list(r["intermediate"].values())[-1] for r in pruned], "x",
                color="#7f7f7f", label="pruned (last value)")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure_uri(fig)


def curves_figure(rows: list[dict], step_column: str) -> str | None:
    shown = [r for r in rows if r["intermediate"] and r["state"] in ("complete", "pruned")]
    if not shown:
        return None
    fig, ax = _figure(6.4, 3.6)
    k = 0
    for r in shown:
        steps, values = list(r["intermediate"]), list(r["intermediate"].values())
        if r["state"] == "pruned":
            ax.plot(steps, values, "x--", color="#9a9a9a", lw=1)
        else:
            ax.plot(steps, values, "o-", color=COLORS[k % len(COLORS)], lw=1.4, label=f"trial {r['trial']}")
            k += 1
    ax.set_xlabel("epoch")
    ax.set_ylabel(step_column)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if sum(r["state"] == "complete" for r in shown) <= 10:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return figure_uri(fig)


def importance_figure(importances: dict[str, float]) -> str:
    names = list(importances)[::-1]
    fig, ax = _figure(6.4, 0.9 + 0.4 * len(names))
    ax.barh(names, [importances[n] for n in names], color=COLORS[0])
    ax.set_xlabel("importance (share of variance)")
    ax.set_xlim(0, max(1e-9, max(importances.values())) * 1.1)
    return figure_uri(fig)


def parameter_importances(study) -> tuple[dict[str, float] | None, str]:
    """Optuna's fANOVA importances, or None and the reason they cannot be computed."""
    import optuna
    from optuna.trial import TrialState
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, "Importances need at least two complete trials."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError) as e:  # e.g. every complete trial has the same values
        return None, f"Importances could not be computed: {str(e).splitlines()[0]}"
    if not values:
        return None, "No parameter varied between the complete trials."
    return dict(values), ""


def _ranked(rows: list[dict], direction: str, params: list[str], best_trial: int | None) -> list[dict]:
    sign = 1.0 if direction == "minimize" else -1.0

    def key(r):
        if r["state"] == "complete":
            v = r["value"]
        elif r["state"] == "pruned" and r["intermediate"]:
            v = list(r["intermediate"].values())[-1]
        else:
            v = math.inf * sign
        return STATE_ORDER.get(r["state"], 9), sign * v, r["trial"]

    out = []
    for k, r in enumerate(sorted(rows, key=key), 1):
        out.append({"rank": k if r["state"] == "complete" else "", "trial": r["trial"], "state": r["state"],
                    "value": format_number(r["value"], 4) if r["value"] is not None else "–",
                    "best": r["trial"] == best_trial,
                    "epochs": f"{r['epochs']}/{r['planned_epochs']}" if r["planned_epochs"] else str(r["epochs"]),
                    "seconds": f"{r['seconds']:.1f}" if r["seconds"] is not None else "–",
                    "params": [_param(r["params"].get(p)) for p in params], "note": r["note"]})
    return out


def _param(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_sweep_report(study, result) -> str:
    import matplotlib
    from jinja2 import Environment, StrictUndefined
    from taxonomist import __version__

    rows, metric, direction = result.rows, result.metric, result.direction
    params = list(dict.fromkeys(k for r in rows for k in r["params"]))
    counts = result.counts()
    saved, planned = result.epochs_saved()
    best = result.best
    cards = [
        {"label": f"best {metric}", "value": format_number(best["value"], 4) if best else "–",
         "text": f"Validation {metric} of trial {best['trial']}'s best checkpoint." if best else "No trial completed."},
        {"label": "trials", "value": str(len(rows)),
         "text": ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: STATE_ORDER.get(kv[0], 9)))},
        {"label": "epochs saved by pruning", "value": f"{saved}",
         "text": f"Of {planned} epochs the complete and pruned trials would have trained without pruning "
                 f"({100 * saved / planned:.0f} %)." if planned else "No trial trained yet."},
    ]
    per_rank, best_metrics, per_rank_note = [], {}, ""
    if best:
        metrics_file = Path(best["run_dir"]) / "metrics.json"
        try:  # a trial's folder is data from disk: an unreadable metrics.json is the same as none
            m = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else None
        except (OSError, ValueError, RecursionError):
            m = None
        if isinstance(m, dict):
            per_rank = [{"level": level, "n": format_number(v.get("n")), "top1": format_number(v.get("top1")),
                         "top5": format_number(v.get("top5")), "macro_f1": format_number(v.get("macro_f1")),
                         "avg_confidence": format_number(v.get("avg_confidence"))}
                        for level, v in m.get("per_rank", {}).items()]
            best_metrics = ({k: format_number(m.get(k), 4) for k in ("mhd", "top1", "log_loss")}
                            | {"n": format_number(m.get("n"))})
        elif best.get("note"):  # its evaluation after training failed: ranked by the training metric
            per_rank_note = f"The best trial has no metrics.json: {best['note']}"
        else:
            per_rank_note = f"{metrics_file} is not on this machine (the trial ran elsewhere)."
    importances, importance_note = parameter_importances(study)
    with warnings.catch_warnings(), matplotlib.rc_context({"font.family": "DejaVu Sans"}):
        warnings.simplefilter("ignore")
        figs = {"history_fig": history_figure(rows, metric, direction),
                "curves_fig": curves_figure(rows, result.step_column),
                "importance_fig": importance_figure(importances) if importances else None}
    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE).render(
        study=result.study_name, metric=metric, direction=direction, style=_style(), cards=cards,
        trials=_ranked(rows, direction, params, best["trial"] if best else None), params=params,
        trials_dir=str(result.out_dir / "trials"), importance_note=importance_note,
        n_complete=counts.get("complete", 0), step_column=result.step_column,
        pruner=type(study.pruner).__name__.replace("Pruner", "").lower() or "no", best=best,
        per_rank=per_rank, best_metrics=best_metrics, per_rank_note=per_rank_note,
        generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), version=__version__, **figs)


def write_sweep_report(study, result, out: str | Path) -> Path:
    """Write the sweep report (self-contained HTML) atomically."""
    return atomic_write_text(out, render_sweep_report(study, result))


__all__ = ["write_sweep_report", "render_sweep_report", "parameter_importances"]
