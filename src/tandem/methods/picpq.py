"""picpq: the physics-inspired criterion for joint pruning and quantization (Xie et al. 2023;
methods.md §4).

    method: picpq
    model: resnet56
    picpq: {prune_away: 0.55, evaluations: 400, finetune_epochs: 400, qat_epochs: [400, 400]}

1. Filter property FP: the average rank of each conv filter's output map over `rank_batches`
   training batches of the pretrained model (the hrank criterion's statistic), computed once per
   run and kept in the run folder (`picpq/ranks.safetensors`).
2. Learned criterion: per conv layer l a pair (a_l, b_l), importance a_l FP + b_l; channels of
   tied layers (a residual stream) are scored together (the channel graph's groups, their
   producers' scores summed) and ranked globally, each group losing at most `max_ratio` of its
   channels, until the MACs fall to (1 - prune_away) of the original. (a, b) is found by
   regularized evolution (search/evolution.py); a candidate's fitness is the mean validation CE
   after `search_steps` SGD steps fine-tuning the pretrained model pruned by it. Every candidate
   is logged (`picpq/search.jsonl`) and an interrupted search resumes from the log.
3. The best candidate's pruned FP model is fine-tuned (`picpq-finetune`).
4. Bits: s_l = |W_l pruned|_1 / |W_l pretrained|_1; b_l = Bmax_l if s_l = 1 else
   Bmax_l - ceil(penalty / s_l), at least `min_bits`; weights and input activations of layer l
   both use b_l (32 = left in float: the stem and the classifier by default).
5. Two-stage QAT with the `dorefa_picpq` quantizer: activations only (`picpq-qat-a`), then
   weights and activations (`picpq-qat-b`).

Controls in the same run, same stages and epochs: `rank` (a = 1, b = 0: plain HRank ranking at
the same MACs with the same bit rule) and `l1` (filter L1 at layer scope to the same MACs,
uniform bits chosen so its BOPs come nearest PIC-PQ's). Rows: `picpq/pruned`,
`picpq/act-quantized`, `picpq/quantized` (paired with both controls), `picpq/rank-control`,
`picpq/l1-control`; each with `bops_ratio` against the baseline, the quantized ones with a
per-layer `sparsity` in `layers`.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import random
from pathlib import Path
from fnmatch import fnmatchcase
from typing import Literal, Optional, Union

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import cost
from ..engine import Trainer, cross_entropy_objective, evaluate
from ..engine.checkpoint import atomic_write
from ..engine.distributed import on_rank0
from ..errors import RecipeError
from ..prune import ChannelGraph, ChannelPruner, apply_removal, select
from ..prune.criteria import HRank
from ..quant import calibrate, quantize_
from ..search.evolution import regularized_evolution
from ..recipes import StageMilestones
from . import best_val, register_method, register_section, traced_graph


class PicpqSpec(BaseModel):
    """Defaults are the authors' code values (methods.md §4); [INFER] choices are switches."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rank_batches: int = Field(6, ge=1)
    prune_away: float = 0.55                 # fraction of the MACs removed (ResNet-56 C10; VGG-16 0.653)
    max_ratio: float = Field(0.9, ge=0, lt=1)   # safeguard 0.1: a layer keeps at least 10% of its channels
    population: int = Field(64, ge=1)
    sample: int = Field(16, ge=1)
    evaluations: int = Field(400, ge=1)
    mutate_fraction: float = Field(0.1, gt=0, le=1)   # of the layers, per mutation
    search_steps: int = Field(200, ge=1)     # tau-hat: SGD steps per candidate
    search_lr: float = Field(0.01, gt=0)
    finetune_epochs: int = Field(400, ge=0)
    finetune_lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    milestones: StageMilestones = Field(default_factory=lambda: [0.3, 0.6, 0.8])   # fractions of each stage
    gamma: float = Field(0.2, gt=0, le=1)
    penalty: float = 1 / 6                   # lambda of the bit rule
    min_bits: int = Field(2, ge=1, le=8)     # [INFER] guard
    # one Bmax per conv/linear layer in module order, or {glob: bits}; None: the paper's per model
    max_bits: Optional[Union[list[int], dict[str, int]]] = None
    qat_epochs: list[int] = Field(default_factory=lambda: [400, 400])   # [activations only, weights and activations]
    qat_lr: float = Field(0.01, gt=0)
    controls: list[Literal["rank", "l1"]] = Field(default_factory=lambda: ["rank", "l1"])

    @field_validator("prune_away")
    @classmethod
    def _away(cls, v):
        if not 0 < v < 1:
            raise ValueError("prune_away is the fraction of the MACs removed; allowed range (0, 1)")
        return v

    @field_validator("penalty")
    @classmethod
    def _penalty(cls, v):
        if v <= 0:
            raise ValueError("the bit rule's penalty factor must be > 0 (the paper: 1/6)")
        return v

    @field_validator("qat_epochs")
    @classmethod
    def _two(cls, v):
        if len(v) != 2 or min(v) < 0:
            raise ValueError("give two epoch counts [activations only, weights and activations], each >= 0")
        return v

    @model_validator(mode="after")
    def _search(self):
        if not self.sample <= self.population <= self.evaluations:
            raise ValueError(f"picpq needs sample ({self.sample}) <= population ({self.population}) "
                             f"<= evaluations ({self.evaluations})")
        return self


register_section("picpq", PicpqSpec)


def picpq_spec(ctx) -> PicpqSpec:
    return ctx.recipe.picpq or PicpqSpec()


# ---- bits ---------------------------------------------------------------------------------
def assign_bits(sparsity: float, max_bits: int, penalty: float, min_bits: int = 2) -> int:
    """methods.md §4.5: Bmax if the layer kept everything (s = 1), else Bmax - ceil(penalty / s),
    never below min_bits (32 stays float)."""
    if max_bits >= 32 or sparsity >= 1 - 1e-9:
        return max_bits
    return max(min_bits, max_bits - math.ceil(penalty / max(sparsity, 1e-9)))


def _paper_max_bits(name: str, layers: list[str]) -> list[int]:
    """§4.5's "available maximum bitwidth": CIFAR ResNets 32 for the stem, then 8 / 6 / 4 by
    stage; VGG-16 [32] + [8]x3 + [6]x3 + [4]x6; the classifier 32. Other models: 32 for the
    first layer and the classifier, 8 elsewhere [INFER]."""
    if name.startswith("resnet") and name[6:].isdigit() and name != "resnet18":
        stage_bits = {"layer1": 8, "layer2": 6, "layer3": 4}
        return [stage_bits.get(n.split(".")[0], 32) for n in layers]
    if name == "vgg16":
        convs = [8] * 3 + [6] * 3 + [4] * 6
        return [32] + convs + [32] * (len(layers) - 1 - len(convs))
    return [32] + [8] * (len(layers) - 2) + [32]


def max_bits_of(spec: PicpqSpec, model_name: str, layers: list[str]) -> dict[str, int]:
    mb = spec.max_bits
    if mb is None:
        return dict(zip(layers, _paper_max_bits(model_name, layers)))
    if isinstance(mb, list):
        if len(mb) != len(layers):
            shown = ", ".join(layers[:6]) + (" ..." if len(layers) > 6 else "")
            raise RecipeError(f"recipe error: picpq.max_bits has {len(mb)} entries; the model has {len(layers)} "
                              f"conv/linear layers ({shown}): give one per layer, or a {{glob: bits}} rule")
        return dict(zip(layers, mb))
    out = {}
    for layer in layers:
        hits = [b for pattern, b in mb.items() if fnmatchcase(layer, pattern)]
        if not hits:
            raise RecipeError(f"recipe error: picpq.max_bits: no pattern matches layer {layer!r}; "
                              f"patterns: {', '.join(mb)}")
        out[layer] = hits[-1]
    return out


def layer_sparsity(pruned: nn.Module, original: nn.Module) -> dict[str, float]:
    """s_l = |W_l pruned|_1 / |W_l original|_1 per conv/linear layer (input channels lost count)."""
    before = {n: m.weight.detach().abs().sum().item() for n, m in original.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    return {n: m.weight.detach().abs().sum().item() / before[n] for n, m in pruned.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and before.get(n)}


def _quant_spec(bits: dict[str, int], weights: bool) -> dict:
    """dorefa_picpq on every layer with fewer than 32 bits: inputs at b_l, and weights too."""
    overrides = {n: ({"w_bits": b, "a_bits": b} if weights else {"a_bits": b}) for n, b in bits.items() if b < 32}
    return {"method": "dorefa_picpq", "w_bits": 32, "a_bits": 32, "first_last": "same", "overrides": overrides}


# ---- the learned criterion ------------------------------------------------------------------
def candidate_removal(graph: ChannelGraph, ranks: dict, cand: dict, macs_target: float, max_ratio: float):
    """Channels removed for candidate {a: {layer: a_l}, b: {layer: b_l}}: per group the sum over
    its conv producers of a_l FP + b_l, ranked globally (no normalization: b makes layers
    comparable) until the MACs reach the target. Groups without a ranked producer stay whole."""
    scores = {}
    for g in graph.groups:
        parts = []
        for m in g.of_kind("out", "dw"):
            if m.module not in ranks:
                parts = None
                break
            parts.append(cand["a"][m.module] * ranks[m.module][m.offset:m.offset + g.size] + cand["b"][m.module])
        scores[g.name] = sum(parts) if parts else None
    return select(graph, scores, macs_target=macs_target, scope="global", normalize="none", max_ratio=max_ratio)


def evolution_moves(layers: list[str], stds: dict[str, float], evaluations: int, population: int,
                    mutate_fraction: float):
    """§4.3's initial population (a = exp(N(0,1)), b ~ N(0, std_l); the last one the identity)
    and mutation (10% of the layers: a *= exp(N(0, step)), step = 1 - g / (1.25 G); b += N(0, std_l))."""
    def initial(rng: random.Random, i: int) -> dict:
        if i == population - 1:
            return {"a": dict.fromkeys(layers, 1.0), "b": dict.fromkeys(layers, 0.0)}
        return {"a": {l: math.exp(rng.gauss(0, 1)) for l in layers}, "b": {l: rng.gauss(0, stds[l]) for l in layers}}

    def mutate(rng: random.Random, parent: dict, g: int) -> dict:
        child = {"a": dict(parent["a"]), "b": dict(parent["b"])}
        step = 1 - g / (1.25 * evaluations)
        for l in rng.sample(layers, max(1, round(mutate_fraction * len(layers)))):
            child["a"][l] *= math.exp(rng.gauss(0, step))
            child["b"][l] += rng.gauss(0, stds[l])
        return child
    return initial, mutate


def _cycle(loader):
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def _ranks(ctx, base, graph, spec) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file, save_file
    path = ctx.out_dir / "picpq" / "ranks.safetensors"
    if path.exists():
        return load_file(str(path))
    hrank = HRank(batches=spec.rank_batches)
    hrank.prepare(graph, (x for x, _ in ctx.train_loader()))
    ranks = {k: v.float().contiguous() for k, v in hrank.ranks.items()}
    if ctx.dist.is_main:
        atomic_write(path, lambda tmp: save_file(ranks, tmp))
    return ranks


def _search(ctx, base, graph, ranks, spec) -> dict:
    layers = [n for n in graph.layers if n in ranks]
    stds = {l: float(ranks[l].std()) if ranks[l].numel() > 1 else 1.0 for l in layers}
    initial, mutate = evolution_moves(layers, stds, spec.evaluations, spec.population, spec.mutate_fraction)
    search_cfg = ctx.recipe.train.model_copy(update={"lr": spec.search_lr, "weight_decay": spec.weight_decay,
                                                     "schedule": "constant", "warmup_epochs": 0.0, "epochs": 1})
    val = ctx.eval_loader("val")

    def fitness(cand):
        net = apply_removal(graph, candidate_removal(graph, ranks, cand, 1 - spec.prune_away, spec.max_ratio))
        torch.manual_seed(ctx.recipe.seed)
        Trainer({"net": net}, cross_entropy_objective, search_cfg, device=ctx.device).train_steps(
            _cycle(ctx.train_loader()), spec.search_steps)
        return evaluate(net, val)["loss"]

    folder = ctx.out_dir / "picpq"
    folder.mkdir(parents=True, exist_ok=True)
    best, fit = regularized_evolution(fitness, initial, mutate, evaluations=spec.evaluations,
                                      population=spec.population, sample=spec.sample, seed=ctx.recipe.seed,
                                      log=folder / "search.jsonl", progress=ctx.recipe.train.progress)
    atomic_write(folder / "best.json", lambda tmp: Path(tmp).write_text(json.dumps({"fitness": fit, **best})))
    return {"candidate": best, "fitness": fit}


# ---- the pipeline ---------------------------------------------------------------------------
def _schedule(ctx, spec, epochs, lr):
    return ctx.recipe.train.multistep(epochs, lr, spec.milestones, gamma=spec.gamma,
                                      weight_decay=spec.weight_decay, nesterov=True)


def _quantize_stages(ctx, spec, tag: str, net: nn.Module, bits: dict[str, int]):
    """QAT (a) activations only, then (b) weights and activations, from (a)'s weights."""
    act = quantize_(copy.deepcopy(net), _quant_spec(bits, weights=False))
    calibrate(act, ctx.eval_loader("train"), num_batches=4)
    best_a = ctx.train_stage(f"picpq-{tag}qat-a", {"net": act}, cfg=_schedule(ctx, spec, spec.qat_epochs[0], spec.qat_lr))
    full = quantize_(copy.deepcopy(net), _quant_spec(bits, weights=True))
    full.load_state_dict({k: v for k, v in act.state_dict().items() if "quantizer" not in k}, strict=False)
    calibrate(full, ctx.eval_loader("train"), num_batches=4)
    best_b = ctx.train_stage(f"picpq-{tag}qat-b", {"net": full}, cfg=_schedule(ctx, spec, spec.qat_epochs[1], spec.qat_lr))
    return act, best_val(best_a, "net"), full, best_val(best_b, "net")


def _with_layers(row: dict, sparsity: dict, ref_bops: float) -> dict:
    for layer in row["layers"]:
        if layer["name"] in sparsity:
            layer["sparsity"] = sparsity[layer["name"]]
    row["bops_ratio"] = ref_bops / row["bops"]
    return row


def _uniform_bits_for(net: nn.Module, spec, max_bits: dict, target_bops: float, input_size) -> dict[str, int]:
    """The uniform b (layers whose Bmax is 32 stay float) whose BOPs come nearest `target_bops`
    (BOPs = sum of MACs_l x b_l x b_l, counted from the float model's per-layer MACs)."""
    macs = {layer.name: layer.macs for layer in cost.profile(net, input_size).layers}
    best = None
    for b in range(spec.min_bits, 9):
        bits = {n: (32 if mb >= 32 else b) for n, mb in max_bits.items()}
        bops = sum(m * bits.get(n, 32) ** 2 for n, m in macs.items())
        if best is None or abs(bops - target_bops) < best[0]:
            best = (abs(bops - target_bops), bits)
    return best[1]


def _preflight(ctx) -> None:
    graph = traced_graph(ctx, "picpq")
    max_bits_of(picpq_spec(ctx), ctx.recipe.model.name, list(graph.layers))


@register_method("picpq", sections=("picpq",))
def picpq(ctx) -> None:
    spec = picpq_spec(ctx)
    base = ctx.pretrained()
    example = torch.zeros(1, *ctx.input_size, device=ctx.device)
    graph = ChannelGraph(base, example)
    ranks = on_rank0(lambda: _ranks(ctx, base, graph, spec))
    found = on_rank0(lambda: _search(ctx, base, graph, ranks, spec))
    ref_bops = cost.profile(base, ctx.input_size).bops
    max_bits = max_bits_of(spec, ctx.recipe.model.name, list(graph.layers))
    target = 1 - spec.prune_away

    def run(tag: str, removed) -> tuple:
        net = apply_removal(graph, removed)
        sparsity = layer_sparsity(net, base)
        best = ctx.train_stage(f"picpq-{tag}finetune", {"net": net},
                               cfg=_schedule(ctx, spec, spec.finetune_epochs, spec.finetune_lr))
        return net, sparsity, best_val(best, "net")

    def quantize_and_record(tag, name, net, sparsity, bits, control=None):
        act, val_a, full, val_b = _quantize_stages(ctx, spec, tag, net, bits)
        if not tag:   # PIC-PQ's own rows: accuracy after each stage
            _with_layers(ctx.record("picpq/act-quantized", act, val_a, stage="picpq-qat-a"), sparsity, ref_bops)
        row = _with_layers(ctx.record(name, full, val_b, stage=f"picpq-{tag}qat-b", control=control),
                           sparsity, ref_bops)
        row["bits"] = bits
        return row

    controls = [f"picpq/{c}-control" for c in spec.controls]
    net, sparsity, val = run("", candidate_removal(graph, ranks, found["candidate"], target, spec.max_ratio))
    pruned = ctx.record("picpq/pruned", net, val, stage="picpq-finetune")
    pruned["bops_ratio"] = ref_bops / pruned["bops"]
    pruned["search_fitness"] = found["fitness"]
    bits = {n: assign_bits(sparsity.get(n, 1.0), mb, spec.penalty, spec.min_bits) for n, mb in max_bits.items()}
    row = quantize_and_record("", "picpq/quantized", net, sparsity, bits, control=controls or None)
    if "rank" in spec.controls:
        identity = {"a": {l: 1.0 for l in ranks}, "b": {l: 0.0 for l in ranks}}
        r_net, r_sparsity, _ = run("rank-", candidate_removal(graph, ranks, identity, target, spec.max_ratio))
        r_bits = {n: assign_bits(r_sparsity.get(n, 1.0), mb, spec.penalty, spec.min_bits) for n, mb in max_bits.items()}
        quantize_and_record("rank-", "picpq/rank-control", r_net, r_sparsity, r_bits)
    if "l1" in spec.controls:
        pruner = ChannelPruner(base, example, "l1", macs_target=target, max_ratio=spec.max_ratio)
        l_net, l_sparsity, _ = run("l1-", on_rank0(pruner.plan))
        l_bits = _uniform_bits_for(l_net, spec, max_bits, row["bops"], ctx.input_size)
        quantize_and_record("l1-", "picpq/l1-control", l_net, l_sparsity, l_bits)


picpq.preflight = _preflight
