"""Measure the text-bomb refusals and the taxonomy sizes that docs/reliability.md and docs/taxonomy.md quote.

Each case runs in a fresh process (the CLI for the refusals, `python -c` for the taxonomy loads) so that its wall
time and peak RSS are its own:

- refusals: a "billion laughs" config (543 bytes, 10^9 strings expanded), a 100,000-deep JSON file given to
  `data prepare`, 10,000- and 25,000-name taxonomy chains given to `taxonomy distances`;
- loads: a real-shaped 7-rank taxonomy of 100,111 nodes (74,000 species) and the deepest shape MAX_DEPTH allows
  (a 127-name trunk with 100,000 leaves): read, levels + arrays + hash, a 2,000 × 2,000 distance matrix.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text_bombs.py --out /tmp/text-bombs
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from taxonomist.taxonomy import RANKS

BIN = Path(sys.executable).parent
LAUGHS = ("lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
          + "".join(f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 9))
          + "model:\n  lora:\n    target_modules: *l8\n")

LOAD = """
import json, resource, sys, time
from taxonomist.taxonomy import distance_matrix, read_taxonomy
t = time.perf_counter(); tax = read_taxonomy(sys.argv[1]); read = time.perf_counter() - t
t = time.perf_counter(); tax.levels(); tax.ancestor_table(); tax.rank_codes(); tax.hash; arrays = time.perf_counter() - t
labels = list(tax.labels)[:: max(1, len(tax.labels) // 2000)][:2000]
t = time.perf_counter(); distance_matrix(tax, "lca", labels, labels); lca = time.perf_counter() - t
fn = None
if tax.has_ranks:
    t = time.perf_counter(); distance_matrix(tax, "fathomnet2025", labels, labels); fn = time.perf_counter() - t
print(json.dumps({"nodes": len(tax), "labels": len(tax.labels), "max_depth": tax.max_depth, "read_s": read,
                  "levels_arrays_hash_s": arrays, "lca_2000_s": lca, "fathomnet_2000_s": fn,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def timed(argv: list[str]) -> dict:
    """Wall time, peak RSS (GNU time) and the last stderr line of one command."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], capture_output=True, text=True, timeout=600)
    lines = proc.stderr.strip().splitlines()
    return {"exit": proc.returncode, "seconds": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(int(lines[-1]) / 1024, 1),
            "message": next((line for line in lines if line.startswith("error:")), "")}


def write_rows(path: Path, header: list[str], rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cli = str(BIN / "taxonomist")
    results = {}

    (out / "laughs.yaml").write_text(LAUGHS)
    results["billion_laughs_config"] = timed([cli, "train", "--config", str(out / "laughs.yaml")])
    (out / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    results["deep_coco_json"] = timed([cli, "data", "prepare", str(out / "deep.json"), str(out), str(out / "x")])
    for n in (10_000, 25_000):
        chain = write_rows(out / f"chain{n}.csv", ["concept_name", "parent"],
                           ((f"n{i}", f"n{i - 1}" if i else "") for i in range(n)))
        results[f"chain_{n}"] = timed([cli, "taxonomy", "distances", str(chain), "--metric", "lca",
                                       "--out", str(out / "m.csv")])

    counts = [1, 10, 100, 1000, 5000, 20000, 74000]
    wide = write_rows(out / "wide.csv", ["concept_name", *RANKS],
                      ([f"spe{s}", *(f"{r[:3]}{s * c // counts[-1]}" for r, c in zip(RANKS, counts))]
                       for s in range(counts[-1])))
    comb = write_rows(out / "comb.csv", ["concept_name", "parent"],
                      [(f"t{i}", f"t{i - 1}" if i else "") for i in range(127)]
                      + [(f"leaf{j}", "t126") for j in range(100_000)])
    for name, path in (("wide_100k_7_ranks", wide), ("deepest_allowed_100k", comb)):
        proc = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, timeout=600)
        results[name] = ({k: round(v, 2) if isinstance(v, float) else v for k, v in json.loads(proc.stdout).items()}
                         if proc.returncode == 0 else {"error": proc.stderr[-500:]})

    text = json.dumps(results, indent=1)
    (out / "text_bombs.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
