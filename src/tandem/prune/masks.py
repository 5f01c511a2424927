"""Masks: zeroing channels in place (hard or soft) and per-weight magnitude masks (Han et al.).
Learned gates, which multiply channels instead of zeroing weights, are in gates.py.

A *hard* channel mask zeroes everything that produces the channel: the filters and biases of
its convs/linears and depthwise convs and the BN's scale and shift. The channel is then 0
after every activation that keeps 0 at 0, so removing it (surgery) changes no output.
A channel that an option-A shortcut copies into the stream is zeroed by setting its entry of
the shortcut's channel map to -1. A *soft* mask (SFP) zeroes only the filters: BN's shift and
the gradients let them regrow.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import TandemError
from .groups import ChannelGraph
from .select import Removed


@torch.no_grad()
def zero_channels(graph: ChannelGraph, removed: Removed, soft: bool = False, bn: bool | None = None) -> None:
    """``bn`` (default: not soft) zeroes the BN scale and shift too; a soft mask with ``bn=True``
    still regrows (nothing holds it) but evaluates as removed (BN's shift is 0 as well)."""
    bn = not soft if bn is None else bn
    for group in graph.groups:
        idx = removed.get(group.name)
        if idx is None or len(idx) == 0:
            continue
        for m in group.members:
            mod = graph.module(m.module)
            if m.kind == "map_out":
                if not soft:   # the shortcut's copy of an input channel would refill the position
                    drop = {m.offset + int(i) for i in idx}
                    mod.set_channel_map(mod.in_ch, [-1 if j in drop else i for j, i in enumerate(mod.channel_map)])
                continue
            if m.kind == "map_in":
                continue
            rows = idx.to(mod.weight.device) + m.offset if mod.weight is not None else idx + m.offset
            if m.kind in ("out", "dw"):
                mod.weight[rows] = 0
                if getattr(mod, "bias", None) is not None and not soft:
                    mod.bias[rows] = 0
            elif m.kind == "bn" and bn and mod.affine:
                mod.weight[rows] = 0
                mod.bias[rows] = 0


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights unstructured pruning masks: every conv's and linear's."""
    return {f"{n}.weight" if n else "weight": m.weight for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    """Han et al.: keep the largest-|w| weights. ``sparsity`` of each layer's weights (layer
    scope), or of all weights ranked together (global), become zero. Every layer keeps at
    least one weight."""
    if not 0 <= sparsity < 1:
        raise TandemError(f"ratio={sparsity!r} is outside the allowed range [0, 1)")
    if scope not in ("layer", "global"):
        raise TandemError(f"scope={scope!r} is not allowed; choose one of ['layer', 'global']")
    weights = prunable_weights(model)
    if scope == "global":
        flat = torch.cat([w.abs().flatten().float() for w in weights.values()])
        k = int(sparsity * flat.numel())
        threshold = flat.kthvalue(k).values if k > 0 else flat.min() - 1
        masks = {n: w.abs() > threshold for n, w in weights.items()}
    else:
        masks = {}
        for n, w in weights.items():
            k = int(sparsity * w.numel())
            threshold = w.abs().flatten().kthvalue(k).values if k > 0 else w.abs().min() - 1
            masks[n] = w.abs() > threshold
    for n, w in weights.items():   # never empty a layer
        if not masks[n].any():
            masks[n].view(-1)[w.abs().argmax()] = True
    return masks


@torch.no_grad()
def apply_weight_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    weights = prunable_weights(model)
    for n, mask in masks.items():
        weights[n].mul_(mask.to(weights[n].device, weights[n].dtype))
