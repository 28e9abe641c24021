"""Options of the benchmark suites in pytest mode.

``--threads`` sets torch's intra-op threads for the session. Torch's version
and thread count go into the saved machine info and the report header, so a
saved run says what it was measured with.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tensorcompress benchmarks")
    group.addoption(
        "--threads", type=int, default=0, help="torch intra-op threads (default: torch's)"
    )


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("threads", default=0)
    if threads:
        torch.set_num_threads(threads)


def pytest_report_header(config: pytest.Config) -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
