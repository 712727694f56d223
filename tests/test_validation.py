"""Bad input raises early, with the right exception type and a message that
names the argument and the value received."""

import re

import numpy as np
import pytest

import bnlayers
from bnlayers import _geometry


def _raises(exc, *fragments):
    """pytest.raises that also requires every fragment in the message, verbatim."""
    return pytest.raises(
        exc, match="(?s)" + ".*".join(re.escape(f) for f in fragments)
    )


# ------------------------------------------------------------ constructor

CONSTRUCTOR_CASES = [
    # (kwargs, exception, fragments the message must contain)
    ({"momentum": 1.5}, ValueError, ["`momentum`", "momentum=1.5"]),
    ({"momentum": -0.1}, ValueError, ["`momentum`", "momentum=-0.1"]),
    ({"momentum": "high"}, TypeError, ["`momentum`", "momentum='high'"]),
    ({"momentum": True}, TypeError, ["`momentum`", "momentum=True"]),
    (
        {"renorm_momentum": 2.0},
        ValueError,
        ["`renorm_momentum`", "renorm_momentum=2.0"],
    ),
    ({"epsilon": 0.0}, ValueError, ["`epsilon`", "epsilon=0.0"]),
    ({"epsilon": -1e-3}, ValueError, ["`epsilon`", "epsilon=-0.001"]),
    ({"epsilon": "small"}, TypeError, ["`epsilon`", "epsilon='small'"]),
    ({"axis": "channels"}, TypeError, ["`axis`", "axis='channels'"]),
    ({"axis": []}, TypeError, ["`axis`", "axis=[]"]),
    ({"axis": 1.0}, TypeError, ["`axis`", "axis=1.0"]),
    ({"axis": [1, 1]}, ValueError, ["`axis`", "axis=[1, 1]"]),
    (
        {"renorm": True, "renorm_clipping": {"rmax": 3, "tmax": 1}},
        ValueError,
        [
            "['tmax']",
            "`renorm_clipping`",
            "Received invalid keys",
            "renorm_clipping={'rmax': 3, 'tmax': 1}",
        ],
    ),
    (
        {"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 2.0}},
        ValueError,
        [
            "rmax >= rmin",
            "rmax should be",
            "renorm_clipping={'rmax': 0.5, 'rmin': 2.0}",
            "rmax=0.5, rmin=2.0",
        ],
    ),
    (
        {"renorm": True, "renorm_clipping": {"dmax": -1.0}},
        ValueError,
        [
            "dmax >= 0",
            "dmax should be non-negative",
            "renorm_clipping={'dmax': -1.0}",
        ],
    ),
    (
        {"renorm": True, "renorm_clipping": [("rmax", 3)]},
        TypeError,
        ["`renorm_clipping`", "renorm_clipping=[('rmax', 3)]"],
    ),
    ({"fused": "yes"}, ValueError, ["`fused`", "fused='yes'"]),
    (
        {"renorm_momentum": None},
        ValueError,
        ["`renorm_momentum`", "`momentum` only", "renorm_momentum=None"],
    ),
    (
        {"debias_moving_statistics": "yes"},
        TypeError,
        ["`debias_moving_statistics`", "debias_moving_statistics='yes'"],
    ),
]


@pytest.mark.parametrize(
    "kwargs, exc, fragments",
    CONSTRUCTOR_CASES,
    ids=[repr(c[0]) for c in CONSTRUCTOR_CASES],
)
def test_bad_constructor_arguments(kwargs, exc, fragments):
    with _raises(exc, *fragments):
        bnlayers.BatchNormalization(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"momentum": 0.0},
        {"momentum": 1},
        {"epsilon": 1e-12},
        {"axis": [1, -1]},
        {"renorm": True, "renorm_clipping": {"rmax": 2, "rmin": 2, "dmax": 0}},
    ],
    ids=repr,
)
def test_edge_values_are_accepted(kwargs):
    layer = bnlayers.BatchNormalization(**kwargs)
    layer(np.ones((2, 3, 4), "float32"), training=True)


# ----------------------------------------------------- build and call time


@pytest.mark.parametrize(
    "axis, shape",
    [
        (2, (4, 3)),
        (-3, (4, 3)),
        (4, (2, 3, 4, 5)),
        (-5, (2, 3, 4, 5)),
        ([1, 3], (2, 3, 4)),
    ],
    ids=str,
)
def test_axis_out_of_range_for_the_input_rank(axis, shape):
    layer = bnlayers.BatchNormalization(axis=axis)
    bad = axis[-1] if isinstance(axis, list) else axis
    with _raises(
        ValueError, f"`axis` {bad}", f"axis={axis!r}", f"input_shape={shape}"
    ):
        layer(np.zeros(shape, "float32"))


def test_axis_out_of_range_is_caught_when_the_model_is_built():
    """Symbolically, before any data flows."""
    import keras

    with _raises(ValueError, "`axis` 2", "axis=2", "input_shape=(None, 4)"):
        keras.Sequential(
            [
                keras.layers.InputLayer(shape=(4,)),
                bnlayers.BatchNormalization(axis=2),
            ]
        )


def test_axis_naming_one_axis_twice():
    layer = bnlayers.BatchNormalization(axis=[1, -2])
    with _raises(
        ValueError, "same axis twice", "axis=[1, -2]", "input_shape=(2, 3, 4)"
    ):
        layer(np.zeros((2, 3, 4), "float32"))


@pytest.mark.parametrize(
    "axis, exc",
    [("channels", TypeError), ([], TypeError), ([2, 2], ValueError)],
)
def test_geometry_makes_the_constructors_axis_check(axis, exc):
    """One check of an `axis` argument: what a tool resolving a layer's axis
    (`_geometry.feature_axes`) raises is what the constructor raises."""
    with pytest.raises(exc) as from_constructor:
        bnlayers.BatchNormalization(axis=axis)
    with pytest.raises(exc) as from_geometry:
        _geometry.feature_axes(axis, 4, (2, 3, 4, 5))
    assert str(from_geometry.value) == str(from_constructor.value)
    assert f"Received: axis={axis!r}" in str(from_geometry.value)


def test_rank_one_input():
    with _raises(ValueError, "rank >= 2", "input_shape=(3,)"):
        bnlayers.BatchNormalization()(np.zeros((3,), "float32"))


def test_feature_axis_of_unknown_size():
    with _raises(
        ValueError, "known size", "axis=-1", "input_shape=(None, None)"
    ):
        bnlayers.BatchNormalization().build((None, None))


@pytest.mark.parametrize(
    "mask_shape", [(2,), (2, 5, 3), (2, 5, 1, 1)], ids=lambda s: f"rank{len(s)}"
)
@pytest.mark.parametrize("training", [True, False])
def test_mask_of_the_wrong_rank(mask_shape, training):
    layer = bnlayers.BatchNormalization()
    x = np.zeros((2, 5, 3), "float32")
    with _raises(
        ValueError,
        "`mask`",
        "(rank 2)",
        f"mask.shape={mask_shape}",
        "inputs.shape=(2, 5, 3)",
    ):
        layer(x, training=training, mask=np.ones(mask_shape, bool))


def test_mask_that_does_not_fit_the_inputs():
    """Rank 2 for inputs of rank 3, but not the inputs' first two sizes."""
    layer = bnlayers.BatchNormalization()
    with _raises(
        ValueError, "`mask`", "mask.shape=(3, 5)", "inputs.shape=(2, 5, 3)"
    ):
        layer(
            np.zeros((2, 5, 3), "float32"),
            training=True,
            mask=np.ones((3, 5), bool),
        )


def test_mask_rank_with_several_feature_axes():
    """With axis=[1, 2], Keras' rank (inputs - 1) and the rank without both axes are taken."""
    layer = bnlayers.BatchNormalization(axis=[1, 2])
    x = np.zeros((2, 5, 3), "float32")
    layer(x, training=True, mask=np.ones((2,), bool))
    layer(x, training=True, mask=np.ones((2, 5), bool))
    with _raises(
        ValueError, "`mask`", "(rank 2)", "(rank 1)", "mask.shape=(2, 5, 3)"
    ):
        layer(x, training=True, mask=np.ones((2, 5, 3), bool))


def test_input_with_a_different_feature_size_after_build():
    layer = bnlayers.BatchNormalization()
    layer(np.zeros((2, 3), "float32"))
    with _raises(ValueError, "expected axis 1", "value 3", "shape (2, 4)"):
        layer(np.zeros((2, 4), "float32"))
