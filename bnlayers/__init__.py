"""bnlayers: Batch Normalization for Keras, written from scratch.

`bnlayers.BatchNormalization` is a drop-in for `keras.layers.BatchNormalization`
(same constructor, weights, behaviour and saved files) with a fused fast path
on TensorFlow, JAX and PyTorch, ghost batches, exact synchronized statistics
and a list of feature axes.
"""

from bnlayers._forms import FormRule
from bnlayers._forms import form_rule
from bnlayers._forms import set_form_rule
from bnlayers._fused import fused_eligibility
from bnlayers.batch_normalization import BatchNormalization
from bnlayers.tools import FreezeBNStatistics
from bnlayers.tools import PreciseBN
from bnlayers.tools import diagnose
from bnlayers.tools import fold_batchnorm
from bnlayers.tools import freeze_batchnorm
from bnlayers.tools import fuse_activations
from bnlayers.tools import recalibrate
from bnlayers.tools import swap_batchnorm

__version__ = "0.1.0"

__all__ = [
    "BatchNormalization",
    "FormRule",
    "FreezeBNStatistics",
    "PreciseBN",
    "diagnose",
    "fold_batchnorm",
    "form_rule",
    "freeze_batchnorm",
    "fuse_activations",
    "fused_eligibility",
    "recalibrate",
    "set_form_rule",
    "swap_batchnorm",
    "__version__",
]
