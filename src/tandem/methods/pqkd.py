"""pqkd: distillation after pruning and quantization (Bao, Liu, Zhang 2019; methods.md §2.3).

    method: pqkd
    prune:   {criterion: l1, macs_target: 0.5, finetune_epochs: 3}    # or criterion: magnitude
    quant:   {method: lsq, w_bits: 4, a_bits: 4, epochs: 3}            # or method: kmeans
    distill: {alpha: 0.9, temperature: 4, epochs: 5, control: true}

The teacher T is `ctx.pretrained()`, left uncompressed. A copy is pruned and fine-tuned as
the `prune` method does it (stage `pqkd-finetune`), quantized, calibrated and QAT / centroid
fine-tuned with cross-entropy only (`pqkd-quantize`), then distilled from T with Hinton KD
(`pqkd-distill`). Unstructured masks (criterion `magnitude`) are held on weights and gradients
through every later stage, and the quantizers stay in the loop while distilling.
Rows: `pqkd/pruned`, `pqkd/quantized`, `pqkd/distilled` and, with `distill.control`,
`pqkd/no-kd`: the same KD schedule with cross-entropy only, trained side by side, so the gain
of distillation is measured against the extra epochs alone. Stage names are prefixed `pqkd-`
so pqkd can follow other methods on one ctx.
"""
from __future__ import annotations

import copy

import torch

from .. import cost
from ..context import RunContext
from ..distill.objectives import kd_objective
from ..distill.spec import DistillSpec
from ..errors import TandemError
from ..prune import KeepMasked, PruneSpec
from ..quant import QUANT_LAYERS, calibrate, quantize_
from ..quant.registry import zero_keeping
from . import best_val, channel_pruning_preflight, register_method
from .prune import build_pruned, finetune_cfg
from .quantize import QuantSection


def _prune(ctx: RunContext, spec: PruneSpec):
    """The `prune` method's pruning (`build_pruned`, stages `pqkd-*`) and its CE fine-tune.
    Returns (pruned net, its last stage, per-weight masks or None when structured, best)."""
    p = build_pruned(ctx, spec, prefix="pqkd-")
    best = ctx.train_stage(p.stage, {"student": p.net}, cfg=p.cfg, callbacks=p.callbacks)
    masks = next(cb.masks for cb in p.callbacks if isinstance(cb, KeepMasked)) if p.unstructured else None
    net, stage = p.finish(best["student"]["epoch"]), p.stage
    if p.pruner is not None:   # soft: zero-and-regrow above, then fine-tune the smaller network
        stage = "pqkd-finetune"
        best = ctx.train_stage(stage, {"student": net}, cfg=finetune_cfg(ctx, spec))
    return net, stage, masks, best


@torch.no_grad()
def check_zeros_kept(net, masks: dict, method: str) -> None:
    """§2.3: pruned weights stay 0 after quantization. A quantizer whose grid has no exact 0
    (DoReFa's 2^k levels) would revive them in every forward pass; refuse it here."""
    for name, layer in net.named_modules():
        mask = masks.get(f"{name}.weight")
        if mask is None or not isinstance(layer, QUANT_LAYERS) or layer.weight_quantizer is None:
            continue
        revived = int((layer.quantized_weight()[~mask.to(layer.weight.device)] != 0).sum())
        if revived:
            raise TandemError(f"quant.method = {method!r} turns {revived} pruned (zero) weights of layer "
                              f"{name!r} nonzero; with prune.criterion = magnitude use a quantizer whose grid "
                              f"holds 0: {', '.join(zero_keeping())}")


def _control(ctx: RunContext, spec: DistillSpec) -> bool:
    """distill.control unset: on for the cheap protocols, off for `paper` (it doubles KD's cost)."""
    return spec.control if spec.control is not None else ctx.recipe.protocol != "paper"


@register_method("pqkd", sections={"prune": PruneSpec, "quant": QuantSection, "distill": DistillSpec},
                 preflight=channel_pruning_preflight("pqkd"))
def pqkd(ctx: RunContext) -> None:
    pspec = ctx.recipe.prune or PruneSpec()
    qspec = ctx.recipe.quant or QuantSection()   # defaults: LSQ W4A4, first/last layer 8 bits
    dspec = ctx.recipe.distill or DistillSpec()
    teacher = ctx.pretrained()

    def record(name, net, val, stage, control=None):
        row = ctx.record(f"pqkd/{name}", net, val, stage=stage, control=control)
        if masks is not None:
            row["nonzero_macs"] = cost.profile(net, ctx.input_size).nonzero_macs
        return row

    def keep(net):
        return [KeepMasked(net, masks)] if masks is not None else []

    # 1. prune + fine-tune
    student, stage, masks, best = _prune(ctx, pspec)
    record("pruned", student, best_val(best, "student"), stage)

    # 2. quantize + calibrate + QAT / centroid fine-tuning, CE only
    quantize_(student, qspec)
    calibrate(student, ctx.eval_loader("train"), num_batches=qspec.calib_batches)
    if masks is not None:
        check_zeros_kept(student, masks, qspec.method)
    val = None
    if qspec.mode == "qat":
        ctx.record_init("pqkd/init", student, stage="pqkd-quantize")
        cfg = ctx.recipe.train.for_stage(qspec.epochs, qspec.lr)
        best = ctx.train_stage("pqkd-quantize", {"student": student}, cfg=cfg, callbacks=keep(student))
        val = best_val(best, "student")
    quantized = record("quantized", student, val, "pqkd-quantize")

    # 3. Hinton KD from the uncompressed teacher (frozen, eval), masks and quantizers in the loop;
    #    the control trains a twin on the same batches with CE only
    nets = {"distilled": student}
    if _control(ctx, dspec):
        nets["no-kd"] = copy.deepcopy(student)
    cfg = ctx.recipe.train.for_stage(dspec.epochs, dspec.lr)
    kd = kd_objective(alpha=dspec.alpha, temperature=dspec.temperature)
    best = ctx.train_stage("pqkd-distill", nets, kd, cfg=cfg,
                           frozen={"teacher": teacher}, callbacks=[cb for n in nets.values() for cb in keep(n)])
    rows = {name: record(name, net, best_val(best, name), "pqkd-distill",
                         control="pqkd/no-kd" if name == "distilled" and "no-kd" in nets else None)
            for name, net in nets.items()}
    for name, row in rows.items():
        row["gain_over_quantized"] = row["top1"] - quantized["top1"]
    if "no-kd" in rows:
        rows["distilled"]["gain_over_no_kd"] = rows["distilled"]["top1"] - rows["no-kd"]["top1"]
