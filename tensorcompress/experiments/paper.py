"""The paper's own formulas and figures (ICML 2025, Nguyen et al., Table of ImageNet results).

Everything here reproduces one paper, so it is experiment code, not part of
the adapter; the adapter measures and counts (:mod:`tensorcompress.torch.measure`,
:mod:`tensorcompress.torch.flops`).

- :data:`PAPER_TABLE`: every row of the paper's ImageNet table (accuracy, Mem,
  GFLOPs), :func:`paper_figure` looks one up, :data:`PAPER_METHODS` are its
  methods in its order.
- :func:`paper_layer_flops`: the formulas behind the paper's GFLOPs column
  (from the authors' code): per fine-tuned conv, in **multiply-accumulates**
  (not 2 flops per MAC), for the fine-tuned convs only (no frozen forward, no
  BatchNorm or classifier), ignoring groups (a depthwise conv is charged as a
  dense one) and, in most terms, stride (the forward is charged at the *input*
  resolution). They reproduce every vanilla and gradient-filter GFLOPs figure
  of the paper's table, e.g. 29.60 for the last two convs of ResNet18
  (``2 * 2 * 64*7*7*512*512*9`` MACs). HOSVD's forward charges a full SVD of
  every unfolding, ``max(n, q)**2 * min(n, q)``; the HOSVD implemented here
  uses the Gram matrix and ``eigh`` (much cheaper), which the counted figure
  (:func:`tensorcompress.torch.flops.training_step_flops`) shows.
- :func:`paper_flops` and :func:`paper_mem_bytes`: those formulas, and the
  paper's Mem convention (the inputs the fine-tuned convs keep, by
  :func:`tensorcompress.torch.measure.analytic_bytes`), summed over convs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tensorcompress.torch.measure import analytic_bytes
from tensorcompress.torch.modules import METHODS

__all__ = [
    "PAPER_METHODS",
    "PAPER_TABLE",
    "PATCH",
    "ConvShape",
    "PaperFigure",
    "PaperFlops",
    "paper_figure",
    "paper_flops",
    "paper_layer_flops",
    "paper_mem_bytes",
]

PATCH = 2
"""Gradient-filter patch size of the paper's table (R2)."""


# ---------------------------------------------------------------------------
# The paper's figures (specs/paper-table.md)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperFigure:
    """One row of the paper's ImageNet table (batch 64, 224x224, float32).

    Attributes
    ----------
    model : str
        A :data:`tensorcompress.models.MODEL_NAMES` name.
    method : str
        One of :data:`PAPER_METHODS` (HOSVD at explained variance 0.8,
        gradient filter with R = 2).
    layers : int or None
        Number of fine-tuned convs; ``None`` for "all".
    accuracy : float
        Top-1 ImageNet accuracy (%).
    mem_mb : float
        Activation memory in MB (2**20 bytes).
    gflops : float
        The paper's training-cost estimate (its own formulas, in GMACs).
    """

    model: str
    method: str
    layers: int | None
    accuracy: float
    mem_mb: float
    gflops: float


def _rows(model: str, *rows: tuple[str, int | None, float, float, float]) -> list[PaperFigure]:
    return [PaperFigure(model, *row) for row in rows]


PAPER_TABLE: tuple[PaperFigure, ...] = tuple(
    _rows(
        "resnet18",
        ("vanilla", None, 72.8, 532.88, 291.79),
        ("vanilla", 2, 69.9, 12.25, 29.60),
        ("gradient_filter", 2, 68.7, 4.00, 29.60),
        ("gradient_filter", 4, 69.3, 7.00, 47.70),
        ("hosvd", 2, 69.2, 0.97, 1581.42),
        ("hosvd", 4, 70.5, 2.89, 4048.56),
        ("asi", 2, 68.9, 0.93, 19.04),
        ("asi", 4, 70.6, 2.63, 33.14),
    )
    + _rows(
        "resnet34",
        # Mem 839.04 for "all" is the only figure of the table the architecture
        # does not give: its 36 conv inputs hold 839.125 MB.
        ("vanilla", None, 75.6, 839.04, 528.55),
        ("vanilla", 2, 69.6, 12.25, 29.60),
        ("vanilla", 4, 72.2, 24.50, 59.19),
        ("gradient_filter", 2, 68.8, 4.00, 29.60),
        ("gradient_filter", 4, 70.9, 8.00, 59.21),
        ("hosvd", 2, 68.7, 0.30, 1579.64),
        ("hosvd", 4, 71.1, 1.11, 3160.46),
        ("asi", 2, 68.3, 0.25, 16.44),
        ("asi", 4, 71.1, 1.09, 35.31),
    )
    + _rows(
        "mobilenet_v2",
        ("vanilla", None, 74.0, 1651.84, 830.82),
        ("vanilla", 2, 62.6, 15.31, 4.50),
        ("gradient_filter", 2, 62.6, 5.00, 4.50),
        ("gradient_filter", 4, 65.2, 9.38, 57.50),
        ("hosvd", 2, 61.1, 0.15, 3049.71),
        ("hosvd", 4, 63.9, 0.73, 5895.31),
        ("asi", 2, 60.3, 0.13, 2.81),
        ("asi", 4, 64.0, 0.71, 31.54),
    )
    + _rows(
        "mcunet_in1",
        ("vanilla", None, 67.4, 632.98, 248.84),
        ("vanilla", 2, 62.1, 13.78, 19.31),
        ("vanilla", 4, 64.7, 19.52, 19.88),
        ("gradient_filter", 2, 61.8, 4.50, 19.31),
        ("gradient_filter", 4, 64.4, 6.38, 19.89),
        ("hosvd", 2, 61.7, 0.48, 1988.05),
        ("hosvd", 4, 63.9, 0.88, 2457.59),
        ("asi", 2, 61.7, 0.38, 11.01),
        ("asi", 4, 63.5, 0.83, 11.93),
    )
)
"""Every row of the paper's ImageNet table (``layers=None`` is "all")."""

PAPER_METHODS: tuple[str, ...] = tuple(dict.fromkeys(f.method for f in PAPER_TABLE))
"""The methods of the paper's table, in its order: a subset of
:data:`tensorcompress.torch.modules.METHODS` (the table has no SVD row)."""

if not set(PAPER_METHODS) <= set(METHODS):  # pragma: no cover - a typo in the table above
    raise ImportError(f"PAPER_TABLE names methods outside {METHODS}: {PAPER_METHODS}")


def paper_figure(model: str, method: str, layers: int | None) -> PaperFigure | None:
    """The paper's row for ``(model, method, layers)``, or ``None`` if it has none.

    Parameters
    ----------
    model : str
        A :data:`tensorcompress.models.MODEL_NAMES` name.
    method : str
        A method name.
    layers : int or None
        Number of fine-tuned convs; ``None`` for "all".

    Returns
    -------
    PaperFigure or None
    """
    for fig in PAPER_TABLE:
        if (fig.model, fig.method, fig.layers) == (model, method, layers):
            return fig
    return None


# ---------------------------------------------------------------------------
# The paper's cost formulas
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperFlops:
    """A fine-tuned conv's training cost by the paper's formulas, in MACs.

    Attributes
    ----------
    forward : float
        Forward MACs (the conv, plus compression overhead).
    backward : float
        Backward MACs.
    """

    forward: float
    backward: float

    @property
    def total(self) -> float:
        """``forward + backward`` MACs."""
        return self.forward + self.backward

    @property
    def gflops(self) -> float:
        """``total / 1e9``: what the paper's table prints as GFLOPs."""
        return self.total / 1e9

    def __add__(self, other: PaperFlops) -> PaperFlops:
        return PaperFlops(self.forward + other.forward, self.backward + other.backward)


def _four(shape: Sequence[int], name: str) -> tuple[int, int, int, int]:
    if len(shape) != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got {tuple(shape)}")
    b, c, h, w = (int(s) for s in shape)
    return b, c, h, w


def _check_method(method: str) -> None:
    if method not in PAPER_METHODS:
        raise ValueError(f"method must be one of the paper's {PAPER_METHODS}, got {method!r}")


def paper_layer_flops(
    method: str,
    input_shape: Sequence[int],
    output_shape: Sequence[int],
    kernel_size: Sequence[int],
    *,
    ranks: Sequence[int] | None = None,
    patch: int = PATCH,
) -> PaperFlops:
    """One fine-tuned Conv2d's training MACs by the paper's (authors' code) formulas.

    With input ``(B, C, H, W)``, output ``(B, C', H', W')``, kernel
    ``K_H x K_W`` and, for the Tucker methods, ranks ``(K0, K1, K2, K3)``:

    - vanilla: forward ``K_H K_W C' C H W B``, backward ``K_H K_W C C' H' W' B``;
    - gradient_filter (patch ``R``): forward
      ``(H/R)(W/R)(R**2 - 1) C B + K_H K_W C C' B H W``, backward
      ``2 B C' (H'/R)(W'/R) + C' C (K_H K_W - 1) + K_H K_W C C' B H W``;
    - asi: forward ``sum_k (2 B C H W K_k + K_k**3)`` plus vanilla's; backward
      ``K0 C' H' W' B + H K0 K1 K2 K3 + H W K0 K1 K3 + C' K0 K1 K_H K_W H' W'
      + C' C K_H K_W K1``;
    - hosvd: forward ``sum_k max(n_k, q_k)**2 min(n_k, q_k)`` (a full SVD of
      every mode-``k`` unfolding, ``n_k x q_k``) plus vanilla's; backward as asi.

    Groups are ignored (a depthwise conv costs as much as a dense one) and the
    forward is charged at the input resolution whatever the stride; these are
    the paper's figures, not the ops that run (see
    :func:`tensorcompress.torch.flops.training_step_flops` for those).

    Parameters
    ----------
    method : str
        One of :data:`PAPER_METHODS`.
    input_shape, output_shape : sequence of int
        ``(B, C, H, W)`` and ``(B, C', H', W')``.
    kernel_size : sequence of int
        ``(K_H, K_W)``.
    ranks : sequence of int, optional
        Tucker ranks ``(K0, K1, K2, K3)`` (``asi`` and ``hosvd``).
    patch : int, default 2
        Gradient filter patch ``R``.

    Returns
    -------
    PaperFlops
        MACs; ``.gflops`` is the paper's unit.

    Examples
    --------
    >>> layer = paper_layer_flops("vanilla", (64, 512, 7, 7), (64, 512, 7, 7), (3, 3))
    >>> round(2 * layer.gflops, 2)  # ResNet18, last 2 convs: the paper's 29.60
    29.6
    """
    _check_method(method)
    b, c, h, w = _four(input_shape, "input_shape")
    _, c2, h2, w2 = _four(output_shape, "output_shape")
    kh, kw = (int(k) for k in kernel_size)
    conv = kh * kw * c2 * c * h * w * b
    if method == "vanilla":
        return PaperFlops(conv, kh * kw * c * c2 * h2 * w2 * b)
    if method == "gradient_filter":
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise ValueError(f"patch must be a positive int, got {patch!r}")
        r = patch
        forward = (h / r) * (w / r) * (r**2 - 1) * c * b + conv
        backward = 2 * b * c2 * (h2 / r) * (w2 / r) + c2 * c * (kh * kw - 1) + conv
        return PaperFlops(forward, backward)
    # The Tucker methods (asi, hosvd).
    if ranks is None or len(ranks) != 4:
        raise ValueError(f"method={method!r} needs four ranks (K0, K1, K2, K3), got {ranks!r}")
    k0, k1, k2, k3 = (int(k) for k in ranks)
    backward = (
        k0 * c2 * h2 * w2 * b
        + h * k0 * k1 * k2 * k3
        + h * w * k0 * k1 * k3
        + c2 * k0 * k1 * kh * kw * h2 * w2
        + c2 * c * kh * kw * k1
    )
    if method == "asi":
        overhead = sum(2 * b * c * h * w * k + k**3 for k in (k0, k1, k2, k3))
    else:
        size = b * c * h * w
        overhead = sum(max(n, size // n) ** 2 * min(n, size // n) for n in (b, c, h, w))
    return PaperFlops(overhead + conv, backward)


# ---------------------------------------------------------------------------
# Summed over the fine-tuned convs
# ---------------------------------------------------------------------------


class ConvShape(Protocol):
    """What the sums need of a conv: its shapes at a batch size and its kernel.

    :class:`tensorcompress.experiments.table.ConvCall` is one.
    """

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """``(K_H, K_W)``."""
        ...

    def input_at(self, batch: int) -> tuple[int, ...]:
        """Input shape ``(B, C, H, W)`` at batch size ``batch``."""
        ...

    def output_at(self, batch: int) -> tuple[int, ...]:
        """Output shape ``(B, C', H', W')`` at batch size ``batch``."""
        ...


def _per_conv_ranks(
    convs: Sequence[ConvShape], method: str, ranks: Sequence[Sequence[int]] | None
) -> list[Sequence[int] | None]:
    _check_method(method)
    if method in ("hosvd", "asi"):
        if ranks is None or len(ranks) != len(convs):
            raise ValueError(f"method={method!r} needs one rank tuple per conv, got {ranks!r}")
        return list(ranks)
    return [None] * len(convs)


def paper_mem_bytes(
    convs: Sequence[ConvShape],
    method: str,
    batch: int,
    *,
    ranks: Sequence[Sequence[int]] | None = None,
    patch: int = PATCH,
    itemsize: int = 4,
) -> int:
    """Analytic Mem of the given convs (the paper's convention) at batch ``batch``.

    Parameters
    ----------
    convs : sequence of ConvShape
        The fine-tuned convs (e.g. ``probe_convs(model, 224)[-n:]``).
    method : str
        One of :data:`PAPER_METHODS`.
    batch : int
        Batch size.
    ranks : sequence of sequence of int, optional
        Tucker ranks per conv (``hosvd``, ``asi``).
    patch : int, default 2
        Gradient filter patch ``R``.
    itemsize : int, default 4
        Bytes per element (float32).

    Returns
    -------
    int
        Bytes, by :func:`tensorcompress.torch.measure.analytic_bytes`.
    """
    per_conv = _per_conv_ranks(convs, method, ranks)
    return sum(
        analytic_bytes(
            method,
            call.input_at(batch),
            itemsize=itemsize,
            ranks=r,
            output_shape=call.output_at(batch),
            patch=patch,
        )
        for call, r in zip(convs, per_conv)
    )


def paper_flops(
    convs: Sequence[ConvShape],
    method: str,
    batch: int,
    *,
    ranks: Sequence[Sequence[int]] | None = None,
    patch: int = PATCH,
) -> PaperFlops:
    """The paper's training-cost estimate (MACs) of fine-tuning ``convs`` at batch ``batch``.

    The sum of :func:`paper_layer_flops` over the convs: the figure the paper
    prints as GFLOPs is ``.gflops``.

    Parameters
    ----------
    convs : sequence of ConvShape
        The fine-tuned convs.
    method : str
        One of :data:`PAPER_METHODS`.
    batch : int
        Batch size.
    ranks : sequence of sequence of int, optional
        Tucker ranks per conv (``hosvd``, ``asi``).
    patch : int, default 2
        Gradient filter patch ``R``.

    Returns
    -------
    PaperFlops
    """
    total = PaperFlops(0.0, 0.0)
    for call, r in zip(convs, _per_conv_ranks(convs, method, ranks)):
        total = total + paper_layer_flops(
            method,
            call.input_at(batch),
            call.output_at(batch),
            call.kernel_size,
            ranks=r,
            patch=patch,
        )
    return total
