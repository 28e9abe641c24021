"""The torch adapter: layers that keep a compressed input activation for backward.

>>> from tensorcompress.torch import convert, restore, last_layers
>>> # model = convert(model, method="asi", rank=0.8, layers=last_layers(4))

Importing this package imports torch; ``import tensorcompress`` does not.
"""

from tensorcompress.torch.convert import compressed_layers, convert, restore
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
from tensorcompress.torch.selection import (
    LastLayers,
    fine_tuned_modules,
    last_layers,
    select_layers,
    trainable_only,
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
    "fine_tuned_modules",
    "last_layers",
    "restore",
    "select_layers",
    "trainable_only",
]
