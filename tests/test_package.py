"""Package-level guarantees: no torch import, result types, README/CI agreement."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tensorly as tl

from tensorcompress import TuckerResult, _array, asi, hosvd, rank, results, svd, tenalg

ROOT = Path(__file__).resolve().parent.parent


def readme_quick_start() -> list[str]:
    """The README's quick-start commands, parsed by the script CI uses."""
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        from readme_commands import quick_start_commands
    finally:
        sys.path.pop(0)
    return quick_start_commands((ROOT / "README.md").read_text())


def test_import_does_not_import_torch() -> None:
    code = (
        "import sys, numpy as np, tensorcompress as tc\n"
        "tc.asi.decompose(np.ones((4, 3, 2)), 0.8)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cnn_path_does_not_import_transformers_or_peft() -> None:
    # The transformers extra is optional: the models package and the adapter
    # import it only inside the functions that build a transformer.
    code = (
        "import sys, torch\n"
        "import tensorcompress, tensorcompress.torch, tensorcompress.models\n"
        "from tensorcompress.torch import convert, last_layers\n"
        "from tensorcompress.torch.measure import activation_memory\n"
        "x = torch.randn(2, 3, 32, 32)\n"
        "model = tensorcompress.models.get_model('resnet18', num_classes=4)\n"
        "convert(model, method='asi', rank=0.8, layers=last_layers(2), example_input=x)\n"
        "model(x).sum().backward()\n"
        "activation_memory(model, x, layers=last_layers(2))\n"
        "leaked = {'transformers', 'peft'} & set(sys.modules)\n"
        "assert not leaked, f'imported {leaked}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_results_are_frozen_unpackable_and_convert_to_tensorly() -> None:
    x = np.random.default_rng(0).standard_normal((5, 4, 3))
    res = hosvd.decompose(x, (2, 2, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.core = x  # type: ignore[misc]
    core, factors = res
    assert core is res.core and factors is res.factors
    tt = res.to_tensorly()
    np.testing.assert_allclose(tl.tucker_to_tensor(tt), res.reconstruct())
    assert isinstance(asi.decompose(x, 2, warm_start=res), TuckerResult)
    assert res.nbytes == 8 * (8 + 5 * 2 + 4 * 2 + 3 * 2)


def test_ci_runs_the_readme_test_command() -> None:
    commands = readme_quick_start()
    assert len(commands) == 2, "the README quick start shows exactly two commands"
    assert commands[1].startswith("pip install -c constraints.txt")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_commands.py test" in ci


def test_torch_is_pinned() -> None:
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins


def test_docs_show_the_readme_quick_start() -> None:
    readme = readme_quick_start()
    docs = (ROOT / "docs" / "index.md").read_text()
    for command in readme:
        assert f"```bash\n{command}\n```" in docs


def test_tucker_result_has_one_explained_variance_per_mode() -> None:
    x = np.random.default_rng(1).standard_normal((5, 4, 3))
    res = hosvd.decompose(x, (2, 4, 1))
    assert len(res.explained_variance) == 3
    # Built from arrays, nothing measured it: one None per mode, never ().
    built = TuckerResult(res.core, res.factors)
    assert built.explained_variance == (None, None, None)
    assert dataclasses.replace(res, n_iter=3).explained_variance == res.explained_variance
    with pytest.raises(ValueError, match="explained_variance has 2 entries but there are 3"):
        TuckerResult(res.core, res.factors, explained_variance=(1.0, 1.0))


@pytest.mark.parametrize("module", [asi, hosvd, svd, rank, tenalg, results, _array])
def test_public_names_are_exported(module: types.ModuleType) -> None:
    # A function without an underscore is public: exported (and so documented).
    defined = {
        name
        for name, f in inspect.getmembers(module, inspect.isfunction)
        if f.__module__ == module.__name__ and not name.startswith("_")
    }
    assert defined <= set(module.__all__), defined - set(module.__all__)
    own = [getattr(module, name) for name in module.__all__]
    own = [o for o in own if inspect.isroutine(o) or inspect.isclass(o)]
    assert all(o.__doc__ for o in own if o.__module__ == module.__name__)
