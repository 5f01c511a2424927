"""Distillation losses: Hinton KD and Deep Mutual Learning (methods.md §6.9, §1.4).

All of them compare *probability distributions* with a true KL divergence: `F.kl_div` takes the
student's log-probabilities as input and the target's probabilities, `reduction='batchmean'`
(the mean over the batch of the per-sample KL, which is what the papers write), and a T**2
factor when a temperature softens both sides so the gradient scale does not shrink with T.
Targets are always detached: no gradient flows into a teacher or a peer from this loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_divergence(student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T**2 * KL( softmax(target/T) || softmax(student/T) ), averaged over the batch."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_target = F.log_softmax(target_logits.detach().float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_target, reduction="batchmean", log_target=True) * (t * t)


def hinton_kd(student_logits, teacher_logits, y, *, alpha: float = 0.9, temperature: float = 4.0) -> dict:
    """Hinton et al. 2015: (1 - alpha) * CE(y, student) + alpha * T**2 * KL(teacher_T || student_T)."""
    return {"ce": (1.0 - alpha) * F.cross_entropy(student_logits.float(), y),
            "kd": alpha * kl_divergence(student_logits, teacher_logits, temperature)}


def mutual_losses(logits: dict[str, torch.Tensor], y: torch.Tensor, *, temperature: float = 1.0,
                  average_peers: bool = True, kl_weight: float | dict[str, float] = 1.0) -> dict:
    """Deep Mutual Learning among K >= 2 peers (Zhang et al. 2018).

    For each peer k: CE(y, p_k) + w / (K - 1) * sum_{l != k} KL(p_l || p_k), with each p_l a
    fixed (detached) target, so summing every peer's loss and taking one backward pass gives
    each peer exactly the gradient of its own loss. `average_peers=False` sums over peers as the
    authors' TensorFlow code does (identical for K = 2). `kl_weight` is w for every peer, or a
    {peer: w} dict (a weaker peer may want more of the stronger one than the reverse).
    Keys are `ce/<peer>` and `kl/<peer>`.
    """
    names = list(logits)
    if len(names) < 2:
        raise ValueError(f"mutual learning needs at least 2 peers, got {names}")
    weights = kl_weight if isinstance(kl_weight, dict) else dict.fromkeys(names, kl_weight)
    norm = len(names) - 1 if average_peers else 1
    out = {}
    for k in names:
        out[f"ce/{k}"] = F.cross_entropy(logits[k].float(), y)
        out[f"kl/{k}"] = weights[k] / norm * sum(kl_divergence(logits[k], logits[l], temperature) for l in names if l != k)
    return out
