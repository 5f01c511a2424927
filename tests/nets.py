"""Test networks shared by the pruning, gating and composition tests."""
import torch
import torch.nn as nn
import torch.nn.functional as F

# small inputs keep the suite fast; the channel structure does not depend on the resolution

INPUTS = {"small_cnn": (1, 12, 12), "vgg11": (3, 32, 32), "vgg13": (3, 32, 32), "vgg16": (3, 32, 32),
          "vgg19": (3, 32, 32)}


def builtin(name):
    """A built-in model with random BN statistics, and the input shape its tests use."""
    from tandem.models import create_model
    shape = INPUTS.get(name, (3, 16, 16))
    kw = {"stem": "cifar"} if name == "resnet18" else {}
    torch.manual_seed(0)
    return randomize_bn(create_model(name, in_channels=shape[0], **kw)), shape


def randomize_bn(model):
    """Non-trivial BN statistics so that a wrongly kept or dropped channel shows in the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


class UserNet(nn.Module):
    """Residual add, concatenation, depthwise conv, squeeze-excitation multiply, and a flatten of
    a 2x2 map into a linear layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.b1 = nn.Conv2d(16, 8, 1)
        self.b2 = nn.Conv2d(16, 12, 1)
        self.bn_cat = nn.BatchNorm2d(20)
        self.dw = nn.Sequential(nn.Conv2d(20, 20, 3, padding=1, groups=20, bias=False), nn.BatchNorm2d(20), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(20, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.se = nn.Conv2d(24, 24, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(24 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.a(x))                                   # residual: stem and a tied
        x = torch.cat([self.b1(x), self.b2(x)], dim=1)              # concat of two producers
        x = self.pw(self.dw(F.relu(self.bn_cat(x))))               # BN over the concat, depthwise
        x = x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))   # SE: the multiply ties se and pw
        x = torch.flatten(self.pool(x), 1)                          # 24 channels x 4 positions
        return self.fc2(F.relu(self.fc1(x)))
