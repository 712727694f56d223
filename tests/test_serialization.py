"""Configs, `.keras` files and weights: what moves between bnlayers and the built-in layer."""

import inspect
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
from keras import ops

import bn_reference as ref
import bnlayers
from article import article_model

REPO = pathlib.Path(__file__).resolve().parents[1]

# Outputs of the two layers with equal weights differ by float32 rounding
# only (see test_parity.py for the measured figures).
RTOL = 1e-5


def _custom_args():
    return dict(
        axis=1,
        momentum=0.9,
        epsilon=1e-4,
        center=True,
        scale=False,
        beta_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=3),
        moving_variance_initializer=keras.initializers.Constant(2.0),
        beta_regularizer=keras.regularizers.L2(1e-4),
        gamma_regularizer=keras.regularizers.L1(1e-5),
        beta_constraint=keras.constraints.MaxNorm(2.0),
        gamma_constraint=keras.constraints.NonNeg(),
        renorm=True,
        renorm_clipping={"rmax": 3.0, "rmin": 0.5, "dmax": 1.0},
        renorm_momentum=0.95,
        name="bn_custom",
    )


def _normalized(config):
    """A config as JSON would carry it (tuples become lists, ...)."""
    return json.loads(json.dumps(config))


# ------------------------------------------------------------------ config


def test_constructor_matches_the_builtin_argument_for_argument():
    ours = inspect.signature(bnlayers.BatchNormalization.__init__).parameters
    theirs = inspect.signature(
        keras.layers.BatchNormalization.__init__
    ).parameters
    ours_named = [p for p in ours.values() if p.kind != p.VAR_KEYWORD]
    theirs_named = [p for p in theirs.values() if p.kind != p.VAR_KEYWORD]
    assert [(p.name, p.default) for p in ours_named[: len(theirs_named)]] == [
        (p.name, p.default) for p in theirs_named
    ]
    assert [p.name for p in ours_named[len(theirs_named) :]] == [
        "virtual_batch_size",
        "fused",
        "replica_group_size",
        "debias_moving_statistics",
        "activation",
    ]
    assert any(p.kind == p.VAR_KEYWORD for p in ours.values())


def test_default_config_matches_the_builtin():
    ours = bnlayers.BatchNormalization(name="bn").get_config()
    theirs = keras.layers.BatchNormalization(name="bn").get_config()
    assert {k: ours[k] for k in theirs} == theirs
    assert set(ours) - set(theirs) == {
        "virtual_batch_size",
        "fused",
        "replica_group_size",
        "debias_moving_statistics",
        "activation",
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        _custom_args(),
        {"axis": [1, 3], "fused": False, "dtype": "mixed_float16"},
        {"virtual_batch_size": 4, "momentum": 0.5},
    ],
    ids=["defaults", "custom", "axis-list-mixed", "ghost"],
)
def test_get_config_from_config_round_trip(kwargs):
    layer = bnlayers.BatchNormalization(**kwargs)
    config = layer.get_config()
    clone = bnlayers.BatchNormalization.from_config(config)
    assert _normalized(clone.get_config()) == _normalized(config)
    # And through keras' generic (de)serialization, as saving does.
    revived = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(revived) is bnlayers.BatchNormalization
    assert _normalized(revived.get_config()) == _normalized(config)


def test_builtin_config_builds_our_layer():
    config = keras.layers.BatchNormalization(**_custom_args()).get_config()
    layer = bnlayers.BatchNormalization.from_config(config)
    ours_config = layer.get_config()
    assert _normalized({k: ours_config[k] for k in config}) == _normalized(
        config
    )


# ----------------------------------------------------------------- weights


@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
def test_weights_have_the_builtin_names_shapes_dtypes_and_order(renorm):
    shape = (2, 5, 4)
    ours = bnlayers.BatchNormalization(axis=1, renorm=renorm)
    theirs = keras.layers.BatchNormalization(axis=1, renorm=renorm)
    ours.build(shape)
    theirs.build(shape)

    def describe(layer):
        return [
            (w.path.split("/")[-1], tuple(w.shape), w.dtype, w.trainable)
            for w in layer.weights
        ]

    assert describe(ours) == describe(theirs)
    assert [n for n, *_ in describe(ours)] == ref.weight_names(renorm=renorm)


@pytest.mark.parametrize("direction", ["builtin->ours", "ours->builtin"])
def test_set_weights_from_get_weights(direction, fused_mode):
    rng = np.random.default_rng(0)
    shape = (6, 4, 3)
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    ours = bnlayers.BatchNormalization(renorm=True, fused=fused_mode)
    theirs = keras.layers.BatchNormalization(renorm=True)
    ours.build(shape)
    theirs.build(shape)
    source, target = (
        (theirs, ours) if direction == "builtin->ours" else (ours, theirs)
    )
    source.set_weights(
        [rng.uniform(0.5, 1.5, 3).astype("float32") for _ in source.weights]
    )
    target.set_weights(source.get_weights())
    for a, b in zip(source.get_weights(), target.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert ref.rel_err(ours(x), theirs(x)) <= RTOL
    assert ref.rel_err(ours(x, training=True), theirs(x, training=True)) <= RTOL


# ------------------------------------------------------------------- files


def _images(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 28, 28, 1)).astype("float32"), rng.integers(0, 10, n)


def _trained(model):
    """Every weight moved away from its initial value, moving statistics included."""
    rng = np.random.default_rng(5)
    model.set_weights(
        [
            w + rng.normal(0.0, 0.1, w.shape).astype(w.dtype)
            for w in model.get_weights()
        ]
    )
    x, _ = _images()
    model(x, training=True)  # eager training calls update the moving statistics
    model(x[::-1] * 2.0, training=True)
    return model


def test_keras_file_round_trip(tmp_path, fused_mode):
    args = _custom_args()
    args["axis"] = -1
    model = _trained(
        article_model(
            bnlayers.BatchNormalization(fused=fused_mode, **args), filters=8
        )
    )
    path = tmp_path / "model.keras"
    model.save(path)

    with zipfile.ZipFile(path) as archive:
        saved = json.loads(archive.read("config.json"))
    # The saved layer list starts with the InputLayer.
    bn_config = saved["config"]["layers"][2]
    assert bn_config["registered_name"] == "bnlayers>BatchNormalization"

    reloaded = keras.saving.load_model(path)  # no custom_objects
    layer = reloaded.layers[1]
    assert type(layer) is bnlayers.BatchNormalization
    assert _normalized(layer.get_config()) == _normalized(
        model.layers[1].get_config()
    )
    for a, b in zip(model.get_weights(), reloaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x, _ = _images(seed=1)
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), reloaded.predict(x, verbose=0)
    )
    # Training mode too (batch statistics, renorm corrections from the
    # reloaded renorm statistics).
    np.testing.assert_array_equal(
        ops.convert_to_numpy(model(x, training=True)),
        ops.convert_to_numpy(reloaded(x, training=True)),
    )


@pytest.mark.parametrize("direction", ["builtin->ours", "ours->builtin"])
@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
def test_weights_h5_interchange(tmp_path, direction, renorm, fused_mode):
    def ours():
        return article_model(
            bnlayers.BatchNormalization(renorm=renorm, fused=fused_mode),
            filters=8,
        )

    def theirs():
        return article_model(
            keras.layers.BatchNormalization(renorm=renorm), filters=8
        )

    make_source, make_target = (
        (theirs, ours) if direction == "builtin->ours" else (ours, theirs)
    )
    source = _trained(make_source())
    path = tmp_path / "model.weights.h5"
    source.save_weights(path)
    target = make_target()
    target.load_weights(path)

    for a, b in zip(source.get_weights(), target.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # The moving statistics really moved, so the check above means something.
    bn_weights = source.layers[1].get_weights()
    assert not np.allclose(bn_weights[2], 0.0) and not np.allclose(
        bn_weights[3], 1.0
    )
    x, _ = _images(seed=2)
    assert (
        ref.rel_err(target.predict(x, verbose=0), source.predict(x, verbose=0))
        <= RTOL
    )


# ------------------------------------------- what moves between the two layers
# One test for each sentence of docs/saving.md.

# Run in a fresh process that can import bnlayers (it is on PYTHONPATH) but
# does not: it loads each file, and saves the predictions of those that load.
_LOAD_WITHOUT_BNLAYERS = r"""
import json
import sys

import keras
import numpy as np

x = np.load(sys.argv[1])
result = {}
for path in sys.argv[2:]:
    try:
        model = keras.saving.load_model(path)
    except Exception as error:
        result[path] = {"error": f"{type(error).__name__}: {error}"}
    else:
        np.save(path + ".predictions.npy", model.predict(x, verbose=0))
        result[path] = {"modules": sorted({type(layer).__module__ for layer in model.layers})}
result["bnlayers imported"] = "bnlayers" in sys.modules
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def loaded_without_bnlayers(tmp_path_factory):
    """A trained bnlayers model saved as is and after `swap_batchnorm(to="keras")`,
    both loaded in a process that never imports bnlayers."""
    folder = tmp_path_factory.mktemp("files")
    model = _trained(article_model(bnlayers.BatchNormalization(), filters=8))
    swapped = bnlayers.swap_batchnorm(model, to="keras")
    paths = {
        "bnlayers": folder / "bnlayers.keras",
        "swapped": folder / "swapped.keras",
    }
    model.save(paths["bnlayers"])
    swapped.save(paths["swapped"])
    x, _ = _images(seed=3)
    np.save(folder / "x.npy", x)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_BNLAYERS, str(folder / "x.npy")]
        + [str(p) for p in paths.values()],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [
        line for line in proc.stdout.splitlines() if line.startswith("RESULT ")
    ]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    return {
        "bnlayers imported": result["bnlayers imported"],
        "model": model,
        "swapped model": swapped,
        "x": x,
        **{key: result[str(path)] for key, path in paths.items()},
        "predictions": {
            key: np.load(str(path) + ".predictions.npy")
            for key, path in paths.items()
            if "error" not in result[str(path)]
        },
    }


def test_a_keras_file_saved_with_bnlayers_needs_bnlayers_imported(
    loaded_without_bnlayers,
):
    files = loaded_without_bnlayers
    assert not files["bnlayers imported"]
    assert "error" in files["bnlayers"]
    # Keras names the class it could not find (among several thousand
    # characters of config).
    assert "bnlayers>BatchNormalization" in files["bnlayers"]["error"]


def test_swapped_to_keras_before_saving_loads_without_bnlayers(
    loaded_without_bnlayers,
):
    files = loaded_without_bnlayers
    assert not files["bnlayers imported"]
    assert "error" not in files["swapped"], files["swapped"]
    assert not [
        m for m in files["swapped"]["modules"] if m.startswith("bnlayers")
    ]
    predictions = files["predictions"]["swapped"]
    # Bit for bit what the swapped model predicted before saving ...
    np.testing.assert_array_equal(
        predictions, files["swapped model"].predict(files["x"], verbose=0)
    )
    # ... and what the bnlayers model predicts, to float32 rounding.
    assert (
        ref.rel_err(predictions, files["model"].predict(files["x"], verbose=0))
        <= RTOL
    )


def test_a_builtin_keras_file_moves_to_bnlayers_by_loading_then_swapping(
    tmp_path,
):
    builtin = _trained(
        article_model(keras.layers.BatchNormalization(renorm=True), filters=8)
    )
    path = tmp_path / "builtin.keras"
    builtin.save(path)

    # custom_objects does not replace a built-in class: the file names
    # `keras.layers.BatchNormalization`, and that is what loads.
    loaded = keras.saving.load_model(
        path, custom_objects={"BatchNormalization": bnlayers.BatchNormalization}
    )
    assert type(loaded.layers[1]) is keras.layers.BatchNormalization

    ours = bnlayers.swap_batchnorm(loaded, to="bnlayers")
    assert type(ours.layers[1]) is bnlayers.BatchNormalization
    for a, b in zip(builtin.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x, _ = _images(seed=4)
    expected = builtin.predict(x, verbose=0)
    assert ref.rel_err(ours.predict(x, verbose=0), expected) <= RTOL
    # Saved again, it is a bnlayers file (loads with bnlayers imported).
    ours.save(tmp_path / "ours.keras")
    reloaded = keras.saving.load_model(tmp_path / "ours.keras")
    assert type(reloaded.layers[1]) is bnlayers.BatchNormalization
    np.testing.assert_array_equal(
        reloaded.predict(x, verbose=0), ours.predict(x, verbose=0)
    )
