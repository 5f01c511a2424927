"""quant.layout deploy: one quantizer per tensor, Add inputs included, so onnxruntime runs every
conv and residual Add in int8; the export computes what PyTorch computes; files rebuild it."""
import collections
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import tandem
from tandem.errors import RecipeError, TandemError
from tandem.export import export_onnx, ort_session
from tandem.quant import calibrate, quantize_

pytestmark = pytest.mark.usefixtures("one_thread")


def _resnet20(layout, method="minmax", bits=8):
    torch.manual_seed(0)
    x = torch.randn(32, 3, 32, 32)
    net = tandem.create_model("resnet20", num_classes=10)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(x)                     # BN statistics that are not the identity
    quantize_(net.eval(), method=method, w_bits=bits, a_bits=bits, per_channel=True, first_last="same",
              layout=layout)
    calibrate(net, [x])
    return net.eval(), x


def _ort_ops(path, tmp_path):
    import onnx
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("method,bits", [("minmax", 8), ("lsq", 8), ("lsq", 4)])
def test_deploy_export_agrees_and_fuses_every_conv(tmp_path, method, bits):
    net, x = _resnet20("deploy", method, bits)
    adds_quantized = [n for n, m in net.named_modules() if hasattr(m, "output_quantizer")]
    assert any(n.endswith("bn2") for n in adds_quantized) and any(n.endswith("relu2") for n in adds_quantized)
    rep = export_onnx(net, tmp_path / "d.onnx", (3, 32, 32))
    with torch.no_grad():
        z = net(x).numpy()
    o = ort_session(rep.path).run(None, {"input": x.numpy()})[0]
    assert (o.argmax(1) == z.argmax(1)).mean() >= 0.99 and np.abs(o - z).max() < 0.1 * np.abs(z).max()
    if bits == 8:   # a sub-8-bit grid's Clip keeps onnxruntime from fusing; at 8 bits every conv is int8
        ops = _ort_ops(rep.path, tmp_path)
        assert ops["QLinearConv"] == 19 and ops["QLinearAdd"] == 9, ops
        inputs = _ort_ops(export_onnx(_resnet20("inputs", method, bits)[0], tmp_path / "i.onnx",
                                      (3, 32, 32)).path, tmp_path)
        assert inputs["QLinearConv"] < 19 and inputs["QLinearAdd"] == 0, inputs   # what the deploy layout fixes


def test_deploy_layout_trains_saves_and_rebuilds(tmp_path):
    from tandem.engine import load_model, save_model
    net, x = _resnet20("deploy", "lsq", 4)
    steps = [m.output_quantizer.step for m in net.modules() if hasattr(m, "output_quantizer")]
    net.train()
    net(x).logsumexp(1).mean().backward()
    assert all(s.grad is not None and s.grad.abs() > 0 for s in steps)   # the tensor quantizers learn
    net.eval()
    twin = copy.deepcopy(net)   # hooks read the copy's own quantizers
    with torch.no_grad():
        for m in twin.modules():
            if hasattr(m, "output_quantizer"):
                m.output_quantizer.step.mul_(3)
        assert not torch.equal(twin(x), net(x))
    save_model(net, tmp_path / "m.safetensors", dataset={"name": "synthetic"})
    back, _ = load_model(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(back.eval()(x), net(x))
    assert sum(hasattr(m, "output_quantizer") for m in back.modules()) == len(steps)


class ResidualNet(nn.Module):
    """A user's residual net with module ReLUs (a hook can quantize each tensor where it is made)."""

    def __init__(self, functional_relu=False):
        super().__init__()
        self.functional_relu = functional_relu
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.relu = nn.ReLU()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        if self.functional_relu:
            x = torch.relu(x + 0)
        x = self.relu(x + self.body(x))
        return self.head(x.mean((2, 3)))


def test_deploy_on_a_user_model_and_its_refusals(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 12, 12)
    net = quantize_(ResidualNet(), method="minmax", w_bits=8, a_bits=8, layout="deploy")
    calibrate(net, [x])
    rep = export_onnx(net.eval(), tmp_path / "u.onnx", (3, 12, 12))
    assert rep.qdq_tensors == ["stem.2.output_quantizer", "body.4.output_quantizer", "relu.output_quantizer"]
    with torch.no_grad():
        assert np.abs(ort_session(rep.path).run(None, {"input": x.numpy()})[0] - net(x).numpy()).max() < 0.05
    assert _ort_ops(rep.path, tmp_path)["QLinearAdd"] == 1
    with pytest.raises(TandemError, match=r"the tensor relu .* no module makes it or reads it whole"):
        quantize_(ResidualNet(functional_relu=True), method="minmax", layout="deploy")
    with pytest.raises(TandemError, match="layout deploy would change nothing in SmallCNN"):
        quantize_(tandem.create_model("small_cnn", num_classes=10, in_channels=1), layout="deploy")
    with pytest.raises(RecipeError, match="layout 'deploy' does not apply to sbs"):
        quantize_(ResidualNet(), method="sbs", layout="deploy")
    with pytest.raises(TandemError, match=r"the tensor stem_2 is read by layers at different activation widths"):
        quantize_(TwoReaders(), method="minmax", a_bits=4, layout="deploy", first_last="same",
                  overrides={"a": {"a_bits": 8}})


class TwoReaders(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.a(x) * self.b(x)


def test_run_records_the_layout(tmp_path):
    """A recipe's quant.layout reaches the model, each quantized row and the report's settings."""
    import json
    from tandem.cli import main
    out = tmp_path / "run"
    assert main(["run", "recipes/digits-qat.yaml", "model=resnet20", "train.epochs=1", "quant.epochs=1",
                 "quant.layout=deploy", "train.progress=false", "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["models"]}
    assert rows["lsq-w4a4"]["quant_layout"] == "deploy" and "quant_layout" not in rows["baseline"]
    assert "layout `deploy`" in (out / "report.md").read_text()
    from tandem.engine import load_model
    model, _ = load_model(out / rows["lsq-w4a4"]["model_file"])
    assert sum(hasattr(m, "output_quantizer") for m in model.modules()) == 19   # 9 Adds x 2 + the stem
