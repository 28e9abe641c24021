"""Gradient Filtering (Yang, Li, Marculescu, CVPR 2023): the patch-averaging baseline.

The layer keeps its input averaged over patches instead of the input itself,
and computes the weight gradient from it and from the output gradient averaged
over the matching patches of the output, as if both were constant on each
patch. This module reproduces the formula of the authors' reference code (as
used by the ICML 2025 comparison), written from scratch:

- Patches are laid out on the conv's **output**: a grid of
  ``ceil(s_out / R)`` cells per spatial dim. The kept tensor is
  ``(B, C_in, *grid)``: that is the memory the paper's tables count.
- Each input cell is a window of ``R * stride`` input pixels per dim, the
  grid centred on the input (zero padding before ``ceil(d / 2)`` and after the
  rest, ``d = grid * R * stride - s_in``; a negative ``d`` crops).
- The output gradient is averaged over ``R`` pixels per dim, the grid centred
  the same way, counting only pixels inside the output
  (``count_include_pad=False``).
- The weight gradient of every kernel tap is the same number, the exact
  gradient when both tensors are constant on each patch:
  ``dW[o, c, :] = R**d * sum_{n, cell} mean_y[n, o, cell] * mean_x[n, c, cell]``
  (each cell holds ``R**d`` output pixels). The reference code sums the input
  over the cell's window instead, which is the same at stride 1 but
  ``stride**d`` times too large for a strided conv (a test shows the exact
  gradient on patch-constant data); this module uses the exact scale.
- Groups (depthwise, with or without channel multiplier) use each output
  channel's own input channels. The reference handles ``groups == 1`` and
  depthwise only; the grouped formula reduces to both.

Unlike the reference, the input gradient is **not** approximated here: it is
computed exactly from the weight, like for every other method of this adapter,
so the baseline only approximates what the compressed activation is used for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PatchAverage", "compress", "grid", "weight_grad"]


@dataclass(frozen=True)
class Grid:
    """Patch layout along one spatial dim.

    Attributes
    ----------
    cells : int
        Number of patches, ``ceil(out_size / patch)``.
    window : int
        Input pixels per patch, ``patch * stride``.
    x_pad : tuple of int
        ``(before, after)`` zero padding of the input (negative crops) so that
        ``cells`` windows tile it exactly.
    y_pad : tuple of int
        ``(before, after)`` padding of the output gradient (never negative).
    """

    cells: int
    window: int
    x_pad: tuple[int, int]
    y_pad: tuple[int, int]


def grid(in_size: int, out_size: int, patch: int, stride: int) -> Grid:
    """Patch layout of one spatial dim (see the module docstring)."""
    cells = -(-out_size // patch)
    window = patch * stride
    d = cells * window - in_size
    before = math.ceil(d / 2)
    dy = cells * patch - out_size
    y_before = math.ceil(dy / 2)
    return Grid(cells, window, (before, d - before), (y_before, dy - y_before))


def _f_pad(pads: Sequence[tuple[int, int]]) -> list[int]:
    # F.pad lists the last dim first.
    return [p for pair in reversed(pads) for p in pair]


def _avg_pool(x: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    if len(window) == 1:
        return F.avg_pool1d(x, window, window)
    if len(window) == 2:
        return F.avg_pool2d(x, window, window)
    if len(window) == 3:
        return F.avg_pool3d(x, window, window)
    raise ValueError(f"gradient filtering supports 1 to 3 spatial dims, got {len(window)}")


@dataclass(frozen=True)
class PatchAverage:
    """A conv input averaged over the gradient-filter patches.

    Attributes
    ----------
    mean : torch.Tensor
        ``(B, C_in, *cells)``: the input's mean over each cell's window (zero
        padding counted, as the reference's sums are).
    patch : int
        Patch size ``R`` on the output.
    grids : tuple of Grid
        Layout per spatial dim.
    """

    mean: torch.Tensor
    patch: int
    grids: tuple[Grid, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the kept tensor ``(B, C_in, *cells)``."""
        return tuple(int(n) for n in self.mean.shape)

    @property
    def ranks(self) -> None:
        """Gradient filtering has no ranks (for a uniform interface with the decompositions)."""
        return None

    @property
    def nbytes(self) -> int:
        """Bytes of the kept tensor."""
        return self.mean.numel() * self.mean.element_size()


def compress(
    x: torch.Tensor, out_spatial: Sequence[int], patch: int, stride: Sequence[int]
) -> PatchAverage:
    """Average a conv input over the gradient-filter patches.

    Parameters
    ----------
    x : torch.Tensor
        Conv input ``(B, C_in, *spatial)`` (1 to 3 spatial dims).
    out_spatial : sequence of int
        The conv output's spatial size.
    patch : int
        Patch size ``R`` (on the output).
    stride : sequence of int
        The conv's stride, one per spatial dim.

    Returns
    -------
    PatchAverage
    """
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be a positive int, got {patch!r}")
    spatial = tuple(int(n) for n in x.shape[2:])
    grids = tuple(grid(n, o, patch, s) for n, o, s in zip(spatial, out_spatial, stride))
    pads = [g.x_pad for g in grids]
    xp = F.pad(x, _f_pad(pads)) if any(p != (0, 0) for p in pads) else x
    mean = _avg_pool(xp, tuple(g.window for g in grids))
    return PatchAverage(mean=mean, patch=patch, grids=grids)


def _grad_output_mean(gy: torch.Tensor, pa: PatchAverage) -> torch.Tensor:
    """Mean of the output gradient over each cell's valid pixels."""
    pads = [g.y_pad for g in pa.grids]
    r = pa.patch
    window = (r,) * len(pads)
    padded = any(p != (0, 0) for p in pads)
    g = _avg_pool(F.pad(gy, _f_pad(pads)) if padded else gy, window)
    if not padded:
        return g
    # count_include_pad=False: rescale border cells by window / valid pixels.
    ones = gy.new_ones((1, 1, *gy.shape[2:]))
    frac = _avg_pool(F.pad(ones, _f_pad(pads)), window)
    return g / frac


def weight_grad(
    pa: PatchAverage,
    grad_output: torch.Tensor,
    weight_shape: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Weight gradient of a conv from its patch-averaged input (reference formula).

    Parameters
    ----------
    pa : PatchAverage
        What :func:`compress` kept.
    grad_output : torch.Tensor
        ``(B, C_out, *out_spatial)``.
    weight_shape : sequence of int
        ``(C_out, C_in / groups, *kernel)``.
    groups : int
        The conv's groups.

    Returns
    -------
    torch.Tensor
        ``weight_shape``, the same value on every kernel tap.
    """
    ybar = _grad_output_mean(grad_output, pa)
    xbar = pa.mean
    b, c_out = int(ybar.shape[0]), int(ybar.shape[1])
    c_in = int(xbar.shape[1])
    cells = math.prod(g.cells for g in pa.grids)
    # (groups, B, per-group channels, cells) without moving the big dims.
    y3 = ybar.reshape(b, groups, c_out // groups, cells)
    x3 = xbar.reshape(b, groups, c_in // groups, cells)
    w = torch.einsum("bgoc,bgic->goi", y3, x3).reshape(c_out, c_in // groups)
    # Each cell stands for R**d output pixels (the reference's window sum is
    # stride**d times more for strided convs; see the module docstring).
    w = w * pa.patch ** len(pa.grids)
    kernel = tuple(int(k) for k in weight_shape[2:])
    return w.reshape(c_out, c_in // groups, *([1] * len(kernel))).expand(*weight_shape).clone()
