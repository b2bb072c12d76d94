"""Training: the Trainer loop, its lr schedule and crash-safe checkpoints."""
from .schedule import lr_factor, make_scheduler
from .trainer import BatchError, TrainConfig, Trainer

__all__ = ["BatchError", "TrainConfig", "Trainer", "lr_factor", "make_scheduler"]
