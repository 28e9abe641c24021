"""Hugging Face transformers built from configs: nothing is downloaded.

Two models for fine-tuning experiments, randomly initialised from a
``transformers`` config (``from_pretrained`` is never called; users with a
``state_dict`` file load it themselves), and the real shape of TinyLlama-1.1B
for analytic use:

- :func:`vit_tiny`: ``ViTForImageClassification`` at ViT-Tiny width (hidden
  192, 12 blocks, 3 heads, MLP 768) on 32×32 images in 4×4 patches;
- :func:`tiny_llama`: a Llama decoder with TinyLlama-1.1B's block structure
  (q/k/v/o attention with 32 query and 4 key/value heads, a gated SiLU MLP
  gate/up/down, RMSNorm, rotary positions) and every Linear's width divided
  by 8, for causal language modelling or sequence classification;
- :func:`tinyllama_1b`: TinyLlama-1.1B's configuration values as a
  :class:`LlamaShape`, which builds nothing and imports nothing.

``transformers`` is imported inside the functions that need it (the
``transformers`` extra: ``pip install "tensorcompress[transformers]"``), so
``import tensorcompress.models`` and the CNN models never import it.

The models return Hugging Face output objects (``out.logits``), not tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        ViTForImageClassification,
    )

__all__ = ["LlamaShape", "tiny_llama", "tinyllama_1b", "vit_tiny"]


def _set_attention(config: Any, attn_implementation: str | None) -> None:
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation


def vit_tiny(
    num_classes: int = 10,
    image_size: int = 32,
    *,
    patch_size: int = 4,
    num_layers: int = 12,
    attn_implementation: str | None = None,
    small_data_init: bool = True,
    init_blocks: int = 2,
    **config: Any,
) -> ViTForImageClassification:
    """ViT-Tiny (hidden 192, 3 heads, MLP 768) for small images, randomly initialised.

    Parameters
    ----------
    num_classes : int, default 10
        Outputs of the classification head.
    image_size : int, default 32
        Side of the (square) input images.
    patch_size : int, default 4
        Side of the patches: 32×32 images give 64 patches plus the class token.
    num_layers : int, default 12
        Number of transformer blocks.
    attn_implementation : str, optional
        ``"eager"``, ``"sdpa"``, ...; by default transformers' own default.
    small_data_init : bool, default True
        Re-initialise for training from scratch on small data: position
        embeddings drawn from N(0, 1) instead of N(0, 0.02²) (one draw per 2×2
        block of patches, so that they survive interpolation to half the
        image side), the patch
        embedding LeCun-normal (std ``1/sqrt(3·patch_size²)``) and every Linear
        of the first ``init_blocks`` blocks Glorot-uniform; the other blocks
        and the head keep Hugging Face's N(0, 0.02²). Same architecture,
        parameter names and ``state_dict`` keys. False: Hugging Face's
        initialisation unchanged.
    init_blocks : int, default 2
        Blocks given Glorot-uniform Linears by ``small_data_init``.
    **config
        Any other ``transformers.ViTConfig`` field (``hidden_size``,
        ``num_attention_heads``, ``intermediate_size``, dropout rates...).

    Returns
    -------
    transformers.ViTForImageClassification
        Call it on ``(B, 3, image_size, image_size)`` images; its output's
        ``logits`` are ``(B, num_classes)``. Blocks: ``model.vit.layers``.
    """
    from transformers import ViTConfig, ViTForImageClassification

    fields: dict[str, Any] = {
        "hidden_size": 192,
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "num_labels": num_classes,  # a PretrainedConfig field
        **config,
    }
    cfg = ViTConfig(
        image_size=image_size, patch_size=patch_size, num_hidden_layers=num_layers, **fields
    )
    _set_attention(cfg, attn_implementation)
    model = ViTForImageClassification(cfg)
    if small_data_init:
        _small_data_init(model, init_blocks)
    return model


def _small_data_init(model: ViTForImageClassification, init_blocks: int) -> None:
    """:func:`vit_tiny`'s ``small_data_init``, in place (draws from the global RNG).

    With Hugging Face's init (every weight N(0, 0.02²)) the position embeddings
    are tiny next to the patches' content and attention starts uniform, so every
    block pools a bag of patches that ignores where they are; on the procedural
    shapes a ViT-Tiny then stays at chance loss for hundreds of steps. Large
    random position embeddings and full-gain first blocks give the first blocks
    position-dependent mixing from the start (a 2-block ViT then learns about as
    fast as an MLP on flattened patches); the deeper blocks keep the small init so
    that the 12-block model starts close to that shallow one.
    """
    import torch
    from torch import nn

    with torch.no_grad():
        embeddings = model.vit.embeddings
        # Random on the half-side grid, each value repeated over a 2×2 block of
        # patches: interpolated to half the image side (coarse-resolution
        # pretraining) they keep nearly the same values, so both sides agree.
        pos = embeddings.position_embeddings
        grid = round((pos.shape[1] - 1) ** 0.5)
        coarse = torch.randn(1, pos.shape[2], (grid + 1) // 2, (grid + 1) // 2)
        fine = torch.nn.functional.interpolate(coarse, scale_factor=2, mode="nearest")
        pos[0, 1:] = fine[..., :grid, :grid].flatten(2).transpose(1, 2)
        pos[0, 0].normal_(0.0, 1.0)
        conv = embeddings.patch_embeddings.projection
        nn.init.trunc_normal_(conv.weight, std=conv.weight[0].numel() ** -0.5)
        for block in list(model.vit.layers)[:init_blocks]:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)


@dataclass(frozen=True)
class LlamaShape:
    """The shape of a Llama-family decoder: what memory and FLOP formulas need.

    Attributes
    ----------
    hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size : int
        As in ``transformers.LlamaConfig`` (``num_hidden_layers``,
        ``num_attention_heads``, ``num_key_value_heads``).
    max_position_embeddings : int
        Longest sequence.
    tie_word_embeddings : bool
        Whether the LM head shares the embedding matrix.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        ints = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
        for name in (*ints, "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be a multiple of num_heads "
                f"{self.num_heads}, and num_heads of num_kv_heads {self.num_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def kv_size(self) -> int:
        """Output width of the k and v projections (``num_kv_heads * head_dim``)."""
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in_features, out_features)`` of each Linear of one block, by its HF name."""
        h, kv, m = self.hidden_size, self.kv_size, self.intermediate_size
        return {
            "self_attn.q_proj": (h, h),
            "self_attn.k_proj": (h, kv),
            "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (h, m),
            "mlp.up_proj": (h, m),
            "mlp.down_proj": (m, h),
        }

    def num_parameters(self) -> int:
        """Parameters of the causal LM (embeddings, blocks, final norm, LM head)."""
        block = sum(i * o for i, o in self.linear_shapes().values()) + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + self.num_layers * block + self.hidden_size + head

    def narrowed(self, factor: int) -> LlamaShape:
        """The same blocks with every width divided by ``factor`` (heads kept, heads narrower)."""
        if self.hidden_size % (factor * self.num_heads) or self.intermediate_size % factor:
            raise ValueError(
                f"factor {factor} must divide head_dim {self.head_dim} and "
                f"intermediate_size {self.intermediate_size}"
            )
        return replace(
            self,
            hidden_size=self.hidden_size // factor,
            intermediate_size=self.intermediate_size // factor,
        )

    def to_config(self, **overrides: Any) -> LlamaConfig:
        """A ``transformers.LlamaConfig`` of this shape (``overrides`` win)."""
        from transformers import LlamaConfig

        fields: dict[str, Any] = {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            **overrides,
        }
        return LlamaConfig(**fields)


_TINYLLAMA_1B = LlamaShape(
    hidden_size=2048,
    num_layers=22,
    num_heads=32,
    num_kv_heads=4,
    intermediate_size=5632,
    vocab_size=32000,
    max_position_embeddings=2048,
)


def tinyllama_1b() -> LlamaShape:
    """TinyLlama-1.1B's configuration values (nothing is built or imported).

    Hidden 2048, 22 layers, 32 heads with 4 key/value heads (grouped-query
    attention, head width 64), intermediate 5632, vocabulary 32000, context
    2048, untied LM head: 1,100,048,384 parameters.
    """
    return _TINYLLAMA_1B


def tiny_llama(
    num_labels: int | None = None,
    *,
    width_divisor: int = 8,
    num_layers: int = 22,
    vocab_size: int = 32000,
    attn_implementation: str | None = None,
    **config: Any,
) -> LlamaForCausalLM | LlamaForSequenceClassification:
    """A Llama decoder with TinyLlama-1.1B's blocks at reduced width, randomly initialised.

    By default every Linear of TinyLlama-1.1B divided by 8 in both
    dimensions: hidden 256, 32 query heads and 4 key/value heads of width 8
    (q/o 256→256, k/v 256→32, gate/up 256→704, down 704→256), 22 blocks,
    TinyLlama's 32000-token vocabulary: 31.5 M parameters as a causal LM.

    Parameters
    ----------
    num_labels : int, optional
        ``None`` builds ``LlamaForCausalLM``; an int builds
        ``LlamaForSequenceClassification`` with that many labels (the last
        non-padding token is classified; the padding id is 0).
    width_divisor : int, default 8
        TinyLlama's widths divided by this (it must divide the head width 64).
    num_layers : int, default 22
        Number of decoder blocks.
    vocab_size : int, default 32000
        Vocabulary size (smaller for quick tests).
    attn_implementation : str, optional
        ``"eager"``, ``"sdpa"``, ...; by default transformers' own default.
    **config
        Any other ``transformers.LlamaConfig`` field.

    Returns
    -------
    transformers.LlamaForCausalLM or transformers.LlamaForSequenceClassification
        Call it on ``(B, T)`` token ids. Blocks: ``model.model.layers``.
    """
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    shape = replace(tinyllama_1b().narrowed(width_divisor), num_layers=num_layers)
    shape = replace(shape, vocab_size=vocab_size)
    if num_labels is None:
        cfg = shape.to_config(**config)
        _set_attention(cfg, attn_implementation)
        return LlamaForCausalLM(cfg)
    fields: dict[str, Any] = {"pad_token_id": 0, **config}
    cfg = shape.to_config(num_labels=num_labels, **fields)
    _set_attention(cfg, attn_implementation)
    return LlamaForSequenceClassification(cfg)
