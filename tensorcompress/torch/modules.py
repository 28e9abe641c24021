"""Drop-in Conv1d/Conv2d/Linear modules that keep a compressed input for backward.

``CompressedConv2d`` *is* an ``nn.Conv2d`` (a subclass with the same
parameters and buffers), so ``state_dict`` loads both ways between a converted
and a plain model. In training mode, with gradients enabled and a trainable
weight, its forward runs :func:`tensorcompress.torch.functions.conv` and keeps
only the compressed input; otherwise (``model.eval()``, ``torch.no_grad()``,
a frozen weight, ``method="vanilla"``) it is exactly ``nn.Conv2d.forward``.

Methods (:class:`CompressionConfig.method`):

- ``"asi"``: Activation Subspace Iteration, warm-started from the layer's
  previous step (:attr:`last_result`); the first step is the exact ST-HOSVD
  cold start, which also fixes the ranks when ``rank`` is a threshold.
- ``"hosvd"``: ST-HOSVD every step, ranks chosen by explained variance.
- ``"svd"``: truncated SVD of the **channel** unfolding (``C x B*H*W``; for
  Linear the feature unfolding). Activations are more redundant across
  channels than across images or pixels: on the benchmark's natural-image
  activations at explained variance 0.8 the channel unfolding keeps 18-21 % of
  the input, the batch or a spatial unfolding 29-59 %. The weight gradient
  then runs on ``r`` channels and is multiplied by ``U``, like the Tucker
  channel factor.
- ``"gradient_filter"``: the Gradient Filtering baseline (convs only); see
  :mod:`tensorcompress.torch.gradient_filter`.
- ``"vanilla"``: the plain layer.

An int rank larger than the mode it applies to is a ``ValueError`` naming the
layer, as in the core (:mod:`tensorcompress.rank`); it is never capped. Only
the ranks ASI fixed itself at its cold start follow a later, smaller batch.

Layers that read one tensor (q/k/v, gate/up) can share one compressed form:
see :class:`SharedInput`.
"""

from __future__ import annotations

import copy
import functools
import numbers
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from tensorcompress import asi, hosvd, svd
from tensorcompress import rank as _rank
from tensorcompress._array import all_finite
from tensorcompress.results import SVDResult, TuckerResult
from tensorcompress.torch import functions as _fn
from tensorcompress.torch import gradient_filter as gf
from tensorcompress.torch.functions import Compressed, ConvSpec

__all__ = [
    "METHODS",
    "CompressedConv1d",
    "CompressedConv2d",
    "CompressedLinear",
    "CompressedModule",
    "CompressionConfig",
    "SharedInput",
    "tucker_step",
]

METHODS = ("vanilla", "asi", "hosvd", "svd", "gradient_filter")


@dataclass(frozen=True)
class CompressionConfig:
    """How a layer compresses the input it keeps for backward.

    Parameters
    ----------
    method : {"asi", "hosvd", "svd", "gradient_filter", "vanilla"}
        Compression method (see :mod:`tensorcompress.torch.modules`).
    rank : int, float, sequence or rank policy
        As in :mod:`tensorcompress.rank`: an int per mode, an explained-variance
        threshold in (0, 1], one entry per mode of the input, or a policy.
        ``"svd"`` takes an int or a float. An int larger than the mode it
        applies to (for ``"svd"``, than the unfolding's smaller side) makes the
        forward raise a ``ValueError`` naming the layer: write ``None`` for a
        mode whose size varies, such as the batch mode when the last batch is
        smaller. ASI's own ranks, fixed at its cold start (from a threshold or
        from this rank), follow a smaller batch and come back after it.
        Ignored by ``gradient_filter`` and ``vanilla``.
    n_iter : int, default 1
        ASI subspace-iteration steps per mode and training step.
    patch : int, default 2
        Gradient filter patch size ``R``.
    check_finite : bool, default True
        Refuse (``ValueError`` naming the layer) an input holding NaN or Inf.
    seed : int, default 0
        Seeds the layer's own generator (combined with the layer's name), used
        only when ASI pads a subspace. The global RNG is never touched.
    product_dtype : torch.dtype, optional
        The dtype of the Tucker decompositions' tensor products, for
        ``"asi"`` and ``"hosvd"`` (``product_dtype`` of
        :func:`tensorcompress.asi.decompose`): ``torch.bfloat16`` runs them
        on a CPU's AMX or a GPU's tensor cores. The forward, the input
        gradient and the kept factors keep the input's dtype. ``None`` (the
        default): the input's dtype.
    """

    method: str = "asi"
    rank: Any = 0.8
    n_iter: int = 1
    patch: int = 2
    check_finite: bool = True
    seed: int = 0
    product_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.n_iter, bool) or not isinstance(self.n_iter, int) or self.n_iter < 0:
            raise ValueError(f"n_iter must be a non-negative int, got {self.n_iter!r}")
        if isinstance(self.patch, bool) or not isinstance(self.patch, int) or self.patch < 1:
            raise ValueError(f"patch must be a positive int, got {self.patch!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        check_product_dtype(self.product_dtype)
        rank = self.rank
        if isinstance(rank, Sequence) and not isinstance(rank, (str, bytes)):
            rank = tuple(rank)  # hashable, and safe from later mutation
            object.__setattr__(self, "rank", rank)
        if self.method in ("asi", "hosvd"):
            _check_rank_arg(rank)
        elif self.method == "svd" and (
            isinstance(rank, bool) or not isinstance(rank, numbers.Real)
        ):
            raise TypeError(f"method='svd' takes an int or a float rank, got {rank!r}")
        elif self.method == "svd":
            _check_rank_arg(rank)


def check_product_dtype(dtype: Any) -> None:
    """Refuse a ``product_dtype`` that is neither ``None`` nor a floating torch dtype."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"product_dtype must be None or a floating torch dtype such as torch.bfloat16, "
            f"got {dtype!r}"
        )


def _check_rank_arg(rank: Any) -> None:
    """Validate what can be validated before the input's shape is known."""
    if isinstance(rank, _rank.RankPolicy):
        return
    entries = rank if isinstance(rank, tuple) else (rank,)
    for k, r in enumerate(entries):
        where = f"rank[{k}]" if isinstance(rank, tuple) else "rank"
        if r is None and isinstance(rank, tuple):
            continue
        _rank.resolve((r,), (2**62,), name=where)


def _mode_ranks(rank: Any, shape: Sequence[int], layer: str) -> tuple[_rank.ModeRank, ...]:
    """Per-mode int ranks or float thresholds for the input of ``layer``.

    The core's rule, with the layer named: an int rank larger than its mode
    is an error, not capped (the user asked for more than the input has).
    """
    try:
        return _rank.resolve(rank, tuple(int(n) for n in shape))
    except (TypeError, ValueError) as err:
        raise type(err)(f"layer {layer!r}: {err}") from None


def _compact(t: torch.Tensor) -> torch.Tensor:
    # A slice keeps its whole base alive (and is charged for it by the memory
    # measurement): keep a tight copy instead.
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _permute_tucker(res: TuckerResult, perm: Sequence[int]) -> TuckerResult:
    """The decomposition of ``x.permute(perm)`` from that of ``x``."""
    return TuckerResult(
        core=res.core.permute(*perm),
        factors=tuple(res.factors[p] for p in perm),
        explained_variance=tuple(res.explained_variance[p] for p in perm),
        n_iter=res.n_iter,
    )


def check_finite_input(layer: nn.Module, x: torch.Tensor) -> None:
    """Raise if ``x``, the input a layer is about to compress, holds NaN or Inf."""
    if x.numel() and not all_finite(x):
        name = getattr(layer, "layer_name", None) or "<unnamed>"
        raise ValueError(
            f"layer {name!r} ({type(layer).__name__}) received an input with NaN or Inf "
            f"values (shape {tuple(x.shape)}); its compressed activation would give NaN "
            "gradients. Fix the input, or pass check_finite=False to skip this check."
        )


def tucker_step(
    x: torch.Tensor,
    rank: Any,
    *,
    warm: Any,
    fixed_ranks: tuple[int | None, ...] | None,
    track: bool,
    n_iter: int,
    rng: np.random.Generator,
    layer: str,
    product_dtype: torch.dtype | None = None,
) -> tuple[TuckerResult, tuple[int | None, ...] | None]:
    """One training step's Tucker decomposition of a layer input.

    The one implementation of the layers' compression state machine (the
    compressed layers and the WASI layers both call it). With ``track``
    (ASI), a previous result ``warm`` and the ranks its cold start fixed, it
    runs one warm ASI step; otherwise the exact ST-HOSVD at ``rank``, and with
    ``track`` it fixes the ranks for the warm steps that follow.

    Returns
    -------
    result : TuckerResult
        In ``x``'s mode order, its tensors compact (no view of a larger buffer).
    fixed_ranks : tuple or None
        The ranks the next warm step uses (``None`` entries keep a mode whole).
    """
    shape = tuple(int(n) for n in x.shape)
    # Decompose in memory order: a channels-last input is a contiguous
    # (B, H, W, C) tensor, so the core never makes a permuted copy.
    perm = _fn.memory_order(x)
    inv = [perm.index(k) for k in range(x.ndim)]
    xs = x.permute(*perm)
    if not xs.is_contiguous():
        xs = xs.contiguous()
    if (
        track
        and isinstance(warm, TuckerResult)
        and len(warm.factors) == x.ndim
        and fixed_ranks is not None
    ):
        if warm.core.device != x.device:
            warm = replace(
                warm,
                core=warm.core.to(x.device),
                factors=tuple(u.to(x.device) for u in warm.factors),
            )
        # The one place a layer caps a rank: these were fixed by ASI's own
        # cold start (from a threshold, or from the user's rank on the first
        # batch), so a later, smaller batch (the last of an epoch) caps them,
        # and they come back with the next full batch.
        ranks = tuple(n if r is None else min(r, n) for r, n in zip(fixed_ranks, shape))
        res = asi.decompose(
            xs,
            [ranks[p] for p in perm],
            warm_start=_permute_tucker(warm, perm),
            n_iter=n_iter,
            seed=rng,
            product_dtype=product_dtype,
            check_finite=False,
        )
    else:
        entries = _mode_ranks(rank, shape, layer)
        res = hosvd.decompose(
            xs, [entries[p] for p in perm], product_dtype=product_dtype, check_finite=False
        )
        if track:
            # Thresholds are resolved once, by the cold start (as in the paper).
            # A mode kept whole (None) stays whole if it grows: the user's None,
            # or a threshold that kept the whole mode.
            given = rank if isinstance(rank, tuple) else (rank,) * x.ndim
            if isinstance(rank, _rank.RankPolicy):
                given = entries
            fixed_ranks = tuple(
                None if g is None or (not isinstance(e, numbers.Integral) and r == n) else r
                for g, e, r, n in zip(given, entries, (res.ranks[i] for i in inv), shape)
            )
    res = _permute_tucker(res, inv)
    compact = replace(res, core=_compact(res.core), factors=tuple(_compact(u) for u in res.factors))
    return compact, fixed_ranks


class CompressedModule(nn.Module):
    """Behaviour shared by the compressed layers (not instantiated directly).

    Attributes
    ----------
    compression : CompressionConfig
        The layer's configuration.
    layer_name : str
        Qualified name in the converted model (used in error messages and to
        seed the layer's generator).
    last_result : TuckerResult, SVDResult, PatchAverage or None
        What the last training forward kept; for ASI also the warm start of
        the next step. Its tensors are the ones saved for backward (the same
        storage, not a copy).
    shared_input : SharedInput or None
        The group of layers reading the same input that this layer belongs
        to (see :class:`SharedInput`), or ``None``.
    """

    _plain_type: ClassVar[type[nn.Module]]
    _STATE: ClassVar[tuple[str, ...]] = (
        "compression",
        "layer_name",
        "last_result",
        "_fixed_ranks",
        "_rng",
        "shared_input",
    )

    compression: CompressionConfig
    layer_name: str
    last_result: Compressed | None
    _fixed_ranks: tuple[int | None, ...] | None
    _rng: np.random.Generator
    shared_input: SharedInput | None

    def __init__(
        self,
        *args: Any,
        compression: CompressionConfig | None = None,
        name: str = "",
        **kwargs: Any,
    ) -> None:
        # The plain layer's arguments go on along the MRO (nn.Conv2d, nn.Linear, ...).
        super().__init__(*args, **kwargs)
        self._init_compression(compression, name)

    def _init_compression(self, config: CompressionConfig | None, name: str) -> None:
        config = CompressionConfig() if config is None else config
        if not isinstance(config, CompressionConfig):
            raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
        self.compression = config
        self.layer_name = name
        self.shared_input = None
        self.reset_state()

    def reset_state(self) -> None:
        """Forget the last step (the next ASI step is a cold start).

        A layer of a :class:`SharedInput` group resets the whole group, whose
        state is one.
        """
        group = self.shared_input
        if group is None:
            self._forget()
        else:
            group.reset_state()

    def _forget(self) -> None:
        self.last_result = None
        self._fixed_ranks = None
        name = self.layer_name.encode()
        self._rng = np.random.default_rng([self.compression.seed, zlib.crc32(name)])

    @property
    def ranks(self) -> tuple[int, ...] | None:
        """Ranks the last training forward kept (``None`` before it, or for the gradient filter)."""
        return None if self.last_result is None else self.last_result.ranks

    @classmethod
    def from_module(
        cls, module: nn.Module, config: CompressionConfig | None = None, *, name: str = ""
    ) -> Any:
        """A compressed layer sharing ``module``'s parameters, buffers and hooks.

        Parameters
        ----------
        module : nn.Module
            A plain layer of the matching type (exactly ``nn.Conv2d`` for
            :class:`CompressedConv2d`, ...) or a compressed one to reconfigure.
        config : CompressionConfig, optional
            Defaults to ``CompressionConfig()`` (ASI at explained variance 0.8).
        name : str
            The layer's qualified name, for error messages and seeding.
        """
        if type(module) is not cls._plain_type and type(module) is not cls:
            raise TypeError(
                f"{cls.__name__}.from_module needs an {cls._plain_type.__name__} "
                f"(exactly; subclasses may change forward), got {type(module).__name__}"
            )
        new = cls.__new__(cls)
        for key, value in module.__dict__.items():
            if key not in CompressedModule._STATE:
                # Own containers (parameter dict, hooks); shared tensors.
                new.__dict__[key] = copy.copy(value) if isinstance(value, (dict, set)) else value
        new._init_compression(config, name)
        return new

    def to_plain(self) -> nn.Module:
        """The plain layer with the same parameters, buffers and hooks (state dropped)."""
        plain_type = self._plain_type
        plain = plain_type.__new__(plain_type)
        for key, value in self.__dict__.items():
            if key not in CompressedModule._STATE:
                plain.__dict__[key] = copy.copy(value) if isinstance(value, (dict, set)) else value
        return plain

    def _compressing(self) -> bool:
        weight = self.weight
        return (
            self.compression.method != "vanilla"
            and self.training
            and torch.is_grad_enabled()
            and isinstance(weight, torch.Tensor)
            and weight.requires_grad
        )

    def _check_finite(self, x: torch.Tensor) -> None:
        if self.compression.check_finite:
            check_finite_input(self, x)

    # -- compression ------------------------------------------------------

    def _tucker(self, x: torch.Tensor) -> TuckerResult:
        cfg = self.compression
        res, fixed = tucker_step(
            x,
            cfg.rank,
            warm=self.last_result if cfg.method == "asi" else None,
            fixed_ranks=self._fixed_ranks,
            track=cfg.method == "asi",
            n_iter=cfg.n_iter,
            rng=self._rng,
            layer=self.layer_name or "<unnamed>",
            product_dtype=cfg.product_dtype,
        )
        self._fixed_ranks = fixed
        return res

    def _svd(self, x: torch.Tensor, mode: int) -> SVDResult:
        try:
            # An int rank above the unfolding's smaller side is an error, not capped.
            res = svd.decompose(x, self.compression.rank, mode=mode, check_finite=False)
        except (TypeError, ValueError) as err:
            raise type(err)(f"layer {self.layer_name or '<unnamed>'!r}: {err}") from None
        return replace(res, U=_compact(res.U), S=_compact(res.S), Vh=_compact(res.Vh))

    def _compress_input(self, x: torch.Tensor, out_shape: tuple[int, ...]) -> Compressed:
        raise NotImplementedError

    # Under torch.compile the decomposition (data-dependent ranks, host-side
    # rank selection) runs eagerly: tracing into it only adds graph breaks.
    @torch.compiler.disable
    def _compress(
        self, x: torch.Tensor, out_shape: tuple[int, ...], source: torch.Tensor | None = None
    ) -> Compressed:
        group = self.shared_input
        if group is None or source is None:
            result = self._compress_input(x, out_shape)
        else:
            result = group.compress(x, out_shape, source)
        self.last_result = result
        return result

    def _compressor(self, input: torch.Tensor) -> _fn.CompressFn:
        """The ``compress`` callable for a forward on ``input`` (the tensor before any cast)."""
        if self.shared_input is None:
            return self._compress
        return functools.partial(self._compress, source=input)

    def extra_repr(self) -> str:
        cfg = self.compression
        extra = f"method={cfg.method!r}"
        if cfg.method in ("asi", "hosvd", "svd"):
            extra += f", rank={cfg.rank!r}"
        if cfg.method == "gradient_filter":
            extra += f", patch={cfg.patch}"
        if self.shared_input is not None:
            extra += f", input shared by {len(self.shared_input.members)} layers"
        return f"{super().extra_repr()}, {extra}"


class _CompressedConv(CompressedModule):
    def _compress_input(self, x: torch.Tensor, out_shape: tuple[int, ...]) -> Compressed:
        method = self.compression.method
        if method in ("asi", "hosvd"):
            return self._tucker(x)
        if method == "svd":
            return self._svd(x, 1)
        if method == "gradient_filter":
            stride = tuple(int(s) for s in self.stride)  # type: ignore[union-attr]
            pa = gf.compress(x, out_shape[2:], self.compression.patch, stride)
            return replace(pa, mean=_compact(pa.mean))
        raise ValueError(f"layer {self.layer_name!r}: no compression for method {method!r}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``nn.Conv*d.forward``, keeping only the compressed input when training."""
        if not self._compressing():
            out: torch.Tensor = self._plain_type.forward(self, input)
            return out
        self._check_finite(input)
        spec = ConvSpec.from_module(self)  # type: ignore[arg-type]
        compress = self._compressor(input)
        return _fn.conv(input, self.weight, self.bias, spec, compress)  # type: ignore[arg-type]


class CompressedConv2d(_CompressedConv, nn.Conv2d):
    """``nn.Conv2d`` that keeps a compressed input for the weight gradient.

    Build it from a layer with :meth:`from_module` (sharing its parameters) or
    like ``nn.Conv2d`` with an extra keyword ``compression=CompressionConfig(...)``.
    Every ``nn.Conv2d`` setting is supported: groups (depthwise, with channel
    multiplier), any kernel, stride, dilation, ``'same'``/``'valid'``/tuple
    padding, every ``padding_mode``, bias or not, any input layout.
    """

    _plain_type = nn.Conv2d


class CompressedConv1d(_CompressedConv, nn.Conv1d):
    """``nn.Conv1d`` that keeps a compressed input; see :class:`CompressedConv2d`."""

    _plain_type = nn.Conv1d


class CompressedLinear(CompressedModule, nn.Linear):
    """``nn.Linear`` that keeps a compressed input ``(*lead, in_features)``.

    The Tucker methods decompose the input with all its leading dims as modes
    (``(B, T, C)`` tokens: three modes); ``svd`` decomposes the feature
    unfolding. ``gradient_filter`` is for convolutions only.
    """

    _plain_type = nn.Linear

    def _init_compression(self, config: CompressionConfig | None, name: str) -> None:
        super()._init_compression(config, name)
        if self.compression.method == "gradient_filter":
            raise ValueError(
                f"layer {name or '<unnamed>'!r}: method='gradient_filter' is defined for "
                "convolutions only, not Linear"
            )

    def _compress_input(self, x: torch.Tensor, out_shape: tuple[int, ...]) -> Compressed:
        if x.ndim == 1:
            x = x.unsqueeze(0)  # one sample: a (1, C_in) matrix
        method = self.compression.method
        if method in ("asi", "hosvd"):
            return self._tucker(x)
        if method == "svd":
            return self._svd(x, x.ndim - 1)
        raise ValueError(f"layer {self.layer_name!r}: no compression for method {method!r}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``nn.Linear.forward``, keeping only the compressed input when training."""
        if not self._compressing():
            return nn.Linear.forward(self, input)
        self._check_finite(input)
        return _fn.linear(input, self.weight, self.bias, self._compressor(input))


# ---------------------------------------------------------------------------
# Layers that read the same input
# ---------------------------------------------------------------------------

SHAREABLE_METHODS = ("asi", "hosvd", "svd")
"""Methods whose compressed form depends on the input alone, so layers can share it."""


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


@dataclass(frozen=True)
class _Seen:
    """The input a group decomposed last, and its decomposition."""

    source: weakref.ref[torch.Tensor]
    version: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    result: Compressed

    def matches(self, source: torch.Tensor, x: torch.Tensor) -> bool:
        return (
            self.source() is source
            and _version(source) == self.version
            and x.dtype == self.dtype
            and tuple(x.shape) == self.shape
        )


class SharedInput:
    """Compressed layers that read one tensor and keep one compressed form of it.

    A transformer block's q, k and v projections read the same hidden states,
    a gated MLP's gate and up projections the same normalised tokens. Vanilla
    autograd saves that tensor once for all of them; a group makes compressed
    layers do the same: the input is decomposed once per training forward and
    every member's autograd Function saves the same factor tensors (one
    storage each, so memory holds them once).
    :func:`~tensorcompress.torch.convert` builds the groups it finds by
    tracing a forward pass (its ``share_inputs`` option).

    Parameters
    ----------
    layers : sequence of CompressedModule
        Two or more compressed layers of one type (all ``CompressedLinear``,
        say) with equal :class:`CompressionConfig`, whose method is ``"asi"``,
        ``"hosvd"`` or ``"svd"``: their compressed form depends on the input
        alone (the gradient filter's depends on each conv's stride and output,
        so it is not shared). In execution order: the first, the *leader*,
        holds the group's state (ASI's warm start, the ranks fixed at its cold
        start, the generator). Creating the group joins the layers (sets their
        ``shared_input``); :meth:`dissolve` undoes it.

    Raises
    ------
    TypeError
        A layer that is not a :class:`CompressedModule`.
    ValueError
        Fewer than two layers, a layer given twice or already in a group,
        layers of different types or configs, or a method that is not shared.

    Notes
    -----
    Reuse is decided per call, at run time, so it never changes a gradient.
    The first member that compresses in a training forward decomposes its
    input with the leader's state and remembers that tensor (by a weak
    reference), its version counter and the dtype it was decomposed in. A
    later member whose input is the same tensor object, not modified in place
    since (same version) and in the same dtype, keeps the same decomposition;
    any other input is decomposed again (still exact, only not shared). So the
    members may be in different training modes, or some frozen: a member that
    does not compress (eval, ``torch.no_grad()``, a frozen weight) runs the
    plain layer and neither decomposes nor reuses. Under autocast the identity
    is that of the tensor before the cast, so the members share the
    decomposition of the cast input.

    Every member's ``last_result`` is the decomposition it kept (the same
    object for all members in a step); the leader's is also the group's warm
    start.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tensorcompress.torch import CompressedLinear, CompressionConfig, SharedInput
    >>> cfg = CompressionConfig(method="hosvd", rank=(None, 2))
    >>> q, k = (CompressedLinear.from_module(nn.Linear(4, 4), cfg) for _ in range(2))
    >>> group = SharedInput([q, k])
    >>> x = torch.randn(3, 4)
    >>> (q(x) + k(x)).sum().backward()
    >>> q.last_result is k.last_result
    True
    """

    members: tuple[CompressedModule, ...]

    def __init__(self, layers: Sequence[CompressedModule]) -> None:
        members = tuple(layers)
        wrong = [type(m).__name__ for m in members if not isinstance(m, CompressedModule)]
        if wrong:
            raise TypeError(f"SharedInput takes compressed layers, got {', '.join(wrong)}")
        names = [_label(m) for m in members]
        if len(members) < 2:
            raise ValueError(f"a SharedInput needs at least two layers, got {names}")
        if len({id(m) for m in members}) != len(members):
            raise ValueError(f"a layer is given twice: {names}")
        kinds = {m._plain_type for m in members}
        if len(kinds) > 1:
            raise ValueError(
                f"layers {names} are of different types ({sorted(k.__name__ for k in kinds)}); "
                "a group shares one kind of layer"
            )
        first = members[0].compression
        differ = [n for n, m in zip(names, members) if m.compression != first]
        if differ:
            raise ValueError(
                f"layers {differ} are configured differently from {names[0]!r} ({first}); "
                "the members of a group share one CompressionConfig"
            )
        if first.method not in SHAREABLE_METHODS:
            raise ValueError(
                f"method {first.method!r} is not shared (only {SHAREABLE_METHODS}: their "
                "compressed form depends on the input alone)"
            )
        taken = [n for n, m in zip(names, members) if m.shared_input is not None]
        if taken:
            raise ValueError(f"layers {taken} are already in a group; dissolve() it first")
        self.members = members
        self._seen: _Seen | None = None
        for m in members:
            m.shared_input = self

    @property
    def leader(self) -> CompressedModule:
        """The member holding the group's state (the first in execution order)."""
        return self.members[0]

    @property
    def names(self) -> tuple[str, ...]:
        """The members' qualified names."""
        return tuple(m.layer_name for m in self.members)

    def compress(
        self, x: torch.Tensor, out_shape: tuple[int, ...], source: torch.Tensor
    ) -> Compressed:
        """The compressed form of ``x``: reused if the group just decomposed ``source``.

        Parameters
        ----------
        x : torch.Tensor
            The input the layer computes with (``source``, or its autocast copy).
        out_shape : tuple of int
            The layer's output shape.
        source : torch.Tensor
            The tensor the layer was called with, whose identity is checked.
        """
        seen = self._seen
        if seen is not None and seen.matches(source, x):
            return seen.result
        leader = self.members[0]
        result = leader._compress_input(x, out_shape)
        leader.last_result = result  # the group's warm start
        version = _version(source)
        self._seen = (
            None
            if version is None
            else _Seen(weakref.ref(source), version, x.dtype, tuple(x.shape), result)
        )
        return result

    def reset_state(self) -> None:
        """Forget the last step for every member (the next ASI step is a cold start)."""
        self._seen = None
        for m in self.members:
            m._forget()

    def dissolve(self) -> None:
        """Leave the members on their own (each decomposes its input again)."""
        self._seen = None
        for m in self.members:
            if m.shared_input is self:
                m.shared_input = None

    def __getstate__(self) -> dict[str, Any]:
        # The remembered input is a weak reference and only valid within one forward.
        state = dict(self.__dict__)
        state["_seen"] = None
        return state

    def __repr__(self) -> str:
        return f"SharedInput({list(self.names)})"


def _label(m: Any) -> str:
    name = getattr(m, "layer_name", "")
    return name if isinstance(name, str) and name else f"<unnamed {type(m).__name__}>"
