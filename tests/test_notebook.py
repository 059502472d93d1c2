"""docs/notebooks/quickstart.ipynb runs top to bottom on the venv's python and gives the numbers `taxonomist train`
gives for its config, and the commands of docs/index.md ("coming from …") parse with the real CLI, so neither rots."""
from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "notebooks" / "quickstart.ipynb"
INDEX = REPO / "docs" / "index.md"


def test_index_commands_parse_and_config_keys_exist():
    from taxonomist.cli.main import build_parser
    from taxonomist.config import load_config

    parser = build_parser()
    text = INDEX.read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = [ln.split(" #", 1)[0].strip() for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c.startswith("taxonomist ")]
    # and the one-line commands quoted in the prose
    commands += re.findall(r"`(taxonomist (?:baseline|report) [^`]+)`", text)
    assert len(commands) >= 15
    for command in commands:
        try:
            args = parser.parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"docs/index.md: does not parse: {command}")
        if args.command == "train":
            load_config(REPO / args.config if args.config else None, args.overrides)
    # every key of the timm table exists in the config
    keys = set(re.findall(r"`((?:model|train|loss|augment)\.[a-z_0-9]+)`", text)) - {"train.py"}
    assert len(keys) >= 25
    from taxonomist.config import Config
    for key in keys:
        section, name = key.split(".")
        assert hasattr(getattr(Config(), section), name), key


def _numbers(value, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a metrics.json, by dotted key."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _numbers(item, f"{prefix}{key}.").items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix.rstrip("."): float(value)}
    return {}


@pytest.mark.slow
def test_quickstart_notebook_executes_and_equals_the_cli(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    # a kernelspec whose argv is this interpreter: the stock `python3` spec runs whatever `python` is on PATH
    spec_dir = tmp_path / "kernels" / "taxonomist-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "taxonomist test", "language": "python"}))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TMPDIR", str(tmp_path))   # the notebook's tempfile.mkdtemp() work folder
    km = KernelManager(kernel_name="taxonomist-test",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "!taxonomist" not in sources and "subprocess" not in sources and "cli" not in sources   # the API only
    assert "taxonomist.fit(cfg)" in sources   # what `taxonomist train` runs, not a hand-made subset of its steps

    client = nbclient.NotebookClient(nb, km=km, timeout=240, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()   # raises CellExecutionError naming the failing cell

    def text(cell) -> str:
        return "".join(o.get("text", "") + "".join(str(v) for v in o.get("data", {}).values())
                       for o in cell.get("outputs", []))

    outputs = [text(c) for c in nb.cells if c.cell_type == "code"]
    everything = "\n".join(outputs)
    assert "best val MHD" in everything and "mean hierarchical distance" in everything
    assert "min-risk" in everything
    assert "answer: A" in everything                     # the genus beats either 0.4 species
    # the report's figures are shown inline as images
    assert everything.count("data:image/") >= 3

    # `taxonomist train` on the config the notebook fitted (its run's config.yaml) gives the same numbers
    run = Path(re.search(r"run directory: (\S+)", everything).group(1))
    assert (run / "report.html").is_file() and (run / "checkpoints" / "best.ood.safetensors").is_file()
    cli_run = tmp_path / "cli-run"
    proc = subprocess.run([sys.executable, "-m", "taxonomist.cli.main", "train", "--config", str(run / "config.yaml"),
                           "--set", f"out={cli_run}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = (_numbers(json.loads((r / "metrics.json").read_text())) for r in (run, cli_run))
    assert {"mhd", "top1", "log_loss", "ece", "n"} <= set(ours) and set(ours) == set(theirs)
    assert all(math.isclose(ours[k], theirs[k], rel_tol=1e-6, abs_tol=1e-9) for k in ours), \
        {k: (ours[k], theirs[k]) for k in ours if not math.isclose(ours[k], theirs[k], rel_tol=1e-6, abs_tol=1e-9)}
    meta = [json.loads((r / "checkpoints" / "best.json").read_text()) for r in (run, cli_run)]
    assert meta[0]["epoch"] == meta[1]["epoch"]
    assert math.isclose(meta[0]["temperature"], meta[1]["temperature"], rel_tol=1e-6)
