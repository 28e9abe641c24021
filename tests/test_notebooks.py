"""The notebooks are stored without outputs (CI executes them: ``pytest --nbmake notebooks/``).

This check needs only the standard library, so it runs with the rest of the
test suite; executing the notebooks is a separate CI step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path: Path) -> None:
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name}: cell {i} has outputs; strip them"
            assert cell["execution_count"] is None, f"{path.name}: cell {i} has an execution count"
