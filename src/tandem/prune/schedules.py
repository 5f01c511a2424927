"""Engine callbacks that prune while training, and the iterative schedule's step targets.

- SlimmingPenalty: network slimming's L1 on BN scales, as a subgradient after backward (§6.4).
- SoftPruning: SFP/FPGM, zero the weakest filters after every epoch and let them regrow (§6.6).
- KeepMasked: unstructured masks held on weights and gradients while fine-tuning (Han et al.).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .masks import apply_weight_masks, prunable_weights
from ..engine.distributed import on_rank0


class SlimmingPenalty:
    """gamma.grad += lam * sign(gamma) for every BN of the trained networks."""

    def __init__(self, lam: float = 1e-4):
        self.lam = lam

    @torch.no_grad()
    def after_backward(self, trainer) -> None:
        for net in trainer.nets.values():
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.weight.grad is not None:
                    m.weight.grad.add_(torch.sign(m.weight), alpha=self.lam)


class SoftPruning:
    """After each epoch's training, before its validation (SFP's order: the network validated and
    selected is the zeroed one), re-score with the pruner's criterion and zero the selected
    filters (soft: gradients untouched, so they regrow). ``zero_bn`` zeroes their BN scale and
    shift too, so the zeroed network evaluates as the removed one would (needed when no
    fine-tune follows the removal). ``by_epoch[e]`` is what was zeroed after epoch e;
    ``history`` counts, per epoch, the zeroed channels and how many were zeroed the epoch before."""

    def __init__(self, pruner, every: int = 1, zero_bn: bool = False):
        self.pruner, self.every, self.zero_bn = pruner, every, zero_bn
        self.history: list[dict] = []
        self.by_epoch: dict[int, dict] = {}
        self._last: dict = {}

    def state_dict(self) -> dict:
        """What a resumed stage needs: which channels each epoch zeroed (the removal follows the best epoch's)."""
        return {"history": self.history, "by_epoch": self.by_epoch, "last": self._last}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.by_epoch, self._last = state["history"], state["by_epoch"], state["last"]

    def before_validation(self, trainer, epoch: int) -> None:
        if epoch % self.every:
            return
        removed = on_rank0(self.pruner.plan)   # the same channels on every DDP rank
        self.pruner.mask(removed, soft=True, bn=self.zero_bn)
        same = sum(len(set(v.tolist()) & set(self._last.get(k, torch.tensor([])).tolist()))
                   for k, v in removed.items())
        self.history.append({"epoch": epoch, "zeroed": sum(len(v) for v in removed.values()), "same_as_before": same})
        self.by_epoch[epoch] = self._last = removed


class KeepMasked:
    """Hold per-weight masks: gradients are masked before the step, weights after it (so
    momentum and weight decay cannot revive a pruned weight)."""

    def __init__(self, model: nn.Module, masks: dict):
        self.weights = prunable_weights(model)
        self.model, self.masks = model, masks

    @torch.no_grad()
    def after_backward(self, trainer) -> None:
        for n, mask in self.masks.items():
            g = self.weights[n].grad
            if g is not None:
                g.mul_(mask.to(g.device, g.dtype))

    def after_step(self, trainer) -> None:
        apply_weight_masks(self.model, self.masks)


def step_fraction(total_keep: float, steps: int) -> float:
    """The keep fraction of each of ``steps`` equal steps whose product is ``total_keep``."""
    return total_keep ** (1.0 / steps)
