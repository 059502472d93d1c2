"""Baselines without fine-tuning, evaluated and written as a run directory so that `taxonomist report STOCK RUN`
compares them with a trained run: a stock classifier mapped onto the labels, or BioCLIP zero-shot.

Both are models that output `{"logits", "features"}` over the dataset's labels; from there on the arrays go
through `evaluate.outputs` exactly as a trained run's do.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from taxonomist.config import Config
from taxonomist.data.dataset import Dataset, load_dataset
from taxonomist.errors import DataError
from taxonomist.evaluate.outputs import evaluate_outputs
from taxonomist.decide import DEFAULT_OOD_TPR, DecisionOptions
from taxonomist.evaluate.run import Evaluation, rows_for_split, candidates_text, write_predictions
from taxonomist.taxonomy import Taxonomy, default_metric, write_taxonomy
from taxonomist.utils.files import atomic_write_json, atomic_write_text

#: Logit OOD scores a baseline gets on the dataset's `ood` rows (no fitting needed; threshold: 95 % of the val
#: rows kept when there are val rows).
BASELINE_OOD = ("msp", "energy")


def baseline_dataset(data: str | Path) -> Dataset:
    """The dataset with the labels a model trained on it would have (its train/val rows' labels, taxonomy order),
    so that a baseline and a fine-tuned run are scored over the same labels."""
    from taxonomist.data.split import trainable_labels

    dataset = load_dataset(data)
    pool = trainable_labels(dataset)
    if not pool:
        raise DataError(f"{dataset.root}: no labelled train/val rows to take the labels from")
    dataset.taxonomy = dataset.taxonomy.with_labels([lab for lab in dataset.taxonomy.labels if lab in pool])
    return dataset


def evaluate_baseline(model, preprocessing: Mapping, dataset: Dataset, out: str | Path, description: Mapping,
                      split: str = "test", device: str = "auto", batch_size: int = 64, num_workers: int = -1,
                      progress: bool = True, decision: str | None = None, candidates=None, thresholds=None,
                      notes: Sequence[str] = ()) -> Evaluation:
    """Run `model` (images → `{"logits", "features"}` over `dataset.taxonomy.labels`) over `split` and write a run
    directory into `out`: config.yaml, taxonomy.csv, metrics.json (with `baseline`: `description`),
    predictions.csv. No checkpoints: the model is not ours to save.

    `preprocessing`: `mean`, `std`, `interpolation`, `image_size` and optionally `crop_pct` of the model.
    """
    import torch

    from taxonomist.data.loading import TaxonDataset, build_loader, build_transforms
    from taxonomist.decide import build_ood_scorer
    from taxonomist.inference.calibrate import known_threshold
    from taxonomist.inference.forward import run_inference
    from taxonomist.runtime import configure_threads, select_device

    start = time.time()
    taxonomy: Taxonomy = dataset.taxonomy
    dev = select_device(device)
    configure_threads(0, dev, num_workers)
    model = model.to(dev).eval()
    options = DecisionOptions.from_config(Config().decide, taxonomy.has_ranks, decision=decision,
                                          candidates=candidates, thresholds=thresholds)
    spec = candidates_text(options.candidates)
    rows, used_split = rows_for_split(dataset, None, split)
    rows = rows[rows["label"].isin(set(taxonomy.labels))]
    if rows.empty:
        raise DataError(f"{dataset.root}: no rows of the {used_split} split carry one of the {len(taxonomy.labels)} "
                        "labels")
    cfg = Config()
    cfg.data.root = str(Path(dataset.root).resolve())
    cfg.data.image_size = int(preprocessing["image_size"])
    if "crop_pct" in preprocessing:
        cfg.augment.crop_pct = float(preprocessing["crop_pct"])
    tf = build_transforms(cfg, False, preprocessing["mean"], preprocessing["std"],
                          preprocessing.get("interpolation", "bicubic"))
    label_index = {lab: i for i, lab in enumerate(taxonomy.labels)}

    def infer(subset: pd.DataFrame, desc: str, allow_unknown: bool = False):
        ds = TaxonDataset(dataset, subset, tf, label_index=label_index, allow_unknown=allow_unknown)
        loader = build_loader(ds, batch_size, train=False, num_workers=num_workers)
        try:
            with torch.inference_mode():
                return run_inference(model, loader, dev, progress=progress, desc=desc)
        finally:
            loader.close()

    res = infer(rows, f"evaluate {description.get('kind', 'baseline')}")
    if len(res.targets) == 0:
        raise DataError(f"{dataset.root}: every image of the {used_split} split was unreadable")
    frame = dataset.annotations
    has_split = "split" in frame.columns
    ood_rows = frame[frame["split"] == "ood"] if has_split else frame.iloc[:0]
    all_notes = list(notes)
    ood_scores, ood_thr = None, {}
    if ood_rows.empty:
        all_notes.append("OOD not evaluated: the dataset has no ood rows (taxonomist data split --ood-taxa N)")
    else:
        unk = infer(ood_rows, "evaluate ood", allow_unknown=True)
        val_rows = frame[(frame["split"] == "val") & frame["label"].isin(set(taxonomy.labels))] \
            if used_split != "val" else frame.iloc[:0]
        val = infer(val_rows, "evaluate val") if not val_rows.empty else None
        ood_scores = {}
        for method in BASELINE_OOD:
            scorer = build_ood_scorer(method).fit(None, res.logits, None)
            ood_scores[method] = (scorer.score(None, res.logits), scorer.score(None, unk.logits))
            if val is not None:
                ood_thr[method] = known_threshold(scorer.score(None, val.logits), DEFAULT_OOD_TPR)

    metric = default_metric(taxonomy)
    result = evaluate_outputs(res.logits, res.targets, taxonomy, metric, temperature=1.0, options=options,
                              ood_scores=ood_scores, ood_thresholds=ood_thr)
    m = result.metrics
    for method in ood_thr:
        m["ood"][method]["threshold_source"] = "95% of the val rows kept"
    out_dir = Path(out)
    m.update(split=used_split, candidates=spec, thresholds=options.thresholds, checkpoint=None, run_dir=str(out_dir.resolve()),
             data=str(Path(dataset.root).resolve()), taxonomy_hash=taxonomy.hash, epoch=None,
             baseline=dict(description), seconds=round(time.time() - start, 3))
    m["notes"] = all_notes + m["notes"]
    table = write_predictions(out_dir, rows, res.indices, result.columns, m["notes"])
    write_taxonomy(taxonomy, out_dir / "taxonomy.csv")
    cfg.out = str(out_dir)
    cfg.model.backbone = str(description.get("model", ""))
    cfg.model.pretrained = str(description.get("pretrained", "auto"))
    cfg.train.epochs = 0
    cfg.decide.decision = options.decision
    header = f"# {description.get('kind', 'baseline')} baseline: evaluated as is, no training (see metrics.json baseline)\n"
    atomic_write_text(out_dir / "config.yaml", header + cfg.to_yaml())
    atomic_write_json(out_dir / "metrics.json", m)
    return Evaluation(m, table, out_dir, used_split, res)


def evaluate_stock(model: str, data: str | Path, out: str | Path, class_names=None, pretrained: str = "auto",
                   image_size: int | None = None, **kwargs) -> Evaluation:
    """Evaluate a stock classifier (`timm/NAME`) on the dataset without fine-tuning: its classes mapped to the
    dataset's labels by name (`models.stock.map_class_names`), probabilities summed per label and renormalised.
    metrics.json `baseline` records the mapping counts. kwargs: those of `evaluate_baseline`.

    Example (ImageNet classes named as species, e.g. "goldfish, Carassius auratus"):
        evaluate_stock("timm/resnet50.a1_in1k", "data/fish", "runs/stock")
    """
    from taxonomist.models.stock import create_stock_model

    dataset = baseline_dataset(data)
    classifier, pre = create_stock_model(model, dataset.taxonomy, class_names, pretrained, image_size)
    mapping = classifier.mapping
    counts = mapping.counts
    description = {"kind": "stock", "model": f"stock:{model}", "pretrained": pretrained, "mapping": counts,
                   "dropped_classes": [n for n, h in zip(mapping.source_names, mapping.how)
                                       if h in ("unmapped", "internal")][:50]}
    notes = [f"stock model {model}: {mapping.summary()}"]
    if counts["labels_without_source"]:
        covered = set(mapping.target.tolist())
        missing = [lab for i, lab in enumerate(mapping.labels) if i not in covered]
        notes.append(f"labels the stock model cannot name (probability {1e-12:g}): {', '.join(missing[:10])}"
                     f"{' …' if len(missing) > 10 else ''}")
    return evaluate_baseline(classifier, pre, dataset, out, description, notes=notes, **kwargs)


def evaluate_bioclip(data: str | Path, out: str | Path, model: str = "hf-hub:imageomics/bioclip",
                     pretrained: str = "auto", templates: Sequence[str] | None = None, image_size: int | None = None,
                     **kwargs) -> Evaluation:
    """Zero-shot BioCLIP (or any open_clip model) over the dataset's labels: one text per label from its lineage
    (`models.bioclip.lineage_prompts`, "a photo of Animalia Chordata … Genus epithet."), image–text cosine
    similarity × the model's logit scale as logits. kwargs: those of `evaluate_baseline`."""
    from taxonomist.models.bioclip import DEFAULT_TEMPLATE, ZeroShotClassifier, create_open_clip, lineage_prompts

    dataset = baseline_dataset(data)
    templates = list(templates or [DEFAULT_TEMPLATE])
    clip, tokenizer, pre = create_open_clip(model, pretrained, image_size=image_size)
    prompts = lineage_prompts(dataset.taxonomy, templates=templates)
    classifier = ZeroShotClassifier(clip, tokenizer, prompts)
    description = {"kind": "bioclip", "model": f"open_clip:{model}", "pretrained": pretrained,
                   "templates": templates, "example_prompts": [p[0] for p in prompts[:3]]}
    notes = [f"zero-shot {model} over {len(prompts)} labels, {len(templates)} prompt template(s), e.g. "
             f"{prompts[0][0]!r}"]
    return evaluate_baseline(classifier, pre, dataset, out, description, notes=notes, **kwargs)


__all__ = ["evaluate_baseline", "evaluate_stock", "evaluate_bioclip", "baseline_dataset", "BASELINE_OOD"]
