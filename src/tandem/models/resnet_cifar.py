"""CIFAR ResNet-20/32/56/110 (He et al. 2016, methods.md §0.1), plus the generic ResNet
body (stem, stages of BasicBlocks, pool, FC) that ResNet-18 reuses.

widths = [stem] + [conv1_out, conv2_out] per block. Any width list is valid: the shortcut
adapts when a pruned block's output width differs from its input width.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .registry import check_choice, conv_bn, init_weights, register_model


class ShortcutA(nn.Module):
    """Parameter-free option-A shortcut: subsample by the stride, then zero-pad the channels
    (half before, half after) or crop them the same way when the output is narrower."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride

    def forward(self, x):
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_ch - self.in_ch
        if extra > 0:
            return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        if extra < 0:
            start = -extra // 2
            return x[:, start : start + self.out_ch]
        return x

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}, stride={self.stride}"


def shortcut(in_ch: int, out_ch: int, stride: int, kind: str) -> nn.Module:
    """Identity when the shape is kept; otherwise option A (pad/crop) or B (1x1 conv + BN)."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    if kind == "A":
        return ShortcutA(in_ch, out_ch, stride)
    return conv_bn(in_ch, out_ch, kernel=1, stride=stride, act=None)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU (an Identity when ``post_add_relu``
    is False, PIC-PQ's variant). ReLUs are modules so activation quantizers can replace them."""

    def __init__(self, in_ch, mid_ch, out_ch, stride=1, shortcut_kind="A", post_add_relu=True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = shortcut(in_ch, out_ch, stride, shortcut_kind)
        self.relu2 = nn.ReLU() if post_add_relu else nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """``stem`` then stages of BasicBlocks (``layer1``...), global average pool, ``fc``."""

    def __init__(self, stem, widths, blocks, strides, num_classes, shortcut_kind="A", post_add_relu=True):
        super().__init__()
        self.stem = stem
        in_ch, i = widths[0], 1
        for s, (n, stride) in enumerate(zip(blocks, strides), start=1):
            stage = []
            for b in range(n):
                stage.append(BasicBlock(in_ch, widths[i], widths[i + 1], stride if b == 0 else 1,
                                        shortcut_kind, post_add_relu))
                in_ch, i = widths[i + 1], i + 2
            self.add_module(f"layer{s}", nn.Sequential(*stage))
        self.num_stages = len(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.stem(x)
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(self.pool(x).flatten(1))


def resnet_layout(stem: int, blocks: list[int], stage_widths: list[int]) -> list[tuple[str, int]]:
    """(label, width) per widths entry of a BasicBlock ResNet; labels are module names."""
    layout = [("stem", stem)]
    for s, (n, w) in enumerate(zip(blocks, stage_widths), start=1):
        for b in range(n):
            layout += [(f"layer{s}.{b}.conv1", w), (f"layer{s}.{b}.conv2", w)]
    return layout


def _cifar_layout(n: int):
    return lambda **_: resnet_layout(16, [n] * 3, [16, 32, 64])


def _resnet_cifar(n, num_classes, in_channels, widths, shortcut, post_add_relu):
    check_choice(f"resnet{6 * n + 2}", "shortcut", shortcut, ("A", "B"))
    stem = conv_bn(in_channels, widths[0])
    return ResNet(stem, widths, [n] * 3, [1, 2, 2], num_classes, shortcut, post_add_relu)


@register_model("resnet20", layout=_cifar_layout(3))
def resnet20(num_classes, in_channels, widths, *, shortcut="A", post_add_relu=True):
    return _resnet_cifar(3, num_classes, in_channels, widths, shortcut, post_add_relu)


@register_model("resnet32", layout=_cifar_layout(5))
def resnet32(num_classes, in_channels, widths, *, shortcut="A", post_add_relu=True):
    return _resnet_cifar(5, num_classes, in_channels, widths, shortcut, post_add_relu)


@register_model("resnet56", layout=_cifar_layout(9))
def resnet56(num_classes, in_channels, widths, *, shortcut="A", post_add_relu=True):
    return _resnet_cifar(9, num_classes, in_channels, widths, shortcut, post_add_relu)


@register_model("resnet110", layout=_cifar_layout(18))
def resnet110(num_classes, in_channels, widths, *, shortcut="A", post_add_relu=True):
    return _resnet_cifar(18, num_classes, in_channels, widths, shortcut, post_add_relu)
