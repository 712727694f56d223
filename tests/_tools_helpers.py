"""What the tests of the whole-model tools share (tests/test_tools_*.py).

Agreement tolerance for swap and fold: the largest absolute difference of
the outputs is at most `AGREE` times the largest absolute output. float32
has a relative rounding step of 1.2e-7; swapping reorders the normalization
arithmetic and folding reorders the conv sums and rounds `kernel * scale`
once, so a few roundings per term accumulate over sums of up to a few
hundred terms; the largest error measured is about 5e-7 of the output.
"""

import functools

import keras
import numpy as np
import tensorflow as tf

import bnlayers
from bnlayers.tools._common import batchnorm_layers

AGREE = 1e-5
BUILTIN = keras.layers.BatchNormalization
OURS = bnlayers.BatchNormalization
BOTH = [BUILTIN, OURS]


def bn_layers(model):
    return batchnorm_layers(model)


def randomize_bn(model, seed=0):
    """Gives every BN layer statistics and affine weights far from their init."""
    rng = np.random.default_rng(seed)
    for layer in bn_layers(model):
        new = []
        for variable in layer.weights:
            shape = variable.shape
            if variable.name in ("moving_variance",):
                value = rng.uniform(0.3, 3.0, shape)
            elif variable.name in ("moving_stddev", "renorm_stddev"):
                value = rng.uniform(0.5, 2.0, shape)
            elif variable.name == "gamma":
                value = rng.normal(1.0, 0.3, shape)
            else:
                value = rng.normal(0.0, 0.5, shape)
            new.append(value.astype("float32"))
        layer.set_weights(new)
    return model


def relative(out, ref):
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def infer(model, x, jit=False):
    if not jit:  # eager: one call costs less than tracing a graph
        return keras.ops.convert_to_numpy(model(x, training=False))
    fn = tf.function(lambda t: model(t, training=False), jit_compile=True)
    return keras.ops.convert_to_numpy(fn(x))


@functools.cache
def mobilenet():
    """A keras.applications model with 52 built-in BN layers and random statistics.

    Built once per test process and shared by the swap and fold tests, which
    leave it as it is.
    """
    keras.utils.set_random_seed(3)
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3),
        alpha=0.35,
        weights=None,
        classes=10,
        classifier_activation=None,
    )
    randomize_bn(model, seed=3)
    x = np.random.default_rng(3).normal(size=(8, 32, 32, 3)).astype("float32")
    return model, x
