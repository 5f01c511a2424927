"""Which output channels must be removed together: a channel-dependency graph traced with torch.fx.

Every conv/linear output starts an *origin* (a run of channels). A residual addition (or a
multiplication, e.g. squeeze-excitation) ties the origins of its two inputs; concatenation puts
origins side by side; BN and depthwise convs follow their input's channels; a flatten after
pooling spreads each channel over H*W features of the next linear. A *group* is a set of tied
origins: its channels are scored, masked and removed together.

A module with a ``channel_map`` (the option-A shortcut: output channel j is input channel
map[j], or zero) is traced as one step: it consumes its input's channels and starts a new run
of output channels, so the residual streams on its two sides are separate groups; removing a
channel on either side rewrites the map (surgery) instead of freezing the stream.

Anything the tracer does not understand (channel padding or slicing, reshapes, a layer called twice, a bias added from outside, the network output)
*freezes* the origins it touches. So whatever stays prunable can be removed exactly: the
physically smaller model computes what the masked model computes.
"""
from __future__ import annotations

import math
import operator
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import TandemError
from ..modes import eval_mode
from ..quant.layers import float_path


@dataclass(frozen=True)
class Member:
    """One place a group's channels live: ``kind`` is 'out' (filters of a conv/linear), 'dw'
    (a depthwise conv's channels), 'bn' (BN entries), 'in' (a consumer's input channels), or
    'map_in' / 'map_out' (the input channels / output positions of a channel-map module);
    the group's channel i is index ``offset + i`` there (times ``repeat`` features after a
    flatten, for a linear consumer)."""
    module: str
    kind: str
    offset: int = 0
    repeat: int = 1


@dataclass
class Group:
    name: str                 # the first producer's module name
    size: int
    members: list[Member] = field(default_factory=list)

    def of_kind(self, *kinds: str) -> list[Member]:
        return [m for m in self.members if m.kind in kinds]


@dataclass
class Layer:
    """A conv/linear call: MACs = unit * out * in_per_group (depthwise: in_per_group = 1)."""
    name: str
    unit: float
    out: int
    in_pg: int
    depthwise: bool


# ops and modules that map a zero channel to a zero channel and keep channels in place
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Tanh, nn.Identity,
                 nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool2d)
_PASS_FUNCS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, torch.tanh, F.dropout,
               F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.nn.functional.relu_}
_PASS_METHODS = {"relu", "relu_", "contiguous", "clone", "tanh"}
_TIE_OPS = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, torch.add, torch.mul, torch.sub}
_TIE_METHODS = {"add", "add_", "mul", "mul_", "sub"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
# channel-preserving but 0 -> nonzero: allowed only as the multiplier of a zero channel
_NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_NONZERO_FUNCS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_NONZERO_METHODS = {"sigmoid"}


_BN = nn.modules.batchnorm._BatchNorm   # BatchNorm1d/2d/3d and SyncBatchNorm (after a multi-GPU stage)
_LAYERS = (nn.Conv2d, nn.Linear, _BN)


class _Tracer(fx.Tracer):
    """Keeps channel-map modules and every conv, linear and BN whole (subclasses included: a
    quantized layer is the layer it wraps, and its quantizers never enter the graph), so the
    graph sees one call it knows how to follow."""

    def __init__(self):
        super().__init__()
        self.inside: list[str] = []   # the modules being traced, outermost first (for errors)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return hasattr(m, "channel_map") or isinstance(m, _LAYERS) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.inside.append(f"{self.path_of_module(m) or 'the model'} ({type(m).__name__})")
        out = super().call_module(m, forward, args, kwargs)
        self.inside.pop()
        return out


def _user_line(exc: BaseException) -> str:
    """', at file.py:12 `if y.mean() > 0:`': the deepest frame of the failed trace outside
    torch and tandem (the user's line that stopped it), or ''."""
    torch_dir, own_dir = Path(torch.__file__).parent, Path(__file__).parents[1]
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not Path(f.filename).is_relative_to(torch_dir) and not Path(f.filename).is_relative_to(own_dir)]
    if not frames:
        return ""
    f = frames[-1]
    code = (f.line or "").strip()
    return f", at {Path(f.filename).name}:{f.lineno}" + (f" `{code}`" if code else "")


class ChannelGraph:
    """Trace ``model`` on ``example_input`` and find its prunable channel groups and the MACs
    of each conv/linear layer (for MACs-target selection)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.model = model
        self.input_shape = tuple(example_input.shape[1:])
        tracer = _Tracer()
        try:
            gm = fx.GraphModule(model, tracer.trace(model))
        except Exception as exc:  # fx raises many types for untraceable Python control flow
            where = tracer.inside[-1] if tracer.inside else f"the forward of {type(model).__name__}"
            where += _user_line(exc)
            reason = " ".join(str(exc).split())[:200]
            raise TandemError(f"the channel graph cannot trace {type(model).__name__}: {where} stopped torch.fx "
                              f"({type(exc).__name__}: {reason}); data-dependent control flow (if/for on tensor "
                              f"values) cannot be traced: rewrite it with tensor ops, or compress without "
                              f"channel pruning (method quantize)") from None
        with eval_mode(model), torch.no_grad(), float_path(model):   # shapes only
            ShapeProp(gm).propagate(example_input)
        self._modules = dict(model.named_modules())
        self._sizes: list[int] = []
        self._parent: list[int] = []
        self._frozen: set[int] = set()
        self._members: dict[int, list[Member]] = {}
        self._calls: dict[str, int] = {}
        self._nonzero: dict = {}   # node -> view of a sigmoid-like output (see _walk)
        self.layers: dict[str, Layer] = {}
        self._walk(gm.graph)
        self.groups = self._collect()

    # ---- union-find over origins ------------------------------------------------------------
    def _new(self, size: int, frozen: bool = False) -> int:
        self._sizes.append(size)
        self._parent.append(len(self._parent))
        self._members[len(self._sizes) - 1] = []
        if frozen:
            self._frozen.add(len(self._sizes) - 1)
        return len(self._sizes) - 1

    def _find(self, o: int) -> int:
        while self._parent[o] != o:
            self._parent[o] = self._parent[self._parent[o]]
            o = self._parent[o]
        return o

    def _union(self, a: int, b: int) -> None:
        self._parent[self._find(a)] = self._find(b)

    def _freeze(self, view) -> None:
        if view is not None:
            for o, _ in view[0]:
                self._frozen.add(o)

    # ---- the walk ---------------------------------------------------------------------------
    @staticmethod
    def _shape(node):
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def _fresh(self, node, frozen: bool = True):
        shape = self._shape(node)
        if shape is None or len(shape) < 2:
            return None
        return (((self._new(shape[1], frozen=frozen), shape[1]),), 1)

    def _walk(self, graph: fx.Graph) -> None:
        views: dict = {}   # node -> (((origin, length), ...), repeat) or None

        def view_of(a):
            return views.get(a) if isinstance(a, fx.Node) else None

        def all_nodes(args):
            out = []
            for a in args:
                if isinstance(a, fx.Node):
                    out.append(a)
                elif isinstance(a, (list, tuple)):
                    out += all_nodes(a)
                elif isinstance(a, dict):
                    out += all_nodes(list(a.values()))
            return out

        def unknown(node):
            for a in all_nodes(list(node.args) + list(node.kwargs.values())):
                self._freeze(views.get(a))
            return self._fresh(node)

        def members(view, module, kind):
            offset = 0
            for o, n in view[0]:
                self._members[o].append(Member(module, kind, offset * view[1], view[1]))
                offset += n

        for node in graph.nodes:
            # a channel that is not 0 where its input was 0 (after a sigmoid) is harmless only
            # as a multiplier of a zero channel (squeeze-excitation); any other use freezes it
            if not self._is_tie(node, mul_only=True):
                for a in all_nodes(list(node.args) + list(node.kwargs.values())):
                    if a in self._nonzero:
                        self._freeze(self._nonzero.pop(a))
            if node.op == "call_module" and isinstance(self._modules[node.target], _NONZERO_MODULES) or \
                    node.op == "call_function" and node.target in _NONZERO_FUNCS or \
                    node.op == "call_method" and node.target in _NONZERO_METHODS:
                x = view_of(node.args[0])
                if x is not None and x[1] == 1:
                    self._nonzero[node] = x
                    views[node] = None
                else:
                    views[node] = unknown(node)
            elif node.op == "placeholder":
                views[node] = self._fresh(node)
            elif node.op == "get_attr":
                views[node] = None
            elif node.op == "output":
                for a in all_nodes(node.args):
                    self._freeze(views.get(a))
            elif node.op == "call_module":
                views[node] = self._module(node, views, view_of, unknown, members)
            else:
                views[node] = self._function(node, view_of, unknown, all_nodes)
        for view in self._nonzero.values():
            self._freeze(view)
        for name, count in self._calls.items():
            if count > 1:   # shared weights: removing a channel for one call would change the other
                for o, ms in self._members.items():
                    if any(m.module == name for m in ms):
                        self._frozen.add(o)

    def _module(self, node, views, view_of, unknown, members):
        name, mod = node.target, self._modules[node.target]
        x = view_of(node.args[0]) if node.args else None
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            self._calls[name] = self._calls.get(name, 0) + 1
            self._add_layer(name, mod, node)
        if x is None and isinstance(mod, _LAYERS):
            return self._fresh(node, frozen=isinstance(mod, _BN))
        if isinstance(mod, nn.Conv2d):
            if x[1] != 1:
                return unknown(node)
            if mod.groups == 1:
                members(x, name, "in")
                out = self._new(mod.out_channels)
                self._members[out].append(Member(name, "out"))
                return (((out, mod.out_channels),), 1)
            if mod.groups == mod.in_channels == mod.out_channels:
                members(x, name, "dw")
                return x
            return unknown(node)
        if isinstance(mod, nn.Linear):
            shape = self._shape(node.args[0])
            if shape is None or len(shape) != 2:
                return unknown(node)
            members(x, name, "in")
            out = self._new(mod.out_features)
            self._members[out].append(Member(name, "out"))
            return (((out, mod.out_features),), 1)
        if hasattr(mod, "channel_map"):
            if x is None or x[1] != 1:
                return unknown(node)
            members(x, name, "map_in")
            out = self._new(len(mod.channel_map))
            self._members[out].append(Member(name, "map_out"))
            return (((out, len(mod.channel_map)),), 1)
        if isinstance(mod, _BN) and x[1] == 1:
            members(x, name, "bn")
            return x
        if isinstance(mod, _PASS_MODULES):
            return x
        if isinstance(mod, nn.Flatten):
            return self._flatten(node, x, mod.start_dim, unknown)
        return unknown(node)

    def _add_layer(self, name, mod, node):
        out_shape = self._shape(node)
        macs = mod.weight[0].numel() * math.prod(out_shape[1:])
        conv = isinstance(mod, nn.Conv2d)
        out = mod.out_channels if conv else mod.out_features
        in_pg = (mod.in_channels // mod.groups) if conv else mod.in_features
        dw = conv and mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        self.layers[name] = Layer(name, macs / (out * in_pg), out, in_pg, dw)

    def _flatten(self, node, x, start_dim, unknown):
        shape = self._shape(node.args[0])
        if x is None or shape is None or start_dim != 1 or len(shape) < 2:
            return unknown(node)
        return (x[0], x[1] * math.prod(shape[2:]))

    def _function(self, node, view_of, unknown, all_nodes):
        fn, args = node.target, node.args
        x = view_of(args[0]) if args else None
        if node.op == "call_method" and fn in ("size", "dim"):
            return None
        if fn is getattr or (fn is operator.getitem and x is None):
            return None
        if self._is_tie(node):
            return self._tie(node, view_of, unknown)
        if (node.op == "call_function" and fn in _PASS_FUNCS) or (node.op == "call_method" and fn in _PASS_METHODS):
            return x if x is not None and x[1] == 1 else unknown(node)
        if fn in (torch.flatten,) or (node.op == "call_method" and fn == "flatten"):
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            return self._flatten(node, x, start, unknown)
        if fn in (torch.cat, torch.concat):
            tensors = args[0]
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            views = [view_of(t) for t in tensors]
            shape = self._shape(node)
            if shape is None or dim not in (1, 1 - len(shape)) or any(v is None or v[1] != 1 for v in views):
                return unknown(node)
            return (tuple(seg for v in views for seg in v[0]), 1)
        if node.op == "call_method" and fn in ("mean", "sum") or fn in (torch.mean, torch.sum):
            dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            shape = self._shape(args[0])
            if x is not None and x[1] == 1 and shape and dims and all(d % len(shape) >= 2 for d in dims):
                return x
            return unknown(node)
        if node.op == "call_method" and fn in ("view", "reshape") or fn is torch.reshape:
            shape_in, shape_out = self._shape(args[0]), self._shape(node)
            if x is not None and shape_in and shape_out and len(shape_out) == 2 and shape_out[0] == shape_in[0] \
                    and len(shape_in) >= 2:
                return (x[0], x[1] * math.prod(shape_in[2:]))
            return unknown(node)
        return unknown(node)

    @staticmethod
    def _is_tie(node, mul_only=False) -> bool:
        if node.op == "call_function":
            return node.target in (_MUL if mul_only else _TIE_OPS)
        return node.op == "call_method" and node.target in (_MUL if mul_only else _TIE_METHODS)

    def _tie(self, node, view_of, unknown):
        """a + b, a * b: channels at the same position are one channel."""
        tensors = [a for a in node.args if isinstance(a, fx.Node) and self._shape(a) is not None]
        gates = [a for a in tensors if a in self._nonzero]
        if gates:   # x * sigmoid(s): removing channel i removes it from both (x_i is 0, so x_i * s_i is 0)
            others = [a for a in tensors if a not in self._nonzero]
            if len(gates) == 1 and len(others) == 1 and view_of(others[0]) is not None:
                views = [view_of(others[0]), self._nonzero.pop(gates[0])]
                if views[0][1] == views[1][1] and [n for _, n in views[0][0]] == [n for _, n in views[1][0]]:
                    for (a, _), (b, _) in zip(views[0][0], views[1][0]):
                        self._union(a, b)
                    return views[0]
                self._freeze(views[1])
            for g in gates:
                self._freeze(self._nonzero.pop(g, None))
            return unknown(node)
        if len(tensors) == 1 and all(not isinstance(a, fx.Node) for a in node.args if a is not tensors[0]):
            x = view_of(tensors[0])
            return x   # a tensor and a Python scalar
        views = [view_of(t) for t in tensors]
        shapes = [self._shape(t) for t in tensors]
        if len(views) != 2 or any(v is None for v in views) or views[0][1] != views[1][1] \
                or [n for _, n in views[0][0]] != [n for _, n in views[1][0]] or len(set(map(len, shapes))) != 1:
            return unknown(node)
        for (a, _), (b, _) in zip(views[0][0], views[1][0]):
            self._union(a, b)
        return views[0]

    # ---- result -----------------------------------------------------------------------------
    def _collect(self) -> list[Group]:
        roots: dict[int, list[int]] = {}
        for o in range(len(self._sizes)):
            roots.setdefault(self._find(o), []).append(o)
        groups = []
        for origins in roots.values():
            if any(o in self._frozen for o in origins):
                continue
            members = [m for o in origins for m in self._members[o]]
            outs = [m for m in members if m.kind == "out"]
            if not outs:
                continue
            groups.append(Group(outs[0].module, self._sizes[origins[0]], members))
        order = {name: i for i, name in enumerate(self.layers)}
        groups.sort(key=lambda g: order.get(g.name, 0))
        return groups

    @property
    def macs(self) -> float:
        return sum(layer.unit * layer.out * layer.in_pg for layer in self.layers.values())

    def module(self, name: str) -> nn.Module:
        return self._modules[name]
