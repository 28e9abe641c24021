from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
from core_data import decaying_tensor, tol

from tensorcompress import svd


def test_full_rank_exact_and_matches_lapack(to_backend) -> None:
    a = np.random.default_rng(0).standard_normal((12, 9))
    x = to_backend(a)
    res = svd.decompose(x, 9)
    assert res.relative_error(x) < tol(x)
    np.testing.assert_allclose(
        np.asarray(res.S, dtype=np.float64), np.linalg.svd(a, compute_uv=False), rtol=1e-5
    )
    u, s, vh = res
    assert u.shape == (12, 9) and s.shape == (9,) and vh.shape == (9, 9)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_unfolding_mode_and_reconstruct_shape(to_backend, mode: int) -> None:
    a = decaying_tensor((6, 5, 4), seed=1)
    res = svd.decompose(to_backend(a), 0.9, mode=mode)
    assert res.reconstruct().shape == a.shape
    s = np.linalg.svd(tl.unfold(a, mode), compute_uv=False)
    r = res.ranks[0]
    expected = np.sqrt(np.sum(s[r:] ** 2)) / np.linalg.norm(a)
    assert res.relative_error(to_backend(a)) == pytest.approx(expected, rel=1e-3, abs=1e-5)
    assert res.explained_variance is not None and res.explained_variance >= 0.9 - 1e-9


def test_randomized_close_to_exact_on_decaying_spectrum(to_backend) -> None:
    rng = np.random.default_rng(2)
    u = np.linalg.qr(rng.standard_normal((200, 60)))[0]
    v = np.linalg.qr(rng.standard_normal((150, 60)))[0]
    a = (u * 0.7 ** np.arange(60)) @ v.T
    x = to_backend(a)
    exact = svd.decompose(x, 10)
    rand = svd.decompose(x, 10, method="randomized", seed=0)
    assert rand.relative_error(x) <= exact.relative_error(x) * 1.01 + tol(x)
    assert rand.explained_variance is None
    again = svd.decompose(x, 10, method="randomized", seed=0)
    np.testing.assert_array_equal(np.asarray(rand.S), np.asarray(again.S))


def test_randomized_refuses_threshold() -> None:
    with pytest.raises(ValueError, match="method='exact'"):
        svd.decompose(np.ones((4, 4)), 0.5, method="randomized")


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rank": 0}, ValueError, r"rank must be an int in \[1, 4\]"),
        ({"rank": 5}, ValueError, r"rank must be an int in \[1, 4\]"),
        ({"rank": 1.2}, ValueError, r"\(0, 1\]"),
        ({"rank": (1, 2)}, TypeError, "rank must be an int or a float"),
        ({"rank": 2, "mode": 3}, ValueError, "mode must be an int"),
        ({"rank": 2, "method": "qr"}, ValueError, "method must be 'exact' or 'randomized'"),
    ],
)
def test_bad_arguments(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        svd.decompose(np.ones((4, 6)), **kwargs)


def test_to_tensorly_cp_round_trip() -> None:
    a = decaying_tensor((6, 5, 4), seed=3)
    res = svd.decompose(a, 3, mode=1)
    back = tl.fold(
        res.to_tensorly().to_tensor()
        if hasattr(res.to_tensorly(), "to_tensor")
        else tl.cp_to_tensor(res.to_tensorly()),
        1,
        a.shape,
    )
    np.testing.assert_allclose(back, res.reconstruct(), atol=1e-10)
