"""prune: pretrained -> prune (one-shot, iterative or soft; network slimming's sparsity training
first when asked) -> fine-tune -> record the baseline and the physically smaller model.

An unstructured criterion (magnitude) keeps the shape; its row adds ``nonzero_macs``. A
data-driven criterion (``needs_data``) scores on the first training batches.

`build_pruned` is the part other methods share (mutual, independent): it prunes a copy of the
pretrained network up to its last training stage and says how that stage must run.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch

from .. import cost
from ..context import RunContext
from ..prune import ChannelPruner, KeepMasked, PruneSpec, SlimmingPenalty, SoftPruning, get_criterion
from ..prune.masks import apply_weight_masks
from ..prune.schedules import step_fraction
from ..engine.distributed import on_rank0
from . import best_val, channel_pruning_preflight, register_method


def _batches(ctx: RunContext, n):
    """The first ``n`` training batches, inputs only (a data-driven criterion's statistics)."""
    return [x for x, _ in itertools.islice(iter(ctx.train_loader()), n)]


def finetune_cfg(ctx: RunContext, spec: PruneSpec):
    """train: with the prune section's fine-tune epochs / lr where given."""
    return ctx.recipe.train.for_stage(spec.finetune_epochs, spec.finetune_lr)


@dataclass
class PrunedNet:
    """A pruned copy of the pretrained network, ready for its last training stage.

    One-shot/iterative: `net` is already physically smaller (iterative: every step but the last
    was fine-tuned). Soft: `net` keeps its shape; `callbacks` zero and regrow its filters during
    the last stage and `finish()` then removes them. Unstructured: `callbacks` hold the masks."""
    net: torch.nn.Module
    stage: str                      # the name the prune method gives the last stage
    cfg: object                     # that stage's schedule (a TrainSpec)
    callbacks: list = field(default_factory=list)   # run them while `net` trains
    pruner: ChannelPruner | None = None             # soft schedule only
    unstructured: bool = False

    def finish(self, best_epoch: int | None = None) -> torch.nn.Module:
        """The network to record: soft pruning's zeroed filters removed (those zeroed after
        `best_epoch`, the state the stage selected; a resumed stage restores what each epoch
        zeroed from its checkpoint); otherwise `net`."""
        if self.pruner is None:
            return self.net
        soft = next(cb for cb in self.callbacks if isinstance(cb, SoftPruning))
        removed = soft.by_epoch.get(best_epoch)
        return self.pruner.apply(removed if removed is not None else on_rank0(self.pruner.plan))


def build_pruned(ctx: RunContext, spec: PruneSpec, prefix: str = "", soft_zero_bn: bool = False,
                 base: torch.nn.Module | None = None) -> PrunedNet:
    """Prune a copy of `base` (default `ctx.pretrained()`) by `spec`; the stages before the last one run here
    (named `prefix` + sparsity / finetune<k>), the last one is the caller's to run.
    `soft_zero_bn`: the soft schedule also zeroes the BN of the zeroed filters, for a caller
    that records the removed network without fine-tuning it (SoftPruning.zero_bn)."""
    net = copy.deepcopy(base if base is not None else ctx.pretrained())
    train = ctx.recipe.train
    finetune = finetune_cfg(ctx, spec)
    target = spec.target()
    criterion_options = spec.options_for_criterion()
    criterion = get_criterion(spec.criterion, **criterion_options)

    if not criterion.structured:
        steps = spec.steps if spec.schedule == "iterative" else 1
        sparsity = target["ratio"] if target["ratio"] is not None else 1 - target["macs_target"]
        for k in range(1, steps + 1):
            masks = criterion.masks(net, 1 - (1 - sparsity) ** (k / steps), spec.scope or criterion.default_scope)
            apply_weight_masks(net, masks)
            cfg = finetune.model_copy(update={"epochs": max(1, finetune.epochs // steps)}) if steps > 1 else finetune
            stage = f"{prefix}finetune{k if steps > 1 else ''}"
            if k < steps:
                ctx.train_stage(stage, {"pruned": net}, cfg=cfg, callbacks=[KeepMasked(net, masks)])
        return PrunedNet(net, stage, cfg, [KeepMasked(net, masks)], unstructured=True)

    example = torch.zeros(1, *ctx.input_size, device=ctx.device)
    options = dict(scope=spec.scope, max_ratio=spec.max_ratio, normalize=spec.normalize, ignore=spec.ignore,
                   round_to=spec.round_to, criterion_options=criterion_options)
    data = _batches(ctx, spec.data_batches()) if criterion.needs_data else None

    if spec.sparsity_epochs:
        cfg = train.model_copy(update={"epochs": spec.sparsity_epochs})
        ctx.train_stage(f"{prefix}sparsity", {"pruned": net}, cfg=cfg,
                        callbacks=[SlimmingPenalty(spec.slimming_penalty)])

    if spec.schedule == "soft":
        pruner = ChannelPruner(net, example, spec.criterion, **target, data=data, **options)
        cfg = finetune.model_copy(update={"epochs": spec.soft_epochs})
        return PrunedNet(net, f"{prefix}soft", cfg, [SoftPruning(pruner, zero_bn=soft_zero_bn)], pruner=pruner)

    steps = spec.steps if spec.schedule == "iterative" else 1
    for k in range(1, steps + 1):
        if target["macs_target"] is not None:
            step = {"ratio": None, "macs_target": step_fraction(target["macs_target"], steps)}
        else:
            step = {"ratio": 1 - step_fraction(1 - target["ratio"], steps), "macs_target": None}
        pruner = ChannelPruner(net, example, spec.criterion, **step, data=data, **options)
        net = pruner.apply(on_rank0(pruner.plan))
        cfg = finetune.model_copy(update={"epochs": max(1, finetune.epochs // steps)}) if steps > 1 else finetune
        stage = f"{prefix}finetune{k if steps > 1 else ''}"
        if k < steps:
            ctx.train_stage(stage, {"pruned": net}, cfg=cfg)
    return PrunedNet(net, stage, cfg)


@register_method("prune", sections={"prune": PruneSpec}, preflight=channel_pruning_preflight("prune"))
def prune_method(ctx: RunContext) -> None:
    spec = ctx.recipe.prune or PruneSpec()
    p = build_pruned(ctx, spec)
    best = ctx.train_stage(p.stage, {"pruned": p.net}, cfg=p.cfg, callbacks=p.callbacks)
    if p.unstructured:
        row = ctx.record("pruned", p.net, best_val(best, "pruned"))
        row["nonzero_macs"] = cost.profile(p.net, ctx.input_size).nonzero_macs
        return
    net = p.finish(best["pruned"]["epoch"])
    if p.pruner is not None:   # soft: the zero-and-regrow stage above, then a fine-tune of the smaller net
        best = ctx.train_stage("finetune", {"pruned": net}, cfg=finetune_cfg(ctx, spec))
    ctx.record("pruned", net, best_val(best, "pruned"))
