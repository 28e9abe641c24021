"""Model definitions compatible with torchvision's parameter names.

No torchvision import and no weight download: models start randomly initialised, and
users who have a ``state_dict`` file pass it as ``weights`` to :func:`get_model`.

The Hugging Face transformers of :mod:`tensorcompress.models.transformers`
(:data:`TRANSFORMER_NAMES`) are built from configs by the same :func:`get_model`;
they need the ``transformers`` extra, which is imported only when one is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .mcunet import mcunet_in1
from .mobilenet import mobilenet_v2
from .resnet import resnet18, resnet34
from .transformers import LlamaShape, tiny_llama, tinyllama_1b, vit_tiny

__all__ = [
    "MODEL_NAMES",
    "TRANSFORMER_NAMES",
    "LlamaShape",
    "get_model",
    "mcunet_in1",
    "mobilenet_v2",
    "resnet18",
    "resnet34",
    "tiny_llama",
    "tinyllama_1b",
    "vit_tiny",
]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "mobilenet_v2": mobilenet_v2,
    "mcunet_in1": mcunet_in1,
}

#: The CNNs :func:`get_model` builds (the paper's models; they return logits).
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def _tiny_llama_classifier(num_classes: int) -> nn.Module:
    return tiny_llama(num_labels=num_classes)


_TRANSFORMERS: dict[str, Callable[..., nn.Module]] = {
    "vit_tiny": vit_tiny,
    "tiny_llama": _tiny_llama_classifier,
}

#: The Hugging Face transformers :func:`get_model` builds (they return output
#: objects with ``.logits``); ``"tiny_llama"`` is the sequence classifier.
TRANSFORMER_NAMES: tuple[str, ...] = tuple(_TRANSFORMERS)


def _load_weights(model: nn.Module, weights: str | os.PathLike[str], name: str) -> None:
    path = os.fspath(weights)
    try:
        # weights_only=True: never run arbitrary pickled code from a user-supplied file.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # missing/unreadable file: the OS error already names the path
    except Exception as err:  # unpickling, zip and format errors all mean "not a state_dict"
        raise ValueError(f"could not read a state_dict from {path!r}: {err}") from err
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{path!r} holds a {type(state).__name__}, expected a state_dict (a mapping of "
            "parameter names to tensors)"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"state_dict in {path!r} does not match model {name!r}: {err}") from err


def get_model(
    name: str,
    num_classes: int = 1000,
    weights: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Build a model by name, optionally loading a local ``state_dict`` file.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES` or :data:`TRANSFORMER_NAMES` (case-insensitive;
        ``-`` is read as ``_``, so ``"mcunet-in1"`` works).
    num_classes : int, default 1000
        Output features of the classification head.
    weights : str or os.PathLike or None, default None
        Path to a file saved with ``torch.save(model.state_dict(), path)``. It is read
        with ``torch.load(weights_only=True)`` and loaded with ``strict=True``.

    Returns
    -------
    nn.Module
        The model, randomly initialised unless ``weights`` is given.

    Raises
    ------
    ValueError
        If ``name`` is unknown (the message lists valid names), or if ``weights`` is not
        a readable state_dict or does not match the model (the message names the file).
    """
    key = name.lower().replace("-", "_")
    builders = {**_BUILDERS, **_TRANSFORMERS}
    if key not in builders:
        raise ValueError(f"unknown model {name!r}; valid names are: {', '.join(builders)}")
    model = builders[key](num_classes=num_classes)
    if weights is not None:
        _load_weights(model, weights, key)
    return model
