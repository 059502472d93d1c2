"""The regression net's scenarios: a tiny model trained with fixed seeds on a hand-made dataset, and what
`predict`, `serve` and `evaluate` answer with it, as text files (CSV, JSON) to compare with the golden ones.

Used by `test_regression.py` (compare) and `make_golden.py` (write); nothing here decides what is right —
only that a refactor changed no answer. Every run is on CPU with one thread and no loader workers, so the
computation is deterministic on one machine and the files are compared byte for byte.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

GOLDEN = Path(__file__).parent / "golden"

# ---------------------------------------------------------------------------------------------- the dataset
#: A ranked taxonomy with labels at species, genus and class rank (a label may be an ancestor of none), and
#: one taxon the model never sees (`ood` rows).
TAXONOMY = [
    # concept_name, kingdom, phylum, class, order, family, genus, species
    ("Sebastes aleutianus", "Animalia", "Chordata", "Actinopterygii", "Perciformes", "Sebastidae", "Sebastes",
     "Sebastes aleutianus"),
    ("Sebastes diploproa", "Animalia", "Chordata", "Actinopterygii", "Perciformes", "Sebastidae", "Sebastes",
     "Sebastes diploproa"),
    ("Sebastolobus", "Animalia", "Chordata", "Actinopterygii", "Perciformes", "Sebastidae", "Sebastolobus", ""),
    ("Merluccius productus", "Animalia", "Chordata", "Actinopterygii", "Gadiformes", "Merlucciidae", "Merluccius",
     "Merluccius productus"),
    ("Asteroidea", "Animalia", "Echinodermata", "Asteroidea", "", "", "", ""),
    ("Strongylocentrotus fragilis", "Animalia", "Echinodermata", "Echinoidea", "Camarodonta",
     "Strongylocentrotidae", "Strongylocentrotus", "Strongylocentrotus fragilis"),
    ("Octopus rubescens", "Animalia", "Mollusca", "Cephalopoda", "Octopoda", "Octopodidae", "Octopus",
     "Octopus rubescens"),
]
OOD_TAXON = "Octopus rubescens"
#: images per label: train, val, test (the OOD taxon: 6 `ood` rows)
PER_SPLIT = {"train": 6, "val": 3, "test": 3}
IMAGE_SIZE = 32
NOISE = 70.0
RANK_COLUMNS = ("concept_name", "kingdom", "phylum", "class", "order", "family", "genus", "species")


def make_dataset(root: Path) -> Path:
    """The dataset: 32 px PNGs, one colour and stripe direction per label plus seeded noise, with a split column."""
    from PIL import Image

    root.mkdir(parents=True)
    (root / "images").mkdir()
    with open(root / "taxonomy.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(RANK_COLUMNS)
        writer.writerows(TAXONOMY)
    rng = np.random.default_rng(20240607)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    rows = []
    for k, (name, *lineage) in enumerate(TAXONOMY):
        # one colour per phylum, one stripe direction per label: siblings differ only in their stripes
        phylum = ("Chordata", "Echinodermata", "Mollusca").index(lineage[1])
        colour = np.array([(70 + 80 * phylum) % 256, (190 - 60 * phylum) % 256, 110 + 8 * k], dtype=np.float64)
        stripes = np.sin((xx * np.cos(0.6 * k) + yy * np.sin(0.6 * k)) * 0.7)[..., None]
        splits = ["ood"] * 6 if name == OOD_TAXON else [s for s, n in PER_SPLIT.items() for _ in range(n)]
        for j, split in enumerate(splits):
            pixels = colour + 30 * stripes + rng.normal(0, NOISE, (IMAGE_SIZE, IMAGE_SIZE, 3))
            path = f"images/{k}_{j}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / path)
            rows.append({"path": path, "label": name, "annotation_id": str(1000 + 20 * k + j), "split": split})
    with open(root / "annotations.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    # the images predict and serve see: the test and ood rows, with their annotation ids (for --format kaggle)
    with open(root / "predict.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "annotation_id"])
        writer.writerows([(r["path"], r["annotation_id"]) for r in rows if r["split"] in ("test", "ood")])
    return root


def config(data: Path, out: Path):
    """A demo-like training config, shrunk: fixed seeds, one thread, no loader workers."""
    from taxonomist.config import load_config

    return load_config(None, [
        f"data.root={data}", f"out={out}", f"data.image_size={IMAGE_SIZE}", "data.num_workers=0",
        "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8", "train.epochs=5",
        "train.lr=1e-2", "train.device=cpu", "train.threads=1", "train.tensorboard=false", "augment.randaugment=",
        "train.seed=0", "decide.model_ood=odin,mc-dropout"])


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """One CPU thread for torch, everywhere (OMP_NUM_THREADS wins over the automatic thread choice)."""
    import torch

    before_env, before_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before_threads)
        if before_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before_env


def perturbed_copy(checkpoint: Path, folder: Path) -> Path:
    """An ensemble partner: the checkpoint with its head perturbed by seeded noise (metadata and OOD statistics
    copied; the weights saved without the identity header, as older checkpoints are)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True)
    state = load_file(str(checkpoint))
    generator = torch.Generator().manual_seed(1)
    for key in sorted(state):
        if key.startswith("head") and state[key].is_floating_point():
            state[key] = state[key] + 0.3 * torch.randn(state[key].shape, generator=generator)
    save_file(state, str(folder / "best.safetensors"))
    for name in ("best.json", "best.ood.safetensors"):
        shutil.copyfile(checkpoint.parent / name, folder / name)
    return folder / "best.safetensors"


@contextlib.contextmanager
def tiny_world(work: Path) -> Iterator[dict]:
    """Make the dataset, fit the run (train → calibrate → evaluate, as `taxonomist train` does) and the ensemble
    partner under `work`; yields their paths."""
    from taxonomist.pipeline import fit

    with deterministic():
        data = make_dataset(work / "data")
        run = work / "run"
        result = fit(config(data, run), report=False, log=lambda *_: None)
        result.raise_for_failure()
        second = perturbed_copy(run / "checkpoints" / "best.safetensors", work / "second")
        yield {"work": work, "data": data, "run": run, "images": data / "predict.csv", "second": second}


# ---------------------------------------------------------------------------------------------- scenarios
RULES = ("argmax", "min-risk", "backoff", "selective", "rollup", "common-ancestor")
FEATURE_OOD = ("msp", "max-logit", "energy", "mahalanobis", "knn", "relative-mahalanobis", "vim", "react-energy")
MODEL_OOD = ("odin", "mc-dropout")


def _rule_options(rule: str) -> dict:
    # every node may be answered, so that an unknown's answer can fall back to a coarse ancestor
    return {"decision": rule} if rule == "argmax" else {"decision": rule, "candidates": "all"}


def predict_scenarios(engine: str) -> dict[str, dict]:
    """name → the options of one `predict` call (`engine` torch: every OOD method; onnx: those without the model)."""
    oods = (None, *FEATURE_OOD) + (MODEL_OOD if engine == "torch" else ())
    out = {f"{rule}__{ood or 'none'}": {**_rule_options(rule), **({"ood": ood} if ood else {})}
           for rule in RULES for ood in oods}
    out.update({
        "min-risk__labels": {"decision": "min-risk"},
        "backoff__thresholds": {"decision": "backoff", "thresholds": "species=0.5,genus=0.6,family=0.65"},
        "backoff__one-threshold": {"decision": "backoff", "candidates": "all", "thresholds": "0.7"},
        "selective__0.8": {"decision": "selective", "candidates": "all", "selective_threshold": 0.8},
        "selective__thresholds-number": {"decision": "selective", "thresholds": "0.6"},
        "rollup__custom": {"decision": "rollup", "candidates": "all", "thresholds": "0.5", "top_k": 3},
        "common-ancestor__custom": {"decision": "common-ancestor", "thresholds": "0.6", "top_k": 4},
        "min-risk__energy__fallback-family": {"decision": "min-risk", "candidates": "all", "ood": "energy",
                                              "ood_fallback": "family"},
        "min-risk__energy__fallback-p": {"decision": "min-risk", "candidates": "all", "ood": "energy",
                                         "ood_fallback": "0.9"},
        "backoff__energy__fallback-depth2": {"decision": "backoff", "candidates": "all", "ood": "energy",
                                             "ood_fallback": "depth2"},
        "min-risk__energy__threshold": {"decision": "min-risk", "candidates": "all", "ood": "energy",
                                        "ood_threshold": -1.5},
        "min-risk__knn__tpr": {"decision": "min-risk", "candidates": "all", "ood": "knn", "ood_tpr": 0.8},
        "argmax__auto": {"decision": "argmax", "ood": "auto"},
        "min-risk__tta": {"decision": "min-risk", "candidates": "all", "tta": "rot2"},
        "argmax__tta-logits": {"decision": "argmax", "tta": "rot2+flip", "tta_mode": "mean_logits",
                               "ood": "energy"},
        "min-risk__kaggle": {"decision": "min-risk", "fmt": "kaggle"},
        "ensemble__arithmetic": {"decision": "min-risk", "candidates": "all", "ensemble": True},
        "ensemble__geometric": {"decision": "argmax", "ensemble": True, "ensemble_mode": "geometric",
                                "weights": [0.7, 0.3]},
        "ensemble__energy": {"decision": "backoff", "candidates": "all", "ensemble": True, "ood": "energy"},
        "ensemble__disagreement": {"decision": "selective", "candidates": "all", "ensemble": True,
                                   "ood": "ensemble", "ood_threshold": 0.01},
    })
    if engine == "onnx":
        out = {k: v for k, v in out.items() if v.get("ood") not in MODEL_OOD}
    return out


#: What an exported `.onnx` file is predicted with (its answers equal those of `engine="onnx"`).
ONNX_FILE_SCENARIOS = ("argmax__none", "min-risk__energy", "backoff__mahalanobis", "selective__knn",
                       "common-ancestor__vim", "rollup__react-energy", "min-risk__kaggle", "min-risk__tta")


def serve_scenarios() -> dict[str, dict]:
    """name → `ServeOptions` keywords: every rule × every OOD method the service takes, and a few settings."""
    out = {f"{rule}__{ood or 'none'}": {**_rule_options(rule), **({"ood": ood} if ood else {})}
           for rule in RULES for ood in (None, *FEATURE_OOD, *MODEL_OOD)}
    out.update({
        "backoff__thresholds": {"decision": "backoff", "thresholds": "species=0.5,genus=0.6,family=0.65"},
        "selective__0.8": {"decision": "selective", "candidates": "all", "selective_threshold": 0.8},
        "rollup__custom": {"decision": "rollup", "candidates": "all", "thresholds": "0.5", "top_k": 3},
        "min-risk__energy__fallback-family": {"decision": "min-risk", "candidates": "all", "ood": "energy",
                                              "ood_fallback": "family"},
        "min-risk__energy__threshold": {"decision": "min-risk", "candidates": "all", "ood": "energy",
                                        "ood_threshold": -1.5},
        "min-risk__knn__tpr": {"decision": "min-risk", "candidates": "all", "ood": "knn", "ood_tpr": 0.8},
    })
    return out


def evaluate_scenarios() -> dict[str, dict]:
    """name → `evaluate_run` keywords."""
    out = {rule: _rule_options(rule) for rule in RULES}
    out.update({
        "backoff__thresholds": {"decision": "backoff", "thresholds": {"species": 0.5, "genus": 0.6}},
        "rollup__custom": {"decision": "rollup", "candidates": "all", "thresholds": 0.5, "top_k": 3},
        "min-risk__labels": {"decision": "min-risk"},
        "argmax__model-ood-ensemble": {"model_ood": ["odin", "mc-dropout"], "ensemble": True},
        "min-risk__tta": {"decision": "min-risk", "candidates": "all", "tta": "rot2"},
    })
    return out


# ---------------------------------------------------------------------------------------------- the calls
# The only code that names the APIs: when a refactor changes a signature (not an answer), adapt these.
#: `predict` keywords that are not decision options
RUN_KEYWORDS = ("fmt", "ensemble_mode", "weights")


def call_predict(world: dict, out: Path, engine: str, options: dict, model: Path | None = None) -> None:
    from taxonomist.decide import DecisionOptions
    from taxonomist.inference.predict import predict

    options = dict(options)
    models = [model or world["run"]] + ([world["second"]] if options.pop("ensemble", False) else [])
    run = {k: options.pop(k) for k in RUN_KEYWORDS if k in options}
    predict(models, world["images"], out, DecisionOptions(**options), device="cpu", num_workers=0, progress=False,
            engine=engine, **run)


def load_predictor(world: dict, options: dict, model: Path | None = None):
    from taxonomist.decide import DecisionOptions
    from taxonomist.deploy.serve.predictor import Predictor, ServeOptions

    return Predictor.load(model or world["run"], ServeOptions(DecisionOptions(**options), device="cpu", engine="torch"))


def call_evaluate(world: dict, out: Path, options: dict) -> None:
    from taxonomist.evaluate.run import evaluate_run

    options = dict(options)
    ensemble = [world["second"]] if options.pop("ensemble", False) else []
    # the options given one by one over the run's decide config, as `taxonomist evaluate --decision …` gives them
    evaluate_run(world["run"], data=world["data"], split="test", out=out, device="cpu", num_workers=0,
                 progress=False, ensemble=ensemble, **options)


# ---------------------------------------------------------------------------------------------- outputs
def normalise(text: str, world: dict) -> str:
    """Machine-independent text: the temporary folder's path replaced by `<work>`."""
    work = str(Path(world["work"]).resolve())
    return text.replace(work, "<work>").replace(str(world["work"]), "<work>")


def _csv_without(path: Path, drop: tuple[str, ...]) -> str:
    import pandas as pd

    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    return frame.drop(columns=[c for c in drop if c in frame.columns]).to_csv(index=False, lineterminator="\n")


def run_outputs(world: dict) -> Iterator[tuple[str, Callable[[], str]]]:
    """The demo-like run: its checkpoint metadata, per-epoch metrics (without timings), metrics.json and
    predictions.csv."""
    run = world["run"]
    def checkpoint() -> str:
        meta = json.loads((run / "checkpoints" / "best.json").read_text(encoding="utf-8"))
        for key in ("img_s", "seconds"):  # timings of the epoch that chose it
            (meta.get("metrics") or {}).pop(key, None)
        return normalise(json.dumps(meta, indent=1) + "\n", world)
    yield "run/best.json", checkpoint
    yield "run/metrics.csv", lambda: _csv_without(run / "metrics.csv", ("img_s", "seconds"))
    yield "run/metrics.json", lambda: normalise((run / "metrics.json").read_text(encoding="utf-8"), world)
    yield "run/predictions.csv", lambda: (run / "predictions.csv").read_text(encoding="utf-8")


def predict_outputs(world: dict, engine: str) -> Iterator[tuple[str, Callable[[], str]]]:
    """`predict` over the test and ood images, one CSV per scenario; `onnx-file` runs an exported `.onnx` file."""
    folder = world["work"] / f"predict-{engine}"
    folder.mkdir(exist_ok=True)
    model = None
    if engine == "onnx-file":
        from taxonomist.deploy.export import export_model

        model = world["work"] / "export" / "model.onnx"
        if not model.is_file():
            model.parent.mkdir(exist_ok=True)
            export_model(world["run"], model, fmt="onnx")
    scenarios = predict_scenarios("onnx" if engine != "torch" else "torch")
    if engine == "onnx-file":  # the same graph as the engine's cached export: a few scenarios say so
        scenarios = {k: scenarios[k] for k in ONNX_FILE_SCENARIOS}
    for name, options in scenarios.items():
        def produce(name=name, options=options) -> str:
            out = folder / f"{name}.csv"
            call_predict(world, out, "onnx" if engine != "torch" else "torch", options, model)
            return out.read_text(encoding="utf-8")
        yield f"predict/{engine}/{name}.csv", produce


def serve_outputs(world: dict) -> Iterator[tuple[str, Callable[[], str]]]:
    """The service's answers (`Predictor.predict_images`, one batch of the test and ood images) per scenario,
    and one `POST /predict` through the HTTP app."""
    from taxonomist.deploy.serve.uploads import decode_upload

    # every other test and ood image: one batch of 9
    images = [line.split(",")[0] for line in world["images"].read_text(encoding="utf-8").splitlines()[1::2]]
    blobs = [(p, (world["data"] / p).read_bytes()) for p in images]
    for name, options in serve_scenarios().items():
        def produce(options=options) -> str:
            predictor = load_predictor(world, options)
            inputs = [predictor.preprocess(decode_upload(data, p)) for p, data in blobs]
            return "".join(json.dumps(a) + "\n" for a in predictor.predict_images(inputs))
        yield f"serve/{name}.jsonl", produce

    def http() -> str:
        from fastapi.testclient import TestClient

        from taxonomist.deploy.serve.app import create_app

        predictor = load_predictor(world, {"decision": "min-risk", "candidates": "all", "ood": "energy"})
        with TestClient(create_app(predictor, max_batch=64)) as client:
            response = client.post("/predict", files=[("file", (p, data, "image/png")) for p, data in blobs])
        body = response.json()
        return "".join(json.dumps(x) + "\n" for x in [response.status_code, *body.get("predictions", [body])])
    yield "serve/http__min-risk__energy.jsonl", http


def evaluate_outputs(world: dict) -> Iterator[tuple[str, Callable[[], str]]]:
    """`evaluate_run` on the test split (and the ood rows) per scenario: metrics.json and predictions.csv."""
    for name, options in evaluate_scenarios().items():
        out = world["work"] / "evaluate" / name
        done: dict = {}

        def run(out=out, options=options, done=done) -> None:
            if not done:
                call_evaluate(world, out, options)
                done["yes"] = True

        def metrics(out=out, run=run) -> str:
            run()
            return normalise((out / "metrics.json").read_text(encoding="utf-8"), world)

        def predictions(out=out, run=run) -> str:
            run()
            return (out / "predictions.csv").read_text(encoding="utf-8")
        yield f"evaluate/{name}/metrics.json", metrics
        yield f"evaluate/{name}/predictions.csv", predictions


#: The groups of outputs; the onnx ones export the model (tens of seconds), so their tests are marked slow.
GROUPS: dict[str, Callable[[dict], Iterator[tuple[str, Callable[[], str]]]]] = {
    "run": run_outputs,
    "predict-torch": lambda w: predict_outputs(w, "torch"),
    "serve": serve_outputs,
    "evaluate": evaluate_outputs,
    "predict-onnx": lambda w: predict_outputs(w, "onnx"),
    "predict-onnx-file": lambda w: predict_outputs(w, "onnx-file"),
}


def produce(world: dict, group: str) -> dict[str, str]:
    """Every output of `group`, by its path under golden/."""
    with deterministic():
        return {name: make() for name, make in GROUPS[group](world)}


def read_golden(names) -> dict[str, str | None]:
    return {name: (GOLDEN / name).read_text(encoding="utf-8") if (GOLDEN / name).is_file() else None
            for name in names}


def golden_names(group: str) -> list[str]:
    """The golden files of a group, as stored (to find files a scenario no longer produces)."""
    prefix = {"run": "run/", "predict-torch": "predict/torch/", "serve": "serve/", "evaluate": "evaluate/",
              "predict-onnx": "predict/onnx/", "predict-onnx-file": "predict/onnx-file/"}[group]
    root = GOLDEN / prefix
    return sorted(p.relative_to(GOLDEN).as_posix() for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def first_difference(expected: str, found: str) -> str:
    """One line saying where two texts first differ."""
    a, b = expected.splitlines(), found.splitlines()
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"line {k + 1}: expected {x[:160]!r}, found {y[:160]!r}"
    return f"{len(a)} lines expected, {len(b)} found"


__all__ = ["GOLDEN", "GROUPS", "tiny_world", "produce", "read_golden", "golden_names", "first_difference"]
