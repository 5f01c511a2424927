"""Quantizers against their papers' formulas, quantize_ on user models, the quantize method."""
import json
import math

import pytest
import torch
import torch.nn as nn

import tandem
from tandem import cost
from tandem.errors import RecipeError, TandemError
from tandem.quant import (DoReFaAct, DoReFaWeight, KMeansWeight, LSQAct, LSQWeight, MinMaxWeight, ObserverAct,
                          PACTAct, PICPQWeight, QuantConv2d, QuantLinear, calibrate, kmeans_1d, layer_plan,
                          quantize_, round_ste)
from tandem.quant.observers import affine_qparams



pytestmark = pytest.mark.usefixtures("one_thread")

def _levels(t):
    return sorted(set(torch.round(t.detach() * 1e5).div(1e5).flatten().tolist()))


def test_round_ste_is_exact_forward_identity_backward():
    x = torch.tensor([0.2, 0.5, 1.5, 2.7, -1.2], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_dorefa_weight_formula_and_levels(k):
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    n = 2 ** k - 1
    t = torch.tanh(w)
    expected = 2 * torch.round((t / (2 * t.abs().max()) + 0.5) * n) / n - 1
    q = DoReFaWeight(k)(w)
    assert torch.allclose(q, expected, atol=1e-6)
    assert len(_levels(q)) <= 2 ** k and q.abs().max() <= 1 + 1e-6
    assert _levels(q)[0] == -1.0 and _levels(q)[-1] == 1.0   # the extreme weight maps to +-1


def test_dorefa_one_bit_is_sign_times_mean_abs():
    w = torch.tensor([[0.5, -1.0, 2.0, -0.5]])
    q = DoReFaWeight(1)(w)
    assert torch.allclose(q, torch.sign(w) * w.abs().mean())


@pytest.mark.parametrize("k", [2, 4, 8])
def test_picpq_weight_is_symmetric_grid(k):
    torch.manual_seed(0)
    w = torch.randn(16, 8)
    n = 2 ** (k - 1) - 1
    t = torch.tanh(w)
    expected = torch.round(t / t.abs().max() * n) / n
    q = PICPQWeight(k)(w)
    assert torch.allclose(q, expected, atol=1e-6)
    assert len(_levels(q)) <= 2 ** k - 1 and 0.0 in _levels(q) or k == 1


def test_dorefa_activation_levels_and_ste():
    aq = DoReFaAct(2)
    aq.set_flags(calibrated=True, signed=False)
    x = torch.tensor([-0.5, 0.1, 0.2, 0.5, 0.9, 1.7], requires_grad=True)
    y = aq(x)
    assert torch.allclose(y, torch.tensor([0, 0, 1 / 3, 2 / 3, 1, 1]), atol=1e-6)  # round half to even at .5*3
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 0]))


def test_pact_forward_and_gradients():
    aq = PACTAct(2, alpha=2.0)
    aq.set_flags(calibrated=True, signed=False)
    x = torch.tensor([-1.0, 0.3, 1.0, 1.9, 2.5, 4.0], requires_grad=True)
    y = aq(x)
    a, n = 2.0, 3
    expected = torch.round(x.detach().clamp(0, a) * n / a) * a / n
    assert torch.allclose(y, expected)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y.backward(g)
    assert torch.equal(x.grad, torch.tensor([0.0, 2, 3, 4, 0, 0]))            # 1 on (0, alpha)
    assert aq.alpha.grad.item() == pytest.approx(5.0 + 6.0)                   # 1 where x >= alpha


@pytest.mark.parametrize("signed", [False, True])
def test_pact_matches_its_formula_on_random_inputs(signed):
    torch.manual_seed(0)
    aq = PACTAct(3, alpha=2.0)
    aq.set_flags(calibrated=True, signed=signed)
    x = torch.cat([torch.randn(500) * 2, torch.tensor([2.0, -2.0, 0.0])]).requires_grad_(True)  # bounds hit exactly
    g = torch.randn_like(x)
    aq(x).backward(g)
    a, n, lo = 2.0, (3 if signed else 7), (-2.0 if signed else 0.0)
    xd = x.detach()
    assert torch.allclose(aq(xd), torch.round(xd.clamp(lo, a) * n / a) * a / n)
    assert torch.equal(x.grad, torch.where((xd > lo) & (xd < a), g, 0))
    expected = g[xd >= a].sum() - (g[xd <= -a].sum() if signed else 0)
    assert aq.alpha.grad.item() == pytest.approx(expected.item(), rel=1e-5)


def test_clip_gradient_mask_same_with_float_and_tensor_bounds():
    """The CPU path (float thresholds, fused kernel) and the GPU path (tensor thresholds) agree."""
    from tandem.quant.quantizers import _grad_where_above
    c = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0])
    g = torch.arange(1.0, 6.0)
    for t in (0.0, 1.0, -1.0):
        assert torch.equal(_grad_where_above(g, c, t), _grad_where_above(g, c, torch.tensor(t)))
    assert torch.equal(_grad_where_above(g, c, 0.0), torch.tensor([0.0, 0, 3, 4, 5]))


def _lsq_step_grad(v, s, qn, qp):
    """LSQ's analytic d v_hat / d s per element (Esser et al. eq. 3)."""
    r = v / s
    inside = (-qn < r) & (r < qp)
    return torch.where(inside, -r + torch.round(r), torch.where(r <= -qn, torch.full_like(r, -qn), torch.full_like(r, qp)))


@pytest.mark.parametrize("signed", [False, True])
def test_lsq_activation_step_gradient_matches_the_analytic_expression(signed):
    torch.manual_seed(0)
    bits = 3
    aq = LSQAct(bits, signed="signed" if signed else "unsigned")
    x = torch.randn(4, 5, 6) * 2 + (0 if signed else 1.5)
    x = x if signed else x.abs() + 1e-3       # no value exactly on the clip boundary
    aq.observing = True
    aq(x)
    aq.observing = False
    aq.finish_calibration()
    qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    assert aq.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(qp), rel=1e-5)  # LSQ init
    xr = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    y = aq(xr)
    s = aq.step.detach()
    assert torch.allclose(y, torch.round((x / s).clamp(-qn, qp)) * s)
    y.backward(g)
    scale = 1 / math.sqrt(x[0].numel() * qp)                                  # N = features per example
    expected = (g * _lsq_step_grad(x, s, qn, qp)).sum() * scale
    assert aq.step.grad.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    inside = ((x / s) > -qn) & ((x / s) < qp)
    assert torch.allclose(xr.grad, g * inside)


def test_lsq_activation_at_the_clip_bounds_follows_the_paper():
    """Exactly on a bound: no gradient to x, and the bound itself as the step gradient."""
    aq = LSQAct(3, signed="signed")
    aq.set_flags(calibrated=True, signed=True)
    with torch.no_grad():
        aq.step.fill_(0.5)
    qn, qp, s = 4, 3, 0.5
    x = torch.tensor([[-qn * s, qp * s, 0.3, -3.0, 2.2]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    aq(x).backward(g)
    assert torch.equal(x.grad, torch.tensor([[0.0, 0.0, 3.0, 0.0, 0.0]]))
    expected = (g * _lsq_step_grad(x.detach(), torch.tensor(s), qn, qp)).sum() / math.sqrt(5 * qp)
    assert aq.step.grad.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_weight_init_gradient_and_per_channel_steps(per_channel):
    torch.manual_seed(1)
    w = torch.randn(4, 3, 3, 3) * torch.tensor([0.1, 1.0, 3.0, 0.5]).view(4, 1, 1, 1)
    wq = LSQWeight(4, per_channel=per_channel, channels=4)
    wq.calibrate_weight(w)
    qn, qp = 8, 7
    if per_channel:
        assert wq.step.shape == (4,)
        assert torch.allclose(wq.step, 2 * w.abs().flatten(1).mean(1) / math.sqrt(qp))
    else:
        assert wq.step.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(qp), rel=1e-5)
    y = wq(w)
    s = wq.step.detach().view(-1, 1, 1, 1) if per_channel else wq.step.detach()
    assert torch.allclose(y, torch.round((w / s).clamp(-qn, qp)) * s)
    y.sum().backward()
    n = w[0].numel() if per_channel else w.numel()
    per_el = _lsq_step_grad(w, s, qn, qp) / math.sqrt(n * qp)
    expected = per_el.flatten(1).sum(1) if per_channel else per_el.sum()
    assert torch.allclose(wq.step.grad, expected, rtol=1e-4, atol=1e-6)


def test_minmax_weight_per_channel_scales():
    w = torch.tensor([[0.1, -0.2, 0.05], [4.0, -1.0, 2.0]])
    q = MinMaxWeight(8, per_channel=True)(w)
    assert torch.allclose(q[0], torch.round(w[0] / (0.2 / 127)) * (0.2 / 127))
    assert torch.allclose(q[1], torch.round(w[1] / (4.0 / 127)) * (4.0 / 127))
    assert len(_levels(MinMaxWeight(3, per_channel=True)(w)[0])) == 3
    assert _levels(MinMaxWeight(3, per_channel=False)(w)[0]) == [0.0]   # one tensor scale: channel 0 collapses


def test_observer_affine_grid_and_percentile():
    scale, zp = affine_qparams(-1.0, 3.0, 8)
    assert scale == pytest.approx(4 / 255) and zp == round(1 / scale)
    aq = ObserverAct(8)
    aq.observing = True
    aq(torch.linspace(-1, 3, 1000))
    aq.observing = False
    aq.finish_calibration()
    assert aq.signed and aq.qparams()[1] == zp
    y = aq(torch.tensor([-5.0, 0.0, 10.0]))
    assert y[1] == 0 and y[0] == pytest.approx(-zp * scale) and y[2] == pytest.approx((255 - zp) * scale)
    pq = ObserverAct(8, percentile=99.0)
    pq.observing = True
    pq(torch.cat([torch.rand(10000), torch.tensor([1000.0])]))
    pq.observing = False
    pq.finish_calibration()
    assert pq.scale.item() < 2 / 255     # the outlier is clipped away


def test_kmeans_linear_init_clusters_and_summed_centroid_gradients():
    torch.manual_seed(0)
    values = torch.cat([torch.randn(500) * 0.01 + c for c in (-1.0, 0.0, 0.5, 2.0)])
    centroids, idx = kmeans_1d(values, 4)
    assert torch.allclose(centroids, torch.tensor([-1.0, 0.0, 0.5, 2.0]), atol=0.01)
    w = values.reshape(40, 50).clone()
    w[0, :5] = 0.0                                  # "pruned" weights stay exactly zero
    kq = KMeansWeight(2, shape=w.shape)
    kq.calibrate_weight(w)
    y = kq(w)
    assert len(_levels(y)) <= 4 + 1 and torch.all(y[0, :5] == 0)
    g = torch.randn_like(w)
    (y * g).sum().backward()
    expected = torch.zeros(4).index_add_(0, kq.index.long().flatten(), (g * (w != 0)).flatten())
    assert torch.allclose(kq.centroids.grad, expected, atol=1e-5)


def test_kmeans_and_lsq_bit_limits():
    with pytest.raises(TandemError, match="1..8"):
        KMeansWeight(9, shape=(2, 2))
    with pytest.raises(TandemError, match="at least 2 bits"):
        LSQWeight(1)


# ---- quantize_ on any nn.Module ---------------------------------------------------------------
class UserNet(nn.Module):
    """Depthwise, grouped and residual layers in a model tandem did not build."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 32, 1, groups=4)
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.dw(x)))
        x = torch.relu(self.grouped(x))
        x = torch.relu(x + self.block(x))           # residual
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("method", tandem.quant.list_quantizers())
def test_quantize_user_model_with_depthwise_grouped_residual(method):
    torch.manual_seed(0)
    net = UserNet()
    x = torch.randn(8, 3, 12, 12)
    assert tandem.quantize_(net, method=method, w_bits=3, a_bits=4) is net
    layers = {n: m for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert all(isinstance(m, (QuantConv2d, QuantLinear)) for m in layers.values())
    assert net.dw.groups == 16 and net.grouped.groups == 4
    assert (net.stem.w_bits, net.head.a_bits) == (8, 8) and (net.dw.w_bits, net.dw.a_bits) == (3, 4)
    with pytest.raises(TandemError, match="calibrate"):
        net(x)
    calibrate(net, [x])
    assert net.stem.input_quantizer.signed and not net.block[2].input_quantizer.signed
    net.train()
    net(x).square().mean().backward()
    trainable = [p for n, p in net.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    c = cost.profile(net, (3, 12, 12))
    assert c.bops == sum(layer.macs * layer.w_bits * layer.a_bits for layer in c.layers)
    assert {(layer.w_bits, layer.a_bits) for layer in c.layers} == {(8, 8), (3, 4)}
    assert net.tandem_transforms[-1]["kind"] == "quantize"


def test_policy_overrides_skip_first_last_and_errors():
    net = UserNet()
    plan = layer_plan(net, tandem.quant.make_spec(method="pact", w_bits=4, a_bits=4, first_last="fp",
                                                  overrides={"block.*": {"w_bits": 2, "method": "lsq"}},
                                                  skip=["grouped"]))
    assert plan["stem"] is None and plan["head"] is None and plan["grouped"] is None
    assert plan["block.0"] == ("lsq", 2, 4) and plan["dw"] == ("pact", 4, 4)
    with pytest.raises(RecipeError, match=r"w_bits .*1\.\.32"):
        quantize_(UserNet(), w_bits=0)
    with pytest.raises(RecipeError, match=r"a_bits .*1\.\.32"):
        quantize_(UserNet(), a_bits=33)
    with pytest.raises(RecipeError, match="allowed: dorefa, dorefa_picpq, kmeans, lsq"):
        quantize_(UserNet(), method="binaryconnect")
    with pytest.raises(RecipeError, match="'layer9.*' matches no Conv2d/Linear layer; the layers are: stem"):
        quantize_(UserNet(), overrides={"layer9.*": {"w_bits": 2}})
    with pytest.raises(RecipeError, match="unknown key 'bits'"):
        quantize_(UserNet(), bits=4)


def test_quantized_model_file_rebuilds_without_data(tmp_path):
    from tandem.engine import load_model, save_model
    torch.manual_seed(0)
    net = tandem.create_model("resnet20", num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    quantize_(net, method="lsq", w_bits=4, a_bits=4, per_channel=True)
    calibrate(net, [x])
    net.eval()
    save_model(net, tmp_path / "q.safetensors")
    back, _ = load_model(tmp_path / "q.safetensors")
    back.eval()
    assert torch.equal(net(x), back(x))
    assert back.layer1[0].conv1.input_quantizer.calibrated


def test_quantize_method_qat_and_ptq_end_to_end(tmp_path, capsys):
    from tandem.cli import main
    out = tmp_path / "qat"
    assert main(["run", "recipes/digits-qat.yaml", "train.epochs=3", "quant.epochs=2", "train.progress=false",
                 "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["models"]}
    base, q = rows["baseline"], rows["lsq-w4a4"]
    assert q["top1"] > 80 and q["bops"] < base["bops"] / 10 and q["bytes"] < base["bytes"] / 4
    # 8-bit first/last, 4 elsewhere: the row's bits are MAC-weighted means of its layers
    assert sorted({layer["w_bits"] for layer in q["layers"]}) == [4, 8] and 4 < q["w_bits"] < 8 and 4 < q["a_bits"] < 8
    assert q["w_bits"] == round(sum(layer["macs"] * layer["w_bits"] for layer in q["layers"]) / q["macs"], 2)
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert f"lsq-w4a4.safetensors: test top-1 {q['top1']:.2f}%" in capsys.readouterr().out
    # post-training quantization from the saved baseline: no training stage
    ptq = tmp_path / "ptq"
    assert main(["run", "recipes/digits-qat.yaml", f"model.checkpoint={out / 'models' / 'baseline.safetensors'}",
                 "quant.method=minmax", "quant.w_bits=8", "quant.a_bits=8", "quant.mode=ptq",
                 "train.progress=false", "--out", str(ptq)]) == 0
    rows = {r["name"]: r for r in json.loads((ptq / "results.json").read_text())["models"]}
    assert rows["minmax-w8a8-ptq"]["w_bits"] == 8 and abs(rows["minmax-w8a8-ptq"]["top1"] - base["top1"]) < 2
    assert not (ptq / "stages" / "qat").exists()


@pytest.mark.parametrize("method, reestimated", [("dorefa", True), ("pact", True), ("lsq", False)])
def test_calibrate_refits_batchnorm_when_the_weight_quantizer_changes_the_scale(method, reestimated):
    """DoReFa weights live in [-1, 1], not at the float weights' scale: a pretrained network's BN
    statistics would blow the activations up. calibrate re-estimates them (plain average over
    the calibration batches, quantized weights); quantizers that keep the scale leave BN alone."""
    torch.manual_seed(0)
    model = tandem.create_model("resnet20", num_classes=10, in_channels=1, widths=[4] * 7 + [8] * 6 + [16] * 6)
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    before = {n: b.running_mean.clone() for n, b in model.named_modules() if isinstance(b, torch.nn.BatchNorm2d)}
    quantize_(model, tandem.quant.QuantSpec(method=method, w_bits=4, a_bits=32, first_last="same"))
    calibrate(model, iter(batches))   # a one-pass iterator serves both passes
    model.eval()
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0]))
             for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(torch.cat(batches))
    for h in hooks:
        h.remove()
    for name, bn in ((n, b) for n, b in model.named_modules() if isinstance(b, torch.nn.BatchNorm2d)):
        if reestimated:   # the statistics fit what the quantized network feeds each BN
            spread = seen[name][0].std((0, 2, 3)) / bn.running_var.sqrt()
            assert 0.5 < spread.median() < 2, (name, spread)
        else:
            assert torch.equal(bn.running_mean, before[name])


class _Ternary(tandem.quant.WeightQuantizer):
    """A quantizer written the way a user writes one, in one place: weights on {-s, 0, s} with
    s = factor * mean|w| (per tensor), STE through the rounding."""

    kind = "ternary"

    def __init__(self, bits, per_channel=False, channels=1, factor=1.0):
        super().__init__(bits, per_channel, channels)
        self.factor = factor

    @classmethod
    def from_spec(cls, bits, layer, spec):
        return cls(bits, spec.per_channel, layer.weight.shape[0], factor=spec.method_options().factor)

    def _s(self, w):
        return (self.factor * w.detach().abs().mean()).clamp_min(1e-8)

    def forward(self, w):
        s = self._s(w)
        return round_ste((w / s).clamp(-1, 1)) * s

    @torch.no_grad()
    def affine(self, w):
        s = self._s(w)
        return torch.round((w / s).clamp(-1, 1)).long() + 1, s, -s

    def decode(self, codes, scale):
        return (codes - 1).float() * scale


def test_a_quantizer_defined_in_one_place_runs_through_quantize_a_recipe_export_and_reload(tmp_path):
    from pydantic import BaseModel

    from tandem.cli import main
    from tandem.engine import load_model
    from tandem.export import export_onnx, onnx_agreement
    from tandem.quant import LSQAct, QUANTIZERS, register_quantizer

    class Options(BaseModel):
        factor: float = 1.0

    register_quantizer("ternary_test", weight=_Ternary, act=LSQAct, options=Options,
                       description="a test's ternary weights with LSQ inputs")
    try:
        net = tandem.quantize_(UserNet(), method="ternary_test", w_bits=2, a_bits=4, options={"factor": 0.5})
        assert isinstance(net.dw.weight_quantizer, _Ternary) and net.dw.weight_quantizer.factor == 0.5
        assert isinstance(net.dw.input_quantizer, LSQAct)
        with pytest.raises(RecipeError, match=r"options.factor: .*options of 'ternary_test': factor"):
            tandem.quantize_(UserNet(), method="ternary_test", options={"factor": "big"})
        with pytest.raises(RecipeError, match="quantizer 'lsq' takes no options"):
            tandem.quantize_(UserNet(), method="lsq", options={"factor": 2})

        out = tmp_path / "run"
        assert main(["run", "method=quantize", "quant.method=ternary_test", "quant.w_bits=2", "quant.a_bits=4",
                     "quant.options.factor=0.7", "train.epochs=2", "quant.epochs=1", "train.progress=false",
                     "report.latency=false", "--out", str(out)]) == 0
        rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["models"]}
        row = rows["ternary_test-w2a4"]
        assert row["top1"] > rows["quantize/init"]["top1"] + 10   # QAT trained it
        back, _ = load_model(out / row["model_file"])           # rebuilt from its file, no other edit
        inner = [m for m in back.modules() if isinstance(m, _Ternary)]
        assert inner and all(q.factor == 0.7 for q in inner)
        from tandem.data import BatchLoader, load_dataset
        data = load_dataset("digits", None)
        test = BatchLoader(data.test, 512, mean=data.mean, std=data.std)
        rep = export_onnx(back, tmp_path / "t.onnx", (1, 8, 8))
        assert rep.int8_weights                                  # its affine() is an integer grid
        assert onnx_agreement(back, rep.path, test)["agreement"] >= 99.0
    finally:
        QUANTIZERS.unregister("ternary_test")


@pytest.mark.parametrize("method", tandem.quant.list_quantizers())
def test_every_quantizer_saves_and_reloads_bit_for_bit(tmp_path, method):
    from tandem.engine import load_model, save_model
    torch.manual_seed(0)
    net = tandem.create_model("resnet20", widths=[8] * 7 + [16] * 6 + [32] * 6)
    x = torch.randn(8, 3, 32, 32)
    quantize_(net, method=method, w_bits=4, a_bits=4)
    calibrate(net, [x])
    net.eval()
    save_model(net, tmp_path / "q.safetensors")
    back, _ = load_model(tmp_path / "q.safetensors")      # rebuilt from its record, no data
    back.eval()
    assert torch.equal(back(x), net(x))
