"""Time `min_risk_decision` on CPU: 100,000 images × 10,000 candidates over 1,000 labels by default.

Builds a synthetic seven-rank tree (1 kingdom → 5 phyla → 20 classes → 80 orders → 400 families →
1,600 genera → 8,000 species), takes 1,000 of its species as the labels, and answers with 10,000
candidate nodes (every internal node, the labels, other species). Prints one JSON line: seconds,
images/s, the peak memory the call allocated, and the machine. docs/decisions.md quotes its output.

    .venv/bin/python benchmarks/min_risk.py                       # the figure in docs/decisions.md
    .venv/bin/python benchmarks/min_risk.py --no-prune            # every candidate in the matmul
    .venv/bin/python benchmarks/min_risk.py --labels 79           # FathomNet-sized label set
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import tracemalloc

import numpy as np

from taxonomist.decide import min_risk_decision, undominated_candidates
from taxonomist.taxonomy import RANKS, Taxonomy, lca_distance
from taxonomist.utils.system import cpu_name

BRANCHING = (5, 4, 4, 5, 4, 5)  # children per node, kingdom → … → species


def synthetic_tree(n_labels: int, n_candidates: int, seed: int) -> tuple[Taxonomy, list[str]]:
    parents: dict[str, str | None] = {"K0": None}
    ranks = {"K0": RANKS[0]}
    level = ["K0"]
    for depth, fan in enumerate(BRANCHING, start=1):
        nxt = []
        for p in level:
            for k in range(fan):
                name = f"{p}.{k}"
                parents[name] = p
                ranks[name] = RANKS[depth]
                nxt.append(name)
        level = nxt
    rng = np.random.default_rng(seed)
    species = level
    labels = [species[i] for i in np.sort(rng.choice(len(species), n_labels, replace=False))]
    tax = Taxonomy.from_parents(parents, labels=labels, ranks=ranks)
    internal = tax.internal_nodes
    others = [s for s in species if s not in set(labels)]
    candidates = (internal + labels + others)[:n_candidates]
    return tax, candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--labels", type=int, default=1_000)
    parser.add_argument("--candidates", type=int, default=10_000)
    parser.add_argument("--chunk-size", type=int, default=None, help="images per chunk (default: automatic)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-prune", action="store_true",
                        help="keep the candidates that can never win: the cost of a dense (L, C) matrix")
    args = parser.parse_args()

    tax, candidates = synthetic_tree(args.labels, args.candidates, args.seed)
    distance = lca_distance(tax, tax.labels, candidates).astype(np.float32)
    rng = np.random.default_rng(args.seed)
    logits = rng.standard_normal((args.images, args.labels), dtype=np.float32) * 3
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits, out=logits)
    probs /= probs.sum(axis=1, keepdims=True)

    min_risk_decision(probs[:1000], distance, chunk_size=args.chunk_size)  # warm up BLAS threads
    kept = len(candidates) if args.no_prune else len(undominated_candidates(distance))
    times = []
    for _ in range(args.repeat):
        tracemalloc.start()
        start = time.perf_counter()
        choices, risk = min_risk_decision(probs, distance, chunk_size=args.chunk_size, prune=not args.no_prune)
        times.append(time.perf_counter() - start)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    best = min(times)
    print(json.dumps({
        "images": args.images, "labels": args.labels, "candidates": len(candidates),
        "candidates_in_matmul": kept,
        "seconds": round(best, 2), "seconds_all_runs": [round(t, 2) for t in times],
        "images_per_second": round(args.images / best), "peak_call_memory_mb": round(peak / 2 ** 20),
        "input_probs_mb": round(probs.nbytes / 2 ** 20),
        "share_internal_answers": round(float(np.mean([candidates[c].count(".") < 6 for c in choices])), 3),
        "mean_expected_distance": round(float(risk.mean()), 3),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__},
    }))


if __name__ == "__main__":
    main()
