"""Realistic activation tensors, made from images that need no download.

Benchmarks and notebooks need activations with the spectra of real ones, not
Gaussian noise. Two image sources feed the same pipeline:

- ``"images"``: the two natural photographs that ship with scikit-learn
  (``sklearn.datasets.load_sample_images``), cropped at seeded positions;
  large smooth regions (sky, walls), so the activations are low-rank.
- ``"dead_leaves"``: seeded "dead leaves" images (:func:`dead_leaves`),
  overlapping disks of random grey-coloured shades with a power-law size
  distribution; their statistics are scale-invariant like natural images',
  with sharp edges at every scale, so the activations have more spatial
  detail (higher ranks at the same explained variance).

The images are contrast-normalised and pushed through a fixed, seeded stack of
stride-2 convs with batch normalisation and ReLU. Two seeds give two different
batches through the same layers, like two consecutive training steps.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Literal

import numpy as np
import torch
from torch import nn

__all__ = ["SOURCES", "Source", "dead_leaves", "realistic_activation", "sample_images"]

Source = Literal["images", "dead_leaves"]
SOURCES: tuple[Source, ...] = ("images", "dead_leaves")


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


def dead_leaves(
    batch: int,
    size: int,
    seed: int = 0,
    *,
    min_radius: float = 2.0,
    coverage: float = 5.0,
) -> torch.Tensor:
    """Seeded "dead leaves" images: opaque disks falling on top of each other.

    Radii follow the density ``r**-3`` between ``min_radius`` and ``size / 4``,
    the distribution that makes the model scale-invariant (Lee, Mumford and
    Huang, 2001); centres are uniform; each disk has one colour, a random
    grey level with a small random tint.

    Parameters
    ----------
    batch : int
        Number of images.
    size : int
        Side of the square images, in pixels.
    seed : int, default 0
        Seed of the images (the same seed gives the same images).
    min_radius : float, default 2.0
        Smallest disk radius, in pixels: the finest detail.
    coverage : float, default 5.0
        Expected number of disks over a pixel; ``exp(-coverage)`` of the
        image is left as a mid-grey background.

    Returns
    -------
    torch.Tensor
        ``(batch, 3, size, size)``, float32, in [0, 1].
    """
    if batch < 1 or size < 1:
        raise ValueError(f"batch and size must be positive, got {batch} and {size}")
    max_radius = max(size / 4, min_radius)
    rng = np.random.default_rng(seed)
    # Inverse CDF of p(r) ~ r**-3 on [min_radius, max_radius], and its mean area.
    lo, hi = min_radius**-2, max_radius**-2
    mean_area = math.pi * 2 * math.log(max_radius / min_radius) / (lo - hi) if lo > hi else 1.0
    margin = max_radius / 2  # disks centred just outside still cover the border
    count = math.ceil(coverage * (size + 2 * margin) ** 2 / max(mean_area, 1.0))
    n = batch * count
    radius = (lo - rng.random(n) * (lo - hi)) ** -0.5
    cy, cx = (rng.uniform(-margin, size + margin, (2, n))).astype(np.float32)
    grey = rng.random(n, dtype=np.float32)
    colour = np.clip(grey[:, None] + 0.15 * rng.standard_normal((n, 3), dtype=np.float32), 0, 1)
    image_of = np.repeat(np.arange(batch), count)

    # The visible disk at a pixel is the last one drawn over it (the largest
    # index): one scatter-max over the pixels of every disk, disks grouped by
    # the side of their bounding box so that each group is one array operation.
    top = torch.full((batch * size * size,), -1, dtype=torch.int64)
    half = np.ceil(radius).astype(np.int64)
    for h in np.unique(half):
        ids = np.flatnonzero(half == h)
        offsets = np.arange(-h, h + 1)
        ys = np.floor(cy[ids])[:, None, None] + offsets[None, :, None]
        xs = np.floor(cx[ids])[:, None, None] + offsets[None, None, :]
        inside = (ys + 0.5 - cy[ids, None, None]) ** 2 + (xs + 0.5 - cx[ids, None, None]) ** 2
        inside = (inside <= radius[ids, None, None] ** 2) & (ys >= 0) & (ys < size)
        inside &= (xs >= 0) & (xs < size)
        ys, xs = np.broadcast_arrays(ys, xs)
        disk = np.broadcast_to(ids[:, None, None], inside.shape)[inside]
        pixel = (image_of[disk] * size + ys[inside].astype(np.int64)) * size
        pixel += xs[inside].astype(np.int64)
        top.scatter_reduce_(0, torch.from_numpy(pixel), torch.from_numpy(disk), reduce="amax")
    palette = torch.from_numpy(np.concatenate([colour, np.full((1, 3), 0.5, np.float32)]))
    images = palette[top]  # index -1 is the background
    return images.reshape(batch, size, size, 3).permute(0, 3, 1, 2).contiguous()


def _dead_leaves_batch(batch: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    return dead_leaves(batch, size, seed=int(rng.integers(2**31)))


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
    shape: tuple[int, ...],
    seed: int = 0,
    *,
    source: Source = "images",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A post-ReLU activation of ``shape`` computed from images.

    Parameters
    ----------
    shape : tuple of int
        ``(B, C, H, W)`` for a conv activation, ``(B, T, D)`` for transformer
        tokens (``T - 1`` must be a square number of patches, e.g. 197).
    seed : int
        Chooses the crops (the batch). The conv stack's weights depend only on
        the shape, so different seeds are different batches through the same
        layers.
    source : {"images", "dead_leaves"}, default "images"
        The images: crops of scikit-learn's sample photographs, or seeded
        :func:`dead_leaves` images (more spatial detail).
    dtype : torch.dtype
        Output dtype.

    Returns
    -------
    torch.Tensor
        Contiguous tensor of ``shape``.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    images = _crops if source == "images" else _dead_leaves_batch
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
        x = stack(_normalise(images(b, h * 2**depth, rng)))
    elif len(shape) == 3:
        b, t, d = shape
        side = math.isqrt(t - 1)
        if side * side != t - 1:
            raise ValueError(f"token count minus one must be a square, got {t}")
        stack = _conv_stack([3, max(8, d // 4), d], weights)
        patches = stack(_normalise(images(b, side * 4, rng))).flatten(2).transpose(1, 2)
        cls = patches.mean(dim=1, keepdim=True)
        x = torch.cat([cls, patches], dim=1)
        x = nn.functional.gelu(nn.functional.layer_norm(x, (d,)))
    else:
        raise ValueError(f"shape must be (B, C, H, W) or (B, T, D), got {shape}")
    return x.to(dtype).contiguous()
