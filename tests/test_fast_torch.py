"""The PyTorch fast path (`bnlayers/_fast_torch.py`): that it is taken, and
that it computes what the float64 reference and the reference path
(`fused=False`) compute: outputs, gradients (autograd, first and second
order) and moving statistics, for float32, float16, bfloat16 and float64
inputs, features last and at axis 1, at offsets up to 1e6.

The parity grid, test_accuracy and the rest of the comparison suite run
the fast path too (`fused=None`); here are the cases they do not reach.
"""

import keras
import numpy as np
import pytest

import bn_reference as ref
import bnlayers

pytestmark = pytest.mark.backends("torch", reason="the PyTorch fast path")

torch = pytest.importorskip("torch")
from bnlayers import _fast_torch  # noqa: E402

# Tolerances, about ten times the largest error measured here (relative to
# the largest value, `bn_reference.rel_err`; the measured figures are in the
# comments):
TOL = {
    # Largest over outputs, gradients, moving statistics and inference
    # outputs, against float64 and against fused=False: 5.5e-7.
    "float32": 5e-6,
    # float64 statistics too: 7.3e-10 against float64 at offset 1e6 (the
    # reference takes the unrounded data), 5.3e-16 against fused=False.
    "float64": 1e-8,
    # Inputs and outputs rounded to the compute dtype, statistics in
    # float32 (mixed policies): 5.4e-4 (float16) and 4.5e-3 (bfloat16)
    # against float64 on the rounded inputs, less against fused=False;
    # moving statistics within 2.2e-7.
    "mixed_float16": 5e-3,
    "mixed_bfloat16": 4e-2,
}
POLICY = {
    "float32": "float32",
    "float64": "float64",
    "float16": "mixed_float16",
    "bfloat16": "mixed_bfloat16",
}


def _data(shape, axis, offset, seed=0):
    return ref.offset_data(shape, [axis % len(shape)], offset, seed)


def _step(fused, policy, x, dy, axis, momentum=0.5):
    """One training step then one inference call: NumPy results."""
    layer = bnlayers.BatchNormalization(
        axis=axis, momentum=momentum, fused=fused, dtype=policy
    )
    layer.build(x.shape)
    channels = x.shape[axis]
    layer.gamma.assign(np.linspace(0.5, 2.0, channels))
    layer.beta.assign(np.linspace(-1.0, 1.0, channels))
    inputs = torch.tensor(x, dtype=getattr(torch, layer.compute_dtype))
    inputs.requires_grad_(True)
    y = layer(inputs, training=True)
    params = [layer.gamma.value, layer.beta.value]
    grads = torch.autograd.grad(
        y, [inputs] + params, grad_outputs=torch.tensor(dy, dtype=y.dtype)
    )
    moving = [
        ref.as_float64(v) for v in (layer.moving_mean, layer.moving_variance)
    ]
    with torch.no_grad():
        inferred = layer(inputs, training=False)
    results = [y] + list(grads) + moving + [inferred]
    return layer, inputs, [ref.as_float64(t) for t in results]


def _float64(layer, inputs, dy, axis, momentum=0.5):
    """The float64 reference of `_step`, on the inputs the layer saw."""
    x = ref.as_float64(inputs)
    gamma, beta = (ref.as_float64(v) for v in (layer.gamma, layer.beta))
    expected = ref.batch_norm(x, [axis], gamma, beta, layer.epsilon, dy=dy)
    mean = ref.moving_update(np.zeros_like(gamma), expected["mean"], momentum)
    var = ref.moving_update(np.ones_like(gamma), expected["var"], momentum)
    pshape = [1] * x.ndim
    pshape[axis] = -1
    # Inference with the moving statistics the layer holds (float32).
    held_mean, held_var = (
        ref.as_float64(v).reshape(pshape)
        for v in (layer.moving_mean, layer.moving_variance)
    )
    inferred = (x - held_mean) / np.sqrt(
        held_var + layer.epsilon
    ) * gamma.reshape(pshape) + beta.reshape(pshape)
    return [
        expected["y"],
        expected["dx"],
        expected["dgamma"],
        expected["dbeta"],
        mean,
        var,
        inferred,
    ]


NAMES = (
    "outputs",
    "gradient wrt inputs",
    "gradient wrt gamma",
    "gradient wrt beta",
    "moving mean",
    "moving variance",
    "inference outputs",
)


def _cases():
    for dtype in ("float32", "float64", "float16", "bfloat16"):
        offsets = (0.0, 1e6) if dtype in ("float32", "float64") else (0.0, 1e2)
        for axis in (-1, 1):
            for offset in offsets:
                yield pytest.param(
                    dtype,
                    axis,
                    offset,
                    id=f"{dtype}-axis{axis}-offset{offset:g}",
                )


@pytest.fixture(params=[False, True], ids=["two-pass", "folded"])
def fold(request, monkeypatch):
    """Inference through both of its forms: subtract-first, and (where the
    offset allows) the folded one pass, which by default only tensors of
    2^17 elements or more take."""
    if request.param:
        monkeypatch.setattr(_fast_torch, "_FOLD_MIN_SIZE", 0)
    return request.param


@pytest.mark.parametrize("dtype, axis, offset", _cases())
def test_matches_float64_and_reference_path(
    dtype, axis, offset, fold, float32_policy_after
):
    shape = (16, 6, 5, 7)
    x, dy = _data(shape, axis, offset)
    policy = POLICY[dtype]
    tol = TOL[policy]
    assert (
        bnlayers.fused_eligibility(
            bnlayers.BatchNormalization(axis=axis, dtype=policy), shape
        )
        is None
    )
    layer, inputs, fast = _step(True, policy, x, dy, axis)
    _, _, reference = _step(False, policy, x, dy, axis)
    expected = _float64(layer, inputs, dy, axis)
    for name, a, b, e in zip(NAMES, fast, reference, expected, strict=True):
        # The input gradient is a difference of terms of the size of
        # gamma * dy / std (see bn_reference.step).
        floor = 1.0 if name == "gradient wrt inputs" else 1e-3
        ref.assert_close(a, e, tol, f"{name} against float64", floor)
        ref.assert_close(a, b, tol, f"{name} against fused=False", floor)


def test_calls_go_through_the_fast_path(monkeypatch):
    calls = []
    for name in ("training", "inference"):
        original = getattr(_fast_torch, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(_fast_torch, name, spy)
    x = np.random.default_rng(0).normal(size=(8, 3, 4)).astype("float32")
    for fused in (None, True, False):
        layer = bnlayers.BatchNormalization(axis=1, fused=fused)
        layer(x, training=True)
        layer(x, training=False)
        expected = [] if fused is False else ["training", "inference"]
        assert calls == expected, (fused, calls)
        calls.clear()
    # Ineligible calls fall back to the reference path.
    layer = bnlayers.BatchNormalization(virtual_batch_size=4)
    layer(x, training=True)
    assert calls == []


def test_second_order_gradients():
    """A gradient of the gradient (create_graph=True) through the fast path,
    as through the reference path."""
    x, dy = _data((12, 5), -1, 3.0)
    results = []
    for fused in (True, False):
        layer = bnlayers.BatchNormalization(fused=fused)
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 5))
        inputs = torch.tensor(x, dtype=torch.float32, requires_grad=True)
        y = layer(inputs, training=True)
        (dx,) = torch.autograd.grad(
            y,
            [inputs],
            torch.tensor(dy, dtype=torch.float32),
            create_graph=True,
        )
        second = torch.autograd.grad((dx**2).sum(), [inputs, layer.gamma.value])
        results.append([ref.as_float64(t) for t in second])
    for a, b in zip(*results, strict=True):
        # Measured: 2.5e-7.
        ref.assert_close(a, b, 1e-5, "second-order gradient")


def test_empty_batch_keeps_moving_statistics():
    results = []
    for fused in (True, False):
        layer = bnlayers.BatchNormalization(momentum=0.5, fused=fused)
        layer.build((None, 3))
        inputs = torch.zeros((0, 3), requires_grad=True)
        y = layer(inputs, training=True)
        grads = torch.autograd.grad(
            y.sum(), [inputs, layer.gamma.value, layer.beta.value]
        )
        results.append(
            [ref.as_float64(t) for t in (y, *grads)] + layer.get_weights()
        )
    assert results[0][0].shape == (0, 3)
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(results[0][-2], np.zeros(3))
    np.testing.assert_array_equal(results[0][-1], np.ones(3))


def test_model_fits_alike_on_both_paths():
    """A few `fit` steps of a small convolutional model: the same weights,
    to float32 rounding, through the fast and the reference path."""
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, (32, 8, 8, 2)).astype("float32")
    y = rng.integers(0, 3, 32)
    weights = []
    for fused in (None, False):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.layers.Input((8, 8, 2)),
                keras.layers.Conv2D(4, 3),
                bnlayers.BatchNormalization(fused=fused),
                keras.layers.Flatten(),
                keras.layers.Dense(3),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights, strict=True):
        # Measured: 6.3e-6 after four steps.
        ref.assert_close(a, b, 1e-4, "weights after fit")
