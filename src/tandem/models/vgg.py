"""VGG-11/13/16/19 with BN, CIFAR style (conv3x3-BN-ReLU stages, 2x2 max-pool after each).

widths = conv output widths, then the hidden FC widths (n_conv + head_layers entries).
``head_layers``: 2 = Linear-ReLU-Linear-ReLU-Linear (PDD), 1 = one hidden FC (HRank), 0 = one Linear.
"""

from __future__ import annotations

import torch.nn as nn

from .registry import check_choice, conv_bn, init_weights, register_model

# Convs per stage; every stage ends in a 2x2 max-pool.
_STAGES = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class VGG(nn.Module):
    """Adaptive average pool to 1x1 before the classifier, so inputs other than 32x32 work."""

    def __init__(self, stages, widths, num_classes, in_channels, head_layers):
        super().__init__()
        features, it = [], iter(widths)
        for stage in stages:
            for _ in stage:
                out_ch = next(it)
                features.append(conv_bn(in_channels, out_ch))
                in_channels = out_ch
            features.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head = []
        for _ in range(head_layers):
            hidden = next(it)
            head += [nn.Linear(in_channels, hidden), nn.ReLU()]
            in_channels = hidden
        self.classifier = nn.Sequential(*head, nn.Linear(in_channels, num_classes))
        init_weights(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _layout(name: str):
    def layout(head_layers=2, **_):
        check_choice(name, "head_layers", head_layers, (0, 1, 2))
        labels, i = [], 0
        for stage in _STAGES[name]:
            for w in stage:
                labels.append((f"features.{i}", w))
                i += 1
            i += 1  # the max-pool
        return labels + [(f"classifier.{2 * j}", 512) for j in range(head_layers)]

    return layout


def _register(name: str):
    @register_model(name, layout=_layout(name))
    def build(num_classes, in_channels, widths, *, head_layers=2):
        check_choice(name, "head_layers", head_layers, (0, 1, 2))
        return VGG(_STAGES[name], widths, num_classes, in_channels, head_layers)

    build.__name__ = build.__qualname__ = name
    return build


vgg11, vgg13, vgg16, vgg19 = (_register(n) for n in _STAGES)
