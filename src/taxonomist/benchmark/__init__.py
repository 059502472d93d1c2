"""`taxonomist benchmark`: the model-only ceiling, taxonomist's real train/predict paths and a naive baseline,
measured in one run on the same model, batch, image size and device (see docs/performance.md)."""
from taxonomist.benchmark.run import BenchmarkConfig, format_table, run_benchmark

__all__ = ["BenchmarkConfig", "format_table", "run_benchmark"]
