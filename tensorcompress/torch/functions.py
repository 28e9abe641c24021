"""Autograd Functions for conv1d/conv2d/linear that keep a compressed input.

Forward runs the ordinary op, then compresses the input under ``no_grad`` with
a caller-supplied ``compress`` callable, and saves only what it returns (plus
the weight when the input needs a gradient) through ``ctx.save_for_backward``,
so ``torch.autograd.graph.saved_tensors_hooks`` sees every kept tensor.

Backward:

- ``grad_input`` is exact: the transposed conv (or ``grad @ W``) of the
  output gradient with the weight; no error reaches earlier layers.
- ``grad_bias`` is exact: the output gradient summed.
- ``grad_weight`` comes from the compressed input, contracted in factored form:

  * Tucker (``core``, ``U_B``, ``U_C``, ``U_S...``): the output gradient is
    first projected onto the batch factor (``gy x_0 U_B^T``), so the weight
    gradient runs on ``r_B`` pseudo-samples. Padding of any mode (zeros,
    reflect, replicate, circular, asymmetric) is a linear map along each
    spatial dim, so it is applied to the spatial factors (``U_S <- P U_S``),
    never to a full tensor. With ``groups == 1`` the channel factor stays
    outside: the conv weight gradient runs on ``r_C`` channels and is then
    multiplied by ``U_C``. A 1x1 conv (stride 1, no padding) and Linear are
    plain matrix products: the output gradient is projected onto every
    non-channel factor and contracted with the core; a Linear may instead
    expand the core over those factors and contract it with the whole
    output gradient, whichever is measured faster.
  * Truncated SVD of the channel unfolding (``U``, ``S``, ``Vh``): the weight
    gradient runs on ``r`` channels (``S Vh`` folded), then is multiplied by ``U``.
  * Gradient filter: :func:`tensorcompress.torch.gradient_filter.weight_grad`.

The Functions are dtype-agnostic: they compute in the dtype of their inputs,
with autocast disabled inside; :func:`conv` and :func:`linear` apply autocast's
cast themselves when autocast is on, as ``F.conv2d`` would.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from tensorcompress import _measured, tenalg
from tensorcompress.results import SVDResult, TuckerResult
from tensorcompress.torch import gradient_filter as gf
from tensorcompress.torch.gradient_filter import PatchAverage

__all__ = [
    "Compressed",
    "ConvSpec",
    "autocast_dtype",
    "conv",
    "conv_input_grad",
    "conv_weight_grad",
    "linear",
    "linear_weight_grad",
    "memory_order",
    "pad_rows",
    "pointwise_conv",
    "project_mode0",
]

Compressed = TuckerResult | SVDResult | PatchAverage
"""What a ``compress`` callable returns: a Tucker decomposition of the input, a
truncated SVD of its channel (feature) unfolding, or its patch average."""

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)
    if len(out) != n:
        raise ValueError(f"{name} must be an int or {n} ints, got {value!r}")
    return out


@dataclass(frozen=True)
class ConvSpec:
    """The settings of an N-d convolution, with padding resolved per side.

    Attributes
    ----------
    kernel_size, stride, dilation : tuple of int
        One entry per spatial dim.
    pads : tuple of (int, int)
        ``(before, after)`` padding per spatial dim (``'same'`` with an even
        effective kernel is asymmetric: the extra pixel goes after, as in torch).
    groups : int
        Conv groups.
    padding_mode : str
        ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    groups: int = 1
    padding_mode: str = "zeros"

    @classmethod
    def make(
        cls,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        *,
        ndim: int = 2,
    ) -> ConvSpec:
        """Build a spec from ``nn.Conv*d``-style arguments (``padding`` may be ``'same'``)."""
        k = _tuple(kernel_size, ndim, "kernel_size")
        s = _tuple(stride, ndim, "stride")
        d = _tuple(dilation, ndim, "dilation")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        pads: tuple[tuple[int, int], ...]
        if isinstance(padding, str):
            if padding == "valid":
                pads = ((0, 0),) * ndim
            elif padding == "same":
                if any(v != 1 for v in s):
                    raise ValueError("padding='same' needs stride 1, as in torch")
                totals = [di * (ki - 1) for di, ki in zip(d, k)]
                pads = tuple((t // 2, t - t // 2) for t in totals)
            else:
                raise ValueError(
                    f"padding must be 'same', 'valid', an int or ints, got {padding!r}"
                )
        else:
            pads = tuple((p, p) for p in _tuple(padding, ndim, "padding"))
        return cls(k, s, d, pads, int(groups), padding_mode)

    @classmethod
    def from_module(cls, m: nn.Conv1d | nn.Conv2d) -> ConvSpec:
        """The spec of a ``nn.Conv1d``/``nn.Conv2d``."""
        return cls.make(
            m.kernel_size,
            m.stride,
            m.padding if isinstance(m.padding, str) else tuple(m.padding),
            m.dilation,
            m.groups,
            m.padding_mode,
            ndim=len(m.kernel_size),
        )

    @property
    def ndim(self) -> int:
        """Number of spatial dims."""
        return len(self.kernel_size)

    @property
    def native_padding(self) -> tuple[int, ...] | None:
        """Symmetric zero padding torch's conv takes directly, else ``None``."""
        if self.padding_mode != "zeros" or any(a != b for a, b in self.pads):
            return None
        return tuple(a for a, _ in self.pads)

    @property
    def pointwise(self) -> bool:
        """A 1x1 conv with stride 1 and no padding: a matrix product per pixel."""
        return (
            all(k == 1 for k in self.kernel_size)
            and all(s == 1 for s in self.stride)
            and all(p == (0, 0) for p in self.pads)
        )

    def padded_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Input shape after padding."""
        return (*shape[:2], *(n + a + b for n, (a, b) in zip(shape[2:], self.pads)))


# ---------------------------------------------------------------------------
# Padding as a linear map along one dim
# ---------------------------------------------------------------------------


def _pad_index(n: int, before: int, after: int, mode: str, device: torch.device) -> torch.Tensor:
    """Source row of every padded row for reflect/replicate/circular padding."""
    i = torch.arange(-before, n + after, device=device)
    if mode == "reflect":
        i = i.abs()
        return torch.where(i >= n, 2 * (n - 1) - i, i)
    if mode == "replicate":
        return i.clamp(0, n - 1)
    return i.remainder(n)  # circular


def pad_rows(u: torch.Tensor, before: int, after: int, mode: str) -> torch.Tensor:
    """``P u``: pad the rows of a factor ``(n, r)`` as the conv pads its dim."""
    if before == 0 and after == 0:
        return u
    if mode == "zeros":
        return F.pad(u, (0, 0, before, after))
    return u.index_select(0, _pad_index(int(u.shape[0]), before, after, mode, u.device))


def _unpad_dim(
    g: torch.Tensor, dim: int, n: int, before: int, after: int, mode: str
) -> torch.Tensor:
    """``P^T g`` along ``dim``: the adjoint of :func:`pad_rows`."""
    if before == 0 and after == 0:
        return g
    if mode == "zeros":
        return g.narrow(dim, before, n)
    shape = list(g.shape)
    shape[dim] = n
    idx = _pad_index(n, before, after, mode, g.device)
    return g.new_zeros(shape).index_add_(dim, idx, g)


def _pad_input(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    flat = [p for pair in reversed(spec.pads) for p in pair]
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    return F.pad(x, flat, mode=mode)


# ---------------------------------------------------------------------------
# Convolution pieces
# ---------------------------------------------------------------------------


_CONVS = (F.conv1d, F.conv2d, F.conv3d)
"""Torch's conv by number of spatial dims (1-3)."""


def _pixel_product(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``w`` (``O x C``) applied at every position of ``x`` (``N, C, *spatial``,
    contiguous), plus ``b``: one batched matrix product."""
    n = int(x.shape[0])
    # bmm on the expanded weight: torch.matmul folds the batch into a copy of
    # x when either operand requires grad.
    ws, flat = w.expand(n, *w.shape), x.reshape(n, int(x.shape[1]), -1)
    y = torch.bmm(ws, flat) if b is None else torch.baddbmm(b.reshape(1, -1, 1), ws, flat)
    return y.reshape(n, int(w.shape[0]), *x.shape[2:])


def _pixel_conv(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    conv = _CONVS[x.ndim - 3]
    return conv(x, w.reshape(*w.shape, *(1,) * (x.ndim - 2)), b)


def pointwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """A 1x1 conv (stride 1, no padding) of ``x`` (``N, C, *spatial``) with
    ``weight`` (``O x C``), plus ``bias``.

    Torch's conv, or one batched matrix product over the pixels, whichever is
    measured faster for these shapes. On this project's CPU oneDNN's 1x1 conv
    of an NCHW tensor is the faster of the two on some shapes only, so it is a
    measured choice (:func:`tensorcompress._measured.fastest`); the conv runs
    where nothing is measured (a GPU, measuring off, a small tensor) and on a
    tensor not in NCHW order.
    """
    if not x.is_contiguous():
        return _pixel_conv(weight, x, bias)
    options: dict[str, Callable[[], torch.Tensor]] = {
        "conv": functools.partial(_pixel_conv, weight, x, bias),
        "matmul": functools.partial(_pixel_product, weight, x, bias),
    }
    key = ("1x1 conv", tuple(x.shape), tuple(weight.shape), bias is not None)
    return _measured.fastest(key, options, x)


def _conv_forward(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, spec: ConvSpec
) -> torch.Tensor:
    if spec.groups == 1 and spec.pointwise:
        return pointwise_conv(x, w.reshape(int(w.shape[0]), -1), b)
    native = spec.native_padding
    if native is None:
        x, native = _pad_input(x, spec), (0,) * spec.ndim
    conv = _CONVS[spec.ndim - 1]
    return conv(x, w, b, spec.stride, native, spec.dilation, spec.groups)


def _conv_backward(
    gy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    spec: ConvSpec,
    padding: Sequence[int],
    groups: int,
    mask: tuple[bool, bool, bool],
) -> tuple[Any, ...]:
    zeros = [0] * spec.ndim
    return torch.ops.aten.convolution_backward(
        gy, x, w, None, list(spec.stride), list(padding), list(spec.dilation),
        False, zeros, groups, list(mask),
    )  # fmt: skip


def _transposed_conv(
    gy: torch.Tensor, w: torch.Tensor, spec: ConvSpec, padding: Sequence[int], shape: Sequence[int]
) -> torch.Tensor:
    """``dL/dx`` of a conv of an input of ``shape`` as a transposed conv of ``gy``.

    With stride 1 (and padding within the kernel's reach) it is the ordinary
    conv of ``gy`` with the flipped weight. Neither needs a stand-in for the
    input, which ``convolution_backward`` would (and an expanded dummy is
    materialised by the CPU kernels: a full-size copy). ``output_padding``
    restores the rows a strided conv never read.
    """
    flip_pad = [d * (k - 1) - p for d, k, p in zip(spec.dilation, spec.kernel_size, padding)]
    if all(s == 1 for s in spec.stride) and min(flip_pad) >= 0:
        # Stride 1: an ordinary conv with the flipped, channel-transposed weight,
        # which runs the fast forward kernels (transposed depthwise convs do not).
        g = spec.groups
        c_out, c_in_g = int(w.shape[0]), int(w.shape[1])
        if g == 1 and spec.pointwise:
            return pointwise_conv(gy, w.reshape(c_out, c_in_g).transpose(0, 1))
        wt = w.reshape(g, c_out // g, c_in_g, *w.shape[2:]).transpose(1, 2)
        wt = wt.reshape(g * c_in_g, c_out // g, *w.shape[2:]).flip(list(range(2, w.ndim)))
        conv = _CONVS[spec.ndim - 1]
        return conv(gy, wt, None, 1, tuple(flip_pad), spec.dilation, g)
    extra = [
        int(n) - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
        for n, o, s, p, d, k in zip(
            shape[2:], gy.shape[2:], spec.stride, padding, spec.dilation, spec.kernel_size
        )
    ]
    args = (gy, w, None, spec.stride, tuple(padding), tuple(extra), spec.groups, spec.dilation)
    if spec.ndim == 1:
        return F.conv_transpose1d(*args)
    if spec.ndim == 2:
        return F.conv_transpose2d(*args)
    return F.conv_transpose3d(*args)


def conv_input_grad(
    grad_output: torch.Tensor, input_shape: Sequence[int], weight: torch.Tensor, spec: ConvSpec
) -> torch.Tensor:
    """Exact ``dL/dx`` of a conv from the output gradient and the weight.

    Any padding mode and asymmetric padding: the gradient of the padded input
    is folded back with the padding's adjoint (crop, or scatter-add of the
    reflected/replicated/wrapped rows).
    """
    native = spec.native_padding
    if native is not None:
        return _transposed_conv(grad_output, weight, spec, native, input_shape)
    padded = spec.padded_shape(input_shape)
    g = _transposed_conv(grad_output, weight, spec, (0,) * spec.ndim, padded)
    for k, (before, after) in enumerate(spec.pads):
        g = _unpad_dim(g, 2 + k, int(input_shape[2 + k]), before, after, spec.padding_mode)
    return g


def _weight_grad_of(
    x: torch.Tensor,
    gy: torch.Tensor,
    shape: Sequence[int],
    spec: ConvSpec,
    padding: Sequence[int],
    groups: int,
) -> torch.Tensor:
    # The weight operand only gives its shape; a real (uninitialised, weight-sized)
    # tensor, since an expanded dummy sends depthwise convs down a slow path.
    w = gy.new_empty(tuple(shape))
    return _conv_backward(gy, x, w, spec, padding, groups, (False, True, False))[1]


def memory_order(t: torch.Tensor) -> list[int]:
    """Dims of ``t`` from outermost to innermost in memory (ties: logical order)."""
    strides = t.stride()
    return sorted(range(t.ndim), key=lambda d: (-strides[d], d))


def project_mode0(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t x_0 u^T``: contract mode 0 of ``t`` with ``u (n, r)``, in ``t``'s memory order.

    A channels-last (or any permuted-dense) ``t`` is viewed in its memory
    order, so no permuted copy is made; the result has the same layout.
    """
    rest = [d for d in memory_order(t) if d != 0]
    tp = t.permute(0, *rest)
    if not tp.is_contiguous():
        tp = tp.contiguous()
    n, r = int(u.shape[0]), int(u.shape[1])
    out = (u.transpose(0, 1) @ tp.reshape(n, -1)).reshape(r, *tp.shape[1:])
    inverse = [0] * t.ndim
    for i, d in enumerate([0, *rest]):
        inverse[d] = i
    return out.permute(inverse)


def _tucker_conv_weight(
    res: TuckerResult, gy: torch.Tensor, w_shape: Sequence[int], spec: ConvSpec
) -> torch.Tensor:
    core = res.core
    u_b, u_c, *u_s = res.factors
    c_out = int(w_shape[0])
    # r_B pseudo-samples: every later product is r_B / B as large.
    gyp = project_mode0(u_b, gy)
    if spec.groups == 1 and spec.pointwise:
        # dW = sum_{b,s} gy'[b,o,s] x'[b,c,s]: project gy' onto the spatial
        # factors too and contract with the core; no tensor of the input's size.
        g = gyp
        for k in sorted(range(len(u_s)), key=lambda k: u_s[k].shape[1] / u_s[k].shape[0]):
            g = tenalg.mode_dot(g.contiguous(), u_s[k].transpose(0, 1), 2 + k)
        r_c = int(core.shape[1])
        gm = g.transpose(0, 1).reshape(c_out, -1)  # (C_out, r_B * prod r_S)
        cm = core.transpose(0, 1).reshape(r_c, -1)  # (r_C, r_B * prod r_S)
        return ((gm @ cm.transpose(0, 1)) @ u_c.transpose(0, 1)).reshape(w_shape)
    padded = [pad_rows(u, a, b, spec.padding_mode) for u, (a, b) in zip(u_s, spec.pads)]
    zero = (0,) * spec.ndim
    if spec.groups == 1:
        z = tenalg.multi_mode_dot(core, [None, None, *padded])  # (r_B, r_C, *padded spatial)
        r_c = int(core.shape[1])
        g = _weight_grad_of(z, gyp, (c_out, r_c, *w_shape[2:]), spec, zero, 1)
        # One GEMM (einsum) - a broadcast matmul would run C_out small GEMMs.
        return torch.einsum("ojk,cj->ock", g.reshape(c_out, r_c, -1), u_c).reshape(w_shape)
    # Grouped: each output channel needs its own input channels, so rebuild
    # them (still only r_B pseudo-samples).
    z = tenalg.multi_mode_dot(core, [None, u_c, *padded])
    return _weight_grad_of(z, gyp, w_shape, spec, zero, spec.groups)


def _svd_conv_weight(
    res: SVDResult, gy: torch.Tensor, w_shape: Sequence[int], spec: ConvSpec
) -> torch.Tensor:
    if res.mode != 1:
        raise ValueError(f"conv SVD compression must unfold the channel mode (1), got {res.mode}")
    u, s, vh = res.U, res.S, res.Vh
    b, c, *spatial = res.shape
    r = int(s.shape[0])
    c_out = int(w_shape[0])
    native = spec.native_padding
    if spec.groups == 1:
        # x = U (S Vh): the conv weight gradient on r channels, then times U.
        y = (s[:, None] * vh).reshape(r, b, *spatial).transpose(0, 1)
        if native is None:
            y, native = _pad_input(y, spec), (0,) * spec.ndim
        g = _weight_grad_of(y, gy, (c_out, r, *w_shape[2:]), spec, native, 1)
        return torch.einsum("ojk,cj->ock", g.reshape(c_out, r, -1), u).reshape(w_shape)
    x = (u @ (s[:, None] * vh)).reshape(c, b, *spatial).transpose(0, 1)
    if native is None:
        x, native = _pad_input(x, spec), (0,) * spec.ndim
    return _weight_grad_of(x, gy, w_shape, spec, native, spec.groups)


def conv_weight_grad(
    compressed: Compressed, grad_output: torch.Tensor, weight_shape: Sequence[int], spec: ConvSpec
) -> torch.Tensor:
    """``dL/dW`` of a conv from its compressed input (see the module docstring).

    Parameters
    ----------
    compressed : TuckerResult, SVDResult or PatchAverage
        The compressed input ``(B, C_in, *spatial)``.
    grad_output : torch.Tensor
        ``(B, C_out, *out_spatial)``.
    weight_shape : sequence of int
        ``(C_out, C_in / groups, *kernel)``.
    spec : ConvSpec
        The conv's settings.
    """
    if isinstance(compressed, TuckerResult):
        g = _tucker_conv_weight(compressed, grad_output, weight_shape, spec)
    elif isinstance(compressed, SVDResult):
        g = _svd_conv_weight(compressed, grad_output, weight_shape, spec)
    elif isinstance(compressed, PatchAverage):
        g = gf.weight_grad(compressed, grad_output, weight_shape, spec.groups)
    else:
        raise TypeError(f"cannot compute a weight gradient from {type(compressed).__name__}")
    return g


def _projecting(compressed: TuckerResult, g: torch.Tensor) -> torch.Tensor:
    # The output gradient projected onto every leading factor (the largest
    # reduction first), contracted with the core, then with U_C.
    *lead, u_c = compressed.factors
    for k in sorted(range(len(lead)), key=lambda k: lead[k].shape[1] / lead[k].shape[0]):
        g = tenalg.mode_dot(g.contiguous(), lead[k].transpose(0, 1), k)
    core = compressed.core
    r_c, c_out = int(core.shape[-1]), int(g.shape[-1])
    gc = g.reshape(-1, c_out).transpose(0, 1) @ core.reshape(-1, r_c)  # (C_out, r_C)
    return gc @ u_c.transpose(0, 1)


def _expanding(compressed: TuckerResult, g: torch.Tensor) -> torch.Tensor:
    # The core expanded over the leading factors (the input projected onto
    # U_C, (N, r_C), small when r_C is), then one product with the whole
    # output gradient, then U_C.
    *lead, u_c = compressed.factors
    y = compressed.core
    for k, u in enumerate(lead):
        y = tenalg.mode_dot(y, u, k)
    c_out = int(g.shape[-1])
    yg = y.reshape(-1, int(y.shape[-1])).transpose(0, 1) @ g.reshape(-1, c_out)  # (r_C, C_out)
    return (u_c @ yg).transpose(0, 1)


def linear_weight_grad(
    compressed: TuckerResult | SVDResult, grad_output: torch.Tensor
) -> torch.Tensor:
    """``dL/dW`` of a Linear from its compressed input ``(*lead, C_in)``.

    Tucker, in one of two orders: the output gradient projected onto every
    leading factor (the largest reduction first) and contracted with the
    core, then with ``U_C``; or the core expanded over the leading factors
    and contracted with the whole output gradient, then with ``U_C``. The
    second runs one long product where the first runs several short ones,
    and is faster on token tensors at high ranks; which one runs is
    measured per shape and ranks (``tensorcompress._measured.fastest``, on a
    CPU with :func:`~tensorcompress.measured_plans` on; the first
    otherwise). SVD of the feature unfolding ``X^T = U S Vh``:
    ``dW = (gy^T Vh^T S) U^T``.
    """
    c_out = int(grad_output.shape[-1])
    if isinstance(compressed, TuckerResult):
        g = grad_output.reshape(*compressed.shape[:-1], c_out)
        return _measured.fastest(
            ("linear weight gradient", compressed.shape, compressed.ranks, c_out),
            {
                "projecting": functools.partial(_projecting, compressed, g),
                "expanding": functools.partial(_expanding, compressed, g),
            },
            g,
        )
    if isinstance(compressed, SVDResult):
        u, s, vh = compressed.U, compressed.S, compressed.Vh
        gm = grad_output.reshape(-1, c_out)
        t = (vh @ gm) * s[:, None]  # (r, C_out)
        return t.transpose(0, 1) @ u.transpose(0, 1)
    raise TypeError(f"cannot compute a Linear weight gradient from {type(compressed).__name__}")


# ---------------------------------------------------------------------------
# Saving and restoring a compressed input through save_for_backward
# ---------------------------------------------------------------------------


def _pack(c: Compressed) -> tuple[tuple[torch.Tensor, ...], Callable[[Sequence[Any]], Compressed]]:
    """Split a compressed input into its tensors and a rebuilder taking them back."""
    if isinstance(c, TuckerResult):
        n = len(c.factors)
        ev, it = c.explained_variance, c.n_iter
        return (c.core, *c.factors), lambda t: TuckerResult(
            t[0], tuple(t[1 : n + 1]), explained_variance=ev, n_iter=it
        )
    if isinstance(c, SVDResult):
        shape, mode, sv_ev = c.shape, c.mode, c.explained_variance
        return (c.U, c.S, c.Vh), lambda t: SVDResult(t[0], t[1], t[2], shape, mode, sv_ev)
    if isinstance(c, PatchAverage):
        patch, grids = c.patch, c.grids
        return (c.mean,), lambda t: PatchAverage(t[0], patch, grids)
    raise TypeError(
        f"compress must return a TuckerResult, SVDResult or PatchAverage, got {type(c).__name__}"
    )


@contextlib.contextmanager
def _no_autocast(device_type: str) -> Any:
    # The Functions manage dtypes themselves; a surrounding autocast must not
    # re-cast the decomposition's products or the backward's.
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


CompressFn = Callable[[torch.Tensor, tuple[int, ...]], Compressed]
"""``compress(x, output_shape) -> Compressed``, called under ``no_grad``."""


class _ConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: ConvSpec,
        compress: CompressFn,
    ) -> torch.Tensor:
        with _no_autocast(x.device.type):
            y = _conv_forward(x, weight, bias, spec)
            compressed = compress(x, tuple(y.shape)) if ctx.needs_input_grad[1] else None
        tensors, ctx.rebuild = _pack(compressed) if compressed is not None else ((), None)
        ctx.spec = spec
        ctx.x_shape = tuple(x.shape)
        ctx.w_shape = tuple(weight.shape)
        ctx.save_for_backward(weight if ctx.needs_input_grad[0] else None, *tensors)
        return y

    @staticmethod
    @once_differentiable  # the compressed input is a constant: no honest double backward
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        weight, *tensors = ctx.saved_tensors
        spec: ConvSpec = ctx.spec
        gx = gw = gb = None
        with _no_autocast(gy.device.type):
            if ctx.needs_input_grad[0]:
                gx = conv_input_grad(gy, ctx.x_shape, weight, spec)
            if ctx.needs_input_grad[1]:
                gw = conv_weight_grad(ctx.rebuild(tensors), gy, ctx.w_shape, spec)
            if ctx.needs_input_grad[2]:
                gb = gy.sum(dim=[0, *range(2, gy.ndim)])
        return gx, gw, gb, None, None


def linear_base(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as a tensor of its own, not a view.

    ``F.linear`` with a bias returns a view of its 2-D product, and autograd
    forbids overwriting a view made inside a custom Function: an activation
    that writes its output over its input (``int8_activations(in_place=True)``)
    needs a base tensor. For a custom Function's forward (``out=`` products
    do not record gradients).
    """
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    flat = (x.reshape(-1, x.shape[-1]), weight.t())
    if bias is None:
        torch.mm(*flat, out=y.view(-1, weight.shape[0]))
    else:
        torch.addmm(bias, *flat, out=y.view(-1, weight.shape[0]))
    return y


def factored_linear_base(
    x: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    bias: torch.Tensor | None,
    rows: int = 256,
) -> torch.Tensor:
    """``(x R^T) L^T + b`` as a tensor of its own (as :func:`linear_base`), ``rows``
    rows at a time.

    A whole ``N x k`` intermediate ``x R^T`` beside the output would raise a
    layer's forward peak (a factored Linear's, or a fused MLP's second layer's:
    the step's peak in a ViT). For a custom Function's forward, in one dtype.
    """
    out = int(left.shape[0])
    flat_x = x.reshape(-1, x.shape[-1])
    y = x.new_empty((*x.shape[:-1], out))
    flat = y.view(-1, out)
    lt, rt = left.transpose(0, 1), right.transpose(0, 1)
    n = int(flat_x.shape[0])
    buf = flat_x.new_empty((min(rows, n), int(right.shape[0])))  # one chunk, reused
    for i in range(0, n, rows):
        h = torch.mm(flat_x[i : i + rows], rt, out=buf[: min(rows, n - i)])
        if bias is None:
            torch.mm(h, lt, out=flat[i : i + rows])
        else:
            torch.addmm(bias, h, lt, out=flat[i : i + rows])
    return y


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        compress: CompressFn,
    ) -> torch.Tensor:
        with _no_autocast(x.device.type):
            y = linear_base(x, weight, bias)
            compressed = compress(x, tuple(y.shape)) if ctx.needs_input_grad[1] else None
        tensors, ctx.rebuild = _pack(compressed) if compressed is not None else ((), None)
        ctx.save_for_backward(weight if ctx.needs_input_grad[0] else None, *tensors)
        return y

    @staticmethod
    @once_differentiable  # the compressed input is a constant: no honest double backward
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        weight, *tensors = ctx.saved_tensors
        gx = gw = gb = None
        with _no_autocast(gy.device.type):
            if ctx.needs_input_grad[0]:
                gx = gy @ weight
            if ctx.needs_input_grad[1]:
                gw = linear_weight_grad(ctx.rebuild(tensors), gy)
            if ctx.needs_input_grad[2]:
                gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, gw, gb, None


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a conv/linear on ``x`` in, or ``None`` when off."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    if not x.is_floating_point() or x.dtype == torch.float64:
        return None  # autocast leaves float64 alone
    return torch.get_autocast_dtype(device_type)


def conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: ConvSpec,
    compress: CompressFn,
) -> torch.Tensor:
    """An N-d convolution that keeps only ``compress(x)`` for the weight gradient.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, C_in, *spatial)``; any layout (channels-last, strided).
    weight : torch.Tensor
        ``(C_out, C_in / groups, *kernel)``.
    bias : torch.Tensor or None
        ``(C_out,)``.
    spec : ConvSpec
        Stride, padding (any mode, asymmetric), dilation, groups.
    compress : callable
        ``compress(x, output_shape)`` returning a :data:`Compressed` of ``x``;
        called under ``no_grad`` in forward, only when the weight needs a gradient.

    Returns
    -------
    torch.Tensor
        The conv output, equal to ``nn.Conv*d``'s.

    Notes
    -----
    Under autocast the operands are cast first (as ``F.conv2d`` would), so the
    compressed input and all gradients use autocast's dtype; the casts are
    differentiable, so parameters still receive gradients in their own dtype.
    """
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    out: torch.Tensor = _ConvFunction.apply(x, weight, bias, spec, compress)
    return out


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compress: CompressFn
) -> torch.Tensor:
    """``F.linear`` that keeps only ``compress(x)`` for the weight gradient.

    ``x`` is ``(*lead, C_in)`` with any number of leading dims; see :func:`conv`.
    """
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    out: torch.Tensor = _LinearFunction.apply(x, weight, bias, compress)
    return out
