"""Training: the loop (`train`), one training step, checkpoints, the K-fold driver, the head warm-up."""
from taxonomist.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
