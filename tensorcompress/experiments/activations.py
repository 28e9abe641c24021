"""Realistic activation tensors, made here from images that ship with scikit-learn.

Benchmarks and notebooks need activations with the spectra of real ones, not
Gaussian noise: natural images (``sklearn.datasets.load_sample_images``) are
cropped at seeded positions, contrast-normalised and pushed through a fixed,
seeded stack of three stride-2 convs with batch normalisation and ReLU. Two
seeds give two different batches through the same layers, like two consecutive
training steps.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch
from torch import nn

__all__ = ["realistic_activation", "sample_images"]


@functools.lru_cache(maxsize=1)
def sample_images() -> torch.Tensor:
    """The scikit-learn sample images as one float tensor ``(n, 3, H, W)`` in [0, 1]."""
    from sklearn.datasets import load_sample_images

    images = np.stack(load_sample_images().images).astype(np.float32) / 255.0
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _crops(batch: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    images = sample_images()
    n, _, h, w = images.shape
    # Crop a region up to 4x larger than ``size`` and resize, so a crop sees
    # image structure at several scales.
    out = []
    for _ in range(batch):
        side = int(rng.integers(min(size, h, w), min(h, w, 4 * size) + 1))
        i = int(rng.integers(0, n))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = images[i : i + 1, :, top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        out.append(nn.functional.interpolate(crop, size=(size, size), mode="bilinear"))
    return torch.cat(out)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    # Per-image contrast normalisation, as a trained network's first layers
    # do: without it, image brightness dominates every channel and the
    # activations are unrealistically low-rank.
    centred = images - images.mean(dim=(2, 3), keepdim=True)
    return centred / (centred.std(dim=(1, 2, 3), keepdim=True) + 1e-3)


def _conv_stack(channels: list[int], generator: torch.Generator) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(channels):
        conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.normal_(0.0, math.sqrt(2.0 / (9 * c_in)), generator=generator)
        layers += [conv, nn.BatchNorm2d(c_out, affine=False, track_running_stats=False), nn.ReLU()]
    return nn.Sequential(*layers)


@torch.no_grad()
def realistic_activation(
    shape: tuple[int, ...], seed: int = 0, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A post-ReLU activation of ``shape`` computed from natural images.

    Parameters
    ----------
    shape : tuple of int
        ``(B, C, H, W)`` for a conv activation, ``(B, T, D)`` for transformer
        tokens (``T - 1`` must be a square number of patches, e.g. 197).
    seed : int
        Chooses the crops (the batch). The conv stack's weights depend only on
        the shape, so different seeds are different batches through the same
        layers.
    dtype : torch.dtype
        Output dtype.

    Returns
    -------
    torch.Tensor
        Contiguous tensor of ``shape``.
    """
    rng = np.random.default_rng(seed)
    # Python's hash of a tuple of ints is stable across runs (no string salt).
    weights = torch.Generator().manual_seed(hash(tuple(shape[1:])) % (2**31))
    if len(shape) == 4:
        b, c, h, w = shape
        if h != w:
            raise ValueError(f"shape must have square spatial dims, got {shape}")
        depth = 3
        widths = [3] + [max(16, c // 2 ** (depth - 1 - i)) for i in range(depth)]
        stack = _conv_stack(widths, weights)
        x = stack(_normalise(_crops(b, h * 2**depth, rng)))
    elif len(shape) == 3:
        b, t, d = shape
        side = math.isqrt(t - 1)
        if side * side != t - 1:
            raise ValueError(f"token count minus one must be a square, got {t}")
        stack = _conv_stack([3, max(8, d // 4), d], weights)
        patches = stack(_normalise(_crops(b, side * 4, rng))).flatten(2).transpose(1, 2)
        cls = patches.mean(dim=1, keepdim=True)
        x = torch.cat([cls, patches], dim=1)
        x = nn.functional.gelu(nn.functional.layer_norm(x, (d,)))
    else:
        raise ValueError(f"shape must be (B, C, H, W) or (B, T, D), got {shape}")
    return x.to(dtype).contiguous()
