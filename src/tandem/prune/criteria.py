"""Importance criteria: each scores the channels of a group (higher = more important).

A group may have several producers (convs tied by residual additions, a depthwise conv following
its expansion); their per-channel scores are summed, as PIC-PQ does for tied layers (methods.md
§4.3). A criterion returns None for a group it cannot score (bn_scale without a BN, hrank on a
linear layer): selection then leaves that group whole.
"""
from __future__ import annotations

import inspect
from typing import Iterable, Optional

import torch
import torch.nn as nn

from ..errors import TandemError
from ..modes import eval_mode
from ..registry import Registry
from .groups import ChannelGraph, Group
from .masks import magnitude_masks

CRITERIA = Registry("pruning criterion")   # name -> Criterion class


def register_criterion(name: str):
    def deco(cls):
        CRITERIA.register(name, cls)
        cls.name = name
        return cls
    return deco


def list_criteria() -> list[str]:
    """Structured (channel) criteria, then unstructured (per weight) ones."""
    return sorted(CRITERIA.names(), key=lambda n: not CRITERIA.get(n).structured)


def criterion_class(name: str) -> type["Criterion"]:
    """The class registered under ``name``: what the rest of tandem asks a criterion about."""
    if name not in CRITERIA:
        raise TandemError(f"unknown pruning criterion {name!r}; allowed: {', '.join(list_criteria())}")
    return CRITERIA.get(name)


def get_criterion(name: str, **options) -> "Criterion":
    cls = criterion_class(name)
    cls.check_options(options)
    return cls(**options)


class Criterion:
    """Base: ``prepare`` sees the model once (data-driven criteria collect statistics there),
    ``score(graph, group)`` returns a tensor of ``group.size`` scores or None.

    The class attributes are what the rest of tandem asks, so a new criterion is one class:
    ``needs_data`` (the recipe path gives ``prepare`` real training batches; a ``batches`` option,
    if the criterion takes one, is how many), ``structured`` (False: it masks single weights,
    ``masks()``, and the model keeps its shape), ``default_scope`` (the ranking scope when none
    is given), ``normalize`` (how global ranking makes scores of different layers comparable),
    ``soft`` (its paper prunes softly, zeroing and regrowing while training: the grid keeps that
    schedule for it). Its options are its constructor's keyword arguments (``options()``)."""
    name = "?"
    needs_data = False
    structured = True
    default_scope = "layer"
    normalize = "mean"
    soft = False

    @classmethod
    def options(cls) -> dict:
        """{option: default} of the constructor (recipes pass them as ``prune.criterion_options``)."""
        return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"}

    @classmethod
    def check_options(cls, given: dict) -> None:
        """A TandemError naming an option the criterion does not take, or a value of the wrong type."""
        allowed = cls.options()
        for key, value in given.items():
            if key not in allowed:
                raise TandemError(f"{cls.name} takes no option {key!r}; allowed: {', '.join(allowed) or 'none'}")
            default = allowed[key]
            if default not in (None, inspect.Parameter.empty) and not _same_kind(value, default):
                raise TandemError(f"{cls.name}: option {key} = {value!r} must be of type {type(default).__name__}")

    def prepare(self, graph: ChannelGraph, batches: Iterable[torch.Tensor] = ()) -> None:
        pass

    def score(self, graph: ChannelGraph, group: Group) -> Optional[torch.Tensor]:
        total = None
        for m in group.of_kind("out", "dw"):
            w = graph.module(m.module).weight.detach()
            filters = w[m.offset:m.offset + group.size].flatten(1).float()
            s = self.filter_scores(filters)
            total = s if total is None else total + s
        return total

    def filter_scores(self, filters: torch.Tensor) -> torch.Tensor:   # (n, k) -> (n,)
        raise NotImplementedError

    def masks(self, model: nn.Module, sparsity: float, scope: str) -> dict[str, torch.Tensor]:
        """Unstructured criteria only: {weight name: bool mask of the weights kept}."""
        raise NotImplementedError


def _same_kind(value, default) -> bool:
    """bool is not a number here; an int is a float."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


@register_criterion("l1")
class L1(Criterion):
    """Li et al. 2017 (PFEC): the L1 norm of each filter."""
    def filter_scores(self, filters):
        return filters.abs().sum(1)


@register_criterion("l2")
class L2(Criterion):
    """The L2 norm of each filter (SFP's criterion)."""
    soft = True

    def filter_scores(self, filters):
        return filters.norm(dim=1)


@register_criterion("fpgm")
class FPGM(Criterion):
    """He et al. 2019: S_i = sum_j ||F_i - F_j||_2 over the layer's filters; the smallest are
    nearest the geometric median, so they are the most replaceable."""
    soft = True

    def filter_scores(self, filters):
        return torch.cdist(filters[None], filters[None])[0].sum(1)


@register_criterion("bn_scale")
class BNScale(Criterion):
    """Network slimming (Liu et al. 2017): |gamma| of the BN after each channel; trained with an
    L1 penalty on gamma (schedules.SlimmingPenalty) and ranked globally on raw values. A channel
    with several BNs (a residual stream) scores their mean |gamma|, so it ranks on the same scale
    as a channel with one (a sum would make residual streams unprunable). Ranked globally by
    default, as network slimming ranks all BN scales together."""
    normalize = "none"
    default_scope = "global"

    def score(self, graph, group):
        bns = group.of_kind("bn")
        if not bns:
            return None
        return sum(graph.module(m.module).weight.detach()[m.offset:m.offset + group.size].abs().float()
                   for m in bns) / len(bns)


def break_ties_by_l1(ranks: dict[str, torch.Tensor], graph: ChannelGraph, images: int) -> dict[str, torch.Tensor]:
    """Average ranks plus (0.5 / images) * |W_i|_1 / max_j |W_j|_1 of each layer's filters, in
    float64. An average over `images` maps of integer ranks moves in steps of 1 / images, so the
    term (at most half a step) orders channels of equal rank by their filter's L1 norm and never
    reorders two different ranks. Small maps saturate the rank (a 7x7 map of a trained ResNet's
    stage 3 has full rank for nearly every channel): without it those ties go by channel index.
    float64 because at a rank of ~28 float32 cannot resolve the term between close L1 norms."""
    if images < 1:
        raise TandemError(f"break_ties_by_l1: images = {images!r}; the ranks are averages over at least one image")
    out = {}
    for name, r in ranks.items():
        l1 = graph.module(name).weight.detach().flatten(1).abs().sum(1).double().cpu()
        if l1.numel() != r.numel():
            raise TandemError(f"break_ties_by_l1: {name} has {l1.numel()} filters but {r.numel()} ranks")
        out[name] = r.double() + (0.5 / images) * l1 / l1.max().clamp_min(1e-30)
    return out


@register_criterion("hrank")
class HRank(Criterion):
    """Lin et al. 2020: the average matrix rank of each channel's H x W output map (the conv's
    output, before BN, as in PIC-PQ's generate_rank.py) over the given batches. `ties`: 'index'
    (the paper: equal ranks stay equal, selection takes them in channel order) or 'l1' (equal
    ranks ordered by the filter's L1 norm, see break_ties_by_l1)."""
    needs_data = True

    def __init__(self, batches: int = 6, ties: str = "index"):
        if ties not in ("index", "l1"):
            raise TandemError(f"hrank: ties = {ties!r} is not allowed; choose one of ['index', 'l1']")
        self.batches = batches
        self.ties = ties
        self.ranks: dict[str, torch.Tensor] = {}
        self.images = 0   # maps averaged per channel

    def prepare(self, graph, batches=()):
        names = {m.module for g in graph.groups for m in g.of_kind("out", "dw")
                 if isinstance(graph.module(m.module), nn.Conv2d)}
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def hook(name):
            def fn(_module, _inputs, out):
                r = torch.linalg.matrix_rank(out.detach().float()).sum(0).cpu()
                sums[name] = sums.get(name, 0) + r
                counts[name] = counts.get(name, 0) + out.shape[0]
            return fn

        handles = [graph.module(n).register_forward_hook(hook(n)) for n in names]
        model, seen = graph.model, 0
        try:
            with eval_mode(model), torch.no_grad():
                for x in batches:
                    if seen >= self.batches:
                        break
                    model(x[0] if isinstance(x, (tuple, list)) else x)
                    seen += 1
        finally:
            for h in handles:
                h.remove()
        if seen == 0:
            raise TandemError("the hrank criterion needs input batches to measure feature-map ranks")
        self.ranks = {n: sums[n] / counts[n] for n in sums}
        self.images = min(counts.values(), default=0)
        if self.ties == "l1":
            self.ranks = break_ties_by_l1(self.ranks, graph, self.images)

    def score(self, graph, group):
        parts = []
        for m in group.of_kind("out", "dw"):
            if m.module not in self.ranks:
                return None    # a linear producer: a rank of a 1x1 map says nothing
            parts.append(self.ranks[m.module][m.offset:m.offset + group.size])
        return sum(parts) if parts else None


@register_criterion("random")
class Random(Criterion):
    """Uniform random scores: the control every criterion should beat."""
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, graph, group):
        return torch.rand(group.size, generator=self.generator)


@register_criterion("magnitude")
class Magnitude(Criterion):
    """Han et al. 2015, unstructured: the smallest |w| of every conv and linear become zero; the
    model keeps its shape (cost.profile's nonzero_macs reports the saving)."""
    structured = False

    def masks(self, model, sparsity, scope):
        return magnitude_masks(model, sparsity, scope)
