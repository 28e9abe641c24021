"""Bad input gets a clear error naming the argument, the value and the expectation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tensorcompress import asi, hosvd, svd

DECOMPOSE = {
    "hosvd": hosvd.decompose,
    "asi": asi.decompose,
    "svd": svd.decompose,
}


@pytest.mark.parametrize("name", DECOMPOSE)
@pytest.mark.parametrize(
    ("x", "exc", "match"),
    [
        (np.ones(5), ValueError, r"at least 2 dimensions, got shape \(5,\)"),
        (np.array(3.0), ValueError, r"at least 2 dimensions, got shape \(\)"),
        (np.ones((0, 3)), ValueError, r"must not be empty, got shape \(0, 3\)"),
        (np.ones((3, 3), dtype=int), TypeError, "real floating dtype.*got int64"),
        (np.ones((3, 3), dtype=bool), TypeError, "real floating dtype.*got bool"),
        (np.ones((3, 3), dtype=complex), TypeError, "real floating dtype.*got complex128"),
        (torch.ones(3, 3, dtype=torch.int32), TypeError, "real floating dtype.*got int32"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), ValueError, "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ValueError, "NaN or Inf"),
        ([[1.0, 2.0], [3.0, 4.0]], TypeError, "numpy array or torch tensor, got list"),
    ],
)
def test_bad_tensors(name: str, x: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        DECOMPOSE[name](x, 1)


@pytest.mark.parametrize("name", ["hosvd", "asi"])
@pytest.mark.parametrize(
    ("rank", "exc", "match"),
    [
        (0, ValueError, "rank must be a positive int, got 0"),
        (-1, ValueError, "rank must be a positive int, got -1"),
        (5, ValueError, "rank=5 is larger than the mode's dimension 4"),
        (0.0, ValueError, r"rank as a float must be in \(0, 1\], got 0.0"),
        (1.01, ValueError, r"rank as a float must be in \(0, 1\], got 1.01"),
        ((1, 2), ValueError, "rank has 2 entries but the tensor has 3 modes"),
        ("full", TypeError, "rank must be an int, a float"),
    ],
)
def test_bad_ranks(name: str, rank: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        DECOMPOSE[name](np.ones((6, 5, 4)), rank)


def test_bad_warm_starts() -> None:
    x = np.random.default_rng(0).standard_normal((6, 5, 4))
    cold = asi.decompose(x, 2)
    with pytest.raises(ValueError, match="warm_start has 3 factors but x has 4 modes"):
        asi.decompose(x[..., None], 1, warm_start=cold)
    with pytest.raises(TypeError, match="warm_start must be a TuckerResult or None, got dict"):
        asi.decompose(x, 2, warm_start={"factors": []})  # type: ignore[arg-type]
    small = asi.decompose(np.ones((6, 5, 3)), 3)
    with pytest.raises(ValueError, match=r"warm_start rank 3 of mode 2 is larger than .* 2"):
        asi.decompose(np.ones((6, 5, 2)), 0.8, warm_start=small)
    with pytest.raises(ValueError, match="n_iter must be a non-negative int, got -1"):
        asi.decompose(x, 2, warm_start=cold, n_iter=-1)


@pytest.mark.parametrize("name", ["hosvd", "asi"])
@pytest.mark.parametrize(
    ("rank", "match"),
    [
        (5, r"rank=5 is larger than the mode's dimension 4 \(mode 2 of shape \(6, 5, 4\)\)"),
        ((2, 6, 2), r"rank\[1\]=6 is larger than the mode's dimension 5 \(mode 1 of shape"),
        ((7, None, 0.5), r"rank\[0\]=7 is larger than the mode's dimension 6 \(mode 0 of shape"),
    ],
)
def test_rank_above_a_mode_names_the_mode_and_is_never_clipped(
    name: str, rank: object, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        DECOMPOSE[name](np.ones((6, 5, 4)), rank)
    # A rank equal to every mode's size is allowed: it keeps the tensor whole.
    assert DECOMPOSE[name](np.ones((6, 5, 4)), (6, 5, 4)).ranks == (6, 5, 4)


@pytest.mark.parametrize(
    ("shape", "mode", "rank", "match"),
    [
        ((4, 6), 0, 5, r"\[1, 4\] .*got 5 \(mode 0 of shape \(4, 6\), unfolding 4 x 6\)"),
        ((3, 2, 2), 1, 3, r"\[1, 2\] .*got 3 \(mode 1 of shape \(3, 2, 2\), unfolding 2 x 6\)"),
        ((8, 2), 0, 3, r"\[1, 2\] .*got 3 \(mode 0 of shape \(8, 2\), unfolding 8 x 2\)"),
    ],
)
def test_svd_rank_above_the_unfolding_names_mode_and_shape(
    shape: tuple[int, ...], mode: int, rank: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        svd.decompose(np.ones(shape), rank, mode=mode)


def test_warm_step_arguments_without_warm_start() -> None:
    x = np.random.default_rng(0).standard_normal((6, 5, 4))
    with pytest.raises(ValueError, match="n_iter=3 has no effect without a warm_start"):
        asi.decompose(x, 2, n_iter=3)
    with pytest.raises(ValueError, match="seed=7 has no effect without a warm_start"):
        asi.decompose(x, 2, seed=7)
    with pytest.raises(ValueError, match="n_iter must be a non-negative int, got -1"):
        asi.decompose(x, 2, n_iter=-1)  # a bad value is named first
