"""Write the regression net's golden files (tests/regression/golden/) from the code as it is now.

    .venv/bin/python tests/regression/make_golden.py            # every group
    .venv/bin/python tests/regression/make_golden.py serve run  # some groups (see scenarios.GROUPS)

The golden files record what predict, serve and evaluate answer with a tiny model trained in the same way every
time (scenarios.tiny_world: fixed seeds, one CPU thread, no loader workers); test_regression.py checks that the
code still produces them byte for byte.

When to regenerate — only when an answer is *meant* to change:
- a deliberate change of behaviour (a new column, a fixed decision bug, another default), made in its own
  commit whose message says which golden files changed and why (`git diff --stat tests/regression/golden`);
- a change of the scenarios themselves (a new rule or option to cover);
- a new torch, timm or onnxruntime version that moves the tiny model's floats (then every file changes at once,
  and the commit says so).
Never to make a refactor pass: a refactor changes no answer, and a golden file that differs is the bug report.
Regenerate on the machine the tests run on (floats depend on the CPU's instruction set), and run it twice:
the second run must leave `git status tests/regression/golden` clean.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import scenarios  # noqa: E402


def main(groups: list[str]) -> int:
    import os

    unknown = [g for g in groups if g not in scenarios.GROUPS]
    if unknown:
        print(f"error: unknown group {unknown[0]!r}; choose from {', '.join(scenarios.GROUPS)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="taxonomist-golden-") as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")  # the ONNX engine's exports stay in here
        start = time.time()
        with scenarios.tiny_world(Path(tmp)) as world:
            print(f"tiny world (train, calibrate, evaluate) in {time.time() - start:.1f} s")
            for group in groups or list(scenarios.GROUPS):
                t0 = time.time()
                outputs = scenarios.produce(world, group)
                for stale in set(scenarios.golden_names(group)) - set(outputs):
                    (scenarios.GOLDEN / stale).unlink()
                for name, text in outputs.items():
                    path = scenarios.GOLDEN / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(text, encoding="utf-8")
                print(f"{group}: {len(outputs)} files in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
