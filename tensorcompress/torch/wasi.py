"""Weight-Activation Subspace Iteration: training layers whose weights are factors.

WSI and WASI (Nguyen, Tartaglione and Nguyen, ICLR 2026) keep each trained
weight ``W`` (``out x in``) as ``L R`` with ``L`` (``out x k``) and ``R``
(``k x in``), ``k`` chosen from ``W``'s spectrum (an explained-variance
threshold, or an int), and compute ``y = (x R^T) L^T + b``. WASI also keeps
the layer's input as an ASI Tucker decomposition (as the ``"asi"`` method of
:mod:`tensorcompress.torch.modules` does) instead of the input itself.

What is trained here is the factors, not ``W``:

- ``left`` (``L``) and ``right`` (``R``) are the layer's only weight
  Parameters; there is no dense ``W`` and no dense ``dW`` is ever formed, so
  gradients and optimizer state (AdamW's two moments, SGD's momentum) are
  the factors' size, ``k (in + out)`` instead of ``in * out``.
- A custom autograd Function returns ``dL = G^T X~ R^T`` (``out x k``) and
  ``dR = L^T G^T X~`` (``k x in``), ``G`` the output gradient and ``X~`` the
  kept input (exact for ``"wsi"``, the ASI factors for ``"wasi"``),
  contracted in factored form: ``G`` is first projected onto the Tucker
  factors of the leading modes and contracted with the core, giving
  ``M = G^T X~ U_C`` (``out x r_C``); then ``dL = M (R U_C)^T`` and
  ``dR = (L^T M) U_C^T``. The input gradient ``(G L) R`` is exact.
- Conv2d: a ``kh x kw`` conv to ``k`` channels (``R``) then a 1x1 conv
  (``L``), with the Tucker batch and channel factors kept outside the convs
  (the convs run on ``r_B`` pseudo-samples of ``r_C`` channels). Grouped
  convs do not factor and are refused.

The subspace. The paper's code keeps a dense ``W``, steps it with the dense
gradient, and after every step re-derives the factors from ``W`` by one
warm-started subspace-iteration step (``p <- orth(W W^T p)``, ``L <- p``).
Applied to a weight that *is* ``L R``, that step spans exactly the range of
``L``, so here it reduces to re-orthonormalising ``L`` and folding the change
of basis into ``R``: ``L = Q T`` (QR, signs fixed so ``diag(T) > 0``),
``L <- Q``, ``R <- T R``. The product ``L R`` is unchanged (no projection
error, unlike the dense step), ``L`` has orthonormal columns again, and
since ``T`` is close to the identity after one optimizer step the basis --
and with it the optimizer's per-coordinate state -- barely moves. The
refresh runs at the start of a training forward when the factors changed
since the last one (an optimizer step, ``load_state_dict``), and costs
``O(k^2 (in + out))``. ``L`` is the factor kept orthonormal; ``R`` carries
the scale. ``refresh=False`` lets the factors evolve freely instead: on a
small fitting problem (``python benchmarks/test_wasi.py --refresh-study``)
free factors converged faster, most with SGD, and both factored variants
better than the paper's dense mechanism; see the WSI/WASI guide.

Ranks: the weight rank ``k`` is fixed at conversion (the paper's choice), one
threshold for every layer or per layer
(:func:`~tensorcompress.torch.budget.plan_weight_ranks` places them under one
byte budget by each layer's output error); the
activation ranks are fixed by ASI's cold start on the first batch (see
:mod:`tensorcompress.torch.modules`). Layers that read the same tensor in one
forward (q/k/v projections) decompose it once and share one compressed form.

>>> from tensorcompress.torch.wasi import to_wasi
>>> # model = to_wasi(model, method="wasi", rank=0.9, act_rank=0.8, layers=...)
"""

from __future__ import annotations

import contextlib
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from tensorcompress import rank as _rank
from tensorcompress import tenalg
from tensorcompress.results import TuckerResult
from tensorcompress.torch.convert import replace_module
from tensorcompress.torch.functions import (
    ConvSpec,
    autocast_dtype,
    conv_input_grad,
    factored_linear_base,
    pointwise_conv,
    project_mode0,
)
from tensorcompress.torch.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    LowRankModule,
    conv_with,
)
from tensorcompress.torch.modules import check_finite_input, check_product_dtype, tucker_step
from tensorcompress.torch.selection import LayerSelection, check_per_layer, select_layers

__all__ = [
    "METHODS",
    "InputSource",
    "WASIConfig",
    "WASIConv2d",
    "WASILinear",
    "WASIModule",
    "refresh_subspaces",
    "to_wasi",
    "wasi_layers",
]

METHODS = ("wsi", "wasi")


@dataclass(frozen=True)
class WASIConfig:
    """How a factored layer trains.

    Parameters
    ----------
    method : {"wasi", "wsi"}
        ``"wasi"``: the input is kept as its ASI Tucker decomposition;
        ``"wsi"``: the input is kept exactly (only the weight is factored).
    act_rank : int, float, sequence or rank policy, default 0.8
        The input's Tucker rank for ``"wasi"``, as ``rank`` of
        :class:`~tensorcompress.torch.modules.CompressionConfig` (an
        explained-variance threshold is resolved by ASI's cold start on the
        first batch, then fixed). Ignored by ``"wsi"``.
    n_iter : int, default 1
        ASI subspace-iteration steps per mode and training step.
    refresh : bool, default True
        Re-orthonormalise ``L`` (folding the change of basis into ``R``) at
        the start of a training forward when the factors changed since the
        last refresh. With False the factors evolve freely (``L R`` is still
        the weight; only ``L``'s orthonormality is lost).
    share_inputs : bool, default True
        Layers with the same ``act_rank``, ``n_iter`` and ``product_dtype`` that read the same
        tensor one after another (q/k/v) reuse one decomposition.
    check_finite : bool, default True
        ``"wasi"`` refuses an input holding NaN or Inf (``ValueError`` naming
        the layer): its decomposition would give NaN gradients.
    seed : int, default 0
        Seeds the layer's own generator (with its name); used only when ASI
        pads a subspace. The global RNG is never touched.
    product_dtype : torch.dtype, optional
        The dtype of ASI's tensor products, as in
        :class:`~tensorcompress.torch.modules.CompressionConfig`.
    """

    method: str = "wasi"
    act_rank: Any = 0.8
    n_iter: int = 1
    refresh: bool = True
    share_inputs: bool = True
    check_finite: bool = True
    seed: int = 0
    product_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        check_product_dtype(self.product_dtype)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.n_iter, bool) or not isinstance(self.n_iter, int) or self.n_iter < 0:
            raise ValueError(f"n_iter must be a non-negative int, got {self.n_iter!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        rank = self.act_rank
        if isinstance(rank, Sequence) and not isinstance(rank, (str, bytes)):
            rank = tuple(rank)
            object.__setattr__(self, "act_rank", rank)
        if isinstance(rank, _rank.RankPolicy):
            return
        entries = rank if isinstance(rank, tuple) else (rank,)
        for k, r in enumerate(entries):
            if r is None and isinstance(rank, tuple):
                continue
            where = f"act_rank[{k}]" if isinstance(rank, tuple) else "act_rank"
            _rank.resolve((r,), (2**62,), name=where)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _no_autocast(device_type: str) -> Iterator[None]:
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


def _padded(x: torch.Tensor, spec: ConvSpec) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` padded as the conv pads it, and the padding left to the conv itself."""
    native = spec.native_padding
    if native is not None:
        return x, native
    flat = [p for pair in reversed(spec.pads) for p in pair]
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    return F.pad(x, flat, mode=mode), (0,) * spec.ndim


def _conv_weight_grad(
    x: torch.Tensor,
    gy: torch.Tensor,
    shape: Sequence[int],
    spec: ConvSpec,
    padding: Sequence[int],
) -> torch.Tensor:
    """``dL/dW`` of ``conv2d(x, W)`` (``x`` already padded beyond ``padding``)."""
    w = gy.new_empty(tuple(shape))
    return torch.ops.aten.convolution_backward(
        gy, x, w, None, list(spec.stride), list(padding), list(spec.dilation),
        False, [0] * spec.ndim, 1, [False, True, False],
    )[1]  # fmt: skip


def _leading_contraction(res: TuckerResult, g: torch.Tensor) -> torch.Tensor:
    """``M = G^T X~ U_C`` (``out x r_C``) for a Linear input ``X~`` kept as ``res``.

    ``G`` (``*lead, out``) is projected onto every leading factor, the largest
    reduction first, then contracted with the core.
    """
    *lead, _ = res.factors
    out = int(g.shape[-1])
    t = g.reshape(*res.shape[:-1], out)
    for k in sorted(range(len(lead)), key=lambda k: lead[k].shape[1] / lead[k].shape[0]):
        t = tenalg.mode_dot(t.contiguous(), lead[k].transpose(0, 1), k)
    r_c = int(res.core.shape[-1])
    return t.reshape(-1, out).transpose(0, 1) @ res.core.reshape(-1, r_c)


class InputSource(Protocol):
    """What rebuilds a layer's input in backward (a norm's output from its int8 input)."""

    def output(self) -> torch.Tensor:
        """The layer's input, rebuilt."""
        ...


Kept = torch.Tensor | TuckerResult | InputSource
"""What a training forward keeps of its input: the input itself, its Tucker
factors, or nothing of its own (a source that rebuilds it)."""

KeepFn = Callable[[torch.Tensor], Kept]


def _pack(kept: Kept) -> tuple[str, tuple[torch.Tensor, ...]]:
    if isinstance(kept, TuckerResult):
        return "tucker", (kept.core, *kept.factors)
    if isinstance(kept, torch.Tensor):
        return "exact", (kept,)
    return "source", ()


def _unpack(kind: str, tensors: Sequence[torch.Tensor]) -> Kept:
    if kind == "tucker":
        return TuckerResult(tensors[0], tuple(tensors[1:]))
    return tensors[0]


# ---------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        bias: torch.Tensor | None,
        keep: KeepFn,
    ) -> torch.Tensor:
        with _no_autocast(x.device.type):
            y = factored_linear_base(x, left, right, bias)
            needs_factors = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
            kept = keep(x) if needs_factors else None
        ctx.kind, tensors = _pack(kept) if kept is not None else ("none", ())
        ctx.source = kept if ctx.kind == "source" else None
        ctx.x_shape = tuple(x.shape)
        ctx.save_for_backward(left, right, *tensors)
        return y

    @staticmethod
    @once_differentiable  # the kept input is a constant: no honest double backward
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        left, right, *tensors = ctx.saved_tensors
        need_x, need_l, need_r, need_b = ctx.needs_input_grad[:4]
        out = int(left.shape[0])
        gl = gr = gb = None
        with _no_autocast(gy.device.type):
            g = gy.reshape(-1, out)
            x = None
            if ctx.kind in ("exact", "source") and (need_l or need_r):
                # The input itself, kept or rebuilt (a rebuilt one comes in its own
                # dtype: float32 under autocast).
                x = tensors[0] if ctx.kind == "exact" else ctx.source.output()
                x = x.to(right.dtype).reshape(-1, int(right.shape[1]))
            gx, gl, gr = _row_chunked_grads(g, left, right, x, need_x, need_l, need_r)
            if ctx.kind == "tucker" and (need_l or need_r):
                res = _unpack("tucker", tensors)
                assert isinstance(res, TuckerResult)
                u_c = res.factors[-1]
                m = _leading_contraction(res, gy.reshape(*res.shape[:-1], out))  # (out, r_C)
                if need_l:
                    gl = m @ (right @ u_c).transpose(0, 1)  # (out, k)
                if need_r:
                    gr = (left.transpose(0, 1) @ m) @ u_c.transpose(0, 1)  # (k, in)
            if need_b:
                gb = g.sum(0)
        if gx is not None:
            gx = gx.reshape(ctx.x_shape)
        return gx, gl, gr, gb, None


_ROWS = 1024
"""Rows per chunk in :func:`_row_chunked_grads`."""


def _row_chunked_grads(
    g: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    x: torch.Tensor | None,
    need_x: bool,
    need_l: bool,
    need_r: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``dx = (G L) R`` and, given the whole input ``X``, ``dL = G^T (X R^T)`` and
    ``dR = (G L)^T X``, a chunk of rows at a time.

    Whole ``N x k`` intermediates (``G L``, ``X R^T``) beside the input
    gradient would raise the backward's peak above a dense layer's;
    chunk-sized ones do not.
    """
    n = int(g.shape[0])
    gx = g.new_empty((n, int(right.shape[1]))) if need_x else None
    gl = g.new_zeros(tuple(left.shape)) if x is not None and need_l else None
    gr = g.new_zeros(tuple(right.shape)) if x is not None and need_r else None
    for i in range(0, n, _ROWS):
        gc = g[i : i + _ROWS]
        if gl is not None and x is not None:
            gl.addmm_(gc.transpose(0, 1), x[i : i + _ROWS] @ right.transpose(0, 1))
        if gx is None and gr is None:
            continue
        g_l = gc @ left
        if gr is not None and x is not None:
            gr.addmm_(g_l.transpose(0, 1), x[i : i + _ROWS])
        if gx is not None:
            torch.mm(g_l, right, out=gx[i : i + _ROWS])
    return gx, gl, gr


class _ConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        bias: torch.Tensor | None,
        spec: ConvSpec,
        keep: KeepFn,
    ) -> torch.Tensor:
        with _no_autocast(x.device.type):
            y = pointwise_conv(conv_with(x, right, spec), left, bias)
            needs_factors = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
            kept = keep(x) if needs_factors else None
        ctx.kind, tensors = _pack(kept) if kept is not None else ("none", ())
        ctx.x_shape = tuple(x.shape)
        ctx.spec = spec
        ctx.save_for_backward(left, right, *tensors)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        left, right, *tensors = ctx.saved_tensors
        spec: ConvSpec = ctx.spec
        need_x, need_l, need_r, need_b = ctx.needs_input_grad[:4]
        k = int(left.shape[1])
        gx = gl = gr = gb = None
        with _no_autocast(gy.device.type):
            lt = left.transpose(0, 1)
            # G L (the output gradient on the k channels): the input gradient's
            # first product, and dR's operand when the input is kept exactly.
            need_gk = need_x or (ctx.kind == "exact" and need_r)
            gk = pointwise_conv(gy, lt) if need_gk else None
            if gk is not None and need_x:
                gx = conv_input_grad(gk, ctx.x_shape, right, spec)
            if ctx.kind == "exact" and (need_l or need_r):
                xp, native = _padded(tensors[0], spec)
                if need_l:
                    z = F.conv2d(xp, right, None, spec.stride, native, spec.dilation)
                    gl = torch.tensordot(gy, z, dims=([0, 2, 3], [0, 2, 3]))  # (C_out, k)
                if gk is not None and need_r:
                    gr = _conv_weight_grad(xp, gk, right.shape, spec, native)
            elif ctx.kind == "tucker" and (need_l or need_r):
                res = _unpack("tucker", tensors)
                assert isinstance(res, TuckerResult)
                core, (u_b, u_c, u_h, u_w) = res.core, res.factors
                gp = project_mode0(u_b, gy)  # (r_B, C_out, H', W'): r_B pseudo-samples
                y_s = tenalg.multi_mode_dot(core, [None, None, u_h, u_w])  # (r_B, r_C, H, W)
                yp, native = _padded(y_s, spec)
                if need_l:
                    r_c = torch.einsum("jchw,cd->jdhw", right, u_c)  # R on r_C channels
                    z = F.conv2d(yp, r_c, None, spec.stride, native, spec.dilation)
                    gl = torch.tensordot(gp, z, dims=([0, 2, 3], [0, 2, 3]))  # (C_out, k)
                if need_r:
                    gk = pointwise_conv(gp, lt)  # (r_B, k, H', W')
                    shape = (k, int(core.shape[1]), *right.shape[2:])
                    g_c = _conv_weight_grad(yp, gk, shape, spec, native)
                    gr = torch.einsum("jdhw,cd->jchw", g_c, u_c)
            if need_b:
                gb = gy.sum(dim=(0, 2, 3))
        return gx, gl, gr, gb, None, None


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------

_SHARED = threading.local()


_CHOLESKY_QR_MAX_DISTANCE = 0.8
"""Largest ``||L^T L - I||_F`` at which :func:`_positive_qr` takes the Cholesky QR.

Every eigenvalue of ``L^T L`` is then within it of 1, so ``cond(L^T L) <= 9``,
and Cholesky QR, whose loss of orthogonality grows as ``eps cond(L^T L)``,
loses at most a few more units in the last place than Householder."""


def _positive_qr(left: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``left = Q T``: orthonormal ``Q``, upper-triangular ``T`` with ``diag(T) >= 0``.

    By Cholesky QR (``T`` the Cholesky factor of ``left^T left``, then
    ``Q = left T^{-1}``) when ``left`` is close to orthonormal columns, as a
    basis one optimizer step away from them is: a product, a ``k x k``
    Cholesky and a triangular solve, faster than Householder QR on the
    factors of the ViT's layers (``python benchmarks/test_wasi.py
    --refresh-qr``), and a refresh runs every training step. Otherwise
    Householder QR, its signs fixed to make ``diag(T) >= 0``.

    Parameters
    ----------
    left : torch.Tensor
        ``(n, k)`` with ``n >= k``, float32 or float64.

    Returns
    -------
    tuple of torch.Tensor
        ``Q`` ``(n, k)`` and ``T`` ``(k, k)``.
    """
    gram = left.T @ left
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    if float(torch.linalg.matrix_norm(gram - eye)) <= _CHOLESKY_QR_MAX_DISTANCE:
        t = torch.linalg.cholesky(gram, upper=True)
        return torch.linalg.solve_triangular(t, left, upper=True, left=False), t
    return _householder_positive_qr(left)


def _householder_positive_qr(left: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_positive_qr` by LAPACK's Householder QR, whatever ``left``."""
    q, t = torch.linalg.qr(left)
    signs = torch.sign(torch.diagonal(t))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs, t * signs[:, None]


class WASIModule(LowRankModule):
    """Training behaviour shared by :class:`WASILinear` and :class:`WASIConv2d`.

    Attributes
    ----------
    config : WASIConfig
        How the layer trains.
    layer_name : str
        Qualified name in the converted model (errors, seeding).
    last_result : TuckerResult or None
        The input decomposition the last ``"wasi"`` training forward kept
        (also the warm start of the next).
    """

    config: WASIConfig
    layer_name: str
    last_result: TuckerResult | None
    _fixed_ranks: tuple[int | None, ...] | None
    _rng: np.random.Generator
    _refreshed: tuple[int, int]

    def _init_wasi(self, config: WASIConfig | None, name: str) -> None:
        config = WASIConfig() if config is None else config
        if not isinstance(config, WASIConfig):
            raise TypeError(f"config must be a WASIConfig, got {type(config).__name__}")
        self.config = config
        self.layer_name = name
        self.reset_state()
        self._refreshed = self._versions()

    def reset_state(self) -> None:
        """Forget the activation subspace (the next ``"wasi"`` step is a cold start)."""
        self.last_result = None
        self._fixed_ranks = None
        seed = [self.config.seed, zlib.crc32(self.layer_name.encode())]
        self._rng = np.random.default_rng(seed)

    @property
    def act_ranks(self) -> tuple[int, ...] | None:
        """Tucker ranks of the input the last ``"wasi"`` training forward kept."""
        return None if self.last_result is None else self.last_result.ranks

    def _versions(self) -> tuple[int, int]:
        return (self.left._version, self.right._version)

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-orthonormalise ``L`` and fold the change of basis into ``R`` (``L R`` kept).

        ``L = Q T`` by QR with ``diag(T) >= 0``; then ``L <- Q``, ``R <- T R``.
        On an ``L`` that already has orthonormal columns it changes nothing
        but rounding.
        """
        left, right = self.left, self.right
        k = self.rank
        work = torch.float64 if left.dtype == torch.float64 else torch.float32
        q, t = _positive_qr(left.to(work))
        r_new = t @ right.reshape(k, -1).to(work)
        left.copy_(q)
        right.copy_(r_new.reshape(right.shape))
        self._refreshed = self._versions()

    def _training_step(self) -> bool:
        return (
            self.training
            and torch.is_grad_enabled()
            and (self.left.requires_grad or self.right.requires_grad)
        )

    def refresh_if_changed(self) -> None:
        """:meth:`refresh` if ``config.refresh`` and the factors changed since the last one.

        Every training forward starts with it; code that computes the layer's
        product itself (a fused MLP) calls it first.
        """
        if self.config.refresh and self._versions() != self._refreshed:
            self.refresh()

    def _prepare(self, x: torch.Tensor, decomposed: bool = True) -> None:
        self.refresh_if_changed()
        if decomposed and self.config.method == "wasi" and self.config.check_finite:
            check_finite_input(self, x)

    # -- what the forward keeps ----------------------------------------------

    @torch.compiler.disable
    def _keep(self, x: torch.Tensor) -> Kept:
        cfg = self.config
        if cfg.method == "wsi":
            return x
        key = (cfg.act_rank, cfg.n_iter, cfg.product_dtype, tuple(x.shape), x.dtype, x.device)
        slot = getattr(_SHARED, "slot", None)
        if (
            cfg.share_inputs
            and slot is not None
            and slot[0]() is x
            and slot[1] == x._version
            and slot[2] == key
        ):
            res: TuckerResult = slot[3]
        else:
            res = self._decompose(x)
            if cfg.share_inputs:
                _SHARED.slot = (weakref.ref(x), x._version, key, res)
        self.last_result = res
        return res

    def _decompose(self, x: torch.Tensor) -> TuckerResult:
        cfg = self.config
        res, self._fixed_ranks = tucker_step(
            x.unsqueeze(0) if x.ndim == 1 else x,
            cfg.act_rank,
            warm=self.last_result,
            fixed_ranks=self._fixed_ranks,
            track=True,
            n_iter=cfg.n_iter,
            rng=self._rng,
            layer=self.layer_name or "<unnamed>",
            product_dtype=cfg.product_dtype,
        )
        return res

    def _cast(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        left: torch.Tensor = self.left
        right: torch.Tensor = self.right
        bias: torch.Tensor | None = self.bias
        dtype = autocast_dtype(x)
        if dtype is not None:
            x, left, right = x.to(dtype), left.to(dtype), right.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return x, left, right, bias

    def extra_repr(self) -> str:
        cfg = self.config
        extra = f"method={cfg.method!r}"
        if cfg.method == "wasi":
            extra += f", act_rank={cfg.act_rank!r}"
        return f"{super().extra_repr()}, {extra}"


class WASILinear(WASIModule, LowRankLinear):
    """A Linear trained as ``L R`` (see :mod:`tensorcompress.torch.wasi`).

    Build it with :meth:`from_dense` (or :func:`to_wasi`), or like
    :class:`~tensorcompress.torch.lowrank.LowRankLinear` with the extra
    keywords ``config=WASIConfig(...)`` and ``name=...``. Outside a training
    step (``eval()``, ``no_grad``, frozen factors) its forward is
    :class:`~tensorcompress.torch.lowrank.LowRankLinear`'s.
    """

    def __init__(
        self, *args: Any, config: WASIConfig | None = None, name: str = "", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_wasi(config, name)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        rank: int | float,
        config: WASIConfig | None = None,
        *,
        name: str = "",
        output_gram: torch.Tensor | None = None,
    ) -> WASILinear:
        """Factor ``linear`` (:func:`~tensorcompress.torch.lowrank.factorize`) for training.

        ``L = U_k`` (orthonormal columns), ``R = S_k V_k^T``, or with
        ``output_gram`` ``L`` its leading eigenvectors and ``R = L^T W``; the
        bias is the same Parameter object.
        """
        new = super().from_dense(linear, rank, name=name, output_gram=output_gram)
        assert isinstance(new, WASILinear)
        new._init_wasi(config, name)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Two products; in a training step, through the factored autograd Function."""
        if not self._training_step():
            return LowRankLinear.forward(self, input)
        self._prepare(input)
        x, left, right, bias = self._cast(input)
        out: torch.Tensor = _LinearFunction.apply(x, left, right, bias, self._keep)
        return out

    def forward_from(self, input: torch.Tensor, source: InputSource) -> torch.Tensor:
        """:meth:`forward` keeping nothing of ``input``: the factors' gradients use
        ``source.output()``, ``input`` rebuilt in backward (whatever ``method``).

        For a layer that reads a tensor something else keeps anyway (a norm's
        output, rebuilt from the int8 input the norm keeps:
        :func:`tensorcompress.torch.transformer.share_norm_inputs`).
        """
        if not self._training_step():
            return LowRankLinear.forward(self, input)
        self._prepare(input, decomposed=False)
        x, left, right, bias = self._cast(input)
        out: torch.Tensor = _LinearFunction.apply(x, left, right, bias, lambda _: source)
        return out


class WASIConv2d(WASIModule, LowRankConv2d):
    """A Conv2d trained as a ``kh x kw`` conv to ``k`` channels (``R``) and a 1x1 conv (``L``).

    Every ``groups == 1`` setting of ``nn.Conv2d``: any kernel, stride,
    dilation, ``'same'``/``'valid'``/asymmetric padding, every ``padding_mode``,
    bias or not. See :class:`WASILinear`.
    """

    def __init__(
        self, *args: Any, config: WASIConfig | None = None, name: str = "", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_wasi(config, name)

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        rank: int | float,
        config: WASIConfig | None = None,
        *,
        name: str = "",
        output_gram: torch.Tensor | None = None,
    ) -> WASIConv2d:
        """Factor ``conv``'s weight matrix ``(C_out, C_in kh kw)`` for training
        (``output_gram`` as for :meth:`WASILinear.from_dense`).

        Raises
        ------
        TypeError
            Not an ``nn.Conv2d``.
        ValueError
            A grouped conv, or a bad rank (the message names the layer).
        """
        new = super().from_dense(conv, rank, name=name, output_gram=output_gram)
        assert isinstance(new, WASIConv2d)
        new._init_wasi(config, name)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Two convs; in a training step, through the factored autograd Function."""
        if not self._training_step():
            return LowRankConv2d.forward(self, input)
        self._prepare(input)
        x, left, right, bias = self._cast(input)
        out: torch.Tensor = _ConvFunction.apply(x, left, right, bias, self.spec, self._keep)
        return out


# ---------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------


def wasi_layers(model: nn.Module) -> dict[str, WASIModule]:
    """The factored training layers of ``model``, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, WASIModule)}


def refresh_subspaces(model: nn.Module) -> nn.Module:
    """Refresh every factored layer now (see :meth:`WASIModule.refresh`); returns ``model``.

    Training forwards do this on their own; call it to have orthonormal
    ``L`` factors right after an optimizer step (before exporting, say).
    """
    for m in wasi_layers(model).values():
        m.refresh()
    return model


def _convert_one(
    module: nn.Module, name: str, rank: Any, config: WASIConfig, gram: torch.Tensor | None
) -> WASIModule:
    if isinstance(module, nn.Conv2d):
        return WASIConv2d.from_dense(module, rank, config, name=name, output_gram=gram)
    if isinstance(module, nn.Linear):
        return WASILinear.from_dense(module, rank, config, name=name, output_gram=gram)
    raise TypeError(
        f"layer {name or '<unnamed>'!r} ({type(module).__name__}) cannot be factored as L R: "
        "WSI/WASI factor nn.Linear and nn.Conv2d (groups=1) only; leave it out of `layers`"
    )


def to_wasi(
    model: nn.Module,
    method: str = "wasi",
    rank: int | float | Mapping[str, int | float] = 0.9,
    act_rank: Any = 0.8,
    layers: LayerSelection = None,
    *,
    example_input: Any = None,
    only_if_smaller: bool = False,
    output_grams: Mapping[str, torch.Tensor] | None = None,
    **options: Any,
) -> nn.Module:
    """Replace the selected Linear/Conv2d layers by factored training layers, in place.

    Parameters
    ----------
    model : nn.Module
        The model; modified in place. Build the optimizer afterwards: the
        trainable weight Parameters are now ``left`` and ``right``.
    method : {"wasi", "wsi"}, default "wasi"
        Keep the input's ASI decomposition (``"wasi"``) or the input itself
        (``"wsi"``).
    rank : int, float or dict, default 0.9
        Weight rank: an int ``k``, or an explained-variance threshold in
        (0, 1] of each weight's spectrum, or a dict from qualified name to
        either with exactly one entry per selected layer
        (:func:`~tensorcompress.torch.budget.plan_weight_ranks` gives one).
    act_rank : int, float, sequence or rank policy, default 0.8
        The input's Tucker rank for ``"wasi"`` (see :class:`WASIConfig`).
    layers : LastLayers, callable, list of str or None
        Which layers (:func:`~tensorcompress.torch.selection.select_layers`);
        ``None`` selects every Linear/Conv2d/Conv1d, and a Conv1d or grouped
        conv among them is an error.
    example_input : tensor, tuple or dict, optional
        Resolves :func:`~tensorcompress.torch.selection.last_layers` in
        execution order.
    only_if_smaller : bool, default False
        Factor a layer only where its factors hold fewer numbers than its
        weight: ``k (in + out) < out * in`` (a conv's ``in`` counts its
        kernel). Above that break-even rank the factors cost more memory,
        optimizer state and FLOPs than the dense weight, for nothing; a
        threshold near 1 on a weight with a flat spectrum lands there.
        The other selected layers stay as they are (dense); compress their
        inputs as you would a dense layer's (with
        :func:`~tensorcompress.torch.convert` and method ``"asi"``, say).
        :func:`wasi_layers` names the layers that were factored.
    output_grams : dict, optional
        From qualified name to the Gram matrix of that layer's outputs on
        real inputs, one per selected layer
        (:func:`~tensorcompress.torch.budget.output_grams`). Each weight is
        then factored in the basis that keeps most of its outputs (``L`` the
        Gram matrix's leading eigenvectors, ``R = L^T W``;
        :func:`~tensorcompress.torch.lowrank.factorize`) instead of its own
        singular vectors: the same rank and bytes, a smaller error on what
        the layer computes. ``None``: the truncated SVD, as the paper.
    **options
        The other :class:`WASIConfig` fields: ``n_iter``, ``refresh``,
        ``share_inputs``, ``check_finite``, ``seed``, ``product_dtype``.

    Returns
    -------
    nn.Module
        ``model`` (or the new layer if ``model`` is itself a selected layer).

    Raises
    ------
    TypeError, ValueError
        A layer that cannot factor (Conv1d, a grouped conv) or a bad rank,
        naming the layer; nothing is converted then.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    >>> net = to_wasi(net, method="wasi", rank=8, act_rank=0.9, layers=["0"])
    >>> type(net[0]).__name__, net[0].rank
    ('WASILinear', 8)
    >>> net(torch.randn(5, 16)).sum().backward()
    >>> tuple(net[0].left.grad.shape), tuple(net[0].right.grad.shape)
    ((32, 8), (8, 16))
    """
    fields = set(WASIConfig.__dataclass_fields__) - {"method", "act_rank"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"unknown options {unknown}; expected WASIConfig fields {sorted(fields)}")
    cfg = WASIConfig(method=method, act_rank=act_rank, **options)
    names = select_layers(model, layers, example_input)
    if isinstance(rank, Mapping):
        check_per_layer("a rank dict", rank, names)
    if output_grams is not None:
        check_per_layer("output_grams", output_grams, names)
    modules = dict(model.named_modules())
    new: dict[str, WASIModule] = {}
    for name in names:
        r = rank[name] if isinstance(rank, Mapping) else rank
        gram = None if output_grams is None else output_grams[name]
        new[name] = _convert_one(modules[name], name, r, cfg, gram)
    if only_if_smaller:
        new = {n: m for n, m in new.items() if m.smaller_than_dense}
    root = model
    for name in new:
        if name == "":
            root = new[name]
        else:
            replace_module(model, modules[name], new[name])
    return root
