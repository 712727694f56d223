"""The article's model trained with each BatchNormalization, side by side.

The model is built once with the built-in layer and once with bnlayers (both
code paths), all starting from the same weights, and trained on the same
batches of the bundled MNIST subset with deterministic ops. Per-step losses
over the first 20 steps must agree within `LOSS_RTOL` (`bn_reference.rel_err`),
and the test accuracies after one epoch within 1 point.

`tf.config.experimental.enable_op_determinism()` is process-global (and makes
some ops raise), so the training runs in a subprocess: this file run as a
script prints its figures as JSON. Run it by hand to see them:

    python tests/test_article_model.py
"""

import json
import os
import pathlib
import subprocess
import sys

import bn_reference as ref

MNIST_NPZ = (
    pathlib.Path(__file__).resolve().parents[1]
    / "examples"
    / "data"
    / "mnist_10k.npz"
)
BATCH_SIZE = 64
COMPARED_STEPS = 20
# bn_reference.rel_err of the first losses (measured 4.3e-6, TensorFlow 2.21 CPU).
LOSS_RTOL = 5e-5
ACCURACY_POINTS = 1.0


def _train_all():
    """Train every variant for one epoch; returns per-step losses and test accuracies."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    import bnlayers
    from article import article_model

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    with np.load(MNIST_NPZ) as data:
        x_train = data["x_train"].astype("float32")[..., None] / 255.0
        y_train = data["y_train"].astype("int64")
        x_test = data["x_test"].astype("float32")[..., None] / 255.0
        y_test = data["y_test"].astype("int64")

    def compiled(batch_normalization):
        model = article_model(batch_normalization)
        model.compile(
            optimizer="adam",
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        return model

    models = {
        "builtin": compiled(keras.layers.BatchNormalization()),
        "bnlayers-reference": compiled(
            bnlayers.BatchNormalization(fused=False)
        ),
        "bnlayers-auto": compiled(bnlayers.BatchNormalization()),
    }
    initial = models["builtin"].get_weights()
    for model in models.values():
        model.set_weights(initial)

    order = np.random.default_rng(0).permutation(len(x_train))
    batches = [
        order[i : i + BATCH_SIZE] for i in range(0, len(order), BATCH_SIZE)
    ]
    results = {}
    for name, model in models.items():
        # train_on_batch resets the metrics first: it returns this batch's loss.
        losses = [
            float(model.train_on_batch(x_train[b], y_train[b])[0])
            for b in batches
        ]
        _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
        results[name] = {"losses": losses, "test_accuracy": float(accuracy)}
    return results


def test_article_model_trains_alike():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, __file__],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])

    builtin = results.pop("builtin")
    assert len(builtin["losses"]) == -(-8000 // BATCH_SIZE)
    # Training did something, so agreement is not agreement on nothing.
    assert builtin["losses"][COMPARED_STEPS - 1] < builtin["losses"][0]
    assert builtin["test_accuracy"] > 0.8
    for name, ours in results.items():
        ref.assert_close(
            ours["losses"][:COMPARED_STEPS],
            builtin["losses"][:COMPARED_STEPS],
            LOSS_RTOL,
            f"losses of the first {COMPARED_STEPS} steps ({name})",
            floor=0.0,
        )
        gap = 100.0 * abs(ours["test_accuracy"] - builtin["test_accuracy"])
        assert gap <= ACCURACY_POINTS, (
            f"{name}: test accuracy {ours['test_accuracy']} vs {builtin['test_accuracy']}"
        )


if __name__ == "__main__":
    figures = _train_all()
    base = figures["builtin"]["losses"][:COMPARED_STEPS]
    for entry in figures.values():
        ours = entry["losses"][:COMPARED_STEPS]
        entry["losses_rel_err_first_steps"] = ref.rel_err(ours, base, floor=0.0)
    print(json.dumps(figures))
