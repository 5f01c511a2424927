import math

import pytest
import torch
import torch.nn as nn

from tandem.distill import FeatureTap, HintLoss, hinton_kd, kl_divergence, mutual_losses
from tandem.errors import TandemError

S = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
T = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def kl_by_hand(student, target, t=1.0):
    """mean over rows of sum_c p_t log(p_t / p_s), times t^2."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), target.tolist()):
        ps, pt = softmax(s_row, t), softmax(t_row, t)
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    return t * t * total / len(student)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kl_matches_hand_computation(temp):
    assert kl_divergence(S, T, temp).item() == pytest.approx(kl_by_hand(S, T, temp), rel=1e-5)


def test_kl_is_zero_for_identical_and_asymmetric_otherwise():
    assert kl_divergence(S, S).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_divergence(S, T).item() != pytest.approx(kl_divergence(T, S).item())


def test_hinton_kd_weights():
    y = torch.tensor([0, 1])
    out = hinton_kd(S, T, y, alpha=0.9, temperature=4.0)
    ce = torch.nn.functional.cross_entropy(S, y).item()
    assert out["ce"].item() == pytest.approx(0.1 * ce, rel=1e-6)
    assert out["kd"].item() == pytest.approx(0.9 * kl_by_hand(S, T, 4.0), rel=1e-5)


def test_teacher_gets_no_gradient():
    s, t = S.clone().requires_grad_(), T.clone().requires_grad_()
    sum(hinton_kd(s, t, torch.tensor([0, 1])).values()).backward()
    assert s.grad is not None and t.grad is None


def test_mutual_two_peers_by_hand():
    y = torch.tensor([0, 1])
    out = mutual_losses({"P": S, "Q": T}, y)
    ce = torch.nn.functional.cross_entropy
    assert out["ce/P"].item() == pytest.approx(ce(S, y).item())
    assert out["kl/P"].item() == pytest.approx(kl_by_hand(S, T), rel=1e-5)   # KL(p_Q || p_P)
    assert out["kl/Q"].item() == pytest.approx(kl_by_hand(T, S), rel=1e-5)   # KL(p_P || p_Q)


def test_mutual_three_peers_average_or_sum():
    U = torch.tensor([[0.0, 0.0, 3.0], [1.0, -1.0, 0.0]])
    y = torch.tensor([2, 0])
    avg = mutual_losses({"a": S, "b": T, "c": U}, y)
    summed = mutual_losses({"a": S, "b": T, "c": U}, y, average_peers=False)
    expected_sum = kl_by_hand(S, T) + kl_by_hand(S, U)
    assert summed["kl/a"].item() == pytest.approx(expected_sum, rel=1e-5)
    assert avg["kl/a"].item() == pytest.approx(expected_sum / 2, rel=1e-5)


def test_no_gradient_flows_into_a_peer_from_anothers_loss():
    p, q = S.clone().requires_grad_(), T.clone().requires_grad_()
    out = mutual_losses({"P": p, "Q": q}, torch.tensor([0, 1]))
    (out["ce/P"] + out["kl/P"]).backward()
    assert p.grad is not None and q.grad is None
    # and the sum of both losses gives each peer exactly the gradient of its own loss
    p2, q2 = S.clone().requires_grad_(), T.clone().requires_grad_()
    sum(mutual_losses({"P": p2, "Q": q2}, torch.tensor([0, 1])).values()).backward()
    torch.testing.assert_close(p2.grad, p.grad)


def test_mutual_needs_two_peers():
    with pytest.raises(ValueError):
        mutual_losses({"P": S}, torch.tensor([0, 1]))


def test_feature_tap_and_hint_loss():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    ts, tt = FeatureTap(student, ["0"]), FeatureTap(teacher, ["0"])
    x = torch.randn(2, 3, 8, 8)
    student(x), teacher(x)
    hint = HintLoss(4, 8)
    assert isinstance(hint.adapter, nn.Conv2d)
    loss = hint(ts.features["0"], tt.features["0"])
    loss.backward()
    assert student[0].weight.grad is not None and teacher[0].weight.grad is None
    expected = torch.nn.functional.mse_loss(hint.adapter(ts.features["0"]), tt.features["0"])
    assert loss.item() == pytest.approx(expected.item())
    assert isinstance(HintLoss(8, 8).adapter, nn.Identity)
    with pytest.raises(TandemError, match="no module named 'nope'"):
        FeatureTap(student, ["nope"])


def test_mutual_per_peer_kl_weights():
    y = torch.tensor([0, 1])
    one = mutual_losses({"P": S, "Q": T}, y)
    out = mutual_losses({"P": S, "Q": T}, y, kl_weight={"P": 0.25, "Q": 2.0})
    assert out["kl/P"].item() == pytest.approx(0.25 * one["kl/P"].item())
    assert out["kl/Q"].item() == pytest.approx(2.0 * one["kl/Q"].item())
    assert out["ce/P"].item() == one["ce/P"].item()
