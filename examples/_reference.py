"""What examples/accuracy.py measures against: one training step of batch
normalization (features last) in float64, and one training step of a Keras
layer with its gradients on whichever backend runs.

The test suite has its own, fuller float64 reference (masks, renorm, any
axes) in tests/bn_reference.py; tests/test_accuracy.py checks that the two
agree, so the examples depend on nothing under tests/.
"""

import keras
import numpy as np

BACKEND = keras.backend.backend()


def to_numpy(x):
    """A NumPy array from any backend's tensor (one that requires grad too)."""
    return np.asarray(keras.ops.convert_to_numpy(x))


def batch_norm_step(x, gamma, beta, epsilon, upstream):
    """One training call in float64 on the batch statistics, features last.

    Returns `(y, grads, variance)`: the output; the gradients of
    `sum(upstream * y)` as a dict with "x", "gamma", "beta" and "x_scale"
    (the size of the terms the input gradient is the difference of:
    `max|upstream * gamma / sigma|`, which is what its error is relative
    to); the batch variance (the moving variance after a step with
    momentum 0).
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(upstream, np.float64)
    gamma = np.asarray(gamma, np.float64)
    beta = np.asarray(beta, np.float64)
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes)
    variance = ((x - mean) ** 2).mean(axis=axes)
    sigma = np.sqrt(variance + epsilon)
    xhat = (x - mean) / sigma
    y = gamma * xhat + beta
    dxhat = dy * gamma
    count = x.size // x.shape[-1]
    dx = (
        dxhat
        - dxhat.mean(axis=axes)
        - xhat * (dxhat * xhat).sum(axis=axes) / count
    ) / sigma
    grads = {
        "x": dx,
        "x_scale": float(np.max(np.abs(dxhat / sigma))),
        "gamma": (dy * xhat).sum(axis=axes),
        "beta": dy.sum(axis=axes),
    }
    return y, grads, variance


def rel_err(actual, expected):
    """max |actual - expected| / max |expected|, one number per tensor."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def training_step(layer, execution="eager"):
    """`step(x, dy) -> (y, dx, dgamma, dbeta)`: `layer` called in training
    mode and the gradients of `sum(dy * y)`, with the moving statistics
    updated as after an ordinary call.

    `execution`: "eager"; on TensorFlow also "function" (`tf.function`) and
    "jit" (`jit_compile=True`); on JAX also "jit" (`jax.jit`).
    """
    if BACKEND == "tensorflow":
        return _tensorflow_step(layer, execution)
    if BACKEND == "jax":
        return _jax_step(layer, jit=execution == "jit")
    if BACKEND == "torch" and execution == "eager":
        return _torch_step(layer)
    raise ValueError(
        f"no {execution!r} training step for the {BACKEND!r} backend. "
        f"Received: execution={execution!r}"
    )


def _loss(y, dy):
    return keras.ops.sum(keras.ops.cast(y, dy.dtype) * dy)


def _tensorflow_step(layer, execution):
    import tensorflow as tf

    def step(x, dy):
        x = tf.convert_to_tensor(x)
        weights = [layer.gamma.value, layer.beta.value]
        with tf.GradientTape() as tape:
            tape.watch([x, *weights])
            y = layer(x, training=True)
            loss = _loss(y, tf.convert_to_tensor(dy))
        return (y, *tape.gradient(loss, [x, *weights]))

    if execution == "eager":
        return step
    return tf.function(step, jit_compile=execution == "jit")


def _stateless_loss(layer, x, weights, state, dy):
    """The loss with `weights` (gamma, beta) and `state` (the other
    variables) as the layer's values, and the state after the call."""
    trainable = [layer.gamma, layer.beta]
    others = [v for v in layer.variables if not any(v is w for w in trainable)]
    mapping = list(zip(trainable, weights, strict=True))
    mapping += list(zip(others, state, strict=True))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        y = layer(x, training=True)
    return _loss(y, dy), (y, [scope.get_current_value(v) for v in others])


def _assign_state(layer, new_state):
    trainable = [layer.gamma, layer.beta]
    others = [v for v in layer.variables if not any(v is w for w in trainable)]
    for variable, value in zip(others, new_state, strict=True):
        variable.assign(value)


def _jax_step(layer, jit):
    import jax

    grad_fn = jax.value_and_grad(
        lambda x, weights, state, dy: _stateless_loss(
            layer, x, weights, state, dy
        ),
        argnums=(0, 1),
        has_aux=True,
    )
    if jit:
        grad_fn = jax.jit(grad_fn)

    def step(x, dy):
        state = [
            v.value
            for v in layer.variables
            if not any(v is w for w in (layer.gamma, layer.beta))
        ]
        (_, (y, new_state)), (dx, (dgamma, dbeta)) = grad_fn(
            keras.ops.convert_to_tensor(x),
            [layer.gamma.value, layer.beta.value],
            state,
            keras.ops.convert_to_tensor(dy),
        )
        _assign_state(layer, new_state)
        return y, dx, dgamma, dbeta

    return step


def _torch_step(layer):
    import torch

    def step(x, dy):
        x = keras.ops.convert_to_tensor(x).detach().requires_grad_(True)
        weights = [
            v.value.detach().clone().requires_grad_(True)
            for v in (layer.gamma, layer.beta)
        ]
        state = [
            v.value.detach()
            for v in layer.variables
            if not any(v is w for w in (layer.gamma, layer.beta))
        ]
        loss, (y, new_state) = _stateless_loss(
            layer, x, weights, state, keras.ops.convert_to_tensor(dy)
        )
        dx, dgamma, dbeta = torch.autograd.grad(loss, [x, *weights])
        _assign_state(layer, [s.detach() for s in new_state])
        return y.detach(), dx, dgamma, dbeta

    return step
