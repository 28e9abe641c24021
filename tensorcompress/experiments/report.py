"""Output of ``tensorcompress run``: the printed table, results.json/.csv and the plots.

Everything is written atomically: the files go to a temporary folder next to
``--out`` and are moved into it only once all of them exist, so an
interrupted or failed run leaves nothing half-written in ``--out``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorcompress.experiments.frontier import EqualAccuracy

__all__ = [
    "FILES",
    "Row",
    "check_writable",
    "csv_text",
    "format_equal_accuracy",
    "format_table",
    "summarise",
    "write_results",
]

FILES = ("results.json", "results.csv", "accuracy_vs_memory.png", "accuracy_vs_gflops.png")
"""What :func:`write_results` puts in ``--out``."""

MB = 2**20


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN when empty or any is NaN."""
    vals = [float(v) for v in values]
    if not vals or any(math.isnan(v) for v in vals):
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


@dataclass(frozen=True)
class Row:
    """One (method, layers) row, aggregated over seeds.

    Every ``*_std`` is the sample standard deviation over seeds (0 for one seed).

    Attributes
    ----------
    method : str
        ``"vanilla"``, ``"gradient_filter"``, ``"hosvd"``, ``"svd"`` or ``"asi"``.
    label : str
        Display name (``"gradient filter R2"``, ``"HOSVD ε=0.8"``, ...).
    layers : str
        ``"all"`` or the number of fine-tuned last convs.
    accuracy, accuracy_std : float
        Top-1 test accuracy in percent.
    mem_mb, mem_mb_std : float
        Paper convention: what the fine-tuned convs keep for their weight
        gradients, measured, in MB (2**20 bytes).
    mem_full_mb : float
        Every activation autograd saves for the step (BatchNorm, ReLU,
        classifier included).
    gflops : float
        Training cost of one step (forward + decomposition + backward), or NaN
        when it was not counted.
    decomp_gflops : float
        The part of ``gflops`` spent decomposing activations (NaN when not counted).
    step_ms, step_ms_std : float
        Median wall time of a training step.
    step_ratio : float
        ``step_ms`` over vanilla's with the same layers, seed by seed, averaged.
    threshold : float or None
        Explained-variance threshold (HOSVD, SVD, and ASI's HOSVD budget);
        ``None`` for methods without one.
    seeds : tuple of dict
        The per-seed measurements behind the row.
    peak_act_mb : float
        Transformer rows: the highest memory over the step's forward and
        backward held by anything but weights, gradients and optimizer state
        (:func:`~tensorcompress.torch.measure.training_memory`); NaN when not
        measured (the CNN rows).
    peak_mb : float
        Transformer rows: the step's peak, ``peak_act_mb`` plus the weights,
        buffers, gradients and optimizer state; NaN when not measured.
    tuned_mb : float
        Transformer rows: the fine-tuned part's whole training memory, the
        weights of the fine-tuned blocks and of everything that trains, their
        gradients and optimizer state, plus ``peak_act_mb``; NaN when not
        measured.
    """

    method: str
    label: str
    layers: str
    accuracy: float
    accuracy_std: float
    mem_mb: float
    mem_mb_std: float
    mem_full_mb: float
    gflops: float
    decomp_gflops: float
    step_ms: float
    step_ms_std: float
    step_ratio: float
    threshold: float | None = None
    seeds: tuple[Mapping[str, Any], ...] = field(default=())
    peak_act_mb: float = math.nan
    peak_mb: float = math.nan
    tuned_mb: float = math.nan

    def to_dict(self, per_seed: bool = True) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes None)."""
        d: dict[str, Any] = {
            "method": self.method,
            "label": self.label,
            "layers": self.layers,
            "threshold": self.threshold,
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "mem_mb": self.mem_mb,
            "mem_mb_std": self.mem_mb_std,
            "mem_full_mb": self.mem_full_mb,
            "gflops": self.gflops,
            "decomp_gflops": self.decomp_gflops,
            "step_ms": self.step_ms,
            "step_ms_std": self.step_ms_std,
            "step_ratio": self.step_ratio,
            "peak_act_mb": self.peak_act_mb,
            "peak_mb": self.peak_mb,
            "tuned_mb": self.tuned_mb,
            "n_seeds": len(self.seeds),
        }
        if per_seed:
            d["seeds"] = [dict(s) for s in self.seeds]
        return _json_safe(d)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def summarise(results: Sequence[Mapping[str, Any]]) -> list[Row]:
    """Aggregate per-seed results into rows, in the order configurations first appear.

    Parameters
    ----------
    results : sequence of dict
        One per (seed, method, layers, threshold) with keys ``method``,
        ``label``, ``layers``, ``seed``, ``accuracy`` (fraction),
        ``mem_bytes``, ``mem_full_bytes``, ``gflops`` (NaN if not counted),
        ``step_seconds`` and optionally ``threshold`` (None or absent for
        methods without one) and ``decomp_gflops``.

    Returns
    -------
    list of Row
    """
    groups: dict[tuple[str, str, float | None], list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], str(r["layers"]), r.get("threshold")), []).append(r)
    vanilla_step = {
        (str(r["layers"]), r["seed"]): r["step_seconds"]
        for r in results
        if r["method"] == "vanilla"
    }
    rows = []
    for (method, layers, threshold), rs in groups.items():
        acc = _mean_std([100.0 * r["accuracy"] for r in rs])
        mem = _mean_std([r["mem_bytes"] / MB for r in rs])
        full = _mean_std([r["mem_full_bytes"] / MB for r in rs])
        flops = _mean_std([r["gflops"] for r in rs])
        decomp = _mean_std([r.get("decomp_gflops", math.nan) for r in rs])
        step = _mean_std([1e3 * r["step_seconds"] for r in rs])
        peak_act = _mean_std([r.get("peak_activation_bytes", math.nan) / MB for r in rs])
        peak = _mean_std([r.get("peak_bytes", math.nan) / MB for r in rs])
        tuned = _mean_std([r.get("tuned_bytes", math.nan) / MB for r in rs])
        ratios = [
            r["step_seconds"] / vanilla_step[(layers, r["seed"])]
            for r in rs
            if (layers, r["seed"]) in vanilla_step
        ]
        rows.append(
            Row(
                method=method,
                label=rs[0]["label"],
                layers=layers,
                accuracy=acc[0],
                accuracy_std=acc[1],
                mem_mb=mem[0],
                mem_mb_std=mem[1],
                mem_full_mb=full[0],
                gflops=flops[0],
                decomp_gflops=decomp[0],
                step_ms=step[0],
                step_ms_std=step[1],
                step_ratio=_mean_std(ratios)[0] if ratios else math.nan,
                threshold=threshold,
                seeds=tuple(_json_safe(dict(r)) for r in rs),
                peak_act_mb=peak_act[0],
                peak_mb=peak[0],
                tuned_mb=tuned[0],
            )
        )
    return rows


def _num(value: float, fmt: str, spread: float | None = None) -> str:
    if math.isnan(value):
        return "n/a"
    text = format(value, fmt)
    if spread is not None and spread > 0:
        text += "±" + format(spread, fmt)
    return text


def format_table(rows: Sequence[Row], notes: Sequence[str] = (), *, seeds: int = 1) -> str:
    """The rows as aligned text, with ``notes`` above and a legend below."""
    spread = seeds > 1
    # Transformer rows carry the whole step's peak memory: two more columns.
    peaks = any(not math.isnan(r.peak_mb) for r in rows)
    head: tuple[str, ...] = (
        "method", "layers", "acc %", "Mem MB", "full MB", "GFLOPs", "decomp", "step ms", "x vanilla"
    )  # fmt: skip
    if peaks:
        head = (*head[:5], "peak act MB", "peak MB", "tuned MB", *head[5:])
    body = []
    for r in rows:
        cells = [
            r.label,
            r.layers,
            _num(r.accuracy, ".1f", r.accuracy_std if spread else None),
            _num(r.mem_mb, ".3f", r.mem_mb_std if spread else None),
            _num(r.mem_full_mb, ".2f"),
            _num(r.gflops, ".3f"),
            _num(r.decomp_gflops, ".3f"),
            _num(r.step_ms, ".1f", r.step_ms_std if spread else None),
            _num(r.step_ratio, ".2f"),
        ]
        if peaks:
            cells[5:5] = [
                _num(r.peak_act_mb, ".2f"),
                _num(r.peak_mb, ".1f"),
                _num(r.tuned_mb, ".1f"),
            ]
        body.append(tuple(cells))
    widths = [max(len(str(line[k])) for line in [head, *body]) for k in range(len(head))]

    def fmt(line: Sequence[str]) -> str:
        cells = [f"{line[0]:<{widths[0]}}", f"{line[1]:<{widths[1]}}"]
        cells += [f"{c:>{w}}" for c, w in zip(line[2:], widths[2:])]
        return "  ".join(cells)

    lines = [*notes, "", fmt(head), "-" * len(fmt(head)), *(fmt(line) for line in body)]
    lines += [
        "",
        "acc: top-1 on the held-out test split"
        + (f" (mean±std over {seeds} seeds)" if spread else "")
        + ". Mem: what the fine-tuned layers keep for their weight gradients (the ASI paper's "
        "convention), "
        "measured from autograd's saved tensors on one training batch; full: every activation "
        "autograd keeps for the step. MB = 2**20 bytes."
        + (
            " peak act: the highest memory over the step's forward and backward held by "
            "anything but weights, gradients and optimizer state; peak: that plus them "
            "(training_memory, same batch); tuned: peak act plus the weights of the "
            "fine-tuned blocks and of everything that trains, their gradients and optimizer "
            "state (the fine-tuned part's whole training memory)."
            if peaks
            else ""
        ),
        "GFLOPs: one training step (forward of the whole network + decomposition + backward), "
        "counted by torch's FlopCounterMode plus formulas for the linear algebra it scores as "
        "zero (QR, eigh, SVD, Cholesky, triangular solves); decomp: the decomposition part. "
        "step ms: median wall time of a training step, interleaved across methods after "
        "training; x vanilla: ratio to vanilla with the same layers.",
    ]
    return "\n".join(lines)


def format_equal_accuracy(entries: Sequence[EqualAccuracy], tolerance_source: str) -> str:
    """The equal-accuracy comparison as aligned text, with how it was made."""
    head = ("method", "layers", "at acc %", "ε", "Mem x vanilla", "GFLOPs x vanilla")
    body = []
    for e in entries:
        name = e.method.replace("_", " ")
        if e.reached:
            assert e.memory_ratio is not None and e.gflops_ratio is not None
            cells = (
                f"{e.accuracy:.1f}",
                "-" if e.threshold is None else f"{e.threshold:.2f}",
                f"{e.memory_ratio:.3f}",
                f"{e.gflops_ratio:.3f}",
            )
        else:
            cells = (f"{e.accuracy:.1f}", "-", f"not reached (best {e.best_accuracy:.1f}%)", "")
        body.append((name, e.layers, *cells))
    widths = [max(len(line[k]) for line in [head, *body]) for k in range(len(head))]

    def fmt(line: Sequence[str]) -> str:
        cells = [f"{line[0]:<{widths[0]}}", f"{line[1]:<{widths[1]}}"]
        cells += [f"{c:>{w}}" for c, w in zip(line[2:], widths[2:])]
        return "  ".join(cells).rstrip()

    tolerances = sorted({(e.layers, e.tolerance) for e in entries}, key=lambda p: p[0])
    tol = ", ".join(f"{t:.1f} points with {n} layers" for n, t in tolerances)
    lines = [
        "Equal accuracy (the paper's comparison): each method against vanilla with the same "
        f"layers, at vanilla's accuracy minus a tolerance of {tol} ({tolerance_source}).",
        "Mem and GFLOPs are interpolated linearly in accuracy between the two points of the "
        "method's frontier (by memory) that bracket that accuracy; the cheapest point when it "
        "already reaches it; ε: the threshold there.",
        "",
        fmt(head),
        "-" * len(fmt(head)),
        *(fmt(line) for line in body),
    ]
    return "\n".join(lines)


def csv_text(rows: Sequence[Row]) -> str:
    """The rows as CSV (one line per row; per-seed details are in results.json)."""
    buf = io.StringIO()
    keys = list(rows[0].to_dict(per_seed=False)) if rows else ["method"]
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.to_dict(per_seed=False).items()})
    return buf.getvalue()


_COLOURS = {
    "vanilla": "tab:gray",
    "gradient_filter": "tab:orange",
    "hosvd": "tab:blue",
    "svd": "tab:purple",
    "asi": "tab:red",
    "checkpoint": "tab:green",
    "lora": "tab:olive",
    "lora+asi": "tab:brown",
    "wsi": "tab:cyan",
    "wasi": "tab:pink",
}
_MARKERS = {
    "vanilla": "*",
    "gradient_filter": "D",
    "hosvd": "s",
    "svd": "v",
    "asi": "o",
    "checkpoint": "P",
    "lora": "^",
    "lora+asi": "X",
    "wsi": "<",
    "wasi": ">",
}
_HOLLOW = {"hosvd", "svd"}  # drawn open, so ASI (at HOSVD's memory) shows through
_STYLES = ("-", "--", ":", "-.")


def _plot(rows: Sequence[Row], x_key: str, x_label: str, title: str, path: Path) -> None:
    """Accuracy against ``x_key``: one line per method and layers, vanilla as reference points.

    Each method with thresholds is a line through its thresholds, sorted by
    ``x`` (ASI's points labelled by ε; HOSVD and SVD drawn open, since ASI
    sits at HOSVD's memory); the gradient filter is one point per layers;
    vanilla-last-N (with a faint line at its accuracy) and vanilla-all are
    stars. Error bars are the spread over seeds, when there are several.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    # A Figure without pyplot: no global figure registry, no GUI backend.
    fig = Figure(figsize=(7.2, 4.8), layout="constrained")
    ax = fig.add_subplot()
    shown = [r for r in rows if not math.isnan(getattr(r, x_key)) and getattr(r, x_key) > 0]
    depths = list(dict.fromkeys(r.layers for r in shown if r.layers != "all"))
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in shown:
        groups.setdefault((r.method, r.layers), []).append(r)
    for (method, layers), points in groups.items():
        points.sort(key=lambda r: (getattr(r, x_key), r.threshold or 0.0))
        xs = [getattr(r, x_key) for r in points]
        ys = [r.accuracy for r in points]
        errs = [r.accuracy_std for r in points]
        vanilla = method == "vanilla"
        name = "vanilla" if vanilla else points[0].label.split(" ε=")[0]
        label = f"{name}, {'all layers' if layers == 'all' else f'last {layers}'}"
        style = _STYLES[depths.index(layers) % len(_STYLES)] if layers in depths else "none"
        if vanilla and layers != "all":
            # Vanilla's accuracy with these layers: where the equal-accuracy comparison reads.
            ax.axhline(ys[0], color="tab:gray", linestyle=style, linewidth=0.8, alpha=0.5)
        colour = "black" if layers == "all" else _COLOURS.get(method, "black")
        ax.errorbar(
            xs,
            ys,
            yerr=errs if any(e > 0 for e in errs) else None,
            marker=_MARKERS.get(method, "x"),
            color=colour,
            markerfacecolor="none" if method in _HOLLOW else colour,
            markersize=12 if vanilla else 8 if method in _HOLLOW else 5,
            capsize=3,
            linestyle="none" if vanilla or len(points) == 1 else style,
            linewidth=1.2,
            label=label,
            zorder=3 if method == "asi" else 2,
        )
        for r, x in zip(points, xs):
            if method == "asi" and r.threshold is not None and len(points) > 1:
                ax.annotate(
                    f"{r.threshold:g}",
                    (x, r.accuracy),
                    xytext=(3, -9),
                    textcoords="offset points",
                    fontsize=6,
                    color=_COLOURS.get(method, "black"),
                )
    if shown:
        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        xs_all = [getattr(r, x_key) for r in shown]
        # Within one decade the only ticks are minor ones: label them then.
        ax.xaxis.set_minor_formatter(plain if max(xs_all) < 10 * min(xs_all) else NullFormatter())
        ax.legend(fontsize=7, loc="best", ncols=2)
    else:
        ax.text(
            0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_xlabel(x_label)
    ax.set_ylabel("top-1 test accuracy (%)")
    if any(len(points) > 1 for (m, _), points in groups.items() if m != "vanilla"):
        title += " (lines: thresholds ε)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120)


def check_writable(out: str | os.PathLike[str]) -> Path:
    """Refuse early an ``--out`` that cannot be written (before any training).

    ``out`` may not exist yet; its nearest existing ancestor must then be a
    writable folder. Returns ``out`` as an absolute path.

    Raises
    ------
    OSError
        If ``out`` is a file, or the folder it would be created in is not writable.
    """
    path = Path(out).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} exists and is not a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r}: {str(probe)!r} is not a folder")
    target = path if path.exists() else probe
    if not os.access(target, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {str(out)!r}: {str(target)!r} is not writable")
    if path.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        # The temporary folder goes next to --out.
        raise PermissionError(
            f"--out {str(out)!r}: its parent {str(path.parent)!r} is not writable"
        )
    return path


def write_results(
    out: str | os.PathLike[str],
    rows: Sequence[Row],
    meta: Mapping[str, Any],
    table: str,
    summary: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write results.json, results.csv and the two plots into ``out``, atomically.

    Parameters
    ----------
    out : path
        Destination folder (created if missing; files already there with the
        same names are replaced, others are left alone).
    rows : sequence of Row
        The table's rows.
    meta : mapping
        Configuration, environment and notes, stored in results.json.
    table : str
        The printed table, stored in results.json too.
    summary : mapping, optional
        The run's conclusions (``equal_accuracy``, ...), results.json's ``summary``.

    Returns
    -------
    list of Path
        The written files.
    """
    path = check_writable(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        doc = {
            **_json_safe(dict(meta)),
            "table": table,
            "summary": _json_safe(dict(summary or {})),
            "rows": [r.to_dict() for r in rows],
        }
        (tmp / "results.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        (tmp / "results.csv").write_text(csv_text(rows))
        _plot(
            rows,
            "mem_mb",
            "activation memory of the fine-tuned layers (MB, log)",
            "accuracy vs activation memory",
            tmp / "accuracy_vs_memory.png",
        )
        _plot(
            rows,
            "gflops",
            "training GFLOPs per step (log)",
            "accuracy vs training cost",
            tmp / "accuracy_vs_gflops.png",
        )
        if not path.exists():
            os.rename(tmp, path)
        else:
            for name in FILES:
                os.replace(tmp / name, path / name)
            tmp.rmdir()
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return [path / name for name in FILES]
