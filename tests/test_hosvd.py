from __future__ import annotations

import math

import numpy as np
import pytest
import tensorly as tl
import torch
from core_data import decaying_tensor, low_rank_tensor, tol
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorcompress import hosvd


def _orthonormal(u: object) -> bool:
    a = np.asarray(u, dtype=np.float64)
    return np.allclose(a.T @ a, np.eye(a.shape[1]), atol=1e-4 if "32" in str(u.dtype) else 1e-10)  # type: ignore[attr-defined]


def _discarded_bound(a: np.ndarray, ranks: tuple[int, ...]) -> float:
    # Sum over modes of the squared singular values of the unfolding beyond rank r_k.
    total = 0.0
    for k, r in enumerate(ranks):
        s = np.linalg.svd(tl.unfold(a, k), compute_uv=False)
        total += float(np.sum(s[r:] ** 2))
    return total


@pytest.mark.parametrize("sequential", [True, False])
def test_full_rank_reconstructs_exactly(to_backend, sequential: bool) -> None:
    x = to_backend(np.random.default_rng(0).standard_normal((6, 5, 4, 3)))
    res = hosvd.decompose(x, tuple(x.shape), sequential=sequential)
    assert type(res.core) is type(x) and res.core.dtype == x.dtype
    assert res.relative_error(x) < tol(x)
    assert all(_orthonormal(u) for u in res.factors)


@pytest.mark.parametrize("sequential", [True, False])
def test_recovers_exact_low_rank_tensor(to_backend, sequential: bool) -> None:
    x = to_backend(low_rank_tensor((10, 8, 7, 6), (3, 2, 4, 2)))
    res = hosvd.decompose(x, (3, 2, 4, 2), sequential=sequential)
    assert res.ranks == (3, 2, 4, 2)
    assert res.relative_error(x) < tol(x)
    # A threshold of 1 finds the exact multilinear rank.
    assert hosvd.decompose(x, 1.0, sequential=sequential).ranks == (3, 2, 4, 2)


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("ranks", [(2, 2, 2, 2), (5, 1, 3, 4), (1, 6, 2, 5)])
def test_error_within_hosvd_bound(to_backend, sequential: bool, ranks: tuple[int, ...]) -> None:
    a = decaying_tensor((8, 7, 6, 5), seed=3)
    x = to_backend(a)
    res = hosvd.decompose(x, ranks, sequential=sequential)
    err2 = float(np.sum((np.asarray(res.reconstruct(), dtype=np.float64) - a) ** 2))
    assert err2 <= _discarded_bound(a, ranks) * (1 + 1e-3) + 1e-8
    assert all(_orthonormal(u) for u in res.factors)


def test_same_ranks_and_error_as_textbook_svd_hosvd() -> None:
    # Gram + eigh must give the textbook (SVD-of-unfolding) ranks and error.
    a = decaying_tensor((12, 30, 5, 4), seed=4)
    res = hosvd.decompose(a, 0.8, sequential=False)
    ref_factors = []
    for k in range(a.ndim):
        u, s, _ = np.linalg.svd(tl.unfold(a, k), full_matrices=False)
        cum = np.cumsum(s**2) / np.sum(s**2)
        r = int(np.searchsorted(cum, 0.8) + 1)
        assert res.ranks[k] == r
        ref_factors.append(u[:, :r])
    ref = tl.tucker_to_tensor(
        (tl.tenalg.multi_mode_dot(a, ref_factors, transpose=True), ref_factors)
    )
    np.testing.assert_allclose(res.relative_error(a), tl.norm(a - ref) / tl.norm(a), rtol=1e-8)


def test_tall_unfolding_uses_svd_and_completes_basis(to_backend) -> None:
    # Mode 0 (20) is longer than the rest (2*2=4): SVD path, ranks up to 20.
    x = to_backend(np.random.default_rng(5).standard_normal((20, 2, 2)))
    res = hosvd.decompose(x, (20, 2, 2))
    assert res.relative_error(x) < tol(x)
    assert _orthonormal(res.factors[0])
    assert hosvd.decompose(x, (3, 2, 1)).ranks == (3, 2, 1)


def test_explained_variance_reported_and_ranks_monotone() -> None:
    a = decaying_tensor((10, 9, 8), seed=6)
    prev = (0, 0, 0)
    for eps in (0.3, 0.5, 0.7, 0.9, 0.99):
        res = hosvd.decompose(a, eps, sequential=False)
        assert all(ev >= eps - 1e-9 for ev in res.explained_variance if ev is not None)
        assert all(r >= p for r, p in zip(res.ranks, prev))
        prev = res.ranks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computed_in_float32_returned_in_input_dtype(dtype: torch.dtype) -> None:
    x = torch.as_tensor(low_rank_tensor((8, 6, 5), (2, 2, 2)), dtype=dtype)
    res = hosvd.decompose(x, (2, 2, 2))
    assert res.core.dtype == dtype and all(u.dtype == dtype for u in res.factors)
    assert res.reconstruct().dtype == dtype
    assert res.relative_error(x) < 2e-2


def test_zero_and_rank_deficient_tensors_have_no_nan(to_backend) -> None:
    z = to_backend(np.zeros((5, 4, 3)))
    res = hosvd.decompose(z, 0.8)
    assert res.ranks == (1, 1, 1)
    assert np.all(np.isfinite(np.asarray(res.reconstruct())))
    assert res.relative_error(z) == 0.0
    x = to_backend(low_rank_tensor((6, 5, 4), (1, 1, 1)))
    res = hosvd.decompose(x, (3, 3, 3))
    assert all(_orthonormal(u) for u in res.factors)
    assert res.relative_error(x) < tol(x)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    data=st.data(),
    sequential=st.booleans(),
)
def test_property_random_shapes_and_ranks(shape: list[int], data, sequential: bool) -> None:
    a = np.random.default_rng(len(shape)).standard_normal(shape)
    ranks = tuple(data.draw(st.integers(1, n)) for n in shape)
    res = hosvd.decompose(a, ranks, sequential=sequential)
    assert res.ranks == ranks and res.shape == tuple(shape)
    assert res.reconstruct().shape == tuple(shape)
    err2 = float(np.sum((res.reconstruct() - a) ** 2))
    assert err2 <= _discarded_bound(a, ranks) * (1 + 1e-6) + 1e-9
    assert res.nbytes == 8 * (int(np.prod(ranks)) + sum(n * r for n, r in zip(shape, ranks)))


def _textbook_explained(a: np.ndarray, k: int, r: int) -> float:
    s = np.linalg.svd(tl.unfold(a, k), compute_uv=False)
    return float(np.sum(s[:r] ** 2) / np.sum(s**2))


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("rank", [0.8, (0.9, None, 0.6, 0.7), (None, 0.95, None, None)])
def test_threshold_explained_variance_is_the_textbook_one(
    to_backend, sequential: bool, rank: object
) -> None:
    # Thresholds are applied to x's own unfoldings in both variants, and so
    # is what they report; a whole mode keeps 1.0.
    a = decaying_tensor((12, 30, 5, 4), seed=11)
    res = hosvd.decompose(to_backend(a), rank, sequential=sequential)
    assert len(res.explained_variance) == a.ndim
    for k, (e, r) in enumerate(zip(res.explained_variance, res.ranks)):
        expected = 1.0 if r == a.shape[k] else _textbook_explained(a, k, r)
        assert e == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    ("shape", "ranks"),
    [((30, 20, 4, 4), (5, 5, 2, 2)), ((20, 2, 2), (3, 2, 1)), ((8, 7, 6, 5), (8, 3, 6, 2))],
)
def test_fixed_rank_explained_variance_one_per_mode(
    to_backend, shape: tuple[int, ...], ranks: tuple[int, ...]
) -> None:
    # Covers the joint trailing block, the tall unfolding and whole modes.
    a = decaying_tensor(shape, seed=12, decay=0.7)
    x = to_backend(a)
    textbook = hosvd.decompose(x, ranks, sequential=False)
    for k, e in enumerate(textbook.explained_variance):
        assert e == pytest.approx(_textbook_explained(a, k, ranks[k]), abs=1e-5)
    res = hosvd.decompose(x, ranks)
    ev = res.explained_variance
    assert len(ev) == len(shape) and all(isinstance(e, float) for e in ev)
    assert all(e == 1.0 for e, r, n in zip(ev, ranks, shape) if r == n)
    # ST-HOSVD: each share is of the tensor the earlier modes left, so they
    # multiply to the share of x's energy the core keeps.
    core = np.asarray(res.core, dtype=np.float64)
    assert math.prod(ev) == pytest.approx(float(np.sum(core**2) / np.sum(a**2)), rel=1e-3)


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize(
    ("shape", "rank"),
    [
        ((16, 12, 7, 7), (5, 6, 3, 3)),  # a joint 7 x 7 block (sequential)
        ((40, 3, 2), (4, 3, 2)),  # mode 0's unfolding is tall: the other Gram matrix
        ((16, 12, 7, 7), 0.8),  # thresholds, from the input's own unfoldings
    ],
)
@pytest.mark.parametrize(
    ("backend", "dtype", "low"),
    [("numpy", np.float64, np.float32), ("torch", torch.float32, torch.bfloat16)],
)
def test_product_dtype_runs_the_products_in_lower_precision(
    sequential: bool, shape: tuple[int, ...], rank: object, backend: str, dtype, low
) -> None:
    x = low_rank_tensor(shape, tuple(min(3, n) for n in shape), seed=3, noise=0.2)
    if backend == "torch":
        x = torch.as_tensor(x, dtype=dtype)
    exact = hosvd.decompose(x, rank, sequential=sequential)
    fast = hosvd.decompose(x, rank, sequential=sequential, product_dtype=low)
    assert fast.ranks == exact.ranks  # a clear spectral gap at 3: no rank moves
    assert fast.core.dtype == x.dtype and all(_orthonormal(u) for u in fast.factors)
    unit = 2.0 ** -(8 if low is torch.bfloat16 else 24)  # the products' rounding unit
    assert not np.array_equal(np.asarray(fast.core), np.asarray(exact.core))
    assert abs(fast.relative_error(x) - exact.relative_error(x)) < 2 * unit
    np.testing.assert_allclose(fast.explained_variance, exact.explained_variance, atol=4 * unit)
