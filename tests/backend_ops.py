"""What the tests need from the Keras backend, written once for TensorFlow, JAX and PyTorch.

The comparison tests run under whichever backend `KERAS_BACKEND` names.
Everything they do that Keras itself does not abstract goes through here:
taking gradients (`tf.GradientTape`, `jax.value_and_grad`, `torch.autograd`)
and turning backend tensors into NumPy arrays.
"""

import keras
import numpy as np
from keras import ops

BACKEND = keras.backend.backend()


def _has_fast_path():
    from bnlayers import _fused

    return _fused.fast_backend() is not None


# Whether bnlayers has a fused fast path on this backend (`fused=None`
# then differs from `fused=False`, and `fused=True` is accepted).
HAS_FAST_PATH = _has_fast_path()


def to_numpy(x):
    """A NumPy array from a NumPy value or any backend's tensor (a PyTorch
    tensor that requires grad or holds bfloat16 included)."""
    if isinstance(x, np.ndarray):
        return x
    return np.asarray(ops.convert_to_numpy(x))


def has_x64():
    """Whether float64 and int64 tensors exist: JAX has them only with
    `jax_enable_x64` (otherwise it silently makes them 32-bit)."""
    if BACKEND != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


def value_and_grads(
    fn, inputs, upstream, variables=(), layers=(), args=(), jit=False
):
    """`fn(*inputs, *args)` and the gradients of `sum(cast(y, upstream.dtype) * upstream)`.

    Gradients are taken with respect to each of `inputs` (not `args`: masks
    and the like) and each of the Keras `variables` (trainable or not:
    `layer.trainable = False` does not stop them). The updates `fn` makes to
    the variables of `layers` (moving statistics) take effect, as after an
    ordinary call.

    On TensorFlow this is a `tf.GradientTape` and works inside `tf.function`;
    on JAX and PyTorch `fn` runs in a `keras.StatelessScope` whose variable
    values are the ones differentiated, and the updates are assigned after.
    `jit=True` (JAX only) compiles the whole step with `jax.jit`, once per
    `fn` and input shapes: pass the same `fn` again to reuse it.

    Returns `(y, grads)`: backend tensors; `grads` has one entry per input,
    then one per variable (None where the loss does not depend on it).
    """
    upstream = ops.convert_to_tensor(upstream)
    if BACKEND == "tensorflow":
        if jit:
            raise ValueError(
                "jit=True is for the JAX backend; use tf.function on TensorFlow"
            )
        return _tensorflow_value_and_grads(
            fn, inputs, args, upstream, variables
        )
    variables = list(variables)
    state = []
    for layer in layers:
        for v in layer.variables:
            if not any(v is w for w in variables + state):
                state.append(v)
    if BACKEND == "jax":
        y, grads, new_state = _jax_value_and_grads(
            fn, inputs, args, upstream, variables, state, jit
        )
    elif BACKEND == "torch":
        if jit:
            raise ValueError("jit=True is for the JAX backend")
        y, grads, new_state = _torch_value_and_grads(
            fn, inputs, args, upstream, variables, state
        )
    else:
        raise NotImplementedError(
            f"no gradient helper for the {BACKEND!r} backend"
        )
    for v, value in zip(state, new_state, strict=False):
        v.assign(value)
    return y, grads


def train_step(layer, x, dy, mask=None):
    """One training call of a BN layer and its gradients for the loss `sum(dy * y)`.

    Returns NumPy `(y, dx, dgamma, dbeta)`; the moving statistics are updated
    as after an ordinary call.
    """
    y, grads = value_and_grads(
        lambda t: layer(t, training=True, mask=mask),
        [x],
        dy,
        [layer.gamma, layer.beta],
        [layer],
    )
    dx, dgamma, dbeta = grads
    return to_numpy(y), to_numpy(dx), to_numpy(dgamma), to_numpy(dbeta)


def _loss(y, upstream):
    return ops.sum(ops.cast(y, upstream.dtype) * upstream)


def _tensorflow_value_and_grads(fn, inputs, args, upstream, variables):
    import tensorflow as tf

    inputs = [tf.convert_to_tensor(x) for x in inputs]
    values = [v.value for v in variables]
    with tf.GradientTape() as tape:
        tape.watch(inputs + values)
        y = fn(*inputs, *args)
        loss = _loss(y, upstream)
    return y, tape.gradient(loss, inputs + values)


# Compiled JAX steps by (fn, variables, state): a parity case reuses its
# step over several batches instead of compiling it anew for each.
_JAX_JITTED = {}


def _jax_value_and_grads(fn, inputs, args, upstream, variables, state, jit):
    import jax

    def loss_fn(input_values, variable_values, state_values, args, upstream):
        mapping = list(zip(variables, variable_values, strict=False)) + list(
            zip(state, state_values, strict=False)
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            y = fn(*input_values, *args)
        new_state = [scope.get_current_value(v) for v in state]
        return _loss(y, upstream), (y, new_state)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    if jit:
        key = (
            id(fn),
            tuple(id(v) for v in variables),
            tuple(id(v) for v in state),
        )
        if key not in _JAX_JITTED:
            # Holding fn keeps its id from being reused while the entry lives.
            _JAX_JITTED[key] = (fn, jax.jit(grad_fn))
        grad_fn = _JAX_JITTED[key][1]
    inputs = [ops.convert_to_tensor(x) for x in inputs]
    args = [None if a is None else ops.convert_to_tensor(a) for a in args]
    (_, (y, new_state)), (input_grads, variable_grads) = grad_fn(
        inputs,
        [v.value for v in variables],
        [v.value for v in state],
        args,
        upstream,
    )
    return y, list(input_grads) + list(variable_grads), new_state


def _torch_value_and_grads(fn, inputs, args, upstream, variables, state):
    import torch

    inputs = [
        ops.convert_to_tensor(x).detach().requires_grad_(True) for x in inputs
    ]
    values = [v.value.detach().clone().requires_grad_(True) for v in variables]
    mapping = list(zip(variables, values, strict=False)) + [
        (v, v.value.detach()) for v in state
    ]
    with keras.StatelessScope(state_mapping=mapping) as scope:
        y = fn(*inputs, *args)
    new_state = [scope.get_current_value(v) for v in state]
    grads = torch.autograd.grad(
        _loss(y, upstream), inputs + values, allow_unused=True
    )
    new_state = [None if s is None else s.detach() for s in new_state]
    return y.detach(), list(grads), new_state
