"""`taxonomist train`: train a model from a YAML config and `--set` overrides into a run directory."""
from __future__ import annotations

EXAMPLE = """\
examples:
  taxonomist train --set data.root=data/synth --set out=runs/first
  taxonomist train --config configs/fathomnet.yaml --set train.epochs=30 --set loss.distance_weight=0.5
  taxonomist train --config configs/fathomnet.yaml --set out=runs/cv --kfold        # one model per fold
  taxonomist train --set out=runs/first --resume                                    # continue after a crash
  torchrun --nproc_per_node 4 -m taxonomist.cli.main train --config c.yaml          # several GPUs
  taxonomist train --config c.yaml --set decide.model_ood=odin,mc-dropout   # thresholds for predict --ood odin

Keys (defaults shown by `taxonomist train --print-config`): data.root, data.image_size, model.backbone
(a timm name or module:PKG.PATH:FACTORY), model.pretrained (auto|none|PATH), model.head
(flat|multirank|two_stream), model.finetune (full|linear|last_n|lora), loss.name (ce|focal|soft_labels),
loss.distance_weight, train.epochs, train.batch_size, train.lr, train.device, train.seed, out, …
augment.preset (auto|light|default|heavy) sets the augmentation strength (crop scale, rotation, colour jitter,
RandAugment, MixUp, CutMix); `auto` = light when train.epochs × training images < 100,000, else default; a
strength key you set (e.g. augment.scale=0.5,1.0, augment.randaugment= for off) wins over the preset.
The run directory gets config.yaml, taxonomy.csv, checkpoints/, metrics.csv, then (after training)
metrics.json, predictions.csv and report.html from an evaluation of the best checkpoint.

Output: first one plan line (data: images per split and labels; model; device, torch threads and loader workers;
epochs; image size; run directory), then a progress bar per epoch on a terminal, or without one (a log file, a
pipe) a progress line every train.log_seconds (30) within each epoch; then one line per epoch.

If a step after training (calibrate, evaluate, report) fails, the model stays saved: the command prints one
line naming the step and the command that redoes it, writes the traceback to RUN/errors.log and the state to
RUN/run.json, and exits with status 3 (a failed training exits with 2). `--resume` on a run whose training
finished runs only the steps after it.

`out` must be new, empty or a taxonomist run (RUN/run.json or RUN/checkpoints); another non-empty folder is
refused unless --force, an empty out, a filesystem root and the dataset folder always. A `module:` backbone in
your config is imported (your choice); checkpoints that name code are loaded by evaluate/predict/serve/export
only with --trust-code.
"""


def register(sub, formatter):
    p = sub.add_parser("train", help="train a model → a run directory",
                       description="Train a hierarchical classifier.", epilog=EXAMPLE, formatter_class=formatter)
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (sections data, model, loss, train, …)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in `out` from its last epoch")
    p.add_argument("--force", action="store_true",
                   help="train into an `out` that exists, is not empty and is not a taxonomist run (refused "
                        "otherwise, so that a dataset or another folder is not written over)")
    p.add_argument("--kfold", action="store_true",
                   help="train one model per value of the dataset's fold column (out/fold_K) and write "
                        "out-of-fold predictions")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image, naming it (default: skip it and list it)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation of the best checkpoint after training")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip fitting the temperature (val rows) and the OOD scores (train rows; "
                        "decide.model_ood: val rows) of the best and last checkpoints after training")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(func=run)


def _log(line: str) -> None:
    """Training's log lines: progress to stdout, `warning: …` lines to stderr like every other warning."""
    import sys

    # flushed: in a log file or a pipe each line shows when it is said, not when a buffer fills
    print(line, file=sys.stderr if str(line).startswith("warning:") else sys.stdout, flush=True)


def run(args) -> int:
    import sys

    from taxonomist.config import load_config

    cfg = load_config(args.config, args.overrides + (["data.strict=true"] if args.strict else []))
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if not args.no_calibrate:  # a typo must fail now, not after the training
        from taxonomist.inference.calibrate import check_temperature_objective
        check_temperature_objective(cfg.decide.temperature)
        if cfg.decide.model_ood:
            from taxonomist.inference.ood_model import check_model_ood
            check_model_ood(cfg.decide.model_ood, None)
    import taxonomist  # the command is `taxonomist.fit`, the Python API's own function
    result = taxonomist.fit(cfg, resume=args.resume, force=args.force, kfold=args.kfold,
                            calibrate=not args.no_calibrate, evaluate=not args.no_eval, progress=sys.stderr.isatty(),
                            log=_log)
    result.raise_for_failure()  # exit status 3: the model is saved, a step after training failed
    return 0
