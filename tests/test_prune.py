"""Pruning: criteria against their definitions, exact surgery on every built-in and on user models,
MACs after pruning, selection limits, schedules (soft regrowth, slimming, magnitude masks), the
recipe method end to end."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem import cost
from tandem.engine import load_model, save_model
from tandem.errors import RecipeError, TandemError
from tandem.models import create_model, list_models
from tandem.modes import eval_mode
from tandem.prune import (ChannelGraph, ChannelPruner, Criterion, KeepMasked, SlimmingPenalty, SoftPruning,
                          criterion_class, get_criterion, list_criteria, magnitude_masks, prune, register_criterion, select)
from tandem.prune.masks import apply_weight_masks
from tandem.prune.gates import gate_, ungate_
from tandem.prune.select import MacsModel
from nets import INPUTS, UserNet as _UserNet, randomize_bn as _randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")



def _check_exact(model, x, removed_from, **kw):
    """Prune, and compare the smaller model with the masked original on the same input."""
    pruner = ChannelPruner(model, x[:1], removed_from, **kw)
    removed = pruner.plan()
    assert removed, "nothing was selected"
    small = pruner.apply(removed).eval()
    masked = copy.deepcopy(model)
    ChannelPruner(masked, x[:1], "l1", ratio=0.0).mask(removed)
    want, got = masked(x), small(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * (1 + want.abs().max().item()))
    return pruner, removed, small


# ---- criteria against their definitions -------------------------------------------------------

def test_fpgm_is_the_sum_of_distances_to_the_other_filters():
    filters = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [0.0, 1.0]])
    # hand-computed: d01=5, d02=10, d03=1, d12=5, d13=sqrt(9+9)=4.243, d23=sqrt(36+49)=9.220
    d13, d23 = 18 ** 0.5, 85 ** 0.5
    want = torch.tensor([5 + 10 + 1, 5 + 5 + d13, 10 + 5 + d23, 1 + d13 + d23])
    torch.testing.assert_close(get_criterion("fpgm").filter_scores(filters), want)
    torch.testing.assert_close(get_criterion("l1").filter_scores(filters), torch.tensor([0.0, 7, 14, 1]))
    torch.testing.assert_close(get_criterion("l2").filter_scores(filters), torch.tensor([0.0, 5, 10, 1]))


class _TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_hrank_is_the_average_rank_of_each_channels_map():
    model = _TwoConv()
    with torch.no_grad():
        model.conv1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]).view(3, 2, 1, 1))
    def image(rank_a, rank_b):
        a = torch.diag(torch.tensor([1.0] * rank_a + [0.0] * (5 - rank_a)))
        b = torch.diag(torch.tensor([2.0] * rank_b + [0.0] * (5 - rank_b)))
        return torch.stack([a, b])
    batch = torch.stack([image(1, 3), image(2, 3)])          # channel 0: ranks 1, 2; channel 1: 3, 3
    graph = ChannelGraph(model, batch[:1])
    crit = get_criterion("hrank")
    crit.prepare(graph, [batch])
    group = next(g for g in graph.groups if g.name == "conv1")
    torch.testing.assert_close(crit.score(graph, group), torch.tensor([1.5, 3.0, 0.0]))


def test_bn_scale_scores_gamma_and_random_is_seeded():
    model = _TwoConv()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
    graph = ChannelGraph(model, torch.randn(1, 2, 5, 5))
    group = next(g for g in graph.groups if g.name == "conv1")
    torch.testing.assert_close(get_criterion("bn_scale").score(graph, group), torch.tensor([0.5, 2.0, 1.0]))
    a = get_criterion("random", seed=3).score(graph, group)
    assert torch.equal(a, get_criterion("random", seed=3).score(graph, group))


def test_bn_scale_of_a_residual_stream_is_the_mean_over_its_bns():
    model = _randomize_bn(create_model("resnet20"))
    graph = ChannelGraph(model, torch.randn(1, 3, 32, 32))
    group = next(g for g in graph.groups if g.name == "layer2.0.conv2")
    gammas = torch.stack([model.get_submodule(f"layer2.{b}.bn2").weight.detach().abs() for b in range(3)])
    torch.testing.assert_close(get_criterion("bn_scale").score(graph, group), gammas.mean(0))


STRUCTURED = [c for c in list_criteria() if criterion_class(c).structured]


def test_criteria_listing_and_unknown_criterion():
    names = list_criteria()
    assert {"l1", "l2", "fpgm", "bn_scale", "hrank", "random", "magnitude"} <= set(names)   # the built-in ones
    assert [criterion_class(c).structured for c in names] == sorted((criterion_class(c).structured for c in names),
                                                                     reverse=True)   # structured first
    with pytest.raises(TandemError, match="allowed: .*fpgm.*hrank"):
        get_criterion("taylor")


class _MeanActivation(Criterion):
    """Mean |output| of each conv channel over the batches: a data-driven criterion defined in this
    file, with no edit to tandem. `seen` keeps the sum of |x| of every batch it was given."""
    needs_data = True
    seen: list = []

    def __init__(self, batches: int = 6):
        self.batches = batches
        self.means: dict = {}

    def prepare(self, graph, batches=()):
        convs = {m.module for g in graph.groups for m in g.of_kind("out", "dw")
                 if isinstance(graph.module(m.module), nn.Conv2d)}
        sums: dict = {}

        def hook(name):
            return lambda _m, _i, out: sums.__setitem__(name, sums.get(name, 0) + out.detach().abs().mean((0, 2, 3)))

        handles = [graph.module(n).register_forward_hook(hook(n)) for n in convs]
        try:
            with eval_mode(graph.model), torch.no_grad():
                for x in list(batches)[:self.batches]:
                    type(self).seen.append(x.abs().sum().item())
                    graph.model(x)
        finally:
            for h in handles:
                h.remove()
        self.means = sums

    def score(self, graph, group):
        parts = [self.means.get(m.module) for m in group.of_kind("out", "dw")]
        if not parts or any(p is None for p in parts):
            return None
        return sum(p[m.offset:m.offset + group.size] for p, m in zip(parts, group.of_kind("out", "dw")))


def test_a_criterion_defined_in_a_test_module_prunes_through_the_api_a_recipe_and_a_reload(tmp_path):
    """A new criterion is one class: registered here, it runs through tandem.prune, a recipe
    (given real training batches, not zeros) and a saved, reloaded model file."""
    import tandem
    from tandem.cli import main
    from tandem.prune.criteria import CRITERIA

    register_criterion("mean_activation")(_MeanActivation)
    try:
        torch.manual_seed(0)
        model = _randomize_bn(create_model("small_cnn", in_channels=1))
        x = torch.randn(8, 1, 8, 8)
        _MeanActivation.seen.clear()
        small = tandem.prune(model, x[:1], "mean_activation", ratio=0.5, data=[x, x + 1], batches=1)
        assert _MeanActivation.seen == [pytest.approx(x.abs().sum().item())]
        assert cost.profile(small, (1, 8, 8)).macs < cost.profile(model, (1, 8, 8)).macs
        save_model(small, tmp_path / "small.safetensors")
        back, _ = load_model(tmp_path / "small.safetensors")
        torch.testing.assert_close(back.eval()(x), small.eval()(x))
        with pytest.raises(TandemError, match="all zeros: pass data"):
            tandem.prune(model, torch.zeros(1, 1, 8, 8), "mean_activation", ratio=0.5)
        with pytest.raises(TandemError, match="mean_activation takes no option 'seed'; allowed: batches"):
            tandem.prune(model, x[:1], "mean_activation", ratio=0.5, data=[x], seed=1)

        _MeanActivation.seen.clear()
        out = tmp_path / "run"
        assert main(["run", "method=prune", "prune.criterion=mean_activation", "prune.ratio=0.5",
                     "prune.criterion_options={batches: 2}", "train.epochs=1", "train.progress=false",
                     "report.latency=false", "--out", str(out)]) == 0
        assert len(_MeanActivation.seen) == 2 and all(s > 0 for s in _MeanActivation.seen)   # training batches
        rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["models"]}
        assert rows["pruned"]["macs"] < rows["baseline"]["macs"]
        net, _ = load_model(out / rows["pruned"]["model_file"])
        assert cost.profile(net, (1, 8, 8)).macs == rows["pruned"]["macs"]
    finally:
        CRITERIA.unregister("mean_activation")
    assert "mean_activation" not in list_criteria()


def test_criterion_options_are_validated_and_hrank_batches_still_counts():
    from tandem.recipes import load_recipe

    with pytest.raises(RecipeError, match=r"prune.criterion_options = \{'bins': 3\}: hrank takes no option "
                                          r"'bins'; allowed: batches, ties"):
        load_recipe(None, ["method=prune", "prune.criterion=hrank", "prune.criterion_options={bins: 3}"])
    with pytest.raises(RecipeError, match="hrank: option batches = 'two' must be of type int"):
        load_recipe(None, ["method=prune", "prune.criterion=hrank", "prune.criterion_options={batches: two}"])
    with pytest.raises(RecipeError, match="ties = 'rank' is not allowed"):
        load_recipe(None, ["method=prune", "prune.criterion=hrank", "prune.criterion_options={ties: rank}"])
    r = load_recipe(None, ["method=prune", "prune.criterion=hrank", "prune.hrank_batches=3"])
    assert (r.prune.options_for_criterion(), r.prune.data_batches()) == ({"batches": 3}, 3)
    r = load_recipe(None, ["method=prune", "prune.criterion=hrank", "prune.criterion_options={batches: 2, ties: l1}"])
    assert (r.prune.options_for_criterion(), r.prune.data_batches()) == ({"batches": 2, "ties": "l1"}, 2)
    r = load_recipe(None, ["method=prune", "prune.criterion=random", "prune.criterion_options.seed=4"])
    assert (r.prune.options_for_criterion(), r.prune.data_batches()) == ({"seed": 4}, 0)


# ---- surgery is exact -------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_models())
def test_surgery_preserves_outputs_on_every_builtin_model(name):
    torch.manual_seed(0)
    shape = INPUTS.get(name, (3, 16, 16))
    kw = {"stem": "cifar"} if name == "resnet18" else {}
    model = _randomize_bn(create_model(name, in_channels=shape[0], **kw))
    x = torch.randn(2, *shape)
    pruner, removed, small = _check_exact(model, x, "l1", macs_target=0.5, scope="global")
    base, after = cost.profile(model, shape).macs, cost.profile(small, shape).macs
    assert after <= 0.5 * base
    predicted = MacsModel(pruner.graph)
    for g in pruner.graph.groups:
        if g.name in removed:
            predicted.remove(g, len(removed[g.name]))
    assert after == pytest.approx(predicted.total)                # the selection's MACs model is exact
    assert small.config["widths"] != model.config["widths"]
    assert json.loads(json.dumps(small.config)) == small.config   # rebuilds from its config


def test_option_a_resnet_prunes_its_residual_streams_through_the_shortcut_map(tmp_path):
    model = _randomize_bn(create_model("resnet20"))
    x = torch.randn(2, 3, 32, 32)
    graph = ChannelGraph(model, x[:1])
    streams = ["stem.0", "layer2.0.conv2", "layer3.0.conv2"]      # one group per stage's residual stream
    internal = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert sorted(g.name for g in graph.groups) == sorted(internal + streams)
    stage2 = next(g for g in graph.groups if g.name == "layer2.0.conv2")
    assert {m.module for m in stage2.of_kind("out")} == {f"layer2.{b}.conv2" for b in range(3)}
    assert [(m.module, m.kind) for m in stage2.of_kind("map_out")] == [("layer2.0.shortcut", "map_out")]
    # removing residual channels on both sides of a shortcut is exact (pruned == masked)
    removed = {"stem.0": torch.tensor([0, 5, 9, 15]), "layer2.0.conv2": torch.tensor([0, 7, 8, 20, 31])}
    pruner = ChannelPruner(model, x[:1], "l1", ratio=0.0)
    small = pruner.apply(removed).eval()
    masked = copy.deepcopy(model)
    ChannelPruner(masked, x[:1], "l1", ratio=0.0).mask(removed)
    torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-5)
    sc = small.layer2[0].shortcut
    assert (sc.in_ch, sc.out_ch) == (12, 27)
    # stage-1 channel i sat at position 8 + i; positions 8 and 20 are gone, as are sources 0, 5, 9, 15
    kept_pos = [j for j in range(32) if j not in (0, 7, 8, 20, 31)]
    kept_src = [i for i in range(16) if i not in (0, 5, 9, 15)]
    want = [kept_src.index(j - 8) if 8 <= j < 24 and (j - 8) in kept_src else -1 for j in kept_pos]
    assert sc.channel_map == want
    # the map travels in the config: the saved model rebuilds without the original
    save_model(small, tmp_path / "p.safetensors")
    loaded, _ = load_model(tmp_path / "p.safetensors")
    assert torch.equal(loaded.eval()(x), small(x))
    # gating a residual stream gates the shortcut's copy too
    gates = gate_(model, x[:1], "sign", groups=["layer3.0.conv2"])
    with torch.no_grad():
        gates.gates["layer3/0/conv2"].m.fill_(1.0)[[3, 40]] = -1.0
    gated = model(x)
    assert {k: v.tolist() for k, v in ungate_(model).items()} == {"layer3.0.conv2": [3, 40]}
    masked = copy.deepcopy(model)
    ChannelPruner(masked, x[:1], "l1", ratio=0.0).mask({"layer3.0.conv2": torch.tensor([3, 40])})
    torch.testing.assert_close(gated, masked(x))


def test_ignore_keeps_the_matching_groups_whole():
    import tandem.prune
    model = create_model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    small = tandem.prune(model, x, "fpgm", ratio=0.5, ignore=["stem.0", "*.conv2"])   # the package is callable
    w = small.config["widths"]
    assert w[0] == 16 and w[2::2] == model.config["widths"][2::2]      # streams whole
    assert w[1::2] == [8] * 3 + [16] * 3 + [32] * 3                    # block-internal halved
    assert small.config["kwargs"]["channel_maps"]["layer2.0.shortcut"] == model.layer2[0].shortcut.channel_map
    with pytest.raises(TandemError, match="ignore pattern 'nope' matches no layer"):
        tandem.prune(model, x, ratio=0.5, ignore=["nope"])
    with pytest.raises(TandemError, match="leaves no channel group"):
        tandem.prune(model, x, ratio=0.5, ignore=["*conv*"])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_round_to_keeps_widths_multiples_and_the_target(scope):
    model = _randomize_bn(create_model("resnet56"))
    x = torch.randn(1, 3, 32, 32)
    base = cost.profile(model).macs
    exact = prune(model, x, "l1", macs_target=0.5, scope=scope)
    small = prune(model, x, "l1", macs_target=0.5, scope=scope, round_to=8)
    widths = small.config["widths"]
    assert widths != exact.config["widths"]
    assert any(w % 8 for w in exact.config["widths"]) and all(w % 8 == 0 for w in widths)
    assert cost.profile(small).macs <= 0.5 * base * (1 + 1e-9)      # the target still holds
    # both move in whole blocks (stage 1: 16 -> 8), so they can pass the target by up to one block's MACs
    assert cost.profile(small).macs >= 0.38 * base
    removed = ChannelPruner(model, x, "l1", macs_target=0.5, scope=scope, round_to=8).plan()
    assert all(len(idx) % 8 == 0 for idx in removed.values())        # 16/32/64-wide groups lose whole blocks
    narrow = prune(create_model("resnet20", widths=[4] * 19), x, "l1", ratio=0.5, round_to=8)
    assert narrow.config["widths"] == [4] * 19                       # no wider than a block: left whole
    with pytest.raises(TandemError, match="round_to=0 is not allowed"):
        prune(model, x, "l1", ratio=0.5, round_to=0)
    with pytest.raises(TandemError, match="would have no effect"):
        prune(model, x, "magnitude", ratio=0.5, round_to=8)


@pytest.mark.parametrize("criterion", STRUCTURED)
def test_every_criterion_prunes_saves_reloads_and_exports(tmp_path, criterion):
    from tandem.export import export_onnx, ort_session
    torch.manual_seed(0)
    model = _randomize_bn(create_model("resnet20", widths=[8] * 7 + [16] * 6 + [32] * 6)).eval()
    x = torch.randn(8, 3, 32, 32)
    small = prune(model, x[:1], criterion, ratio=0.5, data=[x]).eval()
    assert cost.profile(small).macs < cost.profile(model).macs
    save_model(small, tmp_path / "p.safetensors")
    back, _ = load_model(tmp_path / "p.safetensors")
    back.eval()
    torch.testing.assert_close(back(x), small(x))
    path = export_onnx(back, tmp_path / "p.onnx", (3, 32, 32)).path
    out = ort_session(path).run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), small(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("criterion", STRUCTURED)
def test_surgery_preserves_outputs_on_user_models(criterion):
    torch.manual_seed(0)
    model = _randomize_bn(_UserNet())
    x = torch.randn(4, 3, 12, 12)
    graph = ChannelGraph(model, x[:1])
    names = {g.name: g for g in graph.groups}
    assert {"stem.0", "b1", "b2", "pw.0", "fc1"} <= set(names)
    assert {m.module for m in names["stem.0"].of_kind("out")} == {"stem.0", "a.0"}      # residual
    assert {(m.module, m.kind, m.offset) for m in names["b2"].members if m.offset} == {
        ("bn_cat", "bn", 8), ("dw.0", "dw", 8), ("dw.1", "bn", 8), ("pw.0", "in", 8)}       # concat offsets
    assert {m.module for m in names["pw.0"].of_kind("out")} == {"pw.0", "se"}           # SE multiply
    assert [m.repeat for m in names["pw.0"].of_kind("in") if m.module == "fc1"] == [4]  # flatten
    scope = criterion_class(criterion).default_scope
    _, removed, small = _check_exact(model, x, criterion, ratio=0.5, scope=scope, data=[x])
    assert not hasattr(small, "config") and isinstance(small, _UserNet)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.mid(F.relu(self.conv(x)))
        x = self.mid(F.relu(x))                     # the same layer twice: its channels are frozen
        return self.head(x.mean((2, 3)))


def test_layers_called_twice_are_left_alone_and_gates_equal_masks():
    graph = ChannelGraph(_Shared(), torch.randn(1, 3, 8, 8))
    assert [g.name for g in graph.groups] == []
    torch.manual_seed(0)
    model = _randomize_bn(_TwoConv())
    x = torch.randn(2, 2, 6, 6)
    graph = ChannelGraph(model, x[:1])
    gates = gate_(model, x[:1], "sign", groups=["conv1"])
    with torch.no_grad():
        gates.gates["conv1"].m.copy_(torch.tensor([1.0, -1.0, 1.0]))
    gated = model(x)
    ungate_(model)
    masked = copy.deepcopy(model)
    ChannelPruner(masked, x[:1], ratio=0.0).mask({"conv1": torch.tensor([1])})
    torch.testing.assert_close(gated, masked(x))


# ---- selection ---------------------------------------------------------------------------------

def test_selection_limits_and_errors():
    model = create_model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    pruner = ChannelPruner(model, x, "l1", ratio=0.5, max_ratio=0.9)
    scores = pruner.scores()
    per_layer = select(pruner.graph, scores, ratio=0.5)
    assert all(len(v) == g.size // 2 for g in pruner.graph.groups for k, v in per_layer.items() if k == g.name)
    glob = select(pruner.graph, scores, ratio=0.5, scope="global")
    assert sum(map(len, glob.values())) == sum(g.size for g in pruner.graph.groups) // 2
    deep = select(pruner.graph, scores, macs_target=0.2, scope="global", max_ratio=0.95)
    assert all(len(deep.get(g.name, [])) < g.size for g in pruner.graph.groups)       # never emptied
    with pytest.raises(TandemError, match=r"ratio=1.0 is outside the allowed range \[0, 1\)"):
        ChannelPruner(model, x, "l1", ratio=1.0)
    with pytest.raises(TandemError, match="max_ratio=0.5"):
        prune(model, x, "l1", macs_target=0.2, max_ratio=0.5)
    with pytest.raises(TandemError, match="max_ratio=0.5"):
        prune(model, x, "l1", macs_target=0.2, max_ratio=0.5, scope="global")
    with pytest.raises(TandemError, match="unknown pruning criterion 'l3'; allowed"):
        prune(model, x, "l3", ratio=0.5)
    with pytest.raises(TandemError, match="scope='local' is not allowed"):
        prune(model, x, "l1", ratio=0.5, scope="local")


# ---- schedules ---------------------------------------------------------------------------------

class _FakeTrainer:
    def __init__(self, net):
        self.nets = {"net": net}


def _sgd_steps(model, x, y, n, momentum=0.9, weight_decay=5e-4, callbacks=()):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    trainer = _FakeTrainer(model)
    model.train()
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for cb in callbacks:
            getattr(cb, "after_backward", lambda t: None)(trainer)
        opt.step()
        for cb in callbacks:
            getattr(cb, "after_step", lambda t: None)(trainer)


def test_soft_pruning_zeroes_filters_that_then_regrow():
    torch.manual_seed(0)
    model = _randomize_bn(create_model("small_cnn", in_channels=1))   # a trained BN shift (beta != 0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    pruner = ChannelPruner(model, x[:1], "l2", ratio=0.5)
    soft = SoftPruning(pruner)
    soft.before_validation(_FakeTrainer(model), 1)
    removed = soft._last
    conv = model.features[0][0]
    zeroed = removed["features.0.0"]
    assert conv.weight[zeroed].abs().sum() == 0
    assert (model.features[0][1].weight[zeroed] != 0).all()               # soft: BN kept
    assert soft.history[0]["zeroed"] == sum(len(v) for v in removed.values())
    beta = model.features[0][1].bias[zeroed].detach().clone()
    _sgd_steps(model, x, y, 3)
    grown = conv.weight[zeroed].flatten(1).abs().sum(1) > 0
    # they regrow; a zeroed channel gets a gradient through BN when ReLU(beta) passes it (beta > 0)
    assert grown[beta > 0].all() and grown.any()
    final = pruner.apply(pruner.plan())
    assert final.config["widths"] == [8, 16, 32]


@pytest.mark.parametrize("zero_bn", [False, True])
def test_soft_pruning_zeroes_before_validation_so_the_selected_state_is_zeroed(zero_bn):
    from tandem.data import BatchLoader, load_dataset
    from tandem.engine import Trainer, cross_entropy_objective
    from tandem.recipes import TrainSpec

    torch.manual_seed(0)
    data = load_dataset("digits", val_fraction=0.2, seed=0)
    train = BatchLoader(data.train, 64, shuffle=True, mean=data.mean, std=data.std, seed=0)
    val = BatchLoader(data.val, 256, mean=data.mean, std=data.std)
    model = create_model("small_cnn", in_channels=1)
    soft = SoftPruning(ChannelPruner(model, torch.zeros(1, 1, 8, 8), "l2", ratio=0.5), zero_bn=zero_bn)
    best = Trainer({"net": model}, cross_entropy_objective, TrainSpec(epochs=2, lr=0.05, progress=False),
                   callbacks=[soft]).fit(train, val)
    assert sorted(soft.by_epoch) == [1, 2]
    zeroed = soft.by_epoch[best["net"]["epoch"]]["features.0.0"]
    conv, bn = model.features[0][0], model.features[0][1]
    assert conv.weight[zeroed].abs().sum() == 0            # the state selected by validation is the zeroed one
    assert (bn.weight[zeroed].abs().sum() == 0) == zero_bn and (bn.bias[zeroed].abs().sum() == 0) == zero_bn


def test_slimming_penalty_adds_the_l1_subgradient():
    model = _TwoConv()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([0.5, -2.0, 0.0]))
    F.cross_entropy(model(torch.randn(2, 2, 4, 4)), torch.tensor([0, 1])).backward()
    before = model.bn1.weight.grad.clone()
    SlimmingPenalty(0.1).after_backward(_FakeTrainer(model))
    torch.testing.assert_close(model.bn1.weight.grad - before, torch.tensor([0.1, -0.1, 0.0]))


def test_magnitude_masks_hold_through_fine_tuning_and_count_as_nonzero_macs():
    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=1)
    masks = magnitude_masks(model, 0.7)
    apply_weight_masks(model, masks)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    _sgd_steps(model, x, y, 3, callbacks=[KeepMasked(model, masks)])
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.equal(m.weight != 0, masks[f"{name}.weight"]) or (m.weight[~masks[f"{name}.weight"]] == 0).all()
            assert (m.weight == 0).float().mean() >= 0.69
    c = cost.profile(model, (1, 8, 8))
    assert c.nonzero_macs == pytest.approx(0.3 * c.macs, rel=0.02)
    same = prune(create_model("small_cnn", in_channels=1), x[:1], "magnitude", macs_target=0.3)
    assert cost.profile(same, (1, 8, 8)).nonzero_macs == pytest.approx(0.3 * c.macs, rel=0.02)


# ---- the recipe method ------------------------------------------------------------------------

def test_prune_method_end_to_end_and_eval(tmp_path, capsys):
    from tandem.cli import main

    out = tmp_path / "run"
    assert main(["run", "method=prune", "prune.criterion=fpgm", "prune.macs_target=0.5", "train.epochs=1",
                 "train.progress=false", "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["models"]}
    assert rows["pruned"]["macs"] <= 0.5 * rows["baseline"]["macs"]
    assert rows["pruned"]["params"] < rows["baseline"]["params"]
    net, _ = load_model(out / rows["pruned"]["model_file"])
    assert cost.profile(net, (1, 8, 8)).macs == rows["pruned"]["macs"]
    capsys.readouterr()
    assert main(["eval", str(out / rows["pruned"]["model_file"])]) == 0
    assert f"test top-1 {rows['pruned']['top1']:.2f}%" in capsys.readouterr().out


def test_prune_recipe_ignore_keeps_those_layers_whole(tmp_path):
    from tandem.cli import main

    out = tmp_path / "run"
    assert main(["run", "method=prune", "prune.ratio=0.5", "prune.ignore=[features.0.0]", "train.epochs=1",
                 "train.progress=false", "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["models"]}
    net, _ = load_model(out / rows["pruned"]["model_file"])
    assert net.config["widths"] == [16, 16, 32]


def test_prune_recipe_round_to_is_applied_and_recorded(tmp_path):
    import yaml
    from tandem.cli import main

    out = tmp_path / "run"
    assert main(["run", "method=prune", "prune.ratio=0.3", "prune.round_to=8", "train.epochs=1",
                 "train.progress=false", "report.latency=false", "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["models"]}
    net, _ = load_model(out / rows["pruned"]["model_file"])
    base, _ = load_model(out / rows["baseline"]["model_file"])
    assert all(w % 8 == 0 for w in net.config["widths"]) and net.config["widths"] != base.config["widths"]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["prune"]["round_to"] == 8


def test_prune_recipe_errors_name_what_is_allowed():
    from tandem.recipes import load_recipe

    with pytest.raises(RecipeError, match=r"prune.ratio = 1.5: .*allowed range \[0, 1\)"):
        load_recipe(None, ["method=prune", "prune.ratio=1.5"])
    with pytest.raises(RecipeError, match="prune.criterion = 'taylor': unknown pruning criterion; allowed: .*l1"):
        load_recipe(None, ["method=prune", "prune.criterion=taylor"])
    with pytest.raises(RecipeError, match="unknown key 'prune.epochs'; allowed here: criterion"):
        load_recipe(None, ["method=prune", "prune.epochs=3"])
    with pytest.raises(RecipeError, match="would have no effect"):
        load_recipe(None, ["method=prune", "prune.criterion=magnitude", "prune.ratio=0.5", "prune.round_to=8"])
    r = load_recipe(None, ["method=prune", "prune.criterion=hrank", "prune.scope=global", "prune.macs_target=0.3"])
    assert r.prune.target() == {"ratio": None, "macs_target": 0.3}


def test_iterative_and_slimming_schedules_run_and_resume(tmp_path, capsys):
    from tandem.cli import main

    out = tmp_path / "it"
    args = ["run", "method=prune", "prune.criterion=l1", "prune.schedule=iterative", "prune.steps=2",
            "prune.macs_target=0.4", "train.epochs=2", "train.progress=false", "--out", str(out)]
    assert main(args) == 0
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["models"]}
    assert rows["pruned"]["macs"] <= 0.4 * rows["baseline"]["macs"]
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["baseline", "finetune1", "finetune2"]
    assert main(["run", "--resume", "--out", str(out)]) == 0      # finished stages reload, same result
    again = {r["name"]: r for r in json.loads((out / "results.json").read_text())["models"]}
    assert again["pruned"]["top1"] == rows["pruned"]["top1"]
    out = tmp_path / "slim"
    assert main(["run", "method=prune", "prune.criterion=bn_scale", "prune.sparsity_epochs=1", "prune.ratio=0.5",
                 "train.epochs=1", "train.progress=false", "--out", str(out)]) == 0
    assert (out / "stages" / "sparsity" / "done.json").exists()
    capsys.readouterr()
