"""Datasets of the fine-tuning experiment: the source task, the target task, user data.

Everything here is an :class:`ImageData`: ``uint8`` images ``(N, 3, R, R)``
already at the experiment's resolution, and ``int64`` labels ``0..K-1``.
Images are kept as bytes (a quarter of float32) and turned into network
inputs batch by batch with :func:`to_input`.

- **Target task** (:func:`digits`): scikit-learn's handwritten digits
  (1797 images of 8x8, 10 classes), upscaled bilinearly to the resolution and
  repeated over 3 channels; nothing is downloaded.
- **Source task** (:func:`shapes`): 40 procedurally rendered classes
  (:data:`SHAPE_CLASSES`): 10 geometric shapes and textures (disk, ring,
  square outline, triangle, plus, bar, grating, checkerboard, arc, corner) at
  random position, scale, rotation, stroke width and colours, and the 30
  glyphs of a fixed random alphabet (one to three quadratic strokes each,
  :func:`alphabet`) drawn with jitter, small rotations, shear and varying
  stroke width, all with pixel noise. Strokes, curves, corners and their
  arrangements are what digits are made of, so the features transfer, but
  the task and its label set are different ones. Rendering is vectorised
  (numpy; the glyphs' distance fields in torch, float32, one call per batch),
  seeded by an explicit generator, so a batch is a pure function of
  ``(seed, index)``.
- **User data** (:func:`load_data`): an image folder (one subfolder per class,
  read with PIL) or an ``.npz`` with ``x`` and ``y`` (and optionally
  ``x_test``/``y_test``).

Randomness only ever comes from ``numpy.random.Generator`` or
``torch.Generator`` objects built from explicit seeds; the global RNGs are
never used.
"""

from __future__ import annotations

import functools
import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "GEOMETRIC_CLASSES",
    "IMAGE_EXTENSIONS",
    "N_GLYPHS",
    "SHAPE_CLASSES",
    "ImageData",
    "alphabet",
    "batch_indices",
    "digits",
    "load_data",
    "render_shapes",
    "shape_batch",
    "shapes",
    "split",
    "subsample",
    "to_input",
]

GEOMETRIC_CLASSES: tuple[str, ...] = (
    "disk",
    "ring",
    "square",
    "triangle",
    "plus",
    "bar",
    "grating",
    "checkerboard",
    "arc",
    "corner",
)
"""The geometric shapes and textures of the source task."""

N_GLYPHS = 30
"""Classes of the synthetic alphabet in the source task."""

SHAPE_CLASSES: tuple[str, ...] = GEOMETRIC_CLASSES + tuple(f"glyph{k:02d}" for k in range(N_GLYPHS))
"""Class names of the procedural source task, in label order: the 10
geometric shapes and textures, then the 30 glyphs of a fixed random alphabet."""

# The alphabet is part of the task's definition, not of a run: a fixed seed.
_ALPHABET_SEED = 20250711
_CURVE_POINTS = 10

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
"""File suffixes :func:`load_data` reads from an image folder (case-insensitive)."""

# Inputs are (x / 255 - MEAN) / STD: a fixed affine map, so the source task,
# the target task and user data go through the same preprocessing.
_MEAN, _STD = 0.5, 0.25


@dataclass(frozen=True)
class ImageData:
    """Images and labels of one split.

    Attributes
    ----------
    images : torch.Tensor
        ``uint8`` tensor ``(N, 3, R, R)``.
    labels : torch.Tensor
        ``int64`` tensor ``(N,)`` with values in ``0..len(classes)-1``.
    classes : tuple of str
        Class names, in label order.
    name : str
        Where the data came from (for reports).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 (N, 3, R, R), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        """Side of the (square) images in pixels."""
        return int(self.images.shape[-1])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def take(self, index: torch.Tensor | np.ndarray | Sequence[int]) -> ImageData:
        """The samples at ``index`` (same classes and name)."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return ImageData(self.images[idx], self.labels[idx], self.classes, self.name)


def to_input(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Network input from ``uint8`` images: float32, ``(x / 255 - 0.5) / 0.25``."""
    x = images.to(device=device, non_blocking=True).float().div_(255.0)
    return x.sub_(_MEAN).div_(_STD)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] to ``uint8`` (rounded, clipped)."""
    return x.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def _resize(x: torch.Tensor, resolution: int, chunk: int = 1024) -> torch.Tensor:
    """Float ``(N, C, H, W)`` in [0, 1] to ``(N, 3, R, R)`` ``uint8``, in chunks.

    Bilinear; antialiased when shrinking so downscaled photos do not alias.
    One channel is repeated to three, a fourth (alpha) is dropped.
    """
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3]
    out = torch.empty((x.shape[0], 3, resolution, resolution), dtype=torch.uint8)
    shrink = x.shape[-1] > resolution or x.shape[-2] > resolution
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].float()
        if part.shape[-2:] != (resolution, resolution):
            part = F.interpolate(
                part,
                size=(resolution, resolution),
                mode="bilinear",
                align_corners=False,
                antialias=shrink,
            )
        out[start : start + chunk] = _to_uint8(part)
    return out


# ---------------------------------------------------------------------------
# Target task: scikit-learn's digits
# ---------------------------------------------------------------------------


def digits(resolution: int) -> ImageData:
    """scikit-learn's handwritten digits at ``resolution``, 3 channels.

    Parameters
    ----------
    resolution : int
        Output side in pixels (the 8x8 originals are upscaled bilinearly).

    Returns
    -------
    ImageData
        1797 samples, classes ``"0"`` .. ``"9"``; ink is bright, background dark.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are ink counts 0..16.
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return ImageData(_resize(x, resolution), y, tuple(str(c) for c in range(10)), "sklearn digits")


# ---------------------------------------------------------------------------
# Source task: procedural shapes and textures
# ---------------------------------------------------------------------------


def _smooth(d: np.ndarray, aa: np.ndarray) -> np.ndarray:
    """Coverage of a signed distance ``d`` (negative inside), antialiased over ``aa``."""
    return np.clip(0.5 - d / aa, 0.0, 1.0)


def _box(u: np.ndarray, v: np.ndarray, half_u: np.ndarray, half_v: np.ndarray) -> np.ndarray:
    """Signed distance (Chebyshev approximation) to an axis-aligned box."""
    return np.maximum(np.abs(u) - half_u, np.abs(v) - half_v)


def _masks(
    label: int, u: np.ndarray, v: np.ndarray, t: np.ndarray, f: np.ndarray, aa: np.ndarray
) -> np.ndarray:
    """Foreground coverage in [0, 1] of class ``label`` in local coordinates ``(u, v)``.

    ``t`` is the stroke half-width, ``f`` a texture frequency; all arrays
    broadcast to ``(n, R, R)``.
    """
    r = np.sqrt(u * u + v * v)
    name = GEOMETRIC_CLASSES[label]
    one = np.ones_like(t)
    if name == "disk":
        return _smooth(r - 0.7, aa)
    if name == "ring":
        return _smooth(np.abs(r - 0.65) - t, aa)
    if name == "square":
        return _smooth(np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.6) - t, aa)
    if name == "triangle":
        # Intersection of three half-planes at 120 degrees.
        d = np.full_like(r, -np.inf)
        for k in range(3):
            a = math.pi / 2 + 2 * math.pi * k / 3
            d = np.maximum(d, u * math.cos(a) + v * math.sin(a) - 0.4)
        return _smooth(d, aa)
    if name == "plus":
        return _smooth(np.minimum(_box(u, v, 0.8 * one, t), _box(u, v, t, 0.8 * one)), aa)
    if name == "bar":
        return _smooth(_box(u, v, 0.85 * one, t), aa)
    if name == "grating":
        return 0.5 + 0.5 * np.tanh(4.0 * np.sin(f * v))
    if name == "checkerboard":
        return 0.5 + 0.5 * np.tanh(4.0 * np.sin(f * u) * np.sin(f * v))
    if name == "arc":
        return _smooth(np.maximum(np.abs(r - 0.65) - t, -v), aa)
    if name == "corner":
        # Two legs meeting at (-0.6, 0.6): an L.
        legs = np.minimum(_box(u, v - 0.6, 0.6 * one, t), _box(u + 0.6, v, t, 0.6 * one))
        return _smooth(legs, aa)
    raise ValueError(f"unknown shape class {label}")


def _bezier(ctrl: np.ndarray) -> np.ndarray:
    """Points of quadratic Bezier curves: ``(..., 3, 2)`` control points -> ``(..., K, 2)``."""
    t = np.linspace(0.0, 1.0, _CURVE_POINTS)[:, None]
    p0, p1, p2 = ctrl[..., 0:1, :], ctrl[..., 1:2, :], ctrl[..., 2:3, :]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


@functools.lru_cache(maxsize=1)
def alphabet() -> tuple[np.ndarray, ...]:
    """The glyph templates: per glyph, control points ``(strokes, 3, 2)`` in [-0.7, 0.7].

    One to three quadratic strokes each, drawn once from a fixed seed, so the
    classes are the same in every run; a stroke's ends are far enough apart
    that it is a stroke, not a dot.
    """
    rng = np.random.default_rng(_ALPHABET_SEED)
    glyphs = []
    for _ in range(N_GLYPHS):
        strokes = []
        for _ in range(int(rng.integers(1, 4))):
            ctrl = rng.uniform(-0.7, 0.7, size=(3, 2))
            while np.linalg.norm(ctrl[0] - ctrl[2]) < 0.6:
                ctrl = rng.uniform(-0.7, 0.7, size=(3, 2))
            strokes.append(ctrl)
        glyphs.append(np.stack(strokes))
    return tuple(glyphs)


def _polyline_distance(px: np.ndarray, py: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance ``(n, P)`` from pixels ``(P,)`` to polylines ``(n, S, K, 2)`` (nearest segment).

    Computed in float32 with torch (one call for every glyph of a batch: the
    ``n x P x S*(K-1)`` arrays are the renderer's main cost).
    """
    n = pts.shape[0]
    p = torch.from_numpy(np.ascontiguousarray(pts, dtype=np.float32))
    a = p[:, :, :-1].reshape(n, 1, -1, 2)  # segment starts (n, 1, S*(K-1), 2)
    d = p[:, :, 1:].reshape(n, 1, -1, 2) - a
    ax, ay, dx, dy = a[..., 0], a[..., 1], d[..., 0], d[..., 1]
    inv = 1.0 / (dx * dx + dy * dy).clamp_min(1e-12)
    qx = torch.from_numpy(px.astype(np.float32)).view(1, -1, 1) - ax
    qy = torch.from_numpy(py.astype(np.float32)).view(1, -1, 1) - ay
    t = (qx * dx).add_(qy * dy).mul_(inv).clamp_(0.0, 1.0)
    ex, ey = qx.sub_(t * dx), qy.sub_(t * dy)
    return ex.mul_(ex).add_(ey.mul_(ey)).amin(dim=-1).sqrt_().double().numpy()


def _glyph_points(glyph: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Polylines ``(n, 3, K, 2)`` and stroke half-widths ``(n,)`` of ``n`` copies of one glyph.

    Jittered, affinely distorted copies; a glyph of fewer than three strokes
    repeats its last one (the same distance).
    """
    base = alphabet()[glyph]  # (S, 3, 2)
    ctrl = base[None] + rng.normal(0.0, 0.05, size=(n, *base.shape))
    # Small rotation, anisotropic scale, shear and shift: handwriting-like
    # variation that keeps the glyphs apart (no full rotations).
    angle = rng.uniform(-0.3, 0.3, size=n)
    sx, sy = rng.uniform(0.75, 1.1, size=n), rng.uniform(0.75, 1.1, size=n)
    shear = rng.uniform(-0.25, 0.25, size=n)
    shift = rng.uniform(-0.15, 0.15, size=(n, 1, 1, 2))
    half_width = rng.uniform(0.06, 0.12, size=n)
    c, s = np.cos(angle), np.sin(angle)
    # Rotation after shear after scale: [[c, -s], [s, c]] @ [[1, shear], [0, 1]] @ diag(sx, sy).
    m = np.empty((n, 2, 2))
    m[:, 0, 0], m[:, 0, 1] = c * sx, (c * shear - s) * sy
    m[:, 1, 0], m[:, 1, 1] = s * sx, (s * shear + c) * sy
    pts = np.einsum("nij,nskj->nski", m, _bezier(ctrl)) + shift
    pad = [pts] + [pts[:, -1:]] * (3 - pts.shape[1])
    return np.concatenate(pad, axis=1), half_width


def _col(a: np.ndarray) -> np.ndarray:
    """``(n,)`` -> ``(n, 1, 1)``: one value per image, broadcast over pixels."""
    return a[:, None, None]


def render_shapes(labels: np.ndarray, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Render one image per label of :data:`SHAPE_CLASSES`.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels ``(n,)`` in ``0..len(SHAPE_CLASSES)-1``.
    resolution : int
        Side in pixels.
    rng : numpy.random.Generator
        Source of every random choice (position, scale, rotation, stroke
        width, frequency, colours, noise).

    Returns
    -------
    numpy.ndarray
        float32 ``(n, 3, resolution, resolution)`` in [0, 1].
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    # Per-image parameters, drawn for every image in a fixed order so the
    # result does not depend on how the labels are grouped.
    centre = rng.uniform(-0.25, 0.25, size=(n, 2))
    scale = rng.uniform(0.55, 1.0, size=(n,))
    angle = rng.uniform(0.0, 2.0 * math.pi, size=(n,))
    half_width = rng.uniform(0.07, 0.16, size=(n,))
    freq = rng.uniform(2.5, 6.0, size=(n,)) * math.pi / 2
    fg = rng.uniform(0.0, 1.0, size=(n, 3))
    bg = rng.uniform(0.0, 1.0, size=(n, 3))
    # Enough contrast that every shape is visible: push the background away.
    gap = fg.mean(axis=1) - bg.mean(axis=1)
    push = np.where(np.abs(gap) < 0.35, 0.35 * np.where(gap >= 0, 1.0, -1.0) - gap, 0.0)
    bg = np.clip(bg - push[:, None], 0.0, 1.0)
    noise = rng.normal(0.0, 0.04, size=(n, 3, resolution, resolution))

    axis = (np.arange(resolution) + 0.5) / resolution * 2.0 - 1.0
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    px, py = xx[None] - _col(centre[:, 0]), yy[None] - _col(centre[:, 1])
    c, s = np.cos(angle), np.sin(angle)
    u = (_col(c) * px + _col(s) * py) / _col(scale)
    v = (-_col(s) * px + _col(c) * py) / _col(scale)
    aa = _col(2.0 / (resolution * scale))  # one pixel in local units, doubled
    mask = np.empty((n, resolution, resolution))
    geometric = len(GEOMETRIC_CLASSES)
    glyphs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (where, polylines, widths)
    for label in np.unique(labels):
        sel = labels == label
        if label < geometric:
            mask[sel] = _masks(
                int(label), u[sel], v[sel], _col(half_width[sel]), _col(freq[sel]), aa[sel]
            )
        else:
            glyphs.append((sel, *_glyph_points(int(label) - geometric, int(sel.sum()), rng)))
    if glyphs:
        # Every glyph of the batch in one distance computation.
        dist = _polyline_distance(
            xx.ravel(), yy.ravel(), np.concatenate([pts for _, pts, _ in glyphs])
        ).reshape(-1, resolution, resolution)
        widths = np.concatenate([w for _, _, w in glyphs])
        coverage = _smooth(dist - _col(widths), np.full((1, 1, 1), 2.0 / resolution))
        start = 0
        for sel, pts, _ in glyphs:
            mask[sel] = coverage[start : start + len(pts)]
            start += len(pts)
    img = bg[:, :, None, None] + (fg - bg)[:, :, None, None] * mask[:, None]
    return np.clip(img + noise, 0.0, 1.0).astype(np.float32)


def shape_batch(
    batch: int, resolution: int, seed: int, index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of the endless source-task stream of ``seed``.

    Labels are balanced in expectation (uniform draws). A pure function of
    its arguments: the same ``(seed, index)`` always gives the same batch.

    Returns
    -------
    tuple of torch.Tensor
        ``uint8`` images ``(batch, 3, R, R)`` and ``int64`` labels ``(batch,)``.
    """
    rng = np.random.default_rng([seed, index, 0x5A])
    labels = rng.integers(0, len(SHAPE_CLASSES), size=batch)
    images = render_shapes(labels, resolution, rng)
    return _to_uint8(torch.from_numpy(images)), torch.from_numpy(labels)


def shapes(n: int, resolution: int, seed: int) -> ImageData:
    """``n`` source-task samples (rendered in batches of 256 of the ``seed`` stream).

    Parameters
    ----------
    n : int
        Number of samples.
    resolution : int
        Side in pixels.
    seed : int
        Chooses the stream (use different seeds for training and held-out data).
    """
    parts = [
        shape_batch(min(256, n - start), resolution, seed, start // 256)
        for start in range(0, n, 256)
    ]
    images = (
        torch.cat([p[0] for p in parts])
        if parts
        else torch.empty(0, 3, resolution, resolution, dtype=torch.uint8)
    )
    labels = torch.cat([p[1] for p in parts]) if parts else torch.empty(0, dtype=torch.int64)
    return ImageData(images, labels, SHAPE_CLASSES, f"procedural shapes (seed {seed})")


# ---------------------------------------------------------------------------
# Splits and batches
# ---------------------------------------------------------------------------


def split(data: ImageData, test_fraction: float, seed: int) -> tuple[ImageData, ImageData]:
    """Stratified train/test split: each class contributes ``round(test_fraction * count)``.

    Parameters
    ----------
    data : ImageData
        The samples.
    test_fraction : float
        In (0, 1).
    seed : int
        Seeds the permutation inside each class.

    Raises
    ------
    ValueError
        On a fraction outside (0, 1), or a split that leaves a class without
        a training sample or the test split empty.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng([seed, 0x7E57])
    labels = data.labels.numpy()
    train, test = [], []
    for label in range(data.num_classes):
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(idx.size)]
        k = round(test_fraction * idx.size)
        if idx.size and k == idx.size:
            k -= 1  # keep at least one training sample per class
        test.append(idx[:k])
        train.append(idx[k:])
    test_idx = np.sort(np.concatenate(test))
    if test_idx.size == 0:
        raise ValueError(
            f"a test fraction of {test_fraction} leaves no test sample in {len(data)} samples"
        )
    return data.take(np.sort(np.concatenate(train))), data.take(test_idx)


def subsample(data: ImageData, n: int | None, seed: int) -> ImageData:
    """At most ``n`` samples, stratified (each class keeps its share), seeded.

    ``None`` or ``n >= len(data)`` returns ``data`` unchanged.
    """
    if n is None or n >= len(data):
        return data
    if n < data.num_classes:
        raise ValueError(
            f"cannot keep {n} samples of {data.num_classes} classes; need at least one each"
        )
    rng = np.random.default_rng([seed, 0x5B5])
    labels = data.labels.numpy()
    counts = np.bincount(labels, minlength=data.num_classes)
    # Largest-remainder apportionment with at least one per present class.
    share = counts * n / counts.sum()
    keep = np.maximum(np.floor(share).astype(np.int64), (counts > 0).astype(np.int64))
    for k in np.argsort(-(share - np.floor(share)), kind="stable"):
        if keep.sum() >= n:
            break
        if keep[k] < counts[k]:
            keep[k] += 1
    chosen = []
    for label in range(data.num_classes):
        idx = np.flatnonzero(labels == label)
        chosen.append(idx[rng.permutation(idx.size)[: keep[label]]])
    return data.take(np.sort(np.concatenate(chosen)))


def batch_indices(
    n: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = True,
    rank: int = 0,
    world: int = 1,
) -> list[torch.Tensor]:
    """Indices of one epoch's batches for process ``rank`` of ``world``.

    Every process draws the same permutation (seeded by ``seed`` and
    ``epoch``) and takes every ``world``-th sample from ``rank`` on, so the
    processes see disjoint shards; the batch count is the same on every
    process (DistributedDataParallel needs equal step counts).

    Returns
    -------
    list of torch.Tensor
        ``int64`` index tensors of ``batch_size`` (the last may be smaller
        when ``drop_last`` is False).
    """
    if shuffle:
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        )
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    per_rank = n // world if world > 1 else n
    shard = order[rank::world][:per_rank]
    count = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
    return [shard[i * batch_size : (i + 1) * batch_size] for i in range(count)]


# ---------------------------------------------------------------------------
# User data: an image folder or an .npz
# ---------------------------------------------------------------------------


def _label_map(raw: np.ndarray, where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Arbitrary labels to ``0..K-1`` (sorted unique values), refusing fewer than 2 classes."""
    if raw.ndim != 1:
        raise ValueError(f"{where}: labels must be 1-D, got shape {raw.shape}")
    if raw.dtype.kind not in "iuUSO" and not (
        raw.dtype.kind == "f" and np.all(raw == np.round(raw))
    ):
        raise ValueError(f"{where}: labels must be integers or strings, got dtype {raw.dtype}")
    values, codes = np.unique(raw, return_inverse=True)
    if values.size < 2:
        raise ValueError(f"{where}: needs at least 2 classes, found {values.size}")
    names = tuple(str(int(v)) if raw.dtype.kind == "f" else str(v) for v in values)
    return codes.astype(np.int64), names


def _array_images(x: np.ndarray, where: str) -> torch.Tensor:
    """An image array as float ``(N, C, H, W)`` in [0, 1].

    Accepts ``(N, H, W)``, channels-last ``(N, H, W, C)`` and channels-first
    ``(N, C, H, W)`` with C in {1, 3} (4 channels-last: RGBA); ``uint8`` (or
    any integer type within 0..255) as 0..255, floats as [0, 1] (rescaled by
    the data's range when outside it).
    """
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3):
            x = np.moveaxis(x, -1, 1)
        elif x.shape[1] not in (1, 3):
            raise ValueError(
                f"{where}: x of shape {x.shape} is neither (N, H, W, C) nor (N, C, H, W) "
                "with 1, 3 (or channels-last 4) channels"
            )
    else:
        raise ValueError(
            f"{where}: x must be (N, H, W) or (N, H, W, C) images, got shape {x.shape}"
        )
    if x.shape[0] == 0 or min(x.shape[2:]) < 1:
        raise ValueError(f"{where}: x is empty (shape {x.shape})")
    if x.dtype.kind in "iu":
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{where}: integer images must be within 0..255, got {lo}..{hi}")
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)).float().div_(255.0)
    elif x.dtype.kind == "f":
        xf = np.asarray(x, dtype=np.float32)
        if not np.all(np.isfinite(xf)):
            raise ValueError(f"{where}: x holds NaN or Inf")
        low, high = float(xf.min()), float(xf.max())
        if low < 0.0 or high > 1.0:
            span = high - low
            xf = ((xf - low) / span).astype(np.float32) if span > 0 else np.zeros_like(xf)
        t = torch.from_numpy(np.ascontiguousarray(xf))
    else:
        raise ValueError(f"{where}: x must hold numbers, got dtype {x.dtype}")
    if x.shape[-1] != x.shape[-2]:
        # Centre-crop to a square so the resize keeps the aspect ratio.
        h, w = t.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        t = t[..., top : top + side, left : left + side]
    return t


def _load_npz(path: Path, resolution: int) -> tuple[ImageData, ImageData | None]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz archive ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        archive_type = type(archive).__name__
        raise ValueError(
            f"{path}: expected an .npz archive with arrays x and y, got a {archive_type}"
        )
    with archive:
        keys = set(archive.files)
        missing = [k for k in ("x", "y") if k not in keys]
        if missing:
            raise ValueError(
                f"{path}: the .npz needs arrays 'x' (images) and 'y' (labels); missing "
                f"{missing}, found {sorted(keys)}"
            )
        has_test = "x_test" in keys or "y_test" in keys
        if has_test and not {"x_test", "y_test"} <= keys:
            raise ValueError(f"{path}: give both 'x_test' and 'y_test', or neither")
        try:
            arrays = {
                k: archive[k] for k in (("x", "y", "x_test", "y_test") if has_test else ("x", "y"))
            }
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: could not read its arrays ({err})") from err
    pairs = [("x", "y")] + ([("x_test", "y_test")] if has_test else [])
    for xk, yk in pairs:
        if arrays[yk].ndim != 1 or arrays[xk].shape[:1] != arrays[yk].shape:
            raise ValueError(
                f"{path}: {xk} has {arrays[xk].shape[0] if arrays[xk].ndim else 0} samples but "
                f"{yk} has shape {arrays[yk].shape}; expected one label per image"
            )
    y_all = np.concatenate([arrays["y"], arrays["y_test"]]) if has_test else arrays["y"]
    codes, names = _label_map(y_all, str(path))
    n_train = arrays["y"].shape[0]
    train = ImageData(
        _resize(_array_images(arrays["x"], f"{path} (x)"), resolution),
        torch.from_numpy(codes[:n_train]),
        names,
        str(path),
    )
    if not has_test:
        return train, None
    test = ImageData(
        _resize(_array_images(arrays["x_test"], f"{path} (x_test)"), resolution),
        torch.from_numpy(codes[n_train:]),
        names,
        str(path),
    )
    return train, test


def _load_folder(path: Path, resolution: int) -> ImageData:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(
            f
            for f in (path / name).rglob("*")
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
        )
        if not found:
            kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise ValueError(f"{path}: class folder {name!r} holds no image ({kinds})")
        files += [(f, label) for f in found]
    if len(classes) < 2:
        raise ValueError(
            f"{path}: an image folder needs one subfolder per class and at least 2 classes, "
            f"found {len(classes)}"
        )
    images = torch.empty((len(files), 3, resolution, resolution), dtype=torch.uint8)
    for i, (f, _) in enumerate(files):
        try:
            with Image.open(f) as im:
                rgb = im.convert("RGB")
                side = min(rgb.size)
                left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
                rgb = rgb.crop((left, top, left + side, top + side)).resize(
                    (resolution, resolution), Image.Resampling.BILINEAR, reducing_gap=None
                )
                arr = np.asarray(rgb, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(f"{f}: not a readable image ({err})") from err
        images[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageData(images, labels, tuple(classes), str(path))


def load_data(path: str | os.PathLike[str], resolution: int) -> tuple[ImageData, ImageData | None]:
    """Read user data: an image folder or an ``.npz``.

    Parameters
    ----------
    path : str or os.PathLike
        - a folder with one subfolder per class (at least 2), each holding
          images PIL can read (:data:`IMAGE_EXTENSIONS`, searched recursively);
          images are centre-cropped to a square and resized;
        - or an ``.npz`` with ``x`` (``(N, H, W)``, ``(N, H, W, C)`` or
          ``(N, C, H, W)``; ``uint8`` 0..255 or floats in [0, 1]) and ``y``
          (``(N,)`` integer or string labels), and optionally ``x_test`` and
          ``y_test``, a ready-made test split.
    resolution : int
        Side the images are resized to.

    Returns
    -------
    tuple
        ``(data, test)``; ``test`` is None unless the ``.npz`` provides it.

    Raises
    ------
    OSError
        If ``path`` does not exist.
    ValueError
        On anything malformed (the message names the file and what was expected).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path {str(p)!r} does not exist")
    if p.is_dir():
        return _load_folder(p, resolution), None
    if p.suffix.lower() == ".npz" or zipfile.is_zipfile(p):
        return _load_npz(p, resolution)
    raise ValueError(f"{p}: expected an image folder (one subfolder per class) or an .npz file")


def iterate(
    data: ImageData, index: Sequence[torch.Tensor]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` of each index tensor, in order."""
    for idx in index:
        yield data.images[idx], data.labels[idx]
