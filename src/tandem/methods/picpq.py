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
   Bmax_l - ceil(penalty / s_l), at least `min_bits`; b_l is the layer's weight bits and the bits
   of the activation it produces (§4.5). Which inputs are quantized (`act_quant`), at whose bits
   (`act_bits`) and on which range (`act_range`): `activation_bits` below. 32 = left in float.
5. Two-stage QAT with the `dorefa_picpq` quantizer: activations only (`picpq-qat-a`), then
   weights and activations (`picpq-qat-b`); the network as each stage starts is an init row
   (`picpq/init`, `picpq/init-wa`).

Controls (`controls`), each at PIC-PQ's MACs with the same stages and epochs, each isolating
one part: `rank` (a = 1, b = 0: plain rank ranking, the bit rule at the recipe's penalty: what
the learned (a, b) adds; its BOPs follow from its own sparsities), and, as near PIC-PQ's BOPs as
their bits allow, `uniform` (PIC-PQ's own pruned network,
uniform bits: what the bit rule adds), `l1_bit_rule` (filter-L1 pruning, the bit rule with its
penalty set to match the BOPs: what the rank criterion adds over L1) and `l1_uniform` (L1 and
uniform bits: both together). Each distinct pruned network is fine-tuned once. Rows:
`picpq/pruned`, `picpq/act-quantized`, `picpq/quantized` (paired with every control run),
`picpq/<control>-control`; each with `bops_ratio` against the baseline, the quantized ones with
their `bits`, the paper's BOPs convention beside the honest count, and a per-layer `sparsity`.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import random
from collections import Counter
from pathlib import Path
from fnmatch import fnmatchcase
from typing import Literal, Optional, Union

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import cost
from ..context import RunContext
from ..engine import Trainer, cross_entropy_objective, evaluate
from ..engine.distributed import on_rank0
from ..errors import RecipeError
from ..fields import Fraction, StageMilestones
from ..files import atomic_write
from ..prune import ChannelGraph, ChannelPruner, apply_removal, select
from ..prune.criteria import HRank, break_ties_by_l1
from ..quant import calibrate, quantize_
from ..search.evolution import regularized_evolution
from . import best_val, register_method, traced_graph


CONTROLS = ("rank", "uniform", "l1_bit_rule", "l1_uniform")
PruneAway = Fraction("(0, 1)", "prune_away is the fraction of the MACs removed")


class PicpqSpec(BaseModel):
    """Defaults are the authors' code values (methods.md §4); [INFER] choices are switches."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rank_batches: int = Field(6, ge=1)
    prune_away: PruneAway = 0.55             # fraction of the MACs removed (ResNet-56 C10; VGG-16 0.653)
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
    controls: list[Literal["rank", "uniform", "l1_bit_rule", "l1_uniform"]] = Field(
        default_factory=lambda: list(CONTROLS))
    # which conv/linear inputs are quantized: 'internal' only those whose channels are one
    # layer's output inside a block (a BasicBlock's conv2: the authors' code), 'all' every input
    # of a layer with b < 32 (residual streams and the classifier's input too)
    act_quant: Literal["internal", "all"] = "internal"
    # at whose bits: 'producer' the b of the layer that produced the activation (§4.5), 'reader'
    # the reading layer's own b
    act_bits: Literal["producer", "reader"] = "producer"
    # DoReFa's activation clip: 'calibrated' fixed at calibration (99.99th percentile of |x|),
    # 'unit' the paper's [0, 1]
    act_range: Literal["calibrated", "unit"] = "calibrated"
    # equal feature-map ranks ordered by the filter's L1 norm ('l1'), or left to channel order ('index')
    rank_ties: Literal["l1", "index"] = "l1"

    @field_validator("controls", mode="before")
    @classmethod
    def _controls(cls, v):
        if isinstance(v, (list, tuple)):
            if "l1" in v:
                raise ValueError("the l1 control was split in two: 'l1_uniform' (filter L1, uniform bits: the old l1) "
                                 "and 'l1_bit_rule' (filter L1, PIC-PQ's bit rule); allowed: " + ", ".join(CONTROLS))
            if len(set(map(str, v))) != len(v):
                raise ValueError("a control is named twice; allowed once each: " + ", ".join(CONTROLS))
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


def picpq_spec(ctx: RunContext) -> PicpqSpec:
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


def _readers_of_one_layer(graph: ChannelGraph) -> dict[str, str]:
    """{layer: the layer that produced its whole input} for inputs that are one layer's output
    and nothing else: a group with one conv/linear producer (its depthwise follower, if any, in
    between) and no channel map (no shortcut), which is all the reader reads. In a CIFAR ResNet
    that is each block's conv2 reading conv1 (block-internal); a residual stream has several
    producers, the network's input none."""
    groups_read = Counter(m.module for g in graph.groups for m in g.of_kind("in"))
    out = {}
    for g in graph.groups:
        outs, dws = g.of_kind("out"), g.of_kind("dw")
        if len(outs) != 1 or len(dws) > 1 or g.of_kind("map_in", "map_out"):
            continue
        for m in dws:
            out[m.module] = outs[0].module
        for m in g.of_kind("in"):
            if groups_read[m.module] == 1 and g.size * m.repeat == graph.layers[m.module].in_pg:
                out[m.module] = (dws or outs)[0].module
    return out


def activation_bits(graph: ChannelGraph, bits: dict[str, int], act_quant: str, act_bits: str) -> dict[str, int]:
    """The bits of each conv/linear layer's input (32: float). An input that is one layer's
    output (`_readers_of_one_layer`) is quantized under both placements, at its producer's b
    ('producer', §4.5) or the reader's own ('reader'). Any other input (a residual stream, the
    network's input) only under 'all', at the reader's own b: a stream is the sum of several
    layers' outputs and has no one producer, so its reader's b is the rule [INFER]."""
    producer = _readers_of_one_layer(graph)
    out = {}
    for layer in graph.layers:
        own = bits.get(layer, 32)
        if layer in producer:
            out[layer] = bits.get(producer[layer], 32) if act_bits == "producer" else own
        else:
            out[layer] = own if act_quant == "all" else 32
    return out


def _quant_spec(bits: dict[str, int], in_bits: dict[str, int], weights: bool, act_range: str) -> dict:
    """dorefa_picpq: each layer's input at in_bits (32: float), and with `weights` its weights at
    b_l; the DoReFa clip calibrated or [0, 1] (act_range unit: QuantSpec act_init paper)."""
    overrides = {}
    for n, b in bits.items():
        o = {**({"w_bits": b} if weights and b < 32 else {}),
             **({"a_bits": in_bits[n]} if in_bits.get(n, 32) < 32 else {})}
        if o:
            overrides[n] = o
    return {"method": "dorefa_picpq", "w_bits": 32, "a_bits": 32, "first_last": "same", "overrides": overrides,
            "act_init": "calibrated" if act_range == "calibrated" else "paper"}


def layer_macs(net: nn.Module, input_size) -> dict[str, float]:
    """MACs per conv/linear layer name (a layer called twice counted twice)."""
    macs: dict[str, float] = {}
    for layer in cost.profile(net, input_size).layers:
        macs[layer.name] = macs.get(layer.name, 0) + layer.macs
    return macs


def planned_bops(macs: dict[str, float], bits: dict[str, int], in_bits: dict[str, int]) -> float:
    """BOPs of the quantized network before it is built: sum of MACs_l x w_bits_l x a_bits_l,
    a float weight or input counting 32 (what cost.profile counts from the layers)."""
    return sum(m * bits.get(n, 32) * in_bits.get(n, 32) for n, m in macs.items())


def paper_bops(layers: list[cost.LayerCost], bits: dict[str, int]) -> float:
    """§4.6's convention: every conv at b_w = b_a = b_l whatever is actually quantized, the
    classifier (linear layers) at 32 x 32."""
    return sum(c.macs * (32 * 32 if c.kind == "linear" else bits.get(c.name, 32) ** 2) for c in layers)


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
    return select(graph, _dense_ranks(scores), macs_target=macs_target, scope="global", normalize="none",
                  max_ratio=max_ratio)


def _dense_ranks(scores: dict) -> dict:
    """Each score replaced by its position among all distinct scores: the same order and the
    same ties, exact in the float32 that selection sorts in (the L1 tie-break term is finer than
    float32 resolves at a rank of ~28)."""
    names = [n for n, v in scores.items() if v is not None]
    if not names:
        return scores
    flat = torch.cat([scores[n].double().flatten() for n in names])
    _, position = torch.unique(flat, sorted=True, return_inverse=True)
    out, i = dict(scores), 0
    for n in names:
        k = scores[n].numel()
        out[n] = position[i:i + k].float()
        i += k
    return out


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


def _ranks(ctx: RunContext, base, graph, spec) -> tuple[dict[str, torch.Tensor], int]:
    """The average ranks (the statistic as measured: equal ranks equal) and the number of
    images they average; kept in the run folder, read back by a resumed run."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = ctx.out_dir / "picpq" / "ranks.safetensors"
    if path.exists():
        with safe_open(str(path), "pt") as f:
            images = int((f.metadata() or {}).get("images", 0))
            ranks = {k: f.get_tensor(k) for k in f.keys()}
        if images:   # (a file written before the count was kept is measured again)
            return ranks, images
    hrank = HRank(batches=spec.rank_batches)
    hrank.prepare(graph, (x for x, _ in ctx.train_loader()))
    ranks = {k: v.float().contiguous() for k, v in hrank.ranks.items()}
    if ctx.dist.is_main:
        atomic_write(path, lambda tmp: save_file(ranks, tmp, metadata={"images": str(hrank.images)}))
    return ranks, hrank.images


def filter_property(ctx: RunContext, base, graph, spec) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """FP per ranked layer (rank_ties l1: equal ranks ordered by the filter's L1 norm) and the
    std of each layer's measured ranks (the scale of the search's b, the same for both tie rules,
    so a search log stays valid across them)."""
    ranks, images = on_rank0(lambda: _ranks(ctx, base, graph, spec))
    stds = {l: float(r.std()) if r.numel() > 1 else 1.0 for l, r in ranks.items()}
    if spec.rank_ties == "l1":
        ranks = break_ties_by_l1(ranks, graph, images)
    return ranks, stds


def _search(ctx: RunContext, base, graph, ranks, stds, spec) -> dict:
    layers = [n for n in graph.layers if n in ranks]
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
def _schedule(ctx: RunContext, spec, epochs, lr):
    return ctx.recipe.train.multistep(epochs, lr, spec.milestones, gamma=spec.gamma,
                                      weight_decay=spec.weight_decay, nesterov=True)


def _quantize_stages(ctx: RunContext, spec, tag: str, init: str, net: nn.Module, bits: dict[str, int], in_bits: dict[str, int]):
    """QAT (a) activations only, then (b) weights and activations, from (a)'s weights. The
    network as stage (a) starts is the init row `init` (PIC-PQ's own: stage (b)'s too, `init`-wa)."""
    act = quantize_(copy.deepcopy(net), _quant_spec(bits, in_bits, False, spec.act_range))
    calibrate(act, ctx.eval_loader("train"), num_batches=4)
    ctx.record_init(init, act, stage=f"picpq-{tag}qat-a")
    best_a = ctx.train_stage(f"picpq-{tag}qat-a", {"net": act}, cfg=_schedule(ctx, spec, spec.qat_epochs[0], spec.qat_lr))
    full = quantize_(copy.deepcopy(net), _quant_spec(bits, in_bits, True, spec.act_range))
    full.load_state_dict({k: v for k, v in act.state_dict().items() if "quantizer" not in k}, strict=False)
    calibrate(full, ctx.eval_loader("train"), num_batches=4)
    if not tag:
        ctx.record_init(f"{init}-wa", full, stage="picpq-qat-b")
    best_b = ctx.train_stage(f"picpq-{tag}qat-b", {"net": full}, cfg=_schedule(ctx, spec, spec.qat_epochs[1], spec.qat_lr))
    return act, best_val(best_a, "net"), full, best_val(best_b, "net")


def _with_layers(row: dict, sparsity: dict, ref_bops: float) -> dict:
    for layer in row["layers"]:
        if layer["name"] in sparsity:
            layer["sparsity"] = sparsity[layer["name"]]
    row["bops_ratio"] = ref_bops / row["bops"]
    return row


def uniform_bits_for(bops_of, max_bits: dict[str, int], target_bops: float, min_bits: int) -> tuple[int, dict]:
    """The uniform b (layers whose Bmax is 32 stay float) whose BOPs, `bops_of(bits)`, come
    nearest `target_bops`; (b, bits)."""
    top = max([mb for mb in max_bits.values() if mb < 32], default=8)
    choices = [(b, {n: (32 if mb >= 32 else b) for n, mb in max_bits.items()}) for b in range(min_bits, max(top, 8) + 1)]
    return min(choices, key=lambda c: abs(bops_of(c[1]) - target_bops))


def penalty_for(bops_of, sparsity: dict[str, float], max_bits: dict[str, int], target_bops: float, spec) -> float:
    """The bit rule's penalty whose bits come nearest `target_bops` (the recipe's penalty when it
    is among the nearest). The bits are a step function of the penalty: b_l changes where
    penalty / s_l crosses an integer, so one penalty inside each step (between consecutive
    points k s_l) covers every assignment the rule can make; no bisection tolerance."""
    def bits(penalty):
        return {n: assign_bits(sparsity.get(n, 1.0), mb, penalty, spec.min_bits) for n, mb in max_bits.items()}

    edges = sorted({k * s for n, s in sparsity.items() if s < 1 - 1e-9 and max_bits.get(n, 32) < 32
                    for k in range(1, max_bits[n] - spec.min_bits + 1)})
    tries = [spec.penalty] + [(lo + hi) / 2 for lo, hi in zip([0.0] + edges, edges)] + [edges[-1] * 2 if edges else 1.0]
    return min(tries, key=lambda lam: abs(bops_of(bits(lam)) - target_bops))   # the first (the recipe's) wins ties


def _preflight(ctx: RunContext) -> None:
    graph = traced_graph(ctx, "picpq")
    max_bits_of(picpq_spec(ctx), ctx.recipe.model.name, list(graph.layers))


@register_method("picpq", sections={"picpq": PicpqSpec}, preflight=_preflight)
def picpq(ctx: RunContext) -> None:
    spec = picpq_spec(ctx)
    base = ctx.pretrained()
    example = torch.zeros(1, *ctx.input_size, device=ctx.device)
    graph = ChannelGraph(base, example)
    ranks, stds = filter_property(ctx, base, graph, spec)
    found = on_rank0(lambda: _search(ctx, base, graph, ranks, stds, spec))
    ref_bops = cost.profile(base, ctx.input_size).bops
    max_bits = max_bits_of(spec, ctx.recipe.model.name, list(graph.layers))
    target = 1 - spec.prune_away

    def finetune(tag: str, removed) -> tuple:
        net = apply_removal(graph, removed)
        sparsity = layer_sparsity(net, base)
        best = ctx.train_stage(f"picpq-{tag}finetune", {"net": net},
                               cfg=_schedule(ctx, spec, spec.finetune_epochs, spec.finetune_lr))
        return net, sparsity, best_val(best, "net")

    def bits_rule(sparsity, penalty):
        return {n: assign_bits(sparsity.get(n, 1.0), mb, penalty, spec.min_bits) for n, mb in max_bits.items()}

    def placement(net):
        """bits -> input bits and bits -> BOPs for this pruned network."""
        g, macs = ChannelGraph(net, example), layer_macs(net, ctx.input_size)
        def in_bits(bits):
            return activation_bits(g, bits, spec.act_quant, spec.act_bits)
        return in_bits, lambda bits: planned_bops(macs, bits, in_bits(bits))

    def quantize_and_record(tag, name, init, net, sparsity, bits, in_bits, control=None, **extra):
        act, val_a, full, val_b = _quantize_stages(ctx, spec, tag, init, net, bits, in_bits)
        if not tag:   # PIC-PQ's own rows: accuracy after each stage
            _with_layers(ctx.record("picpq/act-quantized", act, val_a, stage="picpq-qat-a"), sparsity, ref_bops)
        row = _with_layers(ctx.record(name, full, val_b, stage=f"picpq-{tag}qat-b", control=control),
                           sparsity, ref_bops)
        row["bits"] = bits
        row["bops_paper_convention"] = paper_bops(cost.profile(net, ctx.input_size).layers, bits)
        row["bops_ratio_paper_convention"] = ref_bops / row["bops_paper_convention"]
        row.update(extra)
        return row

    net, sparsity, val = finetune("", candidate_removal(graph, ranks, found["candidate"], target, spec.max_ratio))
    pruned = ctx.record("picpq/pruned", net, val, stage="picpq-finetune")
    pruned["bops_ratio"] = ref_bops / pruned["bops"]
    pruned["search_fitness"] = found["fitness"]
    in_bits_of, bops_of = placement(net)
    bits = bits_rule(sparsity, spec.penalty)
    row = quantize_and_record("", "picpq/quantized", "picpq/init", net, sparsity, bits, in_bits_of(bits),
                              control=[f"picpq/{c}-control" for c in spec.controls] or None)
    goal = row["bops"]   # the honest count, the one every control is held at
    l1 = None
    for c in spec.controls:
        name, init, tag = f"picpq/{c}-control", f"picpq/init-{c}", f"{c}-"
        if c == "rank":
            identity = {"a": {l: 1.0 for l in ranks}, "b": {l: 0.0 for l in ranks}}
            r_net, r_sparsity, _ = finetune("rank-", candidate_removal(graph, ranks, identity, target, spec.max_ratio))
            r_in_bits, r_bops_of = placement(r_net)   # the bit rule, its penalty held at PIC-PQ's BOPs
            lam = penalty_for(r_bops_of, r_sparsity, max_bits, goal, spec)
            r_bits = bits_rule(r_sparsity, lam)
            quantize_and_record(tag, name, init, r_net, r_sparsity, r_bits, r_in_bits(r_bits), penalty=lam)
        elif c == "uniform":
            u, u_bits = uniform_bits_for(bops_of, max_bits, goal, spec.min_bits)
            quantize_and_record(tag, name, init, net, sparsity, u_bits, in_bits_of(u_bits), uniform_bits=u)
        else:   # the L1-pruned network, fine-tuned once for both L1 controls
            if l1 is None:
                pruner = ChannelPruner(base, example, "l1", macs_target=target, max_ratio=spec.max_ratio)
                l_net, l_sparsity, _ = finetune("l1-", on_rank0(pruner.plan))
                l1 = (l_net, l_sparsity, *placement(l_net))
            l_net, l_sparsity, l_in_bits, l_bops_of = l1
            if c == "l1_uniform":
                u, l_bits = uniform_bits_for(l_bops_of, max_bits, goal, spec.min_bits)
                extra = {"uniform_bits": u}
            else:
                lam = penalty_for(l_bops_of, l_sparsity, max_bits, goal, spec)
                l_bits, extra = bits_rule(l_sparsity, lam), {"penalty": lam}
            quantize_and_record(tag, name, init, l_net, l_sparsity, l_bits, l_in_bits(l_bits), **extra)
