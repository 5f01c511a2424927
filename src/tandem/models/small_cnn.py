"""A small CNN for 8x8 (digits) and 28x28 (MNIST) inputs alike: the default recipe's model.

widths = [conv1, conv2, conv3] output channels (default [16, 32, 64]).
"""

from __future__ import annotations

import torch.nn as nn

from .registry import conv_bn, init_weights, register_model


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, max-pool 2, conv-BN-ReLU, global average pool (any input size), FC."""

    def __init__(self, widths, num_classes, in_channels):
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(conv_bn(in_channels, w1), conv_bn(w1, w2), nn.MaxPool2d(2), conv_bn(w2, w3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        init_weights(self)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


@register_model("small_cnn", layout=lambda **_: [("features.0", 16), ("features.1", 32), ("features.3", 64)])
def small_cnn(num_classes, in_channels, widths):
    return SmallCNN(widths, num_classes, in_channels)
