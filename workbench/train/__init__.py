"""Training: the Trainer loop (in the caller's thread, or started in a background one), its lr
schedule and crash-safe checkpoints; on several ranks under ``torchrun`` with a :class:`DistContext`."""
from .distributed import DistContext, init_from_env
from .schedule import lr_factor, make_scheduler
from .trainer import BatchError, NonFiniteError, TrainConfig, Trainer, TrainingRun

__all__ = ["BatchError", "DistContext", "NonFiniteError", "TrainConfig", "Trainer", "TrainingRun", "init_from_env",
           "lr_factor", "make_scheduler"]
