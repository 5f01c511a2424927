"""Model zoo: shapes, width lists, config round trips and the errors users see."""

import json
import random

import pytest
import torch
import torch.nn as nn

from tandem.errors import TandemError
from tandem.models import create_model, default_widths, list_models, model_config, register_model
from tandem.models.resnet_cifar import BasicBlock, ShortcutA

# (create_model kwargs, input shape without batch) for each model's natural inputs
NATURAL = {
    "resnet20": [({}, (3, 32, 32))],
    "resnet32": [({}, (3, 32, 32))],
    "resnet56": [({}, (3, 32, 32))],
    "resnet110": [({}, (3, 32, 32))],
    "preact_resnet20": [({}, (3, 32, 32)), ({"shortcut": "A"}, (3, 32, 32))],
    "preact_resnet56": [({}, (3, 32, 32))],
    "vgg11": [({}, (3, 32, 32))],
    "vgg13": [({}, (3, 32, 32))],
    "vgg16": [({}, (3, 32, 32))],
    "vgg19": [({}, (3, 32, 32))],
    "mobilenetv2": [({}, (3, 32, 32))],
    "resnet18": [({"stem": "imagenet"}, (3, 64, 64)), ({"stem": "cifar"}, (3, 32, 32))],
    "small_cnn": [({"in_channels": 1}, (1, 8, 8)), ({"in_channels": 1}, (1, 28, 28))],
}
CASES = [(name, kw, shape) for name, runs in NATURAL.items() for kw, shape in runs]


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_every_registered_model_is_covered():
    assert sorted(NATURAL) == list_models()


@pytest.mark.parametrize("name,kw,shape", CASES)
def test_forward_shape(name, kw, shape):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, **kw).eval()
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(NATURAL))
def test_halved_widths_halve_every_layer(name):
    kw, shape = NATURAL[name][0]
    full = create_model(name, **kw)
    widths = [w // 2 for w in default_widths(name)]
    half = create_model(name, widths=widths, **kw)
    assert half.config["widths"] == widths
    pairs = list(zip(_layers(full), _layers(half)))
    assert len(pairs) == len(_layers(full)) == len(_layers(half))
    for a, b in pairs[:-1]:  # every conv and hidden linear is half as wide
        out_a = a.out_channels if isinstance(a, nn.Conv2d) else a.out_features
        out_b = b.out_channels if isinstance(b, nn.Conv2d) else b.out_features
        assert out_b == out_a // 2
    assert pairs[-1][1].in_features == pairs[-1][0].in_features // 2
    assert half(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("name,kw,shape", CASES)
def test_config_rebuilds_same_architecture(name, kw, shape):
    widths = [w - 3 for w in default_widths(name)]
    model = create_model(name, num_classes=5, widths=widths, **kw).eval()
    config = json.loads(json.dumps(model_config(model)))  # JSON-serialisable
    assert set(config) == {"name", "num_classes", "in_channels", "widths", "kwargs"}
    assert config["widths"] == widths and config["kwargs"] == model.config["kwargs"]
    rebuilt = create_model(**config).eval()
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a)
    x = torch.randn(2, *shape)
    assert torch.equal(model(x), rebuilt(x))


def test_config_records_option_defaults_and_is_a_copy():
    model = create_model("resnet20")
    assert model.config["kwargs"] == {"shortcut": "A", "post_add_relu": True, "channel_maps": None}
    config = model_config(model)
    config["widths"][0] = 999
    assert model_config(model)["widths"][0] == 16
    assert model_config(nn.DataParallel(model))["name"] == "resnet20"
    with pytest.raises(TandemError, match="no config"):
        model_config(nn.Linear(2, 2))


def test_default_widths():
    assert default_widths("resnet20") == [16] + [16] * 6 + [32] * 6 + [64] * 6
    assert len(default_widths("resnet110")) == 1 + 6 * 18
    assert default_widths("vgg11") == [64, 128, 256, 256, 512, 512, 512, 512, 512, 512]
    assert len(default_widths("vgg16", head_layers=0)) == 13
    assert default_widths("small_cnn") == [16, 32, 64]
    mb = default_widths("mobilenetv2")
    assert len(mb) == 36 and mb[:5] == [32, 32, 16, 96, 24] and mb[-1] == 1280
    assert len(default_widths("resnet18")) == 17


def test_unknown_name_lists_allowed_names():
    with pytest.raises(TandemError, match="unknown model 'resnet21'.*resnet20.*vgg16"):
        create_model("resnet21")


@pytest.mark.parametrize("name", sorted(NATURAL))
def test_bad_widths_raise(name):
    n = len(default_widths(name))
    with pytest.raises(TandemError, match=f"expects {n} widths, got {n - 1}.*output channel count"):
        create_model(name, widths=default_widths(name)[:-1])
    bad = default_widths(name)
    bad[1] = 0
    with pytest.raises(TandemError, match=r"widths\[1\].*must be a positive integer, got 0"):
        create_model(name, widths=bad)
    bad[1] = 2.5
    with pytest.raises(TandemError, match="positive integer"):
        create_model(name, widths=bad)


def test_bad_options_raise():
    with pytest.raises(TandemError, match="no option 'stem'.*post_add_relu, shortcut"):
        create_model("resnet20", stem="cifar")
    with pytest.raises(TandemError, match=r"shortcut='C'.*\['A', 'B'\]"):
        create_model("resnet56", shortcut="C")
    with pytest.raises(TandemError, match="head_layers=3"):
        create_model("vgg11", head_layers=3)
    with pytest.raises(TandemError, match="stem='tiny'"):
        create_model("resnet18", stem="tiny")
    with pytest.raises(TandemError, match="num_classes"):
        create_model("resnet20", num_classes=0)


def test_mobilenetv2_width_constraints():
    widths = default_widths("mobilenetv2")
    widths[1] = 24  # t=1 block: hidden (depthwise) width must equal the stem width
    with pytest.raises(TandemError, match="block 0 has no expansion"):
        create_model("mobilenetv2", widths=widths)
    widths = default_widths("mobilenetv2")
    widths[6] = 20  # block 2 (second of the 24-wide stage) adds its input back
    with pytest.raises(TandemError, match="block 2 has a residual"):
        create_model("mobilenetv2", widths=widths)
    model = create_model("mobilenetv2")
    assert [b.residual for b in model.blocks][:4] == [False, False, True, False]
    assert model.blocks[0].expand.__class__ is nn.Identity
    dw = model.blocks[1].depthwise[0]
    assert dw.groups == dw.in_channels == dw.out_channels == 96


def test_vgg_heads_and_any_input_size():
    for head_layers, n_linear in ((0, 1), (1, 2), (2, 3)):
        model = create_model("vgg11", head_layers=head_layers)
        assert sum(isinstance(m, nn.Linear) for m in model.modules()) == n_linear
        assert len(model.config["widths"]) == 8 + head_layers
    model = create_model("vgg11", head_layers=1, widths=[8] * 8 + [33]).eval()
    assert model.classifier[0].out_features == 33
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_resnet18_stems():
    imagenet = create_model("resnet18")
    assert imagenet.stem[0].kernel_size == (7, 7) and isinstance(imagenet.stem[-1], nn.MaxPool2d)
    cifar = create_model("resnet18", stem="cifar")
    assert cifar.stem[0].kernel_size == (3, 3) and cifar.stem[0].stride == (1, 1)
    x = torch.randn(1, 3, 32, 32)
    assert imagenet.stem(x).shape == (1, 64, 8, 8) and cifar.stem(x).shape == (1, 64, 32, 32)
    # a pruned stride-1 block whose output differs from its input gets a projection
    widths = default_widths("resnet18")
    widths[2] = 40  # layer1.0.conv2
    model = create_model("resnet18", widths=widths, stem="cifar")
    assert isinstance(model.layer1[0].shortcut[0], nn.Conv2d) and model.layer1[0].shortcut[0].out_channels == 40
    assert isinstance(model.layer1[1].shortcut[0], nn.Conv2d) and model.layer1[1].shortcut[0].in_channels == 40
    assert model(x).shape == (1, 10)


@pytest.mark.parametrize("in_ch,out_ch,stride", [(16, 32, 2), (16, 19, 1), (32, 20, 1), (32, 21, 2), (8, 8, 2)])
def test_shortcut_a_pads_or_crops_half_before_half_after(in_ch, out_ch, stride):
    x = torch.randn(2, in_ch, 8, 8)
    y = ShortcutA(in_ch, out_ch, stride)(x)
    assert y.shape == (2, out_ch, 8 // stride, 8 // stride)
    sub = x[:, :, ::stride, ::stride]
    if out_ch >= in_ch:
        before = (out_ch - in_ch) // 2
        assert torch.equal(y[:, before : before + in_ch], sub)
        assert y[:, :before].abs().sum() == 0 and y[:, before + in_ch :].abs().sum() == 0
    else:
        start = (in_ch - out_ch) // 2
        assert torch.equal(y, sub[:, start : start + out_ch])
    assert sum(p.numel() for p in ShortcutA(in_ch, out_ch, stride).parameters()) == 0


@pytest.mark.parametrize("kind", ["A", "B"])
def test_resnet_cifar_any_widths(kind):
    rng = random.Random(0)
    widths = [rng.randint(3, 70) for _ in default_widths("resnet20")]
    model = create_model("resnet20", widths=widths, shortcut=kind).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    projections = [b for s in (model.layer1, model.layer2, model.layer3) for b in s
                   if isinstance(b.shortcut, nn.Sequential)]
    changed = [b for s in (model.layer1, model.layer2, model.layer3) for b in s
               if b.conv1.stride != (1, 1) or b.conv1.in_channels != b.conv2.out_channels]
    assert len(changed) >= 3
    assert len(projections) == (len(changed) if kind == "B" else 0)
    if kind == "A":
        assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())


def test_default_resnet56_option_b_has_two_projections():
    model = create_model("resnet56", shortcut="B")
    convs1x1 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs1x1] == [(16, 32, (2, 2)), (32, 64, (2, 2))]


def test_post_add_relu_switch():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8, 8)
    with_relu = BasicBlock(16, 16, 16, post_add_relu=True).eval()
    without = BasicBlock(16, 16, 16, post_add_relu=False).eval()
    without.load_state_dict(with_relu.state_dict())
    a, b = with_relu(x), without(x)
    assert a.min() >= 0 and b.min() < 0
    assert torch.equal(a, b.clamp_min(0))
    model = create_model("resnet20", post_add_relu=False)
    assert all(isinstance(b.relu2, nn.Identity) for b in model.layer2)


def test_convs_have_no_bias():
    for name in list_models():
        model = create_model(name)
        assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d)), name


def test_register_model_custom():
    from tandem.models import registry

    @register_model("_test_mlp", layout=lambda **_: [("hidden", 8)])
    def _mlp(num_classes, in_channels, widths, *, act="relu"):
        hidden = widths[0]
        return nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    try:
        assert "_test_mlp" in list_models()
        model = create_model("_test_mlp", num_classes=3, in_channels=4, widths=[5])
        assert model.config == {"name": "_test_mlp", "num_classes": 3, "in_channels": 4,
                                "widths": [5], "kwargs": {"act": "relu"}}
        assert model(torch.randn(2, 4)).shape == (2, 3)
        with pytest.raises(ValueError, match="registered twice"):
            register_model("_test_mlp")(_mlp)
    finally:
        registry.MODELS.unregister("_test_mlp")
