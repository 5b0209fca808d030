"""torchvision's MobileNetV2 in PyTorch (the same module tree, so ``load_state_dict``
checks the checkpoint's layout): the reference forward pass for ``int8_testbed.py``.
torchvision itself is not needed."""

import torch  # noqa: F401
from torch import nn


def _conv_bn(inp, out, kernel=1, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class _Block(nn.Module):
    def __init__(self, inp, out, stride, expansion):
        super().__init__()
        hidden = inp * expansion
        self.residual = stride == 1 and inp == out
        layers = [] if expansion == 1 else [_conv_bn(inp, hidden)]
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, settings):
        super().__init__()
        features, channels = [_conv_bn(3, 32, 3, 2)], 32
        for t, c, n, s in settings:
            for i in range(n):
                features.append(_Block(channels, c, s if i == 0 else 1, t))
                channels = c
        features.append(_conv_bn(channels, 1280))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))
