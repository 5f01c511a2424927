"""SBS: the bit-sharing decomposition against direct quantization, refused candidate lists, the
differentiable BOPs against cost.profile of the hard configuration on every built-in model,
gradients to every threshold, the tau clamp, compact = gated model, and a run end to end."""
import json

from types import SimpleNamespace

import pytest
import torch

from tandem import cost
from tandem.cli import main
from tandem.errors import TandemError
from tandem.methods.sbs import SearchControl, WidthLog, attach_kept, channel_groups, differentiable_bops, freeze, tau_max
from tandem.models import list_models
from tandem.prune import ChannelGraph
from tandem.prune.gates import gate_
from tandem.quant import calibrate, quantize_
from tandem.quant.bit_sharing import BitGates, check_candidates, q_unit, shared, search_
from nets import builtin

pytestmark = pytest.mark.usefixtures("one_thread")


def test_decomposition_equals_direct_quantization_for_every_gate_setting():
    # exact in real arithmetic; float32 sums of the terms fall one step off for about 1 z in
    # 10^5 (a residual next to a rounding midpoint), so the written-out sum is checked in float64
    z = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gates = BitGates(2).double()
    for g1, g2, want in ((0, 0, 2), (0, 1, 2), (1, 0, 4), (1, 1, 8)):
        # a threshold above every residual closes a gate, a negative one opens it
        with torch.no_grad():
            gates.threshold.copy_(torch.tensor([-1.0 if g1 else 10.0, -1.0 if g2 else 10.0]))
        torch.testing.assert_close(shared(z, [2, 4, 8], gates), q_unit(z, want), atol=1e-12, rtol=0)
    torch.testing.assert_close(shared(z, [2, 4, 8], None), q_unit(z, 8), atol=1e-12, rtol=0)   # all open = 8 bit
    torch.testing.assert_close(shared(z, [1, 2, 4, 8], None), q_unit(z, 8), atol=1e-12, rtol=0)


def test_candidate_lists_that_do_not_nest_are_refused():
    assert check_candidates([8, 2, 4]) == [2, 4, 8]
    for bad, words in (([2, 3, 4], "2 does not divide 3"), ([2, 4, 16], "1..8"), ([0, 2], "1..8"), ([], "1..8")):
        with pytest.raises(TandemError, match=words):
            check_candidates(bad)


def _searching(name, channels=True):
    model, shape = builtin(name)
    x = torch.randn(4, *shape)
    model = quantize_(model, method="sbs", w_bits=8, a_bits=8, first_last=8)
    calibrate(model, [x])
    quantizers = search_(model, [2, 4, 8])
    graph = ChannelGraph(model, x[:1])
    gates = None
    if channels:
        groups = [n for n in channel_groups(graph, "internal") if graph_size(graph, n) % 2 == 0]
        if groups:
            gates = gate_(model, x[:1], "threshold", groups=groups, group_size=2)
            attach_kept(model, graph, gates)
    return model, gates, quantizers, graph, x, shape


def graph_size(graph, name):
    return next(g.size for g in graph.groups if g.name == name)


def _random_choice(quantizers, gates, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in quantizers:
            q.gates.threshold.copy_(torch.where(torch.rand(2, generator=g) < 0.5, torch.tensor(10.0), torch.tensor(-1.0)))
        for gate in (gates.gates.values() if gates is not None else []):
            gate.threshold.copy_(gate.scores().median())


@pytest.mark.parametrize("name", [n for n in list_models() if n not in ("resnet110", "resnet56", "preact_resnet56")])
def test_differentiable_bops_equals_the_profile_of_the_compact_model(name):
    model, gates, quantizers, graph, x, shape = _searching(name)
    _random_choice(quantizers, gates)
    model.eval()
    out = model(x)
    bops = differentiable_bops(model, graph, gates)
    compact = freeze(model, x[:1]).eval()
    assert float(bops.detach()) == pytest.approx(cost.profile(compact, shape).bops, rel=1e-6)
    torch.testing.assert_close(compact(x), out, rtol=1e-4, atol=1e-4 * (1 + out.abs().max().item()))


def test_gradients_reach_every_threshold_and_the_clamp_holds():
    model, gates, quantizers, graph, x, shape = _searching("preact_resnet20")
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.threshold.fill_(float(gate.scores().mean()))   # near the scores: a nonzero sigmoid slope
    model.train()
    model(x)
    torch.log(torch.as_tensor(differentiable_bops(model, graph, gates))).backward()
    ts = [q.gates.threshold for q in quantizers] + [g.threshold for g in gates.gates.values()]
    assert all(t.grad is not None and bool((t.grad != 0).all()) for t in ts)
    control = SearchControl(quantizers, gates, max_prune_ratio=0.25)
    with torch.no_grad():
        for t in ts:
            t.fill_(5.0)
        quantizers[0].gates.threshold.fill_(-3.0)
    control.after_step(None)
    assert float(quantizers[0].gates.threshold.min()) == 0.0
    for gate in gates.gates.values():
        assert float(gate.threshold) == pytest.approx(tau_max(gate, 0.25))
        closed = int((gate.scores() <= gate.threshold).sum())
        assert closed <= max(1, int(gate.size * 0.25 / 2))


def test_sbs_runs_end_to_end_and_exports(tmp_path, capsys, one_thread):
    args = ["method=sbs", "train.epochs=1", "sbs.search_epochs=1", "sbs.finetune_epochs=1", "sbs.group_size=2",
            "sbs.threshold_lr=0.5", "sbs.warmup_epochs=1", "train.progress=false"]
    assert main(["run", *args, "--out", str(tmp_path / "run")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "run" / "results.json").read_text())["models"]}
    assert {"sbs/init", "sbs/searched", "sbs/compressed", "sbs/bits-only", "sbs/init-4bit", "sbs/4bit"} <= set(rows)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = {stage: sum(1 for r in log if r.get("stage") == stage and "epoch_time" in r)
              for stage in ("sbs-warmup", "sbs-search", "sbs-bits-only-search", "sbs-4bit-search")}
    assert epochs == {"sbs-warmup": 1, "sbs-search": 1, "sbs-bits-only-search": 1, "sbs-4bit-search": 2}
    widths = [r for r in log if "input_width_flips" in r]   # one line per search epoch of each search
    assert [r["stage"] for r in widths] == ["sbs-search", "sbs-bits-only-search"]
    assert all(0 <= r["inputs_that_changed_width"] <= r["inputs"] > 0 for r in widths)
    c = rows["sbs/compressed"]
    assert c["control"] == ["sbs/4bit", "sbs/bits-only"] and c["bops_ratio"] == pytest.approx(
        rows["baseline"]["bops"] / c["bops"])
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert main(["export", str(tmp_path / "run"), "--format", "safetensors"]) == 0


def test_a_4bit_budget_is_the_uniform_4bit_controls_bops(tmp_path, one_thread):
    args = ["method=sbs", "train.epochs=1", "sbs.search_epochs=1", "sbs.finetune_epochs=0", "sbs.group_size=2",
            "sbs.bops_target=4bit", "sbs.bops_match=true", "sbs.controls=[uniform4]", "train.progress=false"]
    assert main(["run", *args, "--out", str(tmp_path / "run")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "run" / "results.json").read_text())["models"]}
    assert rows["sbs/compressed"]["bops_target_ratio"] == pytest.approx(rows["sbs/4bit"]["bops_ratio"])
    assert "bops_target: 4bit" in (tmp_path / "run" / "recipe.yaml").read_text()


def test_bad_input_one_line_exit_2(refused):
    refused(["method=sbs", "train.epochs=1", "train.progress=false"],
            [(["sbs.bits=[2,3]"], "2 does not divide 3"), (["sbs.bits=[2,16]"], "1..8"),
             (["sbs.bops_target=1.5"], "sbs.bops_target = 1.5"),
             (["sbs.group_size=3"], "does not divide the 16 output channels of layer")])


def test_the_one_node_search_quantizer_has_the_decompositions_gradients():
    """_SharedUnit (memory: one saved tensor) against the decomposition written out in autograd."""
    from tandem.quant.bit_sharing import SBSWeight
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    fast = SBSWeight(8)
    fast.start_search([2, 4, 8])
    with torch.no_grad():
        fast.gates.threshold.copy_(torch.tensor([0.01, 0.0005]))
    ref = BitGates(2)
    ref.load_state_dict(fast.gates.state_dict())
    coeff = torch.randn_like(w)
    for use_fast in (True, False):
        wi = w.clone().requires_grad_(True)
        z = fast._z(wi)
        out = fast._quantize_unit(z) if use_fast else shared(z, [2, 4, 8], ref)
        (out * coeff).sum().backward()
        grads = (wi.grad.clone(), (fast.gates if use_fast else ref).threshold.grad.clone())
        if use_fast:
            first, value = grads, out.detach()
        else:
            torch.testing.assert_close(value, out.detach(), atol=1e-6, rtol=0)
            torch.testing.assert_close(first[0], grads[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(first[1], grads[1], atol=1e-5, rtol=1e-4)
    assert (first[1] != 0).all()


def test_the_one_node_input_quantizer_has_the_decompositions_gradients():
    """SBSAct in search: value alpha * (the written-out sum at z = clip(x / alpha, 0, 1)); the
    same gradients to x (1 inside (0, alpha)) and to every bit threshold."""
    from tandem.quant.bit_sharing import SBSAct
    torch.manual_seed(0)
    x = torch.randn(8, 16, 6, 6) * 1.5
    fast = SBSAct(8, signed=False)
    with torch.no_grad():
        fast.alpha.fill_(2.0)
    fast.start_search([2, 4, 8])
    ref = BitGates(2)
    for thresholds in ([0.0, 0.0], [0.02, 0.0005], [1.0, 0.0]):
        with torch.no_grad():
            fast.gates.threshold.copy_(torch.tensor(thresholds))
            ref.threshold.copy_(torch.tensor(thresholds))
        coeff = torch.randn_like(x)
        got, want = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out = fast.quantize(got)
        (out * coeff).sum().backward()
        ref_out = 2.0 * shared(torch.clamp(want / 2.0, 0, 1), [2, 4, 8], ref)
        (ref_out * coeff).sum().backward()
        torch.testing.assert_close(out.detach(), ref_out.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(got.grad, want.grad)
        torch.testing.assert_close(fast.gates.threshold.grad, ref.threshold.grad, atol=1e-4, rtol=1e-4)
        assert fast.gates.threshold.grad.abs().sum() > 0
        fast.gates.threshold.grad, ref.threshold.grad = None, None


def test_a_matched_budget_pulls_bops_up_as_well_as_down(monkeypatch):
    """Below the target the hinge is flat; bops_match pushes the BOPs back up to it."""
    import tandem.methods.sbs as sbs_module
    bops = torch.tensor(100.0, requires_grad=True)
    monkeypatch.setattr(sbs_module, "differentiable_bops", lambda *a: bops)
    out, y = {"net": torch.zeros(2, 3)}, torch.zeros(2, dtype=torch.long)
    for match, grad_sign in ((False, 0), (True, -1)):
        bops.grad = None
        spec = sbs_module.SbsSpec(bops_target=0.5, bops_match=match)
        sbs_module.sbs_objective(spec, None, None, None, 200.0)(out, y, None)["bops/net"].backward()
        assert torch.sign(bops.grad).item() == grad_sign
    with pytest.raises(ValueError, match="bops_match keeps the search at sbs.bops_target"):
        sbs_module.SbsSpec(bops_match=True)
    assert sbs_module.SbsSpec(bops_target="4bit").bops_target == "4bit"


def test_input_bits_follow_running_residual_statistics_not_one_batch():
    """A threshold between two batches' residual means: the per-batch choice (the code) flips
    width with the batch; the running means hold one width, and the frozen width is theirs."""
    from tandem.quant.bit_sharing import SBSAct, residual_means
    torch.manual_seed(0)
    coarse, fine = torch.rand(4, 8, 5, 5) * 1.0, torch.rand(4, 8, 5, 5) * 0.05   # large / small 2-bit residuals
    widths = {}
    for mode in ("running", "batch"):
        q = SBSAct(8, signed=False)
        q.start_search([2, 4, 8], from_running=mode == "running")
        m_coarse, m_fine = (float(residual_means(x, [2, 4, 8])[0]) for x in (coarse, fine))
        with torch.no_grad():
            q.gates.threshold.copy_(torch.tensor([(m_coarse + m_fine) / 2, 0.0]))
        seen, log = [], WidthLog([q])
        for x in [coarse] * 5 + [fine, coarse, fine]:
            q.quantize(x)
            log.after_step(None)
            seen.append(q._width(torch.stack(q.products).gt(0.5).tolist()))
        widths[mode] = seen
        written = []
        log.before_validation(SimpleNamespace(stage="s", log=SimpleNamespace(write=written.append)), 1)
        assert written[0]["input_width_flips"] == (0 if mode == "running" else 3)
        if mode == "running":
            assert q.selected() == 8 and int(q.gates.seen) == 8
            before = q.gates.running_means.clone()
            q.eval()
            q.quantize(fine)   # eval mode: the statistics do not move
            assert torch.equal(q.gates.running_means, before)
    assert widths["running"] == [8] * 8
    assert widths["batch"][5:] == [2, 8, 2]


def test_sbs_clips_start_calibrated_and_weights_keep_their_scale():
    from tandem.quant.bit_sharing import SBSWeight
    from tandem.quant.observers import percentile_range
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * 0.05 + 0.01
    for scale, want in (("restored", w), ("standardised", (w - w.mean()) / w.std())):
        net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 1),
                                  torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
        with torch.no_grad():
            net[2].weight.normal_()
        conv = net[0]
        with torch.no_grad():
            conv.weight.copy_(w)
        x = torch.rand(4, 8, 6, 6)
        with torch.no_grad():
            inner_input = torch.relu(conv(x))
        quantize_(net, method="sbs", w_bits=8, a_bits=8, first_last="same", sbs_weight_scale=scale)
        calibrate(net, [x])
        conv = net[0]
        wq = conv.weight_quantizer
        w_hat = (w - (0 if scale == "restored" else w.mean())) / w.std()
        assert float(wq.alpha) == pytest.approx(float(percentile_range(w_hat.abs(), 99.99)[1]), rel=1e-5)
        relative = ((wq(conv.weight) - want).abs().mean() / want.abs().mean()).item()
        assert relative < 0.02   # 8 bits: the quantized weight is the weight (restored) or its standardised form
        inner = net[2].input_quantizer   # an input's alpha starts at the 99.99th percentile of the input
        if scale == "restored":          # (standardised weights make conv 0's output another one)
            assert float(inner.alpha) == pytest.approx(float(percentile_range(inner_input, 99.99)[1]), rel=0.02)
    paper = quantize_(torch.nn.Sequential(torch.nn.Conv2d(8, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)),
                      method="sbs", w_bits=8, a_bits=8, first_last="same", act_init="paper")
    calibrate(paper, [torch.rand(2, 8, 6, 6)])
    assert float(paper[0].weight_quantizer.alpha) == 1.0 == float(paper[2].input_quantizer.alpha)


def test_the_method_composes_bit_sharing_without_its_internals():
    """methods/sbs.py asks tandem.quant.bit_sharing (and quantize's record) by function: it names no
    bit-sharing class and edits no transform record."""
    import inspect
    import tandem.methods.sbs as sbs_module
    source = inspect.getsource(sbs_module)
    assert not any(word in source for word in ("SBSWeight", "SBSAct", "tandem_transforms", "kept_by"))
