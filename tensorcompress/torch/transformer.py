"""Fine-tuning whole transformer blocks: the methods and the options for every saved tensor.

Compressing the inputs of a block's Linear layers (:func:`~tensorcompress.torch.convert`)
leaves the other tensors the block keeps for backward in place: the attention
tensors, the LayerNorm and activation-function inputs. This module puts every
way of dealing with them, and the baselines, behind one call::

    model = prepare(model, "asi", blocks=4, example_input=batch,
                    options=BlockOptions(attention="sdpa", saved="int8"))

Methods (``method=``), each applied to the selected blocks:

- ``"vanilla"``: the blocks (and everything after them) train, nothing else changes;
- ``"checkpoint"``: activation checkpointing of each whole block with
  :func:`torch.utils.checkpoint.checkpoint` (non-reentrant): the block keeps
  only its input and recomputes its forward during backward. Exact. One
  mechanism for any block module (Hugging Face layers,
  ``nn.TransformerEncoderLayer``), installed per block instance;
- ``"lora"``: LoRA through `peft` (``LoraConfig`` and ``get_peft_model``) on
  the blocks' Linear layers; the modules after the blocks train whole
  (PEFT's ``modules_to_save``);
- ``"lora+asi"``: LoRA, and ASI on the input of each LoRA down-projection
  (``lora_A``, whose input is the frozen layer's input): LoRA cuts the weight
  gradients and optimizer state, ASI the activations LoRA keeps;
- ``"asi"``, ``"hosvd"``, ``"svd"``: the blocks' Linear layers keep a compressed
  input (:func:`~tensorcompress.torch.convert`); exact input gradient;
- ``"wsi"``, ``"wasi"``: the blocks' Linear weights train as factors
  ``L R`` (:func:`~tensorcompress.torch.wasi.to_wasi`, rank ``weight_rank``),
  keeping the input itself (WSI) or its ASI decomposition (WASI, rank
  ``rank``); the optimizer state lives on the factors.

Options (:class:`BlockOptions`), for the tensors that are not Linear inputs:

- ``attention="sdpa"``: the model's attention runs
  :func:`torch.nn.functional.scaled_dot_product_attention`, which keeps
  query, key, value, output and the per-row log-sum-exp instead of the
  attention probabilities (``"eager"`` keeps query, key, the probabilities
  and value). Exact. Hugging Face models only (``nn.MultiheadAttention``
  already uses SDPA when it does not return the weights);
- ``recompute=("norm", "activation")``: each norm and activation-function
  module of the blocks runs under :func:`torch.utils.checkpoint.checkpoint`,
  so it keeps its input only and recomputes the rest. Exact. It helps where
  the module keeps more than its input: Llama's RMSNorm, written as
  element-wise ops, keeps its input and the normalised copy (and ``rsqrt``
  per row), recomputed its input only. ``nn.LayerNorm`` keeps its input and
  two statistics per row, a GELU its input: recomputing them saves only the
  statistics;
- ``saved="int8"``: every other tensor the blocks (and the norms after them)
  save for backward (not a parameter, not a Linear/Conv layer's input, at
  least ``int8_min_bytes``) is kept as int8 with one float32 absmax scale
  per ``int8_block`` consecutive elements (:class:`Int8Saved`, the per-group
  quantization of ActNN and Mesa, through
  :func:`torch.autograd.graph.saved_tensors_hooks`), about 27 % of its
  float32 size. The element-wise activation functions keep their input in
  the same form through their own backward, which writes the derivative over
  the dequantized input (:func:`int8_activations`): one full-size float
  tensor fewer at the MLP's width, where a block's backward peaks.
  **Approximate**: the backward of the norms, the activation function and
  attention then runs on the dequantized tensors, so the gradients through
  them, and every gradient below, are approximate.
- ``fused_mlp=True`` (with ``saved="int8"``): an MLP ``fc2(act(fc1(x)))``
  (or ``down(act(gate(x)) * up(x))``) of a known layout runs its activation
  (and product) and its last Linear as one function that keeps only the
  first layers' outputs as int8 (:func:`fused_mlps`); the last Linear keeps
  no input and is left out of the method's compression (WSI/WASI still
  train it as factors). **Approximate** like ``saved``: its weight (or
  factors') gradient comes from the rebuilt input.
- ``norm_fed=True`` (with ``saved="int8"``): each norm keeps its input as
  int8 once, for its own backward and for the plain Linear layers that
  read its output (q/k/v, the MLP's first layers), which then keep nothing
  and are left out of the method (:func:`share_norm_inputs`). In a pre-norm
  block those are most of the Linear inputs, and the norm keeps its input
  anyway: a decomposition of them only adds time, memory and error. The
  backward rebuilds the norm's output once from the int8 input.
  **Approximate** like ``saved``: those weight gradients come from it.

:func:`restore_blocks` undoes ``checkpoint``, ``recompute``, ``saved``,
``fused_mlp`` and ``norm_fed`` on a prepared model (LoRA and compressed layers have their own undo:
``peft_model.unload()``, :func:`~tensorcompress.torch.restore`).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from tensorcompress.torch.convert import convert
from tensorcompress.torch.functions import factored_linear_base, linear_base
from tensorcompress.torch.lowrank import LowRankModule
from tensorcompress.torch.measure.training import module_kind
from tensorcompress.torch.modules import CompressedModule, check_product_dtype
from tensorcompress.torch.selection import (
    LastBlocks,
    LayerSelection,
    call_model,
    execution_order,
    fine_tuned_modules,
    last_blocks,
    plain_type,
    trainable_only,
)
from tensorcompress.torch.wasi import WASILinear, to_wasi

__all__ = [
    "METHODS",
    "BlockOptions",
    "BlockSelection",
    "Int8Saved",
    "block_names",
    "checkpoint_modules",
    "dequantize_int8",
    "fused_mlps",
    "int8_activations",
    "norm_fed_linears",
    "prepare",
    "quantize_int8",
    "restore_blocks",
    "share_norm_inputs",
]

METHODS = ("vanilla", "checkpoint", "lora", "lora+asi", "asi", "hosvd", "svd", "wsi", "wasi")
"""The methods :func:`prepare` accepts."""

_COMPRESS = ("asi", "hosvd", "svd")
_FACTOR = ("wsi", "wasi")
_RECOMPUTE_KINDS = ("norm", "activation")

BlockSelection: TypeAlias = int | LastBlocks | Sequence[str]
"""The last ``n`` blocks (an int or :func:`~tensorcompress.torch.last_blocks`), or block names."""


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockOptions:
    """What :func:`prepare` does besides the method (see the module docstring).

    Parameters
    ----------
    attention : {"sdpa", "eager"} or None, default None
        Attention implementation of a Hugging Face model
        (``model.set_attn_implementation``); ``None`` leaves the model's.
    recompute : tuple of {"norm", "activation"}, default ()
        Module kinds of the blocks that recompute their forward in backward
        (:func:`checkpoint_modules`). Exact.
    saved : {"int8"} or None, default None
        Compact saved form of the tensors that are not Linear/Conv inputs
        (:class:`Int8Saved`). Approximate gradients.
    rank : int, float, sequence or rank policy, default 0.8
        Rank of ``"asi"``/``"hosvd"``/``"svd"``, of ASI in ``"lora+asi"`` and
        of the input in ``"wasi"`` (as in
        :class:`~tensorcompress.torch.CompressionConfig`).
    weight_rank : int, float or dict, default 0.9
        ``"wsi"``/``"wasi"``: each weight's rank, an int ``k`` or the
        explained variance of its spectrum, or a dict with one of those per
        Linear layer of the blocks (as ``rank`` of
        :func:`~tensorcompress.torch.wasi.to_wasi`; a
        :func:`~tensorcompress.torch.budget.plan_weight_ranks` allocation
        gives one).
    lora_r : int, default 8
        LoRA rank.
    lora_alpha : int, default 16
        LoRA scaling numerator (PEFT's ``lora_alpha``).
    int8_block : int, default 64
        Elements per absmax scale of the int8 form.
    int8_min_bytes : int, default 65536
        Smaller saved tensors are kept as they are (norm statistics,
        log-sum-exp rows).
    in_place_activations : bool or None, default None
        With ``saved="int8"``: the activation functions write their output
        over their input (see :func:`int8_activations`), which lowers the
        forward's peak by one MLP-wide tensor. ``None``: where the block is
        known to read that input nowhere else (the MLPs of Hugging Face's
        ViT, Llama, Mistral, Qwen2/3 and GPT-2); True: everywhere.
    fused_mlp : bool, default False
        With ``saved="int8"``: in each MLP of a known layout (Hugging Face's
        ``ViTMLP``; the gated MLPs of Llama, Mistral, Qwen2/3), the
        activation (and the gate's product) and the Linear after it run as
        one function (:func:`fused_mlps`) that keeps only the int8 forms of
        the activation's input (and of the up projection). The backward rebuilds the
        activation's output from it, a chunk of rows at a time, for that
        Linear's weight gradient, so that Linear keeps no input of its own
        and is left out of the method (not compressed: its input would cost
        a decomposition and memory, where the int8 form is already kept).
        Its weight gradient is then approximate like the activation's. A
        plain ``nn.Linear``, or WSI's/WASI's factored layer (its factors'
        gradients contracted chunk by chunk; no decomposition), not LoRA's.
    norm_fed : bool, default False
        With ``saved="int8"`` and method ``"vanilla"``, ``"asi"``,
        ``"hosvd"``, ``"svd"``, ``"wsi"`` or ``"wasi"``: each norm of the
        blocks keeps its input as int8 once (it keeps it for its own
        backward anyway), and the Linear layers that read the norm's output
        (q/k/v after the first norm, the MLP's first layers after the
        second) keep nothing: their weight gradients (WSI's and WASI's: the
        factors' gradients) use the norm's output rebuilt from that input
        (:func:`share_norm_inputs`). They are left out of the method's
        compression (a decomposition of an input that is free to rebuild
        would cost time and memory); WSI and WASI still factor their
        weights. Approximate like ``saved``.
    product_dtype : torch.dtype or None, default None
        The dtype of the decompositions' tensor products in ``"asi"``,
        ``"hosvd"``, ``"lora+asi"`` and ``"wasi"`` (``product_dtype`` of
        :class:`~tensorcompress.torch.CompressionConfig`).
    only_if_smaller : bool, default False
        ``"wsi"``/``"wasi"``: factor only the Linear layers whose factors at
        ``weight_rank`` hold fewer numbers than their weights
        (``only_if_smaller`` of :func:`~tensorcompress.torch.wasi.to_wasi`).
        The others train their dense weights as the method would without
        factors: WSI's keep their inputs; WASI's are compressed by ASI at
        ``rank`` (or keep nothing, norm-fed or in a fused MLP).
    output_grams : dict or None, default None
        ``"wsi"``/``"wasi"``: one Gram matrix of outputs per Linear layer of
        the blocks (:func:`~tensorcompress.torch.budget.output_grams`), to
        factor each weight in its outputs' basis (``output_grams`` of
        :func:`~tensorcompress.torch.wasi.to_wasi`); None: by its SVD.
    """

    attention: str | None = None
    recompute: tuple[str, ...] = ()
    saved: str | None = None
    rank: Any = 0.8
    weight_rank: int | float | Mapping[str, int | float] = 0.9
    lora_r: int = 8
    lora_alpha: int = 16
    int8_block: int = 64
    int8_min_bytes: int = 1 << 16
    in_place_activations: bool | None = None
    fused_mlp: bool = False
    norm_fed: bool = False
    product_dtype: torch.dtype | None = None
    only_if_smaller: bool = False
    output_grams: Mapping[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        check_product_dtype(self.product_dtype)
        if self.attention not in (None, "sdpa", "eager"):
            raise ValueError(f"attention must be 'sdpa', 'eager' or None, got {self.attention!r}")
        if isinstance(self.recompute, str):
            raise TypeError(
                f"recompute must be a tuple of kinds, not the string {self.recompute!r}; "
                f"write recompute=({self.recompute!r},)"
            )
        recompute = tuple(self.recompute)
        object.__setattr__(self, "recompute", recompute)
        bad = [k for k in recompute if k not in _RECOMPUTE_KINDS]
        if bad:
            raise ValueError(f"recompute kinds must be in {_RECOMPUTE_KINDS}, got {bad}")
        if self.saved not in (None, "int8"):
            raise ValueError(f"saved must be 'int8' or None, got {self.saved!r}")
        if self.saved == "int8" and "activation" in recompute:
            raise ValueError(
                "saved='int8' already keeps each activation function's input only, as int8; "
                "recompute='activation' does not combine with it"
            )
        if self.in_place_activations is not None and self.saved != "int8":
            raise ValueError("in_place_activations applies with saved='int8' only")
        if self.fused_mlp and self.saved != "int8":
            raise ValueError("fused_mlp applies with saved='int8' only")
        if self.norm_fed and self.saved != "int8":
            raise ValueError("norm_fed applies with saved='int8' only")
        for name in ("lora_r", "lora_alpha", "int8_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (
            isinstance(self.int8_min_bytes, bool)
            or not isinstance(self.int8_min_bytes, int)
            or self.int8_min_bytes < 0
        ):
            raise ValueError(
                f"int8_min_bytes must be a non-negative int, got {self.int8_min_bytes!r}"
            )


# ---------------------------------------------------------------------------
# Blocks and module kinds
# ---------------------------------------------------------------------------


def block_names(model: nn.Module, blocks: BlockSelection) -> list[str]:
    """Qualified names of the selected blocks, in list order.

    Parameters
    ----------
    model : nn.Module
        The model.
    blocks : int, LastBlocks or sequence of str
        The last ``n`` blocks of the list
        :func:`~tensorcompress.torch.selection.find_blocks` finds,
        :func:`~tensorcompress.torch.last_blocks` ``(n, blocks=...)``, or
        qualified names of block modules.

    Returns
    -------
    list of str

    Raises
    ------
    ValueError
        As :func:`~tensorcompress.torch.selection.find_blocks`, or a name
        that is not a module of the model.
    TypeError
        A single string, or a ``blocks`` of another type.
    """
    if isinstance(blocks, bool):
        raise TypeError(f"blocks must be an int, last_blocks(n) or names, got {blocks!r}")
    if isinstance(blocks, int):
        return last_blocks(blocks).block_names(model)
    if isinstance(blocks, LastBlocks):
        return blocks.block_names(model)
    if isinstance(blocks, str):
        raise TypeError(f"blocks must be a list of names, not the string {blocks!r}")
    names = list(blocks)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"blocks names {missing}, which are not modules of the model")
    return names


# ---------------------------------------------------------------------------
# Recomputation (torch.utils.checkpoint)
# ---------------------------------------------------------------------------


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = functools.partial(type(self).forward, self)
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def checkpoint_modules(modules: Sequence[nn.Module]) -> None:
    """Run each module's forward under :func:`torch.utils.checkpoint.checkpoint`.

    Non-reentrant checkpointing, in training mode with gradients enabled
    only: the module keeps its inputs, not what its ops save, and reruns its
    forward during backward. Installed on the instances (their ``forward``),
    so parameter names, ``state_dict`` and hooks are unchanged;
    :func:`restore_blocks` removes it.

    Parameters
    ----------
    modules : sequence of nn.Module
        Whole blocks, or the element-wise modules inside them.
    """
    for m in modules:
        _patch_forward(m, _checkpointed_forward)


def _patch_forward(m: nn.Module, forward: Callable[..., Any]) -> None:
    """Bind ``forward`` on the instance.

    As a ``functools.partial`` rather than a bound method: a deep copy binds
    to the copy, and ``torch.save`` of the whole model pickles it (a bound
    method pickles as an attribute lookup that the loaded module cannot do).
    """
    if "forward" in m.__dict__:
        raise ValueError(
            f"{type(m).__name__} already has its own forward on the instance "
            "(checkpointed or int8 already, or patched elsewhere)"
        )
    m.forward = functools.partial(forward, m)


def _patched_by(m: nn.Module, forward: Callable[..., Any]) -> bool:
    fwd = m.__dict__.get("forward")
    return isinstance(fwd, functools.partial) and fwd.func is forward


# ---------------------------------------------------------------------------
# Compact saved form: per-block absmax int8
# ---------------------------------------------------------------------------


@dataclass
class _Packed:
    data: Any  # int8 (n_blocks, block), as packed by the outer hook
    scale: Any  # float32 (n_blocks, 1), as packed by the outer hook
    shape: torch.Size
    dtype: torch.dtype
    numel: int


_CHUNK = 1 << 18  # elements quantized at a time: the only float temporary


def quantize_int8(t: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax int8 form of ``t``: ``(q, scale)``, ``t ≈ q * scale``.

    ``t`` is flattened and split into blocks of ``block`` consecutive
    elements (the last one zero-padded); each block keeps one float32 scale
    ``absmax / 127`` and its elements times the scale's inverse, rounded to
    int8.
    Computed ``2**18`` elements at a time, so the only full-size allocation
    is the int8 result (and a zero-padded copy when ``block`` does not
    divide the size).

    Returns
    -------
    q : Tensor
        int8, ``(ceil(numel / block), block)``.
    scale : Tensor
        float32, ``(ceil(numel / block), 1)``.
    """
    flat = t.detach().reshape(-1)
    n = flat.numel()
    pad = (-n) % block
    if pad:
        flat = nn.functional.pad(flat, (0, pad))
    rows = flat.view(-1, block)
    q = torch.empty(rows.shape, dtype=torch.int8, device=t.device)
    # Every block's absmax without a float temporary: the max and the min,
    # each reduced across the strided dimension (vectorised over blocks, much
    # faster than a reduction along 64 contiguous elements).
    blocks = rows.t()
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.maximum(blocks.amax(dim=0), blocks.amin(dim=0).neg_()).float()
    scale = scale.div_(127.0).clamp_min_(tiny).unsqueeze(1)
    inverse = scale.reciprocal()
    step = max(1, _CHUNK // block)
    # One float buffer for every chunk: a new one per chunk would overlap the last.
    buffer = torch.empty((min(step, rows.shape[0]), block), dtype=torch.float32, device=t.device)
    same = t.dtype == torch.float32
    for i in range(0, rows.shape[0], step):
        chunk, s = rows[i : i + step], inverse[i : i + step]
        work = buffer[: chunk.shape[0]]
        q[i : i + step] = (
            torch.mul(chunk, s, out=work) if same else work.copy_(chunk).mul_(s)
        ).round_()
    return q, scale


def dequantize_int8(
    q: torch.Tensor, scale: torch.Tensor, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`: a tensor of ``shape`` and ``dtype`` (no temporary)."""
    n = math.prod(shape)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    out.copy_(q).mul_(scale)
    return out.view(-1)[:n].view(tuple(shape))


# Row-wise or parameterised activation modules: their backward is not one element's.
_NOT_ELEMENTWISE = (
    nn.Softmax,
    nn.Softmin,
    nn.LogSoftmax,
    nn.Softmax2d,
    nn.GLU,
)


def _elementwise_activation(m: nn.Module) -> bool:
    return (
        module_kind(m) == "activation"
        and not isinstance(m, _NOT_ELEMENTWISE)
        and next(m.parameters(), None) is None
    )


def _write_over(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``x = fn(x)`` in place, a chunk at a time (one chunk-sized temporary)."""
    flat = x.view(-1)
    for i in range(0, flat.numel(), _CHUNK):
        part = fn(flat[i : i + _CHUNK])
        flat[i : i + _CHUNK] = part
        del part  # before the next chunk's is allocated


def _derive_over(
    grad: torch.Tensor, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """``x = fn'(x) * grad`` in place through autograd, a chunk at a time."""
    flat, g = x.view(-1), grad.reshape(-1)
    with torch.enable_grad():
        for i in range(0, flat.numel(), _CHUNK):
            xc = flat[i : i + _CHUNK].detach().requires_grad_()
            (gc,) = torch.autograd.grad(fn(xc), xc, g[i : i + _CHUNK])
            flat[i : i + _CHUNK] = gc
            del xc, gc  # before the next chunk's are allocated


@dataclass(frozen=True)
class _Pointwise:
    """An element-wise function: its value, and in place its value and its derivative."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    apply_: Callable[[torch.Tensor], object]  # x <- fn(x)
    derive_: Callable[[torch.Tensor, torch.Tensor], object]  # (grad, x): x <- fn'(x) * grad

    @classmethod
    def through_autograd(cls, fn: Callable[[torch.Tensor], torch.Tensor]) -> _Pointwise:
        """Any element-wise ``fn``, in chunks (its derivative by autograd)."""
        return cls(
            fn, functools.partial(_write_over, fn=fn), functools.partial(_derive_over, fn=fn)
        )


_aten = torch.ops.aten


def _gelu_derive_(grad: torch.Tensor, x: torch.Tensor) -> object:
    return _aten.gelu_backward.grad_input(grad, x, grad_input=x)


def _gelu_tanh_derive_(grad: torch.Tensor, x: torch.Tensor) -> object:
    return _aten.gelu_backward.grad_input(grad, x, approximate="tanh", grad_input=x)


def _silu_derive_(grad: torch.Tensor, x: torch.Tensor) -> object:
    return _aten.silu_backward.grad_input(grad, x, grad_input=x)


def _relu_derive_(grad: torch.Tensor, x: torch.Tensor) -> object:
    return _aten.threshold_backward.grad_input(grad, x, 0, grad_input=x)


# Activations with in-place kernels for the value and the derivative: one pass
# over the whole tensor each, no autograd graph, no chunk-sized temporaries.
# Modules name theirs (a pickled or copied model keeps a name, not aten ops).
_KERNELS = {
    "gelu": _Pointwise(nn.functional.gelu, _aten.gelu_, _gelu_derive_),
    "gelu_tanh": _Pointwise(
        functools.partial(nn.functional.gelu, approximate="tanh"),
        functools.partial(_aten.gelu_, approximate="tanh"),
        _gelu_tanh_derive_,
    ),
    "silu": _Pointwise(nn.functional.silu, _aten.silu_, _silu_derive_),
    "relu": _Pointwise(nn.functional.relu, _aten.relu_, _relu_derive_),
}


def _kernel_of(m: nn.Module) -> str | None:
    """The name of the :data:`_KERNELS` entry that computes ``m`` exactly, if any.

    Found by evaluating ``m`` on a probe, so any module that is GELU, SiLU or
    ReLU (``nn.GELU``, Hugging Face's ``GELUActivation``, ...) gets them, and
    any other falls back to autograd.
    """
    probe = torch.linspace(-8.0, 8.0, 4097)
    with torch.no_grad():
        want = type(m).forward(m, probe)
        for name, kernel in _KERNELS.items():
            got = probe.clone()
            kernel.apply_(got)
            if torch.equal(got, want):
                return name
    return None


def _install_int8(act: nn.Module, forward: Callable[..., Any], block: int) -> None:
    """Patch an activation module's forward to an int8 one, with its block size and kernel."""
    _patch_forward(act, forward)
    # nn.Module attributes are typed as tensors, hence setattr.
    setattr(act, "_int8_block", block)  # noqa: B010
    setattr(act, "_int8_kernel", _kernel_of(act))  # noqa: B010


def _uninstall_int8(act: nn.Module) -> None:
    del act.forward, act._int8_block, act._int8_kernel


def _pointwise(m: nn.Module) -> _Pointwise:
    """The element-wise function of an activation module that int8 forms were installed on."""
    name: str | None = m._int8_kernel  # type: ignore[assignment]
    if name is not None:
        return _KERNELS[name]
    return _Pointwise.through_autograd(functools.partial(type(m).forward, m))


class _Int8Elementwise(torch.autograd.Function):
    """``fn(x)`` exactly, keeping ``x`` as int8; the backward writes into the dequantized input.

    With ``in_place`` the output is written over ``x``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        fn: _Pointwise,
        block: int,
        in_place: bool,
    ) -> torch.Tensor:
        q, scale = quantize_int8(x, block)
        ctx.save_for_backward(q, scale)
        ctx.fn, ctx.shape, ctx.dtype = fn, x.shape, x.dtype
        if not in_place or x._is_view() or not x.is_contiguous():
            # Autograd cannot overwrite a view of another function's result.
            return fn.fn(x)
        fn.apply_(x)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        q, scale = ctx.saved_tensors
        x = dequantize_int8(q, scale, ctx.shape, ctx.dtype)
        # The derivative written over the input it was taken at: one full-size
        # float tensor besides the incoming gradient, not two.
        ctx.fn.derive_(grad, x)
        return x, None, None, None


def _training_step(m: nn.Module, *tensors: torch.Tensor) -> bool:
    """Whether ``m`` runs a training forward that something will differentiate."""
    return (
        m.training
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (*tensors, *m.parameters()))
    )


def _int8_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An element-wise activation's forward through :class:`_Int8Elementwise` (training only)."""
    if _training_step(self, x):  # an activation of int8_activations owns no parameter
        return _Int8Elementwise.apply(x, _pointwise(self), self._int8_block, self._int8_in_place)
    return type(self).forward(self, x)


def int8_activations(
    modules: Sequence[nn.Module], block: int = 64, in_place: bool = False
) -> list[nn.Module]:
    """Make the element-wise activation modules among ``modules`` keep their input as int8.

    Their forward stays exact; in training, the input is kept in
    :func:`quantize_int8`'s form instead of float, and the backward computes
    the derivative at the dequantized input, writing it over that input:
    GELU (exact or tanh), SiLU and ReLU, whatever their module class, through
    aten's in-place kernels in one pass each, any other activation through
    autograd a chunk at a time. The gradient through the activation is then
    approximate (as with :class:`Int8Saved`), but its backward holds one
    full-size float tensor besides the incoming gradient, where a
    saved-tensor hook's dequantized input plus the activation's own backward
    hold two: at the MLP's width, that difference is what sets a block's
    peak. Installed on the instances (their ``forward``), so names and
    ``state_dict`` are unchanged; :func:`restore_blocks` removes it.

    Parameters
    ----------
    modules : sequence of nn.Module
        Candidates; the activation modules among them that act element-wise
        and own no parameters (GELU, SiLU, ReLU, Hugging Face's activation
        classes; not softmax, GLU or PReLU) are changed.
    block : int, default 64
        Elements per scale.
    in_place : bool, default False
        In training, write the output over the input (in one pass, or a
        chunk at a time where the activation has no in-place kernel): the
        forward then holds one MLP-wide float tensor where it held two (the
        input, kept alive by the caller until the activation returns, and
        the output). Only for blocks where nothing else reads the
        activation's input afterwards (Hugging Face's ViT, Llama-family and
        GPT-2 MLPs); a later reader would see the output. Autograd refuses
        an input that is a leaf or a view, or that an earlier op saved.

    Returns
    -------
    list of nn.Module
        The modules changed.
    """
    changed = []
    for m in modules:
        if not _elementwise_activation(m):
            continue
        _install_int8(m, _int8_forward, block)
        setattr(m, "_int8_in_place", in_place)  # noqa: B010
        changed.append(m)
    return changed


class _Int8ActivationLinear(torch.autograd.Function):
    """``linear(fn(x))``, or ``linear(fn(x) * up)`` (gated MLPs), keeping ``x`` and ``up`` as int8.

    The Linear's weight is ``weight``, or ``weight @ right`` (``L R``, a
    factored layer's; its factors' gradients are contracted from the chunks,
    no dense weight or gradient is formed).
    ``x`` (and ``up``) are outputs of the MLP's first Linear layers, which
    nothing else reads: once their int8 copies are taken, the forward writes
    the Linear's input over ``x``, so the MLP's forward holds no MLP-wide
    float tensor besides them. The backward dequantizes
    them and rebuilds the Linear's input a chunk of rows at a time, for the
    weight gradient and for the derivatives, written over the dequantized
    tensors. The chunk-sized temporaries are allocated once and reused.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        up: torch.Tensor | None,
        fn: _Pointwise,
        block: int,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        right: torch.Tensor | None,
    ) -> torch.Tensor:
        kept = [*quantize_int8(x, block)]
        if up is not None:
            kept += quantize_int8(up, block)
        ctx.save_for_backward(weight, right, *kept)
        ctx.fn, ctx.shape, ctx.dtype, ctx.has_bias = fn, x.shape, x.dtype, bias is not None
        in_place = not x._is_view() and x.is_contiguous()
        if up is not None:
            in_place = in_place and up.shape == x.shape
        if not in_place:
            h = fn.fn(x) if up is None else fn.fn(x) * up
        else:
            h = x.detach()
            fn.apply_(h)
            if up is not None:
                h.mul_(up.detach())
        if right is not None:
            # In h's dtype (autocast's, if on): the chunked products take no autocast.
            dtype = h.dtype
            b = None if bias is None else bias.to(dtype)
            return factored_linear_base(h, weight.to(dtype), right.to(dtype), b)
        return nn.functional.linear(h, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        weight, right, *kept = ctx.saved_tensors
        shape, width, fn = ctx.shape, ctx.shape[-1], ctx.fn
        x = dequantize_int8(kept[0], kept[1], shape, ctx.dtype)
        up = dequantize_int8(kept[2], kept[3], shape, ctx.dtype) if len(kept) > 2 else None
        # In x's dtype: under autocast the gradient, x and the weight may each have their own.
        rows, g = x.view(-1, width), grad.reshape(-1, weight.shape[0]).to(ctx.dtype)
        ups = up.view(-1, width) if up is not None else None
        need_x, need_up, _, _, need_w, need_b, need_r = ctx.needs_input_grad
        need_h = need_x or need_up
        dw = torch.zeros(weight.shape, dtype=ctx.dtype, device=g.device) if need_w else None
        w = weight.detach().to(ctx.dtype)
        r = None if right is None else right.detach().to(ctx.dtype)
        dr = torch.zeros(right.shape, dtype=ctx.dtype, device=g.device) if need_r else None
        step = max(1, _CHUNK // width)
        # Chunk-sized buffers, reused: the activation, h's gradient and (gated) act's.
        n = min(step, rows.shape[0])
        a_buf = rows.new_empty((n, width))
        dh_buf = rows.new_empty((n, width)) if need_h else None
        dfn_buf = rows.new_empty((n, width)) if need_x and ups is not None else None
        for i in range(0, rows.shape[0], step):
            xc, gc = rows[i : i + step], g[i : i + step]
            a = a_buf[: xc.shape[0]].copy_(xc)
            fn.apply_(a)
            # Factored (L R): G L once per chunk, for dh = (G L) R and dR = (G L)^T a.
            gl = None if r is None else torch.mm(gc, w)
            dh = None
            if dh_buf is not None:
                lhs, rhs = (gc, w) if r is None or gl is None else (gl, r)
                dh = torch.mm(lhs, rhs, out=dh_buf[: xc.shape[0]])
            dfn = dh
            if ups is not None:
                other = ups[i : i + step]
                if dh is not None and dfn_buf is not None:
                    dfn = torch.mul(dh, other, out=dfn_buf[: xc.shape[0]])
                if need_up and dh is not None:
                    dh.mul_(a)  # up's gradient
                a.mul_(other)  # h = act(x) * up
                if need_up and dh is not None:
                    other.copy_(dh)  # written over up
            if dw is not None:
                dw.addmm_(gc.t(), a if r is None else torch.mm(a, r.t()))
            if dr is not None and gl is not None:
                dr.addmm_(gl.t(), a)
            if need_x:
                fn.derive_(dfn, xc)  # written over x
        db = g.sum(0) if ctx.has_bias and need_b else None
        if dw is not None:
            dw = dw.to(weight.dtype)
        if dr is not None:
            dr = dr.to(right.dtype)
        return (
            x if need_x else None,
            up if need_up else None,
            None,
            None,
            dw,
            db,
            dr,
        )


# MLP classes whose forward is ``second(act(first(x)))``, or ``second(act(first(x)) *
# up(x))`` (gated): their (first, activation, second, up) attribute names.
_MLP_LAYOUTS: dict[str, tuple[str, str, str, str | None]] = {
    "ViTMLP": ("fc1", "activation_fn", "fc2", None),
    **{
        name: ("gate_proj", "act_fn", "down_proj", "up_proj")
        for name in ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
    },
}


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    first, act, second, up = _MLP_LAYOUTS[type(self).__name__]
    h = getattr(self, first)(x)
    if up is None:
        return getattr(self, act)(h, getattr(self, second))
    return getattr(self, act)(h, getattr(self, second), getattr(self, up)(x))


def _int8_linear_forward(
    self: nn.Module, x: torch.Tensor, linear: nn.Module, up: torch.Tensor | None = None
) -> torch.Tensor:
    """A fused MLP's activation: ``linear(act(x) [* up])`` (:class:`_Int8ActivationLinear`)."""
    if self.training and torch.is_grad_enabled():
        fn = _pointwise(self)
        block = self._int8_block
        if isinstance(linear, WASILinear):
            linear.refresh_if_changed()  # as its own forward would
            return _Int8ActivationLinear.apply(
                x, up, fn, block, linear.left, linear.bias, linear.right
            )
        return _Int8ActivationLinear.apply(x, up, fn, block, linear.weight, linear.bias, None)
    h = type(self).forward(self, x)
    return linear(h if up is None else h * up)


def _fusable(m: nn.Module) -> bool:
    layout = _MLP_LAYOUTS.get(type(m).__name__)
    if layout is None:
        return False
    _, act, second, _ = (getattr(m, n, None) if n else None for n in layout)
    return (
        isinstance(act, nn.Module)
        and _elementwise_activation(act)
        and isinstance(second, nn.Module)
        and (
            (plain_type(second) is nn.Linear and not isinstance(second, CompressedModule))
            or isinstance(second, WASILinear)
        )
    )


def fused_mlps(modules: Sequence[nn.Module], block: int = 64) -> list[nn.Module]:
    """Run the activation and the second Linear of the MLPs among ``modules`` as one int8 function.

    An MLP of a known layout, Hugging Face's ``ViTMLP`` (``fc2(act(fc1(x)))``)
    or a gated MLP of Llama, Mistral, Qwen2/3 (``down_proj(act(gate_proj(x))
    * up_proj(x))``), whose activation acts element-wise and whose last
    layer is a plain ``nn.Linear`` or a factored
    :class:`~tensorcompress.torch.wasi.WASILinear` (trained as ``L R``; its
    factors' gradients are contracted chunk by chunk, it decomposes
    nothing), then keeps in training the int8 forms
    (:func:`quantize_int8`) of the first layer's output (and of the up
    projection's) and nothing else for the rest: no float activation input,
    no product for the gate, no input for the last layer. The forward is
    exact; once the int8 copies are taken it writes the last layer's input
    over the first layer's output (which nothing else reads in these
    layouts). The backward rebuilds that input from the int8 forms, a chunk
    of rows at a time, for the last layer's weight gradient and for the
    derivatives, written over the dequantized tensors, so those gradients
    are approximate (as with :func:`int8_activations`) and it holds no
    MLP-wide float tensor besides the input gradients. The last layer's
    forward and hooks do not run in training. Installed on the instances
    (their ``forward``); :func:`restore_blocks` removes it.

    Parameters
    ----------
    modules : sequence of nn.Module
        Candidates (every module of the blocks, say).
    block : int, default 64
        Elements per scale.

    Returns
    -------
    list of nn.Module
        The MLP modules changed.
    """
    changed = []
    for m in modules:
        if not _fusable(m):
            continue
        act = getattr(m, _MLP_LAYOUTS[type(m).__name__][1])
        # The activation runs in the activation's own module call: its saves count as its.
        _install_int8(act, _int8_linear_forward, block)
        _patch_forward(m, _fused_mlp_forward)
        changed.append(m)
    return changed


# ---------------------------------------------------------------------------
# Norm-fed Linear layers: one int8 input per norm
# ---------------------------------------------------------------------------


class _NormSource:
    """A norm's input as int8, shared by the norm's backward and the Linear layers it feeds.

    The backward rebuilds the norm's output from it once: the first fed
    Linear to need it (for its weight gradient) recomputes it with autograd,
    the others reuse it, and the norm's own backward differentiates that
    same recomputation, then drops it.
    """

    def __init__(self, norm: nn.Module, q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor):
        self.norm = norm
        self.q, self.scale = q, scale
        self.shape, self.dtype, self.input_grad = x.shape, x.dtype, x.requires_grad
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    def _recompute(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._x is None or self._y is None:
            x = dequantize_int8(self.q, self.scale, self.shape, self.dtype)
            x.requires_grad_(self.input_grad)
            with torch.enable_grad():
                self._y = type(self.norm).forward(self.norm, x)
            self._x = x
        return self._x, self._y

    def output(self) -> torch.Tensor:
        """The norm's output, rebuilt from the int8 input (computed once per backward)."""
        return self._recompute()[1].detach()

    def backward(
        self, grad: torch.Tensor, params: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor | None, ...]:
        """Gradients of the input and of ``params`` through the rebuilt norm."""
        x, y = self._recompute()
        inputs = [t for t in (x, *params) if t.requires_grad]
        grads = iter(torch.autograd.grad(y, inputs, grad) if inputs else ())
        self._x = self._y = None
        return tuple(next(grads) if t.requires_grad else None for t in (x, *params))


class _Int8Norm(torch.autograd.Function):
    """A norm's forward, exact, keeping its input as int8 (:class:`_NormSource`)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, norm: nn.Module, block: int, *params: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            y: torch.Tensor = type(norm).forward(norm, x)
        q, scale = quantize_int8(x, block)
        # Saved through autograd (so memory accounting sees it) and held by the source.
        ctx.save_for_backward(q, scale)
        source = _NormSource(norm, q, scale, x)
        ctx.source, ctx.params = source, params
        y._norm_source = source  # type: ignore[attr-defined]  # read by the fed Linear layers
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        gx, *gparams = ctx.source.backward(grad, ctx.params)
        return (gx, None, None, *gparams)


class _NormFedLinear(torch.autograd.Function):
    """``F.linear`` that keeps no input: its weight gradient uses the norm's rebuilt output."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        source: _NormSource,
    ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.source, ctx.has_bias = source, bias is not None
        return linear_base(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (weight,) = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0])
        gx = (grad @ weight) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            y = ctx.source.output()
            gw = g.t() @ y.reshape(-1, weight.shape[1])
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def _int8_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A norm's forward through :class:`_Int8Norm` (training only)."""
    if _training_step(self, x):
        return _Int8Norm.apply(x, self, self._int8_block, *self.parameters())
    return type(self).forward(self, x)


def _norm_fed_linear_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Linear's forward keeping nothing of ``x`` when a prepared norm made it.

    A plain Linear runs :class:`_NormFedLinear`; a factored one
    (:class:`~tensorcompress.torch.wasi.WASILinear`) its own
    :meth:`~tensorcompress.torch.wasi.WASILinear.forward_from`.
    """
    source = getattr(x, "_norm_source", None)
    if source is not None and isinstance(self, WASILinear):
        return self.forward_from(x, source)
    if source is not None and _training_step(self, x):
        return _NormFedLinear.apply(x, self.weight, self.bias, source)
    return type(self).forward(self, x)


def norm_fed_linears(
    model: nn.Module, blocks: Sequence[nn.Module], example_input: Any
) -> dict[nn.Module, list[nn.Module]]:
    """The norms of ``blocks`` and the plain ``nn.Linear`` layers that read their outputs.

    Found by running ``model`` on ``example_input`` once (no gradients) and
    matching each Linear's input against the norm outputs of the same forward.

    Parameters
    ----------
    model : nn.Module
        The model the blocks belong to.
    blocks : sequence of nn.Module
        Where to look for norms and Linear layers.
    example_input : tensor, tuple or dict
        A batch, as in :func:`~tensorcompress.torch.selection.call_model`.

    Returns
    -------
    dict
        Each norm whose output some Linear layer reads, to those layers in call order.
    """
    norms = [m for b in blocks for m in b.modules() if module_kind(m) == "norm"]
    linears = [m for b in blocks for m in b.modules() if plain_type(m) is nn.Linear]
    outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    fed: dict[nn.Module, list[nn.Module]] = {}

    def after_norm(m: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            outputs[id(out)] = (m, out)  # the tensor itself keeps its id unique

    def before_linear(m: nn.Module, args: Any) -> None:
        hit = outputs.get(id(args[0])) if args else None
        if hit is not None and hit[1] is args[0] and m not in fed.get(hit[0], []):
            fed.setdefault(hit[0], []).append(m)

    handles = [n.register_forward_hook(after_norm) for n in norms]
    handles += [m.register_forward_pre_hook(before_linear) for m in linears]
    try:
        with torch.no_grad():
            call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return fed


def share_norm_inputs(fed: dict[nn.Module, list[nn.Module]], block: int = 64) -> None:
    """Make each norm keep its input as int8 once, for itself and the Linear layers it feeds.

    In training, each norm of ``fed`` keeps its input in
    :func:`quantize_int8`'s form and nothing else, and each of its Linear
    layers keeps no input at all: in backward the norm's output is rebuilt
    once from the int8 input, for those layers' weight gradients and for the
    norm's own backward (which differentiates that rebuild). The forward is
    exact; the weight gradients of the fed layers and the gradients through
    the norm are approximate, as with :class:`Int8Saved`. Installed on the
    instances (their ``forward``); :func:`restore_blocks` removes it.

    Parameters
    ----------
    fed : dict
        Norm module to the layers that read its output
        (:func:`norm_fed_linears`): plain ``nn.Linear``, or
        :class:`~tensorcompress.torch.wasi.WASILinear` (their factors'
        gradients then use the rebuilt output, whatever their method).
    block : int, default 64
        Elements per scale.
    """
    for norm, linears in fed.items():
        _patch_forward(norm, _int8_norm_forward)
        setattr(norm, "_int8_block", block)  # noqa: B010
        for m in linears:
            _patch_forward(m, _norm_fed_linear_forward)


class Int8Saved:
    """Keep the blocks' saved tensors that are not layer inputs as per-block int8.

    While a selected block runs its training forward, a
    :func:`torch.autograd.graph.saved_tensors_hooks` pair packs every
    floating-point tensor an op saves for backward, unless it is a parameter
    or shares storage with one, is saved inside a Conv/Linear layer (plain,
    compressed or factored: those inputs are the weight gradient's, which the
    methods handle), or is smaller than ``min_bytes``. The backward receives the
    dequantized tensor.

    The hooks chain to the ones active outside the block (a measurement's),
    which then see the int8 tensors, so saved-tensor accounting counts the
    compact form. A tensor saved twice in one block (the probabilities that
    softmax and the next matmul both keep) is packed once.

    Parameters
    ----------
    blocks : sequence of nn.Module
        The modules whose training forward is covered: the blocks, and any
        module after them whose saved tensors should be compact too (a final
        norm).
    block : int, default 64
        Elements per scale.
    min_bytes : int, default 65536
        Smaller tensors are kept as they are.

    Notes
    -----
    Packing costs a few passes over each tensor in forward, a chunk at a time,
    and unpacking two in backward, written straight into the dequantized
    tensor: neither allocates a full-size float temporary. The error of one
    element is at most half a quantization step, ``absmax(block) / 254``.
    """

    def __init__(self, blocks: Sequence[nn.Module], *, block: int = 64, min_bytes: int = 1 << 16):
        self.block = block
        self.min_bytes = min_bytes
        self.blocks = list(blocks)
        self._depth = 0
        self._contexts: list[Any] = []
        self._cache: dict[tuple[Any, ...], tuple[weakref.ref[torch.Tensor], Any]] = {}
        self._state: set[int] = set()
        self.handles: list[Any] = []
        for b in self.blocks:
            self.handles.append(b.register_forward_pre_hook(self._enter))
            self.handles.append(b.register_forward_hook(self._exit, always_call=True))
            for m in b.modules():
                if (
                    plain_type(m) is not None
                    or isinstance(m, (nn.Conv3d, CompressedModule, LowRankModule))
                    or _patched_by(m, _int8_forward)
                    or _patched_by(m, _int8_linear_forward)
                ):
                    self.handles.append(m.register_forward_pre_hook(self._layer_enter))
                    self.handles.append(m.register_forward_hook(self._layer_exit, always_call=True))

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _layer_enter(self, module: nn.Module, args: Any) -> None:
        self._depth += 1

    def _layer_exit(self, module: nn.Module, args: Any, out: Any) -> None:
        self._depth -= 1

    def _enter(self, module: nn.Module, args: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            self._contexts.append(None)
            return
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        outer_pack, outer_unpack = top if top is not None else (None, None)
        self._state = {
            p.untyped_storage().data_ptr() for p in (*module.parameters(), *module.buffers())
        }
        self._cache.clear()
        ctx = torch.autograd.graph.saved_tensors_hooks(
            functools.partial(self._pack, outer_pack), functools.partial(self._unpack, outer_unpack)
        )
        ctx.__enter__()
        self._contexts.append(ctx)

    def _exit(self, module: nn.Module, args: Any, out: Any) -> None:
        ctx = self._contexts.pop()
        self._cache.clear()
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def _eligible(self, t: torch.Tensor) -> bool:
        return (
            self._depth == 0
            and t.is_floating_point()
            and t.numel() * t.element_size() >= self.min_bytes
            and t.untyped_storage().data_ptr() not in self._state
        )

    def _pack(self, outer: Callable[[Any], Any] | None, t: torch.Tensor) -> Any:
        if not self._eligible(t):
            return ("plain", outer(t) if outer is not None else t)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is t:
            return hit[1]
        q, scale = quantize_int8(t, self.block)
        if outer is not None:
            q, scale = outer(q), outer(scale)
        packed = ("int8", _Packed(q, scale, t.shape, t.dtype, t.numel()))
        self._cache[key] = (weakref.ref(t), packed)
        return packed

    @staticmethod
    def _unpack(outer: Callable[[Any], Any] | None, obj: Any) -> torch.Tensor:
        tag, value = obj
        if tag == "plain":
            return outer(value) if outer is not None else value
        q, scale = value.data, value.scale
        if outer is not None:
            q, scale = outer(q), outer(scale)
        return dequantize_int8(q, scale, value.shape, value.dtype)


# ---------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------


def _linear_names(model: nn.Module, blocks: Sequence[str]) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if plain_type(m) is nn.Linear and any(name.startswith(b + ".") for b in blocks)
    ]


def _freeze_to_blocks(model: nn.Module, blocks: Sequence[str], example_input: Any) -> list[str]:
    """Train the blocks and everything that runs after them; returns the head's modules."""
    order = execution_order(model, example_input)
    first = next((n for n in order if any(n.startswith(b + ".") for b in blocks)), None)
    if first is None:
        raise ValueError(f"blocks {list(blocks)} own no parameters that run on example_input")
    names = fine_tuned_modules(model, [first], example_input)
    trainable_only(model, names)
    return [n for n in names if not any(n == b or n.startswith(b + ".") for b in blocks)]


def _set_attention(model: nn.Module, attention: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise TypeError(
            f"attention={attention!r} needs a Hugging Face model (set_attn_implementation); "
            f"{type(model).__name__} has none (nn.MultiheadAttention already uses SDPA "
            "when it does not return its weights)"
        )
    setter(attention)


def prepare(
    model: nn.Module,
    method: str,
    blocks: BlockSelection,
    *,
    example_input: Any,
    options: BlockOptions | None = None,
) -> nn.Module:
    """Make ``model`` ready to fine-tune its last blocks with ``method``.

    Parameters
    ----------
    model : nn.Module
        A transformer (Hugging Face, ``nn.TransformerEncoder``, any model whose
        blocks :func:`block_names` finds or that you name); modified in place.
    method : str
        One of :data:`METHODS` (see the module docstring).
    blocks : int, LastBlocks or sequence of str
        The last ``n`` blocks, :func:`~tensorcompress.torch.last_blocks`
        ``(n)``, or block names (:func:`block_names`).
    example_input : tensor, tuple or dict
        A batch (a dict is passed as keyword arguments), to find what runs
        after the blocks.
    options : BlockOptions, optional
        Attention implementation, recomputation, int8 saved form, ranks.

    Returns
    -------
    nn.Module
        The model to train: ``model`` itself, or PEFT's ``PeftModel`` around it
        for ``"lora"`` and ``"lora+asi"``. Trainable: the blocks (their LoRA
        adapters for LoRA) and every module that runs after them (final norm,
        classifier); everything else is frozen. A Hugging Face model's
        ``config.use_cache`` is set to False (training keeps no key/value
        cache).

    Raises
    ------
    ValueError
        On an unknown method, ``"checkpoint"`` combined with ``recompute`` or
        ``saved`` (the block keeps only its input already), or bad blocks.
    TypeError
        On ``attention`` for a model that cannot switch it.
    ImportError
        For LoRA without `peft` installed.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tensorcompress.torch.transformer import prepare
    >>> layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    >>> model = nn.Sequential(nn.TransformerEncoder(layer, 3), nn.Linear(32, 4))
    >>> x = torch.randn(2, 5, 32)
    >>> model = prepare(model, "checkpoint", 2, example_input=x)
    >>> [n for n, p in model.named_parameters() if p.requires_grad][0]
    '0.layers.1.self_attn.in_proj_weight'
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    opts = options if options is not None else BlockOptions()
    if method == "checkpoint" and (opts.recompute or opts.saved):
        raise ValueError(
            "method='checkpoint' already keeps only each block's input; "
            f"recompute={opts.recompute!r} and saved={opts.saved!r} do not apply"
        )
    names = block_names(model, blocks)
    modules = dict(model.named_modules())
    if opts.attention is not None:
        _set_attention(model, opts.attention)
    config: Any = getattr(model, "config", None)
    if getattr(config, "use_cache", None):
        # A training step needs no key/value cache, and a checkpointed block run again
        # in backward would append to it a second time.
        config.use_cache = False
    head = _freeze_to_blocks(model, names, example_input)
    block_modules = [modules[n] for n in names]
    fed: dict[nn.Module, list[nn.Module]] = {}
    if opts.norm_fed:
        if method not in ("vanilla", *_COMPRESS, *_FACTOR):
            raise ValueError(
                "norm_fed needs nn.Linear layers (plain or factored): method 'vanilla', 'asi', "
                f"'hosvd', 'svd', 'wsi' or 'wasi', got {method!r}"
            )
        fed = norm_fed_linears(model, block_modules, example_input)
        if not fed:
            raise ValueError("norm_fed: no plain nn.Linear of the blocks reads a norm's output")
    if opts.only_if_smaller and method not in _FACTOR:
        raise ValueError(f"only_if_smaller applies to 'wsi' and 'wasi', got {method!r}")
    if opts.output_grams is not None and method not in _FACTOR:
        raise ValueError(f"output_grams applies to 'wsi' and 'wasi', got {method!r}")
    head_modules = [modules[n] for n in head if plain_type(modules[n]) is None]
    # A fused MLP's second Linear and the norm-fed ones keep nothing: not compressed.
    kept_nothing = {id(m) for linears in fed.values() for m in linears}
    if opts.fused_mlp:
        kept_nothing |= {
            id(getattr(m, _MLP_LAYOUTS[type(m).__name__][2]))
            for b in block_modules
            for m in b.modules()
            if _fusable(m)
        }
    if method == "checkpoint":
        checkpoint_modules(block_modules)
    elif method in _COMPRESS:
        layers: LayerSelection
        if opts.fused_mlp or fed:
            layers = [n for n in _linear_names(model, names) if id(modules[n]) not in kept_nothing]
        elif isinstance(blocks, (int, LastBlocks)):
            layers = last_blocks(blocks) if isinstance(blocks, int) else blocks
        else:
            layers = _linear_names(model, names)
        convert(
            model,
            method=method,
            rank=opts.rank,
            layers=layers,
            example_input=example_input,
            product_dtype=opts.product_dtype,
        )
    elif method in _FACTOR:
        name_of = {id(m): n for n, m in modules.items()}
        fed_names = {norm: [name_of[id(m)] for m in linears] for norm, linears in fed.items()}
        linears = _linear_names(model, names)
        to_wasi(
            model,
            method=method,
            rank=opts.weight_rank,
            act_rank=opts.rank,
            layers=linears,
            only_if_smaller=opts.only_if_smaller,
            product_dtype=opts.product_dtype,
            output_grams=opts.output_grams,
        )
        # The factored layers replaced the plain ones the norms feed.
        factored = dict(model.named_modules())
        fed = {norm: [factored[n] for n in fed_names[norm]] for norm in fed}
        # Layers left dense (only_if_smaller): WASI keeps their inputs as ASI would.
        dense = [n for n in linears if factored[n] is modules[n]]
        rest = [n for n in dense if id(modules[n]) not in kept_nothing]
        if method == "wasi" and rest:
            convert(
                model,
                method="asi",
                rank=opts.rank,
                layers=rest,
                example_input=example_input,
                product_dtype=opts.product_dtype,
            )
    elif method in ("lora", "lora+asi"):
        model = _lora(model, names, head, opts, example_input, asi=method == "lora+asi")
        # PEFT wraps the trained head modules (modules_to_save): hook the wrappers.
        wrappers = {
            id(getattr(m, "original_module", None)): m
            for m in model.modules()
            if getattr(m, "original_module", None) is not None
        }
        head_modules = [wrappers.get(id(m), m) for m in head_modules]
    if opts.recompute:
        checkpoint_modules(
            [m for b in block_modules for m in b.modules() if module_kind(m) in opts.recompute]
        )
    if opts.saved == "int8":
        targets = [*block_modules, *head_modules]
        fused: set[nn.Module] = set()
        if opts.fused_mlp:
            fused = set(
                fused_mlps([m for b in block_modules for m in b.modules()], opts.int8_block)
            )
            if not fused:
                raise ValueError(
                    f"fused_mlp: no MLP of the blocks has a known layout ({sorted(_MLP_LAYOUTS)}) "
                    f"with a plain nn.Linear second layer (method {method!r})"
                )
        for b in targets:
            for parent in b.modules():
                if parent in fused:
                    continue
                in_place = opts.in_place_activations
                if in_place is None:
                    in_place = type(parent).__name__ in _MLP_READ_ONCE
                int8_activations(list(parent.children()), block=opts.int8_block, in_place=in_place)
        share_norm_inputs(fed, opts.int8_block)
        Int8Saved(targets, block=opts.int8_block, min_bytes=opts.int8_min_bytes)
    return model


# Hugging Face MLPs whose activation's input has no other reader: the
# activation may write its output over it (BlockOptions.in_place_activations).
_MLP_READ_ONCE = frozenset(
    {"ViTMLP", "ViTIntermediate", "LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GPT2MLP"}
)


def _lora(
    model: nn.Module,
    blocks: Sequence[str],
    head: Sequence[str],
    opts: BlockOptions,
    example_input: Any,
    *,
    asi: bool,
) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is part of the transformers extra
        raise ImportError("method='lora' needs peft: pip install peft") from err
    targets = _linear_names(model, blocks)
    modules = dict(model.named_modules())
    owners = {n for n in head if any(True for _ in modules[n].parameters(False))}
    config = LoraConfig(
        r=opts.lora_r,
        lora_alpha=opts.lora_alpha,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=sorted(owners) or None,
    )
    peft_model = get_peft_model(model, config)
    if asi:
        lora_a = [
            name
            for name, m in peft_model.named_modules()
            if plain_type(m) is nn.Linear and ".lora_A." in name
        ]
        convert(
            peft_model,
            method="asi",
            rank=opts.rank,
            layers=lora_a,
            example_input=example_input,
            product_dtype=opts.product_dtype,
        )
    return peft_model


def restore_blocks(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare`'s ``checkpoint`` and its options but ``attention``.

    Compressed layers stay (:func:`~tensorcompress.torch.restore`), and so do
    LoRA adapters (PEFT's ``unload``) and ``requires_grad`` flags. Works on a
    deep copy of a prepared model, or one loaded whole by ``torch.load``.
    """
    savers: dict[int, Int8Saved] = {}
    for m in model.modules():
        # Found through the hooks themselves, so a copied or loaded model's too.
        for hook in m._forward_pre_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, Int8Saved):
                savers[id(owner)] = owner
        if _patched_by(m, _checkpointed_forward):
            del m.forward
        if _patched_by(m, _int8_forward):
            _uninstall_int8(m)
            del m._int8_in_place
        if _patched_by(m, _fused_mlp_forward):
            del m.forward
        if _patched_by(m, _int8_linear_forward):
            _uninstall_int8(m)
        if _patched_by(m, _int8_norm_forward):
            del m.forward, m._int8_block
        if _patched_by(m, _norm_fed_linear_forward):
            del m.forward
    for saver in savers.values():
        saver.remove()
    return model
