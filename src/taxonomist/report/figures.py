"""The report's figures: matplotlib (Agg canvas, no pyplot state) drawn from metrics.json and predictions.csv,
returned as `data:image/png;base64,…` URIs so the HTML needs no other file.
"""
from __future__ import annotations

import base64
import io
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

#: Largest confusion matrix drawn; a rank with more taxa shows its most-confused ones (the rest as "other").
MAX_CONFUSION_CLASSES = 30
#: Cells are annotated with their value up to this many classes (beyond, the numbers are unreadable).
ANNOTATE_CLASSES = 16
DPI = 90
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
          "#bcbd22")


def data_uri(payload: bytes, mime: str) -> str:
    """`payload` as a `data:` URI, so that the HTML needs no other file."""
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def figure_uri(fig) -> str:
    """PNG data URI of a matplotlib Figure (Agg), without matplotlib's "Software" text chunk."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return data_uri(buf.getvalue(), "image/png")


def png_file_uri(path) -> str:
    """A PNG file (e.g. an exploration plot) as a data URI; a file that is not a PNG is refused."""
    from pathlib import Path

    payload = Path(path).read_bytes()
    if not payload.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{path}: not a PNG file")
    return data_uri(payload, "image/png")


def _new(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


# ---------------------------------------------------------------------------------------------- confusions
def confusion_matrix_figure(truth: Sequence[str], predicted: Sequence[str], title: str,
                            max_classes: int = MAX_CONFUSION_CLASSES) -> tuple[str, dict]:
    """Row-normalised confusion matrix (rows: true taxon, columns: predicted), viridis.

    With more than `max_classes` taxa, the ones with the most errors (as truth or as prediction) are shown
    and a last column "other" holds the share of each row predicted outside them, so rows still sum to 1.
    Returns the URI and `{"shown": k, "classes": n}`.
    """
    truth = pd.Categorical(np.asarray(truth, dtype=object))
    names = list(truth.categories.union(pd.Index(pd.unique(np.asarray(predicted, dtype=object)))))
    t = pd.Categorical(np.asarray(truth, dtype=object), categories=names).codes.astype(np.int64)
    p = pd.Categorical(np.asarray(predicted, dtype=object), categories=names).codes.astype(np.int64)
    n = len(names)
    cm = np.bincount(t * n + p, minlength=n * n).reshape(n, n).astype(np.float64)
    rows = cm.sum(axis=1)
    has_truth = rows > 0
    if n > max_classes:
        errors = cm.sum(axis=1) + cm.sum(axis=0) - 2 * np.diag(cm)
        # only taxa with examples can be rows; rank them by errors, then by examples
        order = np.lexsort((-rows, -errors))
        keep = np.sort([i for i in order if has_truth[i]][:max_classes])
    else:
        keep = np.flatnonzero(has_truth | (cm.sum(axis=0) > 0))
    keep_rows = keep[has_truth[keep]]
    sub = cm[np.ix_(keep_rows, keep)] / rows[keep_rows, None]
    other = None
    if n > max_classes:
        other = 1.0 - sub.sum(axis=1)
        sub = np.concatenate([sub, other[:, None]], axis=1)
    col_names = [names[i] for i in keep] + (["(other)"] if other is not None else [])
    row_names = [names[i] for i in keep_rows]
    k = len(col_names)
    side = min(11.0, max(4.5, 0.32 * k + 2.5))
    fig, axes = _new(side + 1.0, min(11.0, max(4.0, 0.32 * len(row_names) + 2.2)))
    ax = axes[0, 0]
    im = ax.imshow(sub, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    font = 9 if k <= 12 else (7 if k <= 24 else 6)
    ax.set_xticks(np.arange(k), [_short(c) for c in col_names], rotation=90, fontsize=font)
    ax.set_yticks(np.arange(len(row_names)), [_short(c) for c in row_names], fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    if k <= ANNOTATE_CLASSES:
        for i in range(sub.shape[0]):
            for j in range(sub.shape[1]):
                if sub[i, j] >= 0.005:
                    ax.text(j, i, f"{sub[i, j]:.2f}".lstrip("0") if sub[i, j] < 1 else "1",
                            ha="center", va="center", fontsize=font - 1,
                            color="black" if sub[i, j] > 0.6 else "white")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="share of the true taxon's examples")
    return figure_uri(fig), {"shown": len(row_names), "classes": int(has_truth.sum())}


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


# ---------------------------------------------------------------------------------------------- per rank
def confidence_figure(predictions: pd.DataFrame, levels: Sequence[str]) -> str | None:
    """Per rank: histograms of the confidence of right and wrong predictions (small multiples)."""
    # a rank with one taxon (a single kingdom) is always right at confidence 1: nothing to show
    present = [lv for lv in levels if f"confidence_{lv}" in predictions.columns
               and predictions[f"prediction_{lv}"].nunique() + predictions[f"label_{lv}"].nunique() > 2]
    if not present:
        return None
    ncols = min(4, len(present))
    nrows = int(np.ceil(len(present) / ncols))
    fig, axes = _new(3.2 * ncols, 2.4 * nrows + 0.3, ncols, nrows, sharex=True)
    bins = np.linspace(0, 1, 21)
    for ax, lv in zip(axes.ravel(), present):
        truth = predictions[f"label_{lv}"].to_numpy(dtype=object)
        keep = truth != ""
        conf = predictions[f"confidence_{lv}"].to_numpy(dtype=np.float64)[keep]
        right = predictions[f"prediction_{lv}"].to_numpy(dtype=object)[keep] == truth[keep]
        ax.hist(conf[right], bins=bins, color="#2ca02c", alpha=0.7, label="right")
        ax.hist(conf[~right], bins=bins, color="#d62728", alpha=0.7, label="wrong")
        ax.set_title(f"{lv} (n={keep.sum()})", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(present):]:
        ax.set_visible(False)
    axes[0, 0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("confidence", fontsize=8)
    return figure_uri(fig)


def per_rank_compare_figure(per_rank: Mapping[str, Mapping[str, dict]], key: str = "top1") -> str | None:
    """Grouped bars: `key` (top-1) per rank, one bar per run."""
    runs = list(per_rank)
    levels = list(dict.fromkeys(lv for r in runs for lv in per_rank[r]))
    if not levels:
        return None
    fig, axes = _new(max(6.0, 1.0 * len(levels) + 2), 3.6)
    ax = axes[0, 0]
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        vals = [per_rank[run].get(lv, {}).get(key, np.nan) for lv in levels]
        ax.bar(np.arange(len(levels)) + (k - (len(runs) - 1) / 2) * width, vals, width, label=_short(run, 40),
               color=COLORS[k % len(COLORS)])
    ax.set_xticks(np.arange(len(levels)), levels, fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(key.replace("top1", "top-1"))
    ax.legend(fontsize=7, loc="lower left")
    return figure_uri(fig)


# ---------------------------------------------------------------------------------------------- decisions
def decision_figure(metrics: dict) -> str | None:
    """Argmax beside the chosen decision: how far the answers are from the truth, and at which rank they sit."""
    chosen = metrics.get("distance_histogram") or {}
    if not chosen:
        return None
    other = metrics.get("argmax")
    series = [("argmax", other)] if other else []
    series.append((metrics.get("decision", "argmax"), metrics))
    fig, axes = _new(11, 3.6, 2)
    ax = axes[0, 0]
    keys = sorted({float(k) for _, s in series for k in s["distance_histogram"]})
    width = 0.8 / len(series)
    for k, (name, s) in enumerate(series):
        total = max(1, sum(s["distance_histogram"].values()))
        vals = [s["distance_histogram"].get(f"{v:g}", 0) / total for v in keys]
        ax.bar(np.arange(len(keys)) + (k - (len(series) - 1) / 2) * width, vals, width,
               label=f"{name} (mean {s['mhd']:.3f})", color=COLORS[k])
    ax.set_xticks(np.arange(len(keys)), [f"{v:g}" for v in keys], fontsize=8)
    ax.set_xlabel("taxonomic distance between answer and truth (0 = exact)")
    ax.set_ylabel("share of examples")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    levels = list(dict.fromkeys(lv for _, s in series for lv in (s.get("answers") or {}).get("by_level", {})))
    for k, (name, s) in enumerate(series):
        by = (s.get("answers") or {}).get("by_level", {})
        ax.bar(np.arange(len(levels)) + (k - (len(series) - 1) / 2) * width, [by.get(lv, 0.0) for lv in levels],
               width, label=name, color=COLORS[k])
    ax.set_xticks(np.arange(len(levels)), levels, fontsize=8, rotation=30)
    ax.set_ylabel("share of answers")
    ax.set_title("rank of the answers", fontsize=9)
    ax.legend(fontsize=8)
    return figure_uri(fig)


# ---------------------------------------------------------------------------------------------- calibration
def reliability_figure(reliability: Mapping[str, dict]) -> str | None:
    """Reliability diagram before and after temperature scaling, with the examples per bin beneath."""
    parts = [(k, reliability[k]) for k in ("uncalibrated", "calibrated") if k in reliability]
    if not parts:
        return None
    fig, axes = _new(10, 4.4, len(parts), 2, gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    for j, (name, r) in enumerate(parts):
        edges = np.asarray(r["edges"])
        mid = (edges[:-1] + edges[1:]) / 2
        acc = np.array([np.nan if v is None else v for v in r["accuracy"]], dtype=np.float64)
        conf = np.array([np.nan if v is None else v for v in r["confidence"]], dtype=np.float64)
        count = np.asarray(r["count"])
        ax = axes[0, j]
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        ax.bar(mid, np.nan_to_num(acc), width=np.diff(edges), edgecolor="white", color="#1f77b4", alpha=0.8,
               label="accuracy")
        ax.plot(conf, acc, "o", color="#d62728", markersize=3, label="mean confidence → accuracy")
        label = "before temperature scaling" if name == "uncalibrated" else "after temperature scaling"
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, loc="upper left")
        axes[1, j].bar(mid, count, width=np.diff(edges), color="#7f7f7f")
        axes[1, j].set_xlabel("confidence of the top label")
        axes[1, j].set_ylabel("examples", fontsize=8)
    return figure_uri(fig)


def roc_figure(roc: Mapping[str, dict]) -> str | None:
    """One-vs-rest ROC per rank: micro-average (solid) and macro-average (dashed)."""
    levels = [lv for lv, r in roc.items() if r.get("fpr")]
    if not levels:
        return None
    fig, axes = _new(10, 4.4, 2)
    for k, lv in enumerate(levels):
        r = roc[lv]
        c = COLORS[k % len(COLORS)]
        auc = "–" if r.get("auc") is None else f"{r['auc']:.3f}"
        axes[0, 0].plot(r["fpr"], r["tpr"], color=c, label=f"{lv} (AUC {auc})")
        if r.get("macro_fpr"):
            mauc = "–" if r.get("macro_auc") is None else f"{r['macro_auc']:.3f}"
            axes[0, 1].plot(r["macro_fpr"], r["macro_tpr"], color=c, linestyle="--", label=f"{lv} (AUC {mauc})")
    for ax, title in zip(axes[0], ("micro-average (every example × taxon)", "macro-average (mean over taxa)")):
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 1)
    return figure_uri(fig)


def ood_roc_figure(ood_roc: Mapping[str, dict], ood: Mapping[str, dict]) -> str | None:
    """ROC of each OOD score (unknown taxa = positives), with the operating point of the threshold in use."""
    if not ood_roc:
        return None
    fig, axes = _new(5.5, 4.4)
    ax = axes[0, 0]
    for k, (method, r) in enumerate(ood_roc.items()):
        c = COLORS[k % len(COLORS)]
        m = ood.get(method, {})
        ax.plot(r["fpr"], r["tpr"], color=c, label=f"{method} (AUROC {m.get('auroc', float('nan')):.3f})")
        if "known_flagged" in m:
            ax.plot([m["known_flagged"]], [m["recall"]], "o", color=c, markersize=6)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    ax.axhline(0.95, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("known examples flagged (false positive rate)")
    ax.set_ylabel("unknown taxa flagged (true positive rate)")
    ax.legend(fontsize=7, loc="lower right")
    return figure_uri(fig)


def coverage_risk_figure(curve: Mapping[str, list], metrics: dict) -> str | None:
    """Selective answers: coverage (how specific) against risk (mean distance, hierarchical error)."""
    if not curve or not curve.get("coverage"):
        return None
    fig, axes = _new(10, 4.0, 2)
    cov = np.asarray(curve["coverage"])
    for ax, key, label in ((axes[0, 0], "mhd", "mean hierarchical distance"),
                           (axes[0, 1], "error", "hierarchical error (answer off the true lineage)")):
        ax.plot(cov, curve[key], "o-", color="#1f77b4", markersize=3,
                label=f"selective, threshold {curve['threshold'][0]:g} … {curve['threshold'][-1]:g}")
        for t in (0.5, 0.9):
            if t in curve["threshold"]:
                i = curve["threshold"].index(t)
                ax.annotate(f"t={t:g}", (cov[i], curve[key][i]), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
        ax.set_xlabel("coverage (1 = always a label, 0 = always the root)")
        ax.set_ylabel(label)
        ax.set_xlim(-0.02, 1.02)
    points = [("argmax", metrics["argmax"])] if metrics.get("argmax") else []
    points.append((metrics.get("decision", "argmax"), metrics))
    for (name, s), marker, color in zip(points, ("D", "s"), ("#ff7f0e", "#d62728")):
        a = s.get("answers") or {}
        if a.get("coverage") is None or a.get("on_lineage") is None:
            continue
        axes[0, 0].plot([a["coverage"]], [s["mhd"]], marker, color=color, label=f"{name} (this evaluation)")
        axes[0, 1].plot([a["coverage"]], [1 - a["on_lineage"]], marker, color=color)
    axes[0, 0].legend(fontsize=7)
    return figure_uri(fig)


# ---------------------------------------------------------------------------------------------- training, data
def training_figure(histories: Mapping[str, list[dict]]) -> str | None:
    """Loss, top-1, MHD and macro-F1 per epoch from metrics.csv; one colour per run, dashed = training."""
    histories = {k: v for k, v in histories.items() if v}
    if not histories:
        return None
    panels = [("loss", "train_loss", "val_loss"), ("top-1", "train_top1", "val_top1"),
              ("mean hierarchical distance (val)", None, "val_mhd"), ("macro-F1", "train_macro_f1", "val_macro_f1")]
    fig, axes = _new(12, 3.2, 4)
    for k, (run, rows) in enumerate(histories.items()):
        c = COLORS[k % len(COLORS)]
        epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
        for ax, (title, train_key, val_key) in zip(axes[0], panels):
            if train_key and train_key in rows[0]:
                ax.plot(epochs, [r[train_key] for r in rows], "--", color=c, linewidth=1)
            if val_key in rows[0]:
                ax.plot(epochs, [r[val_key] for r in rows], "o-", color=c, markersize=3,
                        label=_short(run, 30) if len(histories) > 1 else "validation")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    return figure_uri(fig)


def label_counts_figure(counts: pd.DataFrame, max_labels: int = 60) -> str | None:
    """Examples per label and split (stacked), the `max_labels` most frequent labels; log scale."""
    if counts.empty:
        return None
    total = counts.sum(axis=1).sort_values(ascending=False)
    shown = counts.loc[total.index[:max_labels]]
    fig, axes = _new(max(7.0, min(14.0, 0.2 * len(shown) + 3)), 4.2)
    ax = axes[0, 0]
    bottom = np.zeros(len(shown))
    for k, split in enumerate(shown.columns):
        ax.bar(np.arange(len(shown)), shown[split].to_numpy(), bottom=bottom, label=split,
               color=COLORS[k % len(COLORS)], width=0.85)
        bottom += shown[split].to_numpy()
    ax.set_xticks(np.arange(len(shown)), [_short(n, 24) for n in shown.index], rotation=90, fontsize=6)
    ax.set_ylabel("examples")
    more = f" — the {len(shown)} most frequent of {len(counts)}" if len(counts) > len(shown) else ""
    ax.set_title(f"examples per label and split{more}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.9)
    return figure_uri(fig)




def grouped_confusion_figure(truth: Sequence[str], predicted: Sequence[str], group_of: Mapping[str, str],
                             group_level: str, order_key: Mapping[str, tuple] | None = None,
                             max_cells: int = 200) -> tuple[str, dict] | None:
    """Label-level confusion with the labels ordered by their lineage (`order_key`, default group then name)
    and group (phylum) borders drawn: mass inside a diagonal block is confusion within one phylum, outside
    the blocks confusion between phyla.

    With more than `max_cells` labels, neighbouring labels (close relatives, thanks to the lineage order)
    are pooled into `max_cells` bins, never across a group border, so the picture keeps a visible diagonal.
    """
    truth = np.asarray(truth, dtype=object)
    predicted = np.asarray(predicted, dtype=object)
    names = list(dict.fromkeys(list(pd.unique(truth)) + list(pd.unique(predicted))))
    if len(names) < 2:
        return None
    key = order_key or {}
    order = sorted(names, key=lambda n: (group_of.get(n, "~"), key.get(n, (n,))))
    groups = [group_of.get(x, "?") for x in order]
    n = len(order)
    # bin k of each label: pooled neighbours, a new bin at every group border
    per_bin = max(1, int(np.ceil(n / max_cells)))
    bins, k, used = np.empty(n, dtype=np.int64), -1, per_bin
    for i in range(n):
        if used == per_bin or (i and groups[i] != groups[i - 1]):
            k, used = k + 1, 0
        bins[i], used = k, used + 1
    n_bins = k + 1
    index = {name: bins[i] for i, name in enumerate(order)}
    t = np.fromiter((index[x] for x in truth), dtype=np.int64, count=len(truth))
    p = np.fromiter((index[x] for x in predicted), dtype=np.int64, count=len(predicted))
    cm = np.bincount(t * n_bins + p, minlength=n_bins * n_bins).reshape(n_bins, n_bins).astype(np.float64)
    rows = cm.sum(axis=1)
    cm = np.divide(cm, rows[:, None], out=np.full_like(cm, np.nan), where=rows[:, None] > 0)
    bin_group = [groups[int(np.flatnonzero(bins == b)[0])] for b in range(n_bins)]
    bounds = [0] + [b for b in range(1, n_bins) if bin_group[b] != bin_group[b - 1]] + [n_bins]
    from matplotlib.colors import PowerNorm
    fig, axes = _new(8.5, 7.5)
    ax = axes[0, 0]
    # a square-root colour scale: the rare confusions off the diagonal stay visible beside a bright diagonal
    im = ax.imshow(np.ma.masked_invalid(cm), cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1),
                   interpolation="nearest", aspect="auto")
    for b in bounds[1:-1]:
        ax.axhline(b - 0.5, color="white", linewidth=0.7)
        ax.axvline(b - 0.5, color="white", linewidth=0.7)
    centres = [(a + b - 1) / 2 for a, b in zip(bounds[:-1], bounds[1:])]
    names_g = [bin_group[a] for a in bounds[:-1]]
    if len(names_g) <= 40:
        font = 8 if len(names_g) <= 15 else 6
        ax.set_yticks(centres, [_short(g, 22) for g in names_g], fontsize=font)
        ax.set_xticks(centres, [_short(g, 22) for g in names_g], fontsize=font, rotation=90)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    pooled = f", {per_bin} neighbouring labels per cell" if per_bin > 1 else ""
    ax.set_xlabel(f"predicted label (grouped by {group_level}{pooled})")
    ax.set_ylabel(f"true label (grouped by {group_level})")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="share of the true labels' examples (square-root scale)")
    return figure_uri(fig), {"labels": n, "groups": len(names_g), "per_cell": per_bin}


__all__ = ["data_uri", "figure_uri", "png_file_uri", "confusion_matrix_figure", "grouped_confusion_figure",
           "confidence_figure", "per_rank_compare_figure", "decision_figure", "reliability_figure", "roc_figure",
           "ood_roc_figure", "coverage_risk_figure", "training_figure", "label_counts_figure", "MAX_CONFUSION_CLASSES"]
