"""CIFAR ResNet-20/32/56/110 (He et al. 2016, methods.md §0.1) and their pre-activation
versions (He et al. 2016b; SBS's models, methods.md §5.4), plus the generic ResNet body (stem,
stages of BasicBlocks, pool, FC) that ResNet-18 reuses.

widths = [stem] + [conv1_out, conv2_out] per block. Any width list is valid: the shortcut
adapts when a pruned block's output width differs from its input width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import TandemError
from .registry import check_choice, conv_bn, init_weights, register_model


def default_channel_map(in_ch: int, out_ch: int) -> list[int]:
    """Option A's placement: zero-pad half before and half after, or crop the same way."""
    if out_ch >= in_ch:
        before = (out_ch - in_ch) // 2
        return [-1] * before + list(range(in_ch)) + [-1] * (out_ch - in_ch - before)
    start = (in_ch - out_ch) // 2
    return list(range(start, start + out_ch))


class ShortcutA(nn.Module):
    """Parameter-free option-A shortcut: subsample by the stride, then output channel j is input
    channel ``channel_map[j]``, or zero where it is -1. The default map zero-pads (half before,
    half after) or crops. Pruning the residual streams on either side rewrites the map
    (``set_channel_map``); the model's config records it, so a pruned model rebuilds exactly."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, channel_map: list[int] | None = None):
        super().__init__()
        self.stride = stride
        self.register_buffer("_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.set_channel_map(in_ch, default_channel_map(in_ch, out_ch) if channel_map is None else channel_map)

    def set_channel_map(self, in_ch: int, channel_map: list[int]) -> None:
        channel_map = [int(i) for i in channel_map]
        if any(not -1 <= i < in_ch for i in channel_map):
            raise TandemError(f"ShortcutA channel_map entries must be -1 (zero) or an input channel in "
                              f"0..{in_ch - 1}; got {channel_map}")
        self.in_ch, self.out_ch, self.channel_map = in_ch, len(channel_map), channel_map
        self._run = self._contiguous_run(channel_map)
        index = [in_ch if i < 0 else i for i in channel_map]    # in_ch: the appended zero channel
        self._index = torch.tensor(index, dtype=torch.long, device=self._index.device)

    @staticmethod
    def _contiguous_run(channel_map):
        """(first source, count, zeros before, zeros after) when the map is zeros, a run of
        consecutive input channels, zeros (pad, crop, identity): a slice and a pad, no gather."""
        kept = [(j, i) for j, i in enumerate(channel_map) if i >= 0]
        if not kept:
            return 0, 0, len(channel_map), 0
        (j0, i0), (j1, _) = kept[0], kept[-1]
        if len(kept) != j1 - j0 + 1 or any(i != i0 + k for k, (_, i) in enumerate(kept)):
            return None
        return i0, len(kept), j0, len(channel_map) - j1 - 1

    def forward(self, x):
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self._run is None:
            return F.pad(x, (0, 0, 0, 0, 0, 1)).index_select(1, self._index)
        first, count, before, after = self._run
        if count < self.in_ch:
            x = x[:, first : first + count]
        return F.pad(x, (0, 0, 0, 0, before, after)) if before or after else x

    def extra_repr(self) -> str:
        custom = "" if self.channel_map == default_channel_map(self.in_ch, self.out_ch) else ", channel_map=custom"
        return f"{self.in_ch}, {self.out_ch}, stride={self.stride}{custom}"


def shortcut(in_ch: int, out_ch: int, stride: int, kind: str, channel_map: list[int] | None = None) -> nn.Module:
    """Identity when the shape is kept; otherwise option A (pad/crop, or an explicit channel
    map) or B (1x1 conv + BN)."""
    if stride == 1 and in_ch == out_ch and channel_map is None:
        return nn.Identity()
    if kind == "A":
        return ShortcutA(in_ch, out_ch, stride, channel_map)
    return conv_bn(in_ch, out_ch, kernel=1, stride=stride, act=None)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU (an Identity when ``post_add_relu``
    is False, PIC-PQ's variant). ReLUs are modules so activation quantizers can replace them."""

    def __init__(self, in_ch, mid_ch, out_ch, stride=1, shortcut_kind="A", post_add_relu=True, channel_map=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = shortcut(in_ch, out_ch, stride, shortcut_kind, channel_map)
        self.relu2 = nn.ReLU() if post_add_relu else nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut, no ReLU after the add (He et al. 2016b). A
    projection shortcut (kind B: a 1x1 conv) reads the pre-activated input, as the reference
    code does; option A and the identity read the block input."""

    def __init__(self, in_ch, mid_ch, out_ch, stride=1, shortcut_kind="B", post_add_relu=True, channel_map=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_ch)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1, bias=False)
        if stride == 1 and in_ch == out_ch and channel_map is None:
            self.shortcut = nn.Identity()
        elif shortcut_kind == "A":
            self.shortcut = ShortcutA(in_ch, out_ch, stride, channel_map)
        else:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)
        self.projection = isinstance(self.shortcut, nn.Conv2d)

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        skip = self.shortcut(out if self.projection else x)
        return self.conv2(self.relu2(self.bn2(self.conv1(out)))) + skip


class ResNet(nn.Module):
    """``stem`` then stages of BasicBlocks (``layer1``...), global average pool, ``fc``.
    ``channel_maps``: {"layer2.0.shortcut": [...]} for option-A shortcuts whose residual streams
    were pruned (see ShortcutA); a pruned model's config carries them."""

    def __init__(self, stem, widths, blocks, strides, num_classes, shortcut_kind="A", post_add_relu=True,
                 channel_maps=None, block=BasicBlock):
        super().__init__()
        self.stem = stem
        maps = dict(channel_maps or {})
        in_ch, i = widths[0], 1
        for s, (n, stride) in enumerate(zip(blocks, strides), start=1):
            stage = []
            for b in range(n):
                stage.append(block(in_ch, widths[i], widths[i + 1], stride if b == 0 else 1,
                                   shortcut_kind, post_add_relu, maps.pop(f"layer{s}.{b}.shortcut", None)))
                in_ch, i = widths[i + 1], i + 2
            self.add_module(f"layer{s}", nn.Sequential(*stage))
        if maps:
            raise TandemError(f"channel_maps names {sorted(maps)[0]!r}, which is not a shortcut of this model")
        self.num_stages = len(blocks)
        # pre-activation blocks end without BN and ReLU: they come once, before the pool
        self.final = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU()) if block is PreActBlock else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.stem(x)
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(self.pool(self.final(x)).flatten(1))


def resnet_layout(stem: int, blocks: list[int], stage_widths: list[int]) -> list[tuple[str, int]]:
    """(label, width) per widths entry of a BasicBlock ResNet; labels are module names."""
    layout = [("stem", stem)]
    for s, (n, w) in enumerate(zip(blocks, stage_widths), start=1):
        for b in range(n):
            layout += [(f"layer{s}.{b}.conv1", w), (f"layer{s}.{b}.conv2", w)]
    return layout


def _cifar_layout(n: int):
    return lambda **_: resnet_layout(16, [n] * 3, [16, 32, 64])


def _resnet_cifar(n, num_classes, in_channels, widths, shortcut, post_add_relu, channel_maps):
    check_choice(f"resnet{6 * n + 2}", "shortcut", shortcut, ("A", "B"))
    stem = conv_bn(in_channels, widths[0])
    return ResNet(stem, widths, [n] * 3, [1, 2, 2], num_classes, shortcut, post_add_relu, channel_maps)


@register_model("resnet20", layout=_cifar_layout(3))
def resnet20(num_classes, in_channels, widths, *, shortcut="A", post_add_relu=True, channel_maps=None):
    return _resnet_cifar(3, num_classes, in_channels, widths, shortcut, post_add_relu, channel_maps)


@register_model("resnet32", layout=_cifar_layout(5))
def resnet32(num_classes, in_channels, widths, *, shortcut="A", post_add_relu=True, channel_maps=None):
    return _resnet_cifar(5, num_classes, in_channels, widths, shortcut, post_add_relu, channel_maps)


@register_model("resnet56", layout=_cifar_layout(9))
def resnet56(num_classes, in_channels, widths, *, shortcut="A", post_add_relu=True, channel_maps=None):
    return _resnet_cifar(9, num_classes, in_channels, widths, shortcut, post_add_relu, channel_maps)


@register_model("resnet110", layout=_cifar_layout(18))
def resnet110(num_classes, in_channels, widths, *, shortcut="A", post_add_relu=True, channel_maps=None):
    return _resnet_cifar(18, num_classes, in_channels, widths, shortcut, post_add_relu, channel_maps)


def _preact_cifar(n, num_classes, in_channels, widths, shortcut, channel_maps):
    check_choice(f"preact_resnet{6 * n + 2}", "shortcut", shortcut, ("A", "B"))
    stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
    return ResNet(stem, widths, [n] * 3, [1, 2, 2], num_classes, shortcut, True, channel_maps, block=PreActBlock)


@register_model("preact_resnet20", layout=_cifar_layout(3))
def preact_resnet20(num_classes, in_channels, widths, *, shortcut="B", channel_maps=None):
    """Pre-activation ResNet-20 (the architecture of SBS's CIFAR code); projection shortcuts."""
    return _preact_cifar(3, num_classes, in_channels, widths, shortcut, channel_maps)


@register_model("preact_resnet56", layout=_cifar_layout(9))
def preact_resnet56(num_classes, in_channels, widths, *, shortcut="B", channel_maps=None):
    """Pre-activation ResNet-56; projection shortcuts."""
    return _preact_cifar(9, num_classes, in_channels, widths, shortcut, channel_maps)
