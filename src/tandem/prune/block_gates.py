"""Block gates: PDD's ResNet masks (methods.md §3.2), one sign gate per residual block on its output.

    gates = block_gate_(model, example_input)      # a built-in ResNet: 9 gates on resnet20
    ...train: the same ChannelGates as gate_'s (model.channel_gates)...
    small = remove_blocks(model, gates.keep())     # the paper's removal (§3.4), a built-in model

The paper masks every BasicBlock's output (after the add and the ReLU), y_b = g_b * block_b(x),
and not the stem. Gate b multiplies block b's output where it is read, as every gate does
(gates.py): at the input of the next block's conv1 and shortcut, or of ``fc`` after the last
block. The gates are a ChannelGates keyed by block ('layer1/0'), so optimiser groups,
checkpoints, DDP, deepcopy, ``kept()`` / ``closed()`` / ``macs()`` and PDD's GateLog work
as with group gates; their transform record carries the MACs terms, so a model file rebuilds
them countable.

Removal, as the paper's code: block b keeps the indices K_b its gate keeps in *both* convs (one
mask drives both), conv1 reads K_{b-1} (the stem's output: all of it), FC reads the last K; the
model is rebuilt from its config with these widths, so each shortcut is the builder's: identity
when a block's widths are equal, else option A's default pad / crop (or a projection). The
skipped channels are then not index-aligned, so unlike group gates a block-gated model is *not*
exactly its pruned model; fine-tuning absorbs the difference (§3.4).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..engine.checkpoint import record_transform, register_transform
from ..errors import TandemError
from ..models.registry import is_factory, model_config
from ..models.resnet_cifar import PreActBlock, ResNet
from .gates import ATTR, ChannelGates, SignGate, _attach
from .groups import ChannelGraph


def residual_blocks(model: nn.Module) -> list[str] | None:
    """The blocks ('layer1.0', ...) of a built-in tandem ResNet, in order; None for any other model."""
    config = getattr(model, "config", None)
    if not isinstance(model, ResNet) or not config or is_factory(config["name"]):
        return None
    return [f"layer{s}.{b}" for s in range(1, model.num_stages + 1) for b in range(len(getattr(model, f"layer{s}")))]


class BlockGates(ChannelGates):
    """ChannelGates with one gate per residual block (group names are block names).
    ``projections``: blocks whose identity shortcut the rebuilt model turns into a 1x1
    projection when their kept widths differ (shortcut kind B); ``layer_macs`` counts it then."""

    transform = "block_gates"

    def __init__(self):
        super().__init__("sign")
        self.projections: list = []   # (layer name in the pruned model, unit, input key or None, input width, key)

    def keep(self) -> dict[str, torch.Tensor]:
        """{block: indices of the output channels its gate keeps} (at least one each)."""
        closed = self.closed()
        out = {}
        for name, gate in zip(self.group_names(), self.gates.values()):
            shut = set(closed.get(name, torch.zeros(0)).tolist())
            out[name] = torch.tensor([i for i in range(gate.size) if i not in shut], dtype=torch.long)
        return out

    def layer_macs(self) -> dict[str, torch.Tensor | float]:
        out = super().layer_macs()
        kept = self.kept()
        for name, unit, key_in, width_in, key in self.projections:
            n_in = kept[key_in.replace("/", ".")] if key_in else width_in
            if n_in != kept[key.replace("/", ".")]:   # the pruned model gets a projection here
                c_in = self.gates[key_in]().sum() if key_in else width_in
                out[name] = unit * c_in * self.gates[key]().sum()
        return out


def _terms(model: nn.Module, graph: ChannelGraph, blocks: list[str], keys: list[str]):
    """MACs terms (see ChannelGates.layer_macs): block b's convs and projection lose the
    channels its gate closes on their output; conv2 reads block b's kept channels, conv1 and
    the projection block b-1's; fc reads the last block's."""
    owner = {name: i for name in graph.layers for i, b in enumerate(blocks) if name.startswith(b + ".")}
    terms = []
    for name, layer in graph.layers.items():
        outs, ins = [], []
        if name in owner:
            i = owner[name]
            outs = [keys[i]]
            reads = keys[i] if name == f"{blocks[i]}.conv2" else keys[i - 1] if i else None
            ins = [(reads, 1)] if reads else []
        elif name == "fc":
            ins = [(keys[-1], 1)]
        terms.append((name, layer.unit, layer.out, layer.in_pg, outs, ins))
    projections = []
    if model_config(model)["kwargs"].get("shortcut", "B") == "B":   # resnet18 has no option: projections
        for i, b in enumerate(blocks):
            block = model.get_submodule(b)
            if isinstance(block.shortcut, nn.Identity):
                conv2 = graph.layers[f"{b}.conv2"]
                unit = conv2.unit / (block.conv2.kernel_size[0] * block.conv2.kernel_size[1])
                name = f"{b}.shortcut" if isinstance(block, PreActBlock) else f"{b}.shortcut.0"
                width_in = block.conv1.in_channels
                projections.append((name, unit, keys[i - 1] if i else None, width_in, keys[i]))
    return terms, projections


def block_gate_(model: nn.Module, example_input: torch.Tensor, **options) -> BlockGates:
    """One SignGate per residual block of a built-in ResNet, on the block's output, in place;
    returns the gates. ``options`` go to SignGate (``init_std``, ``init``)."""
    blocks = residual_blocks(model)
    if blocks is None:
        raise TandemError(f"{type(model).__name__} is not a ResNet built by tandem.models (blocks layer1.0, ...): "
                          f"block gates need its blocks; gate its channel groups instead (gate_)")
    if hasattr(model, ATTR):
        raise TandemError(f"{type(model).__name__} already has channel gates; remove them first (ungate_)")
    for b in blocks:
        block = model.get_submodule(b)
        if block.conv1.out_channels != block.conv2.out_channels:
            raise TandemError(f"one gate per block drives both of its convs (the paper's code), so conv1 and conv2 "
                              f"of every block must be equally wide; {b} has {block.conv1.out_channels} and "
                              f"{block.conv2.out_channels}")
    graph = ChannelGraph(model, example_input)
    keys = [b.replace(".", "/") for b in blocks]
    container = BlockGates()
    for i, (b, key) in enumerate(zip(blocks, keys)):
        container.gates[key] = SignGate(model.get_submodule(b).conv2.out_channels, **options).to(example_input.device)
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        container.sites[key] = [(f"{nxt}.conv1", 0, 1), (f"{nxt}.shortcut", 0, 1)] if nxt else [("fc", 0, 1)]
        container.sources[key] = b
    container.macs_terms, container.projections = _terms(model, graph, blocks, keys)
    _attach(model, container)
    record_transform(model, {"kind": "block_gates",
                             "gates": {k: {**g.config(), "sites": container.sites[k], "source": container.sources[k]}
                                       for k, g in container.gates.items()},
                             "macs_terms": container.macs_terms, "projections": container.projections})
    return container


@register_transform("block_gates")
def _rebuild(model: nn.Module, record: dict) -> nn.Module:
    """A block-gated model from its file: the same gates at the same sites, countable."""
    container = BlockGates()
    for key, g in record["gates"].items():
        options = {k: v for k, v in g.items() if k not in ("size", "sites", "source")}
        container.gates[key] = SignGate(g["size"], **options)
        container.sites[key] = [tuple(s) for s in g["sites"]]
        container.sources[key] = g["source"]
    container.macs_terms = [tuple(t) for t in record["macs_terms"]]
    container.projections = [tuple(p) for p in record["projections"]]
    _attach(model, container)
    record_transform(model, record)
    return model


@torch.no_grad()
def remove_blocks(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    """The paper's pruned ResNet (§3.4): block b keeps output channels ``keep[b]`` in conv1,
    conv2 and their BNs, conv1 (and a projection) reads block b-1's kept channels, fc the last
    block's; rebuilt from the model's config with these widths (shortcuts: the builder's, see
    the module docstring) and the kept weights. A projection the new widths need and the model
    did not have starts freshly initialised. ``model`` may be gated or not; it is not changed."""
    blocks = residual_blocks(model)
    if blocks is None:
        raise TandemError(f"{type(model).__name__} is not a ResNet built by tandem.models: remove_blocks needs its blocks")
    other = [t["kind"] for t in getattr(model, "tandem_transforms", []) if t.get("kind") != BlockGates.transform]
    if other:
        raise TandemError(f"remove_blocks rebuilds a plain ResNet; this one was also changed by {other[0]!r}")
    missing = [b for b in blocks if b not in keep or len(keep[b]) == 0]
    if missing:
        raise TandemError(f"remove_blocks: block {missing[0]} keeps no channel; every block keeps at least one")
    from ..models import create_model
    idx = [torch.as_tensor(keep[b], dtype=torch.long).sort().values.cpu() for b in blocks]
    config = model_config(model)
    kwargs = dict(config["kwargs"])
    if "channel_maps" in kwargs:
        kwargs["channel_maps"] = None   # the default pad / crop where widths differ (the paper's code)
    widths = [config["widths"][0]] + [len(k) for k in idx for _ in range(2)]
    small = create_model(**{**config, "widths": widths, "kwargs": kwargs})
    axes = {"fc": (None, idx[-1]), "final.0": (idx[-1], None)}   # module -> (kept outputs, kept inputs)
    prev = None                                                  # the stem's output: all kept
    for b, k in zip(blocks, idx):
        pre_act = isinstance(model.get_submodule(b), PreActBlock)
        axes.update({f"{b}.conv1": (k, prev), f"{b}.conv2": (k, k), f"{b}.bn1": (prev, None) if pre_act else (k, None),
                     f"{b}.bn2": (k, None), f"{b}.shortcut": (k, prev), f"{b}.shortcut.0": (k, prev),
                     f"{b}.shortcut.1": (k, None)})
        prev = k
    state, fresh = model.state_dict(), small.state_dict()
    for key, want in fresh.items():
        if key not in state:
            continue
        out_idx, in_idx = axes.get(key.rpartition(".")[0], (None, None))
        t = state[key]
        if out_idx is not None and t.dim() >= 1:
            t = t.index_select(0, out_idx.to(t.device))
        if in_idx is not None and t.dim() >= 2:
            t = t.index_select(1, in_idx.to(t.device))
        if t.shape != want.shape:
            raise TandemError(f"remove_blocks: {key} is {tuple(t.shape)}, the rebuilt model wants "
                              f"{tuple(want.shape)}; this is a bug, please report it")
        fresh[key] = t
    small.load_state_dict(fresh)
    small.to(next(model.parameters()).device)
    small.train(model.training)
    return small
