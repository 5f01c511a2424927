"""Distillation primitives: Hinton KD, Deep Mutual Learning, feature hints."""
from .features import FeatureTap, HintLoss
from .losses import hinton_kd, kl_divergence, mutual_losses

__all__ = ["kl_divergence", "hinton_kd", "mutual_losses", "FeatureTap", "HintLoss"]
