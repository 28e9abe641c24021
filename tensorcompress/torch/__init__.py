"""The torch adapter: layers that keep a compressed input activation for backward.

>>> from tensorcompress.torch import convert, restore, last_layers, last_blocks
>>> # model = convert(model, method="asi", rank=0.8, layers=last_layers(4))
>>> # vit = convert(vit, method="asi", rank=0.8, layers=last_blocks(2), example_input=x)

Importing this package imports torch; ``import tensorcompress`` does not.
"""

from tensorcompress.torch.convert import compressed_layers, convert, input_groups, restore
from tensorcompress.torch.functions import ConvSpec
from tensorcompress.torch.gradient_filter import PatchAverage
from tensorcompress.torch.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    export_low_rank,
    factor_by_outputs,
    to_dense,
)
from tensorcompress.torch.modules import (
    METHODS,
    CompressedConv1d,
    CompressedConv2d,
    CompressedLinear,
    CompressedModule,
    CompressionConfig,
    SharedInput,
)
from tensorcompress.torch.selection import (
    LastBlocks,
    LastLayers,
    find_blocks,
    fine_tuned_modules,
    last_blocks,
    last_layers,
    select_layers,
    shared_inputs,
    trainable_only,
)
from tensorcompress.torch.wasi import WASIConfig, WASIConv2d, WASILinear, to_wasi

__all__ = [
    "METHODS",
    "CompressedConv1d",
    "CompressedConv2d",
    "CompressedLinear",
    "CompressedModule",
    "CompressionConfig",
    "ConvSpec",
    "LastBlocks",
    "LastLayers",
    "LowRankConv2d",
    "LowRankLinear",
    "PatchAverage",
    "SharedInput",
    "WASIConfig",
    "WASIConv2d",
    "WASILinear",
    "compressed_layers",
    "convert",
    "export_low_rank",
    "factor_by_outputs",
    "find_blocks",
    "fine_tuned_modules",
    "input_groups",
    "last_blocks",
    "last_layers",
    "restore",
    "select_layers",
    "shared_inputs",
    "to_dense",
    "to_wasi",
    "trainable_only",
]
