"""FLOPs of one training step, counted.

:func:`training_step_flops` runs one forward and one backward of the model
under :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the ops
that really execute (2 flops per multiply-accumulate): convolutions and their
backward, matrix products (``mm``, ``bmm``, ``addmm``, ...) and attention.
Elementwise ops, normalisation, pooling and reductions are not counted (the
counter's convention, and a negligible share for these networks). Layers
frozen below the first trainable one get no backward at all, and the first
trainable conv computes no input gradient, because autograd does not run what
nothing needs; the counter sees exactly that.

The decompositions run inside the compressed layers' forward: the counter sees
their matrix products but has no formula for ``linalg_qr``, ``_linalg_eigh``
and ``_linalg_svd``, so it would score them as zero. :data:`LINALG_FLOPS` adds
the textbook Householder-based counts (Golub & Van Loan, *Matrix
Computations*, 4th ed., §5.2, §8.3 and Fig. 8.6.1), stated in the functions
:func:`qr_flops`, :func:`eigh_flops` and :func:`svd_flops`, and for the
Cholesky QR of the WSI/WASI refresh :func:`cholesky_flops` and
:func:`triangular_solve_flops` (§4.2, §3.1). LAPACK's actual
algorithms (blocked, divide and conquer) differ by constant factors; the
figures are the usual estimates, not cycle counts. One correction to the
counter itself: torch's ``convolution_backward`` formula charges a grouped
conv's weight gradient as a dense one (``groups`` times too much, 576x on a
576-channel depthwise conv); :data:`COUNTER_FLOPS` counts it with its groups.

Training cost = forward (network ops) + decomposition (counted inside the
compressed layers' forward, minus the layer's own conv/linear) + backward.
What is counted is what executes: where the core trades multiply-adds for
well-shaped products (one Gram matrix of the small spatial modes together,
products widened by an identity Kronecker factor; see
:mod:`tensorcompress.tenalg`), the count includes them.

The paper's own hand formulas (multiply-accumulates of the fine-tuned convs
only, groups and stride ignored) reproduce one paper's table; they live with
the experiments, in :mod:`tensorcompress.experiments.paper`, and are never
mixed with the counted figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tensorcompress.torch.modules import CompressedModule
from tensorcompress.torch.selection import call_model
from tensorcompress.torch.state import preserved_training_state

__all__ = [
    "COUNTER_FLOPS",
    "LINALG_FLOPS",
    "StepFlops",
    "cholesky_flops",
    "eigh_flops",
    "layer_op_flops",
    "qr_flops",
    "svd_flops",
    "training_step_flops",
    "triangular_solve_flops",
]

aten = torch.ops.aten


# ---------------------------------------------------------------------------
# Factorisation formulas (flops: one multiply or one add each)
# ---------------------------------------------------------------------------


def _dims(m: int, n: int, name: str) -> tuple[int, int]:
    if m < 0 or n < 0:
        raise ValueError(f"{name} needs non-negative matrix sizes, got {m} x {n}")
    return int(m), int(n)


def qr_flops(m: int, n: int, mode: str = "reduced") -> int:
    """Flops of a Householder QR of an ``m x n`` matrix (``torch.linalg.qr``).

    With ``k = min(m, n)`` reflectors, reflector ``j`` updates an
    ``(m - j) x (n - j)`` block at 4 flops per entry:

    - ``R``: ``4mnk - 2(m + n)k**2 + 4k**3/3`` (``2mn**2 - 2n**3/3`` for ``m >= n``);
    - thin ``Q`` (``mode="reduced"``), accumulated backwards:
      ``4mk**2 - 2(m + k)k**2 + 4k**3/3`` more (``2mn**2 - 2n**3/3`` again);
    - full ``Q`` (``mode="complete"``): ``4(m**2 k - m k**2 + k**3/3)`` more;
    - ``mode="r"``: ``R`` only.

    Parameters
    ----------
    m, n : int
        Rows and columns.
    mode : {"reduced", "complete", "r"}
        As in ``torch.linalg.qr``.

    Returns
    -------
    int
        Flops, rounded to the nearest integer.
    """
    m, n = _dims(m, n, "qr_flops")
    k = min(m, n)
    r = 4 * m * n * k - 2 * (m + n) * k**2 + 4 * k**3 / 3
    if mode == "r":
        q = 0.0
    elif mode == "reduced":
        q = 4 * m * k**2 - 2 * (m + k) * k**2 + 4 * k**3 / 3
    elif mode == "complete":
        q = 4 * (m**2 * k - m * k**2 + k**3 / 3)
    else:
        raise ValueError(f"mode must be 'reduced', 'complete' or 'r', got {mode!r}")
    return round(r + q)


def eigh_flops(n: int, compute_v: bool = True) -> int:
    """Flops of a symmetric eigendecomposition of an ``n x n`` matrix.

    Golub & Van Loan §8.3 (symmetric QR algorithm): about ``4n**3/3`` for
    the eigenvalues (tridiagonalisation dominates), about ``9n**3`` with the
    eigenvectors accumulated.
    """
    n, _ = _dims(n, n, "eigh_flops")
    return 9 * n**3 if compute_v else round(4 * n**3 / 3)


def svd_flops(m: int, n: int, full_matrices: bool = False, compute_uv: bool = True) -> int:
    """Flops of an SVD of an ``m x n`` matrix (``torch.linalg.svd``).

    Golub & Van Loan Fig. 8.6.1, with ``m >= n`` (a wide matrix is counted as
    its transpose), taking the cheaper of Golub-Reinsch and R-SVD (QR first,
    which LAPACK also switches to for tall matrices):

    - singular values only: ``min(4mn**2 - 4n**3/3, 2mn**2 + 2n**3)``;
    - thin ``U``, ``S``, ``V`` (``full_matrices=False``):
      ``min(14mn**2 + 8n**3, 6mn**2 + 20n**3)``;
    - full ``U`` (``full_matrices=True``):
      ``min(4m**2 n + 8mn**2 + 9n**3, 4m**2 n + 22n**3)``.
    """
    m, n = _dims(m, n, "svd_flops")
    m, n = max(m, n), min(m, n)
    if not compute_uv:
        value = min(4 * m * n**2 - 4 * n**3 / 3, 2 * m * n**2 + 2 * n**3)
    elif full_matrices:
        value = min(4 * m**2 * n + 8 * m * n**2 + 9 * n**3, 4 * m**2 * n + 22 * n**3)
    else:
        value = min(14 * m * n**2 + 8 * n**3, 6 * m * n**2 + 20 * n**3)
    return round(value)


def cholesky_flops(n: int) -> int:
    """Flops of a Cholesky factorisation of an ``n x n`` matrix: ``n**3/3``.

    Golub & Van Loan §4.2 (Algorithm 4.2.2).
    """
    n, _ = _dims(n, n, "cholesky_flops")
    return round(n**3 / 3)


def triangular_solve_flops(n: int, rhs: int) -> int:
    """Flops of an ``n x n`` triangular solve for ``rhs`` right-hand sides: ``rhs n**2``."""
    n, rhs = _dims(n, rhs, "triangular_solve_flops")
    return rhs * n**2


# FlopCounterMode formulas receive the ops' arguments with tensors replaced by
# their shapes, and out_shape; leading dims of a matrix argument are a batch.


def _qr_formula(a: Sequence[int], mode: str = "reduced", *, out_shape: Any = None) -> int:
    *batch, m, n = a
    return math.prod(batch) * qr_flops(m, n, mode)


def _eigh_formula(
    a: Sequence[int], uplo: str = "L", compute_v: bool = True, *, out_shape: Any = None
) -> int:
    *batch, n, _ = a
    return math.prod(batch) * eigh_flops(n, compute_v)


def _svd_formula(
    a: Sequence[int],
    full_matrices: bool = False,
    compute_uv: bool = True,
    *,
    driver: str | None = None,
    out_shape: Any = None,
) -> int:
    *batch, m, n = a
    return math.prod(batch) * svd_flops(m, n, full_matrices, compute_uv)


def _cholesky_formula(
    a: Sequence[int], upper: bool = False, check_errors: bool = False, *, out_shape: Any = None
) -> int:
    *batch, n, _ = a
    return math.prod(batch) * cholesky_flops(n)


def _solve_triangular_formula(
    a: Sequence[int],
    b: Sequence[int],
    *,
    upper: bool,
    left: bool = True,
    unitriangular: bool = False,
    out_shape: Any = None,
) -> int:
    n = a[-1]
    rhs = b[-1] if left else b[-2]
    return math.prod(out_shape[:-2]) * triangular_solve_flops(n, rhs)


LINALG_FLOPS: dict[Any, Callable[..., int]] = {
    aten.linalg_qr: _qr_formula,
    aten.linalg_cholesky_ex: _cholesky_formula,
    aten.linalg_solve_triangular: _solve_triangular_formula,
    aten._linalg_eigh: _eigh_formula,
    aten._linalg_svd: _svd_formula,
}
"""``custom_mapping`` for :class:`~torch.utils.flop_counter.FlopCounterMode`:
the factorisations the decompositions call (``torch.linalg.qr``, ``eigh``,
``eigvalsh``, ``svd`` and ``svdvals`` dispatch to three of these ops), and
the Cholesky QR of the WSI/WASI refresh (``cholesky_ex``, ``solve_triangular``). Each op is
charged for what its arguments ask; note that under any Python dispatch mode
(the counter is one) torch computes the vectors of ``eigvalsh`` and
``svdvals`` too, in case a tensor subclass needs their gradient, so those are
charged as ``eigh`` and ``svd``, as they ran."""


def _conv_backward_formula(
    grad_out: Sequence[int],
    x: Sequence[int],
    w: Sequence[int],
    bias: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    transposed: bool,
    output_padding: Any,
    groups: int,
    output_mask: Sequence[bool],
    *,
    out_shape: Any = None,
) -> int:
    # Each weight element meets every image and every position of the direct
    # conv's output (the forward's output, or a transposed conv's input) once,
    # for the input gradient and again for the weight gradient.
    spatial = x[2:] if transposed else grad_out[2:]
    macs = math.prod(w) * int(x[0]) * math.prod(spatial)
    return 2 * macs * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _addmm_formula(
    self_shape: Sequence[int], a: Sequence[int], b: Sequence[int], *args: Any, **kwargs: Any
) -> int:
    # ``self += a @ b``: one multiply-accumulate per product term, as ``addmm``.
    return 2 * int(a[0]) * int(a[1]) * int(b[1])


COUNTER_FLOPS: dict[Any, Callable[..., int]] = {
    **LINALG_FLOPS,
    aten.convolution_backward: _conv_backward_formula,
    aten.addmm_: _addmm_formula,
}
"""The ``custom_mapping`` :func:`training_step_flops` uses: :data:`LINALG_FLOPS`
plus a ``convolution_backward`` formula that divides the weight gradient by
the groups. Torch's own (2.13) formula counts a grouped conv's weight gradient
as if it were dense, ``groups`` times too much: 576x for MCUNet's last
depthwise conv. Forward and input gradient are unchanged (torch counts those
with the groups). And the in-place ``addmm_``, which torch's counter scores
as zero: the chunked weight gradients accumulate with it (a fused MLP's
second Linear, WASI's factored Linear)."""


# ---------------------------------------------------------------------------
# Counting one training step
# ---------------------------------------------------------------------------


def layer_op_flops(
    module: nn.Module, input_shape: Sequence[int], output_shape: Sequence[int]
) -> int:
    """Flops the counter charges for a conv's or linear's own forward op.

    Conv: ``2 * B * C_out * prod(out_spatial) * (C_in / groups) * prod(kernel)``
    (groups and stride taken into account, bias ignored, as
    ``FlopCounterMode`` counts it). Linear: ``2 * numel(output) * in_features``.
    Any other module: 0.
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        c_out, c_in_per_group, *kernel = module.weight.shape
        return (
            2
            * int(output_shape[0])
            * int(c_out)
            * math.prod(int(s) for s in output_shape[2:])
            * int(c_in_per_group)
            * math.prod(int(k) for k in kernel)
        )
    if isinstance(module, nn.Linear):
        return 2 * math.prod(int(s) for s in output_shape) * int(module.in_features)
    return 0


@dataclass(frozen=True)
class StepFlops:
    """Counted flops of one training step (2 flops per multiply-accumulate).

    Attributes
    ----------
    forward : int
        The network's forward ops, the decompositions excluded.
    decomposition : int
        Everything the compressed layers computed in forward beyond their own
        conv/linear: the decompositions' matrix products and their
        QR/eigh/SVD (by :data:`LINALG_FLOPS`).
    backward : int
        The backward pass, as autograd ran it.
    linalg : int
        Part of ``decomposition + backward + forward`` scored by the
        factorisation formulas of :data:`LINALG_FLOPS` (QR, eigh, SVD, and the
        refresh's Cholesky and triangular solve; the counter alone would
        report 0 for it).
    forward_by_op, backward_by_op : tuple of (str, int)
        Counted flops per op, decompositions included in ``forward_by_op``.
    decomposition_by_layer : tuple of (str, int)
        ``decomposition`` split by compressed layer.
    """

    forward: int
    decomposition: int
    backward: int
    linalg: int = 0
    forward_by_op: tuple[tuple[str, int], ...] = ()
    backward_by_op: tuple[tuple[str, int], ...] = ()
    decomposition_by_layer: tuple[tuple[str, int], ...] = ()

    @property
    def total(self) -> int:
        """Training cost: ``forward + decomposition + backward``."""
        return self.forward + self.decomposition + self.backward

    @property
    def gflops(self) -> float:
        """``total`` in GFLOPs (10**9 flops)."""
        return self.total / 1e9

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (``total`` and GFLOPs included)."""
        return {
            "forward": self.forward,
            "decomposition": self.decomposition,
            "backward": self.backward,
            "linalg": self.linalg,
            "total": self.total,
            "gflops": self.gflops,
            "forward_by_op": dict(self.forward_by_op),
            "backward_by_op": dict(self.backward_by_op),
            "decomposition_by_layer": dict(self.decomposition_by_layer),
        }


class _DecompositionTracker:
    """Counter totals around every compressed layer's forward.

    Whatever the counter charged inside a compressed layer beyond the layer's
    own op is the layer's decomposition (a plain call charges exactly the op,
    so it comes out as 0).
    """

    def __init__(self, counter: FlopCounterMode, model: nn.Module) -> None:
        self.counter = counter
        self.by_layer: dict[str, int] = {}
        self._start: list[int] = []
        self._handles: list[Any] = []
        for name, module in model.named_modules():
            if isinstance(module, CompressedModule):
                self._handles.append(module.register_forward_pre_hook(self._pre))
                self._handles.append(
                    module.register_forward_hook(self._post_for(name), always_call=True)
                )

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._start.append(self.counter.get_total_flops())

    def _post_for(self, name: str) -> Callable[..., None]:
        def post(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            inside = self.counter.get_total_flops() - self._start.pop()
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if x is None or not isinstance(out, torch.Tensor):
                return
            extra = inside - layer_op_flops(module, tuple(x.shape), tuple(out.shape))
            if extra < 0:
                raise RuntimeError(
                    f"layer {name!r} was charged {inside} flops in forward, less than its own "
                    "op; the counter's conv/linear formula no longer matches layer_op_flops"
                )
            self.by_layer[name] = self.by_layer.get(name, 0) + extra

        return post

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _by_op(counter: FlopCounterMode) -> dict[str, int]:
    counts = counter.get_flop_counts().get("Global", {})
    return {str(op): int(v) for op, v in counts.items()}


def _linalg_part(counter: FlopCounterMode) -> int:
    counts = counter.get_flop_counts().get("Global", {})
    return sum(int(v) for op, v in counts.items() if op in LINALG_FLOPS)


def _default_loss(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the model returned a {type(out).__name__}; pass loss_fn to reduce it to a scalar"
        )
    return out.float().sum()


def training_step_flops(
    model: nn.Module,
    example_input: torch.Tensor | tuple[Any, ...] | Mapping[str, Any],
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> StepFlops:
    """Count the flops of one training step (forward, decomposition, backward).

    The model runs once in training mode (modes and buffers restored after;
    a compressed layer's own state, e.g. ASI's warm start, advances as on any
    step) under :class:`~torch.utils.flop_counter.FlopCounterMode` with
    :data:`COUNTER_FLOPS` (the factorisations, and grouped convs' weight
    gradients counted with their groups). The backward differentiates the loss with respect
    to the parameters that require grad (``torch.autograd.grad``, so no
    ``.grad`` is touched); frozen layers below the first trainable one get no
    backward, as in real fine-tuning.

    Parameters
    ----------
    model : nn.Module
        Converted (:func:`tensorcompress.torch.convert`) or plain. Freeze what
        should not train (``requires_grad_(False)``) beforehand.
    example_input : Tensor, tuple or dict
        The batch (a tuple is passed as positional arguments, a dict as
        keyword arguments).
    loss_fn : callable, optional
        ``loss_fn(output) -> scalar``; defaults to the output's sum (its own
        ops are elementwise and count 0 either way).

    Returns
    -------
    StepFlops

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    >>> step = training_step_flops(conv, torch.randn(2, 4, 5, 5))
    >>> macs = 2 * 8 * 5 * 5 * 4 * 9  # B * C_out * H * W * C_in * k * k
    >>> (step.forward, step.backward) == (2 * macs, 2 * macs)  # no input gradient needed
    True
    """
    loss_fn = _default_loss if loss_fn is None else loss_fn
    params = [p for p in model.parameters() if p.requires_grad]
    with preserved_training_state(model), torch.enable_grad():
        fwd = FlopCounterMode(display=False, custom_mapping=COUNTER_FLOPS)
        tracker = _DecompositionTracker(fwd, model)
        try:
            with fwd:
                out = call_model(model, example_input)
        finally:
            tracker.remove()
        loss = loss_fn(out)
        bwd = FlopCounterMode(display=False, custom_mapping=COUNTER_FLOPS)
        if params and loss.requires_grad:
            with bwd:
                torch.autograd.grad(loss, params, allow_unused=True)
        del out, loss
    decomposition = sum(tracker.by_layer.values())
    return StepFlops(
        forward=fwd.get_total_flops() - decomposition,
        decomposition=decomposition,
        backward=bwd.get_total_flops(),
        linalg=_linalg_part(fwd) + _linalg_part(bwd),
        forward_by_op=tuple(sorted(_by_op(fwd).items())),
        backward_by_op=tuple(sorted(_by_op(bwd).items())),
        decomposition_by_layer=tuple(tracker.by_layer.items()),
    )
