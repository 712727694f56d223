"""One worker of the two-process `MultiWorkerMirroredStrategy` test.

Run as ``python tests/_multiworker_worker.py INDEX PORT0 PORT1``: joins the
cluster ``127.0.0.1:PORT0, 127.0.0.1:PORT1`` as worker INDEX, trains
`build_model()` on `dataset()` with synchronized bnlayers BN, and prints one
JSON line with the final weights. `tests/test_multiworker.py` starts both
workers and computes the single-process reference with the same functions.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

GLOBAL_BATCH = 16
STEPS = 5


def data():
    rng = np.random.default_rng(0)
    x = rng.random((GLOBAL_BATCH * STEPS, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=len(x)).astype("int64")
    return x, y


def dataset():
    import tensorflow as tf

    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    # Shard by element: with the default (FILE) policy an in-memory dataset
    # would fall back to this anyway, with a warning.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return ds.with_options(options)


def build_model():
    """The article's model (4 filters) with initial weights that do not depend on the process."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bnlayers
    from article import article_model

    model = article_model(
        bnlayers.BatchNormalization(synchronized=True, momentum=0.5, name="bn"),
        filters=4,
    )
    rng = np.random.default_rng(1)

    def initial(weight):
        values = rng.uniform(-0.5, 0.5, weight.shape)
        if weight.name in ("gamma", "moving_variance"):
            values += 1.0
        if weight.path.endswith("kernel"):
            # Glorot-like scale: the logits stay of order 1.
            values *= 2.0 * np.sqrt(3.0 / np.prod(weight.shape[:-1]))
        if "conv2d" in weight.path and weight.path.endswith("bias"):
            # BN's inputs get a mean of about 1e3 next to a spread of about
            # 0.5: E[x^2] - E[x]^2 in float32 would keep only a few of its
            # 24 bits there.
            values += 1e3
        return values.astype("float32")

    model.set_weights([initial(w) for w in model.weights])
    return model


def train(model, strategy=None):
    """STEPS steps of Adam (the article's optimizer) on the mean loss of each global batch.

    A custom loop rather than `fit()`: with `MultiWorkerMirroredStrategy`,
    Keras 3.15's `fit()` fails before the first step (its symbolic build
    calls `strategy.reduce` on the (x, y) tuple of a distributed batch,
    which this strategy does not accept).
    """
    import keras
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            probabilities = model(x, training=True)
            losses = keras.losses.sparse_categorical_crossentropy(
                y, probabilities
            )
            # Summed here and over replicas: the mean over the global batch.
            loss = tf.reduce_sum(losses) / GLOBAL_BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(
            zip(grads, model.trainable_variables, strict=False)
        )
        return loss

    @tf.function
    def step(batch):
        per_replica = strategy.run(replica_step, args=batch)
        return strategy.reduce(
            tf.distribute.ReduceOp.SUM, per_replica, axis=None
        )

    losses = [
        float(step(batch))
        for batch in strategy.experimental_distribute_dataset(dataset())
    ]
    bn = model.get_layer("bn")
    return {
        "losses": losses,
        "moving_mean": np.asarray(bn.moving_mean).tolist(),
        "moving_variance": np.asarray(bn.moving_variance).tolist(),
        "weights": [np.asarray(w).tolist() for w in model.get_weights()],
    }


def main(index, ports):
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build_model()
    result = train(model, strategy)
    result["num_replicas_in_sync"] = strategy.num_replicas_in_sync
    result["index"] = index
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(p) for p in sys.argv[2:]])
