"""Which channels to remove, given scores: per-layer ratio, global ranking, or a MACs target.

Every rule respects a per-group cap: at most ``floor(max_ratio * size)`` channels go and at least
one stays, so no layer is ever emptied (PIC-PQ's safeguard, methods.md §4.3).

``round_to`` keeps every pruned group's width a multiple of that number (CPU kernels work in blocks
of 8 or 16 channels, so a 13-channel conv costs about what a 16-channel one does): the per-layer
rules round the kept width up, the global ranking removes channels a block at a time. A group no
wider than ``round_to`` is left whole.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import TandemError
from .groups import ChannelGraph, Group

Removed = dict[str, torch.Tensor]   # group name -> sorted indices of the channels to remove


def check_args(ratio, macs_target, scope, max_ratio, normalize="mean", round_to=1) -> None:
    if (ratio is None) == (macs_target is None):
        raise TandemError("give exactly one of ratio (fraction of channels to remove) or macs_target "
                          "(fraction of MACs that remain)")
    if ratio is not None and not 0 <= ratio < 1:
        raise TandemError(f"ratio={ratio!r} is outside the allowed range [0, 1)")
    if macs_target is not None and not 0 < macs_target <= 1:
        raise TandemError(f"macs_target={macs_target!r} is outside the allowed range (0, 1]")
    if not 0 <= max_ratio < 1:
        raise TandemError(f"max_ratio={max_ratio!r} is outside the allowed range [0, 1)")
    if ratio is not None and ratio > max_ratio:
        raise TandemError(f"ratio={ratio} exceeds max_ratio={max_ratio}, the most any layer may lose")
    if scope not in ("layer", "global"):
        raise TandemError(f"scope={scope!r} is not allowed; choose one of ['layer', 'global']")
    if normalize not in ("mean", "max", "none"):
        raise TandemError(f"normalize={normalize!r} is not allowed; choose one of ['mean', 'max', 'none']")
    if not isinstance(round_to, int) or round_to < 1:
        raise TandemError(f"round_to={round_to!r} is not allowed; give a whole number >= 1 (1: no rounding)")


def cap(group: Group, max_ratio: float) -> int:
    return min(math.floor(max_ratio * group.size), group.size - 1)


def rounded_count(group: Group, n: int, round_to: int) -> int:
    """``n`` removed channels or fewer, so that the kept width is a multiple of ``round_to``
    (or the group stays whole)."""
    if round_to == 1 or n == 0:
        return n
    kept = min(group.size, math.ceil((group.size - n) / round_to) * round_to)
    return group.size - kept


def chunks(group: Group, round_to: int) -> list[int]:
    """Sizes of the successive removals that keep the width a multiple of ``round_to``: from the
    full width to the next multiple below it, then ``round_to`` at a time, at least one block kept."""
    if round_to == 1:
        return [1] * (group.size - 1)
    kept = [group.size] + list(range((group.size - 1) // round_to * round_to, 0, -round_to))
    return [a - b for a, b in zip(kept, kept[1:])]


class MacsModel:
    """MACs of the traced layers as channels are removed (exact for conv/linear layers)."""

    def __init__(self, graph: ChannelGraph):
        self.graph = graph
        self.out = {n: layer.out for n, layer in graph.layers.items()}
        self.inp = {n: layer.in_pg for n, layer in graph.layers.items()}
        self.total = graph.macs

    def _layer(self, name):
        layer = self.graph.layers[name]
        return layer.unit * self.out[name] * self.inp[name]

    def remove(self, group: Group, n: int = 1) -> None:
        """Take ``n`` channels out of ``group`` and update the total."""
        touched = {m.module for m in group.members if m.module in self.graph.layers}
        before = sum(self._layer(t) for t in touched)
        for m in group.members:
            if m.module not in self.graph.layers:
                continue
            if m.kind in ("out", "dw"):
                self.out[m.module] -= n
            elif m.kind == "in":
                self.inp[m.module] -= n * m.repeat
        self.total += sum(self._layer(t) for t in touched) - before


def _normalized(scores: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return scores / scores.mean().clamp_min(1e-12)
    if how == "max":
        return scores / scores.max().clamp_min(1e-12)
    return scores


def select(graph: ChannelGraph, scores: dict[str, Optional[torch.Tensor]], *, ratio: Optional[float] = None,
           macs_target: Optional[float] = None, scope: str = "layer", max_ratio: float = 0.9,
           normalize: str = "mean", round_to: int = 1) -> Removed:
    """Channels to remove per group. ``scores[group.name]`` None: the group is left whole.

    - ratio, layer scope: each group loses ``floor(ratio * size)`` of its weakest channels;
    - ratio, global: ``ratio`` of all prunable channels go, ranked across groups on normalized scores;
    - macs_target, layer scope: the smallest uniform ratio whose MACs are <= target * original;
    - macs_target, global: remove the globally weakest channels until MACs <= target * original.

    With ``round_to`` > 1 the global ranking compares blocks (the mean normalized score of the
    block's channels) and a ratio is met or passed by less than one block.
    """
    check_args(ratio, macs_target, scope, max_ratio, normalize, round_to)
    groups = [g for g in graph.groups if scores.get(g.name) is not None]
    order = {g.name: torch.argsort(scores[g.name].float(), stable=True) for g in groups}
    if scope == "layer":
        if ratio is None:
            ratio = _uniform_ratio_for(graph, groups, macs_target, max_ratio, round_to)
        counts = {g.name: _layer_count(g, ratio, max_ratio, round_to) for g in groups}
        return {name: order[name][:n].sort().values for name, n in counts.items() if n > 0}
    # global ranking, one block (one channel unless round_to) at a time, weakest first
    pool = []
    for g in groups:
        ranked = _normalized(scores[g.name].float(), normalize)[order[g.name]].tolist()   # one host copy
        idx, start = order[g.name].tolist(), 0
        for size in chunks(g, round_to):
            pool.append((sum(ranked[start:start + size]) / size, g.name, idx[start:start + size]))
            start += size
    pool.sort(key=lambda t: t[0])    # stable: a group's blocks stay in order
    by_name = {g.name: g for g in groups}
    removed: dict[str, list[int]] = {}
    closed: set[str] = set()
    macs = MacsModel(graph)
    base = macs.total
    budget = math.floor(ratio * sum(g.size for g in groups) + 1e-9) if ratio is not None else None
    taken = 0
    for _, name, idx in pool:
        if budget is not None and taken >= budget:
            break
        if macs_target is not None and macs.total <= macs_target * base * (1 + 1e-9):
            break
        if name in closed or len(removed.get(name, [])) + len(idx) > cap(by_name[name], max_ratio):
            closed.add(name)     # its later blocks would pass the cap too
            continue
        removed.setdefault(name, []).extend(idx)
        macs.remove(by_name[name], len(idx))
        taken += len(idx)
    if macs_target is not None and macs.total > macs_target * base * (1 + 1e-9):
        rounding = f" and round_to={round_to}" if round_to > 1 else ""
        raise TandemError(f"macs_target={macs_target} cannot be reached: with max_ratio={max_ratio} "
                          f"(at most that fraction of each layer removed){rounding} the MACs fall only to "
                          f"{macs.total / base:.3f} of the original; raise macs_target or max_ratio")
    return {name: torch.tensor(sorted(idx)) for name, idx in removed.items()}


def _layer_count(group: Group, ratio: float, max_ratio: float, round_to: int) -> int:
    return rounded_count(group, min(math.floor(ratio * group.size + 1e-9), cap(group, max_ratio)), round_to)


def _uniform_ratio_for(graph, groups, macs_target, max_ratio, round_to=1) -> float:
    def macs_at(r):
        m = MacsModel(graph)
        for g in groups:
            n = _layer_count(g, r, max_ratio, round_to)
            if n:
                m.remove(g, n)
        return m.total / graph.macs

    if macs_at(max_ratio) > macs_target + 1e-9:
        raise TandemError(f"macs_target={macs_target} cannot be reached: with max_ratio={max_ratio} "
                          f"(at most that fraction of each layer removed) the MACs fall only to "
                          f"{macs_at(max_ratio):.3f} of the original; raise macs_target or max_ratio, "
                          f"or use scope=global")
    lo, hi = 0.0, max_ratio
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if macs_at(mid) <= macs_target + 1e-9 else (mid, hi)
    return hi
