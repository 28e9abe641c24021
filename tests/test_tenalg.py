from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
from core_data import make

from tensorcompress import tenalg


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_unfold_matches_tensorly_and_fold_inverts(backend: str, mode: int) -> None:
    a = np.random.default_rng(0).standard_normal((3, 4, 5, 6))
    x = make(backend, "float64")(a)
    u = tenalg.unfold(x, mode)
    np.testing.assert_allclose(np.asarray(u), tl.unfold(a, mode))
    np.testing.assert_allclose(np.asarray(tenalg.fold(u, mode, a.shape)), a)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
# The shapes and output widths reach every product form: narrow outputs
# widened by grouped rows, short trailing blocks folded into one product,
# batched products and mode-first copies.
@pytest.mark.parametrize(
    "shape", [(3, 4, 5, 6), (8, 6, 3, 2), (5, 7, 4, 9), (2, 30, 5, 1), (2, 300, 2, 1)]
)
@pytest.mark.parametrize("rows", [2, 13])
def test_mode_dot_gram_cross_gram_match_unfolded_products(
    backend: str, mode: int, shape: tuple[int, ...], rows: int
) -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal(shape)
    m = rng.standard_normal((rows, a.shape[mode]))
    conv = make(backend, "float64")
    x = conv(a)
    np.testing.assert_allclose(
        np.asarray(tenalg.mode_dot(x, conv(m), mode)), tl.tenalg.mode_dot(a, m, mode)
    )
    np.testing.assert_allclose(
        np.asarray(tenalg.gram(x, mode)), tl.unfold(a, mode) @ tl.unfold(a, mode).T, atol=1e-12
    )
    b = tl.tenalg.mode_dot(a, m, mode)
    np.testing.assert_allclose(
        np.asarray(tenalg.cross_gram(x, conv(b), mode)),
        tl.unfold(a, mode) @ tl.unfold(b, mode).T,
        atol=1e-12,
    )


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_partial_trace_matches_einsum(backend: str) -> None:
    g = np.random.default_rng(4).standard_normal((3, 4, 5, 4))
    got = tenalg.partial_trace(make(backend, "float64")(g))
    np.testing.assert_allclose(np.asarray(got), np.einsum("ajbj->ab", g))


def test_kron_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((3, 2)), rng.standard_normal((4, 5))
    np.testing.assert_allclose(tenalg.kron(a, b), np.kron(a, b))


def test_tucker_to_tensor_matches_tensorly() -> None:
    rng = np.random.default_rng(2)
    core = rng.standard_normal((2, 3, 4))
    factors = [rng.standard_normal((n, r)) for n, r in zip((5, 6, 7), core.shape)]
    np.testing.assert_allclose(
        tenalg.tucker_to_tensor(core, factors), tl.tucker_to_tensor((core, factors))
    )
    np.testing.assert_allclose(
        tenalg.multi_mode_dot(tl.tucker_to_tensor((core, factors)), factors, transpose=True),
        tl.tenalg.multi_mode_dot(tl.tucker_to_tensor((core, factors)), factors, transpose=True),
    )


def test_relative_error_of_zero_tensor_is_zero() -> None:
    z = np.zeros((3, 3))
    assert tenalg.relative_error(z, z) == 0.0
