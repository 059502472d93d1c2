"""Every documented command runs as written (issue 23).

Each shell block (```bash) of README.md and docs/**/*.md is run by this test, or carries the reason it is not,
in an HTML comment on the line before it, which pytest-codeblocks reads (its syntax; GitHub shows nothing):

    <!--pytest.mark.skip(reason="needs the network: FathomNet's image servers")-->   never run here
    <!--pytest.mark.docs_slow-->                                                     runs with `-m docs_slow`

A page is one session: its runnable blocks run in order, with `bash -e`, in one temporary folder that looks
like a clone's root (`configs/`, `benchmarks/` and `.venv` linked from the repository; `taxonomist` on PATH),
so a block sees the files the blocks above it made and nothing else. Offline: the Hugging Face hub is off
and caches live in the folder. `test_page_runs_as_written` runs the blocks without a mark (the default run,
`./run test`); `test_page_runs_as_written_with_its_slow_blocks` runs every runnable block of the pages that have
slow ones, and only when selected: `./run test -m docs_slow tests/docs`.

Every fence names its language, so that a shell block cannot pass for text: `bash` for commands, `text` for
output, trees and error lines.

Why pytest-codeblocks: pytest-examples extracts Python blocks only; mktestdocs matches a fence line exactly
("```bash", so no marks beside it), gives no line numbers and runs each block in a fresh shell of the current
folder. pytest-codeblocks extracts blocks of any language with their line numbers and the `pytest.mark` comments
before them. Its own runner (`--codeblocks`) runs each block alone in the current folder, so this test uses its
extractor with a runner of its own: one folder per page, blocks in order, a timeout, background processes stopped.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")
#: what the folder a page runs in links from the repository, so that a block runs as from a clone's root
LINKED = ("configs", "benchmarks", ".venv")
#: pages whose blocks are not marked yet because another change is editing them: skipped whole (never run: an
#: unmarked block may install packages or start a server). Mark the page's blocks, then remove its entry.
PENDING: dict[str, str] = {}
SKIP_MARK = re.compile(r"""pytest\.mark\.skip\(reason=(["'])(?P<reason>.+)\1\)$""")
SLOW_MARK = "pytest.mark.docs_slow"
BLOCK_TIMEOUT_S = 1800


@dataclass
class Block:
    page: Path
    line: int            # the line of the opening fence
    language: str
    code: str
    skip: str | None     # the reason it is not run
    slow: bool
    bad_marks: list[str]

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def page_blocks(page: Path) -> list[Block]:
    """The page's fenced blocks with their marks (pytest-codeblocks finds both)."""
    from pytest_codeblocks.main import extract_from_file

    blocks = []
    for found in extract_from_file(page):
        skip, slow, bad = None, False, []
        for mark in found.marks:
            m = SKIP_MARK.match(mark.strip())
            if m and m.group("reason").strip():
                skip = m.group("reason").strip()
            elif mark.strip() == SLOW_MARK:
                slow = True
            else:
                bad.append(mark)
        language = (found.syntax or "").split()[0] if (found.syntax or "").strip() else ""
        blocks.append(Block(page, found.lineno, language, found.code, skip, slow, bad))
    return blocks


def _rel(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def _skip_pending(page: Path) -> None:
    if _rel(page) in PENDING:
        pytest.skip(f"{_rel(page)}: {PENDING[_rel(page)]}")


def _runnable(page: Path, with_slow: bool) -> list[Block]:
    return [b for b in page_blocks(page)
            if b.language in SHELL and b.skip is None and (with_slow or not b.slow)]


FAST_PAGES = [p for p in PAGES if _runnable(p, with_slow=False)]
SLOW_PAGES = [p for p in PAGES if any(b.slow for b in _runnable(p, with_slow=True))]


# ---------------------------------------------------------------------------------------------- the marks
@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_fence_names_its_language(page):
    _skip_pending(page)
    unnamed = [b.where for b in page_blocks(page) if not b.language]
    assert not unnamed, f"fences without a language (```bash for commands, ```text for output): {unnamed}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_shell_block_runs_or_says_why_not(page):
    _skip_pending(page)
    blocks = page_blocks(page)
    bad = [f"{b.where}: {b.bad_marks}" for b in blocks if b.bad_marks]
    assert not bad, ("marks this test does not know (use pytest.mark.skip(reason=\"…\") with a reason, or "
                     f"pytest.mark.docs_slow): {bad}")
    marked_elsewhere = [b.where for b in blocks if (b.skip or b.slow) and b.language not in SHELL]
    assert not marked_elsewhere, f"marks on blocks that are not shell blocks: {marked_elsewhere}"


def test_pending_pages_exist():
    """An entry of PENDING names a page that exists (a renamed page must not keep its skip)."""
    assert all((REPO / page).is_file() for page in PENDING)


def test_the_readme_first_session_runs_in_the_default_run():
    """The acceptance line of issue 23: `./run test` runs the README's first session."""
    session = [b for b in page_blocks(REPO / "README.md") if "taxonomist train" in b.code]
    assert session and all(b.language == "bash" and b.skip is None and not b.slow for b in session)


# ---------------------------------------------------------------------------------------------- running
def docs_env(folder: Path) -> dict:
    """The environment of a reader on this machine, offline: the venv's commands first, caches in `folder`."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTEST_CURRENT_TEST", "COLUMNS"):
        env.pop(name, None)
    venv_bin = str(Path(sys.executable).parent)
    env.update({
        "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
        "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
        "XDG_CACHE_HOME": str(folder / ".cache"),   # ONNX exports, matplotlib, the hub: nothing shared
        "HF_HUB_OFFLINE": "1",                      # as a reader without network: the offline weights
        "MPLBACKEND": "Agg",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    })
    return env


def make_clone_like(folder: Path) -> None:
    for name in LINKED:
        if (REPO / name).exists():
            (folder / name).symlink_to(REPO / name, target_is_directory=True)


PORT = re.compile(r"(?:127\.0\.0\.1|localhost):(\d{2,5})")


@contextlib.contextmanager
def ports_of(blocks: list[Block]):
    """The ports the blocks serve on: held by a file lock (two test runs on one machine take turns) and checked
    free, so that a block's `curl` reaches the service the block started."""
    ports = sorted({int(p) for b in blocks for p in PORT.findall(b.code)})
    locks = []
    try:
        for port in ports:
            lock = open(Path(tempfile.gettempdir()) / f"taxonomist-docs-port-{port}.lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX)
            locks.append(lock)
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    pytest.fail(f"port {port} is in use by another program; the documented commands need it")
        yield ports
    finally:
        for lock in locks:
            lock.close()


def run_block(block: Block, folder: Path, env: dict, timeout: float = BLOCK_TIMEOUT_S) -> tuple[int, str, float]:
    """Run one block with `bash -e` in `folder`; whatever it left running in the background is stopped after."""
    log = folder / f".block-{block.line}.log"
    # the failing line, named by its place on the page (the block's code starts on the line after its fence)
    trap = (f"trap 'echo \"[docs test] {block.where.split(':')[0]}:$(({block.line} + LINENO - 1)) failed: "
            f"$BASH_COMMAND\" >&2' ERR\n")
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-e", "-c", trap + block.code], cwd=folder, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = -1
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what this block started
            proc.wait()
    return rc, log.read_text(errors="replace"), time.monotonic() - start


def run_page(page: Path, blocks: list[Block], tmp_path: Path) -> list[int]:
    """Run `blocks` in order in one clone-like folder; fail at the first block that exits non-zero. Returns
    each block's exit status."""
    statuses: list[int] = []
    folder = tmp_path / "clone"
    folder.mkdir()
    make_clone_like(folder)
    env = docs_env(folder)
    with ports_of(blocks):
        for block in blocks:
            rc, output, seconds = run_block(block, folder, env)
            statuses.append(rc)
            print(f"{block.where}: exit {rc} in {seconds:.0f} s")
            if rc != 0:
                tail = "\n".join(output.splitlines()[-60:])
                what = "timed out" if rc == -1 else f"exit status {rc}"
                line = next((x for x in output.splitlines() if x.startswith("[docs test]")), "")
                pytest.fail(f"{block.where}: {what} after {seconds:.0f} s {line}\n--- the block ---\n{block.code}"
                            f"--- its output (last 60 lines) ---\n{tail}", pytrace=False)
    return statuses


@pytest.mark.parametrize("page", FAST_PAGES, ids=_rel)
def test_page_runs_as_written(page, tmp_path):
    _skip_pending(page)
    blocks = _runnable(page, with_slow=False)
    assert blocks, f"{_rel(page)} is listed as runnable but has no runnable block"
    assert run_page(page, blocks, tmp_path) == [0] * len(blocks)


@pytest.mark.docs_slow
@pytest.mark.timeout(3 * 3600)
@pytest.mark.parametrize("page", SLOW_PAGES, ids=_rel)
def test_page_runs_as_written_with_its_slow_blocks(page, tmp_path, request):
    if "docs_slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow docs blocks (minutes each) run when selected: ./run test -m docs_slow tests/docs")
    _skip_pending(page)
    blocks = _runnable(page, with_slow=True)
    assert blocks, f"{_rel(page)} is listed as slow but has no runnable block"
    assert run_page(page, blocks, tmp_path) == [0] * len(blocks)
