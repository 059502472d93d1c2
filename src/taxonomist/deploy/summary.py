"""What an export wrote (`ExportSummary`), for every format: `deploy.export` (ONNX, TorchScript) and the Hub folder
(`deploy.hub.export_hub_folder`) both return one."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ExportSummary:
    """What `export_model` wrote."""

    out: Path
    fmt: str
    checkpoint: Path
    exporter: str              # torch.export, torchscript-onnx (fallback) or torch.jit.trace
    size_bytes: int
    seconds: float
    ood_file: Path | None
    max_abs_diff: float | None  # |logits(export) − logits(PyTorch)| on a random batch, when checked
    notes: tuple[str, ...] = ()  # further lines for the user (the hf format: the card, how to push)

    def summary(self) -> str:
        lines = [f"exported {self.checkpoint} → {self.out} ({self.fmt}, {self.exporter}, "
                 f"{self.size_bytes / 1e6:.1f} MB) in {self.seconds:.1f} s"]
        if self.max_abs_diff is not None:
            lines.append(f"checked: max |logit difference| against PyTorch on a random batch {self.max_abs_diff:.2e}")
        if self.ood_file is not None:
            lines.append(f"OOD statistics copied to {self.ood_file}")
        return "\n".join([*lines, *self.notes])
