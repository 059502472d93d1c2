"""Data: the dataset directory format, readers (COCO, ImageFolder, rank-column CSV), synthesis, download,
exploration, splits, and the torch loading path (in `taxonomist.data.loading`, imported on demand)."""
from taxonomist.data.dataset import ANNOTATIONS, TAXONOMY, Dataset, load_dataset, read_annotations, write_annotations

__all__ = ["ANNOTATIONS", "TAXONOMY", "Dataset", "load_dataset", "read_annotations", "write_annotations"]
