"""Recipe configs (configs/*.yaml) and recipe pages (docs/recipes/*.md) must not rot.

Each config is loaded and validated as written (its timm backbone must exist with its pretrained tag, its
keys must name real choices), then trained for one optimizer step on tiny synthetic data with the backbone
swapped for a timm test model of the same family. The `taxonomist` commands in the recipe pages must parse
with the real CLI, and their `--config`/`--set` pairs must load; the SLURM script must build a valid
`torchrun … train` command and resume when the run holds a resume state.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from taxonomist.config import load_config
from taxonomist.data.split import split_dataset
from taxonomist.data.synth import synthesize
from taxonomist.train.checkpoint import read_metadata

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
RECIPE_PAGES = sorted((REPO / "docs" / "recipes").glob("*.md"))

#: the recipes issue 10 asks for; every YAML in configs/ is tested, these must be among them
EXPECTED = {"fathomnet2025.yaml", "fathomnet2025_1gpu_hour.yaml", "fungitastic.yaml", "fungitastic_flat.yaml",
            "marine_ood.yaml", "marine_ood_scratch.yaml", "marine_ood_linear.yaml", "marine_ood_last_n.yaml",
            "plankton_cpu.yaml"}


def tiny_backbone(name: str) -> str:
    """A timm test model of the same family as `name` (so that e.g. fixed-size ViT inputs and ConvNeXt stages
    are exercised), or `name` itself when it is already small."""
    arch = name.split(".")[0].lower()
    if name == "scratch_cnn" or arch.startswith("test_"):
        return name
    for families, test_model in ((("vit", "beit", "eva", "deit", "dinov2"), "test_vit"),
                                 (("convnext",), "test_convnext"),
                                 (("resnet", "resnext"), "test_resnet")):
        if any(f in arch for f in families):
            return test_model
    return "test_efficientnet"


@pytest.fixture(scope="module")
def tiny_datasets(tmp_path_factory) -> dict[str, Path]:
    """Two splits of one tiny synthetic dataset (6 labels, ROI + context): 5 grouped folds (`fold`) and
    train/val/test with one held-out taxon (`ood`)."""
    base = tmp_path_factory.mktemp("recipes")
    synthesize(base / "synth", n_taxa=6, per_class=10, image_size=32, seed=4)
    split_dataset(base / "synth", folds=5, test=0.0, seed=0, out=base / "folds")
    split_dataset(base / "synth", val=0.2, test=0.2, ood_taxa=1, seed=0, out=base / "ood")
    return {"folds": base / "folds", "ood": base / "ood"}


def dry_run_overrides(cfg, datasets: dict[str, Path], tmp_path: Path) -> list[str]:
    data = datasets["folds"] if cfg.data.fold >= 0 else datasets["ood"]
    overrides = [
        f"data.root={data}", "data.taxonomy=", "data.image_size=32", "data.num_workers=0",
        f"model.backbone={tiny_backbone(cfg.model.backbone)}", "model.pretrained=none",
        "train.epochs=1", "train.max_steps=1", "train.batch_size=8", "train.device=cpu", "train.threads=1",
        "train.tensorboard=false", "train.wandb=", f"out={tmp_path / 'run'}"]
    if cfg.data.cache:
        overrides.append(f"data.cache={tmp_path / 'cache'}")
    if cfg.decide.metric == "fathomnet2025":
        overrides.append("decide.metric=auto")  # the synthetic taxonomy is not FathomNet's
    return overrides


def test_the_issue_recipes_exist():
    assert EXPECTED <= {p.name for p in CONFIGS}
    assert {"README.md", "fathomnet2025.md", "fungitastic.md", "marine-ood.md", "cluster.md"} <= \
        {p.name for p in RECIPE_PAGES}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid_as_written(path):
    import timm

    from taxonomist.decide import DECISIONS, candidate_nodes
    from taxonomist.losses.taxon_loss import LOSS_NAMES
    from taxonomist.models.finetune import check_finetune
    from taxonomist.models.taxon_model import HEADS
    from taxonomist.taxonomy import builtin_taxonomy
    from taxonomist.taxonomy.core import RANKS
    from taxonomist.train.loop import MONITORS

    cfg = load_config(path)  # unknown keys and wrong types raise ConfigError
    assert load_config(None, base=cfg.to_dict()) == cfg  # what a run directory saves loads back the same
    name = cfg.model.backbone
    if name != "scratch_cnn":
        assert timm.is_model(name), name
        assert timm.models.get_pretrained_cfg(name) is not None, f"{name}: no such pretrained tag"
        assert cfg.model.pretrained == "auto"
    assert cfg.model.head in HEADS and cfg.loss.name in LOSS_NAMES
    check_finetune(cfg.model.finetune, cfg.model.lora.r)
    assert cfg.train.monitor in MONITORS and cfg.train.scheduler in ("cosine", "plateau", "constant")
    assert cfg.decide.decision in DECISIONS
    assert set(cfg.loss.rank_weights) <= set(RANKS)
    assert cfg.data.root and cfg.out and cfg.data.taxonomy in ("", "fathomnet2025")
    if cfg.decide.candidates == "fathomnet2025":
        assert len(candidate_nodes(builtin_taxonomy("fathomnet2025"), "fathomnet2025")) == 79
    if cfg.model.head == "multirank":
        # the auxiliary rank terms must not outweigh the label head (the FungiTastic failure): the recipe
        # keeps their sum below the species term's weight of 1
        weights = {r: cfg.loss.rank_weights.get(r, 1.0) for r in RANKS if r != "kingdom"}
        assert sum(weights.values()) < 1.0, weights


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_one_step(path, tiny_datasets, tmp_path):
    from taxonomist.train import train

    torch.set_num_threads(1)
    written = load_config(path)
    cfg = load_config(path, dry_run_overrides(written, tiny_datasets, tmp_path))
    result = train(cfg, progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    assert len(result.history) == 1 and result.history[0]["epoch"] == 1
    meta = read_metadata(run / "checkpoints" / "last.safetensors")
    assert meta["head"] == written.model.head
    assert meta["model"]["finetune"] == written.model.finetune
    assert meta["image_size"] == 32 and meta["data"]["input"] == "path"
    if written.model.head == "multirank":
        assert set(meta["model"]["levels"]) >= set(written.loss.rank_weights)
    if written.model.finetune == "linear":
        assert meta["model"]["trainable_parameters"] < meta["model"]["parameters"] / 2
    # the loss weights, schedules and decisions of the recipe reach the run directory unchanged
    saved = load_config(run / "config.yaml")
    assert saved.loss == written.loss and saved.decide.decision == written.decide.decision
    assert (saved.train.ema, saved.train.lr, saved.train.layer_decay) == \
        (written.train.ema, written.train.lr, written.train.layer_decay)
    if written.data.cache:
        assert any((tmp_path / "cache").iterdir())
    assert (run / "checkpoints" / "last.state.pt").is_file()  # what the SLURM script looks for to resume


def test_marine_ood_recipe_reports_ood_auroc_per_method(tiny_datasets, tmp_path):
    """The marine recipe's evaluation scores the held-out taxa (`ood` rows) with every fitted OOD method."""
    from taxonomist.evaluate.run import evaluate_run
    from taxonomist.inference.calibrate import calibrate_run
    from taxonomist.train import train

    torch.set_num_threads(1)
    path = REPO / "configs" / "marine_ood.yaml"
    cfg = load_config(path, dry_run_overrides(load_config(path), tiny_datasets, tmp_path))
    train(cfg, progress=False, log=lambda *_: None)
    calibrate_run(tmp_path / "run", device="cpu", batch_size=16, num_workers=0, progress=False)
    ev = evaluate_run(tmp_path / "run", device="cpu", batch_size=16, num_workers=0, progress=False)
    ood = ev.metrics["ood"]
    assert {"msp", "energy", "mahalanobis", "knn"} <= set(ood)
    for method in ("msp", "energy", "mahalanobis", "knn"):
        assert 0.0 <= ood[method]["auroc"] <= 1.0 and 0.0 <= ood[method]["fpr95"] <= 1.0


def _commands(page: Path) -> list[str]:
    """The `taxonomist …` commands in a page's ```bash blocks, continuation lines joined."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip().removeprefix("do ").strip()
            if "-m taxonomist.cli.main " in line:  # under torchrun: the same CLI
                line = "taxonomist " + line.split("-m taxonomist.cli.main ", 1)[1]
            if line.startswith("taxonomist "):
                commands.append(line)
    return commands


def test_recipe_commands_parse():
    from taxonomist.cli.main import build_parser

    parser = build_parser()
    seen = 0
    for page in RECIPE_PAGES:
        for command in _commands(page):
            # shell variables of the loops stand for a fold number or a run directory
            argv = shlex.split(re.sub(r"\$\{?(\w+)\}?", "0", command))[1:]
            argv = [a for a in argv if a not in (";", "&&", "done")]
            try:
                args = parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"{page.name}: does not parse: {command}")
            if argv[0] == "train" and args.config:
                load_config(REPO / args.config, args.overrides)  # every --set key exists and reads
            seen += 1
    assert seen >= 15


def _run_sbatch(tmp_path: Path, env_extra: dict[str, str]) -> list[str]:
    """Run configs/slurm/train.sbatch with srun, nvidia-smi and torchrun replaced by shims; return the
    arguments it gave torchrun."""
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shims = {"srun": 'exec "$@"', "nvidia-smi": 'printf "GPU 0: A\\nGPU 1: B\\n"',
             "torchrun": 'printf "%s\\n" "$@" > "$TORCHRUN_ARGS"'}
    for name, body in shims.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    args_file = tmp_path / "torchrun_args.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TORCHRUN_ARGS": str(args_file), **env_extra}
    subprocess.run(["bash", str(REPO / "configs" / "slurm" / "train.sbatch")], cwd=tmp_path, env=env, check=True,
                   timeout=60)
    return args_file.read_text().splitlines()


def test_slurm_script_trains_one_fold_per_task_and_resumes(tmp_path):
    from taxonomist.cli.main import build_parser

    args = _run_sbatch(tmp_path, {"SLURM_ARRAY_TASK_ID": "3"})
    assert args[:3] == ["--standalone", "--nproc_per_node", "2"]
    assert args[3:5] == ["-m", "taxonomist.cli.main"]
    parsed = build_parser().parse_args(args[5:])
    assert parsed.config == "configs/fathomnet2025.yaml" and not parsed.resume
    assert parsed.overrides == ["data.fold=3", "out=runs/fathomnet2025/fold_3"]
    load_config(REPO / parsed.config, parsed.overrides)

    # preempted after an epoch: the requeued task finds the resume state and continues
    state = tmp_path / "runs" / "fathomnet2025" / "fold_3" / "checkpoints" / "last.state.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"")
    assert build_parser().parse_args(_run_sbatch(tmp_path, {"SLURM_ARRAY_TASK_ID": "3"})[5:]).resume

    # a run without folds
    args = _run_sbatch(tmp_path, {"KFOLD": "0", "CONFIG": "configs/fungitastic.yaml", "OUT": "runs/fungi"})
    parsed = build_parser().parse_args(args[5:])
    assert parsed.overrides == ["out=runs/fungi"] and parsed.config == "configs/fungitastic.yaml"
