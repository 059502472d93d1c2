"""The Hub card of an export for the Hugging Face Hub: the card data `config.json` records, and the `README.md` the
Hub shows (a YAML header the Hub reads — library, tags, licence, metrics, model-index — over the metrics and their
split, the taxonomy, intended use and limits, and the exact `predict` command). Not to be confused with
`taxonomist.card.ModelCard`, what every model file carries, which this card describes in words.

Everything here is a pure function of the model's `ModelCard`, its taxonomy and one evaluation; the folder
itself is written by `taxonomist.deploy.hub.export_hub_folder`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from taxonomist import __version__
from taxonomist.card import ModelCard

#: a Hub folder's card data, written by `export --format hf` (`card_config`)
CONFIG_FILE = "config.json"

#: the metrics a card reports, in its order, with the words that explain them
CARD_METRICS: dict[str, str] = {
    "top1": "top-1 accuracy",
    "top5": "top-5 accuracy",
    "mhd": "mean hierarchical distance (lower is better)",
    "hierarchical_accuracy": "hierarchical accuracy",
    "macro_f1": "macro-averaged F1",
    "log_loss": "log loss (lower is better)",
    "ece": "expected calibration error (lower is better)",
}
#: the model-index entries: our metric → (the Hub's metric id, its display name)
MODEL_INDEX_METRICS = {"top1": ("accuracy", "Top-1 accuracy"), "macro_f1": ("f1", "Macro F1"),
                       "mhd": ("mhd", "Mean hierarchical distance")}
TAGS = ("image-classification", "taxonomy", "hierarchical-classification", "biology", "biodiversity", "taxonomist")
#: a licence id as the Hub spells them (apache-2.0, cc-by-4.0, other, …)
LICENSE_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789.-")


@dataclass
class CardEvaluation:
    """The one evaluation a card reports, and where it comes from."""

    split: str                      # test, or val when the numbers are the best epoch's validation metrics
    source: str                     # "evaluate" (the run's metrics.json) or "training" (the checkpoint's own)
    values: dict[str, float]        # CARD_METRICS keys that were measured
    per_rank: dict[str, dict[str, float]] = field(default_factory=dict)
    dataset: str | None = None      # the dataset folder's name (never its path: a card is public)
    n: int | None = None
    decision: str | None = None
    distance: str | None = None     # the distance behind mhd (fathomnet2025, lca)
    epoch: int | None = None

    @classmethod
    def from_dict(cls, data: Any) -> CardEvaluation | None:
        """Read back what `asdict` wrote into config.json; None for anything else."""
        if not isinstance(data, dict) or not isinstance(data.get("values"), dict):
            return None
        known = {k: data.get(k) for k in cls.__dataclass_fields__}
        values = {k: float(v) for k, v in known["values"].items() if k in CARD_METRICS and _is_number(v)}
        per_rank = {str(r): {k: float(v) for k, v in m.items() if _is_number(v)}
                    for r, m in (known["per_rank"] or {}).items() if isinstance(m, dict)}
        return cls(split=str(known["split"] or "unknown"), source=str(known["source"] or "unknown"), values=values,
                   per_rank=per_rank, dataset=_str_or_none(known["dataset"]), n=_int_or_none(known["n"]),
                   decision=_str_or_none(known["decision"]), distance=_str_or_none(known["distance"]),
                   epoch=_int_or_none(known["epoch"]))


@dataclass
class CardOptions:
    """What the checkpoint cannot know: where the model will live and under which licence."""

    repo_id: str | None = None      # ORG/NAME: the card's commands name hf-hub:ORG/NAME
    license: str | None = None      # a Hub licence id; None = not stated (the card says why)
    model_name: str | None = None   # the card's title; default: NAME of repo_id, else the backbone and head

    def check(self) -> None:
        from taxonomist.errors import ConfigError

        if self.license is not None and (not self.license or not set(self.license) <= LICENSE_CHARS
                                         or not self.license[0].isalnum()):
            raise ConfigError(f"--license {self.license!r}: give a Hub licence id in lower case, e.g. apache-2.0, "
                              "cc-by-4.0, cc-by-nc-4.0, mit or other")


def read_card_config(path: str | Path) -> dict[str, Any] | None:
    """A Hub folder's config.json when it is taxonomist's (`library_name`), else None."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) and config.get("library_name") == "taxonomist" else None


def evaluation_for_card(checkpoint: Path, card: ModelCard) -> CardEvaluation | None:
    """The evaluation that describes `checkpoint`: its run's `metrics.json` when that evaluated this very
    checkpoint (same file name, epoch and taxonomy), the card data of the Hub folder it was exported from, or else
    the validation metrics of the epoch that chose it (split `val`: optimistic, since that split picked it)."""
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    if run_dir is not None and (run_dir / "metrics.json").is_file():
        found = _run_evaluation(run_dir / "metrics.json", checkpoint, card)
        if found is not None:
            return found
    config = read_card_config(checkpoint.parent / CONFIG_FILE)
    if config is not None:
        found = CardEvaluation.from_dict(config.get("evaluation"))
        if found is not None:
            return found
    trained = card.metrics if isinstance(card.metrics, dict) else {}
    values = {key: float(trained[f"val_{key}"]) for key in CARD_METRICS if _is_number(trained.get(f"val_{key}"))}
    if not values:
        return None
    return CardEvaluation(split="val", source="training", values=values, dataset=_run_dataset(run_dir),
                          distance=_str_or_none(card.metric), epoch=_int_or_none(card.epoch))


def _run_evaluation(path: Path, checkpoint: Path, card: ModelCard) -> CardEvaluation | None:
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(m, dict):
        return None
    evaluated = _str_or_none(m.get("checkpoint"))
    if evaluated is None or Path(evaluated).name != checkpoint.name or m.get("epoch") != card.epoch \
            or m.get("taxonomy_hash") not in (None, card.taxonomy_hash):
        return None  # metrics.json describes another checkpoint of the run
    values = {key: float(m[key]) for key in CARD_METRICS if _is_number(m.get(key))}
    per_rank = {str(rank): {k: float(v) for k, v in ms.items() if _is_number(v)}
                for rank, ms in (m.get("per_rank") or {}).items() if isinstance(ms, dict)}
    data = _str_or_none(m.get("data"))
    return CardEvaluation(split=str(m.get("split") or "test"), source="evaluate", values=values, per_rank=per_rank,
                          dataset=Path(data).name if data else None, n=_int_or_none(m.get("n")),
                          decision=_str_or_none(m.get("decision")), distance=_str_or_none(m.get("metric")),
                          epoch=_int_or_none(m.get("epoch")))


def _run_dataset(run_dir: Path | None) -> str | None:
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    try:
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        root = (config.get("data") or {}).get("root")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return Path(str(root)).name if root else None


# --------------------------------------------------------------------------------------------------- commands
def model_reference(repo_id: str | None) -> str:
    """How the card's commands name the model: `hf-hub:ORG/NAME`, or a placeholder when the repo is not known."""
    return f"hf-hub:{repo_id}" if repo_id else "hf-hub:ORG/NAME"


def predict_command(card: ModelCard, repo_id: str | None) -> str:
    """The exact command that predicts a folder of images with this model."""
    trust = " --trust-code" if _needs_trust(card) else ""
    return f"taxonomist predict {model_reference(repo_id)} --images photos/ --out predictions.csv{trust}"


def _needs_trust(card: ModelCard) -> bool:
    from taxonomist.models.backbones import code_named_by

    backbone = card.model_config.get("backbone") or card.backbone
    return code_named_by(str(backbone)) is not None


def _ood_choice(card: ModelCard) -> str | None:
    """The `--ood` value the card suggests: auto (Mahalanobis) when its statistics are stored, else the first method
    that is."""
    methods = _ood_methods(card)
    return None if not methods else "auto" if "mahalanobis" in methods else methods[0]


def _ood_methods(card: ModelCard) -> list[str]:
    return [str(m) for m in card.ood.methods] if card.ood is not None else []


# ------------------------------------------------------------------------------------------------ card data
def card_data(card: ModelCard, taxonomy, evaluation: CardEvaluation | None, options: CardOptions):
    """The YAML header as `huggingface_hub.ModelCardData`: library, pipeline tag, tags, licence when stated, the
    metrics, and a model-index holding the evaluation (task image-classification, the dataset by its folder
    name and split)."""
    from huggingface_hub import EvalResult, ModelCardData

    name = _title(card, options)
    results = []
    if evaluation is not None and evaluation.dataset:
        for key, (metric_type, metric_name) in MODEL_INDEX_METRICS.items():
            if key in evaluation.values:
                results.append(EvalResult(
                    task_type="image-classification", task_name="Hierarchical image classification",
                    dataset_type=evaluation.dataset, dataset_name=evaluation.dataset,
                    dataset_split=evaluation.split, metric_type=metric_type,
                    metric_name=f"{metric_name} ({evaluation.split})", metric_value=round(evaluation.values[key], 4),
                    metric_config=evaluation.distance if key == "mhd" else None))
    metrics = [MODEL_INDEX_METRICS[k][0] for k in MODEL_INDEX_METRICS if evaluation and k in evaluation.values]
    return ModelCardData(library_name="taxonomist", pipeline_tag="image-classification", license=options.license,
                         tags=list(TAGS), metrics=metrics or None, model_name=name,
                         eval_results=results or None)


def _title(card: ModelCard, options: CardOptions) -> str:
    if options.model_name:
        return options.model_name
    if options.repo_id:
        return options.repo_id.split("/")[-1]
    return f"taxonomist {card.backbone or 'model'} ({card.head} head)"


def card_config(card: ModelCard, taxonomy, evaluation: CardEvaluation | None, options: CardOptions,
                files: dict[str, str | None]) -> dict[str, Any]:
    """`config.json`: the card data in machine-readable form (what the README says, as JSON), with the files of
    the folder. The model itself is rebuilt from `model.json`, as for any checkpoint."""
    return {
        "library_name": "taxonomist",
        "format": "taxonomist-hub",
        "format_version": 1,
        "taxonomist_version": __version__,
        "repo_id": options.repo_id,
        "model_name": _title(card, options),
        "files": files,
        "backbone": card.backbone or None,
        "head": card.head,
        "image_size": card.image_size,
        "preprocessing": None if card.preprocessing is None else card.preprocessing.to_dict(),
        "temperature": card.temperature if card.calibrated else None,
        "ood_methods": _ood_methods(card),
        "trust_code_required": _needs_trust(card),
        "num_labels": len(taxonomy.labels),
        "labels": list(taxonomy.labels),
        "taxonomy": {"nodes": len(taxonomy), "roots": taxonomy.roots, "ranked": taxonomy.has_ranks,
                     "max_depth": int(taxonomy.max_depth), "hash": taxonomy.hash},
        "evaluation": asdict(evaluation) if evaluation is not None else None,
        "license": options.license,
        "predict_command": predict_command(card, options.repo_id),
        "card_data": card_data(card, taxonomy, evaluation, options).to_dict(),
    }


# --------------------------------------------------------------------------------------------------- README
def render_card(card: ModelCard, taxonomy, evaluation: CardEvaluation | None, options: CardOptions,
                files: dict[str, str | None]) -> str:
    """README.md: the YAML header of `card_data` over the Markdown body. Names from the taxonomy are escaped,
    so a label cannot inject Markdown or HTML into the page."""
    from huggingface_hub import ModelCard as HubModelCard

    data = card_data(card, taxonomy, evaluation, options)
    body = "\n".join(_body(card, taxonomy, evaluation, options, files))
    return str(HubModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _body(card: ModelCard, taxonomy, evaluation: CardEvaluation | None, options: CardOptions, files) -> list[str]:
    ref = model_reference(options.repo_id)
    trust = " --trust-code" if _needs_trust(card) else ""
    labels, n_nodes = len(taxonomy.labels), len(taxonomy)
    size = card.image_size
    out = [f"# {_md(_title(card, options))}", "",
           "A hierarchical image classifier of organisms made with `taxonomist`: "
           f"backbone `{_code(card.backbone or None)}`, "
           f"{_md(card.head)} head, {size} × {size} px input. It answers one of {labels} labels "
           f"that sit in a taxonomy of {n_nodes} nodes, and is scored by taxonomic distance: calling a species "
           "its sister species is a small error, calling it another phylum a large one.", ""]

    out += ["## Use", "", "With `taxonomist` installed:", "", "```bash",
            predict_command(card, options.repo_id)]
    decided = f"taxonomist predict {ref} --images photos/ --decision min-risk --candidates all"
    if _ood_choice(card):
        decided += f" --ood {_ood_choice(card)}"
    out += [f"{decided} --out predictions.csv{trust}",
            f"taxonomist serve {ref}{trust}",
            f"taxonomist evaluate {ref} --data DATASET --out evaluation/{trust}", "```", "",
            "`predictions.csv` holds `path,prediction,confidence`, one column per rank with the answer's ancestor "
            "there, and the expected taxonomic distance of the answer. `--decision min-risk` answers the taxon "
            "with the least expected distance, which may be a genus or a family when the species is uncertain; "
            "`taxonomist predict --help` lists the other decision rules; `serve` offers the same decisions as a JSON "
            "API and a web page on 127.0.0.1:8000. The model is downloaded once into the "
            "Hugging Face cache; with `HF_HUB_OFFLINE=1` it is read from there. Pin a revision with "
            f"`{ref}@REVISION`.", ""]

    out += ["## Evaluation", ""]
    if evaluation is None or not evaluation.values:
        out += ["No evaluation was recorded with this checkpoint. Measure it on your own images with "
                f"`taxonomist evaluate {ref} --data DATASET --out evaluation/`.", ""]
    else:
        where = f"the **{_md(evaluation.split)}** split" + (f" of `{_code(evaluation.dataset)}`"
                                                            if evaluation.dataset else "")
        n = f" ({evaluation.n} images)" if evaluation.n else ""
        how = (f"`taxonomist evaluate`, decision `{_code(evaluation.decision or 'argmax')}`"
               if evaluation.source == "evaluate" else
               f"the validation set that chose this checkpoint (epoch {evaluation.epoch}) during training; the "
               "numbers are optimistic, since that split selected the model")
        distance = f" The distance is `{_code(evaluation.distance)}`." if evaluation.distance else ""
        out += [f"Measured on {where}{n} by {how}.{distance}", "", "| metric | value |", "|---|---|"]
        out += [f"| {CARD_METRICS[k]} | {evaluation.values[k]:.4f} |" for k in CARD_METRICS if k in evaluation.values]
        out.append("")
        if evaluation.per_rank:
            cols = [c for c in ("top1", "top5", "macro_f1") if any(c in m for m in evaluation.per_rank.values())]
            out += ["Per rank (the answer's ancestor at that rank against the label's):", "",
                    "| rank | " + " | ".join(CARD_METRICS.get(c, c) for c in cols) + " |",
                    "|---|" + "---|" * len(cols)]
            for rank, m in evaluation.per_rank.items():
                out.append(f"| {_md(rank)} | " + " | ".join(f"{m[c]:.4f}" if c in m else "" for c in cols) + " |")
            out.append("")

    out += ["## Taxonomy", "",
            f"{labels} labels in a {'ranked' if taxonomy.has_ranks else 'unranked'} tree of {n_nodes} nodes "
            f"(roots: {', '.join(_md(r) for r in taxonomy.roots[:10])}{', …' if len(taxonomy.roots) > 10 else ''}; "
            f"lineages up to {int(taxonomy.max_depth) + 1} names long). `{files['taxonomy']}` holds the tree, the "
            "same table `taxonomist` trains from.", "",
            f"<details><summary>The {labels} labels and their lineages</summary>", "", "| label | rank | lineage |",
            "|---|---|---|"]
    for name in taxonomy.labels:
        out.append(f"| {_md(name)} | {_md(taxonomy.rank(name) or '')} | "
                   f"{' › '.join(_md(a) for a in taxonomy.ancestors(name))} |")
    out += ["", "</details>", ""]

    ood = _ood_methods(card)
    unknowns = (f"OOD statistics are included (`{files['ood']}`; methods: {', '.join(map(_code_span, ood))}): "
                f"`--ood {_ood_choice(card)}` flags images that look like none of the labels." if ood else
                "No OOD statistics are included, so the model cannot flag an image of an unknown taxon.")
    out += ["## Intended use and limits", "",
            "- **For**: sorting and identifying images of organisms like the training images"
            + (f" (`{_code(evaluation.dataset)}`)" if evaluation and evaluation.dataset else "")
            + ", as a first pass that a taxonomist reviews.",
            f"- **Closed set**: it always answers one of its {labels} labels (or, with back-off decisions, one of "
            f"their ancestors); an organism outside them gets the nearest label. {unknowns}",
            "- **Shift**: the numbers above hold for the split they were measured on. Other cameras, regions, "
            "depths or seasons change them; measure on your own images with `taxonomist evaluate` first.",
            "- **Not for**: decisions with safety or legal consequences on its own (the edibility of a fungus, "
            "the status of a protected species).",
            "- **Confidence**: " + (f"calibrated by a temperature of {card.temperature:.3f} fitted on "
                                    "the validation split." if card.calibrated else
                                    "not calibrated (no temperature was fitted)."),
            ""]

    out += ["## Files", "", "| file | content |", "|---|---|",
            f"| `{files['weights']}` | the weights (safetensors; the header repeats the labels, taxonomy and "
            "backbone, so weights and metadata that do not belong together are refused) |",
            f"| `{files['metadata']}` | the checkpoint metadata `taxonomist` loads: labels, taxonomy, backbone, "
            "preprocessing, temperature |"]
    if files.get("ood"):
        out.append(f"| `{files['ood']}` | out-of-distribution statistics |")
    out += [f"| `{files['taxonomy']}` | the taxonomy |", f"| `{files['config']}` | this card's data as JSON |",
            "", "## Trust", "",
            "The files are data: loading them never unpickles anything nor imports code that they name."
            + (" This model's backbone is built by code it names "
               f"(`{_code(card.backbone or None)}`): loading it needs `--trust-code` and that code installed, so "
               "trust the publisher first." if _needs_trust(card) else ""), ""]

    out += ["## Licence", "",
            f"`{options.license}`." if options.license else
            "Not stated. The weights derive from the training images and from the pretrained backbone, whose "
            "terms the exporter did not record; ask the publisher before reuse (`taxonomist export --license ID` "
            "states one).", ""]
    return out


_MD_SPECIAL = str.maketrans({c: f"\\{c}" for c in "\\`*_[]{}()#+!|~"} | {"<": "&lt;", ">": "&gt;", "&": "&amp;",
                                                                           "\n": " ", "\r": " "})


def _md(text: Any) -> str:
    """A name as literal Markdown text inside a table cell or a line."""
    return str(text).translate(_MD_SPECIAL)


def _code(text: Any) -> str:
    """Text inside an inline code span (backticks cannot close it)."""
    return str(text).replace("`", "'").replace("\n", " ").replace("\r", " ")


def _code_span(text: Any) -> str:
    return f"`{_code(text)}`"


def _is_number(value: Any) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _int_or_none(value: Any) -> int | None:
    return int(value) if _is_number(value) else None
