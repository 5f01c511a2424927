"""Training engine: one loop, optimisers and schedules, evaluation, checkpoints, metrics log."""
from .checkpoint import load_checkpoint, load_model, save_checkpoint, save_model
from .evaluate import evaluate
from .metrics import MetricsLog
from .optim import build_optimizer, build_scheduler, lr_factor
from .trainer import Trainer, TrainingDiverged, autocast_for, cross_entropy_objective, resolve_device

__all__ = ["Trainer", "TrainingDiverged", "evaluate", "MetricsLog", "build_optimizer", "build_scheduler",
           "lr_factor", "save_checkpoint", "load_checkpoint", "save_model", "load_model",
           "cross_entropy_objective", "resolve_device", "autocast_for"]
