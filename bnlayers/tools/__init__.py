"""Whole-model tools for batch normalization: swap, fold, recalibrate, freeze.

The jobs people do with BN layers in finished models, which PyTorch, timm
and fvcore have tools for and Keras does not:

- `swap_batchnorm(model, to=...)`: a copy of the model with every BN layer
  turned into `bnlayers.BatchNormalization` or the built-in one, optimizer
  state included.
- `fold_batchnorm(model)`: an inference-only copy with BN merged into the
  linear layers before or after it (through pooling, `Flatten` and other
  layers that commute with it) where that is exact, and a frozen Keras BN
  layer computing a fixed multiply-add elsewhere.
- `recalibrate(model, data)`: the moving statistics replaced by the exact
  population statistics over `data` (as fvcore's PreciseBN does).
- `fuse_activations(model)`: a copy with each BN layer and the activation
  layer after it merged into one `bnlayers.BatchNormalization(activation=...)`.
- `freeze_batchnorm(model)`: every BN layer in inference mode and
  non-trainable, for fine-tuning.
- `diagnose(model, x, y)`: how far each layer's moving statistics are
  from the data's population statistics, what that costs the model in
  inference mode, and what to do about it.
- `PreciseBN` and `FreezeBNStatistics`: callbacks for `fit` that
  recalibrate the statistics when training ends, or train the last epochs
  with them frozen.

Each works on `keras.layers.BatchNormalization` and
`bnlayers.BatchNormalization` alike, in Sequential and Functional models
and in models nested inside them. They walk models through a few Keras
internals (all in `_keras_internals`), checked against Keras 3.15 and 3.16
(the range pyproject.toml allows); on another Keras version they raise a
RuntimeError naming it.
"""

from bnlayers.tools.callbacks import FreezeBNStatistics
from bnlayers.tools.callbacks import PreciseBN
from bnlayers.tools.channel_affine import ChannelAffine
from bnlayers.tools.diagnosis import DiagnosisReport
from bnlayers.tools.diagnosis import diagnose
from bnlayers.tools.fold import fold_batchnorm
from bnlayers.tools.freeze import freeze_batchnorm
from bnlayers.tools.fuse import fuse_activations
from bnlayers.tools.recalibration import recalibrate
from bnlayers.tools.swap import swap_batchnorm

__all__ = [
    "ChannelAffine",
    "DiagnosisReport",
    "FreezeBNStatistics",
    "PreciseBN",
    "diagnose",
    "fold_batchnorm",
    "freeze_batchnorm",
    "fuse_activations",
    "recalibrate",
    "swap_batchnorm",
]
