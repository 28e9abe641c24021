"""MobileNetV2 with torchvision's topology and parameter names.

The module tree mirrors ``torchvision.models.mobilenetv2`` so a torchvision
``state_dict`` loads with ``strict=True``. torchvision itself is never imported.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConvBNReLU6", "InvertedResidual", "MobileNetV2", "mobilenet_v2"]


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``v`` to a multiple of ``divisor`` without going more than 10% below it.

    Same rule as torchvision (and the original TensorFlow code), so channel counts
    agree for every ``width_mult``.
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """``Sequential(Conv2d, BatchNorm2d, ReLU6)``, like torchvision's ``Conv2dNormActivation``.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of the convolution.
    kernel_size : int, default 3
        Square kernel size; padding is ``(kernel_size - 1) // 2`` ("same" at stride 1).
    stride : int, default 1
        Convolution stride.
    groups : int, default 1
        Convolution groups (``in_channels`` for depthwise).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            # Index-named children (0, 1, 2) keep torchvision's "features.0.0.weight" keys.
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = out_channels


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand] -> 3x3 depthwise -> 1x1 linear projection.

    Parameters
    ----------
    inp : int
        Input channels.
    oup : int
        Output channels.
    stride : int
        Depthwise stride, 1 or 2.
    expand_ratio : int
        Hidden channels are ``round(inp * expand_ratio)``; no expand conv when 1.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        self.stride = stride
        hidden_dim = round(inp * expand_ratio)
        self.use_res_connect = self.stride == 1 and inp == oup

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden_dim, kernel_size=1))
        layers.extend(
            [
                ConvBNReLU6(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
                # Linear bottleneck: no activation after the projection.
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape ``(N, inp, H, W)``."""
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio t, output channels c, repeats n, first stride s), as in the paper.
_INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier.

    Parameters
    ----------
    num_classes : int, default 1000
        Output features of the final linear layer.
    width_mult : float, default 1.0
        Channel multiplier; channel counts are rounded with :func:`_make_divisible`.
    round_nearest : int, default 8
        Channel counts are multiples of this.
    dropout : float, default 0.2
        Dropout probability before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        round_nearest: int = 8,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        # The last layer never shrinks below 1280 channels, as in torchvision.
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)

        features: list[nn.Module] = [ConvBNReLU6(3, input_channel, stride=2)]
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(
                    InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t)
                )
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(self.last_channel, num_classes),
        )

        # torchvision's init (kaiming_normal_ default gain is sqrt(2), same as for ReLU).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape ``(N, num_classes)`` for images ``(N, 3, H, W)``."""
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 (3,504,872 parameters at 1000 classes, width 1.0), randomly initialised.

    Parameters
    ----------
    num_classes : int, default 1000
        Output features of ``classifier[1]``.
    width_mult : float, default 1.0
        Channel multiplier.

    Returns
    -------
    MobileNetV2
        Model whose ``state_dict`` keys match ``torchvision.models.mobilenet_v2``.
    """
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult)
