"""`quant.layout: deploy`: activation quantizers where an integer-only runtime needs them.

The papers' placement (`layout: inputs`) rounds each quantized layer's own input. An int8
runtime fuses a conv into an integer kernel only between a DequantizeLinear and a
QuantizeLinear, and an Add only when both its inputs and its output are quantized: with the
papers' placement the conv before each residual Add, the Add itself and every shortcut stay in
float (onnxruntime fused 9 of ResNet-20's 19 convs). The deploy placement quantizes each
*tensor* once, where it is made, so every reader (the next conv, the shortcut, the Add) sees
the same integer grid:

- a tensor read by an Add (through pass-through ops: Identity, Dropout, MaxPool, slicing,
  padding, flatten/view, tandem's option-A shortcut), or by several quantized layers, gets one
  quantizer at the module that makes it (a forward hook; the quantizer is the module's
  `output_quantizer`), or, when a function makes it, at the one module that reads it all
  (a forward pre-hook; `deploy_input_quantizer`); the quantized layers that read it no longer
  round it themselves (their `a_bits` still counts it);
- what each Add makes (after the ReLU that follows it, if one does) gets a quantizer the same
  way, so the runtime's integer Add has an integer output;
- a tensor read by one quantized layer alone keeps that layer's own input quantizer, as in
  the papers' placement;
- pass-through ops keep their input's grid (they make no new values), so they get no
  quantizer; the export repeats the QuantizeLinear/DequantizeLinear after them (exact).

The model stays the user's module (hooks and submodules, no GraphModule), so a saved model
rebuilds by replaying the placement. A tensor that neither a module makes nor one module reads
whole is refused with its name, since no hook can reach it.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import TandemError
from .layers import QUANT_LAYERS

_ADDS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_PASS_FUNCS = {operator.getitem, F.pad, torch.flatten, F.max_pool2d, F.adaptive_max_pool2d, F.dropout}
_PASS_METHODS = {"flatten", "view", "reshape", "contiguous"}


class _Tracer(fx.Tracer):
    """Quantized layers, BN and tandem's channel-map modules (option-A shortcuts) stay whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QUANT_LAYERS) or hasattr(m, "channel_map") or super().is_leaf_module(m, qualname)


def _is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target in _ADD_METHODS)


def _is_pass(n: fx.Node, modules: dict) -> bool:
    if n.op == "call_module":
        m = modules[n.target]
        return isinstance(m, _PASS_MODULES) or hasattr(m, "channel_map")
    return (n.op == "call_function" and n.target in _PASS_FUNCS) or (n.op == "call_method" and n.target in _PASS_METHODS)


def _quant_layer(n: fx.Node, modules: dict):
    if n.op == "call_module" and isinstance(modules[n.target], QUANT_LAYERS):
        layer = modules[n.target]
        return layer if layer.input_quantizer is not None else None
    return None


def _root(n: fx.Node, modules: dict) -> fx.Node:
    """The tensor whose grid `n` is on: up through pass-through ops."""
    while _is_pass(n, modules) and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def _readers(n: fx.Node, modules: dict) -> list[fx.Node]:
    """The quantized layers and Adds that read `n`, directly or through pass-through ops."""
    out = []
    for u in n.users:
        if _quant_layer(u, modules) is not None or _is_add(u):
            out.append(u)
        elif _is_pass(u, modules) and u.args and u.args[0] is n:
            out.extend(_readers(u, modules))
    return out


def _is_relu(n: fx.Node, modules: dict) -> bool:
    if n.op == "call_module":
        return isinstance(modules[n.target], (nn.ReLU, nn.ReLU6))
    return (n.op == "call_function" and n.target in (torch.relu, F.relu, F.relu6)) or \
        (n.op == "call_method" and n.target in ("relu", "relu_"))


def _add_output(n: fx.Node, modules: dict) -> bool:
    """`n` is what an Add makes: the Add itself, or the ReLU that alone reads it (an int8 runtime
    fuses Add and ReLU into one integer Add when the ReLU's output is quantized)."""
    if _is_add(n):
        users = list(n.users)
        return not (len(users) == 1 and _is_relu(users[0], modules))
    return _is_relu(n, modules) and bool(n.args) and isinstance(n.args[0], fx.Node) and _is_add(n.args[0]) \
        and len(n.args[0].users) == 1


def _quantize_output(module, args, out):
    return module.output_quantizer(out)


def _quantize_input(module, args):
    return (module.deploy_input_quantizer(args[0]), *args[1:])


def _covering_module(n: fx.Node, readers: list[fx.Node], root: nn.Module):
    """The innermost module whose forward takes `n` as its first input and makes every reader."""
    stacks = [list(r.meta.get("nn_module_stack", {})) for r in readers]
    common = [p for p in stacks[0] if all(p in s for s in stacks[1:])] if stacks else []
    for path in reversed(common):
        # the module's own input must be n: its first node reading from outside is a reader of n
        users_inside = [u for u in n.users if path in u.meta.get("nn_module_stack", {})]
        if users_inside and len(users_inside) == len(n.users) and path:
            return path, root.get_submodule(path)
    return None, None


def place_for_deploy(model: nn.Module, make_quantizer, default_bits: int) -> dict:
    """Add the deploy placement's quantizers to a model whose layers quantize_ already swapped.
    `make_quantizer(bits, like)` makes an activation quantizer (`like`: a reader's quantizer,
    for its method, or None for the policy's). Returns {tensor: where its quantizer sits}."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable Python control flow
        raise TandemError(f"quant.layout deploy needs a model torch.fx can trace; {type(model).__name__}: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]} (use quant.layout: inputs)") from None
    modules = dict(model.named_modules())
    calls = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    roots: dict[fx.Node, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op in ("output",) or _root(n, modules) is not n:
            continue
        readers = _readers(n, modules)
        if (any(_is_add(r) for r in readers) or sum(_quant_layer(r, modules) is not None for r in readers) > 1
                or _add_output(n, modules)):
            roots[n] = readers
    if not roots:
        raise TandemError(f"quant.layout deploy would change nothing in {type(model).__name__}: no Add, and every "
                          f"tensor is read by one quantized layer alone (as in layout inputs); leave layout unset")
    placed = {}
    for n, readers in roots.items():
        layers = [_quant_layer(r, modules) for r in readers if _quant_layer(r, modules) is not None]
        widths = {layer.input_quantizer.bits for layer in layers} or {default_bits}
        if len(widths) > 1:
            names = ", ".join(r.target for r in readers if _quant_layer(r, modules) is not None)
            raise TandemError(f"quant.layout deploy: the tensor {n.name} is read by layers at different activation "
                              f"widths ({names}: {sorted(widths)}); one tensor has one grid: give them the same "
                              f"a_bits, or use quant.layout: inputs")
        like = layers[0].input_quantizer if layers else None
        q = make_quantizer(widths.pop(), like).to(next(model.parameters()).device)
        if n.op == "call_module" and calls[n.target] == 1:
            owner = modules[n.target]
            if hasattr(owner, "output_quantizer"):
                raise TandemError(f"quant.layout deploy: {n.target} already has an output_quantizer")
            owner.output_quantizer = q
            owner.register_forward_hook(_quantize_output)
            placed[n.name] = f"{n.target} (output)"
        else:
            path, owner = _covering_module(n, readers, model)
            if owner is None or calls.get(path, 1) != 1 or isinstance(owner, QUANT_LAYERS):
                raise TandemError(f"quant.layout deploy: the tensor {n.name} (made by {n.op} {n.target}) is read by "
                                  f"{', '.join(str(r.target) for r in readers)}, and no module makes it or reads it "
                                  f"whole, so no hook can quantize it; make that op a module (e.g. nn.ReLU) or use "
                                  f"quant.layout: inputs")
            owner.deploy_input_quantizer = q
            owner.register_forward_pre_hook(_quantize_input)
            placed[n.name] = f"{path} (input)"
        for layer in layers:
            layer.input_quantizer = None   # rounded upstream; layer.a_bits still counts it
    return placed
