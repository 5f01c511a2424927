"""Cost counting against the published figures (methods.md §0.2-§0.3) and the bit rules."""

import json
import math

import pytest
import torch
import torch.nn as nn

from tandem.cost import CostReport, model_bytes, profile
from tandem.models import create_model

PDD_VGG11 = [35, 69, 195, 96, 300, 109, 227, 368, 512, 512]  # PDD cfg A_v16_v11_c10 + 2 hidden FC


@pytest.mark.parametrize("name,macs_m,params_lo,params_hi", [
    ("resnet20", 40.55, 0.268e6, 0.273e6),
    ("resnet56", 125.49, 0.848e6, 0.850e6),
    ("resnet110", 252.89, 1.71e6, 1.73e6),
])
def test_resnet_cifar_reference_figures(name, macs_m, params_lo, params_hi):
    report = profile(create_model(name))
    assert report.macs / 1e6 == pytest.approx(macs_m, abs=0.01)
    assert params_lo <= report.params <= params_hi


def test_vgg_reference_figures():
    assert profile(create_model("vgg16")).macs / 1e6 == pytest.approx(313.73, abs=0.01)
    assert profile(create_model("vgg16", head_layers=1)).macs / 1e6 == pytest.approx(313.46, abs=0.01)
    full = profile(create_model("vgg11"))
    assert full.macs / 1e6 == pytest.approx(153.29, abs=0.01)
    pruned = profile(create_model("vgg11", widths=PDD_VGG11))
    assert 1 - pruned.macs / full.macs == pytest.approx(0.750, abs=0.001)


def test_layer_macs_by_hand():
    report = profile(create_model("mobilenetv2"))
    by_name = {c.name: c for c in report.layers}
    dw = by_name["blocks.1.depthwise.0"]  # 96 channels, 3x3, groups=96, 32x32 out
    assert (dw.groups, dw.kernel, dw.out_shape) == (96, (3, 3), (96, 32, 32))
    assert dw.macs == 9 * 96 * 32 * 32 and dw.params == 9 * 96
    fc = report.layers[-1]
    assert (fc.kind, fc.name, fc.macs, fc.params) == ("linear", "fc", 1280 * 10, 1280 * 10 + 10)
    stem = report.layers[0]
    assert stem.macs == 9 * 3 * 32 * 32 * 32
    # a non-square input changes conv MACs through H_out * W_out
    wide = profile(create_model("small_cnn", in_channels=1), input_size=(1, 8, 16))
    assert wide.layers[0].macs == 9 * 1 * 16 * 8 * 16 and wide.layers[0].out_shape == (16, 8, 16)


def test_bops_follow_bits():
    model = create_model("resnet20")
    fp = profile(model)
    assert fp.bops == 1024 * fp.macs
    w4a4 = profile(model, w_bits=4, a_bits=4)
    assert w4a4.bops == 16 * fp.macs and w4a4.macs == fp.macs
    assert all(c.w_bits == 4 and c.a_bits == 4 for c in w4a4.layers)


def test_first_last_bits_change_only_first_conv_and_last_linear():
    model = create_model("resnet20")
    base = profile(model, w_bits=4, a_bits=4)
    fl8 = profile(model, w_bits=4, a_bits=4, first_last_bits=8)
    changed = [i for i, (a, b) in enumerate(zip(base.layers, fl8.layers)) if a.bops != b.bops]
    assert changed == [0, len(base.layers) - 1]
    first, last = fl8.layers[0], fl8.layers[-1]
    assert (first.name, first.w_bits, first.a_bits, first.bops) == ("stem.0", 8, 8, first.macs * 64)
    assert (last.name, last.w_bits, last.bops) == ("fc", 8, last.macs * 64)
    assert fl8.bops == base.bops + 48 * (first.macs + last.macs)
    assert profile(model, w_bits=4, a_bits=4, first_last_bits=32).layers[-1].bops == last.macs * 1024


def test_count_first_conv_false_drops_only_the_first_conv_bops():
    model = create_model("vgg16")
    full = profile(model)
    picpq = profile(model, count_first_conv=False)
    assert picpq.macs == full.macs
    assert picpq.bops == full.bops - full.layers[0].macs * 1024
    assert picpq.layers[0].bops == 0 and picpq.layers[1].bops == full.layers[1].bops


class QConv(nn.Conv2d):
    """Stands in for a later quantized wrapper: a subclass carrying its own bits."""

    w_bits, a_bits = 2, 3


def test_layer_bit_attributes_override_defaults():
    model = create_model("resnet20")
    model.layer2[1].conv1.w_bits = 2  # a_bits absent: default
    model.layer3[0].conv2.w_bits = None  # None: default
    report = profile(model, w_bits=8, a_bits=8)
    by_name = {c.name: c for c in report.layers}
    assert by_name["layer2.1.conv1"].bops == by_name["layer2.1.conv1"].macs * 2 * 8
    assert by_name["layer3.0.conv2"].bops == by_name["layer3.0.conv2"].macs * 64
    assert report.bops == 64 * report.macs - 6 * 8 * by_name["layer2.1.conv1"].macs
    # first_last_bits is the counting convention: it wins over a layer's own bits
    model.stem[0].w_bits = 4
    assert profile(model, first_last_bits=8).layers[0].w_bits == 8
    assert profile(model).layers[0].w_bits == 4


def test_conv_subclasses_are_counted():
    model = create_model("small_cnn", in_channels=1)
    old = model.features[1][0]
    q = QConv(old.in_channels, old.out_channels, 3, padding=1, bias=False)
    model.features[1][0] = q
    report = profile(model, input_size=(1, 8, 8))
    layer = report.layers[1]
    assert (layer.name, layer.kind, layer.w_bits, layer.a_bits) == ("features.1.0", "conv", 2, 3)
    assert layer.bops == layer.macs * 6 and len(report.layers) == 4


def test_bytes():
    model = create_model("resnet56")
    fp, low = profile(model), profile(model, w_bits=4)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    biases = model.fc.bias.numel()
    other = sum(t.numel() for t in list(model.parameters()) + list(model.buffers())
                if t.is_floating_point()) - weights - biases  # BN weight, bias, running stats
    assert fp.bytes == model_bytes(model) == 4 * (weights + biases + other)
    layer_bytes = sum(c.bytes for c in low.layers)
    assert layer_bytes == sum(math.ceil(c.params * 0.5) for c in low.layers[:-1]) + 10 * 64 // 2 + 40
    assert layer_bytes == pytest.approx(low.params / 2, rel=0.001)
    assert low.bytes == layer_bytes + 4 * other
    model.layer1[0].conv1.w_bits = 2
    assert model_bytes(model) == fp.bytes - model.layer1[0].conv1.weight.numel() * 30 // 8


def test_nonzero_macs():
    model = create_model("resnet20")
    assert profile(model).nonzero_macs == profile(model).macs
    conv = model.layer1[0].conv1
    with torch.no_grad():
        conv.weight[: conv.out_channels // 2] = 0  # half the filters zeroed
    report = profile(model)
    layer = next(c for c in report.layers if c.name == "layer1.0.conv1")
    assert layer.nonzero_macs == layer.macs / 2
    assert report.nonzero_macs == report.macs - layer.macs / 2
    assert report.macs == profile(create_model("resnet20")).macs


def test_profile_restores_modes_and_leaves_state_alone():
    model = create_model("resnet20").train()
    model.layer1[0].bn1.eval()  # a frozen BN must stay frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile(model)
    assert model.training and model.layer2[0].bn1.training and not model.layer1[0].bn1.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # eval mode: BN stats untouched
    assert not any(m._forward_hooks for m in model.modules())


def test_report_serialises_and_prints():
    report = profile(create_model("resnet20"), w_bits=4, a_bits=8)
    assert isinstance(report, CostReport)
    d = json.loads(json.dumps(report.to_dict()))
    assert set(d) == {"params", "macs", "bops", "bytes", "nonzero_macs", "layers"}
    assert d["macs"] == report.macs and len(d["layers"]) == 20
    assert d["layers"][0]["kernel"] == [3, 3] and d["layers"][0]["out_shape"] == [16, 32, 32]
    assert {"name", "kind", "in_channels", "out_channels", "kernel", "groups", "out_shape", "params",
            "macs", "bops", "bytes", "w_bits", "a_bits"} <= set(d["layers"][0])
    text = report.table()
    lines = text.splitlines()
    assert all(any(line.startswith(c.name) for line in lines) for c in report.layers)
    total = next(line for line in lines if line.startswith("total"))
    assert f"{report.macs / 1e6:.3f}" in total and f"{report.bops / 1e9:.3f}" in total
    assert "4/8" in text
