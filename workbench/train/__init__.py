"""Training: the Trainer loop (in the caller's thread, or started in a background one), its lr
schedule and crash-safe checkpoints."""
from .schedule import lr_factor, make_scheduler
from .trainer import BatchError, NonFiniteError, TrainConfig, Trainer, TrainingRun

__all__ = ["BatchError", "NonFiniteError", "TrainConfig", "Trainer", "TrainingRun", "lr_factor", "make_scheduler"]
