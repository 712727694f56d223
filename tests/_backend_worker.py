"""One backend's side of the cross-backend tests (tests/test_cross_backend.py).

Run as a script under the backend in KERAS_BACKEND, with the tasks to do in
this one process (a start-up of Keras and a backend is seconds):

    python tests/_backend_worker.py DIR PREFIX TASK [TASK ...]

TASK is `article`, `exchange` (loads the `.keras` files other backends left
in DIR, then leaves this backend's) or `data_parallel` (JAX with 2 CPU
devices). Each writes its findings to DIR/PREFIX-TASK.json, or the
traceback if it failed (under "error"); the test asserts on them. Errors
are `bn_reference.rel_err`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json
import pathlib
import sys

import keras
import numpy as np

import bnlayers
from article import article_model
from bn_reference import rel_err

BACKEND = keras.backend.backend()
DATA = (
    pathlib.Path(__file__).resolve().parents[1]
    / "examples"
    / "data"
    / "mnist_10k.npz"
)


def _mnist(train_size):
    with np.load(DATA) as data:
        x_train = (
            data["x_train"][:train_size].astype("float32")[..., None] / 255.0
        )
        x_test = data["x_test"].astype("float32")[..., None] / 255.0
        return (
            x_train,
            data["y_train"][:train_size].astype("int32"),
            x_test,
            data["y_test"].astype("int32"),
        )


def _glorot_uniform(model, seed=0):
    """Keras' default initial weights, drawn by NumPy: the same on every backend
    (and keras.utils.set_random_seed would import TensorFlow where installed)."""
    rng = np.random.default_rng(seed)
    weights = []
    for w in model.weights:
        if w.path.endswith("kernel"):
            fan_in, fan_out = int(np.prod(w.shape[:-1])), int(w.shape[-1])
            if len(w.shape) > 2:  # a convolution: fans per receptive field
                fan_out *= int(np.prod(w.shape[:-2]))
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            weights.append(
                rng.uniform(-limit, limit, w.shape).astype("float32")
            )
        else:
            weights.append(w.numpy())
    return weights


def article(out, train_size=2048):
    """Built-in and bnlayers from the same initial weights on the same batches: one epoch."""
    x_train, y_train, x_test, y_test = _mnist(int(train_size))
    builtin = article_model(keras.layers.BatchNormalization())
    ours = article_model(bnlayers.BatchNormalization())
    builtin.set_weights(_glorot_uniform(builtin))
    ours.set_weights(builtin.get_weights())
    result = {"backend": BACKEND, "train_size": len(x_train)}
    for name, model in (("builtin", builtin), ("bnlayers", ours)):
        model.compile(
            optimizer="adam",
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        history = model.fit(
            x_train, y_train, batch_size=64, epochs=1, shuffle=False, verbose=0
        )
        loss, accuracy = model.evaluate(
            x_test, y_test, batch_size=500, verbose=0
        )
        result[name] = {
            "train_loss": float(history.history["loss"][-1]),
            "test_loss": float(loss),
            "test_accuracy": float(accuracy),
        }
    # Keras itself imports TensorFlow, where installed, to save files; bnlayers
    # (import, build, fit, evaluate) must not.
    result["tensorflow_imported"] = "tensorflow" in sys.modules
    pathlib.Path(out).write_text(json.dumps(result, indent=1))


def _rich_model():
    """The article's model with a renorm BN, plus a ghost-batch BN over an axis list."""
    return keras.Sequential(
        [
            keras.layers.InputLayer(shape=(28, 28, 1)),
            keras.layers.Conv2D(8, (3, 3), activation="relu"),
            bnlayers.BatchNormalization(
                renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0}
            ),
            keras.layers.MaxPooling2D((2, 2)),
            bnlayers.BatchNormalization(
                axis=[1, 3], virtual_batch_size=4, momentum=0.5
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def exchange(directory, out):
    """Loads the files other backends left in `directory`, then leaves this backend's."""
    load(directory, out)
    if not (pathlib.Path(directory) / f"{BACKEND}.keras").exists():
        save(directory)


def save(directory):
    """A model with moved statistics, its file, and its outputs on fixed inputs."""
    directory = pathlib.Path(directory)
    rng = np.random.default_rng(0)
    model = _rich_model()
    model.set_weights(
        [
            (w + rng.normal(0.0, 0.1, w.shape)).astype("float32")
            for w in model.get_weights()
        ]
    )
    x = rng.random((12, 28, 28, 1)).astype("float32")
    for _ in range(
        2
    ):  # eager training calls move the moving and renorm statistics
        model(x, training=True)
    model.save(directory / f"{BACKEND}.keras")
    weights = np.concatenate([w.ravel() for w in model.get_weights()])
    infer = keras.ops.convert_to_numpy(model(x, training=False))
    train = keras.ops.convert_to_numpy(
        model(x, training=True)
    )  # moves the statistics again
    np.savez(
        directory / f"{BACKEND}.npz",
        x=x,
        infer=infer,
        train=train,
        weights=weights,
    )


def load(directory, out):
    """Every other backend's file: same weights, same outputs here."""
    directory = pathlib.Path(directory)
    result = {}
    for saved in sorted(directory.glob("*.keras")):
        if saved.stem == BACKEND:
            continue
        model = keras.saving.load_model(saved)  # no custom_objects
        with np.load(directory / f"{saved.stem}.npz") as expected:
            weights = np.concatenate([w.ravel() for w in model.get_weights()])
            infer = keras.ops.convert_to_numpy(
                model(expected["x"], training=False)
            )
            train = keras.ops.convert_to_numpy(
                model(expected["x"], training=True)
            )
            result[saved.stem] = {
                "layers": [
                    type(layer).__module__ + "." + type(layer).__name__
                    for layer in model.layers
                ],
                "weights_equal": bool(
                    np.array_equal(weights, expected["weights"])
                ),
                "infer_rel_err": rel_err(infer, expected["infer"]),
                "train_rel_err": rel_err(train, expected["train"]),
            }
    pathlib.Path(out).write_text(json.dumps(result, indent=1))


def data_parallel(out):
    """keras.distribution.DataParallel over 2 CPU devices: batch statistics
    are taken over the global batch, both halves together."""
    import jax

    devices = jax.devices("cpu")
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    # The two halves of each batch (one per device) differ in mean and spread,
    # so per-device statistics would be visibly off.
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.normal(0.0, 1.0, (8, 6, 3)), rng.normal(10.0, 3.0, (8, 6, 3))]
    ).astype("float32")
    y = rng.standard_normal((16, 6, 3)).astype("float32")
    result = {"devices": len(devices)}
    for name, bn in (
        ("bnlayers", bnlayers.BatchNormalization(momentum=0.0)),
        ("builtin", keras.layers.BatchNormalization(momentum=0.0)),
    ):
        model = keras.Sequential([keras.layers.InputLayer(shape=(6, 3)), bn])
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        result[name] = {
            "moving_mean": model.layers[0].moving_mean.numpy().tolist(),
            "moving_variance": model.layers[0].moving_variance.numpy().tolist(),
            "outputs": keras.ops.convert_to_numpy(
                model(x, training=True)
            ).tolist(),
        }
    # And a call on a batch laid out by the distribution, one half per device.
    distribution = keras.distribution.distribution()
    sharded = keras.distribution.distribute_tensor(
        x, distribution.get_data_layout(x.shape)
    )
    layer = bnlayers.BatchNormalization(momentum=0.0)
    outputs = layer(sharded, training=True)
    result["sharded_call"] = {
        "input_shards": [
            list(shard.data.shape) for shard in sharded.addressable_shards
        ],
        "moving_mean": layer.moving_mean.numpy().tolist(),
        "moving_variance": layer.moving_variance.numpy().tolist(),
        "outputs": keras.ops.convert_to_numpy(outputs).tolist(),
    }
    x64 = x.astype("float64")
    mean, var = x64.mean(axis=(0, 1)), x64.var(axis=(0, 1))
    result["expected"] = {
        "moving_mean": mean.tolist(),
        "moving_variance": var.tolist(),
        "outputs": ((x64 - mean) / np.sqrt(var + 1e-3)).tolist(),
        "per_device_means": [
            x64[:8].mean(axis=(0, 1)).tolist(),
            x64[8:].mean(axis=(0, 1)).tolist(),
        ],
    }
    pathlib.Path(out).write_text(json.dumps(result))


def main(directory, prefix, *tasks):
    import traceback

    directory = pathlib.Path(directory)
    for task in tasks:
        out = directory / f"{prefix}-{task}.json"
        try:
            if task == "exchange":
                exchange(directory, out)
            else:
                {"article": article, "data_parallel": data_parallel}[task](out)
        except Exception:
            out.write_text(json.dumps({"error": traceback.format_exc()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
