"""mutual and independent: a pruned peer P and a quantized peer Q, trained together by Deep
Mutual Learning (Li, Chen, Wang 2023; methods.md §1.3-1.4) or, as the control, each alone.

    method: mutual            # or: independent
    prune: {criterion: fpgm, macs_target: 0.5, schedule: soft}
    quant: {method: lsq, w_bits: 4, a_bits: 4}
    mutual: {update: sequential, kd_weight: 0.0, feature_weight: 0.0}
    mutual: {init: scratch, kl_weight: {pruned: 0.3, quantized: 1.0}, kl_rampup_epochs: 2}

Both methods build the same peers from `ctx.pretrained()` (`mutual.init: scratch`: from the
randomly initialised model instead, as DML trains its cohort): P by the `prune` method's own
`build_pruned` (one-shot / iterative pruning happens before the joint phase; a soft schedule
zeroes and regrows P's filters during it and P is made physically smaller at the end), Q by the
`quantize` method's `build_quantized`. The joint phase is one training stage of both nets with
the same data order, epochs, schedule, lr and seed; only the objective differs. Both methods can
run on one RunContext (stage and record names are prefixed `mutual-` / `independent-`; the
preparation stages of P, `peers-*`, are shared so both start from the same P).
"""
from __future__ import annotations


import torch
import torch.nn as nn

from .. import cost
from ..context import RunContext
from ..distill import FeatureTap, HintLoss
from ..distill.objectives import KLRamp, dml_objective
from ..distill.spec import MutualSpec
from ..errors import RecipeError
from ..modes import eval_mode
from ..prune import PruneSpec, criterion_class
from . import best_val, channel_pruning_preflight, register_method
from .prune import PrunedNet, build_pruned
from .quantize import QuantSection, build_quantized

# both methods read the same sections: the peers (prune, quant) and the joint phase (mutual)
PEER_SECTIONS = {"prune": PruneSpec, "quant": QuantSection, "mutual": MutualSpec}


def mutual_spec(ctx: RunContext) -> MutualSpec:
    return ctx.recipe.mutual or MutualSpec()


def joint_cfg(ctx: RunContext):
    """The joint phase's schedule: train: with mutual.epochs / mutual.lr where given (both
    methods use it, so the control gets exactly the same budget)."""
    ms = mutual_spec(ctx)
    return ctx.recipe.train.for_stage(ms.epochs, ms.lr)


def check_scratch(spec: PruneSpec) -> None:
    """From scratch, the weights a criterion would rank are random: only a choice that does not
    depend on them (per-layer counts, or soft pruning during training) means anything. Called
    when a recipe is validated, so nothing is created before the refusal."""
    why = None
    if spec.schedule == "iterative":
        why = "prune.schedule = iterative fine-tunes P alone between steps"
    elif spec.sparsity_epochs:
        why = f"prune.sparsity_epochs = {spec.sparsity_epochs} trains P alone first"
    elif spec.schedule == "one_shot" and (spec.scope or criterion_class(spec.criterion).default_scope) == "global":
        why = "global ranking would compare random weights across layers (use prune.scope=layer)"
    if why:
        raise RecipeError(f"recipe error: mutual.init = 'scratch': {why}")


def check_recipe(recipe) -> None:
    """Both methods' recipe-level check: `mutual.init: scratch` refuses the pruning choices that
    need trained weights (check_scratch), when the recipe is validated."""
    if recipe.mutual is not None and recipe.mutual.init == "scratch":
        check_scratch(recipe.prune or PruneSpec())


def build_peers(ctx: RunContext) -> tuple[PrunedNet, nn.Module]:
    """P (pruned by the recipe's `prune:` section) and Q (quantized by its `quant:` section), from
    the pretrained model or, with `mutual.init: scratch`, from one random initialisation (the
    run's seed): P is then a thinner network (one-shot, layer scope: each layer keeps the same
    count whatever the criterion) or soft-pruned while it learns, as SFP trains from scratch."""
    spec = ctx.recipe.prune or PruneSpec()
    base = None
    if mutual_spec(ctx).init == "scratch":
        check_scratch(spec)
        base = ctx.create_model()
    # soft schedule: no fine-tune follows the removal, so the zeroed network must evaluate as
    # the removed one will (SoftPruning.zero_bn); the channels removed are those of the best epoch
    p = build_pruned(ctx, spec, prefix="peers-", soft_zero_bn=True, base=base)
    q = build_quantized(ctx, ctx.recipe.quant or QuantSection(), base=base)
    return p, q


class WithAdapters(nn.Module):
    """P and its hint adapters as one module, so P's optimiser trains the adapters and P's
    stage checkpoint holds them; the forward pass is P's alone."""

    def __init__(self, net: nn.Module, hints: nn.ModuleList):
        super().__init__()
        self.net, self.hints = net, hints

    def forward(self, x):
        return self.net(x)


def _feature_hints(ctx: RunContext, ms: MutualSpec, p: nn.Module, q: nn.Module):
    """Taps on `feature_layers` of both peers and one HintLoss per layer (P's feature, through a
    1x1 adapter when the widths differ, regressed on Q's detached feature)."""
    if not ms.feature_layers:
        raise RecipeError(f"recipe error: mutual.feature_weight = {ms.feature_weight} needs "
                          f"mutual.feature_layers (module names of both peers, e.g. [layer2, layer3])")
    tap_p, tap_q = FeatureTap(p, ms.feature_layers), FeatureTap(q, ms.feature_layers)
    example = torch.zeros(2, *ctx.input_size, device=ctx.device)
    with torch.no_grad():
        for net in (p, q):
            with eval_mode(net.to(ctx.device)):
                net(example)
    hints = nn.ModuleList(HintLoss(tap_p.features[n].shape[1], tap_q.features[n].shape[1])
                          for n in ms.feature_layers)
    return tap_p, tap_q, hints


def _record_starts(ctx: RunContext, method: str, p: PrunedNet, q: nn.Module) -> None:
    """Both peers as the joint phase starts (`<method>/init-pruned`, `<method>/init-quantized`)."""
    for peer, net in (("pruned", p.net), ("quantized", q)):
        ctx.record_init(f"{method}/init-{peer}", net, stage=f"{method}-joint")


def _record_peers(ctx: RunContext, method: str, p: PrunedNet, q: nn.Module, best: dict) -> None:
    def control(peer):   # mutual's rows name their control when it runs too
        return f"independent/{peer}" if method == "mutual" and "independent" in ctx.recipe.methods else None
    p_net = p.finish(best["pruned"]["epoch"])
    # soft: the removal changes the network (BN shifts of removed channels), so measure val again
    row = ctx.record(f"{method}/pruned", p_net, None if p.pruner is not None else best_val(best, "pruned"),
                     stage=f"{method}-joint", control=control("pruned"))
    if p.unstructured:
        row["nonzero_macs"] = cost.profile(p_net, ctx.input_size).nonzero_macs
    ctx.record(f"{method}/quantized", q, best_val(best, "quantized"), stage=f"{method}-joint", control=control("quantized"))


@register_method("mutual", sections=PEER_SECTIONS, preflight=channel_pruning_preflight("mutual"), checks=check_recipe)
def mutual(ctx: RunContext) -> None:
    ms = mutual_spec(ctx)
    p, q = build_peers(ctx)
    p_train = p.net
    hints = None
    if ms.feature_weight > 0:
        tap_p, tap_q, modules = _feature_hints(ctx, ms, p.net, q)
        hints = (tap_p, tap_q, modules)
        p_train = WithAdapters(p.net, modules)
    _record_starts(ctx, "mutual", p, q)
    frozen = {"teacher": ctx.pretrained()} if ms.kd_weight > 0 else None   # given back unfrozen after the stage
    cfg = joint_cfg(ctx)
    ramp = KLRamp(ms.kl_rampup_epochs)
    best = ctx.train_stage("mutual-joint", {"pruned": p_train, "quantized": q},
                           dml_objective(ms, "teacher" if frozen else None, hints, ramp), cfg=cfg,
                           frozen=frozen, callbacks=[*p.callbacks, ramp], update=ms.update)
    if hints is not None:
        hints[0].remove()
        hints[1].remove()
    _record_peers(ctx, "mutual", p, q, best)


@register_method("independent", sections=PEER_SECTIONS, preflight=channel_pruning_preflight("independent"),
                 checks=check_recipe)
def independent(ctx: RunContext) -> None:
    """The control: the same P and Q, same data, epochs, schedule, lr and seed, each trained
    with cross-entropy alone (one stage, own optimisers: no term couples them)."""
    p, q = build_peers(ctx)
    _record_starts(ctx, "independent", p, q)
    cfg = joint_cfg(ctx)
    best = ctx.train_stage("independent-joint", {"pruned": p.net, "quantized": q}, cfg=cfg, callbacks=p.callbacks)
    _record_peers(ctx, "independent", p, q, best)
