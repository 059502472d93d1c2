"""Time `min_risk_decision` on a synthetic seven-rank tree (as benchmarks/min_risk.py does, smaller by
default): `images` × `labels` probabilities answered over `candidates` taxonomy nodes."""
from __future__ import annotations

import time

import numpy as np

from taxonomist.decide import min_risk_decision
from taxonomist.taxonomy import RANKS, Taxonomy, lca_distance

BRANCHING = (5, 4, 4, 5, 4, 5)  # children per node, kingdom → … → species: 8,000 species


def time_min_risk(images: int = 100_000, labels: int = 1_000, candidates: int = 10_000, seed: int = 0) -> dict:
    parents: dict[str, str | None] = {"K0": None}
    ranks = {"K0": RANKS[0]}
    level = ["K0"]
    for depth, fan in enumerate(BRANCHING, start=1):
        nxt = [f"{p}.{k}" for p in level for k in range(fan)]
        for name in nxt:
            parents[name] = name.rsplit(".", 1)[0]
            ranks[name] = RANKS[depth]
        level = nxt
    rng = np.random.default_rng(seed)
    species = level
    chosen = [species[i] for i in np.sort(rng.choice(len(species), min(labels, len(species)), replace=False))]
    tax = Taxonomy.from_parents(parents, labels=chosen, ranks=ranks)
    pool = set(chosen)
    cands = (tax.internal_nodes + chosen + [s for s in species if s not in pool])[:candidates]
    distance = lca_distance(tax, tax.labels, cands).astype(np.float32)
    logits = rng.standard_normal((images, len(chosen)), dtype=np.float32) * 3
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits, out=logits)
    probs /= probs.sum(axis=1, keepdims=True)
    start = time.perf_counter()
    min_risk_decision(probs, distance)
    seconds = time.perf_counter() - start
    return {"candidates": len(cands), "labels": len(chosen), "images": images, "seconds": round(seconds, 3)}
