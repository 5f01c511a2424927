"""Optimisers and learning-rate schedules, built from a recipe's `train` section.

Parameters fall into categories, so a recipe can exempt some from weight decay
(`train.no_decay`) and a method can give some their own lr or decay (PDD's gates, SBS's
thresholds, quantizer scales): `bn` (any BatchNorm's scale and shift), `bias`, `quantizer`
(the parameters of a module whose class says `param_category = "quantizer"`: LSQ steps, PACT's
alpha, k-means centroids), `gate` (learned channel gates) and `weight` (everything else).
"""
from __future__ import annotations

import math

import torch

CATEGORIES = ("weight", "bias", "bn", "quantizer", "gate")


def param_categories(net: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """{category: trainable parameters}; a parameter shared by two modules is counted once."""
    out: dict[str, list] = {}
    seen: set[int] = set()
    for module in net.modules():
        own = getattr(module, "param_category", None)
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            cat = own or ("bn" if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
                          else "bias" if pname == "bias" else "weight")
            out.setdefault(cat, []).append(p)
    return out


def parameter_groups(net: torch.nn.Module, cfg, options: dict | None = None) -> list[dict]:
    """One optimiser group per category present: weight decay 0 for the categories in
    `cfg.no_decay`, then the method's `options[category]` (e.g. {'gate': {'lr': 0.1}})."""
    groups = []
    for cat, params in param_categories(net).items():
        group = {"params": params, "name": cat}
        if cat in getattr(cfg, "no_decay", ()):
            group["weight_decay"] = 0.0
        group.update((options or {}).get(cat, {}))
        groups.append(group)
    return groups


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov), Adam or AdamW with the recipe's lr and weight decay; `params`
    is a list of tensors or of groups (dicts) with their own options."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_factor(step: int, steps_per_epoch: int, cfg) -> float:
    """Multiplier of the base lr at optimiser step `step` (stepped per batch, so warm-up is smooth)."""
    epoch = step / max(1, steps_per_epoch)
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    # cosine from the end of warm-up to the last epoch
    span = max(1e-8, cfg.epochs - cfg.warmup_epochs)
    progress = min(1.0, (epoch - cfg.warmup_epochs) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
