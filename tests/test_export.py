"""Export: int8 QDQ ONNX agrees with the fake-quant model in onnxruntime; packed safetensors
are as small as the bits say and reload to the same outputs."""
import copy
import json

import numpy as np
import pytest
import torch

import tandem
from tandem import cost
from tandem.data import BatchLoader, load_dataset
from tandem.engine import Trainer, cross_entropy_objective, evaluate
from tandem.export import export_onnx, load_packed, onnx_agreement, pack_bits, save_packed, unpack_bits
from tandem.quant import list_quantizers
from tandem.quant import calibrate, quantize_
from tandem.recipes import TrainSpec



pytestmark = pytest.mark.usefixtures("one_thread")

def _train(net, data, epochs, lr=0.05, subset=None, optimizer="sgd"):
    train = data.train if subset is None else data.train.subset(torch.arange(subset))
    loader = BatchLoader(train, 64, shuffle=True, mean=data.mean, std=data.std, seed=0, drop_last=True)
    cfg = TrainSpec(epochs=epochs, lr=lr, optimizer=optimizer, weight_decay=0, progress=False)
    Trainer({"n": net}, cross_entropy_objective, cfg).fit(loader)
    return net.eval()


def _qat(fp, data, method, w_bits=4, a_bits=4, epochs=1, subset=None, lr=0.01, optimizer="sgd", **kw):
    net = quantize_(copy.deepcopy(fp), method=method, w_bits=w_bits, a_bits=a_bits, **kw)
    calibrate(net, BatchLoader(data.train, 512, mean=data.mean, std=data.std), num_batches=2)
    if epochs:
        _train(net, data, epochs, lr=lr, subset=subset, optimizer=optimizer)
    return net.eval()


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    fp = _train(tandem.create_model("small_cnn", num_classes=10, in_channels=1), data, epochs=3, lr=3e-3,
                optimizer="adam")
    test = BatchLoader(data.test, 1024, mean=data.mean, std=data.std)
    return data, fp, test


@pytest.mark.parametrize("method,per_channel", [("lsq", True), ("pact", False), ("dorefa", False),
                                                ("dorefa_picpq", True), ("minmax", True), ("kmeans", False)])
def test_onnx_int8_agrees_with_fake_quant_on_digits(tmp_path, digits, method, per_channel):
    import onnx
    data, fp, test = digits
    net = _qat(fp, data, method, per_channel=per_channel, subset=600, lr=1e-3, optimizer="adam")
    rep = export_onnx(net, tmp_path / "q.onnx", (1, 8, 8))
    check = onnx_agreement(net, rep.path, test)
    assert check["agreement"] >= 99.0, check
    assert abs(check["top1_onnx"] - evaluate(net, test)["top1"]) <= 1.0
    graph = onnx.load(rep.path).graph
    ops = [n.op_type for n in graph.node]
    assert "BatchNormalization" not in ops   # BN folded
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    if method == "kmeans":       # a codebook is not a uniform grid: exact float weights, said so;
        assert rep.float_weights == ["features.1.0", "features.3.0"] and len(int8) == 2   # their inputs
        assert ops.count("QuantizeLinear") == 2 and ops.count("Round") == 2              # rounded in float
        assert rep.qdq_inputs == ["features.0.0", "fc"]
    else:
        assert len(rep.int8_weights) == 4 and len(int8) == 4 and not rep.float_weights
        assert ops.count("QuantizeLinear") == 4   # every input QDQ


@pytest.mark.parametrize("method", list_quantizers())
@pytest.mark.parametrize("w_bits,a_bits,first_last", [(2, 2, "same"), (3, 3, "same"), (4, 4, "same"), (2, 4, 8)])
def test_onnx_parity_at_every_width(tmp_path, digits, method, w_bits, a_bits, first_last):
    """Every layer at 2, 3 or 4 bits (the first conv's signed input and the classifier included),
    and mixed widths: onnxruntime predicts what PyTorch predicts. Before the bias of a coarse
    layer became an exact Add, onnxruntime rounded it to int32 on input scale * weight scale and
    LSQ W2A2 agreed on 55% of the images, W3A3 on 92%, W4A4 on 98%."""
    import onnx
    data, fp, test = digits
    net = _qat(fp, data, method, w_bits=w_bits, a_bits=a_bits, first_last=first_last,
               per_channel=method in ("lsq", "minmax", "dorefa_picpq"), subset=600, lr=1e-3, optimizer="adam")
    rep = export_onnx(net, tmp_path / "q.onnx", (1, 8, 8))
    check = onnx_agreement(net, rep.path, test)
    assert check["agreement"] >= 99.0 and abs(check["top1_onnx"] - check["top1_torch"]) <= 1.0, check
    adds = [n for n in onnx.load(rep.path).graph.node if n.op_type == "Add"]
    integer = tandem.quant.QUANTIZERS.get(method).weight.integer_grid   # k-means: float weights, no DQ input
    coarse = 0 if not integer else 4 if first_last == "same" else 2
    assert len(adds) == coarse   # a bias Add for each layer fed by a sub-8-bit DequantizeLinear only


@pytest.mark.parametrize("method,bits,first_last", [("lsq", 2, "same"), ("minmax", 8, "same"), ("kmeans", 4, 8)])
def test_openvino_runs_the_export_with_parity(tmp_path, digits, method, bits, first_last):
    """The same file in OpenVINO (CPU, f32 precision hint, recorded) predicts what PyTorch predicts."""
    data, fp, test = digits
    net = _qat(fp, data, method, w_bits=bits, a_bits=bits, first_last=first_last, per_channel=method != "kmeans",
               epochs=0 if method == "minmax" else 1, subset=600, lr=1e-3, optimizer="adam")
    rep = export_onnx(net, tmp_path / "q.onnx", (1, 8, 8))
    check = onnx_agreement(net, rep.path, test, runtime="openvino")
    assert check["runtime"] == "openvino" and check["runtime_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert check["agreement"] >= 99.0 and abs(check["top1_onnx"] - check["top1_torch"]) <= 1.0, check


def test_onnx_agreement_on_mnist(tmp_path, shared_data):
    """A small version (3000 training, 2000 test images) of benchmarks/quant_export_parity.py."""
    data = load_dataset("mnist", shared_data / "mnist", seed=0)
    torch.manual_seed(0)
    fp = _train(tandem.create_model("small_cnn", num_classes=10, in_channels=1), data, epochs=2, subset=3000,
                lr=3e-3, optimizer="adam")
    net = _qat(fp, data, "lsq", subset=1000, lr=1e-3, optimizer="adam")
    rep = export_onnx(net, tmp_path / "mnist.onnx", (1, 28, 28))
    test = BatchLoader(data.test.subset(torch.arange(2000)), 1000, mean=data.mean, std=data.std)
    check = onnx_agreement(net, rep.path, test)
    assert check["n"] == 2000 and check["agreement"] >= 99.0 and check["top1_onnx"] > 40, check


def test_onnx_of_user_model_with_depthwise_grouped_residual(tmp_path):
    from test_quant import UserNet
    torch.manual_seed(0)
    net = UserNet()
    x = torch.randn(16, 3, 12, 12)
    quantize_(net, method="lsq", w_bits=4, a_bits=4, per_channel=True)
    calibrate(net, [x])
    net.eval()
    rep = export_onnx(net, tmp_path / "user.onnx", (3, 12, 12))
    assert len(rep.int8_weights) == 6 and rep.bn_folded == 1
    from tandem.export import ort_session
    out = ort_session(rep.path).run(None, {"input": x.numpy()})[0]
    assert np.abs(out - net(x).detach().numpy()).max() < 0.05


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 12, 16])
def test_pack_bits_roundtrip_and_size(bits):
    codes = torch.randint(0, 2 ** bits, (1001,))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


@pytest.mark.parametrize("method,w_bits", [("lsq", 4), ("lsq", 2), ("dorefa", 3), ("pact", 4), ("minmax", 8),
                                           ("kmeans", 4), ("dorefa_picpq", 2)])
def test_packed_file_size_and_exact_reload(tmp_path, method, w_bits):
    torch.manual_seed(0)
    net = tandem.create_model("resnet20", num_classes=10)
    x = torch.randn(8, 3, 32, 32)
    net.train()
    net(x)                                    # non-trivial BN statistics
    if method == "kmeans":
        with torch.no_grad():                 # a pruned layer: its zeros must survive
            net.layer1[0].conv1.weight[:4] = 0
    quantize_(net, method=method, w_bits=w_bits, a_bits=4, per_channel=method in ("lsq", "minmax"))
    calibrate(net, [x])
    net.eval()
    info = save_packed(net, tmp_path / "p.safetensors")
    back = load_packed(tmp_path / "p.safetensors").eval()
    assert torch.equal(net(x), back(x))
    c = cost.profile(net, (3, 32, 32))
    ideal = sum(l.params * l.w_bits / 8 for l in c.layers if l.w_bits < 32) + 4 * sum(
        p.numel() for n, p in net.state_dict().items() if n.endswith(("running_mean", "running_var", "bn1.weight",
                                                                     "bn1.bias", "bn2.weight", "bn2.bias")))
    assert info["bytes"] <= 1.10 * c.bytes and c.bytes < 1.05 * ideal + 4096, (info["bytes"], c.bytes, ideal)
    assert [l.w_bits for l in cost.profile(back, (3, 32, 32)).layers] == [l.w_bits for l in c.layers]


def test_export_command_on_a_run(tmp_path, capsys):
    from tandem.cli import main
    out = tmp_path / "run"
    assert main(["run", "recipes/digits-qat.yaml", "train.epochs=2", "quant.epochs=1", "quant.method=pact",
                 "train.progress=false", "--out", str(out)]) == 0
    assert main(["export", str(out), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    assert "pact-w4a4: " in printed and (out / "export" / "pact-w4a4.onnx").exists()
    assert json.loads((out / "export" / "export-onnx.json").read_text())[0]["parity"] is True
    assert main(["export", str(out), "--format", "safetensors"]) == 0
    assert "max |logit diff| 0.00e+00" in capsys.readouterr().out
    assert main(["export", str(out), "--format", "safetensors", "--runtime", "openvino"]) != 0   # nothing to run
    assert "--runtime openvino checks ONNX files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:                      # argparse names the allowed formats
        main(["export", str(out), "--format", "tflite"])
    assert exc.value.code == 2 and "choose from 'onnx', 'safetensors'" in capsys.readouterr().err


def test_export_refuses_a_mismatching_file(tmp_path, capsys, monkeypatch):
    """Below 99% agreement: one line per model on stderr, the file removed, exit status 1;
    --allow-mismatch keeps it and exits 0."""
    import tandem.export as export
    from tandem.cli import main
    out = tmp_path / "run"
    assert main(["run", "recipes/digits-qat.yaml", "train.epochs=1", "quant.epochs=1", "train.progress=false",
                 "--out", str(out)]) == 0
    real = export.onnx_agreement
    monkeypatch.setattr(export, "onnx_agreement", lambda *a: {**real(*a), "agreement": 97.5})
    capsys.readouterr()
    assert main(["export", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    models = sorted(p.stem for p in (out / "models").glob("*.safetensors"))
    assert len(err) == len(models) and all("MISMATCH" in line and "97.50%" in line for line in err), err
    assert not list((out / "export").glob("*.onnx"))
    rows = json.loads((out / "export" / "export-onnx.json").read_text())
    assert [r["parity"] for r in rows] == [False] * len(models) and all(r["file"] is None for r in rows)
    assert main(["export", str(out), "--allow-mismatch"]) == 0
    assert "file kept" in capsys.readouterr().err
    assert len(list((out / "export").glob("*.onnx"))) == len(models)


def test_fold_bn_gives_the_same_outputs_without_batchnorm_and_leaves_quantized_convs():
    from tandem.export import fold_bn
    from tandem.quant import calibrate, quantize_
    torch.manual_seed(0)
    net = tandem.create_model("resnet20", widths=[8] * 7 + [16] * 6 + [24] * 6)   # pruned-like widths
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.2, 1)
    x = torch.randn(4, 3, 32, 32)
    folded = fold_bn(net)
    assert net.training and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), net.eval()(x), rtol=1e-4, atol=1e-4)
    q = quantize_(copy.deepcopy(net), method="lsq", w_bits=4, a_bits=4)
    calibrate(q, [x])
    kept = fold_bn(q)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in kept.modules()) == 19   # a quantized conv keeps its BN
    torch.testing.assert_close(kept(x), q.eval()(x))

    from tandem.errors import TandemError
    deploy = quantize_(copy.deepcopy(net), method="minmax", w_bits=8, a_bits=8, layout="deploy")
    with pytest.raises(TandemError, match="fold_bn: ResNet has forward hooks"):
        fold_bn(deploy)

    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x
    with pytest.raises(TandemError, match="fold_bn: torch.fx cannot trace Branchy"):
        fold_bn(Branchy())
