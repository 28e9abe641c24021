from __future__ import annotations

import pytest

from tensorcompress.experiments.cli import main
from tensorcompress.experiments.demo import run_demo


def test_demo_prints_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--shape", "8x16x8x8", "--threshold", "0.9"]) == 0
    out = capsys.readouterr().out
    for name in ("svd", "hosvd", "st-hosvd", "asi (cold)", "asi (warm"):
        assert name in out


def test_demo_rows_are_consistent() -> None:
    total, rows = run_demo((8, 16, 8, 8), 0.9)
    assert total == 8 * 16 * 8 * 8 * 4
    by_name = {r.method.split(" ")[0]: r for r in rows}
    assert by_name["hosvd"].ranks == by_name["st-hosvd"].ranks
    for r in rows:
        assert 0.0 <= r.relative_error < 1.0 and 0 < r.nbytes < total


@pytest.mark.parametrize(
    "argv", [["demo", "--shape", "8x16x8"], ["demo", "--threshold", "1.5"], ["nope"]]
)
def test_bad_arguments_exit_nonzero(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_demo_leaves_autograd_enabled() -> None:
    import torch

    main(["demo", "--shape", "4x8x8x8"])
    assert torch.is_grad_enabled()
