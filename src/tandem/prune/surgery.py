"""Surgery: turn "remove these channels" into a physically smaller model with the kept weights.

Each module collects the indices it loses along each axis (filters, input channels, BN
entries, depthwise channels) from every group it belongs to, then its tensors are sliced once.
A model built by ``create_model`` is then rebuilt from its config with the new widths and the
sliced weights loaded into it, so the result carries a ``config`` that ``load_model`` (and
``tandem eval``) can rebuild without the original definition.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..engine.checkpoint import record_transform, register_transform, replay_transforms
from ..errors import TandemError
from ..models.registry import is_factory
from .groups import ChannelGraph
from .select import Removed


def _keep(n: int, drop: set[int], device) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long, device=device)


def _param(p: nn.Parameter, idx: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(p.index_select(dim, idx).clone(), requires_grad=p.requires_grad)


@torch.no_grad()
def remove_channels(graph: ChannelGraph, removed: Removed) -> None:
    """Slice the traced model in place (its modules change size)."""
    out_drop: dict[str, set[int]] = {}
    in_drop: dict[str, set[int]] = {}
    for group in graph.groups:
        idx = removed.get(group.name)
        if idx is None or len(idx) == 0:
            continue
        if len(idx) >= group.size:
            raise TandemError(f"cannot remove all {group.size} channels of {group.name}")
        for m in group.members:
            if m.kind in ("in", "map_in"):
                in_drop.setdefault(m.module, set()).update(
                    (m.offset + int(i) * m.repeat) + r for i in idx for r in range(m.repeat))
            else:
                out_drop.setdefault(m.module, set()).update(m.offset + int(i) for i in idx)
    for name in set(out_drop) | set(in_drop):
        mod = graph.module(name)
        dev = mod.weight.device if getattr(mod, "weight", None) is not None else None
        if hasattr(mod, "channel_map"):
            _remap(mod, in_drop.get(name, set()), out_drop.get(name, set()))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            keep = _keep(mod.num_features, out_drop[name], mod.running_mean.device)
            if mod.affine:
                mod.weight = _param(mod.weight, keep, 0)
                mod.bias = _param(mod.bias, keep, 0)
            mod.running_mean = mod.running_mean.index_select(0, keep).clone()
            mod.running_var = mod.running_var.index_select(0, keep).clone()
            mod.num_features = len(keep)
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            conv = isinstance(mod, nn.Conv2d)
            out_attr, in_attr = ("out_channels", "in_channels") if conv else ("out_features", "in_features")
            out_keep = in_keep = None
            if name in out_drop:
                out_keep = _keep(getattr(mod, out_attr), out_drop[name], dev)
                mod.weight = _param(mod.weight, out_keep, 0)
                if mod.bias is not None:
                    mod.bias = _param(mod.bias, out_keep, 0)
                setattr(mod, out_attr, len(out_keep))
                if conv and mod.groups > 1:      # depthwise: its inputs are its outputs
                    mod.in_channels = mod.groups = len(out_keep)
            if name in in_drop:
                in_keep = _keep(getattr(mod, in_attr), in_drop[name], dev)
                mod.weight = _param(mod.weight, in_keep, 1)
                setattr(mod, in_attr, len(in_keep))
            if getattr(mod, "weight_quantizer", None) is not None:   # a quantized layer's per-channel state
                mod.weight_quantizer.keep_channels(out_keep, in_keep)


def _remap(mod: nn.Module, in_drop: set[int], out_drop: set[int]) -> None:
    """A channel-map module loses input channels (their positions become zeros, the rest are
    renumbered) and output positions (dropped from the map)."""
    renumber, k = {}, 0
    for i in range(mod.in_ch):
        if i not in in_drop:
            renumber[i], k = k, k + 1
    mapping = [renumber.get(i, -1) for j, i in enumerate(mod.channel_map) if j not in out_drop]
    mod.set_channel_map(mod.in_ch - len(in_drop), mapping)


def _first_layer(mod: nn.Module) -> nn.Module:
    """The conv/linear a layout label names: the module itself or the first one inside it."""
    for m in mod.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return m
    raise TandemError(f"layout label names {type(mod).__name__}, which holds no conv or linear layer")


def rebuild(model: nn.Module) -> nn.Module:
    """A model built by ``create_model`` and sliced in place -> a fresh ``create_model`` with the
    new widths and the sliced weights, so its ``config`` describes it."""
    from ..models import create_model
    from ..models import registry

    config = model.config
    builder, layout = registry._lookup(config["name"])
    if layout is None:
        return model
    labels = [label for label, _ in layout(**registry._options(config["name"], builder, config["kwargs"]))]
    modules = dict(model.named_modules())
    widths = []
    for label in labels:
        layer = _first_layer(modules[label])
        widths.append(layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features)
    maps = {n: m.channel_map for n, m in modules.items() if hasattr(m, "channel_map")}
    kwargs = dict(config.get("kwargs", {}))
    if "channel_maps" in kwargs:     # builders that take explicit shortcut maps (option-A ResNets)
        kwargs["channel_maps"] = maps or None
    fresh = create_model(**{**config, "widths": widths, "kwargs": kwargs})
    fresh = replay_transforms(fresh, getattr(model, "tandem_transforms", []))   # e.g. quantize_ before pruning
    state = model.state_dict()
    own = fresh.state_dict()
    bad = [k for k in own if k not in state or own[k].shape != state[k].shape]
    if bad or set(state) != set(own):
        raise TandemError(f"pruned {config['name']} does not match its rebuilt config (first mismatch: "
                          f"{(bad or sorted(set(state) ^ set(own)))[0]}); this is a bug, please report it")
    fresh.load_state_dict(state)
    ref = next(model.parameters())
    fresh.to(ref.device)
    fresh.train(model.training)
    return fresh


def apply_removal(graph: ChannelGraph, removed: Removed, inplace: bool = False) -> nn.Module:
    """The physically smaller model (a copy unless ``inplace``); rebuilt from its config when
    the model came from ``create_model``."""
    if not inplace:
        memo: dict = {}
        model = copy.deepcopy(graph.model, memo)
        graph = _retarget(graph, model)
    remove_channels(graph, removed)
    model = graph.model
    config = getattr(model, "config", None)
    if config is not None and not is_factory(config["name"]):
        return rebuild(model)
    # a user's model has no widths to rebuild from: the file records the removal, replayed on load
    record_transform(model, {"kind": "prune", "input_shape": list(graph.input_shape),
                             "removed": {g: [int(i) for i in idx] for g, idx in removed.items() if len(idx)}})
    return model


@register_transform("prune")
def _replay_removal(model: nn.Module, record: dict) -> nn.Module:
    """The recorded channels removed again from a freshly built user model."""
    graph = ChannelGraph(model, torch.zeros(1, *record["input_shape"]))
    unknown = sorted(set(record["removed"]) - {g.name for g in graph.groups})
    if unknown:
        raise TandemError(f"the pruning record names channel groups the model does not have ({', '.join(unknown[:3])}); "
                          f"the model's definition changed since the file was written")
    remove_channels(graph, {g: torch.tensor(idx) for g, idx in record["removed"].items()})
    record_transform(model, record)
    return model


def _retarget(graph: ChannelGraph, model: nn.Module) -> ChannelGraph:
    """The same graph, pointing at a copy of its model."""
    clone = copy.copy(graph)
    clone.model = model
    clone._modules = dict(model.named_modules())
    return clone
