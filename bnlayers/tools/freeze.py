"""`freeze_batchnorm`: every BN layer in inference mode and not trained, for fine-tuning."""

import keras

from bnlayers.tools._common import batchnorm_layers
from bnlayers.tools._common import check_model


def freeze_batchnorm(model: keras.Model) -> keras.Model:
    """Freezes every BN layer of `model` for fine-tuning; the rest is left as it is.

    Each `keras.layers.BatchNormalization` and `bnlayers.BatchNormalization`
    layer in the model (nested models and custom layers included) gets
    `trainable = False`. By the Keras rule for batch normalization this
    does two things: gamma and beta are no longer trained, *and* the layer
    runs in inference mode even inside `fit()`, normalizing with its moving
    statistics and never updating them. This is what fine-tuning a
    pretrained model on a small dataset wants: the statistics learned on
    the large dataset stay, and small fine-tuning batches cannot disturb
    them. Other layers keep their `trainable` setting.

    Freeze before `compile()`; if the model was already compiled, compile
    it again for the change to take effect.

    ```python
    bnlayers.freeze_batchnorm(model)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x_small, y_small, epochs=3)
    ```

    Args:
        model: A `keras.Model` of any kind.

    Returns:
        `model`, modified in place.
    """
    check_model(model, "freeze_batchnorm")
    for layer in batchnorm_layers(model):
        layer.trainable = False
    return model
