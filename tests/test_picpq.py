"""PIC-PQ: the bit rule against hand-computed values, regularized evolution (mutation, aging,
seeding, resume from its log), the learned criterion's tied scores and MACs target, the rank's
L1 tie-break, where activations are quantized and at whose bits, the controls' BOPs matching,
a tiny run end to end with its report and init rows, and bad input."""
import json
import math

import pytest
import torch

from tandem.cli import main
from tandem import cost
from tandem.methods.picpq import (PicpqSpec, _quant_spec, activation_bits, assign_bits, candidate_removal,
                                  layer_macs, layer_sparsity, paper_bops, penalty_for, planned_bops)
from tandem.models import create_model
from tandem.prune import ChannelGraph, ChannelPruner, MacsModel, apply_removal
from tandem.prune.criteria import break_ties_by_l1
from tandem.quant import calibrate, quantize_
from tandem.search.evolution import regularized_evolution

TINY = ["method=picpq", "train.epochs=1", "picpq.evaluations=5", "picpq.population=3", "picpq.sample=2",
        "picpq.search_steps=3", "picpq.finetune_epochs=1", "picpq.qat_epochs=[1,1]", "picpq.prune_away=0.4",
        "train.progress=false"]


def test_bit_rule_matches_hand_computed_values():
    assert assign_bits(1.0, 8, 1 / 6) == 8                      # s = 1: Bmax
    assert assign_bits(0.5, 8, 1 / 6) == 8 - math.ceil(1 / 3)   # 7
    assert assign_bits(0.1, 6, 1 / 6) == 6 - 2                  # ceil(1.667) = 2
    assert assign_bits(0.05, 4, 1 / 6) == 2                     # 4 - ceil(3.33) = 0, clamped to 2
    assert assign_bits(0.05, 4, 1 / 6, min_bits=3) == 3
    assert assign_bits(0.3, 32, 1 / 6) == 32                    # float layers stay float


def _toy(log=None, stop_at=None, seed=0, calls=None, progress=False):
    def initial(rng, i):
        return {"id": i, "x": rng.uniform(-10, 10)}

    def mutate(rng, parent, g):
        assert parent["id"] >= g - 4, "a parent older than the population was sampled (no aging)"
        return {"id": g, "x": parent["x"] + rng.gauss(0, 1)}

    def fitness(c):
        if calls is not None:
            calls.append(c["id"])
        if stop_at is not None and c["id"] == stop_at:
            raise KeyboardInterrupt
        return (c["x"] - 3) ** 2

    return regularized_evolution(fitness, initial, mutate, evaluations=60, population=4, sample=2, seed=seed,
                                 log=log, progress=progress)


def test_evolution_is_seeded_ages_and_improves(tmp_path):
    best, fit = _toy(log=tmp_path / "log.jsonl")
    again, _ = _toy()
    assert best == again                                  # deterministic for a seed
    assert _toy(seed=1)[0] != best
    initial = min(json.loads(line)["fitness"] for line in (tmp_path / "log.jsonl").read_text().splitlines()[:4])
    assert fit < 0.05 < initial                           # mutating the fittest moved towards x = 3


def test_search_progress_in_a_log_is_a_line_per_5_percent(capsys):
    _, fit = _toy(progress=True)   # stderr is not a terminal under pytest
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "search: 3/60 candidates, best fitness " + lines[0].rsplit(" ", 1)[1] and len(lines) == 20
    assert lines[-1] == f"search: 60/60 candidates, best fitness {fit:.4f}" and "\r" not in "".join(lines)


def test_interrupted_search_resumes_from_its_log_to_the_same_best(tmp_path):
    clean = _toy(log=tmp_path / "a.jsonl")
    with pytest.raises(KeyboardInterrupt):
        _toy(log=tmp_path / "b.jsonl", stop_at=25)
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 25
    calls = []
    assert _toy(log=tmp_path / "b.jsonl", calls=calls) == clean
    assert calls == list(range(25, 60))                   # logged candidates are not evaluated again
    with pytest.raises(Exception, match="does not match this search"):
        _toy(log=tmp_path / "b.jsonl", seed=3)


def test_tied_layers_share_one_score_and_the_macs_target_is_met_within_one_channel():
    model = create_model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    graph = ChannelGraph(model, x)
    g = torch.Generator().manual_seed(0)
    ranks = {n: torch.rand(layer.out, generator=g) * 8 for n, layer in graph.layers.items() if n != "fc"}
    cand = {"a": {n: 1.0 for n in ranks}, "b": {n: 0.0 for n in ranks}}
    removed = candidate_removal(graph, ranks, cand, 0.5, 0.9)
    stream = next(grp for grp in graph.groups if grp.name == "stem.0")
    assert len(stream.of_kind("out")) == 4                 # stem + the three conv2 of stage 1: one unit
    small = apply_removal(graph, removed)
    widths = {n: m.out_channels for n, m in small.named_modules() if n in ("stem.0", "layer1.0.conv2", "layer1.2.conv2")}
    assert len(set(widths.values())) == 1
    macs = MacsModel(graph)
    for grp in graph.groups:
        if grp.name in removed:
            macs.remove(grp, len(removed[grp.name]))
    base = graph.macs
    assert macs.total <= 0.5 * base
    one_channel = max(MacsModel(graph).total - _after_one(graph, grp) for grp in graph.groups)
    assert macs.total > 0.5 * base - one_channel


def _after_one(graph, group):
    m = MacsModel(graph)
    m.remove(group, 1)
    return m.total


HALF = "model.widths=[8,8,8,8,8,8,8,16,16,16,16,16,16,32,32,32,32,32,32]"


def _resnet_and_bits():
    model = create_model("resnet20", widths=[4] * 7 + [8] * 6 + [16] * 6)
    graph = ChannelGraph(model, torch.zeros(1, 3, 32, 32))
    bits = {n: 32 if n in ("stem.0", "fc") else 2 + i % 7 for i, n in enumerate(graph.layers)}   # distinct neighbours
    return model, graph, bits


def test_internal_placement_quantizes_each_blocks_conv2_input_at_conv1s_bits_and_nothing_else(one_thread):
    model, graph, bits = _resnet_and_bits()
    in_bits = activation_bits(graph, bits, "internal", "producer")
    conv2 = [n for n in graph.layers if n.endswith("conv2")]
    assert len(conv2) == 9
    assert {n: b for n, b in in_bits.items() if b < 32} == {n: bits[n.replace("conv2", "conv1")] for n in conv2}
    assert activation_bits(graph, bits, "internal", "reader") == {n: bits[n] if n in conv2 else 32 for n in bits}
    # 'all': the residual streams' readers (conv1s, fc) at their own b, the block-internal inputs still at the producer's
    everything = activation_bits(graph, bits, "all", "producer")
    assert everything == {n: bits[n.replace("conv2", "conv1")] if n in conv2 else bits[n] for n in bits}
    # the quantized network has exactly those input quantizers, and its BOPs are the planned ones
    net = quantize_(model, _quant_spec(bits, in_bits, True, "calibrated"))
    calibrate(net, [torch.randn(4, 3, 32, 32)])
    layers = {n: m for n, m in net.named_modules() if n in bits}
    assert {n: m.input_quantizer.bits for n, m in layers.items() if getattr(m, "input_quantizer", None)} == \
        {n: b for n, b in in_bits.items() if b < 32}
    assert all(m.input_quantizer.clip != 1 for n, m in layers.items() if n in conv2)   # the calibrated clip
    assert cost.profile(net, (3, 32, 32)).bops == planned_bops(layer_macs(model, (3, 32, 32)), bits, in_bits)
    layers = cost.profile(model, (3, 32, 32)).layers   # the paper's count: b_l x b_l whatever is quantized, fc 32 x 32
    assert paper_bops(layers, bits) == sum(c.macs * (1024 if c.name == "fc" else bits[c.name] ** 2) for c in layers)


def _old_quant_spec(bits, weights):
    """picpq's policy before activation placement existed (every layer with b < 32: inputs at b,
    DoReFa on [0, 1])."""
    overrides = {n: ({"w_bits": b, "a_bits": b} if weights else {"a_bits": b}) for n, b in bits.items() if b < 32}
    return {"method": "dorefa_picpq", "w_bits": 32, "a_bits": 32, "first_last": "same", "overrides": overrides,
            "act_init": "paper"}


def test_all_reader_unit_is_the_old_policy():
    _, graph, bits = _resnet_and_bits()
    in_bits = activation_bits(graph, bits, "all", "reader")
    for weights in (False, True):
        assert _quant_spec(bits, in_bits, weights, "unit") == _old_quant_spec(bits, weights)


def test_l1_tie_break_orders_equal_ranks_by_l1_and_never_reorders_different_ranks():
    model = create_model("resnet20", widths=[4] * 7 + [8] * 6 + [16] * 6)
    graph = ChannelGraph(model, torch.zeros(1, 3, 32, 32))
    images = 768
    g = torch.Generator().manual_seed(0)
    ranks = {}
    for n in graph.layers:
        if n != "fc":   # ranks are multiples of 1 / images: many tied at the maximum (saturated), others one step apart
            c = graph.layers[n].out
            ranks[n] = (7 * images - torch.randint(0, 3, (c,), generator=g) * (torch.rand(c, generator=g) < 0.3)).float() / images
    fp = break_ties_by_l1(ranks, graph, images)
    for n, r in ranks.items():
        l1 = model.get_submodule(n).weight.detach().flatten(1).abs().sum(1).double()
        assert torch.equal(torch.argsort(fp[n]), torch.argsort(r.double() * 1e6 + l1 / l1.max()))   # rank first, then L1
        assert 0 < (fp[n] - r.double()).max() <= 0.5 / images * (1 + 1e-12)   # at most half a rank step
    # selection sees the order exactly: a saturated layer (every rank 7) loses its lowest-L1 filter first, even
    # when the next one's L1 is larger by a part in 10^5 only (float32 cannot hold that difference at rank 7)
    name = "layer3.0.conv1"
    with torch.no_grad():
        conv = model.get_submodule(name).weight
        conv[5] *= 0.01
        conv[3] = conv[5] * (1 + 1e-5)
    ranks = {n: torch.full((graph.layers[n].out,), 7.0) for n in ranks}
    cand = {"a": dict.fromkeys(ranks, 1.0), "b": {n: -10.0 if n == name else 0.0 for n in ranks}}   # that layer first
    one = MacsModel(graph)
    one.remove(next(grp for grp in graph.groups if grp.name == name), 1)
    target = 1 - 0.5 * (graph.macs - one.total) / graph.macs   # one channel's MACs
    removed = candidate_removal(graph, break_ties_by_l1(ranks, graph, images), cand, target, 0.9)
    assert {n: r.tolist() for n, r in removed.items()} == {name: [5]}
    removed = candidate_removal(graph, ranks, cand, target, 0.9)
    assert {n: r.tolist() for n, r in removed.items()} == {name: [0]}   # ties by index


def test_l1_bit_rule_penalty_is_adjusted_to_the_target_bops(one_thread):
    model = create_model("resnet20", widths=[4] * 7 + [8] * 6 + [16] * 6)
    pruner = ChannelPruner(model, torch.zeros(1, 3, 32, 32), "l1", macs_target=0.45)
    net = pruner.apply(pruner.plan())
    graph, macs = ChannelGraph(net, torch.zeros(1, 3, 32, 32)), layer_macs(net, (3, 32, 32))
    sparsity = layer_sparsity(net, model)
    max_bits = {n: 32 if n in ("stem.0", "fc") else 8 for n in graph.layers}
    spec = PicpqSpec()

    def bops_of(bits):
        return planned_bops(macs, bits, activation_bits(graph, bits, "internal", "producer"))

    def bits_at(lam):
        return {n: assign_bits(sparsity.get(n, 1.0), mb, lam, spec.min_bits) for n, mb in max_bits.items()}

    target = bops_of(bits_at(0.9))   # a target the recipe's 1/6 misses
    lam = penalty_for(bops_of, sparsity, max_bits, target, spec)
    assert abs(bops_of(bits_at(lam)) - target) < abs(bops_of(bits_at(spec.penalty)) - target)
    grid = [i / 200 for i in range(1, 2000)]
    assert abs(bops_of(bits_at(lam)) - target) <= min(abs(bops_of(bits_at(x)) - target) for x in grid)
    assert penalty_for(bops_of, sparsity, max_bits, bops_of(bits_at(spec.penalty)), spec) == spec.penalty


def test_picpq_runs_end_to_end_with_controls_and_a_per_layer_report(tmp_path, capsys, one_thread):
    assert main(["run", *TINY, "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "run"
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["models"]}
    controls = ["picpq/rank-control", "picpq/uniform-control", "picpq/l1_bit_rule-control", "picpq/l1_uniform-control"]
    inits = ["picpq/init", "picpq/init-wa", "picpq/init-rank", "picpq/init-uniform", "picpq/init-l1_bit_rule",
             "picpq/init-l1_uniform"]
    assert {"picpq/pruned", "picpq/act-quantized", "picpq/quantized", *controls, *inits} <= set(rows)
    assert all(rows[n]["init"] for n in inits)
    q = rows["picpq/quantized"]
    assert q["control"] == controls
    assert q["bops_ratio"] == pytest.approx(rows["baseline"]["bops"] / q["bops"]) and q["bops_ratio"] > 1
    assert q["bops_ratio_paper_convention"] == pytest.approx(rows["baseline"]["bops"] / q["bops_paper_convention"])
    for n in controls:
        assert rows[n]["bops_ratio"] > 1 and set(rows[n]["bits"]) == set(q["bits"])
    assert isinstance(rows["picpq/l1_bit_rule-control"]["penalty"], float)
    for n in ("picpq/uniform-control", "picpq/l1_uniform-control"):
        assert set(rows[n]["bits"].values()) == {32, rows[n]["uniform_bits"]}   # one b for every layer below Bmax 32
    assert rows["picpq/uniform-control"]["macs"] == rows["picpq/pruned"]["macs"]   # PIC-PQ's own pruned network
    assert (out / "stages" / "picpq-l1-finetune").is_dir() and not (out / "stages" / "picpq-uniform-finetune").exists()
    assert rows["picpq/pruned"]["macs"] <= 0.6 * rows["baseline"]["macs"] * (1 + 1e-9)
    assert all("sparsity" in layer for layer in q["layers"])
    assert [layer["w_bits"] for layer in q["layers"]] == [q["bits"][layer["name"]] for layer in q["layers"]]
    assert len((out / "picpq" / "search.jsonl").read_text().splitlines()) == 5
    report = (out / "report.md").read_text()
    assert "### picpq/quantized: per layer" in report and "sparsity" in report


EIGHT = ["method=picpq", "model=resnet20", HALF, "train.epochs=6", "picpq.evaluations=2", "picpq.population=2",
         "picpq.sample=2", "picpq.search_steps=1", "picpq.finetune_epochs=0", "picpq.qat_epochs=[0,0]",
         "picpq.prune_away=0.02", 'picpq.max_bits={"*":8}', "picpq.controls=[]", "train.progress=false"]


def test_init_row_at_8_bits_is_near_full_precision_and_the_old_placement_was_not(tmp_path, capsys, one_thread):
    assert main(["run", *EIGHT, "--out", str(tmp_path / "new")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "new" / "results.json").read_text())["models"]}
    fp = rows["picpq/pruned"]["top1"]
    assert fp > 90
    assert abs(rows["picpq/init"]["top1"] - fp) < 3 and abs(rows["picpq/init-wa"]["top1"] - fp) < 3
    assert rows["picpq/init"]["a_bits"] < 32   # something was quantized
    old = ["model.checkpoint=" + str(tmp_path / "new" / "models" / "baseline.safetensors"),
           "picpq.act_quant=all", "picpq.act_bits=reader", "picpq.act_range=unit"]
    assert main(["run", *EIGHT, *old, "--out", str(tmp_path / "old")]) == 0
    old_rows = {r["name"]: r for r in json.loads((tmp_path / "old" / "results.json").read_text())["models"]}
    assert old_rows["picpq/init"]["top1"] < fp - 30   # clamping the residual streams at 1 broke the start


def test_bad_input_is_one_line_exit_2_no_folder(refused):
    cases = [(["picpq.prune_away=1.0"], "picpq.prune_away = 1.0"), (["picpq.prune_away=0"], "picpq.prune_away = 0"),
             (["picpq.penalty=0"], "picpq.penalty = 0"),
             (["picpq.max_bits=[32,8]"], "picpq.max_bits has 2 entries; the model has 4 conv/linear layers"),
             (["picpq.controls=[rank,l1]"], "'l1_uniform' (filter L1, uniform bits: the old l1) and 'l1_bit_rule'"),
             (["picpq.controls=[rank,rank]"], "a control is named twice"),
             (["picpq.act_quant=some"], "picpq.act_quant = 'some'"), (["picpq.act_bits=mine"], "picpq.act_bits"),
             (["picpq.act_range=wide"], "picpq.act_range"), (["picpq.rank_ties=random"], "picpq.rank_ties")]
    refused(TINY, cases)
