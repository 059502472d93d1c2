"""Context priors on data with site structure: what a site list buys, and what an incomplete one costs.

Two settings, each split into simulated sites with different class mixes:

- **plankton**: the real probabilities of a model trained on PlanktonSet (121 classes, an unranked tree, LCA
  distance), on its test split; 8 sites, each holding ~30 % of the classes with Dirichlet(0.5) abundances.
- **synthetic habitats**: the 79 FathomNet 2025 taxa (fathomnet2025 distance) and a simulated classifier whose
  confusions follow the tree (logits −β·D(y, ·) + noise, temperature fitted on a held-out draw); 8 habitats, each
  holding ~40 % of the orders and ~70 % of their taxa, with Dirichlet(0.5) abundances.

Each site's examples follow its mix exactly: plankton draws a label from the site's abundances, then one of the
test images of that label (with replacement: 500 draws per site); the synthetic setting simulates 500 per habitat. A site's list is its present labels (complete), the same list with 20 % or 50 % of them left out
(incomplete), or survey counts (200 draws of the site's mix: an unseen label is unlisted, not blocked).

Methods:
- no prior: argmax, min-risk over every node of the tree, and rollup (top 5, 0.65);
- SpeciesNet-style: labels not on the allow list are blocked; the rollup rule (top 5, 0.65) runs on the model's
  probabilities and an answer at or above a blocked node is moved up to its nearest ancestor with an allowed
  label under it (SpeciesNet's geofence rolls a blocked species up the same way);
- prior shift (`decide.priors`, λ = 1, floor 0.1, π_train = the training frequencies) followed by argmax, and
  by min-risk over every node.

    .venv/bin/python benchmarks/context_priors.py --out runs/plankton/priors \\
        --plankton-run runs/plankton/runs/cpu-recipe --plankton-data runs/plankton/data
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SITES = 8
SEED = 0


# ---------------------------------------------------------------------------------------------- data
def plankton_probs(run: Path, data: Path, out: Path, batch_size: int = 128) -> dict:
    """Calibrated test probabilities of the plankton model (cached in OUT/plankton-test.npz)."""
    cache = out / "plankton-test.npz"
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        return {k: z[k] for k in z.files}
    import pandas as pd

    from taxonomist.inference.images import read_images
    from taxonomist.inference.members import Member, run_member
    from taxonomist.inference.model_file import load_model, resolve_model
    from taxonomist.runtime import configure_threads, select_device

    ckpt = resolve_model(run)
    dev = select_device("cpu")
    configure_threads(0, dev, -1)
    model, card, taxonomy = load_model(ckpt, device="cpu")
    images = read_images(data, "test")
    start = time.time()
    (output, positions), skipped = run_member(Member(ckpt, model, card, taxonomy), images, dev, None, "mean_probs",
                                              batch_size, -1, progress=True)
    rows = images.rows.iloc[positions]
    index = card.label_index
    targets = np.array([index[label] for label in rows["label"]])
    ann = pd.read_csv(data / "annotations.csv", keep_default_na=False)
    train = ann[ann["split"] == "train"]["label"].value_counts()
    counts = np.array([train.get(label, 0) for label in taxonomy.labels], dtype=np.float64)
    result = {"probs": output.probs.astype(np.float64), "targets": targets, "train_counts": counts,
              "seconds": np.array(time.time() - start)}
    out.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **result)
    return result


def synthetic_world(taxonomy, n_per_habitat: int = 500, seed: int = SEED):
    """A simulated classifier on the FathomNet 2025 taxa: (probs, targets, habitats' present sets)."""
    from taxonomist.decide import apply_temperature, fit_temperature
    from taxonomist.taxonomy import distance_matrix

    rng = np.random.default_rng(seed)
    labels = list(taxonomy.labels)
    D = distance_matrix(taxonomy, "fathomnet2025", labels, labels)
    orders = np.array([taxonomy.ancestor_at(name, "order") or taxonomy.ancestor_at(name, "class") or name
                       for name in labels])

    def classify(targets):
        logits = -1.6 * D[targets] + rng.normal(0, 3.0, (len(targets), len(labels)))
        return logits

    calib = rng.integers(0, len(labels), 4000)
    temperature = fit_temperature(classify(calib), calib)
    present = []
    for _ in range(SITES):
        groups = {g for g in set(orders) if rng.random() < 0.4}
        mask = np.array([o in groups and rng.random() < 0.7 for o in orders])
        if mask.sum() < 5:
            mask[rng.choice(len(labels), 5, replace=False)] = True
        present.append(mask)
    mixes = site_mixes(present, rng)
    targets = np.concatenate([rng.choice(len(labels), n_per_habitat, p=m) for m in mixes])
    sites = np.repeat(np.arange(SITES), n_per_habitat)
    probs = apply_temperature(classify(targets), temperature)
    return probs, targets, sites, present, mixes, float(temperature)


def site_mixes(present: list[np.ndarray], rng) -> list[np.ndarray]:
    mixes = []
    for mask in present:
        mix = np.zeros(len(mask))
        mix[mask] = rng.dirichlet(np.full(int(mask.sum()), 0.5))
        mixes.append(mix)
    return mixes


def sample_sites(targets: np.ndarray, n_labels: int, rng, share: float = 0.3, per_site: int = 500):
    """Sites for real test examples: present sets and abundances; each site's examples are drawn label first
    (from its abundances), then a test image of that label (with replacement), so that a site's mix is exactly
    its list's. Returns (example indices, their sites, present sets, abundances)."""
    present = [rng.random(n_labels) < share for _ in range(SITES)]
    for mask in present:  # every site holds a few labels
        if mask.sum() < 2:
            mask[rng.choice(n_labels, 2, replace=False)] = True
    for label in range(n_labels):  # every label lives somewhere
        if not any(m[label] for m in present):
            present[rng.integers(SITES)][label] = True
    mixes = site_mixes(present, rng)
    by_label = [np.flatnonzero(targets == y) for y in range(n_labels)]
    index, sites = [], []
    for s, mix in enumerate(mixes):
        for y in rng.choice(n_labels, per_site, p=mix):
            if len(by_label[y]):
                index.append(rng.choice(by_label[y]))
                sites.append(s)
    return np.array(index), np.array(sites), present, mixes


# ---------------------------------------------------------------------------------------------- lists
def priors_tables(taxonomy, present, mixes, rng) -> dict[str, list]:
    """Per condition, the (context, taxon, weight) rows of every site."""
    labels = list(taxonomy.labels)
    tables = {"complete list": [], "list missing 20%": [], "list missing 50%": [], "survey counts": []}
    for s, (mask, mix) in enumerate(zip(present, mixes)):
        key = f"site={s}"
        listed = np.flatnonzero(mask)
        tables["complete list"] += [(key, labels[j], 1.0) for j in listed]
        for name, drop in (("list missing 20%", 0.2), ("list missing 50%", 0.5)):
            keep = listed[rng.random(len(listed)) >= drop]
            tables[name] += [(key, labels[j], 1.0) for j in keep]
        counts = rng.multinomial(200, mix)
        tables["survey counts"] += [(key, labels[j], float(c)) for j, c in enumerate(counts) if c > 0]
    return tables


def allowed_masks(taxonomy, rows, n_sites: int) -> np.ndarray:
    """(S, L) the labels each site's list names (SpeciesNet's allow list)."""
    index = {name: k for k, name in enumerate(taxonomy.labels)}
    out = np.zeros((n_sites, len(index)), dtype=bool)
    for key, taxon, weight in rows:
        if weight > 0:
            out[int(key.split("=")[1]), index[taxon]] = True
    return out


# ---------------------------------------------------------------------------------------------- methods
def speciesnet_style(probs, taxonomy, sites, allowed) -> np.ndarray:
    """Rollup on the model's probabilities; an answer whose labels are all blocked at its site moves up to the
    nearest ancestor that has an allowed label under it."""
    from taxonomist.decide import rollup_decision

    nodes, _ = rollup_decision(probs, taxonomy)
    anc = taxonomy.ancestor_table()
    label_anc = anc[taxonomy.label_indices]                       # (L, D+1)
    depths = taxonomy.depths
    out = nodes.copy()
    for i, node in enumerate(nodes):
        ok = allowed[sites[i]]
        n = int(node)
        while True:
            under = label_anc[:, depths[n]] == n
            if ok[under].any() or depths[n] == 0:
                break
            n = int(anc[n, depths[n] - 1])
        out[i] = n
    return out


def evaluate(nodes, targets, taxonomy, D_all) -> dict:
    label_nodes = taxonomy.label_indices
    dist = D_all[targets, nodes]
    return {"mean_distance": float(dist.mean()), "top1": float((nodes == label_nodes[targets]).mean()),
            "label_answers": float(np.isin(nodes, label_nodes).mean())}


def run_setting(name, probs, targets, sites, present, mixes, taxonomy, metric, train_prior, rng) -> list[dict]:
    from taxonomist.decide import ContextPriors, decide
    from taxonomist.taxonomy import distance_matrix

    D_all = distance_matrix(taxonomy, metric, list(taxonomy.labels), list(taxonomy.names))
    contexts = np.array([f"site={s}" for s in sites])
    rows = []

    def add(method, condition, nodes, floor=None):
        r = {"setting": name, "condition": condition, "method": method, **evaluate(nodes, targets, taxonomy, D_all)}
        if floor is not None:
            r["floor"] = floor
        rows.append(r)

    every = list(taxonomy.names)
    argmax = decide(probs, taxonomy, "argmax", metric=metric).nodes
    min_risk = decide(probs, taxonomy, "min-risk", candidates=every, metric=metric).nodes
    add("no prior, argmax", "—", argmax)
    add("no prior, min-risk", "—", min_risk)
    add("no prior, rollup", "—", decide(probs, taxonomy, "rollup", metric=metric).nodes)
    for condition, table in priors_tables(taxonomy, present, mixes, rng).items():
        priors = ContextPriors.from_rows(table, source=condition)
        add("SpeciesNet-style block + rollup", condition,
            speciesnet_style(probs, taxonomy, sites, allowed_masks(taxonomy, table, SITES)))
        for floor in (0.0, 0.01, 0.1, 0.3):
            shift = priors.resolve(taxonomy, train_prior, 1.0, floor)
            shifted, _ = shift.apply(probs, contexts)
            if floor == 0.1:
                add("prior shift + argmax", condition, decide(shifted, taxonomy, "argmax", metric=metric).nodes,
                    floor)
            add("prior shift + min-risk", condition,
                decide(shifted, taxonomy, "min-risk", candidates=every, metric=metric).nodes, floor)
        if train_prior is not None and condition in ("complete list", "survey counts"):
            shifted, _ = priors.resolve(taxonomy, None, 1.0, 0.1).apply(probs, contexts)
            add("prior shift + min-risk, π_train uniform", condition,
                decide(shifted, taxonomy, "min-risk", candidates=every, metric=metric).nodes, 0.1)
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        lines += [f"### {setting}", "", "| list | method | floor | mean distance | top-1 | label-level answers |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in rows:
            if r["setting"] == setting:
                floor = "" if "floor" not in r else f"{r['floor']:g}"
                lines.append(f"| {r['condition']} | {r['method']} | {floor} | {r['mean_distance']:.3f} | "
                             f"{r['top1']:.3f} | {r['label_answers']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the cached probabilities and results.json/.md")
    parser.add_argument("--plankton-run", help="a run (or checkpoint) trained on PlanktonSet")
    parser.add_argument("--plankton-data", help="its split dataset (annotations.csv with a test split)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from taxonomist.taxonomy import builtin_taxonomy

    rows = []
    fn = builtin_taxonomy("fathomnet2025")
    probs, targets, sites, present, mixes, temperature = synthetic_world(fn)
    rows += run_setting(f"synthetic habitats (FathomNet 2025 taxa, {len(targets)} examples, 8 habitats)", probs,
                        targets, sites, present, mixes, fn, "fathomnet2025", None, np.random.default_rng(SEED + 1))
    if args.plankton_run:
        from taxonomist.inference.model_file import read_card

        data = plankton_probs(Path(args.plankton_run), Path(args.plankton_data), out)
        taxonomy = read_card(args.plankton_run).taxonomy
        rng = np.random.default_rng(SEED)
        index, sites, present, mixes = sample_sites(data["targets"], len(taxonomy.labels), rng)
        rows += run_setting(f"plankton (PlanktonSet test split: {len(index)} draws of its {len(data['targets'])} "
                            f"images, 8 sites)", data["probs"][index], data["targets"][index], sites, present,
                            mixes, taxonomy, "lca", data["train_counts"], np.random.default_rng(SEED + 1))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(to_markdown(rows))
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
