"""Measure the decision rules, temperature scaling and the five OOD scores on a trained synthetic run.

Synthesizes a dataset with labels at mixed ranks, holds out whole taxa as `ood`, fine-tunes the demo model,
calibrates it (`taxonomist.inference.calibrate_run`) and reports on the test split: MHD of argmax, min-risk,
back-off and selective (candidates = the labels, and = every node), ECE before/after the temperature, and
AUROC / FPR95 of msp, max-logit, energy, mahalanobis and knn on the held-out taxa. docs/decisions.md quotes it.

    nice -n 10 .venv/bin/python benchmarks/decisions.py --out /tmp/decisions     # the figures in the docs
    .venv/bin/python benchmarks/decisions.py --out /tmp/decisions --reuse        # re-evaluate that run only
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from taxonomist.utils.system import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="working folder (dataset, run, results.json, results.md)")
    parser.add_argument("--taxa", type=int, default=24, help="labels synthesized (before the OOD hold-out)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--ood-taxa", type=int, default=3, help="labels held out as unknown taxa")
    parser.add_argument("--image-size", type=int, default=96, help="synthesized and training image side")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the calibrated run already in --out (skip data, training, calibration)")
    args = parser.parse_args()

    import torch

    from taxonomist.config import load_config
    from taxonomist.data.dataset import load_dataset
    from taxonomist.data.split import split_dataset
    from taxonomist.data.synth import synthesize
    from taxonomist.decide import (apply_temperature, candidate_nodes, decide, expected_calibration_error,
                                   hierarchical_coverage, ood_fallback, ood_metrics, softmax)
    from taxonomist.demo import DEMO_SETTINGS
    from taxonomist.inference import calibrate_run, load_ood_scorers, ood_threshold
    from taxonomist.inference.run_model import infer_rows
    from taxonomist.taxonomy import distance_matrix
    from taxonomist.runtime import select_device
    from taxonomist.train import train
    from taxonomist.train.checkpoint import load_checkpoint

    start = time.time()
    out = Path(args.out)
    data_dir, run_dir = out / "data", out / "run"
    timings = {}
    previous = json.loads((out / "results.json").read_text()) if args.reuse else None
    if previous is None:
        t0 = time.time()
        synth = synthesize(data_dir, n_taxa=args.taxa, per_class=args.per_class, image_size=args.image_size,
                           seed=args.seed)
        split = split_dataset(data_dir, val=0.15, test=0.15, ood_taxa=args.ood_taxa, seed=args.seed)
        timings["data_s"] = time.time() - t0
        print(synth)
        print(split)
        overrides = [f"data.root={data_dir}", f"out={run_dir}", f"data.image_size={args.image_size}",
                     f"data.num_workers={args.workers}", f"train.epochs={args.epochs}",
                     f"train.batch_size={args.batch_size}", f"train.device={args.device}", f"train.seed={args.seed}",
                     "train.tensorboard=false"]
        cfg = load_config(None, overrides, base=DEMO_SETTINGS)
        if run_dir.exists():
            import shutil
            shutil.rmtree(run_dir)
        t0 = time.time()
        result = train(cfg, progress=False)
        timings["train_s"] = time.time() - t0
        t0 = time.time()
        calibrations = calibrate_run(run_dir, device=args.device, num_workers=args.workers)
        timings["calibrate_s"] = time.time() - t0
        for c in calibrations:
            print(c.summary())
        setup = {"labels_per_rank": synth.labels_per_rank, "ood_taxa": split.ood_taxa, "ood_labels": split.ood_labels,
                 "training": {"best_epoch": result.best_epoch, "monitor": result.monitor, "best": result.best_metric}}
    else:  # keep the first run's setup and timings; only the evaluation below is redone
        timings = {k: v for k, v in previous["timings"].items() if k in ("data_s", "train_s", "calibrate_s")}
        setup = {"labels_per_rank": previous["dataset"]["labels_per_rank"],
                 "ood_taxa": previous["dataset"]["ood_taxa"], "ood_labels": previous["dataset"]["ood_labels"],
                 "training": previous["training"]}

    # ---- one forward pass over the test and ood rows
    t0 = t_eval = time.time()
    dev = select_device(args.device)
    ckpt = run_dir / "checkpoints" / "best.safetensors"
    model, meta, taxonomy = load_checkpoint(ckpt, device=str(dev))
    labels = list(meta["labels"])
    label_index = {lab: i for i, lab in enumerate(labels)}
    dataset = load_dataset(data_dir, taxonomy)
    frame = dataset.annotations
    test_rows, ood_rows = frame[frame["split"] == "test"], frame[frame["split"] == "ood"]
    common = dict(device=dev, label_index=label_index, num_workers=args.workers)
    test = infer_rows(model, meta, dataset, test_rows, **common).result
    unk = infer_rows(model, meta, dataset, ood_rows, allow_unknown=True, **common).result
    timings["test_inference_s"] = time.time() - t0
    trained_labels = sorted(set(frame.loc[frame["split"] == "train", "label"]))

    temperature = float(meta["temperature"])
    metric = meta["metric"]
    raw = softmax(test.logits.astype(np.float64))
    probs = apply_temperature(test.logits.astype(np.float64), temperature)
    y = test.targets
    d_all = distance_matrix(taxonomy, metric, rows=taxonomy.labels, cols=taxonomy.names)
    anc = taxonomy.ancestor_table()
    cand_sets = {"labels": candidate_nodes(taxonomy, ""), "all nodes": candidate_nodes(taxonomy, "all")}

    def score_rule(p, rule, cands, thresholds=None):
        dec = decide(p, taxonomy, rule, candidates=cands, metric=metric, thresholds=thresholds)
        nodes = dec.nodes
        truth = taxonomy.label_indices[y]
        on_lineage = anc[truth, taxonomy.depths[nodes]] == nodes  # the answer is the truth or an ancestor
        return {"mhd": float(d_all[y, nodes].mean()),
                "exact": float((nodes == truth).mean()),
                "hier_error": float((~on_lineage).mean()),
                "coverage": float(hierarchical_coverage(taxonomy, nodes).mean()),
                "label_share": float(np.isin(nodes, taxonomy.label_indices).mean())}

    rules = []
    for cname, cands in cand_sets.items():
        rules.append(("argmax", cname, "calibrated", score_rule(probs, "argmax", cands)))
        rules.append(("min-risk", cname, "T = 1 (uncalibrated)", score_rule(raw, "min-risk", cands)))
        rules.append(("min-risk", cname, "calibrated", score_rule(probs, "min-risk", cands)))
        rules.append(("backoff", cname, "default ladder", score_rule(probs, "backoff", cands)))
        for t in (0.5, 0.7, 0.9):
            rules.append(("selective", cname, f"threshold {t}", score_rule(probs, "selective", cands, t)))

    ece = {"before": expected_calibration_error(raw.max(1), raw.argmax(1) == y),
           "after": expected_calibration_error(probs.max(1), probs.argmax(1) == y)}
    nll = {"before": float(-np.log(np.maximum(raw[np.arange(len(y)), y], 1e-12)).mean()),
           "after": float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).mean())}

    # ---- OOD on the held-out taxa
    scorers = load_ood_scorers(ckpt)
    ood = {}
    for method, scorer in scorers.items():
        s_known = scorer.score(test.features, test.logits)
        s_unknown = scorer.score(unk.features, unk.logits)
        m = ood_metrics(s_known, s_unknown)
        t95 = ood_threshold(ckpt, method, 0.95)
        m["known_kept_at_tpr95"] = float((s_known < t95).mean())
        m["unknown_flagged_at_tpr95"] = float((s_unknown >= t95).mean())
        ood[method] = m

    # ---- what falling back does to the unknowns' distance (min-risk over every node, flagged → order)
    best_method = max(ood, key=lambda k: ood[k]["auroc"])
    ood_labels = ood_rows["label"].to_numpy()[unk.indices]
    p_unk = apply_temperature(unk.logits.astype(np.float64), temperature)
    scorer = scorers[best_method]
    flagged = scorer.score(unk.features, unk.logits) >= ood_threshold(ckpt, best_method, 0.95)
    d_unk = distance_matrix(taxonomy, metric, rows=list(dict.fromkeys(ood_labels)), cols=taxonomy.names)
    row_of = {lab: i for i, lab in enumerate(dict.fromkeys(ood_labels))}
    truth = np.array([row_of[lab] for lab in ood_labels])
    fallback = {}
    for rule in ("argmax", "min-risk"):
        cands = cand_sets["labels"] if rule == "argmax" else cand_sets["all nodes"]
        nodes = decide(p_unk, taxonomy, rule, candidates=cands, metric=metric).nodes
        fallback[f"{rule} ({'labels' if rule == 'argmax' else 'all nodes'})"] = float(d_unk[truth, nodes].mean())
        if rule == "min-risk":
            fb = ood_fallback(nodes, flagged, taxonomy, "order", candidates=cands)
            fallback[f"min-risk + {best_method} flag (TPR 0.95) → order"] = float(d_unk[truth, fb].mean())

    timings["total_s"] = (previous["timings"]["total_s"] if previous else time.time() - start)
    timings["evaluation_s"] = time.time() - t_eval
    results = {
        "command": "nice -n 10 .venv/bin/python benchmarks/decisions.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "reuse"),
        "dataset": {"labels": len(labels), "trained_labels": len(trained_labels), "ood_taxa": setup["ood_taxa"],
                    "ood_labels": setup["ood_labels"], "test": len(y), "ood": len(unk.targets),
                    "labels_per_rank": setup["labels_per_rank"], "metric": metric},
        "training": setup["training"],
        "temperature": temperature, "ece": ece, "nll": nll, "val_calibration": meta["calibration"],
        "rules": [{"rule": r, "candidates": c, "setting": s, **m} for r, c, s, m in rules],
        "ood": ood, "ood_fallback": {"method": best_method, "n_flagged": int(flagged.sum()), "n": len(flagged),
                                     "mhd_on_unknowns": fallback},
        "timings": timings,
        # the training run's machine line: threads are those its loop chose (the evaluation may use others)
        "machine": previous["machine"] if previous else {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                                                         "torch": torch.__version__, "device": str(dev)},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = to_markdown(results)
    (out / "results.md").write_text(md)
    print(md)


def to_markdown(r: dict) -> str:
    lines = [f"Test split: {r['dataset']['test']} images of {r['dataset']['trained_labels']} trained labels; "
             f"{r['dataset']['ood']} images of {len(r['dataset']['ood_labels'])} held-out labels "
             f"({', '.join(r['dataset']['ood_taxa'])}); metric {r['dataset']['metric']}.", "",
             "| rule | candidates | setting | MHD | exact | hierarchical error | coverage | label share |",
             "|---|---|---|---|---|---|---|---|"]
    for x in r["rules"]:
        lines.append(f"| {x['rule']} | {x['candidates']} | {x['setting']} | {x['mhd']:.3f} | {x['exact']:.3f} | "
                     f"{x['hier_error']:.3f} | {x['coverage']:.3f} | {x['label_share']:.3f} |")
    v = r["val_calibration"]
    lines += ["", f"Temperature {r['temperature']:.3f}: test ECE {r['ece']['before']:.4f} → {r['ece']['after']:.4f}, "
                  f"NLL {r['nll']['before']:.4f} → {r['nll']['after']:.4f} (validation, where T was fitted: ECE "
                  f"{v['ece_before']:.4f} → {v['ece_after']:.4f}, n={v['n_val']}).", "",
              "| OOD score | AUROC | FPR95 | known kept at --ood-tpr 0.95 | unknown flagged at --ood-tpr 0.95 |",
              "|---|---|---|---|---|"]
    for method, m in r["ood"].items():
        lines.append(f"| {method} | {m['auroc']:.3f} | {m['fpr95']:.3f} | {m['known_kept_at_tpr95']:.3f} | "
                     f"{m['unknown_flagged_at_tpr95']:.3f} |")
    fb = r["ood_fallback"]
    lines += ["", f"MHD on the {fb['n']} held-out images ({fb['n_flagged']} flagged by {fb['method']}):", "",
              "| answer | MHD on unknowns |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in fb["mhd_on_unknowns"].items()]
    t = r["timings"]
    lines += ["", f"Wall time {t['total_s'] / 60:.1f} min (data {t['data_s']:.0f} s, training {t['train_s']:.0f} s, "
                  f"calibration {t['calibrate_s']:.0f} s, evaluation {t['evaluation_s']:.0f} s) on "
                  f"{r['machine']['cpu']}, {r['machine']['threads']} threads, torch {r['machine']['torch']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
