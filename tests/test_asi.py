from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from core_data import decaying_tensor, low_rank_tensor, tol
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorcompress import _sweep, asi, hosvd, tenalg


def _subspace_distance(u: object, v: object) -> float:
    """Sine of the largest principal angle between the column spaces."""
    a, b = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    s = np.linalg.svd(a.T @ b, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - s.min() ** 2)))


def test_cold_start_is_st_hosvd(to_backend) -> None:
    x = to_backend(decaying_tensor((8, 7, 6, 5), seed=1))
    cold, ref = asi.decompose(x, 0.8), hosvd.decompose(x, 0.8)
    assert cold.ranks == ref.ranks and cold.n_iter == 0
    assert cold.relative_error(x) == pytest.approx(ref.relative_error(x), rel=1e-6)


def test_warm_start_converges_to_hosvd_subspace(to_backend) -> None:
    # A spectral gap (low multilinear rank plus noise) makes the dominant
    # subspaces well defined; from a random start ASI must find them.
    ranks = (3, 3, 2, 2)
    a = low_rank_tensor((12, 10, 9, 8), ranks, seed=2, noise=0.03)
    x = to_backend(a)
    exact = hosvd.decompose(a, ranks, sequential=False)
    # Start far from the answer: a random orthonormal subspace in every mode.
    rng = np.random.default_rng(0)
    start = hosvd.decompose(to_backend(rng.standard_normal(a.shape)), ranks)
    res = start
    distances = []
    for _ in range(30):
        res = asi.decompose(x, ranks, warm_start=res)
        distances.append(max(_subspace_distance(u, v) for u, v in zip(res.factors, exact.factors)))
    assert distances[0] > 0.1  # one step from a random start is not enough...
    assert distances[-1] < 0.05  # ...but the iterations converge
    # The first mode visited iterates on the whole tensor: exactly HOSVD's subspace.
    first = _sweep.plan(a.shape, ranks, iterate=True)[0].modes[0]
    assert _subspace_distance(res.factors[first], exact.factors[first]) < 1e-3
    # The others see the tensor projected on the first: a HOOI-like fixed point,
    # never worse than HOSVD.
    assert res.relative_error(x) <= exact.relative_error(a) * (1 + 1e-4)


def test_warm_step_on_fixed_tensor_keeps_low_rank_exact(to_backend) -> None:
    x = to_backend(low_rank_tensor((9, 8, 7, 6), (2, 3, 2, 2)))
    res = asi.decompose(x, (2, 3, 2, 2))
    for _ in range(3):
        res = asi.decompose(x, (2, 3, 2, 2), warm_start=res)
        assert res.relative_error(x) < tol(x)
        assert res.n_iter == 1


def test_threshold_ranks_fixed_by_cold_start(to_backend) -> None:
    x1 = to_backend(decaying_tensor((10, 8, 6, 6), seed=3))
    x2 = to_backend(decaying_tensor((10, 8, 6, 6), seed=4, decay=0.9))
    cold = asi.decompose(x1, 0.8)
    warm = asi.decompose(x2, 0.8, warm_start=cold)
    assert warm.ranks == cold.ranks


def test_warm_start_survives_smaller_batch_and_rank_change(to_backend) -> None:
    x = to_backend(decaying_tensor((16, 8, 6, 6), seed=5))
    cold = asi.decompose(x, (4, 3, 3, 3))
    small = x[:5]
    res = asi.decompose(small, (4, 3, 3, 3), warm_start=cold, seed=0)
    assert res.shape == (5, 8, 6, 6) and res.ranks == (4, 3, 3, 3)
    bigger = asi.decompose(x, (5, 4, 2, 3), warm_start=res, seed=0)
    assert bigger.shape == (16, 8, 6, 6) and bigger.ranks == (5, 4, 2, 3)
    for r in (res, bigger):
        for u in r.factors:
            a = np.asarray(u, dtype=np.float64)
            np.testing.assert_allclose(a.T @ a, np.eye(a.shape[1]), atol=tol(x) * 10)


def test_warm_start_is_deterministic_given_seed() -> None:
    x = decaying_tensor((16, 8, 6, 6), seed=6)
    cold = asi.decompose(x, (4, 3, 3, 3))
    a = asi.decompose(x[:5], (4, 3, 3, 3), warm_start=cold, seed=7)
    b = asi.decompose(x[:5], (4, 3, 3, 3), warm_start=cold, seed=7)
    np.testing.assert_array_equal(a.core, b.core)


def test_no_global_rng_use() -> None:
    np.random.seed(123)  # noqa: NPY002 (checking the global RNG is untouched)
    torch.manual_seed(123)
    expected_np, expected_torch = np.random.rand(), torch.rand(1)  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002 (checking the global RNG is untouched)
    torch.manual_seed(123)
    x = decaying_tensor((16, 8, 6, 6), seed=6)
    cold = asi.decompose(x, (4, 3, 3, 3))
    asi.decompose(x[:5], (5, 4, 3, 3), warm_start=cold)
    asi.decompose(
        torch.as_tensor(x)[:5], (5, 4, 3, 3), warm_start=asi.decompose(torch.as_tensor(x), 3)
    )
    same_np = np.random.rand() == expected_np  # noqa: NPY002
    assert same_np and torch.equal(torch.rand(1), expected_torch)


def test_more_iterations_do_not_hurt() -> None:
    a = decaying_tensor((20, 16, 8, 8), seed=8, decay=0.8)
    start = hosvd.decompose(np.random.default_rng(1).standard_normal(a.shape), (4, 4, 3, 3))
    errs = [
        asi.decompose(a, (4, 4, 3, 3), warm_start=start, n_iter=n).relative_error(a)
        for n in (1, 3, 10)
    ]
    assert errs[2] <= errs[1] * (1 + 1e-9) <= errs[0] * (1 + 1e-9)


def test_warm_core_is_projection(to_backend) -> None:
    x = to_backend(decaying_tensor((8, 7, 6), seed=9))
    warm = asi.decompose(x, (3, 3, 3), warm_start=asi.decompose(x, (3, 3, 3)))
    proj = tenalg.multi_mode_dot(x, warm.factors, transpose=True)
    np.testing.assert_allclose(np.asarray(warm.core), np.asarray(proj), atol=tol(x) * 10)


def test_bfloat16_warm_start() -> None:
    x = torch.as_tensor(decaying_tensor((8, 7, 6), seed=10), dtype=torch.bfloat16)
    cold = asi.decompose(x, (3, 3, 3))
    warm = asi.decompose(x, (3, 3, 3), warm_start=cold)
    assert warm.core.dtype == torch.bfloat16
    assert warm.relative_error(x) < cold.relative_error(x) + 0.05


@pytest.mark.parametrize(
    ("shape", "ranks"),
    [
        ((16, 12, 7, 7), (5, 6, 3, 3)),  # one mode at a time, Gram matrices
        ((64, 48, 6, 5), (6, 8, 3, 3)),  # thin products, and a joint 6 x 5 block
    ],
)
@pytest.mark.parametrize(
    ("backend", "dtype", "low"),
    [("numpy", np.float64, np.float32), ("torch", torch.float32, torch.bfloat16)],
)
def test_product_dtype_runs_the_products_in_lower_precision(
    shape: tuple[int, ...], ranks: tuple[int, ...], backend: str, dtype: object, low: object
) -> None:
    a, b = (decaying_tensor(shape, seed=s, decay=0.7) for s in (11, 12))
    if backend == "torch":
        a, b = torch.as_tensor(a, dtype=dtype), torch.as_tensor(b, dtype=dtype)  # type: ignore[arg-type]
    cold = asi.decompose(a, ranks)
    full = asi.decompose(b, ranks, warm_start=cold)
    fast = asi.decompose(b, ranks, warm_start=cold, product_dtype=low)
    assert fast.core.dtype == b.dtype and all(u.dtype == b.dtype for u in fast.factors)
    for u in fast.factors:  # orthonormalised in x's precision, not the products'
        m = np.asarray(u, dtype=np.float64)
        np.testing.assert_allclose(m.T @ m, np.eye(m.shape[1]), atol=tol(b) * 10)
    unit = 2.0 ** -(8 if low is torch.bfloat16 else 24)  # the products' rounding unit
    assert not np.array_equal(np.asarray(fast.core), np.asarray(full.core))
    # The error moves by less than the products' rounding (a mode's subspace
    # can move more where its singular values cross the cut: no check on it).
    assert abs(fast.relative_error(b) - full.relative_error(b)) < 2 * unit
    np.testing.assert_allclose(fast.explained_variance, full.explained_variance, atol=4 * unit)


def test_product_dtype_errors() -> None:
    x = torch.as_tensor(decaying_tensor((8, 7, 6), seed=13), dtype=torch.float32)
    cold = asi.decompose(x, (3, 3, 3))
    for bad in ("bfloat16", torch.int32, np.float32):
        for start in (None, cold):
            with pytest.raises(TypeError, match="product_dtype must be a real floating dtype"):
                asi.decompose(x, (3, 3, 3), warm_start=start, product_dtype=bad)
        with pytest.raises(TypeError, match="product_dtype must be a real floating dtype"):
            hosvd.decompose(x, (3, 3, 3), product_dtype=bad)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 7), min_size=2, max_size=4),
    new_lead=st.integers(1, 7),
    data=st.data(),
)
def test_property_warm_step_is_an_orthogonal_projection(
    shape: list[int], new_lead: int, data: st.DataObject
) -> None:
    rng = np.random.default_rng(sum(shape))
    ranks = [data.draw(st.integers(1, n)) for n in shape]
    cold = asi.decompose(rng.standard_normal(shape), tuple(ranks))
    # The next batch may be smaller or larger in the leading mode.
    new_shape = (new_lead, *shape[1:])
    new_ranks = (min(ranks[0], new_lead), *ranks[1:])
    x = rng.standard_normal(new_shape)
    res = asi.decompose(x, new_ranks, warm_start=cold, seed=0)
    assert res.shape == new_shape and res.ranks == new_ranks
    for u in res.factors:
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-10)
    np.testing.assert_allclose(
        res.core, tenalg.multi_mode_dot(x, res.factors, transpose=True), atol=1e-10
    )
    # Projecting onto orthonormal bases never increases the norm of the residual.
    assert res.relative_error(x) <= 1.0 + 1e-12


def _kept_share(res: object, x: object) -> float:
    """``||core||^2 / ||x||^2``: the energy the whole decomposition keeps."""
    core = np.asarray(res.core, dtype=np.float64)  # type: ignore[attr-defined]
    return float(np.sum(core**2) / np.sum(np.asarray(x, dtype=np.float64) ** 2))


@pytest.mark.parametrize(
    ("shape", "ranks"),
    [
        ((30, 20, 4, 4), (5, 5, 2, 2)),  # trailing modes visited jointly
        ((12, 10, 9, 8), (4, 10, 3, 8)),  # two modes kept whole
        ((9, 8, 7), (3, None, 2)),  # None keeps a mode whole
    ],
)
@pytest.mark.parametrize("n_iter", [0, 1, 2])
def test_warm_explained_variance_one_per_mode_and_chained(
    to_backend, shape: tuple[int, ...], ranks: tuple[int | None, ...], n_iter: int
) -> None:
    x = to_backend(decaying_tensor(shape, seed=11, decay=0.7))
    start = asi.decompose(to_backend(decaying_tensor(shape, seed=12, decay=0.7)), ranks)
    res = asi.decompose(x, ranks, warm_start=start, n_iter=n_iter)
    ev = res.explained_variance
    assert len(ev) == len(shape) and all(isinstance(e, float) for e in ev)
    for e, r, n in zip(ev, res.ranks, shape):
        if r == n:
            assert e == 1.0  # a whole mode keeps everything
        else:
            assert 0.0 < e < 1.0
    # Each mode's share is of the tensor the earlier modes left, so the shares
    # multiply to the share of the energy the core keeps.
    assert math.prod(ev) == pytest.approx(_kept_share(res, x), rel=50 * tol(x))


@pytest.mark.parametrize("rank", [(4, 3, 3, 2), 0.8, (None, 0.9, 3, None)])
def test_cold_explained_variance_is_hosvd_s(to_backend, rank: object) -> None:
    x = to_backend(decaying_tensor((10, 8, 6, 6), seed=13))
    cold, ref = asi.decompose(x, rank), hosvd.decompose(x, rank)
    assert len(cold.explained_variance) == 4
    assert cold.explained_variance == pytest.approx(ref.explained_variance)


def test_cold_start_refuses_warm_step_arguments() -> None:
    x = decaying_tensor((8, 6, 5), seed=14)
    with pytest.raises(ValueError, match="n_iter=2 has no effect without a warm_start"):
        asi.decompose(x, 3, n_iter=2)
    with pytest.raises(ValueError, match="n_iter=1 has no effect without a warm_start"):
        asi.decompose(x, 3, n_iter=1)
    with pytest.raises(ValueError, match="seed=0 has no effect without a warm_start"):
        asi.decompose(x, 3, seed=0)
    with pytest.raises(ValueError, match=r"seed=Generator.* has no effect"):
        asi.decompose(x, 3, seed=np.random.default_rng(0))
    # The loop form: a cold start, then warm steps that take both.
    res = asi.decompose(x, 3)
    assert res.n_iter == 0
    for n_iter in (2, 0):
        res = asi.decompose(x, 3, warm_start=res, n_iter=n_iter, seed=0)
        assert res.n_iter == n_iter
    assert asi.decompose(x, 3, warm_start=res).n_iter == 1  # the default warm step
