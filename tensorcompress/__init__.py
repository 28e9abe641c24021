"""tensorcompress: tensor decompositions for compressed-activation fine-tuning.

The core (``svd``, ``hosvd``, ``asi``, ``rank``, ``tenalg``) works on numpy
arrays and torch tensors alike and never imports torch itself; the torch
adapter lives in :mod:`tensorcompress.torch`.
"""

from tensorcompress import asi, hosvd, rank, svd, tenalg
from tensorcompress._measured import chosen_options, measured_plans
from tensorcompress._sweep import chosen_plans
from tensorcompress.rank import ExplainedVariance, Fixed
from tensorcompress.results import SVDResult, TuckerResult

__all__ = [
    "ExplainedVariance",
    "Fixed",
    "SVDResult",
    "TuckerResult",
    "asi",
    "chosen_options",
    "chosen_plans",
    "hosvd",
    "measured_plans",
    "rank",
    "svd",
    "tenalg",
]

__version__ = "0.1.0"
