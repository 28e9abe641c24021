"""Options of the benchmark suites in pytest mode.

``--source``, ``--threshold`` and ``--product-dtype`` (each repeatable)
parametrize every benchmark that takes a ``source``, ``threshold`` or
``product_dtype`` argument, so they are part
of each benchmark's name and a saved run compares only with a run of the same
settings; ``--threads`` sets torch's intra-op threads for the session and
``--allocator`` how freed memory is handled (:mod:`tensorcompress.experiments.allocator`). The
defaults (scikit-learn images, 0.8, torch's default threads) keep CI's
``--benchmark-disable`` run short. Torch's version and thread count go into
the saved machine info and the report header.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tensorcompress.experiments.activations import SOURCES
from tensorcompress.experiments.allocator import ALLOCATOR_HELP, ALLOCATORS, use_allocator

_ALLOCATOR = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tensorcompress benchmarks")
    group.addoption(
        "--source",
        action="append",
        choices=SOURCES,
        help="activation images (repeat for several; default: images)",
    )
    group.addoption(
        "--threshold",
        action="append",
        type=float,
        help="explained variance that sets the ranks (repeat for several; default: 0.8)",
    )
    group.addoption(
        "--product-dtype",
        action="append",
        choices=("float32", "bfloat16"),
        help="dtype of ASI's and HOSVD's tensor products (repeat for both; default: float32)",
    )
    group.addoption(
        "--threads", type=int, default=0, help="torch intra-op threads (default: torch's)"
    )
    group.addoption(
        "--allocator",
        choices=ALLOCATORS,
        default="reuse",
        help=ALLOCATOR_HELP,
    )


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("threads", default=0)
    if threads:
        torch.set_num_threads(threads)
    config.stash[_ALLOCATOR] = use_allocator(config.getoption("allocator", default="reuse"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "source" in metafunc.fixturenames:
        metafunc.parametrize("source", metafunc.config.getoption("source") or ["images"])
    if "threshold" in metafunc.fixturenames:
        thresholds = metafunc.config.getoption("threshold") or [0.8]
        metafunc.parametrize("threshold", thresholds, ids=lambda t: f"eps{t:g}")
    if "product_dtype" in metafunc.fixturenames:
        names = metafunc.config.getoption("product_dtype") or ["float32"]
        dtypes = [None if n == "float32" else getattr(torch, n) for n in names]
        metafunc.parametrize("product_dtype", dtypes, ids=names)


def pytest_report_header(config: pytest.Config) -> str:
    allocator = config.stash.get(_ALLOCATOR, "")
    return f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; {allocator}"


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["allocator"] = config.stash.get(_ALLOCATOR, "")
