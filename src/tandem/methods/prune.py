"""prune: pretrained -> prune (one-shot, iterative or soft; network slimming's sparsity training
first when asked) -> fine-tune -> record the baseline and the physically smaller model.

Unstructured magnitude pruning keeps the shape; its row adds ``nonzero_macs``.
"""
from __future__ import annotations

import copy
import itertools

import torch

from .. import cost
from ..prune import ChannelPruner, KeepMasked, PruneSpec, SlimmingPenalty, SoftPruning
from ..prune.masks import apply_weight_masks, magnitude_masks
from ..prune.schedules import step_fraction
from ..engine.distributed import on_rank0
from . import register_method


def _val(best) -> float | None:
    """The stage's best validation top-1 (None when it trained no epoch: record measures it)."""
    v = best["pruned"]["val_top1"]
    return v if v is not None and v >= 0 else None


def _batches(ctx, n):
    """The first ``n`` training batches, inputs only (HRank's statistics)."""
    return [x for x, _ in itertools.islice(iter(ctx.train_loader()), n)]


@register_method("prune")
def prune_method(ctx) -> None:
    spec = ctx.recipe.prune or PruneSpec()
    base = ctx.pretrained()
    net = copy.deepcopy(base)
    train = ctx.recipe.train
    finetune = train.model_copy(update={k: v for k, v in (("epochs", spec.finetune_epochs),
                                                          ("lr", spec.finetune_lr)) if v is not None})
    target = spec.target()

    if spec.criterion == "magnitude":
        steps = spec.steps if spec.schedule == "iterative" else 1
        sparsity = target["ratio"] if target["ratio"] is not None else 1 - target["macs_target"]
        for k in range(1, steps + 1):
            masks = magnitude_masks(net, 1 - (1 - sparsity) ** (k / steps), spec.scope or "layer")
            apply_weight_masks(net, masks)
            cfg = finetune.model_copy(update={"epochs": max(1, finetune.epochs // steps)}) if steps > 1 else finetune
            best = ctx.train_stage(f"finetune{k if steps > 1 else ''}", {"pruned": net}, cfg=cfg,
                                   callbacks=[KeepMasked(net, masks)])
        row = ctx.record("pruned", net, _val(best))
        row["nonzero_macs"] = cost.profile(net, ctx.input_size).nonzero_macs
        return

    example = torch.zeros(1, *ctx.input_size, device=ctx.device)
    options = dict(scope=spec.scope, max_ratio=spec.max_ratio, normalize=spec.normalize,
                   criterion_options={"batches": spec.hrank_batches} if spec.criterion == "hrank" else None)
    data = _batches(ctx, spec.hrank_batches) if spec.criterion == "hrank" else None

    if spec.sparsity_epochs:
        cfg = train.model_copy(update={"epochs": spec.sparsity_epochs})
        ctx.train_stage("sparsity", {"pruned": net}, cfg=cfg, callbacks=[SlimmingPenalty(spec.slimming_penalty)])

    if spec.schedule == "soft":
        pruner = ChannelPruner(net, example, spec.criterion, **target, data=data, **options)
        cfg = finetune.model_copy(update={"epochs": spec.soft_epochs})
        ctx.train_stage("soft", {"pruned": net}, cfg=cfg, callbacks=[SoftPruning(pruner)])
        net = pruner.apply(on_rank0(pruner.plan))
        best = ctx.train_stage("finetune", {"pruned": net}, cfg=finetune)
    else:
        steps = spec.steps if spec.schedule == "iterative" else 1
        for k in range(1, steps + 1):
            if target["macs_target"] is not None:
                step = {"ratio": None, "macs_target": step_fraction(target["macs_target"], steps)}
            else:
                step = {"ratio": 1 - step_fraction(1 - target["ratio"], steps), "macs_target": None}
            pruner = ChannelPruner(net, example, spec.criterion, **step, data=data, **options)
            net = pruner.apply(on_rank0(pruner.plan))
            cfg = finetune.model_copy(update={"epochs": max(1, finetune.epochs // steps)}) if steps > 1 else finetune
            best = ctx.train_stage(f"finetune{k if steps > 1 else ''}", {"pruned": net}, cfg=cfg)
    ctx.record("pruned", net, _val(best))
