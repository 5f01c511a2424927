"""Learned channel gates: their straight-through gradients against methods.md's formulas, gated =
pruned on every built-in model and on a user model, all open = ungated, MACs through the gates,
and gates that save, load, deep-copy and show as parameters; PDD's open start and its per-block
gates (placement, save/load, the paper's removal at the gates' widths and MACs)."""
import copy

import pytest
import torch

from tandem import cost
from tandem.engine import load_model, save_model
from tandem.errors import TandemError
from tandem.models import list_models
from tandem.prune.block_gates import BlockGates, block_gate_
from tandem.prune.gates import approx_sign, gate_, gates_of, remove_closed, threshold_ste, ungate_
from nets import UserNet, builtin, randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")


def test_approx_sign_gradient_is_bireal_polynomial_derivative():
    m = torch.tensor([-1.5, -1.0, -0.6, -0.2, 0.0, 0.3, 0.9, 1.0, 2.0], requires_grad=True)
    g = (approx_sign(m) + 1) / 2
    assert g.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]        # hard forward; m == 0 counts as closed
    g.sum().backward()
    # methods.md §3.2: dg/dm = 1 + m on [-1, 0), 1 - m on [0, 1), 0 elsewhere
    want = [0.0, 0.0, 0.4, 0.8, 1.0, 0.7, 0.1, 0.0, 0.0]
    torch.testing.assert_close(m.grad, torch.tensor(want))


def test_threshold_gate_gradient_is_the_sigmoid_derivative():
    score = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    t = torch.tensor(0.4, requires_grad=True)
    g = threshold_ste(score, t)
    assert g.tolist() == [0, 1, 1]
    g.sum().backward()
    s = torch.sigmoid(torch.tensor([0.1, 0.5, 0.9]) - 0.4)
    torch.testing.assert_close(score.grad, s * (1 - s))
    torch.testing.assert_close(t.grad, -(s * (1 - s)).sum())


def _random_signs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates_of(model).gates.values():
            gate.m.copy_(torch.randn(gate.size, generator=g))


def _check_gated_equals_pruned(model, x):
    small = remove_closed(model, x[:1]).eval()
    want, got = model.eval()(x), small(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * (1 + want.abs().max().item()))
    kept = gates_of(model).kept()
    assert any(k < g.size for k, g in zip(kept.values(), gates_of(model).gates.values()))
    assert cost.profile(small, tuple(x.shape[1:])).macs == pytest.approx(gates_of(model).macs().item())
    return small


@pytest.mark.parametrize("name", list_models())
def test_gated_equals_pruned_on_every_builtin_model(name):
    model, shape = builtin(name)
    x = torch.randn(2, *shape)
    plain = copy.deepcopy(model).eval()(x)
    gates = gate_(model, x[:1], "sign")
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.m.fill_(1.0)
    torch.testing.assert_close(model.eval()(x), plain)            # all open = the ungated model
    _random_signs(model)
    small = _check_gated_equals_pruned(model, x)
    assert small.config["widths"] != model.config["widths"] and not hasattr(small, "channel_gates")


def test_gates_on_a_user_model_sign_and_threshold():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, 12)
    model = randomize_bn(UserNet())
    gate_(model, x[:1], "sign")
    _random_signs(model)
    small = _check_gated_equals_pruned(model, x)
    assert isinstance(small, UserNet)
    thresholded = randomize_bn(UserNet())
    gates = gate_(thresholded, x[:1], "threshold", group_size=2)
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.threshold.fill_(gate.scores().median())
    _check_gated_equals_pruned(thresholded, x)


def test_gates_are_parameters_that_save_load_copy_and_detach(tmp_path):
    model, shape = builtin("resnet20")
    x = torch.randn(2, *shape)
    plain = copy.deepcopy(model).eval()(x)
    gate_(model, x[:1], "sign")
    _random_signs(model)
    names = [n for n, _ in model.named_parameters() if n.startswith("channel_gates.")]
    assert names and all(n.endswith(".m") for n in names)
    out = model.eval()(x)
    save_model(model, tmp_path / "gated.safetensors")
    again = load_model(tmp_path / "gated.safetensors")[0].eval()
    torch.testing.assert_close(again(x), out)                       # rebuilt gated, same gates
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for gate in gates_of(twin).gates.values():
            gate.m.fill_(1.0)
    torch.testing.assert_close(model(x), out)                       # the copy has its own gates
    torch.testing.assert_close(twin.eval()(x), plain)
    closed = ungate_(model)
    assert closed and not hasattr(model, "channel_gates")
    assert not any(t["kind"] == "gates" for t in getattr(model, "tandem_transforms", []))
    torch.testing.assert_close(model(x), plain)                     # hooks gone


def test_sign_gates_start_open_or_at_the_codes_random_signs():
    model, shape = builtin("resnet20")
    x = torch.randn(1, *shape)
    opened = gate_(copy.deepcopy(model), x, "sign", init="open")
    assert all(bool((g() == 1).all()) for g in opened.gates.values())          # the student starts whole
    torch.manual_seed(0)
    shut = gate_(copy.deepcopy(model), x, "sign", init="random")                # N(0, std²): about half closed
    closed = sum(int((g() == 0).sum()) for g in shut.gates.values())
    total = sum(g.size for g in shut.gates.values())
    assert 0.3 < closed / total < 0.7
    blocks = block_gate_(copy.deepcopy(model), x, init="open")
    assert all(bool((g() == 1).all()) for g in blocks.gates.values())


def test_block_gates_one_per_block_output_none_on_the_stem_and_they_save_load_copy(tmp_path):
    model, shape = builtin("resnet20")
    x = torch.randn(2, *shape)
    plain = copy.deepcopy(model).eval()(x)
    gates = block_gate_(model, x[:1], init="open")
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert gates.group_names() == blocks and isinstance(gates, BlockGates)      # 9 gates, the stem has none
    assert [g.size for g in gates.gates.values()] == [16] * 3 + [32] * 3 + [64] * 3
    assert gates.sites["layer1/0"] == [("layer1.1.conv1", 0, 1), ("layer1.1.shortcut", 0, 1)]
    assert gates.sites["layer3/2"] == [("fc", 0, 1)]
    torch.testing.assert_close(model.eval()(x), plain)                           # all open = the ungated model
    _random_signs(model)
    out = model(x)
    with torch.no_grad():   # gate b = block b's output masked, as the paper's y_b = g_b * block_b(x)
        h = model.stem(x)
        for b, g in zip(blocks, gates.gates.values()):
            h = model.get_submodule(b)(h) * g().view(1, -1, 1, 1)
        torch.testing.assert_close(model.fc(model.pool(h).flatten(1)), out)
    names = [n for n, _ in model.named_parameters() if n.startswith("channel_gates.")]
    assert len(names) == 9 and all(n.endswith(".m") for n in names)
    save_model(model, tmp_path / "gated.safetensors")
    again = load_model(tmp_path / "gated.safetensors")[0].eval()
    torch.testing.assert_close(again(x), out)                                    # rebuilt gated, same gates
    assert isinstance(gates_of(again), BlockGates) and gates_of(again).macs().item() == gates.macs().item()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for gate in gates_of(twin).gates.values():
            gate.m.fill_(1.0)
    torch.testing.assert_close(model(x), out)                                    # the copy has its own gates
    torch.testing.assert_close(twin.eval()(x), plain)
    ungate_(model)
    assert not any(t["kind"] == "block_gates" for t in model.tandem_transforms)
    torch.testing.assert_close(model(x), plain)


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet20"])   # option-A shortcuts; projections (kind B)
def test_block_removal_has_the_gates_widths_and_macs_and_reloads(name, tmp_path):
    model, shape = builtin(name)
    x = torch.randn(2, *shape)
    plain = copy.deepcopy(model).eval()(x)
    gates = block_gate_(model, x[:1], init="open")
    whole = remove_closed(model, x[:1]).eval()                                   # nothing closed: the same network
    assert whole.config["widths"] == model.config["widths"]
    torch.testing.assert_close(whole(x), plain)
    _random_signs(model)
    kept = gates.kept()
    assert all(0 < k < g.size for k, g in zip(kept.values(), gates.gates.values()))
    small = remove_closed(model, x[:1]).eval()
    assert small.config["name"] == name and not hasattr(small, "channel_gates")
    assert small.config["widths"] == [16] + [k for k in kept.values() for _ in range(2)]   # conv1 = conv2 = count_b
    assert cost.profile(small, shape).macs == pytest.approx(gates.macs().item())
    keep = gates.keep()
    torch.testing.assert_close(small.get_submodule("layer2.1.conv2").weight,                  # kept filters, kept inputs
                               model.get_submodule("layer2.1.conv2").weight[keep["layer2.1"]][:, keep["layer2.1"]])
    save_model(small, tmp_path / "small.safetensors")
    again = load_model(tmp_path / "small.safetensors")[0].eval()
    torch.testing.assert_close(again(x), small(x))


def test_block_gates_refuse_a_model_not_made_of_tandem_blocks():
    with pytest.raises(TandemError, match="is not a ResNet built by tandem.models"):
        block_gate_(UserNet(), torch.zeros(1, 3, 12, 12))
