"""Learned channel gates: modules in the model, one per channel group of the channel graph.

    gates = gate_(model, example_input, "sign")     # PDD's masks, on every prunable group
    ...train: the gates are parameters of the model (optimiser, checkpoints, DDP, deepcopy)...
    small = remove_closed(model, example_input)     # the physically smaller model

A gate owns a (size,) vector of 0/1 values with a straight-through gradient. It multiplies its
group's channels wherever they are *read*: at the input of every conv / linear that consumes
them (after a flatten, each channel's features) and of every channel-map module (option-A
shortcut) that copies them elsewhere. A closed channel is then read by no layer, so in eval mode
the gated model computes what the model with those channels removed computes (surgery is exact
on the same groups). Gating at the readers puts the gate after the activation that precedes
them (PDD: "after the ReLU"; SBS: "at conv2's input"), which matters for learning: a gate in
front of a ReLU would get no gradient once closed (ReLU'(0) = 0), so a closed channel could
never reopen.

The gates live in ``model.channel_gates`` (a ChannelGates module): saved with the model's state
dict, loaded from stage checkpoints, wrapped by DDP, copied by ``copy.deepcopy`` (the forward
hooks are objects that point at the container, so a copy's hooks point at the copy's gates).
``gate_`` records itself in ``model.tandem_transforms``, so a model file written while gated
is rebuilt gated by ``load_model``.

Two kinds on one mechanism (GATES):
- ``sign`` (PDD, methods.md §3.2): g = 1[m > 0], m ~ N(0, init_std²), gradient of Bi-Real's
  ApproxSign: dg/dm = 1 - |m| on (-1, 1), 0 elsewhere. (The paper's g = 0.5 at m == 0 exactly
  is taken as closed, so a gated model is always exactly a pruned one.)
- ``threshold`` (SBS, §5.4): groups of ``group_size`` channels scored by
  mean|W_group| / max|W_layer| of the group's producing layer; g = 1[score > t], t learnable
  (initialised to 0: all open), gradient of sigmoid(score - t).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..engine.checkpoint import record_transform, register_transform
from ..errors import TandemError
from ..ste import approx_sign, threshold_ste  # noqa: F401  (threshold_ste: also tandem.prune.gates')
from .groups import ChannelGraph, Group
from .select import Removed
from .surgery import apply_removal

ATTR = "channel_gates"


class Gate(nn.Module):
    """0/1 per channel of one group. ``forward()`` -> (size,) with a straight-through gradient;
    ``strength()`` -> how open each channel is (a group never loses all its channels: when every
    gate is closed the strongest channel is kept)."""

    param_category = "gate"   # its parameters' optimiser group (engine/optim.py)

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def strength(self) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        """What rebuilds this gate (sizes and options; the parameters are in the state dict)."""
        return {"size": self.size}


class SignGate(Gate):
    """``init`` 'random': m ~ N(0, init_std²), the released code's start (about half the
    channels closed before the first step); 'open': m = |N(0, init_std²)|, every channel open."""

    def __init__(self, size: int, init_std: float = 1e-3, layer: nn.Module | None = None, init: str = "random"):
        super().__init__(size)
        if init not in ("random", "open"):
            raise TandemError(f"sign gate init {init!r} is not known; allowed: random, open")
        self.init_std, self.init = init_std, init
        m = torch.randn(size) * init_std
        self.m = nn.Parameter(m.abs() if init == "open" else m)

    def forward(self) -> torch.Tensor:
        return (approx_sign(self.m) + 1) / 2

    def strength(self) -> torch.Tensor:
        return self.m.detach()

    def config(self) -> dict:
        return {"size": self.size, "init_std": self.init_std, "init": self.init}


class ThresholdGate(Gate):
    def __init__(self, size: int, layer: nn.Module, group_size: int = 1, init: float = 0.0):
        super().__init__(size)
        if size % group_size:
            raise TandemError(f"group_size={group_size} does not divide the {size} channels of a gated group")
        self.group_size = group_size
        object.__setattr__(self, "layer", layer)   # read, not owned: its weights stay where they are
        self.threshold = nn.Parameter(torch.tensor(float(init)))

    def scores(self) -> torch.Tensor:
        """mean|W_group| / max|W_layer| per group of channels of the producing layer."""
        w = self.layer.weight.abs()
        per_group = w[: self.size].reshape(self.size // self.group_size, -1).mean(1)
        return per_group / w.max().clamp_min(1e-12)

    def forward(self) -> torch.Tensor:
        return threshold_ste(self.scores(), self.threshold).repeat_interleave(self.group_size)

    def strength(self) -> torch.Tensor:
        return (self.scores() - self.threshold).detach().repeat_interleave(self.group_size)

    def config(self) -> dict:
        return {"size": self.size, "group_size": self.group_size}


GATES: dict[str, type[Gate]] = {"sign": SignGate, "threshold": ThresholdGate}


class _GateHook:
    """A forward pre-hook multiplying a module's input features offset.. by a gate, each gate
    value repeated `repeat` times (a channel flattened into H*W features). An object (not a
    closure) so that deepcopy gives the copy's hooks the copy's gates."""

    def __init__(self, gates: "ChannelGates", key: str, offset: int, repeat: int = 1):
        self.gates, self.key, self.offset, self.repeat = gates, key, offset, repeat

    def __call__(self, module, args):
        x = args[0]
        g = self.gates.gates[self.key]().to(x.dtype)
        if self.repeat > 1:
            g = g.repeat_interleave(self.repeat)
        n = x.shape[1]
        if self.offset or g.numel() != n:
            ones = torch.ones(n, dtype=x.dtype, device=x.device)
            g = torch.cat([ones[:self.offset], g, ones[self.offset + g.numel():]])
        return (x * g.view((1, -1) + (1,) * (x.dim() - 2)), *args[1:])


def _key(group_name: str) -> str:
    return group_name.replace(".", "/")


class ChannelGates(nn.Module):
    """The model's gates (``gates``: group name with '/' for '.' -> Gate) and where each acts
    (``sites``: key -> [(reading module name, feature offset, repeat)]); ``macs_terms`` (from the traced graph)
    gives the MACs as a function of the gates."""

    transform = "gates"   # the kind of its record in the model's tandem_transforms

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.gates = nn.ModuleDict()
        self.sites: dict[str, list[tuple[str, int, int]]] = {}
        self.sources: dict[str, str] = {}
        self.macs_terms: list | None = None

    def group_names(self) -> list[str]:
        return [k.replace("/", ".") for k in self.gates]

    def closed(self) -> Removed:
        """{group name: indices of closed channels}; a group keeps at least its strongest channel."""
        out = {}
        with torch.no_grad():
            for k, gate in self.gates.items():
                shut = gate() <= 0.5
                if shut.all():
                    shut[gate.strength().argmax()] = False
                if shut.any():
                    out[k.replace("/", ".")] = shut.nonzero().flatten().cpu()
        return out

    def kept(self) -> dict[str, int]:
        """{group name: channels the gates keep}."""
        closed = self.closed()
        return {name: g.size - len(closed.get(name, ())) for name, g in zip(self.group_names(), self.gates.values())}

    def layer_macs(self) -> dict[str, torch.Tensor | float]:
        """{conv/linear layer: its MACs with each group at its gated width}, differentiable
        through the gates (a channel counts as its gate value)."""
        if self.macs_terms is None:
            raise TandemError("these gates were rebuilt from a file without the traced graph; "
                              "gate the model with gate_ to count MACs")
        kept = {k: g().sum() for k, g in self.gates.items()}
        out = {}
        for name, unit, o, i, outs, ins in self.macs_terms:
            o = o - sum(self.gates[k].size - kept[k] for k in outs)
            i = i - sum(r * (self.gates[k].size - kept[k]) for k, r in ins)
            out[name] = unit * o * i
        return out

    def macs(self) -> torch.Tensor:
        """The conv/linear MACs at the gated widths (see layer_macs)."""
        return sum(self.layer_macs().values())


def _sites(group: Group) -> list[tuple[str, int, int]]:
    """Where the group's channels are read by another group's computation."""
    return [(m.module, m.offset, m.repeat) for m in group.of_kind("in", "map_in")]


def _macs_terms(graph: ChannelGraph, keys: dict[str, Group]) -> list:
    terms = []
    for name, layer in graph.layers.items():
        outs = [k for k, g in keys.items() for m in g.members if m.module == name and m.kind in ("out", "dw")]
        ins = [(k, m.repeat) for k, g in keys.items() for m in g.members if m.module == name and m.kind == "in"]
        terms.append((name, layer.unit, layer.out, layer.in_pg, outs, ins))
    return terms


def _attach(model: nn.Module, container: ChannelGates) -> None:
    model.add_module(ATTR, container)
    for key, sites in container.sites.items():
        for module, offset, repeat in sites:
            model.get_submodule(module).register_forward_pre_hook(_GateHook(container, key, offset, repeat))


def gate_(model: nn.Module, example_input: torch.Tensor, kind: str = "sign", *, groups=None,
          **options) -> ChannelGates:
    """Attach one gate of ``kind`` ('sign' or 'threshold') to every prunable channel group of
    ``model`` (or to the groups named in ``groups``), in place; returns the gates.
    ``options`` go to the gate (``init_std``; ``group_size``, ``init``)."""
    if kind not in GATES:
        raise TandemError(f"gate kind {kind!r} is not known; allowed: {', '.join(GATES)}")
    if hasattr(model, ATTR):
        raise TandemError(f"{type(model).__name__} already has channel gates; remove them first (ungate_)")
    graph = ChannelGraph(model, example_input)
    chosen = [g for g in graph.groups if groups is None or g.name in groups]
    if groups is not None and len(chosen) != len(set(groups)):
        missing = sorted(set(groups) - {g.name for g in chosen})
        raise TandemError(f"no prunable channel group named {', '.join(missing)}; "
                          f"the groups are: {', '.join(g.name for g in graph.groups)}")
    if not chosen:
        raise TandemError(f"{type(model).__name__} has no prunable channel groups to gate")
    container = ChannelGates(kind)
    device = example_input.device
    for group in chosen:
        key = _key(group.name)
        layer = graph.module(group.name)
        container.gates[key] = GATES[kind](group.size, layer=layer, **options).to(device)
        container.sites[key] = _sites(group)
        container.sources[key] = group.name
    container.macs_terms = _macs_terms(graph, {_key(g.name): g for g in chosen})
    _attach(model, container)
    record_transform(model, {"kind": "gates", "gate": kind,
                             "groups": {k: {**g.config(), "sites": container.sites[k], "source": container.sources[k]}
                                        for k, g in container.gates.items()}})
    return container


@register_transform("gates")
def _rebuild(model: nn.Module, record: dict) -> nn.Module:
    """A gated model from its file: the same gates at the same sites (no tracing needed)."""
    container = ChannelGates(record["gate"])
    for key, g in record["groups"].items():
        options = {k: v for k, v in g.items() if k not in ("size", "sites", "source")}
        container.gates[key] = GATES[record["gate"]](g["size"], layer=model.get_submodule(g["source"]), **options)
        container.sites[key] = [tuple(s) for s in g["sites"]]
        container.sources[key] = g["source"]
    _attach(model, container)
    record_transform(model, record)
    return model


def gates_of(model: nn.Module) -> ChannelGates | None:
    return getattr(model, ATTR, None)


def ungate_(model: nn.Module) -> Removed:
    """Detach the gates (hooks, container and transform record); returns the closed channels."""
    container = gates_of(model)
    if container is None:
        raise TandemError(f"{type(model).__name__} has no channel gates")
    closed = container.closed()
    for sites in container.sites.values():
        for module, _, _ in sites:
            hooks = model.get_submodule(module)._forward_pre_hooks
            for hid in [h for h, fn in hooks.items() if isinstance(fn, _GateHook)]:
                del hooks[hid]
    delattr(model, ATTR)
    model.tandem_transforms = [t for t in getattr(model, "tandem_transforms", [])
                               if t.get("kind") != container.transform]
    return closed


def remove_closed(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """The physically smaller model: a copy with the gates gone and their closed channels
    removed (a built-in model comes back rebuilt from its config). Block gates (block_gates.py)
    are removed the paper's way instead (``remove_blocks``)."""
    if isinstance(gates_of(model), block_gates.BlockGates):
        return block_gates.remove_blocks(model, gates_of(model).keep())
    model = copy.deepcopy(model)
    closed = ungate_(model)
    return apply_removal(ChannelGraph(model, example_input), closed, inplace=True)


from . import block_gates  # noqa: E402  (PDD's per-block gates; registers their model-file transform)
