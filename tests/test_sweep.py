from __future__ import annotations

import functools
import time

import numpy as np
import pytest
from core_data import decaying_tensor, tol

import tensorcompress
from tensorcompress import _measured, _sweep, asi, hosvd
from tensorcompress._array import namespace

# Small trailing modes that the plan visits jointly, and a 5-way variant
# whose block sits after another step.
BLOCK_CASES = [((30, 20, 4, 4), (5, 5, 2, 2)), ((20, 6, 5, 4, 3), (5, 4, 3, 2, 2))]


def _unfold(a: np.ndarray, k: int) -> np.ndarray:
    return np.moveaxis(a, k, 0).reshape(a.shape[k], -1)


def _project(a: np.ndarray, u: np.ndarray, k: int) -> np.ndarray:
    return np.moveaxis(np.tensordot(u.T, np.moveaxis(a, k, 0), axes=1), 0, k)


def _reference_sweep(a: np.ndarray, order: list[int], basis) -> tuple[dict, dict]:
    """Mode by mode in float64 on explicit unfoldings, each on the projected tensor."""
    factors, explained = {}, {}
    for k in order:
        unfolding = _unfold(a, k)
        u = basis(k, unfolding)
        factors[k] = u
        explained[k] = np.sum((u.T @ unfolding) ** 2) / np.sum(unfolding**2)
        a = _project(a, u, k)
    return factors, explained


def _subspace_iteration(start, n_iter: int):
    """Per mode, ``n_iter`` subspace-iteration steps from ``start``'s factor, in float64."""

    def step(k: int, unfolding: np.ndarray) -> np.ndarray:
        u = np.asarray(start.factors[k], dtype=np.float64)
        for _ in range(n_iter):
            u = np.linalg.qr(unfolding @ (unfolding.T @ u))[0]
        return u

    return step


def _flat(steps: _sweep.Plan) -> list[int]:
    return [k for step in steps for k in step.modes]


def _assert_same_subspaces(res, factors: dict, explained: dict, x) -> None:
    for k, u in factors.items():
        got = np.asarray(res.factors[k], dtype=np.float64)
        np.testing.assert_allclose(got @ got.T, u @ u.T, atol=100 * tol(x))
        assert res.explained_variance[k] == pytest.approx(explained[k], abs=10 * tol(x))


def test_plan_merges_small_trailing_modes_only() -> None:
    assert _sweep.plan((64, 512, 7, 7), (29, 91, 4, 4), iterate=True)[0].modes == (3, 2)
    for shape, ranks in BLOCK_CASES:
        assert any(len(step.modes) > 1 for step in _sweep.plan(shape, ranks))
    # Wide trailing modes: one Gram of the block would cost more than the modes.
    assert all(
        len(s.modes) == 1 for s in _sweep.plan((64, 256, 14, 14), (29, 58, 7, 6), iterate=True)
    )
    # Thresholds are never in a block: their ranks are not known in advance.
    assert all(len(s.modes) == 1 for s in _sweep.plan((64, 512, 7, 7), (29, 91, 0.8, 0.8)))
    # Every mode is visited once.
    assert sorted(_flat(_sweep.plan((20, 6, 5, 4, 3), (5, 4, 3, 2, 2)))) == list(range(5))


@pytest.mark.parametrize(("shape", "ranks"), BLOCK_CASES)
def test_hosvd_block_equals_mode_by_mode_st_hosvd(to_backend, shape, ranks) -> None:
    a = decaying_tensor(shape, seed=7, decay=0.7)
    x = to_backend(a)
    res = hosvd.decompose(x, ranks)

    def svd_basis(k: int, unfolding: np.ndarray) -> np.ndarray:
        return np.linalg.svd(unfolding, full_matrices=False)[0][:, : ranks[k]]

    factors, explained = _reference_sweep(a, _flat(_sweep.plan(shape, ranks)), svd_basis)
    _assert_same_subspaces(res, factors, explained, x)
    approx = a
    for k, u in factors.items():
        approx = _project(approx, u, k)
    for k, u in factors.items():
        approx = np.moveaxis(np.tensordot(u, np.moveaxis(approx, k, 0), axes=1), 0, k)
    assert res.relative_error(x) == pytest.approx(
        np.linalg.norm(approx - a) / np.linalg.norm(a), abs=10 * tol(x)
    )


@pytest.mark.parametrize(("shape", "ranks"), BLOCK_CASES)
def test_asi_block_equals_mode_by_mode_iteration(to_backend, shape, ranks) -> None:
    a = decaying_tensor(shape, seed=8, decay=0.7)
    x = to_backend(a)
    start = hosvd.decompose(to_backend(decaying_tensor(shape, seed=9, decay=0.7)), ranks)
    res = asi.decompose(x, ranks, warm_start=start, n_iter=2)

    subspace_step = _subspace_iteration(start, n_iter=2)

    order = _flat(_sweep.plan(shape, ranks, iterate=True))
    factors, explained = _reference_sweep(a, order, subspace_step)
    _assert_same_subspaces(res, factors, explained, x)


def test_block_keeps_whole_modes_as_identity(to_backend) -> None:
    a = decaying_tensor((12, 5, 4, 3), seed=10)
    x = to_backend(a)
    xp = namespace(x)
    ranks = (12, 5, 4, 2)

    def basis(k: int, g):
        return hosvd._gram_basis(xp, g, ranks[k])

    core, factors, explained = _sweep.block_sweep(xp, x, (3, 2), ranks, basis)
    assert tuple(core.shape) == (12, 5, 4, 2)
    np.testing.assert_array_equal(np.asarray(factors[2]), np.eye(4))
    assert explained[2] == 1.0
    u = np.asarray(factors[3], dtype=np.float64)
    expected = np.linalg.svd(_unfold(a, 3), full_matrices=False)[0][:, :2]
    np.testing.assert_allclose(u @ u.T, expected @ expected.T, atol=100 * tol(x))
    np.testing.assert_allclose(
        np.asarray(core, dtype=np.float64), _project(a, u, 3), atol=100 * tol(x)
    )


@pytest.mark.parametrize("unfolded", [False, True])
def test_asi_thin_middle_step_on_a_mode_first_copy_is_the_same_iteration(
    to_backend, monkeypatch, unfolded
) -> None:
    shape, ranks = (12, 10, 9), (4, 3, 5)
    a = decaying_tensor(shape, seed=13, decay=0.7)
    x = to_backend(a)
    start = hosvd.decompose(to_backend(decaying_tensor(shape, seed=14, decay=0.7)), ranks)
    steps = (_sweep.Step((1,), gram=False, unfolded=unfolded), _sweep.Step((0,)), _sweep.Step((2,)))
    monkeypatch.setattr(_sweep, "plans", lambda *args: (steps,))
    res = asi.decompose(x, ranks, warm_start=start, n_iter=2)

    subspace_step = _subspace_iteration(start, n_iter=2)

    factors, explained = _reference_sweep(a, [1, 0, 2], subspace_step)
    _assert_same_subspaces(res, factors, explained, x)
    core = a
    for k, u in factors.items():
        core = _project(core, u, k)
    got = np.asarray(res.core, dtype=np.float64)
    # Cores agree up to the factors' column signs (QR's convention).
    np.testing.assert_allclose(np.abs(got), np.abs(core), atol=100 * tol(x))
    assert tuple(res.core.shape) == ranks


def test_unfold_flips_switch_thin_middle_modes_only() -> None:
    steps = (
        _sweep.Step((0,), gram=False),
        _sweep.Step((1,), gram=False),
        _sweep.Step((2,), gram=True),
        _sweep.Step((3,), gram=False),
    )
    assert list(_sweep.unfold_flips(steps, 4)) == [
        (steps[0], steps[1]._replace(unfolded=True), steps[2], steps[3])
    ]


LARGE = (64, 64, 16, 16)  # _measured.MEASURE_FROM entries
LARGE_RANKS = (8, 8, 4, 4)


@pytest.fixture(autouse=True)
def _no_chosen_plans(monkeypatch) -> None:
    monkeypatch.setattr(_sweep, "_chosen", {})
    monkeypatch.setattr(_measured, "_chosen_options", {})


def test_measured_choice_keeps_the_fastest_candidate_and_its_result() -> None:
    x = np.zeros(LARGE, dtype=np.float32)
    candidates = _sweep.plans(LARGE, LARGE_RANKS, iterate=True)
    fast = candidates[2]
    calls: list[_sweep.Plan] = []

    def sweep(steps: _sweep.Plan) -> _sweep.Plan:
        calls.append(steps)
        if steps != fast:
            time.sleep(0.002)
        return steps

    assert _sweep.run(x, LARGE_RANKS, True, sweep) == fast
    # Each estimate timed three times, round by round...
    assert calls[: 3 * 6] == 3 * list(candidates[:6])
    flips = set(calls[3 * 6 :])  # ...then the winner's flips worth timing
    assert flips and flips <= {*_sweep.gram_flips(fast), *_sweep.unfold_flips(fast, 4)}
    key = (LARGE, LARGE_RANKS, True, "float32", None)
    assert _sweep.chosen_plans()[key] == fast
    calls.clear()
    assert _sweep.run(x, LARGE_RANKS, True, sweep) == fast
    assert calls == [fast]  # cached: one sweep


def test_estimated_plan_when_measuring_is_off_or_the_tensor_small() -> None:
    calls: list[_sweep.Plan] = []

    def sweep(steps: _sweep.Plan) -> None:
        calls.append(steps)

    previous = tensorcompress.measured_plans(False)
    try:
        _sweep.run(np.zeros(LARGE, dtype=np.float64), LARGE_RANKS, True, sweep)
    finally:
        tensorcompress.measured_plans(previous)
    _sweep.run(np.zeros((16, 8, 6, 6)), (4, 3, 3, 3), True, sweep)
    assert calls == [
        _sweep.plan(LARGE, LARGE_RANKS, iterate=True),
        _sweep.plan((16, 8, 6, 6), (4, 3, 3, 3), iterate=True),
    ]


def test_measured_asi_step_equals_the_chosen_plan_run_alone(monkeypatch) -> None:
    x = decaying_tensor(LARGE, seed=11, decay=0.8).astype(np.float32)
    start = hosvd.decompose(decaying_tensor(LARGE, seed=12, decay=0.8), LARGE_RANKS)
    measured = asi.decompose(x, LARGE_RANKS, warm_start=start, seed=0)
    chosen = _sweep.chosen_plans()[(LARGE, LARGE_RANKS, True, "float32", None)]
    monkeypatch.setattr(_sweep, "plans", lambda *args: (chosen,))
    monkeypatch.setattr(_sweep, "_chosen", {})
    alone = asi.decompose(x, LARGE_RANKS, warm_start=start, seed=0)
    np.testing.assert_array_equal(measured.core, alone.core)


def test_fastest_keeps_the_fastest_option_and_its_result() -> None:
    calls: list[str] = []

    def option(name: str, seconds: float) -> str:
        calls.append(name)
        time.sleep(seconds)
        return name

    options = {
        "default": functools.partial(option, "default", 0.004),
        "quick": functools.partial(option, "quick", 0.0),
    }
    large = np.zeros(LARGE, dtype=np.float32)
    assert _measured.fastest(("op", 1), options, large) == "quick"
    assert calls == 3 * ["default", "quick"]  # each timed three times, interleaved
    calls.clear()
    assert _measured.fastest(("op", 1), options, large) == "quick"
    assert calls == ["quick"]  # cached
    calls.clear()
    # Small inputs, or measuring off: the first option, untimed.
    assert _measured.fastest(("op", 2), options, np.zeros((4, 4))) == "default"
    previous = tensorcompress.measured_plans(False)
    try:
        assert _measured.fastest(("op", 3), options, large) == "default"
    finally:
        tensorcompress.measured_plans(previous)
    assert calls == ["default", "default"]
