"""Low-rank Linear and Conv2d layers: the weight kept as two factors ``W = L R``.

A :class:`LowRankLinear` holds ``left`` (``L``, ``out x k``) and ``right``
(``R``, ``k x in``) instead of a dense ``weight`` and computes
``y = (x R^T) L^T + b``: two products costing ``k (in + out)`` multiply-adds
per row instead of ``in * out``. A :class:`LowRankConv2d` is a ``k x k`` conv
to ``k`` channels (``right``, ``(k, C_in, kh, kw)``, with the dense conv's
stride, padding, dilation and padding mode) followed by a 1x1 conv
(``left``, ``(C_out, k)``) and the bias; its weight matrix is the dense
weight reshaped to ``(C_out, C_in * kh * kw)``.

These are the inference layers: plain modules with two products and no
autograd machinery. The factored *training* layers of
:mod:`tensorcompress.torch.wasi` subclass them (same parameters, same
``state_dict`` keys), so:

- :func:`export_low_rank` turns a trained model's factored layers into these
  (same outputs, bit for bit);
- :func:`to_dense` puts ``nn.Linear``/``nn.Conv2d`` back with
  ``weight = L R`` (the only place a dense weight is formed);
- :meth:`LowRankLinear.from_dense` / :meth:`LowRankConv2d.from_dense` factor
  a dense layer by truncated SVD (``L = U_k``, orthonormal columns;
  ``R = S_k V_k^T``), at an int rank or at an explained-variance threshold
  of the weight's spectrum (:func:`factorize`); or, given the Gram matrix of
  the layer's outputs on real inputs, in the basis that keeps most of those
  outputs (``L`` its leading eigenvectors, ``R = L^T W``);
- :func:`factor_by_outputs` does that to a model's layers in place, each at
  the rank that keeps a share of its outputs' energy (post-training
  compression, of frozen layers say).

Only ``groups == 1`` convolutions factor this way: a grouped conv's weight
is block-diagonal across groups, not one matrix, so it is refused with an
error naming the layer.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from tensorcompress import rank as _rank
from tensorcompress.torch.convert import replace_module
from tensorcompress.torch.functions import ConvSpec, pointwise_conv

__all__ = [
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankModule",
    "check_output_gram",
    "conv_with",
    "export_low_rank",
    "factor_by_outputs",
    "factorize",
    "low_rank_layers",
    "output_basis",
    "output_rank",
    "to_dense",
    "weight_rank",
    "weight_svd",
]


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}->{module.out_features}"
    if isinstance(module, nn.Conv2d):
        k = "x".join(str(int(v)) for v in module.kernel_size)
        return f"Conv2d {module.in_channels}->{module.out_channels} {k}, groups={module.groups}"
    return type(module).__name__


def weight_svd(
    matrix: torch.Tensor, *, name: str = "<unnamed>"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a weight matrix, in float32 for half-precision weights.

    The one SVD :func:`factorize` and
    :func:`~tensorcompress.torch.budget.measure_weight_sensitivity` take.
    ``ValueError`` (naming the layer) on NaN or Inf.
    """
    u, s, vh = torch.linalg.svd(_finite_weight(matrix, name), full_matrices=False)
    return u, s, vh


def _finite_weight(matrix: torch.Tensor, name: str) -> torch.Tensor:
    """The weight detached, in float32 if half precision; ``ValueError`` on NaN or Inf."""
    work = matrix.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    if not bool(torch.isfinite(work).all()):
        raise ValueError(f"layer {name!r}: the weight holds NaN or Inf; it cannot be factored")
    return work


def weight_rank(singular_values: torch.Tensor, rank: int | float) -> int:
    """The ``k`` a checked ``rank`` (an int, or a threshold in (0, 1]) gives a
    weight with these singular values: the smallest ``k`` whose explained
    variance reaches a threshold (``rtol`` the values' machine epsilon)."""
    if isinstance(rank, numbers.Integral):
        return int(rank)
    sq = (singular_values.double() ** 2).cpu().numpy()
    rtol = float(torch.finfo(singular_values.dtype).eps)
    return _rank.rank_for_threshold(sq, float(rank), rtol=rtol)


def output_basis(gram: torch.Tensor) -> torch.Tensor:
    """The eigenvectors of a layer's output Gram matrix, by decreasing eigenvalue.

    ``gram`` is ``Y^T Y`` (``out x out``, :func:`~tensorcompress.torch.budget.output_grams`),
    ``Y`` the layer's outputs (bias aside) over real inputs. Its first ``k``
    columns span the rank-``k`` weight ``L L^T W`` closest to ``W`` on those
    outputs: ``||X (W - L L^T W)^T||_F`` is the smallest a rank-``k`` weight
    reaches (the truncated SVD of ``W S`` with ``S S^T = X^T X``; the basis
    of SVD-LLM and DRONE, found here without whitening). Computed in float64.
    """
    _, vectors = torch.linalg.eigh(gram.double())
    return vectors.flip(1)


def output_rank(gram: torch.Tensor, threshold: float) -> int:
    """The smallest ``k`` whose leading directions of the outputs keep ``threshold``
    of their energy: the explained variance of the eigenvalues of ``gram``
    (``Y^T Y``, :func:`~tensorcompress.torch.budget.output_grams`), in float64."""
    values = torch.linalg.eigvalsh(gram.detach().double()).flip(0).cpu().numpy()
    rtol = float(torch.finfo(torch.float64).eps)
    return _rank.rank_for_threshold(values, threshold, rtol=rtol)


def factorize(
    matrix: torch.Tensor,
    rank: int | float,
    *,
    name: str = "<unnamed>",
    output_gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD ``matrix ~ L R`` with ``L = U_k`` and ``R = S_k V_k^T``, or the
    same rank in the basis of the layer's outputs.

    Parameters
    ----------
    matrix : torch.Tensor
        ``(out, in)`` weight matrix. Half-precision weights are factored in
        float32; the factors come back in ``matrix``'s dtype and device.
    rank : int or float
        An int ``k`` in ``[1, min(out, in)]``, or a float in (0, 1]: the
        smallest ``k`` whose explained variance (sum of the ``k`` largest
        squared singular values over all of them) reaches it.
    name : str
        The layer's name, for error messages.
    output_gram : torch.Tensor, optional
        ``(out, out)``: the Gram matrix ``Y^T Y`` of the layer's outputs
        (bias aside) on real inputs
        (:func:`~tensorcompress.torch.budget.output_grams`). Then ``L`` is
        its ``k`` leading eigenvectors (:func:`output_basis`) and
        ``R = L^T W``: of all rank-``k`` weights, the one whose outputs on
        those inputs are closest to the layer's. ``k`` still comes from the
        weight's spectrum, so the factors hold the same numbers as the SVD's.

    Returns
    -------
    left : torch.Tensor
        ``(out, k)`` with orthonormal columns.
    right : torch.Tensor
        ``(k, in)``.
    explained : float
        The share of ``||W||^2`` that ``L R`` keeps: the explained variance
        of rank ``k`` of the spectrum for the SVD, at most that with
        ``output_gram``.

    Raises
    ------
    TypeError
        ``rank`` is not an int or a float (a bool included).
    ValueError
        An int rank outside ``[1, min(out, in)]``, a float outside (0, 1], a
        weight or Gram matrix holding NaN or Inf, or a Gram matrix not
        ``(out, out)``; the message names the layer.
    """
    if matrix.ndim != 2:
        raise ValueError(
            f"layer {name!r}: expected a weight matrix, got shape {tuple(matrix.shape)}"
        )
    out_dim, in_dim = (int(n) for n in matrix.shape)
    full = min(out_dim, in_dim)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise TypeError(f"layer {name!r}: rank must be an int or a float in (0, 1], got {rank!r}")
    if isinstance(rank, numbers.Integral):
        if not 1 <= int(rank) <= full:
            raise ValueError(
                f"layer {name!r}: rank {int(rank)} is outside [1, {full}] for its "
                f"{out_dim}x{in_dim} weight (min(out, in) = {full})"
            )
    elif not (0.0 < float(rank) <= 1.0):
        raise ValueError(
            f"layer {name!r}: a float rank is an explained-variance threshold in (0, 1], "
            f"got {rank!r}"
        )
    if output_gram is not None and isinstance(rank, numbers.Integral):
        # The rank is given and the basis is the outputs': no SVD of the weight needed.
        _finite_weight(matrix, name)
        k = int(rank)
    else:
        u, s, vh = weight_svd(matrix, name=name)
        k = weight_rank(s, rank)
    if output_gram is None:
        explained = float(_rank.explained_variance((s.double() ** 2).cpu().numpy())[k - 1])
        left = u[:, :k].contiguous().to(matrix.dtype)
        right = (s[:k, None] * vh[:k]).contiguous().to(matrix.dtype)
        return left, right, explained
    check_output_gram(output_gram, out_dim, name)
    basis = output_basis(output_gram.to(matrix.device))[:, :k]
    weight = matrix.detach().double()
    right64 = basis.transpose(0, 1) @ weight
    total = float(weight.square().sum())
    explained = float(right64.square().sum()) / total if total > 0 else 1.0
    left = basis.contiguous().to(matrix.dtype)
    return left, right64.contiguous().to(matrix.dtype), explained


def check_output_gram(gram: torch.Tensor, out_dim: int, name: str) -> None:
    """``ValueError`` naming the layer unless ``gram`` is a finite ``(out, out)`` matrix."""
    if not isinstance(gram, torch.Tensor) or tuple(gram.shape) != (out_dim, out_dim):
        shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise ValueError(
            f"layer {name!r}: its output Gram matrix must be ({out_dim}, {out_dim}) "
            f"(out x out), got {shape}"
        )
    if not bool(torch.isfinite(gram).all()):
        raise ValueError(f"layer {name!r}: its output Gram matrix holds NaN or Inf")


class LowRankModule(nn.Module):
    """Behaviour shared by the low-rank layers (not instantiated directly).

    Attributes
    ----------
    left : nn.Parameter
        ``L``, ``(out, k)``.
    right : nn.Parameter
        ``R``, ``(k, in)`` for Linear, ``(k, C_in, kh, kw)`` for Conv2d.
    bias : nn.Parameter or None
        ``(out,)``.
    weight_explained_variance : float or None
        For a layer built by ``from_dense``: the share of the dense weight's
        squared norm that ``L R`` keeps (its spectrum's explained variance at
        rank ``k``, for the SVD).
    """

    left: nn.Parameter
    right: nn.Parameter
    bias: nn.Parameter | None
    weight_explained_variance: float | None = None

    @property
    def rank(self) -> int:
        """``k``, the number of columns of ``left``."""
        return int(self.left.shape[1])

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """Shape of the dense weight ``L R`` stands for."""
        return (int(self.left.shape[0]), *(int(n) for n in self.right.shape[1:]))

    def dense_weight(self) -> torch.Tensor:
        """``L R`` in the dense layer's weight shape (forms the full weight; no gradient)."""
        with torch.no_grad():
            k = self.rank
            return (self.left @ self.right.reshape(k, -1)).reshape(self.dense_shape)

    @property
    def break_even_rank(self) -> float:
        """``out * in / (out + in)`` (``in`` counting a conv's kernel): the rank at
        which ``L`` and ``R`` hold as many numbers as the dense weight, the break-even
        of memory, optimizer state and FLOPs."""
        out, inner = self.dense_shape[0], math.prod(self.dense_shape[1:])
        return out * inner / (out + inner)

    @property
    def smaller_than_dense(self) -> bool:
        """Whether ``L`` and ``R`` hold fewer numbers than the dense weight
        (``k`` below :attr:`break_even_rank`)."""
        return self.rank < self.break_even_rank

    def factor_bytes(self) -> int:
        """Bytes of ``left``, ``right`` and ``bias``."""
        return sum(p.numel() * p.element_size() for p in self.parameters(recurse=False))

    def _dense_module(self) -> nn.Module:
        raise NotImplementedError

    def _inference_type(self) -> type[LowRankModule]:
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        """The dense layer with ``weight = L R`` and the same bias object.

        ``weight.requires_grad`` follows ``left``'s; the layer's training flag
        is kept.
        """
        dense = self._dense_module()
        with torch.no_grad():
            dense.weight = nn.Parameter(
                self.dense_weight().clone(), requires_grad=self.left.requires_grad
            )
        dense.register_parameter("bias", self.bias)
        dense.train(self.training)
        return dense

    def to_low_rank(self) -> LowRankModule:
        """The plain inference layer with these parameters (same tensors, not copies)."""
        cls = self._inference_type()
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for key, value in self._low_rank_attributes().items():
            setattr(new, key, value)
        new.left = self.left
        new.right = self.right
        new.bias = self.bias
        new.weight_explained_variance = self.weight_explained_variance
        new.train(self.training)
        return new

    def _low_rank_attributes(self) -> dict[str, Any]:
        return {}


class LowRankLinear(LowRankModule):
    """``y = (x R^T) L^T + b``: a Linear whose weight is kept as ``L R``.

    Parameters
    ----------
    in_features, out_features : int
        As in ``nn.Linear``.
    rank : int
        ``k``, at most ``min(in_features, out_features)``.
    bias : bool, default True
    device, dtype : optional
        Factory arguments.

    Notes
    -----
    A freshly built layer has ``L`` with random orthonormal columns and ``R``
    drawn like ``nn.Linear``'s weight; build it from a trained layer with
    :meth:`from_dense`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if not 1 <= int(rank) <= min(in_features, out_features):
            raise ValueError(
                f"rank must be in [1, min(in_features, out_features)] = "
                f"[1, {min(in_features, out_features)}], got {rank!r}"
            )
        kw = {"device": device, "dtype": dtype}
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.left = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.right = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random orthonormal ``L``; ``R`` and ``bias`` drawn as ``nn.Linear`` draws its own."""
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(self.left.shape, dtype=torch.float64))
            self.left.copy_(q)
            bound = 1.0 / math.sqrt(self.in_features)
            self.right.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        rank: int | float,
        *,
        name: str = "",
        output_gram: torch.Tensor | None = None,
    ) -> LowRankLinear:
        """Factor ``linear``'s weight by truncated SVD, or in the basis of its
        outputs' Gram matrix (see :func:`factorize`).

        The bias is the same Parameter object; ``left`` and ``right`` are new
        Parameters on the weight's device and dtype, trainable if the weight was.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"layer {name or '<unnamed>'!r}: {cls.__name__}.from_dense needs an nn.Linear, "
                f"got {type(linear).__name__}"
            )
        left, right, explained = factorize(
            linear.weight, rank, name=name or "<unnamed>", output_gram=output_gram
        )
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features = linear.in_features
        new.out_features = linear.out_features
        trainable = linear.weight.requires_grad
        new.left = nn.Parameter(left, requires_grad=trainable)
        new.right = nn.Parameter(right, requires_grad=trainable)
        new.bias = cast("nn.Parameter | None", linear.bias)
        new.weight_explained_variance = explained
        new.train(linear.training)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``F.linear(F.linear(input, R), L, bias)``."""
        return F.linear(F.linear(input, self.right), self.left, self.bias)

    def _dense_module(self) -> nn.Module:
        p = self.left
        return nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=p.device,
            dtype=p.dtype,
        )

    def _inference_type(self) -> type[LowRankModule]:
        return LowRankLinear

    def _low_rank_attributes(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    a, b = (int(v) for v in value)
    return (a, b)


class LowRankConv2d(LowRankModule):
    """A ``k x k`` conv to ``rank`` channels (``R``), then a 1x1 conv (``L``) and the bias.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding, dilation, padding_mode :
        As in ``nn.Conv2d`` (``padding`` may be ``'same'``/``'valid'``); they
        apply to the first conv. ``groups`` must be 1.
    rank : int
        ``k``, at most ``min(out_channels, in_channels * kh * kw)``.
    bias : bool, default True
    device, dtype : optional
        Factory arguments.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        rank: int,
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        kh, kw_ = _pair(kernel_size)
        full = min(out_channels, in_channels * kh * kw_)
        if not 1 <= int(rank) <= full:
            raise ValueError(
                f"rank must be in [1, min(out_channels, in_channels * kh * kw)] = [1, {full}], "
                f"got {rank!r}"
            )
        self._set_conv(
            in_channels, out_channels, (kh, kw_), stride, padding, dilation, padding_mode
        )
        kw = {"device": device, "dtype": dtype}
        self.left = nn.Parameter(torch.empty(out_channels, rank, **kw))
        self.right = nn.Parameter(torch.empty(rank, in_channels, kh, kw_, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self.reset_parameters()

    def _set_conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: int | Sequence[int],
        padding: str | int | Sequence[int],
        dilation: int | Sequence[int],
        padding_mode: str,
    ) -> None:
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = kernel_size
        self.stride = _pair(stride)
        self.padding: str | tuple[int, int] = (
            padding if isinstance(padding, str) else _pair(padding)
        )
        self.dilation = _pair(dilation)
        self.padding_mode = padding_mode
        self.spec = ConvSpec.make(
            kernel_size, self.stride, self.padding, self.dilation, 1, padding_mode, ndim=2
        )

    def reset_parameters(self) -> None:
        """Random orthonormal ``L``; ``R`` and ``bias`` drawn as ``nn.Conv2d`` draws its own."""
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(self.left.shape, dtype=torch.float64))
            self.left.copy_(q)
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1.0 / math.sqrt(fan_in)
            self.right.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        rank: int | float,
        *,
        name: str = "",
        output_gram: torch.Tensor | None = None,
    ) -> LowRankConv2d:
        """Factor ``conv``'s weight, reshaped to ``(C_out, C_in * kh * kw)``, by truncated SVD,
        or in the basis of its outputs' Gram matrix over channels (see :func:`factorize`).

        Raises
        ------
        TypeError
            ``conv`` is not an ``nn.Conv2d``.
        ValueError
            ``groups != 1`` (the weight is not one matrix), or a bad rank; the
            message names the layer.
        """
        where = name or "<unnamed>"
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(
                f"layer {where!r}: {cls.__name__}.from_dense needs an nn.Conv2d, "
                f"got {type(conv).__name__}"
            )
        if conv.groups != 1:
            raise ValueError(
                f"layer {where!r} ({_describe(conv)}) cannot be factored as L R: a grouped "
                "conv's weight is one block per group, not one matrix; leave it out of `layers`"
            )
        w = conv.weight
        left, right, explained = factorize(
            w.reshape(w.shape[0], -1), rank, name=where, output_gram=output_gram
        )
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        new._set_conv(
            conv.in_channels,
            conv.out_channels,
            _pair(conv.kernel_size),
            conv.stride,
            padding,
            conv.dilation,
            conv.padding_mode,
        )
        trainable = w.requires_grad
        new.left = nn.Parameter(left, requires_grad=trainable)
        new.right = nn.Parameter(right.reshape(-1, *w.shape[1:]), requires_grad=trainable)
        new.bias = cast("nn.Parameter | None", conv.bias)
        new.weight_explained_variance = explained
        new.train(conv.training)
        return new

    def conv_right(self, input: torch.Tensor, right: torch.Tensor | None = None) -> torch.Tensor:
        """The first conv, ``input * R`` (any padding mode), to ``k`` channels."""
        return conv_with(input, self.right if right is None else right, self.spec)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``conv2d(conv2d(input, R, ...), L[:, :, None, None], bias)``."""
        z = self.conv_right(input)
        return pointwise_conv(z, self.left, self.bias)

    def _dense_module(self) -> nn.Module:
        p = self.left
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            padding_mode=cast(Any, self.padding_mode),
            device=p.device,
            dtype=p.dtype,
        )

    def _inference_type(self) -> type[LowRankModule]:
        return LowRankConv2d

    def _low_rank_attributes(self) -> dict[str, Any]:
        keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
        return {k: getattr(self, k) for k in (*keys, "padding_mode", "spec")}

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"rank={self.rank}, stride={self.stride}"
        )
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}"


def conv_with(x: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """``conv2d`` of ``x`` with ``weight`` under ``spec`` (padding of any mode, asymmetric)."""
    native = spec.native_padding
    if native is None:
        flat = [p for pair in reversed(spec.pads) for p in pair]
        mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
        x, native = F.pad(x, flat, mode=mode), (0, 0)
    return F.conv2d(x, weight, None, spec.stride, native, spec.dilation)


# ---------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------


def factor_by_outputs(
    model: nn.Module,
    output_grams: Mapping[str, torch.Tensor],
    threshold: float,
    *,
    only_if_smaller: bool = True,
) -> dict[str, int]:
    """Factor layers in the basis of their outputs, at the rank their outputs need; in place.

    Post-training low-rank compression (the rank-``k`` weight closest to each
    layer on real inputs, as SVD-LLM): every layer named in ``output_grams``
    becomes a :class:`LowRankLinear`/:class:`LowRankConv2d` whose ``L`` is
    the leading ``k`` eigenvectors of its Gram matrix and ``R = L^T W``, with
    ``k`` the smallest rank that keeps ``threshold`` of the outputs' energy
    (:func:`output_rank`). Unlike a threshold on the weight's own spectrum,
    this sees that a layer's inputs use few of its directions. Whether the
    factors train follows the weight, so a frozen layer stays frozen: use it
    on the layers before the fine-tuned ones, which then cost ``k (in + out)``
    multiply-adds per row in training and in inference.

    Parameters
    ----------
    model : nn.Module
        Modified in place.
    output_grams : dict
        From qualified name to the Gram matrix of that layer's outputs on real
        inputs (:func:`~tensorcompress.torch.budget.output_grams`); these are
        the layers factored.
    threshold : float
        Share of the outputs' energy to keep, in (0, 1].
    only_if_smaller : bool, default True
        Leave a layer dense where its factors would hold as many numbers as its
        weight or more (``k`` at or above
        :attr:`LowRankModule.break_even_rank`): no saving there.

    Returns
    -------
    dict
        The rank of each layer factored.

    Raises
    ------
    TypeError, ValueError
        A layer that is not a Linear or a Conv2d with ``groups == 1``, a bad
        Gram matrix (naming the layer), the model itself (name ``""``) or a
        threshold outside (0, 1]; nothing is factored then.
    """
    if isinstance(threshold, bool) or not (
        isinstance(threshold, numbers.Real) and 0.0 < float(threshold) <= 1.0
    ):
        raise ValueError(f"threshold must be a float in (0, 1], got {threshold!r}")
    modules = dict(model.named_modules())
    new: dict[str, LowRankModule] = {}
    for name, gram in output_grams.items():
        module = modules.get(name)
        if name == "":
            raise ValueError(
                "factor_by_outputs replaces a model's layers in place, not the model itself; "
                "factor one layer with LowRankLinear/LowRankConv2d.from_dense(..., output_gram=)"
            )
        if not isinstance(module, nn.Linear | nn.Conv2d):
            kind = "no module" if module is None else _describe(module)
            raise TypeError(f"layer {name!r}: {kind}; only Linear and Conv2d layers factor")
        out_dim = int(module.weight.shape[0])
        check_output_gram(gram, out_dim, name)
        # Outputs of rank above min(out, in) are round-off.
        k = min(output_rank(gram, float(threshold)), min(module.weight.reshape(out_dim, -1).shape))
        cls: Any = LowRankLinear if isinstance(module, nn.Linear) else LowRankConv2d
        new[name] = cls.from_dense(module, k, name=name, output_gram=gram)
    if only_if_smaller:
        new = {name: layer for name, layer in new.items() if layer.smaller_than_dense}
    for name, layer in new.items():
        replace_module(model, modules[name], layer)
    return {name: layer.rank for name, layer in new.items()}


def low_rank_layers(model: nn.Module) -> dict[str, LowRankModule]:
    """The low-rank layers of ``model`` (training or inference ones), by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankModule)}


def _swap(model: nn.Module, make: Any) -> nn.Module:
    if isinstance(model, LowRankModule):
        out: nn.Module = make(model)
        return out
    done: dict[int, nn.Module] = {}
    for m in list(low_rank_layers(model).values()):
        if id(m) not in done:
            done[id(m)] = make(m)
            replace_module(model, m, done[id(m)])
    return model


def export_low_rank(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The model for inference: every factored layer as a plain low-rank layer.

    Training layers (:class:`~tensorcompress.torch.wasi.WASILinear`,
    :class:`~tensorcompress.torch.wasi.WASIConv2d`) become
    :class:`LowRankLinear`/:class:`LowRankConv2d`: two products, no autograd
    Function, no compression state. The outputs are those of the trained model
    (bit for bit: the same products on the same tensors), and the
    ``state_dict`` keys are unchanged (``left``, ``right``, ``bias``).

    Parameters
    ----------
    model : nn.Module
        A model with factored layers (or one factored layer).
    inplace : bool, default False
        By default ``model`` is deep-copied first, so the training model
        keeps training; with True its layers are swapped in place and the new
        layers share its parameters.

    Returns
    -------
    nn.Module
        The exported model (or layer).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tensorcompress.torch.wasi import to_wasi
    >>> net = to_wasi(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), method="wsi", rank=4)
    >>> type(export_low_rank(net)[0]).__name__
    'LowRankLinear'
    """
    target = model if inplace else copy.deepcopy(model)
    return _swap(target, lambda m: m.to_low_rank())


def to_dense(model: nn.Module) -> nn.Module:
    """Put ``nn.Linear``/``nn.Conv2d`` back for every low-rank layer, in place.

    The dense weight is ``L R`` (``requires_grad`` as ``left``'s), the bias is
    the same object, the settings (stride, padding, ...) are the layer's. Use
    it to hand a fine-tuned model to code that wants ``weight``; the dense
    model computes the same function up to the rounding of one product.

    Returns
    -------
    nn.Module
        ``model`` (or the dense layer if ``model`` is one low-rank layer).
    """
    return _swap(model, lambda m: m.to_dense())
