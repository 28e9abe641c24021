from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensorcompress import rank


def test_resolve_forms() -> None:
    shape = (8, 6, 4)
    assert rank.resolve(3, shape) == (3, 3, 3)
    assert rank.resolve(0.5, shape) == (0.5, 0.5, 0.5)
    assert rank.resolve((2, None, 0.9), shape) == (2, 6, 0.9)
    assert rank.resolve(rank.Fixed(2), shape) == (2, 2, 2)
    assert rank.resolve(rank.Fixed((2, None, 1)), shape) == (2, 6, 1)
    assert rank.resolve(rank.ExplainedVariance(0.8), shape) == (0.8, 0.8, 0.8)
    assert rank.resolve(1.0, shape) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [
        (0, ValueError, "positive int, got 0"),
        (-2, ValueError, "positive int, got -2"),
        (9, ValueError, "rank=9 is larger than the mode's dimension 8"),
        (
            7,
            ValueError,
            r"rank=7 is larger than the mode's dimension 6 \(mode 1 of shape \(8, 6, 4\)\)",
        ),
        (rank.Fixed(5), ValueError, r"rank=5 is larger than the mode's dimension 4 \(mode 2 of"),
        (rank.Fixed((1, None, 5)), ValueError, r"rank\[2\]=5 is larger than .* \(mode 2 of"),
        (0.0, ValueError, r"float must be in \(0, 1\], got 0.0"),
        (1.5, ValueError, r"float must be in \(0, 1\], got 1.5"),
        ((1, 2), ValueError, "rank has 2 entries but the tensor has 3 modes"),
        ("3", TypeError, "rank must be an int"),
        (True, TypeError, "got bool"),
        ((1, "a", 2), TypeError, r"rank\[1\] must be an int"),
        ((1, 7, 2), ValueError, r"rank\[1\]=7 is larger than the mode's dimension 6"),
    ],
)
def test_resolve_rejects_bad_ranks(value: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        rank.resolve(value, (8, 6, 4))  # type: ignore[arg-type]


def test_rank_for_threshold_is_smallest_reaching_rank() -> None:
    sv2 = np.array([5.0, 3.0, 1.0, 1.0])  # cumulative 0.5, 0.8, 0.9, 1.0
    assert rank.rank_for_threshold(sv2, 0.5) == 1
    assert rank.rank_for_threshold(sv2, 0.51) == 2
    assert rank.rank_for_threshold(sv2, 0.8) == 2
    assert rank.rank_for_threshold(sv2, 0.85) == 3
    assert rank.rank_for_threshold(sv2, 1.0) == 4
    assert rank.rank_for_threshold(np.array([2.0, 0.0, 0.0]), 1.0) == 1
    assert rank.rank_for_threshold(np.zeros(3), 0.9) == 1


@given(
    st.lists(st.floats(0, 1e3), min_size=1, max_size=30),
    st.floats(0.01, 1.0),
    st.floats(0.01, 1.0),
)
def test_rank_monotone_in_threshold(values: list[float], e1: float, e2: float) -> None:
    sv2 = np.sort(np.asarray(values))[::-1]
    lo, hi = sorted((e1, e2))
    r_lo, r_hi = rank.rank_for_threshold(sv2, lo), rank.rank_for_threshold(sv2, hi)
    assert 1 <= r_lo <= r_hi <= len(sv2)
    cum = rank.explained_variance(sv2)
    if sv2.sum() > 0:
        # The chosen rank reaches the threshold and one less does not.
        assert cum[r_hi - 1] >= hi - 1e-9
        assert r_hi == 1 or cum[r_hi - 2] < hi
