"""A converted model runs under ``torch.compile`` (inductor) and trains like eager.

Graph breaks are allowed (the decompositions run numpy/LAPACK code that
dynamo cannot capture); what must hold is that the compiled model compresses,
keeps its ASI state across steps, and gives eager's losses and gradients.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from tensorcompress import TuckerResult
from tensorcompress.torch import CompressedModule, convert


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    torch._dynamo.reset()  # no cached graphs from (or for) other tests
    # A handful of tiny kernels: compiling them in-process beats starting a
    # pool of compile workers, and one intra-op thread avoids spin-waiting.
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )
    # Full rank (every mode kept whole): the compressed gradient is exact, so
    # compiled and eager must agree to float32 round-off. One compressed layer
    # keeps dynamo's tracing (and the test) short; the rest compiles as usual.
    convert(model, method="asi", rank=(None, None, None, None), layers=["2"])
    return model


def test_compiled_converted_model_trains_like_eager() -> None:
    eager = tiny_model()
    plain = tiny_model()
    compiled: nn.Module = torch.compile(plain, backend="inductor")  # type: ignore[assignment]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, plain)]
    g = torch.Generator().manual_seed(1)
    for step in range(2):  # the ASI cold start, then a warm step from the kept state
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 5, generator=g)
        losses = []
        for model, opt in zip((eager, compiled), opts):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(eager.named_parameters(), plain.parameters()):
            assert p.grad is not None and q.grad is not None, name
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
        layer = plain[2]
        assert isinstance(layer, CompressedModule)
        # The compiled model ran the compressing path, and its second step
        # was a warm subspace-iteration step from the state the first kept.
        assert layer.ranks == (8, 4, 8, 8)
        assert isinstance(layer.last_result, TuckerResult)
        assert layer.last_result.n_iter == step
        for opt in opts:
            opt.step()
