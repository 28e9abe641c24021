"""The torch adapter: layers that keep a compressed input activation for backward.

>>> from tensorcompress.torch import convert, restore, last_layers
>>> # model = convert(model, method="asi", rank=0.8, layers=last_layers(4))

Importing this package imports torch; ``import tensorcompress`` does not.
"""

from tensorcompress.torch.convert import (
    LastLayers,
    compressed_layers,
    convert,
    last_layers,
    restore,
    trainable_only,
)
from tensorcompress.torch.functions import ConvSpec
from tensorcompress.torch.gradient_filter import PatchAverage
from tensorcompress.torch.modules import (
    METHODS,
    CompressedConv1d,
    CompressedConv2d,
    CompressedLinear,
    CompressedModule,
    CompressionConfig,
)

__all__ = [
    "METHODS",
    "CompressedConv1d",
    "CompressedConv2d",
    "CompressedLinear",
    "CompressedModule",
    "CompressionConfig",
    "ConvSpec",
    "LastLayers",
    "PatchAverage",
    "compressed_layers",
    "convert",
    "last_layers",
    "restore",
    "trainable_only",
]
