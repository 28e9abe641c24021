"""Frontiers over thresholds, the paper's equal-accuracy comparison, and the run's noise.

A method with an explained-variance threshold (HOSVD, SVD, ASI under
HOSVD's budget) traces a frontier as the threshold moves: more memory and
work, more accuracy. The paper compares methods at equal accuracy: how much
memory and compute does a method need to reach what vanilla fine-tuning of
the same layers reaches? :func:`equal_accuracy` answers it from a run's rows:

- the target is vanilla's accuracy (same layers) minus a tolerance;
- along the method's frontier (its rows for those layers, by increasing
  memory), the first point at or above the target is found, and memory and
  GFLOPs are interpolated linearly in accuracy between it and the point
  before it, which is below the target; when the cheapest point already
  reaches the target, it is the answer (no extrapolation below the
  frontier's start), and when no point reaches it the ratios are ``None``;
- the ratios are that memory and those GFLOPs over vanilla's.

Noise: an accuracy measured on ``n`` test images has a binomial standard
error ``sqrt(p (1 - p) / n)`` from the choice of the test set alone
(:func:`binomial_se`); with several seeds the spread over seeds (training
order, initialisation, pretraining) is measured too. :func:`gap_noise` is the
larger of the two for a difference of accuracies, the smallest gap a run can
report as a finding.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "EqualAccuracy",
    "FrontierPoint",
    "binomial_se",
    "equal_accuracy",
    "frontiers",
    "gap_noise",
]


class FrontierPoint(Protocol):
    """What the analysis reads of a row (:class:`tensorcompress.experiments.report.Row` is one)."""

    @property
    def method(self) -> str:
        """Method name."""
        ...

    @property
    def layers(self) -> str:
        """``"all"`` or the number of fine-tuned convs."""
        ...

    @property
    def threshold(self) -> float | None:
        """Explained-variance threshold, or ``None`` for methods without one."""
        ...

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy in percent (mean over seeds)."""
        ...

    @property
    def accuracy_std(self) -> float:
        """Spread of the accuracy over seeds (0 for one seed)."""
        ...

    @property
    def mem_mb(self) -> float:
        """Activation memory of the fine-tuned layers."""
        ...

    @property
    def gflops(self) -> float:
        """Training GFLOPs of one step."""
        ...


def binomial_se(accuracy: float, n: int) -> float:
    """Standard error, in points, of an accuracy (in %) measured on ``n`` test images.

    Examples
    --------
    >>> round(binomial_se(90.0, 450), 3)
    1.414
    """
    if n < 1 or math.isnan(accuracy):
        return math.nan
    p = min(max(accuracy / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def gap_noise(
    a: float,
    b: float,
    n_test: int,
    paired_gaps: Sequence[float] = (),
) -> float:
    """The noise, in points, of the accuracy gap ``a - b`` (both in %).

    The larger of the test set's sampling error of a difference of two
    accuracies, ``sqrt(se(a)**2 + se(b)**2)``, and, with two or more seeds, the
    sample standard deviation of the per-seed gaps ``paired_gaps``.

    Examples
    --------
    >>> round(gap_noise(90.0, 90.0, 450), 3)
    2.0
    >>> gap_noise(90.0, 90.0, 450, paired_gaps=[1.0, 5.0, 9.0])
    4.0
    """
    sampling = math.hypot(binomial_se(a, n_test), binomial_se(b, n_test))
    spread = statistics.stdev(paired_gaps) if len(paired_gaps) > 1 else 0.0
    return max(sampling, spread)


def frontiers(rows: Sequence[FrontierPoint]) -> dict[tuple[str, str], list[FrontierPoint]]:
    """Rows grouped by ``(method, layers)``, each group by increasing memory (then threshold)."""
    out: dict[tuple[str, str], list[FrontierPoint]] = {}
    for r in rows:
        out.setdefault((r.method, r.layers), []).append(r)
    for points in out.values():
        points.sort(key=lambda r: (r.mem_mb, -1.0 if r.threshold is None else r.threshold))
    return out


@dataclass(frozen=True)
class EqualAccuracy:
    """A method's cost at vanilla's accuracy, against vanilla with the same layers.

    Attributes
    ----------
    method, layers : str
        The method and the number of fine-tuned convs.
    accuracy : float
        The accuracy compared at (%): vanilla's minus ``tolerance``.
    memory_ratio, gflops_ratio : float or None
        The method's interpolated memory and GFLOPs at ``accuracy`` over
        vanilla's; ``None`` when no point of the frontier reaches it.
    tolerance : float
        Points below vanilla's accuracy that count as equal.
    vanilla_accuracy : float
        Vanilla's accuracy with the same layers (%).
    best_accuracy : float
        The frontier's best accuracy (%).
    threshold : float or None
        The threshold at ``accuracy``, interpolated like memory (``None`` for
        a method without thresholds, or when not reached).
    """

    method: str
    layers: str
    accuracy: float
    memory_ratio: float | None
    gflops_ratio: float | None
    tolerance: float
    vanilla_accuracy: float
    best_accuracy: float
    threshold: float | None = None

    @property
    def reached(self) -> bool:
        """Whether the frontier reaches the target accuracy."""
        return self.memory_ratio is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "method": self.method,
            "layers": self.layers,
            "accuracy": self.accuracy,
            "memory_ratio": self.memory_ratio,
            "gflops_ratio": self.gflops_ratio,
            "tolerance": self.tolerance,
            "vanilla_accuracy": self.vanilla_accuracy,
            "best_accuracy": self.best_accuracy,
            "threshold": self.threshold,
        }


def _lerp(a: float, b: float, w: float) -> float:
    return a + w * (b - a)


def equal_accuracy(
    rows: Sequence[FrontierPoint], tolerance: float | Mapping[str, float]
) -> list[EqualAccuracy]:
    """Every method's memory and GFLOPs ratio to vanilla at vanilla's accuracy.

    Parameters
    ----------
    rows : sequence of FrontierPoint
        A run's rows: vanilla with the layers to compare (``layers`` other
        than ``"all"``), and the other methods' rows for those layers (one
        per threshold).
    tolerance : float or mapping
        Points below vanilla's accuracy that count as equal: one value, or one
        per ``layers``.

    Returns
    -------
    list of EqualAccuracy
        One per (method, layers) that has a vanilla row with the same layers,
        in the order the rows first name them.

    Examples
    --------
    >>> from types import SimpleNamespace as Row
    >>> rows = [
    ...     Row(method="vanilla", layers="2", threshold=None, accuracy=90, mem_mb=10, gflops=1),
    ...     Row(method="asi", layers="2", threshold=0.7, accuracy=80, mem_mb=0.5, gflops=0.4),
    ...     Row(method="asi", layers="2", threshold=0.9, accuracy=90, mem_mb=1.5, gflops=0.6),
    ... ]
    >>> e = equal_accuracy(rows, tolerance=1.0)[0]
    >>> e.accuracy, round(e.memory_ratio, 3), round(e.gflops_ratio, 3), round(e.threshold, 3)
    (89.0, 0.14, 0.58, 0.88)
    """
    vanilla = {r.layers: r for r in rows if r.method == "vanilla" and r.layers != "all"}
    out = []
    for (method, layers), points in frontiers(rows).items():
        ref = vanilla.get(layers)
        if method == "vanilla" or ref is None:
            continue
        tol = float(tolerance[layers] if isinstance(tolerance, Mapping) else tolerance)
        target = ref.accuracy - tol
        best = max(p.accuracy for p in points)
        mem = flops = thr = None
        for k, p in enumerate(points):
            if p.accuracy < target:
                continue
            if k == 0:
                mem, flops, thr = p.mem_mb, p.gflops, p.threshold
            else:
                q = points[k - 1]  # below the target: k is the first point at or above it
                w = (target - q.accuracy) / (p.accuracy - q.accuracy)
                mem, flops = _lerp(q.mem_mb, p.mem_mb, w), _lerp(q.gflops, p.gflops, w)
                if p.threshold is not None and q.threshold is not None:
                    thr = _lerp(q.threshold, p.threshold, w)
            break
        out.append(
            EqualAccuracy(
                method=method,
                layers=layers,
                accuracy=target,
                memory_ratio=None if mem is None else mem / ref.mem_mb,
                gflops_ratio=None if flops is None else flops / ref.gflops,
                tolerance=tol,
                vanilla_accuracy=ref.accuracy,
                best_accuracy=best,
                threshold=thr,
            )
        )
    return out
