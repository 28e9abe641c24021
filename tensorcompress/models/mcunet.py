"""MCUNet ``mcunet-in1`` (``mcunet-5fps_imagenet``) without the mcunet package.

Architecture and module names follow the docs page "MCUNet-in1 layers", i.e. the
mit-han-lab TinyNAS ``ProxylessNASNets`` layout: ``first_conv.{conv,bn,act}`` and
``blocks.I.mobile_inverted_conv.{inverted_bottleneck,depth_conv,point_linear}.{conv,bn,act}``.
The head is the one used by the ASI / ICML2025 code: global average pool and a plain
``classifier = nn.Linear(160, num_classes)`` (mcunet itself names it ``classifier.linear``).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "MCUNET_IN1_BLOCKS",
    "MBInvertedConvLayer",
    "MCUNet",
    "MCUNetBlockConfig",
    "MobileInvertedResidualBlock",
    "mcunet_in1",
]


class MCUNetBlockConfig(NamedTuple):
    """One mobile inverted residual block of the spec table.

    Attributes
    ----------
    in_channels, out_channels : int
        Block input and output channels.
    expand_ratio : int
        Hidden channels are ``in_channels * expand_ratio``; no expand conv when 1.
    kernel_size : int
        Depthwise kernel size.
    stride : int
        Depthwise stride.
    skip : bool
        Whether the block adds an identity shortcut.
    """

    in_channels: int
    out_channels: int
    expand_ratio: int
    kernel_size: int
    stride: int
    skip: bool


# Blocks 0..13 of mcunet-in1, copied from the spec's "Blocks" table.
MCUNET_IN1_BLOCKS: tuple[MCUNetBlockConfig, ...] = (
    MCUNetBlockConfig(16, 8, 1, 3, 1, False),
    MCUNetBlockConfig(8, 16, 4, 3, 2, False),
    MCUNetBlockConfig(16, 16, 3, 3, 1, True),
    MCUNetBlockConfig(16, 24, 3, 7, 2, False),
    MCUNetBlockConfig(24, 24, 5, 3, 1, True),
    MCUNetBlockConfig(24, 40, 5, 3, 2, False),
    MCUNetBlockConfig(40, 40, 4, 7, 1, True),
    MCUNetBlockConfig(40, 48, 4, 5, 1, False),
    MCUNetBlockConfig(48, 48, 3, 3, 1, True),
    MCUNetBlockConfig(48, 48, 4, 3, 1, True),
    MCUNetBlockConfig(48, 96, 5, 7, 2, False),
    MCUNetBlockConfig(96, 96, 4, 5, 1, True),
    MCUNetBlockConfig(96, 96, 4, 5, 1, True),
    MCUNetBlockConfig(96, 160, 6, 3, 1, False),
)


def _conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    act: bool = True,
) -> nn.Sequential:
    """``Sequential(conv, bn[, act])`` with named children, giving mcunet's state_dict keys."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    # bias=False everywhere: BatchNorm follows every conv.
    layers["conv"] = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        groups=groups,
        bias=False,
    )
    layers["bn"] = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1)
    if act:
        layers["act"] = nn.ReLU6(inplace=True)
    return nn.Sequential(layers)


class MBInvertedConvLayer(nn.Module):
    """[1x1 expand + BN + ReLU6] -> kxk depthwise + BN + ReLU6 -> 1x1 project + BN.

    Parameters
    ----------
    in_channels, out_channels : int
        Input and output channels.
    kernel_size : int
        Depthwise kernel size (odd; padding ``kernel_size // 2``).
    stride : int
        Depthwise stride.
    expand_ratio : int
        Hidden channels ``in_channels * expand_ratio``; ``inverted_bottleneck`` is
        ``None`` when it is 1, as in mcunet.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
    ) -> None:
        super().__init__()
        mid = round(in_channels * expand_ratio)
        self.inverted_bottleneck: nn.Sequential | None = (
            None if expand_ratio == 1 else _conv_bn(in_channels, mid, 1)
        )
        self.depth_conv = _conv_bn(mid, mid, kernel_size, stride=stride, groups=mid)
        # Linear bottleneck: no activation after the projection.
        self.point_linear = _conv_bn(mid, out_channels, 1, act=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply expand (if any), depthwise and projection to ``x``."""
        if self.inverted_bottleneck is not None:
            x = self.inverted_bottleneck(x)
        return self.point_linear(self.depth_conv(x))


class MobileInvertedResidualBlock(nn.Module):
    """An :class:`MBInvertedConvLayer` with an optional identity shortcut.

    Parameters
    ----------
    cfg : MCUNetBlockConfig
        Block configuration; ``cfg.skip`` requires equal channels and stride 1.
    """

    def __init__(self, cfg: MCUNetBlockConfig) -> None:
        super().__init__()
        if cfg.skip and (cfg.in_channels != cfg.out_channels or cfg.stride != 1):
            raise ValueError(f"identity skip needs in == out and stride 1, got {cfg}")
        self.mobile_inverted_conv = MBInvertedConvLayer(
            cfg.in_channels, cfg.out_channels, cfg.kernel_size, cfg.stride, cfg.expand_ratio
        )
        self.use_res_connect = cfg.skip

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x``."""
        out = self.mobile_inverted_conv(x)
        if self.use_res_connect:
            # Out of place: ``x`` may be saved for backward by the first conv.
            out = out + x
        return out


class MCUNet(nn.Module):
    """TinyNAS/ProxylessNAS-style network: stem conv, inverted residual blocks, linear head.

    Parameters
    ----------
    blocks : sequence of MCUNetBlockConfig
        Block configurations; the first block's input channels set the stem width.
    num_classes : int, default 1000
        Output features of ``classifier``.
    """

    def __init__(
        self,
        blocks: tuple[MCUNetBlockConfig, ...] | list[MCUNetBlockConfig],
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("blocks must not be empty")
        for prev, nxt in itertools.pairwise(blocks):
            if prev.out_channels != nxt.in_channels:
                raise ValueError(f"channel mismatch between blocks {prev} and {nxt}")
        self.first_conv = _conv_bn(3, blocks[0].in_channels, 3, stride=2)
        self.blocks = nn.ModuleList(MobileInvertedResidualBlock(cfg) for cfg in blocks)
        self.out_channels = blocks[-1].out_channels
        self.global_avg_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.out_channels, num_classes, bias=True)

        # "he_fout" init as in mcunet/torchvision; the classifier keeps nn.Linear's
        # default init, as in the ICML2025 code that replaces mcunet's head.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the last feature map, ``(N, 160, 7, 7)`` for mcunet-in1 at 224x224."""
        x = self.first_conv(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape ``(N, num_classes)`` for images ``(N, 3, H, W)``."""
        x = self.global_avg_pool(self.forward_features(x))
        return self.classifier(torch.flatten(x, 1))


def mcunet_in1(num_classes: int = 1000) -> MCUNet:
    """MCUNet ``mcunet-in1`` (42 convs, 160x7x7 features at 224 input), randomly initialised.

    Parameters
    ----------
    num_classes : int, default 1000
        Output features of ``classifier`` (``nn.Linear(160, num_classes)``).

    Returns
    -------
    MCUNet
        The model; conv names are ``first_conv.conv`` and
        ``blocks.I.mobile_inverted_conv.{inverted_bottleneck,depth_conv,point_linear}.conv``.
    """
    return MCUNet(MCUNET_IN1_BLOCKS, num_classes=num_classes)
