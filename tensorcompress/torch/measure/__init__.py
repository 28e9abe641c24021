"""Memory measurement of training, one file per kind of figure.

- :mod:`~tensorcompress.torch.measure.saved`: saved-tensor accounting, what a
  training forward keeps for backward, per selected layer, measured with
  ``saved_tensors_hooks`` and checked against the methods' formulas
  (:func:`activation_memory`, :func:`analytic_bytes`, :data:`MB`).
- :mod:`~tensorcompress.torch.measure.peak`: peak live memory, transients
  included; :func:`track_memory` tracks any callable (a layer's forward, a
  whole training step), :func:`peak_forward_memory` one layer's forward.
- :mod:`~tensorcompress.torch.measure.training`: the whole step,
  :func:`training_memory` (weights, gradients, optimizer state, activations
  by kind, the peak over forward and backward and what is live at it).

Every public name is importable from here:
``from tensorcompress.torch.measure import activation_memory, peak_forward_memory``.
"""

from tensorcompress.torch.measure.peak import (
    PeakMemory,
    TrackedMemory,
    peak_forward_memory,
    track_memory,
)
from tensorcompress.torch.measure.saved import (
    MB,
    LayerMemory,
    MemoryReport,
    activation_memory,
    analytic_bytes,
)
from tensorcompress.torch.measure.training import LiveGroup, TrainingMemory, training_memory

__all__ = [
    "MB",
    "LayerMemory",
    "LiveGroup",
    "MemoryReport",
    "PeakMemory",
    "TrackedMemory",
    "TrainingMemory",
    "activation_memory",
    "analytic_bytes",
    "peak_forward_memory",
    "track_memory",
    "training_memory",
]
