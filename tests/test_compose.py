"""Pruning and quantization compose in both orders: the channel graph sees a quantized layer as
the layer it wraps (and any _BatchNorm, SyncBatchNorm included), surgery slices per-channel
quantizer state, and the result keeps its quantization and reloads from its file."""
import copy

import pytest
import torch
import torch.nn as nn

from tandem.engine import load_model, save_model
from tandem.models import list_models
from tandem.prune import ChannelGraph, ChannelPruner, prune
from tandem.quant import calibrate, quantize_
from tandem.quant.layers import QUANT_LAYERS
from nets import UserNet, builtin, randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized(model, x, **policy):
    """LSQ keeps its steps as parameters: the grid of a kept channel does not depend on the
    channels beside it, so the pruned quantized model equals the masked one exactly. (A grid
    derived from the weights present, min-max or DoReFa, moves when a layer loses input
    channels whose weights held its maximum; so first/last layers are LSQ here too.)"""
    quantize_(model, **{"method": "lsq", "w_bits": 4, "a_bits": 4, "first_last": "same", **policy})
    calibrate(model, [x])
    return model.eval()


def _prune_quantized_exactly(model, x):
    pruner = ChannelPruner(model, x[:1], "l1", ratio=0.5)
    removed = pruner.plan()
    assert removed
    small = pruner.apply(removed).eval()
    masked = copy.deepcopy(model)
    ChannelPruner(masked, x[:1], "l1", ratio=0.0).mask(removed)
    want, got = masked(x), small(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * (1 + want.abs().max().item()))
    assert sum(isinstance(m, QUANT_LAYERS) for m in small.modules()) == \
        sum(isinstance(m, QUANT_LAYERS) for m in model.modules())
    return small


@pytest.mark.parametrize("name", list_models())
def test_prune_after_quantize_and_quantize_after_prune_on_every_builtin_model(name, tmp_path):
    model, shape = builtin(name)
    x = torch.randn(4, *shape)
    quantized = _quantized(copy.deepcopy(model), x, per_channel=True)
    small = _prune_quantized_exactly(quantized, x)
    assert small.config["widths"] != model.config["widths"]
    save_model(small, tmp_path / "pq.safetensors")
    again = load_model(tmp_path / "pq.safetensors")[0].eval()      # pruned widths, then the quantize_ record
    torch.testing.assert_close(again(x), small(x))
    # the other order: a pruned model quantized, saved and reloaded
    qp = _quantized(prune(model, x[:1], "l1", ratio=0.5), x)
    save_model(qp, tmp_path / "qp.safetensors")
    torch.testing.assert_close(load_model(tmp_path / "qp.safetensors")[0].eval()(x), qp(x))


@pytest.mark.parametrize("method", ["lsq", "kmeans"])
def test_prune_after_quantize_on_a_user_model_slices_quantizer_state(method):
    torch.manual_seed(0)
    model = randomize_bn(UserNet())
    x = torch.randn(4, 3, 12, 12)
    policy = {"per_channel": True} if method == "lsq" else {"w_bits": 3}
    quantized = _quantized(copy.deepcopy(model), x, method=method, **policy)
    small = _prune_quantized_exactly(quantized, x)
    for m in small.modules():
        if isinstance(m, QUANT_LAYERS) and m.weight_quantizer is not None:
            wq = m.weight_quantizer
            if method == "lsq":
                assert wq.step.shape == (m.weight.shape[0],) and wq.channels == m.weight.shape[0]
            else:
                assert wq.index.shape == m.weight.shape
    # and the other order on the user model (it has no config: the object itself is returned)
    qp = _quantized(prune(model, x[:1], "l1", ratio=0.5), x)
    assert isinstance(qp, UserNet) and qp(x).shape == (4, 10)


def test_sync_batchnorm_is_recognised_and_pruned():
    model, shape = builtin("resnet20")
    x = torch.randn(2, *shape)
    plain_groups = [g.name for g in ChannelGraph(model, x[:1]).groups]
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    graph = ChannelGraph(synced, x[:1])
    assert [g.name for g in graph.groups] == plain_groups
    assert any(isinstance(graph.module(m.module), nn.SyncBatchNorm) for g in graph.groups for m in g.of_kind("bn"))
