"""sbs: single-path bit sharing, with pruning as 0-bit quantization (Liu et al. TPAMI 2023;
methods.md §5; details from the earlier ABS version).

    method: sbs
    model: preact_resnet20
    sbs: {bits: [2, 4, 8], group_size: 4, bops_target: 0.02, search_epochs: 30, finetune_epochs: 200}

1. The pretrained model is quantized with the `sbs` quantizer (§5.2) at the highest candidate
   width, the first and last layers at `first_last_bits` (min-max, fixed), its clips calibrated
   (`alpha_init`: the 99.99th percentile of each input and of the standardised |w|; `paper`:
   1) and its weights on their own scale (`weight_scale`), so it starts where the FP network
   is (row `sbs/init`); optionally QAT at that width (`warmup_epochs`, stage `sbs-warmup`).
   Then every other weight and input quantizer becomes a bit-sharing one
   (tandem.quant.bit_sharing): one pass, per-layer bit gates for weights and for inputs
   (thresholds t >= 0, from 0); input gates decide from running means of the residuals
   (`input_bits: running`; `batch`: each batch's, the code), so the width does not flip from
   batch to batch and the frozen width comes from every training batch, not from one.
2. Channel gates (0 bits): groups of `group_size` output channels of the block-internal layers
   (`channels: internal`; the channel graph's groups with one producer and no shortcut), score
   mean|W_g| / max|W_layer|, gate 1[score > tau] with one learnable tau per layer (from 0),
   clamped to [0, tau_max] so at most `max_prune_ratio` of a layer's groups can close; the
   weights' standardisation uses the kept filters only.
3. Search (`sbs-search`): CE + lam log BOPs (or, with `bops_target`, lam max(0, log BOPs -
   log target), target a fraction of the FP BOPs or `4bit`: the uniform 4-bit model's BOPs;
   `bops_match` makes it lam |log BOPs - log target|, so the search ends near the budget and
   compares with the controls at equal BOPs), BOPs a function of the gates (MACs at the gated widths x expected
   weight bits x expected input bits, per layer); thresholds without weight decay; weight- and
   input-bit thresholds on alternate steps, channel thresholds every step.
4. Freeze: each layer keeps the bits its hard gates chose, closed channels are removed
   physically, and the compact model is fine-tuned with the plain quantizer (`sbs-finetune`).

Controls in the same run, same epochs: uniform 4-bit QAT with the same quantizer (`sbs/4bit`,
warm-up + search + fine-tune epochs; its start is `sbs/init-4bit`) and bits-only SBS (no
channel gates, `sbs/bits-only`, searched from the same warmed-up start). Rows: `sbs/searched` (the compact model
right after the search), `sbs/compressed` (after fine-tune, paired with both controls), the
controls; each with `bops_ratio` against the baseline.
"""
from __future__ import annotations

import copy
import math
from typing import Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import cost
from ..context import RunContext
from ..errors import RecipeError, TandemError
from ..fields import StageMilestones
from ..prune import ChannelGraph
from ..prune.gates import ThresholdGate, gate_, gates_of, remove_closed
from ..quant import calibrate, quantize_
from ..quant.bit_sharing import (check_candidates, float_or_sbs_weights, forget_kept_, freeze_chosen_bits_,
                                 layer_expected_bits, search_, standardise_over_kept, weight_and_input_quantizers)
from ..quant.quantize import record_layer_bits
from . import best_val, register_method, traced_graph


class SbsSpec(BaseModel):
    """Defaults: the authors' code / ABS where known; [UNKNOWN] values are marked."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    bits: list[int] = Field(default_factory=lambda: [2, 4, 8])
    group_size: int = Field(4, ge=1)                  # the code: 4; the paper's "filter-wise": 1
    max_prune_ratio: float = Field(0.5, ge=0, lt=1)   # [UNKNOWN] rho_max
    channels: Literal["internal", "all", "none"] = "internal"   # which channel groups get 0-bit gates
    lam: float = Field(1.0, gt=0)                     # [UNKNOWN] the BOPs term's weight
    threshold_lr: Optional[float] = Field(None, gt=0)   # None: search_lr, as the code (all thresholds)
    # a fraction of the FP BOPs, or "4bit": the BOPs of the uniform 4-bit model (its control); None: lam log BOPs
    bops_target: Optional[Union[float, Literal["4bit"]]] = None
    bops_match: bool = False                          # [INFER] penalise BOPs below the target too (equal budgets)
    first_last_bits: int = Field(8, ge=2, le=32)      # the code: stem and classifier at 8 bits
    # [INFER] a fair start from a pretrained network (docs/sbs.md): clips calibrated on data (paper: alpha = 1),
    # weights on their own scale (standardised: the code's alpha (2 Q(z) - 1)), input bits from running statistics
    alpha_init: Literal["calibrated", "paper"] = "calibrated"
    weight_scale: Literal["restored", "standardised"] = "restored"
    input_bits: Literal["running", "batch"] = "running"
    warmup_epochs: int = Field(0, ge=0)               # [INFER] QAT at the largest width before the gates learn
    search_epochs: int = Field(30, ge=1)              # ABS
    search_lr: float = Field(0.001, gt=0)             # ABS: 0.001 from the FP model
    finetune_epochs: int = Field(200, ge=0)           # ABS
    finetune_lr: float = Field(0.1, gt=0)
    finetune_milestones: StageMilestones = Field(default_factory=lambda: [0.4, 0.6])   # ABS: /10 at 80, 120 of 200
    controls: list[Literal["uniform4", "bits_only"]] = Field(default_factory=lambda: ["uniform4", "bits_only"])

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        try:
            return check_candidates(v)
        except TandemError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("bops_target")
    @classmethod
    def _target(cls, v):
        if isinstance(v, (int, float)) and not 0 < v <= 1:
            raise ValueError("bops_target is a fraction of the full-precision BOPs (allowed range (0, 1]) or '4bit'")
        return v

    @model_validator(mode="after")
    def _match_needs_target(self):
        if self.bops_match and self.bops_target is None:
            raise ValueError("sbs.bops_match keeps the search at sbs.bops_target; set bops_target too, or drop bops_match")
        return self


def sbs_spec(ctx: RunContext) -> SbsSpec:
    return ctx.recipe.sbs or SbsSpec()


def channel_groups(graph: ChannelGraph, which: str) -> list[str]:
    """Groups that get 0-bit gates: `internal` = one producer and no shortcut map (a block's
    conv1 channels, a VGG layer), `all`, or none; in a quantized model only groups whose every
    weight layer has an sbs quantizer (the fixed-width first and last layers' grids, min-max,
    would move with the channels)."""
    if which == "none":
        return []

    def searched(g):
        return float_or_sbs_weights(graph.module(m.module) for m in g.members if m.kind in ("out", "dw", "in"))
    return [g.name for g in graph.groups if searched(g) and
            (which == "all" or (len(g.of_kind("out")) == 1 and not g.of_kind("map_in", "map_out")))]


class _Kept:
    """Which entries of a layer's weight the channel gates keep along one axis (0: output
    filters, of the group's producers and depthwise convs; 1: input channels of its readers),
    as a boolean vector for that axis."""

    def __init__(self, gate: ThresholdGate, dim: int, offset: int, repeat: int, length: int):
        self.gate, self.dim, self.offset, self.repeat, self.length = gate, dim, offset, repeat, length

    def __call__(self) -> torch.Tensor:
        open_ = (self.gate().detach() > 0.5).repeat_interleave(self.repeat)
        mask = torch.ones(self.length, dtype=torch.bool, device=open_.device)
        mask[self.offset:self.offset + open_.numel()] = open_
        return mask


def attach_kept(model: nn.Module, graph: ChannelGraph, gates) -> None:
    """Each sbs weight quantizer standardises over the weights the channel gates keep, so the
    gated model computes what the compact one (closed channels removed) computes."""
    groups = {g.name: g for g in graph.groups}
    for key, gate in gates.gates.items():
        for m in groups[gates.sources[key]].members:
            if m.kind not in ("out", "dw", "in"):
                continue
            layer = model.get_submodule(m.module)
            dim = 1 if m.kind == "in" else 0
            standardise_over_kept(layer, _Kept(gate, dim, m.offset, m.repeat, layer.weight.shape[dim]))


def check_group_size(graph: ChannelGraph, groups: list[str], group_size: int) -> None:
    sizes = {g.name: g.size for g in graph.groups}
    for name in groups:
        if sizes[name] % group_size:
            raise RecipeError(f"recipe error: sbs.group_size = {group_size} does not divide the {sizes[name]} output "
                              f"channels of layer {name!r}; choose a divisor of every gated layer's width")


def _quant_policy(spec: SbsSpec, bits: int | None = None) -> dict:
    b = bits or spec.bits[-1]
    return {"method": "sbs", "w_bits": b, "a_bits": b, "first_last": spec.first_last_bits,
            "first_last_method": "minmax", "act_init": spec.alpha_init, "sbs_weight_scale": spec.weight_scale}


def build_quantized(ctx: RunContext, base, spec: SbsSpec, bits: int | None = None) -> nn.Module:
    """A copy of the pretrained model with the sbs quantizer at `bits` (default: the largest
    candidate), calibrated on training batches."""
    model = quantize_(copy.deepcopy(base), _quant_policy(spec, bits))
    calibrate(model, ctx.eval_loader("train"), num_batches=4)
    return model


def build_searching(ctx: RunContext, model, spec: SbsSpec, channels: str):
    """`model` (from build_quantized) with bit-sharing quantizers and (unless channels is
    'none') channel gates, in place; returns (model, channel gates or None, quantizers, graph)."""
    quantizers = search_(model, spec.bits, spec.input_bits)
    example = torch.zeros(1, *ctx.input_size, device=ctx.device)
    graph = ChannelGraph(model, example)
    groups = channel_groups(graph, channels)
    gates = None
    if groups:
        check_group_size(graph, groups, spec.group_size)
        gates = gate_(model, example, "threshold", groups=groups, group_size=spec.group_size)
        attach_kept(model, graph, gates)
    return model, gates, quantizers, graph


def differentiable_bops(model: nn.Module, graph: ChannelGraph, gates) -> torch.Tensor:
    """sum over conv/linear layers of MACs (at the gated widths) x weight bits x input bits,
    bits as the bit gates' expected widths (exactly the hard widths in value; gradients reach
    every threshold through the straight-through gates)."""
    macs = gates.layer_macs() if gates is not None else \
        {n: l.unit * l.out * l.in_pg for n, l in graph.layers.items()}
    total = 0.0
    for name, m in macs.items():
        wb, ab = layer_expected_bits(model.get_submodule(name))
        total = total + m * wb * ab
    return total


class SearchControl:
    """Callback of the search stage: weight-bit thresholds learn on even steps, input-bit
    thresholds on odd ones (the other's gradient is dropped), channel thresholds every step;
    after each step t >= 0 and each channel tau in [0, tau_max]."""

    def __init__(self, quantizers, gates, max_prune_ratio: float):
        weights, inputs = weight_and_input_quantizers(quantizers)
        self.weight = [q.gates.threshold for q in weights]
        self.act = [q.gates.threshold for q in inputs]
        self.gates, self.rho = gates, max_prune_ratio

    def after_backward(self, trainer) -> None:
        for t in (self.act if trainer.step % 2 == 0 else self.weight):
            t.grad = None

    @torch.no_grad()
    def after_step(self, trainer) -> None:
        for t in self.weight + self.act:
            t.clamp_(min=0)
        if self.gates is not None:
            for gate in self.gates.gates.values():
                gate.threshold.clamp_(0, tau_max(gate, self.rho))


class WidthLog:
    """Callback of the search stage: how often each input's width changed from one training step
    to the next during the epoch (`input_width_flips`, and how many inputs changed at all), into
    metrics.jsonl, so a width that flips from batch to batch (`input_bits: batch`) shows.
    Counted on the device; read once per epoch."""

    def __init__(self, quantizers):
        self.inputs = weight_and_input_quantizers(quantizers)[1]
        self.last, self.flips = None, None

    @torch.no_grad()
    def after_step(self, trainer) -> None:
        if not self.inputs or not self.inputs[0].products:
            return
        now = torch.stack([torch.stack([p.detach() for p in q.products]) for q in self.inputs]).gt(0.5)
        if self.last is not None:
            changed = (now != self.last).any(1)
            self.flips = changed.long() if self.flips is None else self.flips + changed
        self.last = now

    def before_validation(self, trainer, epoch: int) -> None:
        if self.flips is not None:
            trainer.log.write({"stage": trainer.stage, "epoch": epoch, "input_width_flips": int(self.flips.sum()),
                               "inputs_that_changed_width": int((self.flips > 0).sum()),
                               "inputs": len(self.inputs)})
        self.last, self.flips = None, None


def tau_max(gate: ThresholdGate, rho: float) -> float:
    """The k-th smallest group score, k = max(1, floor(C rho / G)): at most k groups can close."""
    scores = gate.scores().detach().sort().values
    k = max(1, math.floor(gate.size * rho / gate.group_size))
    return float(scores[min(k, len(scores)) - 1]) if rho > 0 else 0.0


def sbs_objective(spec: SbsSpec, model, graph, gates, target_bops: float | None):
    """CE + lam log BOPs; with a target (BOPs), lam max(0, log BOPs - log target), or with
    bops_match lam |log BOPs - log target|."""
    def objective(outputs, y, x):
        losses = {"ce/net": F.cross_entropy(outputs["net"].float(), y)}
        log_bops = torch.log(torch.as_tensor(differentiable_bops(model, graph, gates)))
        if target_bops is None:
            losses["bops/net"] = spec.lam * log_bops
        else:
            over = log_bops - math.log(target_bops)
            losses["bops/net"] = spec.lam * (over.abs() if spec.bops_match else over.clamp_min(0))
        return losses
    return objective


def freeze(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The compact model: each layer at the bits its hard gates chose, closed channels removed,
    the quantize_ record rewritten with per-layer widths so the file rebuilds it."""
    record_layer_bits(model, freeze_chosen_bits_(model))
    if gates_of(model) is not None:
        forget_kept_(model)
        return remove_closed(model, example)
    return copy.deepcopy(model)


def _finetune_cfg(ctx: RunContext, spec):
    return ctx.recipe.train.multistep(spec.finetune_epochs, spec.finetune_lr, spec.finetune_milestones)


def _search_cfg(ctx: RunContext, spec, epochs=None):
    return ctx.recipe.train.model_copy(update={"epochs": epochs or spec.search_epochs, "lr": spec.search_lr})


def _run_sbs(ctx: RunContext, spec, start, channels: str, tag: str, target_bops: float | None):
    """Search from a copy of `start` (quantized at the largest width, warmed up), then freeze."""
    model, gates, quantizers, graph = build_searching(ctx, copy.deepcopy(start), spec, channels)
    objective = sbs_objective(spec, model, graph, gates, target_bops)
    ctx.train_stage(f"sbs-{tag}search", {"net": model}, objective, cfg=_search_cfg(ctx, spec),
                    callbacks=[SearchControl(quantizers, gates, spec.max_prune_ratio), WidthLog(quantizers)],
                    param_options={"gate": {"weight_decay": 0.0, **({"lr": spec.threshold_lr} if spec.threshold_lr else {})}})
    if spec.input_bits == "batch":
        model.eval()
        with torch.no_grad():   # the code's choice: each input's bits from the last batch it saw (one training batch)
            model(next(iter(ctx.eval_loader("train")))[0])
    return freeze(model, torch.zeros(1, *ctx.input_size, device=ctx.device))


def _preflight(ctx: RunContext) -> None:
    spec = sbs_spec(ctx)
    graph = traced_graph(ctx, "sbs")
    check_group_size(graph, channel_groups(graph, spec.channels), spec.group_size)


@register_method("sbs", sections={"sbs": SbsSpec}, preflight=_preflight)
def sbs(ctx: RunContext) -> None:
    spec = sbs_spec(ctx)
    base = ctx.pretrained()
    fp_bops = cost.profile(base, ctx.input_size).bops

    four = None   # the uniform 4-bit model: a control, and what bops_target '4bit' measures
    if "uniform4" in spec.controls or spec.bops_target == "4bit":
        four = build_quantized(ctx, base, spec, bits=4)
    if spec.bops_target == "4bit":
        target = cost.profile(four, ctx.input_size).bops
    else:
        target = None if spec.bops_target is None else spec.bops_target * fp_bops

    def record(name, net, best, stage, control=None, searched=True):
        row = ctx.record(name, net, best_val(best, "net") if best else None, stage=stage, control=control)
        row["bops_ratio"] = fp_bops / row["bops"]
        if searched and target is not None:
            row["bops_target_ratio"] = fp_bops / target
        return row

    controls = [f"sbs/{'4bit' if c == 'uniform4' else 'bits-only'}" for c in spec.controls]
    # the start of both searches (bits-only's too: with every gate open the same network), warmed up once
    start = build_quantized(ctx, base, spec)
    ctx.record_init("sbs/init", start, stage="sbs-warmup" if spec.warmup_epochs else "sbs-search")
    if spec.warmup_epochs:
        ctx.train_stage("sbs-warmup", {"net": start}, cfg=_search_cfg(ctx, spec, spec.warmup_epochs))
    compact = _run_sbs(ctx, spec, start, spec.channels, "", target)
    record("sbs/searched", compact, None, "sbs-search")
    best = ctx.train_stage("sbs-finetune", {"net": compact}, cfg=_finetune_cfg(ctx, spec)) \
        if spec.finetune_epochs else None
    record("sbs/compressed", compact, best, "sbs-finetune", control=controls or None)
    if "bits_only" in spec.controls:
        bits_only = _run_sbs(ctx, spec, start, "none", "bits-only-", target)
        best = ctx.train_stage("sbs-bits-only-finetune", {"net": bits_only}, cfg=_finetune_cfg(ctx, spec)) \
            if spec.finetune_epochs else None
        record("sbs/bits-only", bits_only, best, "sbs-bits-only-finetune")
    if "uniform4" in spec.controls:   # QAT for as many epochs as warm-up and search together
        ctx.record_init("sbs/init-4bit", four, stage="sbs-4bit-search")
        ctx.train_stage("sbs-4bit-search", {"net": four}, cfg=_search_cfg(ctx, spec, spec.warmup_epochs + spec.search_epochs))
        best = ctx.train_stage("sbs-4bit-finetune", {"net": four}, cfg=_finetune_cfg(ctx, spec)) \
            if spec.finetune_epochs else None
        record("sbs/4bit", four, best, "sbs-4bit-finetune", searched=False)
