"""Compare every OOD score on held-out taxa: the five stored with a checkpoint, ODIN, MC-dropout and the
disagreement of an ensemble, through `taxonomist.evaluate.run.evaluate_run` (metrics.json `ood.*`).

Needs a dataset split with `--ood-taxa` (`ood` rows) and `val` rows, and two or more calibrated runs trained
on it with different seeds (the first is scored; the others are its ensemble partners):

    taxonomist train --config /tmp/decisions/run/config.yaml --set out=/tmp/h15b/run0 --set train.seed=0 --set data.num_workers=1
    taxonomist train --config /tmp/decisions/run/config.yaml --set out=/tmp/h15b/run1 --set train.seed=1 --set data.num_workers=1
    .venv/bin/python benchmarks/ood_methods.py --data /tmp/decisions/data --runs /tmp/h15b/run0 /tmp/h15b/run1 \
        --out /tmp/h15b/ood

Every threshold keeps 95 % of the known validation rows (`--ood-tpr 0.95`, what `predict` uses by default).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from taxonomist.utils.system import cpu_name

ORDER = ("msp", "max-logit", "energy", "mahalanobis", "knn", "odin", "mc-dropout", "ensemble")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset with train/val/test/ood rows")
    parser.add_argument("--runs", nargs="+", required=True, help="calibrated runs; the first is scored")
    parser.add_argument("--out", required=True, help="evaluation folder (metrics.json, results.md)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()

    import torch

    from taxonomist.evaluate.run import evaluate_run

    torch.set_num_threads(1)
    start = time.time()
    ev = evaluate_run(args.runs[0], data=args.data, out=args.out, device=args.device, num_workers=args.workers,
                      progress=False, model_ood=["odin", "mc-dropout"], ensemble=args.runs[1:])
    seconds = time.time() - start
    ood = ev.metrics["ood"]
    lines = [f"Scored: {args.runs[0]} (ensemble partners: {', '.join(args.runs[1:]) or 'none'}), split "
             f"{ev.split}; {cpu_name()}, torch {torch.__version__}, {seconds:.0f} s.", "",
             "| OOD score | AUROC | FPR95 | threshold | precision | recall | F1 | known flagged | unknown missed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in [m for m in ORDER if m in ood] + sorted(set(ood) - set(ORDER)):
        v = ood[method]
        kf, um = round(v["known_flagged"] * v["n_known"]), round(v["unknown_missed"] * v["n_unknown"])
        lines.append(f"| {method} | {v['auroc']:.3f} | {v['fpr95']:.3f} | {v['threshold']:.4g} | {v['precision']:.3f} "
                     f"| {v['recall']:.3f} | {v['f1']:.3f} | {kf} of {v['n_known']} | {um} of {v['n_unknown']} |")
    text = "\n".join(lines) + "\n"
    Path(args.out, "results.md").write_text(text)
    Path(args.out, "results.json").write_text(json.dumps({"ood": ood, "seconds": seconds, "runs": args.runs,
                                                          "top1": ev.metrics["top1"], "mhd": ev.metrics["mhd"]},
                                                         indent=1))
    print(text)


if __name__ == "__main__":
    main()
