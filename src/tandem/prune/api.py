"""``prune(model, example_input, ...)``: criterion -> selection -> surgery in one call, and the
``ChannelPruner`` object that schedules (soft, iterative) call once per epoch or step."""
from __future__ import annotations

import copy
from fnmatch import fnmatchcase
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import TandemError
from .criteria import Criterion, get_criterion
from .groups import ChannelGraph
from .masks import apply_weight_masks, zero_channels
from .select import Removed, check_args, select
from .surgery import apply_removal


class ChannelPruner:
    """Scores and selects channels of one model with one criterion and one target.

    ``plan()`` reads the current weights (so it can be called again as training goes on),
    ``mask(removed)`` zeroes those channels in place, ``apply(removed)`` returns the physically
    smaller model."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, criterion: str | Criterion = "l1", *,
                 ratio: Optional[float] = None, macs_target: Optional[float] = None, scope: Optional[str] = None,
                 max_ratio: float = 0.9, normalize: str = "auto", data: Optional[Iterable] = None,
                 criterion_options: Optional[dict] = None, ignore: Sequence[str] = (), round_to: int = 1):
        self.criterion = criterion if isinstance(criterion, Criterion) else \
            get_criterion(criterion, **(criterion_options or {}))
        if not self.criterion.structured:
            raise TandemError(f"{self.criterion.name} pruning masks single weights, not channels: use prune()")
        scope = scope or self.criterion.default_scope
        normalize = self.criterion.normalize if normalize == "auto" else normalize
        check_args(ratio, macs_target, scope, max_ratio, normalize, round_to)
        self.options = dict(ratio=ratio, macs_target=macs_target, scope=scope, max_ratio=max_ratio,
                            normalize=normalize, round_to=round_to)
        self.graph = ChannelGraph(model, example_input)
        if not self.graph.groups:
            raise TandemError(f"{type(model).__name__} has no prunable channel groups")
        self.ignored = _ignored_groups(self.graph, ignore)
        if len(self.ignored) == len(self.graph.groups):
            raise TandemError(f"ignore={list(ignore)} leaves no channel group of {type(model).__name__} to prune")
        if data is None and self.criterion.needs_data and not example_input.any():
            raise TandemError(f"the {self.criterion.name} criterion scores channels on data, and the example "
                              f"input is all zeros: pass data (batches of real inputs)")
        self.data = data if data is not None else [example_input]

    def scores(self) -> dict:
        """{group: channel scores}; None for an ignored group (it is left whole)."""
        if self.criterion.needs_data:
            self.criterion.prepare(self.graph, self.data)
        return {g.name: None if g.name in self.ignored else self.criterion.score(self.graph, g)
                for g in self.graph.groups}

    def plan(self) -> Removed:
        return select(self.graph, self.scores(), **self.options)

    def mask(self, removed: Removed, soft: bool = False, bn: bool | None = None) -> None:
        zero_channels(self.graph, removed, soft=soft, bn=bn)

    def apply(self, removed: Removed, inplace: bool = False) -> nn.Module:
        return apply_removal(self.graph, removed, inplace=inplace)


def _ignored_groups(graph: ChannelGraph, patterns: Sequence[str]) -> set[str]:
    """Groups with a producing layer whose name matches a glob: removing a channel there would
    change that layer, so the whole group stays. A pattern matching no layer is an error."""
    names = [n for n in graph._modules if n]
    for p in patterns:
        if not any(fnmatchcase(n, p) for n in names):
            raise TandemError(f"ignore pattern {p!r} matches no layer; some names: {', '.join(names[:8])}")
    return {g.name for g in graph.groups
            if any(fnmatchcase(m.module, p) for m in g.of_kind("out") for p in patterns)}


def prune(model: nn.Module, example_input: torch.Tensor, criterion: str | Criterion = "l1", *, ratio: Optional[float] = None,
          macs_target: Optional[float] = None, scope: Optional[str] = None, max_ratio: float = 0.9,
          normalize: str = "auto", data: Optional[Iterable] = None, inplace: bool = False,
          ignore: Sequence[str] = (), round_to: int = 1, **criterion_options) -> nn.Module:
    """Prune ``model`` and return the physically smaller model (the input is left unchanged
    unless ``inplace``).

    ``ratio``: fraction of channels removed (per layer, or across layers with
    ``scope='global'``); ``macs_target``: fraction of MACs that remain (0.5 = half). ``data``:
    batches for data-driven criteria (``needs_data``: hrank); default: the example input. ``ignore``: globs of
    layer names whose output channels are left whole (e.g. ``["stem.0", "*.conv2"]`` keeps a
    ResNet's residual streams, as PFEC prunes ResNet-56). ``round_to``: kept widths are multiples
    of it (8 or 16 suit CPU kernels; see benchmarks/prune_latency.py). A built-in model comes back as
    ``create_model(name, widths=...)`` with the kept weights.

    An unstructured criterion (``structured = False``: ``'magnitude'``) keeps the model's shape:
    the smallest weights become zero (``ratio`` of them, or ``1 - macs_target``), and
    cost.profile's nonzero_macs reports the saving. Extra keyword arguments are the criterion's
    options (``Criterion.options()``).
    """
    crit = criterion if isinstance(criterion, Criterion) else get_criterion(criterion, **criterion_options)
    if not crit.structured:
        if round_to != 1:
            raise TandemError(f"round_to rounds channel counts; {crit.name} pruning removes single weights "
                              "and keeps every channel, so it would have no effect")
        if (ratio is None) == (macs_target is None):
            raise TandemError("give exactly one of ratio or macs_target")
        if macs_target is not None and not 0 < macs_target <= 1:
            raise TandemError(f"macs_target={macs_target!r} is outside the allowed range (0, 1]")
        sparsity = ratio if ratio is not None else 1 - macs_target
        out = model if inplace else copy.deepcopy(model)
        apply_weight_masks(out, crit.masks(out, sparsity, scope or crit.default_scope))
        return out
    pruner = ChannelPruner(model, example_input, crit, ratio=ratio, macs_target=macs_target, scope=scope,
                           max_ratio=max_ratio, normalize=normalize, data=data, ignore=ignore, round_to=round_to)
    return pruner.apply(pruner.plan(), inplace=inplace)
