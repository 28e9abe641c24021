"""The frozen prefix of a fine-tuned model: computed once per batch, replayed in every run.

When the last N layers of a network are fine-tuned, everything that runs
before the first trainable parameter is frozen and fed by the input alone:
autograd keeps nothing for it and runs no backward through it, and its output
for a given batch is the same in every configuration that freezes it (every
method with the same N). :class:`FrozenPrefix` records those outputs once per
batch and replays them, so each configuration computes only the part that
trains. ``tensorcompress table`` replays one batch in every row;
``tensorcompress run`` records every training and test batch of a seed once
per N and replays them in each method's fine-tuning.

What is replayed: the outermost modules, each called once, that finish before
any trainable parameter is used (a whole block, a stem conv). Only an output
that a module which still runs receives as input is kept (a block's input,
say); the others are replayed as ``meta`` tensors of the right shape, which
cost nothing and fail loudly if anything computes with them. A forward on an
input that was not recorded runs the prefix as usual, so measuring or timing
a replaying model on new data is still exact.

Replaying gives the same values as computing: the recorded forward runs the
same ops on the same input in the same mode (training mode uses batch
statistics, which are the same for every configuration). The one thing the
replay skips is the frozen BatchNorms' running averages, which their forward
would update; :meth:`FrozenPrefix.state` gives the recorded model's prefix
state so that a configuration can take it after training (tests hold the
results equal with and without the replay).
"""

from __future__ import annotations

import contextlib
import zlib
from collections import Counter
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tensorcompress.experiments.train import eval_mode
from tensorcompress.torch.flops import COUNTER_FLOPS

__all__ = ["FrozenPrefix", "input_key"]


def input_key(x: torch.Tensor) -> tuple[Any, ...]:
    """A key identifying a batch by its content: shape, dtype, a CRC of its bytes and its sum."""
    data = x.detach()
    return (
        tuple(data.shape),
        str(data.dtype),
        zlib.crc32(data.cpu().contiguous().numpy().tobytes()),
        float(data.double().sum()),
    )


def _module_events(
    model: nn.Module, example_input: torch.Tensor
) -> tuple[list[tuple[bool, str]], Counter[str]]:
    """``(is_pre, name)`` of every module call in one eval forward, and calls per module."""
    names = {id(m): n for n, m in model.named_modules()}
    events: list[tuple[bool, str]] = []
    calls: Counter[str] = Counter()

    def pre(module: nn.Module, args: Any) -> None:
        events.append((True, names[id(module)]))
        calls[names[id(module)]] += 1

    def post(module: nn.Module, args: Any, out: Any) -> None:
        events.append((False, names[id(module)]))

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return events, calls


def _prefix_modules(
    model: nn.Module,
    events: Sequence[tuple[bool, str]],
    calls: Counter[str],
    trainable: Sequence[str],
) -> list[str]:
    """Outermost modules, called once, that finish before any trainable parameter is used."""
    named = dict(model.named_modules())
    users = {n for n in trainable if any(True for _ in named[n].parameters(recurse=False))}
    first = next((i for i, (is_pre, n) in enumerate(events) if is_pre and n in users), len(events))
    done = {n for i, (is_pre, n) in enumerate(events[:first]) if not is_pre and calls[n] == 1}
    done.discard("")

    def parent(name: str) -> str:
        return name.rpartition(".")[0]

    return [n for n in named if n in done and parent(n) not in done]


class FrozenPrefix:
    """Outputs of a model's frozen prefix, recorded per batch and replayed.

    Parameters
    ----------
    model : nn.Module
        The model whose forward is recorded (frozen as the configurations
        will be; it is not changed).
    trainable : mapping
        For each plan (any hashable key, e.g. the number of fine-tuned
        layers), the names of the modules that train
        (:func:`tensorcompress.torch.fine_tuned_modules`). One recorded
        forward serves every plan.
    example_input : Tensor
        One image, to trace which modules run before anything trainable.

    Attributes
    ----------
    plans : dict
        Plan key to the replayed module names (fixed by the first :meth:`record`).
    needed : dict
        Plan key to the replayed modules whose outputs are kept (the rest are
        replayed as ``meta`` tensors).
    """

    def __init__(
        self,
        model: nn.Module,
        trainable: Mapping[Any, Sequence[str]],
        example_input: torch.Tensor,
    ) -> None:
        events, calls = _module_events(model, example_input)
        self.plans: dict[Hashable, list[str]] = {
            k: _prefix_modules(model, events, calls, t) for k, t in trainable.items()
        }
        self.needed: dict[Hashable, set[str]] = {}
        self._outputs: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}
        self._flops: dict[tuple[Any, ...], dict[str, dict[str, int]]] = {}
        self._keep: set[str] = set()
        self._recorded = False

    def __len__(self) -> int:
        """Number of recorded batches."""
        return len(self._outputs)

    @property
    def nbytes(self) -> int:
        """Bytes of the recorded outputs."""
        return sum(
            t.numel() * t.element_size()
            for outs in self._outputs.values()
            for t in outs.values()
            if t.device.type != "meta"
        )

    def replays(self, plan: Hashable) -> bool:
        """Whether ``plan`` has anything to replay."""
        return bool(self.plans.get(plan))

    def record(self, model: nn.Module, x: torch.Tensor, *, count_flops: bool = False) -> None:
        """Run ``model(x)`` once and keep what the replay of every plan needs.

        The model runs in the mode and gradient mode the caller set (training
        mode under ``torch.no_grad()`` for training batches, eval mode for
        test batches), so its frozen BatchNorms update their running
        averages as in a real step. With ``count_flops``, the counted forward
        flops of each replayed module are kept too (:meth:`forward_flops`).
        """
        candidates = {m for plan in self.plans.values() for m in plan}
        names = {id(m): n for n, m in model.named_modules()}
        outputs: dict[str, torch.Tensor] = {}
        out_ptr: dict[str, int] = {}
        inputs: list[tuple[str, set[int]]] = []  # every call: module name, input storages
        # The first recording matches outputs to later inputs by storage address:
        # the outputs stay referenced until it ends, so that no freed address is
        # reused by an unrelated tensor (a false match would keep that output).
        alive: list[torch.Tensor] = []
        calls: Counter[str] = Counter()
        counter = FlopCounterMode(display=False, custom_mapping=COUNTER_FLOPS)
        started: dict[str, dict[str, int]] = {}
        flops: dict[str, dict[str, int]] = {}

        def snapshot() -> dict[str, int]:
            return {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}

        def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
            name = names[id(module)]
            if not self._recorded:
                ptrs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
                inputs.append((name, ptrs))
            calls[name] += 1
            if name in candidates and count_flops:
                started[name] = snapshot()

        def post(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            name = names[id(module)]
            if name not in candidates:
                return
            if count_flops:
                before, now = started.pop(name), snapshot()
                flops[name] = {op: v - before.get(op, 0) for op, v in now.items()}
                flops[name] = {op: v for op, v in flops[name].items() if v}
            if isinstance(out, torch.Tensor):
                if self._recorded and name not in self._keep:
                    outputs[name] = torch.empty(out.shape, dtype=out.dtype, device="meta")
                else:
                    # A copy: a later in-place op (ReLU(inplace=True)) must not change it.
                    outputs[name] = out.detach().clone()
                    out_ptr[name] = out.untyped_storage().data_ptr()
                    if not self._recorded:
                        alive.append(out)

        handles = []
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        try:
            with counter if count_flops else contextlib.nullcontext():
                model(x)
        finally:
            for h in handles:
                h.remove()
        if not self._recorded:
            self._plan(outputs, out_ptr, inputs, calls)
            alive.clear()
        self._outputs[input_key(x)] = {
            m: t if m in self._keep else torch.empty(t.shape, dtype=t.dtype, device="meta")
            for m, t in outputs.items()
        }
        if count_flops:
            self._flops[input_key(x)] = flops

    def _plan(
        self,
        outputs: Mapping[str, torch.Tensor],
        out_ptr: Mapping[str, int],
        inputs: Sequence[tuple[str, set[int]]],
        calls: Counter[str],
    ) -> None:
        # A module whose output is not one tensor, or that ran more than once,
        # is computed as usual.
        self.plans = {
            k: [m for m in plan if m in outputs and calls[m] == 1] for k, plan in self.plans.items()
        }
        for k, plan in self.plans.items():

            def replayed(name: str, plan: list[str] = plan) -> bool:
                return any(name == m or name.startswith(m + ".") for m in plan)

            live = set().union(*(ptrs for name, ptrs in inputs if not replayed(name)))
            self.needed[k] = {m for m in plan if out_ptr[m] in live}
        self._keep = set().union(*self.needed.values())
        self._recorded = True

    def forward_flops(self, plan: Hashable, x: torch.Tensor) -> dict[str, int]:
        """Counted forward flops, by op, of the modules ``plan`` replays on the recorded ``x``."""
        by_module = self._flops[input_key(x)]
        total: dict[str, int] = {}
        for name in self.plans[plan]:
            for op, v in by_module.get(name, {}).items():
                total[op] = total.get(op, 0) + v
        return total

    def state(self, model: nn.Module, plan: Hashable) -> dict[str, torch.Tensor]:
        """The ``state_dict`` entries of ``model``'s modules that ``plan`` replays (clones).

        Taken from the recorded model after its last recorded batch and loaded
        (``load_state_dict(..., strict=False)``) into a configuration that
        replayed, it restores what the replay skipped: the frozen
        BatchNorms' running averages.
        """
        prefixes = tuple(f"{m}." for m in self.plans[plan])
        return {
            k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefixes)
        }

    @contextlib.contextmanager
    def replaying(self, model: nn.Module, plan: Hashable) -> Iterator[None]:
        """Inside the block, ``model`` replays ``plan``'s modules on every recorded input.

        ``model`` has the recorded model's module names (a copy of it,
        converted or not). A forward on an input that was not recorded runs
        every module as usual. The modules' own ``forward`` is back after the block.
        """
        plan_modules = self.plans[plan]
        needed = self.needed.get(plan, set())
        named = dict(model.named_modules())
        current: list[dict[str, torch.Tensor] | None] = [None]

        def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            current[0] = self._outputs.get(input_key(x)) if isinstance(x, torch.Tensor) else None

        def post(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            current[0] = None

        def replay_of(name: str, original: Any) -> Any:
            def replay(*args: Any, **kwargs: Any) -> Any:
                outs = current[0]
                if outs is None:
                    return original(*args, **kwargs)
                out = outs[name]
                # A fresh tensor: the configuration may modify it in place.
                return out.clone() if name in needed else out

            return replay

        handles = [
            model.register_forward_pre_hook(pre),
            model.register_forward_hook(post, always_call=True),
        ]
        patched = []
        try:
            for name in plan_modules:
                module = named[name]
                # An instance attribute shadows the class's forward.
                module.forward = replay_of(name, module.forward)
                patched.append(module)
            yield
        finally:
            for h in handles:
                h.remove()
            for module in patched:
                del module.forward
