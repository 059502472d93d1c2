"""Sharded, resumable batch prediction: the input is cut into chunks of K rows, chunk c goes to process
c mod W (torchrun's WORLD_SIZE), and each chunk's decisions are written atomically as a part file beside the output.

A killed run loses at most the chunk each process was working on: `predict --resume` keeps every part whose key
(models, options and the chunk's image paths) matches. Rank 0 merges the parts in chunk order, so the output is
the one a single process writes, whatever the number of processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from taxonomist.errors import ConfigError
from taxonomist.utils.files import atomic_path

#: Rows per chunk (`predict --chunk-size`): the work a kill can lose and a resume skips. 1,024 images are about
#: 25 s for EfficientNet-Lite0 at 128 px on one CPU core and well under a second on a GPU.
DEFAULT_CHUNK_SIZE = 1024
PART_VERSION = 1
#: How long a process that finished its chunks waits for the others at the final collective (torchrun stops
#: every process when one fails, so a long wait never outlives a crash).
GROUP_TIMEOUT = timedelta(hours=24)


@dataclass
class ChunkResult:
    """The decisions of some input rows: what the output table needs, nothing it can recompute."""

    positions: np.ndarray            # (n,) input row positions with an answer, ascending
    nodes: np.ndarray                # (n,) answer node indices in the taxonomy
    confidence: np.ndarray           # (n,) P(answer)
    expected_distance: np.ndarray    # (n,) expected taxonomic distance of the answer
    ood_score: np.ndarray            # (n,) OOD score, or (0,) without --ood
    unknown: np.ndarray              # (n,) flagged unknown, or (0,) without --ood
    skipped_positions: np.ndarray    # (k,) rows left out (unreadable, or not answered by every member)
    skipped_reasons: np.ndarray      # (k,) why
    raw_nodes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (n,) without the priors
    prior_applied: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))  # (n,) priors status
    # what the output formats need beyond the decisions (`inference.formats`):
    # (n,) the OOD threshold each score was compared with, or (0,) without --ood
    ood_threshold: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # (n, F) the members' pooled features side by side and (n, members) their widths (--embeddings), else (0, 0)
    features: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    feature_dims: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    # (n,) each answer as a JSON object (--format jsonl), else (0,)
    records: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))

    @classmethod
    def concat(cls, parts: Sequence["ChunkResult"]) -> "ChunkResult":
        """The results of consecutive chunks as one (positions stay absolute and ascending). A chunk without answered
        rows adds nothing, whatever the shape of its empty arrays (features are (0, 0) where no model ran)."""
        def joined(name: str) -> np.ndarray:
            arrays = [getattr(p, name) for p in parts]
            filled = [a for a in arrays if len(a)]
            return np.concatenate(filled) if filled else arrays[0]
        return cls(*(joined(f.name) for f in fields(cls)))


@dataclass(frozen=True)
class Shard:
    """This process's place in a torchrun job (world 1, rank 0 outside one)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Shard":
        try:
            world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError as e:
            raise ConfigError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers ({e})") from None
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} is not a process of WORLD_SIZE={world}")
        return cls(world, rank, local)

    def chunks(self, n_rows: int, chunk_size: int) -> list[tuple[int, int, int]]:
        """(chunk index, first row, end row) of this process's chunks: every world-th chunk from its rank."""
        n_chunks = -(-n_rows // chunk_size)
        return [(c, c * chunk_size, min(n_rows, (c + 1) * chunk_size)) for c in range(self.rank, n_chunks, self.world)]


def chunk_count(n_rows: int, chunk_size: int) -> int:
    return -(-n_rows // chunk_size)


def parts_folder(out: str | Path) -> Path:
    """`p.csv` → `p.csv.parts/`, beside the output (several nodes need it on a shared filesystem)."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def run_key(description: dict) -> str:
    """A digest of what decides a chunk's answers besides its images: models, options (JSON-able)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def chunk_key(base: str, paths: Iterable[str]) -> str:
    h = hashlib.sha256(f"v{PART_VERSION}\n{base}\n".encode())
    for p in paths:
        h.update(p.encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


class PartStore:
    """The part files of one output: `OUT.parts/chunk-000000.npz`, … (numpy archives, written atomically)."""

    def __init__(self, out: str | Path):
        self.folder = parts_folder(out)

    def path(self, chunk: int) -> Path:
        return self.folder / f"chunk-{chunk:06d}.npz"

    def write(self, chunk: int, key: str, result: ChunkResult) -> Path:
        path = self.path(chunk)
        arrays = {f.name: getattr(result, f.name) for f in fields(ChunkResult)}
        arrays["skipped_reasons"] = np.asarray(result.skipped_reasons, dtype=str)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, key=np.array(key), **arrays)
                f.flush()
                os.fsync(f.fileno())
        return path

    def read(self, chunk: int, key: str) -> ChunkResult | None:
        """The stored result of `chunk` when its key matches; None when it is absent, unreadable or stale."""
        path = self.path(chunk)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["key"]) != key:
                    return None
                return ChunkResult(*(data[f.name] for f in fields(ChunkResult)))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            return None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- process group
def start_group(shard: Shard, device) -> bool:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA); True when this call started it."""
    if shard.world <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=GROUP_TIMEOUT)
    return True


def sum_across(values: Sequence[int], shard: Shard, device) -> list[int]:
    """Sum integers over the processes; every process waits here until all have finished their chunks."""
    if shard.world <= 1:
        return [int(v) for v in values]
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(v) for v in values], dtype=torch.int64,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return [int(v) for v in t.cpu().tolist()]


def end_group(started: bool) -> None:
    if started:
        import torch.distributed as dist

        dist.destroy_process_group()
