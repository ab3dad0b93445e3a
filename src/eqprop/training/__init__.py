"""Training runs: the epoch loop, evaluation, checkpoints and metrics."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .loop import DivergenceError, EpochStats, evaluate, train_epoch
from .trainer import evaluate_checkpoint, train

__all__ = ["CheckpointError", "DivergenceError", "EpochStats", "evaluate", "evaluate_checkpoint",
           "load_checkpoint", "save_checkpoint", "train", "train_epoch"]
