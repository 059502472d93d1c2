"""Training: the loop (`train`), checkpoints, K-fold driver, inference over a loader."""
from taxonomist.train.loop import TrainResult, select_device, train

__all__ = ["TrainResult", "select_device", "train"]
