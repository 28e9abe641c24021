"""Backend resolution and input validation shared by every decomposition.

The namespace is resolved once per public call with array-api-compat; inner
steps receive it as an argument, so the core never imports a framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, is_torch_array

__all__ = [
    "Array",
    "Casts",
    "all_finite",
    "as_compute",
    "cast",
    "check_tensor",
    "device",
    "from_numpy",
    "namespace",
    "to_float",
    "to_numpy",
]

Array = Any  # any array-API array (numpy.ndarray, torch.Tensor, ...)

_LOW_PRECISION = ("float16", "bfloat16")


def namespace(x: Array) -> Any:
    """Return the array-API namespace of ``x`` (numpy, torch, ...)."""
    return array_namespace(x)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def check_tensor(x: Array, name: str = "x", min_ndim: int = 2, check_finite: bool = True) -> Any:
    """Validate a tensor argument and return its namespace.

    Raises
    ------
    TypeError
        If ``x`` is not an array, or its dtype is not real floating point.
    ValueError
        If ``x`` has fewer than ``min_ndim`` dimensions, is empty, or (with
        ``check_finite``) holds NaN or Inf.
    """
    try:
        xp = array_namespace(x)
    except TypeError:
        raise TypeError(
            f"{name} must be a numpy array or torch tensor, got {type(x).__name__}"
        ) from None
    dtype = _dtype_name(x.dtype)
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype (float16/bfloat16/float32/float64), "
            f"got {dtype}"
        )
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}"
        )
    if any(int(n) == 0 for n in x.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if check_finite and not all_finite(x, xp):
        raise ValueError(f"{name} contains NaN or Inf values")
    return xp


def all_finite(x: Array, xp: Any = None) -> bool:
    """Whether ``x`` holds no NaN or infinity (one reduction pass, no full-size mask)."""
    # NaN propagates to the minimum and maximum, and an infinity is one of them.
    xp = xp if xp is not None else array_namespace(x)
    if is_torch_array(x):
        lo, hi = x.detach().aminmax()
    else:
        lo, hi = xp.min(x), xp.max(x)
    return bool(xp.isfinite(lo) and xp.isfinite(hi))


def as_compute(xp: Any, x: Array) -> Array:
    """Return ``x`` in the dtype decompositions run in (float16/bfloat16 -> float32)."""
    if _dtype_name(x.dtype) in _LOW_PRECISION:
        return xp.astype(x, xp.float32)
    return x


def to_float(value: Any) -> float:
    """Convert a 0-d array (any backend, any device) to a Python float."""
    if is_torch_array(value):
        return float(value.item())
    return float(np.asarray(value))


def to_numpy(a: Array) -> np.ndarray:
    """Copy a (small) array of any backend and device to a float64 numpy array."""
    if is_torch_array(a):
        return a.detach().to("cpu").double().numpy()
    return np.asarray(a, dtype=np.float64)


def from_numpy(xp: Any, a: np.ndarray, like: Array) -> Array:
    """Move a numpy array to ``like``'s backend, device and dtype."""
    return xp.asarray(a, dtype=like.dtype, device=device(like))


def cast(xp: Any, a: Array, dtype: Any) -> Array:
    """Return ``a`` in ``dtype`` (no copy when it already is)."""
    return a if a.dtype == dtype else xp.astype(a, dtype)


@dataclass(frozen=True)
class Casts:
    """The two dtypes of a decomposition with ``product_dtype``.

    Tensor products run in ``low`` (the input is cast once, each factor as
    it is used); bases are orthonormalised, energies summed and results
    kept in ``high``, the input's compute dtype.
    """

    xp: Any
    high: Any
    low: Any

    @classmethod
    def of(cls, xp: Any, x: Array, product_dtype: Any) -> Casts:
        """Validate ``product_dtype`` (``None``: ``x``'s dtype) against ``x``'s namespace."""
        if product_dtype is None:
            return cls(xp, x.dtype, x.dtype)
        try:
            floating = bool(xp.isdtype(product_dtype, "real floating"))
        except (TypeError, ValueError, AttributeError):
            floating = False
        if not floating:
            raise TypeError(
                "product_dtype must be a real floating dtype of x's array library "
                f"(such as torch.bfloat16 for a torch tensor), got {product_dtype!r}"
            )
        return cls(xp, x.dtype, product_dtype)

    def to_low(self, a: Array) -> Array:
        """``a`` in the products' dtype."""
        return cast(self.xp, a, self.low)

    def to_high(self, a: Array) -> Array:
        """``a`` in the results' dtype."""
        return cast(self.xp, a, self.high)
