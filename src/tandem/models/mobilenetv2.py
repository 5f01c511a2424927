"""MobileNetV2, CIFAR variant (stem stride 1, second stage stride 1; Sandler et al. 2018).

widths = [stem] + [hidden, out] for each of the 17 inverted-residual blocks + [last 1x1 conv].
For the t=1 block there is no expansion conv, so its hidden width is its input width.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import TandemError
from .registry import conv_bn, init_weights, register_model

# (expansion t, output channels c, repeats n, first stride s)
_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _blocks():
    """(t, stride, has_residual) per block. The residual is fixed by the architecture (the
    repeats of a stage), not inferred from widths, so pruning can never add or drop one."""
    return [(t, s if i == 0 else 1, i > 0) for t, _, n, s in _CFG for i in range(n)]


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6] - 3x3 depthwise-BN-ReLU6 - 1x1 project-BN, + input when residual."""

    def __init__(self, in_ch, hidden, out_ch, stride, expand, residual):
        super().__init__()
        self.expand = conv_bn(in_ch, hidden, 1, act=nn.ReLU6) if expand else nn.Identity()
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)
        self.project = conv_bn(hidden, out_ch, 1, act=None)
        self.residual = residual

    def forward(self, x):
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    def __init__(self, widths, num_classes, in_channels):
        super().__init__()
        self.stem = conv_bn(in_channels, widths[0], act=nn.ReLU6)
        blocks, in_ch = [], widths[0]
        for i, (t, stride, residual) in enumerate(_blocks()):
            hidden, out_ch = widths[1 + 2 * i], widths[2 + 2 * i]
            if t == 1 and hidden != in_ch:
                raise TandemError(f"mobilenetv2: block {i} has no expansion, so its hidden width "
                                  f"(widths[{1 + 2 * i}]={hidden}) must equal its input width {in_ch}")
            if residual and out_ch != in_ch:
                raise TandemError(f"mobilenetv2: block {i} has a residual connection, so its output width "
                                  f"(widths[{2 + 2 * i}]={out_ch}) must equal its input width {in_ch}")
            blocks.append(InvertedResidual(in_ch, hidden, out_ch, stride, t != 1, residual))
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.last = conv_bn(in_ch, widths[-1], 1, act=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.last(self.blocks(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


def _layout(**_):
    layout, in_ch, i = [("stem", 32)], 32, 0
    for t, c, n, _s in _CFG:
        for _ in range(n):
            hidden = f"blocks.{i}.{'depthwise' if t == 1 else 'expand'}"
            layout += [(hidden, in_ch * t), (f"blocks.{i}.project", c)]
            in_ch, i = c, i + 1
    return layout + [("last", 1280)]


@register_model("mobilenetv2", layout=_layout)
def mobilenetv2(num_classes, in_channels, widths):
    return MobileNetV2(widths, num_classes, in_channels)
