"""Training objectives built from the distillation losses, for `ctx.train_stage` (the engine's
objective(outputs, y, x) -> {term/<net>: loss}): Hinton KD of a student from a frozen teacher,
Deep Mutual Learning of two peers, and the KL ramp-up callback DML can use. Methods compose
them; none lives inside a method."""
from __future__ import annotations

import torch.nn.functional as F

from .losses import hinton_kd, kl_divergence, mutual_losses
from .spec import PEERS, MutualSpec


def kd_objective(student: str = "distilled", teacher: str = "teacher", *, alpha: float = 0.9,
                 temperature: float = 4.0, extra=None):
    """Hinton KD for `student`: (1 - alpha) CE + alpha T^2 KL(teacher || student) (terms
    `ce/<student>`, `kd/<student>`); every other trained network (a control) gets plain CE.
    `extra(outputs)` may add terms (e.g. a MACs penalty)."""
    def objective(outputs, y, x):
        losses = {f"{k}/{student}": v for k, v in hinton_kd(outputs[student], outputs[teacher], y, alpha=alpha,
                                                             temperature=temperature).items()}
        for name, z in outputs.items():
            if name not in (student, teacher):
                losses[f"ce/{name}"] = F.cross_entropy(z.float(), y)
        if extra is not None:
            losses.update(extra(outputs))
        return losses
    return objective


class KLRamp:
    """Callback: the KL terms' weight factor, rising linearly from 0 to 1 over the first
    `epochs` of the stage (computed from the trainer's step count, so a resumed stage
    continues the ramp where it was)."""

    def __init__(self, epochs: float):
        self.epochs, self.factor = epochs, 1.0 if epochs == 0 else 0.0

    def before_step(self, trainer) -> None:
        if self.epochs > 0:
            self.factor = min(1.0, trainer.step / (self.epochs * trainer.steps_per_epoch))


def dml_objective(ms: MutualSpec, teacher: str | None = None, hints=None, ramp: KLRamp | None = None):
    """CE + KL to the other peer's detached prediction, for each peer (`ce/<peer>`, `kl/<peer>`);
    optionally KD from the frozen full-precision model (`kd/<peer>`) and P's feature hint
    (`hint/pruned`). `ramp` scales the KL terms (mutual.kl_rampup_epochs). Every term is named after the one network it trains, so the summed
    backward (simultaneous) and per-network backward (sequential) both give each peer exactly
    the gradient of its own loss."""
    def objective(outputs, y, x):
        factor = ramp.factor if ramp is not None else 1.0
        losses = mutual_losses({k: outputs[k] for k in PEERS}, y, temperature=ms.temperature,
                               kl_weight={k: w * factor for k, w in ms.kl_weights().items()})
        if teacher is not None:
            for k in PEERS:
                losses[f"kd/{k}"] = ms.kd_weight * kl_divergence(outputs[k], outputs[teacher], ms.kd_temperature)
        if hints is not None:
            tap_p, tap_q, modules = hints
            losses["hint/pruned"] = ms.feature_weight * sum(
                h(tap_p.features[n], tap_q.features[n]) for h, n in zip(modules, tap_p.names))
        return losses
    return objective
