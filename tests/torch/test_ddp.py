"""Converted models train under DistributedDataParallel (gloo, 2 CPU processes).

A small CNN, a Hugging Face ViT converted with ``last_blocks`` (its q/k/v
sharing one decomposition), and the same ViT prepared with the recommended
block options (ASI, SDPA, int8 saved tensors, fused MLP, norm-fed layers).

At full rank the compressed weight gradients are exact, so DDP on two halves
of a batch must give the parameters of single-process training on the whole
batch: DDP averages the per-process gradients of mean losses over equal
halves, which is the gradient of the mean loss over the whole batch.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tensorcompress.torch import compressed_layers, convert

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 3
LR = 0.1


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    # No BatchNorm: per-process batch statistics would differ from the
    # whole batch's, and that is not what this test is about.
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )


def full_ranks(batch: int) -> dict[str, tuple[int, ...]]:
    """Int ranks equal to every mode's size, for this process's batch."""
    return {"0": (batch, 3, 8, 8), "2": (batch, 4, 8, 8), "5": (batch, 64)}


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g), torch.randn(GLOBAL_BATCH, 5, generator=g))
        for _ in range(STEPS)
    ]


def train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@contextmanager
def gloo_process(
    rank: int, port: int, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """A worker's process group (gloo, one thread), yielding its half of each batch."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        half = GLOBAL_BATCH // WORLD
        part = slice(rank * half, (rank + 1) * half)
        yield [(x[part], y[part]) for x, y in batches]
    finally:
        dist.destroy_process_group()


METHODS = ("asi", "hosvd")


def _worker(rank: int, port: int, out: str) -> None:
    with gloo_process(rank, port, data()) as shard:
        results = {}
        for method in METHODS:  # one spawn for both: starting processes is the slow part
            model = convert(tiny_model(), method=method, rank=full_ranks(GLOBAL_BATCH // WORLD))
            train(DistributedDataParallel(model), shard)
            ranks = {name: layer.ranks for name, layer in compressed_layers(model).items()}
            results[method] = {"state": model.state_dict(), "ranks": ranks}
        torch.save(results, Path(out) / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_full_rank_equals_single_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned processes
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    workers = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    vanilla = tiny_model()
    train(vanilla, data())
    initial = tiny_model().state_dict()
    # Training moved the parameters: the comparisons are not between initial values.
    assert max((vanilla.state_dict()[k] - v).abs().max() for k, v in initial.items()) > 1e-2
    for method in METHODS:
        reference = convert(tiny_model(), method=method, rank=full_ranks(GLOBAL_BATCH))
        train(reference, data())
        for worker in workers:
            result = worker[method]
            # The layers really compressed (at full rank) in the workers.
            assert result["ranks"] == full_ranks(GLOBAL_BATCH // WORLD)
            for name, expected in reference.state_dict().items():
                got = result["state"][name]
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
                torch.testing.assert_close(got, vanilla.state_dict()[name], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# A Hugging Face ViT: last_blocks, and q/k/v sharing one decomposition
# ---------------------------------------------------------------------------

VIT_CLASSES = 5


def tiny_vit() -> nn.Module:
    from tensorcompress.models import vit_tiny

    torch.manual_seed(0)
    # 12x12 images in 4x4 patches: 10 tokens; no dropout (the default).
    return vit_tiny(
        num_classes=VIT_CLASSES,
        image_size=12,
        num_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        attn_implementation="eager",
    )


def vit_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(GLOBAL_BATCH, 3, 12, 12, generator=g),
            torch.randn(GLOBAL_BATCH, VIT_CLASSES, generator=g),
        )
        for _ in range(STEPS)
    ]


def vit_full_ranks(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Each selected layer's input shape (batch, tokens, features): its full rank."""
    from tensorcompress.torch import last_blocks, select_layers

    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    names = select_layers(model, last_blocks(2), x)
    handles = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


def convert_vit(x: torch.Tensor) -> nn.Module:
    from tensorcompress.torch import last_blocks

    model = tiny_vit()
    ranks = vit_full_ranks(model, x)
    return convert(model, method="asi", rank=ranks, layers=last_blocks(2), example_input=x)


def train_vit(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x).logits, y).backward()
        opt.step()


def _vit_worker(rank: int, port: int, out: str) -> None:
    from tensorcompress.torch import input_groups

    with gloo_process(rank, port, vit_data()) as shard:
        model = convert_vit(shard[0][0])
        train_vit(DistributedDataParallel(model), shard)
        result = {
            "state": model.state_dict(),
            "ranks": {name: layer.ranks for name, layer in compressed_layers(model).items()},
            "groups": [group.names for group in input_groups(model)],
        }
        torch.save(result, Path(out) / f"vit{rank}.pt")


def test_ddp_vit_last_blocks_with_shared_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_vit_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    workers = [torch.load(tmp_path / f"vit{r}.pt") for r in range(WORLD)]

    vanilla = tiny_vit()
    train_vit(vanilla, vit_data())
    reference = convert_vit(vit_data()[0][0])
    train_vit(reference, vit_data())
    initial = tiny_vit().state_dict()
    assert max((vanilla.state_dict()[k] - v).abs().max() for k, v in initial.items()) > 1e-2
    for worker in workers:
        # q/k/v of both blocks shared their input, at full rank for the half batch.
        assert worker["groups"] == [
            tuple(f"vit.layers.{b}.attention.{p}_proj" for p in "qkv") for b in (0, 1)
        ]
        assert all(r[0] == GLOBAL_BATCH // WORLD for r in worker["ranks"].values())
        for name, expected in reference.state_dict().items():
            got = worker["state"][name]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=name)
            torch.testing.assert_close(got, vanilla.state_dict()[name], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# The ViT's recommended block configuration (transformer.prepare)
# ---------------------------------------------------------------------------


def prepare_vit(x: torch.Tensor) -> nn.Module:
    """Last 2 blocks: ASI (full rank), SDPA, int8 saved tensors, fused MLP, norm-fed layers."""
    from tensorcompress.torch.transformer import BlockOptions, prepare

    options = BlockOptions(attention="sdpa", saved="int8", fused_mlp=True, norm_fed=True, rank=1.0)
    return prepare(tiny_vit(), "asi", 2, example_input=x, options=options)


def _prepared_vit_worker(rank: int, port: int, out: str) -> None:
    with gloo_process(rank, port, vit_data()) as shard:
        model = prepare_vit(shard[0][0])
        train_vit(DistributedDataParallel(model), shard)
        torch.save(model.state_dict(), Path(out) / f"prepared{rank}.pt")


def test_ddp_vit_prepared_with_int8_fused_and_norm_fed_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each half batch is a whole number of 64-element int8 blocks of every
    # kept tensor, so the halves' int8 forms are the whole batch's: DDP must
    # give single-process training on the whole batch.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_prepared_vit_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    reference = prepare_vit(vit_data()[0][0])
    train_vit(reference, vit_data())
    initial = tiny_vit().state_dict()
    trained = reference.state_dict()
    assert max((trained[k] - v).abs().max() for k, v in initial.items()) > 1e-2
    for r in range(WORLD):
        state = torch.load(tmp_path / f"prepared{r}.pt")
        for name, expected in trained.items():
            # 1e-6: tighter than what the int8 forms themselves change in 3 steps.
            torch.testing.assert_close(state[name], expected, atol=1e-6, rtol=0, msg=name)
