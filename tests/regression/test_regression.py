"""The regression net: what predict, serve and evaluate answer with a tiny model trained the same way every time
must equal the golden files byte for byte (tests/regression/golden/, written by make_golden.py, which says when
regenerating them is legitimate).

Everything runs on CPU with one thread, fixed seeds and no loader workers, which makes each computation
deterministic on one machine: no tolerance is applied. The ONNX groups run onnxruntime (one intra-op thread,
also deterministic); their numbers differ from PyTorch's in the 6th decimal, so they have golden files of their
own. They export the model first (tens of seconds), hence `slow`.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("regression_scenarios", Path(__file__).parent / "scenarios.py")
scenarios = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = scenarios
_spec.loader.exec_module(scenarios)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with scenarios.tiny_world(tmp_path_factory.mktemp("regression")) as made:
        yield made


def _onnx_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


GROUPS = [pytest.param(g, marks=[pytest.mark.slow, pytest.mark.skipif(not _onnx_available(), reason="no onnx extra")])
          if g.startswith("predict-onnx") else g for g in scenarios.GROUPS]


@pytest.mark.parametrize("group", GROUPS)
def test_outputs_equal_golden_files(world, group):
    found = scenarios.produce(world, group)
    expected = scenarios.read_golden(sorted(set(found) | set(scenarios.golden_names(group))))
    problems = []
    for name, text in expected.items():
        if text is None:
            problems.append(f"{name}: no golden file (a new scenario? see make_golden.py)")
        elif name not in found:
            problems.append(f"{name}: golden file that no scenario produces")
        elif found[name] != text:
            problems.append(f"{name}: {scenarios.first_difference(text, found[name])}")
    assert not problems, f"{len(problems)} of {len(expected)} {group} outputs differ:\n" + "\n".join(problems[:20])
