"""The architecture holds: the import contracts of pyproject.toml (`lint-imports`: stages import downstream only,
decisions and metrics without torch, no cycles) and no private name imported from another module."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def test_import_contracts_hold():
    pytest.importorskip("importlinter", reason="import-linter is in the dev extra: pip install -e '.[dev]'")
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "lint-imports is not on PATH"
    proc = subprocess.run([lint, "--no-cache", "--no-logo"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "5 kept" in proc.stdout, proc.stdout[-3000:]


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_imports(root: Path = SRC) -> set[tuple[str, str, str]]:
    """(importer, module, name) for every `from taxonomist.X import _name` in a module other than X."""
    found = set()
    for path in sorted(root.rglob("*.py")):
        importer = _module_name(path, root)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("taxonomist"):
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and node.module != importer:
                        found.add((importer, node.module, alias.name))
    return found


def test_no_private_name_is_imported_from_another_module():
    found = sorted(private_imports())
    assert not found, ("a private name imported from another module: make it public (renamed, documented) or move "
                       "it to where it is used:\n" + "\n".join(f"  {a} imports {m}.{n}" for a, m, n in found))


def test_the_private_import_check_finds_one(tmp_path):
    pkg = tmp_path / "taxonomist" / "stage"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("from taxonomist.stage.b import _helper, public\nfrom taxonomist.stage.a import _own\n")
    assert private_imports(tmp_path) == {("taxonomist.stage.a", "taxonomist.stage.b", "_helper")}
