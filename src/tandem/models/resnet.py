"""ResNet-18 (He et al. 2016) with projection shortcuts; ImageNet stem or the CIFAR stem.

widths = [stem] + [conv1_out, conv2_out] per block (17 entries). A block whose output width
differs from its input gets a projection shortcut, also at stride 1 after pruning.
"""

from __future__ import annotations

import torch.nn as nn

from .registry import check_choice, conv_bn, register_model
from .resnet_cifar import ResNet, resnet_layout

_BLOCKS, _WIDTHS = [2, 2, 2, 2], [64, 128, 256, 512]


@register_model("resnet18", layout=lambda **_: resnet_layout(64, _BLOCKS, _WIDTHS))
def resnet18(num_classes, in_channels, widths, *, stem="imagenet"):
    """``stem="imagenet"``: 7x7 stride-2 conv + 3x3 stride-2 max-pool; ``"cifar"``: 3x3 stride-1 conv."""
    check_choice("resnet18", "stem", stem, ("imagenet", "cifar"))
    if stem == "imagenet":
        stem_module = nn.Sequential(*conv_bn(in_channels, widths[0], kernel=7, stride=2), nn.MaxPool2d(3, 2, 1))
    else:
        stem_module = conv_bn(in_channels, widths[0])
    return ResNet(stem_module, widths, _BLOCKS, [1, 2, 2, 2], num_classes, shortcut_kind="B")
