"""pdd: pruning during distillation (Dan et al. 2024; methods.md §3).

    method: pdd
    model: resnet20                         # the student
    pdd: {teacher: resnet56, epochs: 50, finetune_epochs: 150}

Sign gates on the student (prune/gates.py: g = 1[m > 0], ApproxSign gradient; all open at the
start, m = |N(0, 0.001²)|) are trained with its weights while it is distilled from a frozen
teacher: alpha CE + (1 - alpha) T² KL(teacher || student). Where the gates sit is the paper's
(`gate_placement: paper`): on a tandem ResNet one gate per block, on its output
(prune/block_gates.py); on a model without residual streams (VGG) one per conv output, which is
one per channel group. The gates of the best-validation epoch decide which channels stay; they
are removed physically and the smaller student is fine-tuned with CE.

Stages (each resumable): `pdd-teacher` (when the teacher is trained here), `pdd-distill` (the
gated student and, side by side on the same batches with one teacher forward, its controls:
the student distilled without gates and the student trained alone with CE), `pdd-finetune`
(the pruned student, the L1 control and the student alone, CE). Rows: `pdd/init` (the gated
student as distillation starts), `pdd/teacher`,
`pdd/student` (alone, same total epochs), `pdd/kd` (distilled, no gates, full width),
`pdd/pruned` and its control `pdd/l1-control` (the distilled twin pruned by filter L1 norm to
PDD's widths, so the same MACs, and fine-tuned the same). Pruned rows carry `macs_reduction` / `params_reduction` against the unpruned
student.
"""
from __future__ import annotations

import copy
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import cost
from ..context import RunContext
from ..distill.losses import hinton_kd
from ..errors import CheckpointError, RecipeError, TandemError
from ..fields import ArchSpec, Fraction, StageMilestones
from ..prune import ChannelPruner
from ..prune.block_gates import block_gate_, remove_blocks, residual_blocks
from ..prune.gates import gate_, gates_of, remove_closed
from . import best_val, register_method, traced_graph

StudentMacs = Fraction("(0, 1]", "macs_target is the fraction of the student's MACs that remain")


class PddSpec(BaseModel):
    """Defaults are the released code's (methods.md §3.2-3.5); [INFER] choices are switches."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # None: the recipe's own model trained as the baseline (or model.checkpoint) teaches
    teacher: Optional[ArchSpec] = None   # a registered model, as `model:`; trained here
    teacher_checkpoint: Optional[str] = None        # a model file: the teacher, not trained here
    student_init: Literal["scratch", "pretrained"] = "scratch"   # [UNKNOWN]; pretrained: the baseline's weights
    alpha: float = Field(0.6, ge=0, le=1)           # weight of CE; 1 - alpha weighs the KD term
    temperature: float = Field(3.0, gt=0)
    kd_mode: Literal["hinton", "ce_only"] = "hinton"   # ce_only: what the released code trained (§3.3)
    # paper: a gate per block output on a tandem ResNet, per conv output without residual streams
    # (VGG); groups: a gate per channel group of the channel graph (block-internal and streams)
    gate_placement: Literal["paper", "groups"] = "paper"
    gate_init: Literal["open", "random"] = "open"   # [INFER] open: m = |N(0, init_std²)|; random: the code's
    init_std: float = Field(1e-3, gt=0)             # scale of the gate init (gate_init)
    epochs: int = Field(50, ge=1)                   # distillation with gates
    batch_size: Optional[int] = Field(None, ge=1)   # of both PDD stages (None: train.batch_size; paper 256)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(5e-3, ge=0)         # on weights and gates alike, as the code
    milestones: StageMilestones = Field(default_factory=lambda: [0.4, 0.8])   # fractions of epochs (20, 40 of 50)
    finetune_epochs: int = Field(150, ge=0)
    finetune_lr: float = Field(0.01, gt=0)
    finetune_milestones: StageMilestones = Field(default_factory=lambda: [1 / 3, 2 / 3])   # 50, 100 of 150
    inherit: Literal["kept", "reinit"] = "kept"     # reinit: BN, biases and FC re-initialised, as the code
    macs_target: Optional[StudentMacs] = None       # beyond the paper: a budget, fraction of the student's MACs
    macs_weight: Optional[float] = Field(None, gt=0)   # its penalty's weight (default 1.0)
    controls: list[Literal["student", "kd", "l1"]] = Field(default_factory=lambda: ["student", "kd", "l1"])

    @model_validator(mode="after")
    def _no_dead_settings(self):
        if self.macs_weight is not None and self.macs_target is None:
            raise ValueError("pdd.macs_weight weighs the pdd.macs_target penalty; set macs_target too, or drop macs_weight")
        if self.kd_mode == "ce_only":
            unused = [f"pdd.{k}" for k in ("teacher", "teacher_checkpoint") if getattr(self, k) is not None]
            if unused or "kd" in self.controls:
                what = ", ".join(unused) or "pdd.controls 'kd' (a distilled twin)"
                raise ValueError(f"pdd.kd_mode ce_only trains without a teacher, so {what} would have no effect")
        if len(set(self.controls)) != len(self.controls):
            raise ValueError(f"pdd.controls {self.controls} names one twice")
        return self


def pdd_spec(ctx: RunContext) -> PddSpec:
    return ctx.recipe.pdd or PddSpec()


def _schedule(ctx: RunContext, spec: PddSpec, epochs: int, lr: float, milestones: list[float]):
    return ctx.recipe.train.multistep(epochs, lr, milestones, weight_decay=spec.weight_decay,
                                      batch_size=spec.batch_size or ctx.recipe.train.batch_size)


def _example(ctx: RunContext):
    return torch.zeros(1, *ctx.input_size, device=ctx.device)


def _preflight(ctx: RunContext) -> None:
    """Before the run folder is written: the student must be prunable, the teacher file must fit the data."""
    spec = pdd_spec(ctx)
    graph = traced_graph(ctx, "pdd", "the student model")
    _check_placement(ctx, spec, graph)
    if spec.teacher_checkpoint:
        from ..engine.checkpoint import read_model_file
        try:
            _, meta = read_model_file(spec.teacher_checkpoint)
        except CheckpointError as exc:
            raise TandemError(f"pdd.teacher_checkpoint: {exc}") from None
        config = meta.get("config") or {}
        for key, want in (("num_classes", ctx.data.num_classes), ("in_channels", ctx.data.in_channels)):
            if config.get(key) != want:
                raise TandemError(f"pdd.teacher_checkpoint = {spec.teacher_checkpoint!r}: the teacher has "
                                  f"{key} = {config.get(key)}, the data {ctx.recipe.dataset.name!r} has {want}")
        if spec.teacher is not None and spec.teacher.name != config.get("name"):
            raise TandemError(f"pdd.teacher = {spec.teacher.name!r} but pdd.teacher_checkpoint holds a "
                              f"{config.get('name')!r}; give one of them")
    if ctx.recipe.model.checkpoint and spec.teacher is not None and spec.student_init == "scratch" \
            and ctx.recipe.methods == ["pdd"]:
        raise RecipeError("recipe error: model.checkpoint would have no effect: pdd.teacher is set and the student "
                          "starts from scratch; drop it, or set pdd.student_init: pretrained")


def _block_gated(spec: PddSpec, model: nn.Module) -> bool:
    """Whether the student gets one gate per residual block (the paper's ResNet masks) rather
    than one per channel group (the paper's VGG masks, and `gate_placement: groups`)."""
    return spec.gate_placement == "paper" and residual_blocks(model) is not None


def _check_placement(ctx: RunContext, spec: PddSpec, graph) -> None:
    """The paper's placement needs tandem's blocks on a model with residual streams (channel
    groups that several layers' outputs feed, tied by an addition)."""
    if spec.gate_placement != "paper":
        return
    model = graph.model
    if residual_blocks(model) is not None:
        try:
            block_gate_(copy.deepcopy(model), _example(ctx))
        except TandemError as exc:
            raise TandemError(f"pdd.gate_placement = 'paper': {exc}; or set pdd.gate_placement: groups") from None
        return
    tied = next((g for g in graph.groups if len(g.of_kind("out")) > 1), None)
    if tied is not None:
        producers = ", ".join(m.module for m in tied.of_kind("out")[:2])
        raise RecipeError(f"recipe error: pdd.gate_placement = 'paper' puts one gate on each block output of tandem's "
                          f"ResNets; the student {ctx.recipe.model.name!r} has residual streams ({producers} are "
                          f"added) but is not built from tandem's blocks: set pdd.gate_placement: groups (a gate "
                          f"per channel group)")


def _teacher(ctx: RunContext, spec: PddSpec) -> nn.Module | None:
    if spec.kd_mode == "ce_only":
        return None
    if spec.teacher is None and spec.teacher_checkpoint is None:
        return ctx.pretrained()
    if spec.teacher_checkpoint:
        from ..engine import load_model
        net = load_model(spec.teacher_checkpoint)[0].to(ctx.device)
        ctx.record("pdd/teacher", net, stage="pdd-teacher")
        return net
    t = spec.teacher
    net = ctx.create_model(name=t.name, widths=t.widths, **t.options)
    best = ctx.train_stage("pdd-teacher", {"teacher": net})
    ctx.record("pdd/teacher", net, best["teacher"]["val_top1"], stage="pdd-teacher")
    return net


def pdd_objective(spec: PddSpec, gated: str, gates=None, full_macs: float | None = None):
    """PDD's loss for the gated student and the unmasked twin (`kd`): alpha CE + (1 - alpha)
    T² KL(teacher || student) (kd_mode hinton) or alpha CE (ce_only: the released code's
    effective loss); plain CE for the student trained alone; with macs_target, the gated
    student (its `gates`) also gets macs_weight * max(0, log(MACs / (macs_target * full_macs)))."""
    def objective(outputs, y, x):
        losses = {}
        for name, z in outputs.items():
            if name == "teacher":
                continue
            if name == "student":
                losses["ce/student"] = F.cross_entropy(z.float(), y)
            elif spec.kd_mode == "hinton":
                for k, v in hinton_kd(z, outputs["teacher"], y, alpha=1 - spec.alpha,
                                      temperature=spec.temperature).items():
                    losses[f"{k}/{name}"] = v
            else:
                losses[f"ce/{name}"] = spec.alpha * F.cross_entropy(z.float(), y)
        if spec.macs_target is not None:
            macs = gates.macs()
            over = torch.log(macs / (spec.macs_target * full_macs))
            losses[f"macs/{gated}"] = (spec.macs_weight or 1.0) * over.clamp_min(0)
        return losses
    return objective


def l1_at_widths(net: nn.Module, example: torch.Tensor, counts: dict[str, int]) -> nn.Module:
    """`net` with, in each group, its `counts[group]` channels of smallest filter L1 norm removed."""
    pruner = ChannelPruner(net, example, "l1", ratio=0.0)
    scores = pruner.scores()
    removed = {g: scores[g].argsort()[:n].sort().values.cpu() for g, n in counts.items() if n}
    return pruner.apply(removed)


def l1_at_block_widths(net: nn.Module, kept: dict[str, int]) -> nn.Module:
    """`net` pruned the paper's way (remove_blocks) to `kept[block]` channels per block: those
    whose conv2 filters (which make the block's output) have the largest L1 norm, the same
    indices in conv1, as one mask drives both convs of a block in the paper's code."""
    keep = {}
    for block, n in kept.items():
        norms = net.get_submodule(f"{block}.conv2").weight.detach().abs().sum((1, 2, 3))
        keep[block] = norms.argsort(descending=True)[:n].cpu()
    return remove_blocks(net, keep)


class GateLog:
    """Callback: after each epoch's training, the gated student's kept channels and MACs
    fraction go to metrics.jsonl (how the signs move is what PDD learns)."""

    def __init__(self, gates, full_macs: float):
        self.gates, self.full_macs = gates, full_macs

    @torch.no_grad()
    def before_validation(self, trainer, epoch: int) -> None:
        trainer.log.write({"stage": trainer.stage, "epoch": epoch, "gates_kept": self.gates.kept(),
                           "gates_macs_fraction": self.gates.macs().item() / self.full_macs})


def _reinit(net: nn.Module) -> None:
    """The released code's inheritance: only conv weights of kept channels survive; BN, biases
    and linear layers start again."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_parameters()
        elif isinstance(m, nn.Linear):
            m.reset_parameters()
        elif isinstance(m, nn.Conv2d) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _reductions(row: dict, student: dict) -> dict:
    row["macs_reduction"] = 1 - row["macs"] / student["macs"]
    row["params_reduction"] = 1 - row["params"] / student["params"]
    return row


@register_method("pdd", sections={"pdd": PddSpec}, preflight=_preflight)
def pdd(ctx: RunContext) -> None:
    spec = pdd_spec(ctx)
    teacher = _teacher(ctx, spec)
    start = copy.deepcopy(ctx.pretrained()) if spec.student_init == "pretrained" else ctx.create_model()
    start.to(ctx.device)
    example = _example(ctx)
    full = cost.profile(start, ctx.input_size)
    full = {"macs": full.macs, "params": full.params}

    # 1. distillation: the gated student, and side by side its unmasked twin and the student alone
    gated = copy.deepcopy(start)
    torch.manual_seed(ctx.recipe.seed)
    blocks = _block_gated(spec, start)
    options = {"init_std": spec.init_std, "init": spec.gate_init}
    gates = block_gate_(gated, example, **options) if blocks else gate_(gated, example, "sign", **options)
    nets = {"pdd": gated}
    if {"kd", "l1"} & set(spec.controls):
        nets["kd"] = copy.deepcopy(start)
    if "student" in spec.controls:
        nets["student"] = copy.deepcopy(start)
    objective = pdd_objective(spec, "pdd", gates, full["macs"])
    ctx.record_init("pdd/init", gated, stage="pdd-distill")
    best = ctx.train_stage("pdd-distill", nets, objective, cfg=_schedule(ctx, spec, spec.epochs, spec.lr, spec.milestones), callbacks=[GateLog(gates, full["macs"])],
                           frozen={"teacher": teacher} if teacher is not None else None)
    if "kd" in spec.controls:
        _reductions(ctx.record("pdd/kd", nets["kd"], best_val(best, "kd"), stage="pdd-distill"), full)

    # 2. the best epoch's closed gates removed; the L1 control: the distilled twin pruned to the
    #    same widths (so the same MACs), its channels chosen by filter L1 norm instead of by gates
    closed = gates_of(gated).closed()
    pruned = remove_closed(gated, example)   # block gates: the paper's removal (block_gates.remove_blocks)
    if spec.inherit == "reinit":
        _reinit(pruned)
    finetune_nets = {"pruned": pruned}
    if "l1" in spec.controls:
        finetune_nets["l1-control"] = l1_at_block_widths(nets["kd"], gates_of(gated).kept()) if blocks else \
            l1_at_widths(nets["kd"], example, {g: len(i) for g, i in closed.items()})
    if "student" in spec.controls:
        finetune_nets["student"] = nets["student"]
    best = ctx.train_stage("pdd-finetune", finetune_nets, cfg=_schedule(
        ctx, spec, spec.finetune_epochs, spec.finetune_lr, spec.finetune_milestones)) \
        if spec.finetune_epochs else {n: {"val_top1": None} for n in finetune_nets}

    row = _reductions(ctx.record("pdd/pruned", pruned, best_val(best, "pruned"), stage="pdd-finetune",
                                 control="pdd/l1-control" if "l1" in spec.controls else None), full)
    row["kept"] = gates_of(gated).kept()
    if spec.macs_target is not None:
        row["macs_target"] = spec.macs_target
    if "l1" in spec.controls:
        _reductions(ctx.record("pdd/l1-control", finetune_nets["l1-control"], best_val(best, "l1-control"),
                               stage="pdd-finetune"), full)
    if "student" in spec.controls:
        _reductions(ctx.record("pdd/student", nets["student"], best_val(best, "student"), stage="pdd-finetune"), full)
