"""`quantize_(model, policy)`: swap every Conv2d / Linear for its quantized version, in place.

The swap needs no data and is recorded on the model (`model.tandem_transforms`), so a saved
model file is rebuilt by `tandem.engine.load_model` before its weights are loaded.
Data-dependent initialisation is the separate `calibrate(model, batches)` step.
"""
from __future__ import annotations

import fnmatch
import itertools

import torch
import torch.nn as nn

from ..engine.checkpoint import record_transform, register_transform
from ..errors import RecipeError, TandemError
from ..modes import eval_mode
from .layers import QUANT_LAYERS, QuantConv2d, QuantLinear
from .policy import QuantSpec, make_spec
from .registry import QUANTIZERS
from .quantizers import ActQuantizer, WeightQuantizer

FLOAT_LAYERS = (nn.Conv2d, nn.Linear)


def _match(name: str, patterns) -> list[str]:
    return [p for p in patterns if fnmatch.fnmatchcase(name, p)]


def _make_weight_quantizer(method, bits, layer, spec: QuantSpec) -> WeightQuantizer | None:
    return None if bits >= 32 else QUANTIZERS.get(method).weight.from_spec(bits, layer, spec)


def _make_input_quantizer(method, bits, spec: QuantSpec) -> ActQuantizer | None:
    return None if bits >= 32 else QUANTIZERS.get(method).act.from_spec(bits, spec)


def layer_plan(model: nn.Module, spec: QuantSpec) -> dict[str, tuple[str, int, int] | None]:
    """{layer name: (method, w_bits, a_bits) or None when left in float}, in module order.
    The first Conv2d/Linear and the last one in module order get the first/last rule."""
    names = [n for n, m in model.named_modules() if isinstance(m, FLOAT_LAYERS) and not isinstance(m, QUANT_LAYERS)]
    if not names:
        raise TandemError("quantize_: the model has no nn.Conv2d or nn.Linear layer (or they are already quantized)")
    all_layers = [n for n, m in model.named_modules() if isinstance(m, FLOAT_LAYERS)]
    for pattern in [*spec.overrides, *spec.skip]:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in all_layers):
            shown = ", ".join(all_layers[:8]) + (" ..." if len(all_layers) > 8 else "")
            raise RecipeError(f"quant error: layer pattern {pattern!r} matches no Conv2d/Linear layer; "
                              f"the layers are: {shown} (patterns are globs, e.g. 'layer1.*')")
    plan = {}
    for n in names:
        if _match(n, spec.skip):
            plan[n] = None
            continue
        method, wb, ab = spec.method, spec.w_bits, spec.a_bits
        if n in (names[0], names[-1]) and spec.first_last != "same":
            if spec.first_last == "fp":
                plan[n] = None
                continue
            wb = ab = spec.first_last
            method = spec.first_last_method or method
        for p in _match(n, spec.overrides):
            o = spec.overrides[p]
            method, wb, ab = o.method or method, o.w_bits or wb, o.a_bits or ab
        plan[n] = (method, wb, ab) if min(wb, ab) < 32 else None
    return plan


def _swap(model: nn.Module, spec: QuantSpec) -> nn.Module:
    plan = layer_plan(model, spec)
    for name, entry in plan.items():
        if entry is None:
            continue
        method, wb, ab = entry
        layer = model.get_submodule(name)
        wq = _make_weight_quantizer(method, wb, layer, spec)
        aq = _make_input_quantizer(method, ab, spec)
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        new = cls.from_float(layer, wq, aq)
        if wq is not None:
            wq.to(layer.weight.device)
        if aq is not None:
            aq.to(layer.weight.device)
        if wq is not None and wq.frozen_weight:
            layer.weight.requires_grad_(False)   # e.g. k-means: only the shared centroids learn
        if name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        else:
            raise TandemError("quantize_: pass a model that contains layers, not a single layer")
    return model


def quantize_(model: nn.Module, policy: QuantSpec | dict | None = None, **kwargs) -> nn.Module:
    """Swap the model's Conv2d/Linear layers for quantized ones, in place; returns the model.

    `policy` is a QuantSpec or dict, or give its fields as keywords: `quantize_(net,
    method="pact", w_bits=4, a_bits=4)`. Call `calibrate(model, batches)` next."""
    spec = make_spec(policy, **kwargs)
    _swap(model, spec)
    if spec.layout == "deploy":
        from .deploy import place_for_deploy
        place_for_deploy(model, lambda bits, like: _deploy_quantizer(bits, like, spec), spec.a_bits)
    record_transform(model, {"kind": "quantize", "policy": spec.model_dump(mode="json")})
    return model


def record_layer_bits(model: nn.Module, bits: dict[str, dict]) -> None:
    """Per-layer widths chosen after `quantize_` ({layer: {"w_bits", "a_bits"}}, e.g. by a bit
    search) added to the overrides of its record, so a saved file rebuilds them."""
    for record in getattr(model, "tandem_transforms", []):
        if record.get("kind") == "quantize":
            record["policy"]["overrides"] = {**record["policy"].get("overrides", {}), **bits}


def _deploy_quantizer(bits: int, like, spec: QuantSpec) -> ActQuantizer:
    """A tensor's quantizer in the deploy layout: of the same kind as a reader's (`like`), else
    of the policy's method; on the model's device at its first calibration."""
    import copy
    if like is not None:
        q = copy.deepcopy(like)
        q.reset_stats()
        return q
    return _make_input_quantizer(spec.method, bits, spec)


RUN_FIELDS = ("mode", "calib_batches", "epochs", "lr")   # in the policy of files written before they moved


@register_transform("quantize")
def _rebuild(model: nn.Module, record: dict) -> nn.Module:
    policy = {k: v for k, v in record["policy"].items() if k not in RUN_FIELDS}
    return quantize_(model, make_spec(policy))


def quantizers_of(model: nn.Module):
    for m in model.modules():
        if isinstance(m, QUANT_LAYERS):
            yield m


@torch.no_grad()
def calibrate(model: nn.Module, batches, num_batches: int | None = None) -> nn.Module:
    """Data-dependent initialisation: weight quantizers from the weights (LSQ step, k-means
    codebooks), input quantizers from the float activations of `batches` (an iterable of x or
    (x, y)): signedness, observer ranges, LSQ steps. The model runs in eval mode, with float
    activations. When a weight quantizer changes the weights' scale (DoReFa, PACT's DoReFa
    weights: [-1, 1]), the BatchNorm running statistics are first re-estimated on the same
    batches with the quantized weights; a pretrained network's statistics would otherwise blow
    its activations up layer by layer, and the observed ranges with them."""
    layers = list(quantizers_of(model))
    if not layers:
        raise TandemError("calibrate: the model has no quantized layers; call quantize_ first")
    if iter(batches) is batches:   # a one-pass iterator: keep its batches for both passes
        batches = list(itertools.islice(batches, num_batches))
    for layer in layers:
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.calibrate_weight(layer.weight)
    if any(layer.weight_quantizer is not None and layer.weight_quantizer.rescales for layer in layers):
        reestimate_bn(model, batches, num_batches, float_activations=True)
    acts = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    if acts:
        for a in acts:
            a.observing = True
            a.reset_stats()
        seen = 0
        try:
            with eval_mode(model):
                for x in _inputs(batches, num_batches, next(model.parameters()).device):
                    model(x)
                    seen += 1
        finally:
            for a in acts:
                a.observing = False
        if seen == 0:
            raise TandemError("calibrate: no batches were given")
        for a in acts:
            a.finish_calibration()
    return model


def _inputs(batches, num_batches, device):
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        yield (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches, num_batches, *, float_activations: bool = False) -> None:
    """BatchNorm running mean/var as the plain average over the batches (momentum None), the
    weights quantized, the activations quantized or (`float_activations`, as calibration needs
    before the activation ranges exist) in float; every other module in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    acts = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    if not bns:
        return
    saved, observing = [(bn, bn.momentum) for bn in bns], [(a, a.observing) for a in acts]
    with eval_mode(model):
        for a in acts:
            a.observing = float_activations
        try:
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            for x in _inputs(batches, num_batches, next(model.parameters()).device):
                model(x)
        finally:
            for bn, momentum in saved:
                bn.momentum = momentum
            for a, was_observing in observing:
                a.observing = was_observing
                if float_activations:
                    a.reset_stats()   # the ranges seen here were only a means to the statistics
