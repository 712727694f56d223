"""Measurements under `MirroredStrategy` over R logical CPU devices.

Run as ``python tests/_mirrored_checks.py R``: logical devices must be set up
before TensorFlow initializes its devices, so this runs in a fresh process
(one per R) started by `tests/test_sync.py`, which asserts on the numbers.
Prints one JSON object on the last line of stdout. Nothing is asserted here:
every figure is a measured difference, so the tests state the tolerances.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

from bn_reference import feature_axes_of
from bn_reference import rel_err

OFFSETS = (0.0, 1e4, 1e6)
SPREADS = (0.5, 1.0, 2.0)
EPSILON = 1e-3


def setup(replicas):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
    )
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(replicas)]
    )


def per_replica(strategy, parts):
    """A distributed value whose replica i holds `parts[i]` (sizes may differ)."""
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
    )


def split(array, sizes):
    return np.split(array, np.cumsum(sizes)[:-1])


def local(strategy, value):
    return [np.asarray(v) for v in strategy.experimental_local_results(value)]


def variable_copies(strategy, variable):
    """Each replica's copy of a layer weight."""
    return local(strategy, variable.value)


def train_once(strategy, layer, parts, mask_parts=None):
    """One training call on per-replica parts; returns the local outputs."""
    xs = per_replica(strategy, parts)
    if mask_parts is None:

        @tf.function
        def step(x):
            return strategy.run(lambda t: layer(t, training=True), args=(x,))

        return local(strategy, step(xs))

    ms = per_replica(strategy, mask_parts)

    @tf.function
    def masked_step(x, m):
        return strategy.run(
            lambda t, u: layer(t, training=True, mask=u), args=(x, m)
        )

    return local(strategy, masked_step(xs, ms))


def exactness(strategy, sizes):
    """Synchronized variance and outputs against the float64 truth, per offset."""
    import keras

    import bnlayers

    rng = np.random.default_rng(1)
    spreads = np.array(SPREADS)
    results = []
    for offset in OFFSETS:
        x = (
            offset + rng.standard_normal((sum(sizes), len(spreads))) * spreads
        ).astype("float32")
        mask = rng.random(len(x)) > 0.3
        row = {"offset": offset}
        for name, make in (
            (
                "bnlayers",
                lambda: bnlayers.BatchNormalization(
                    synchronized=True, momentum=0.0
                ),
            ),
            (
                "builtin",
                lambda: keras.layers.BatchNormalization(
                    synchronized=True, momentum=0.0
                ),
            ),
        ):
            for masked in (False, True):
                kept = x[mask] if masked else x
                x64 = kept.astype("float64")
                truth_var = x64.var(axis=0)
                truth_out = (x.astype("float64") - x64.mean(axis=0)) / np.sqrt(
                    truth_var + EPSILON
                )
                with strategy.scope():
                    layer = make()
                    layer.build((None, len(spreads)))
                y = np.concatenate(
                    train_once(
                        strategy,
                        layer,
                        split(x, sizes),
                        split(mask, sizes) if masked else None,
                    )
                )
                keep = mask if masked else np.ones(len(x), bool)
                key = name + ("_masked" if masked else "")
                row[key + "_var"] = variable_copies(
                    strategy, layer.moving_variance
                )[0].tolist()
                row[key + "_var_rel_err"] = rel_err(
                    variable_copies(strategy, layer.moving_variance)[0],
                    truth_var,
                    floor=0.0,
                )
                row[key + "_out_rel_err"] = rel_err(y[keep], truth_out[keep])
        row["truth_var"] = x.astype("float64").var(axis=0).tolist()
        results.append(row)
    return results


def mixed_precision(strategy, sizes):
    """mixed_float16: float16 inputs, statistics in float32 across replicas."""
    import keras

    import bnlayers

    rng = np.random.default_rng(2)
    x = (100.0 + rng.standard_normal((sum(sizes), 4)) * 0.5).astype("float16")
    x64 = x.astype("float64")
    truth_var = x64.var(axis=0)
    truth_out = (x64 - x64.mean(axis=0)) / np.sqrt(truth_var + EPSILON)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        out = {}
        for name, cls in (
            ("bnlayers", bnlayers.BatchNormalization),
            ("builtin", keras.layers.BatchNormalization),
        ):
            with strategy.scope():
                layer = cls(synchronized=True, momentum=0.0)
                layer.build((None, 4))
            parts = train_once(strategy, layer, split(x, sizes))
            y = np.concatenate(parts)
            out[name + "_dtype"] = str(y.dtype)
            out[name + "_var_rel_err"] = rel_err(
                variable_copies(strategy, layer.moving_variance)[0],
                truth_var,
                floor=0.0,
            )
            out[name + "_out_rel_err"] = rel_err(y, truth_out)
        return out
    finally:
        keras.mixed_precision.set_global_policy("float32")


EQUIVALENCE_CASES = {
    # name: (per-example shape, layer kwargs, uses a mask)
    "dense": ((5,), {}, False),
    "conv": ((4, 4, 3), {}, False),
    "conv_masked": ((4, 4, 3), {}, True),
    "axis_list": ((4, 4, 3), {"axis": [1, 3]}, False),
    "axis_list_masked": ((4, 4, 3), {"axis": [1, 3]}, True),
    "renorm": (
        (4, 4, 3),
        {
            "renorm": True,
            "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
        },
        False,
    ),
}


def equivalence(strategy, case, sizes, steps=3):
    """R replicas with parts of the global batch vs one device with all of it.

    Compares, at every step, the outputs, the gradients of sum(w * y) with
    respect to the inputs, gamma and beta (summed over replicas, as an
    optimizer would), and after the last step every replica's copy of the
    moving statistics.
    """
    import bnlayers

    shape, kwargs, masked = EQUIVALENCE_CASES[case]
    rng = np.random.default_rng(3)
    kwargs = dict(kwargs, synchronized=True, momentum=0.5)
    with strategy.scope():
        dist = bnlayers.BatchNormalization(**kwargs)
        dist.build((None,) + shape)
    ref = bnlayers.BatchNormalization(**kwargs)
    ref.build((None,) + shape)
    weights = [
        rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in ref.weights
    ]
    ref.set_weights(weights)
    dist.set_weights(weights)

    def replica_fn(x, m, w):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = dist(x, training=True, mask=m if masked else None)
            loss = tf.reduce_sum(y * w)
        gx, gg, gb = tape.gradient(loss, [x, dist.gamma.value, dist.beta.value])
        return y, gx, gg, gb

    @tf.function
    def dist_step(x, m, w):
        y, gx, gg, gb = strategy.run(replica_fn, args=(x, m, w))
        total = lambda g: strategy.reduce(
            tf.distribute.ReduceOp.SUM, g, axis=None
        )
        return y, gx, total(gg), total(gb)

    @tf.function
    def ref_step(x, m, w):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = ref(x, training=True, mask=m if masked else None)
            loss = tf.reduce_sum(y * w)
        gx, gg, gb = tape.gradient(loss, [x, ref.gamma.value, ref.beta.value])
        return y, gx, gg, gb

    diffs = {
        "outputs": 0.0,
        "grad_inputs": 0.0,
        "grad_gamma": 0.0,
        "grad_beta": 0.0,
    }
    batch = sum(sizes)
    features = feature_axes_of(kwargs.get("axis", -1), 1 + len(shape))
    for _ in range(steps):
        x = (3.0 + 2.0 * rng.standard_normal((batch,) + shape)).astype(
            "float32"
        )
        w = rng.standard_normal(x.shape).astype("float32")
        mask_shape = tuple(
            d for i, d in enumerate((batch,) + shape) if i not in features
        )
        m = rng.random(mask_shape) > 0.25
        m[0] = False  # a fully masked example as well
        y, gx, gg, gb = dist_step(
            per_replica(strategy, split(x, sizes)),
            per_replica(strategy, split(m, sizes)),
            per_replica(strategy, split(w, sizes)),
        )
        ry, rgx, rgg, rgb = ref_step(
            tf.constant(x), tf.constant(m), tf.constant(w)
        )
        for key, value, reference in (
            ("outputs", np.concatenate(local(strategy, y)), ry),
            ("grad_inputs", np.concatenate(local(strategy, gx)), rgx),
            ("grad_gamma", gg, rgg),
            ("grad_beta", gb, rgb),
        ):
            diffs[key] = max(diffs[key], rel_err(value, reference))
    for name in ("moving_mean", "moving_variance") + (
        ("moving_stddev",) if kwargs.get("renorm") else ()
    ):
        reference = np.asarray(getattr(ref, name))
        copies = variable_copies(strategy, getattr(dist, name))
        diffs[name] = max(rel_err(c, reference) for c in copies)
        # Replicas must agree bit for bit, or they drift apart over training.
        diffs[name + "_replicas_identical"] = all(
            np.array_equal(c, copies[0]) for c in copies
        )
    return diffs


def dataset_remainder(strategy, replicas):
    """A distributed tf.data pipeline whose last global batch does not divide.

    10 examples in global batches of 2 * R: the last batch leaves some
    replicas short (with 4 replicas, two of them get no example at all).
    """
    import bnlayers

    rng = np.random.default_rng(4)
    x = (3.0 + 2.0 * rng.standard_normal((4 * replicas + 2, 3))).astype(
        "float32"
    )
    global_batch = 2 * replicas
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(global_batch)
    with strategy.scope():
        dist = bnlayers.BatchNormalization(synchronized=True, momentum=0.5)
        dist.build((None, 3))
    ref = bnlayers.BatchNormalization(momentum=0.5)
    ref.build((None, 3))

    @tf.function(reduce_retracing=True)
    def dist_step(batch):
        return strategy.run(lambda t: dist(t, training=True), args=(batch,))

    per_replica_sizes = []
    out_diff = 0.0
    for batch, ref_batch in zip(
        strategy.experimental_distribute_dataset(dataset), dataset, strict=False
    ):
        parts = local(strategy, dist_step(batch))
        per_replica_sizes.append([len(p) for p in parts])
        # Sorted rows: the comparison must not depend on which replica got which example.
        ours = np.sort(np.concatenate(parts), axis=0)
        theirs = np.sort(np.asarray(ref(ref_batch, training=True)), axis=0)
        out_diff = max(out_diff, rel_err(ours, theirs))
    result = {"per_replica_sizes": per_replica_sizes, "outputs": out_diff}
    for name in ("moving_mean", "moving_variance"):
        copies = variable_copies(strategy, getattr(dist, name))
        result[name] = max(
            rel_err(c, np.asarray(getattr(ref, name))) for c in copies
        )
    return result


# The other cases' offsets, masks and uneven shares are `exactness`'s and
# `equivalence`'s here; each case costs seconds of tracing.
REFERENCE_CASES = (
    "offset_1e6",
    "groups_1e6",
    "groups_masked_1e4",
    "groups_uneven_1e4",
)


def reference_cases(strategy):
    """Cases of `_sync_process_checks` (4 replicas) under this strategy.

    Every case's errors against the float64 reference of the global batch
    (of each group's, with `replica_group_size`): outputs, input, gamma and
    beta gradients of ``sum(upstream * outputs)``, moving statistics; the
    same measurements as the PyTorch and JAX processes make.
    """
    import _sync_process_checks as cases

    results = {}
    for name in REFERENCE_CASES:
        x, dy, mask, sizes, gamma, beta = cases.case_data(name)
        with strategy.scope():
            layer = cases.make_layer(name, gamma, beta)
        args = [per_replica(strategy, split(x, sizes))]
        args.append(per_replica(strategy, split(dy, sizes)))
        if mask is not None:
            args.append(per_replica(strategy, split(mask, sizes)))

        def replica_step(x, dy, m=None, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True, mask=m)
                loss = tf.reduce_sum(y * dy)
            dx, dgamma, dbeta = tape.gradient(
                loss, [x, layer.gamma.value, layer.beta.value]
            )
            return y, dx, dgamma, dbeta

        @tf.function
        def step(*args, replica_step=replica_step):
            return strategy.run(replica_step, args=args)

        y, dx, dgamma, dbeta = (local(strategy, t) for t in step(*args))
        means = variable_copies(strategy, layer.moving_mean)
        variances = variable_copies(strategy, layer.moving_variance)
        got = {
            "y": np.concatenate(y),
            "dx": np.concatenate(dx),
            # The gradient of the summed losses: the replicas' sum.
            "dgamma": np.sum(dgamma, axis=0),
            "dbeta": np.sum(dbeta, axis=0),
            "moving_mean": means[0],
            "moving_variance": variances[0],
        }
        results[name] = cases.errors(name, got, slice(None))
        results[name]["copies_equal"] = all(
            np.array_equal(c, means[0]) for c in means
        ) and all(np.array_equal(c, variances[0]) for c in variances)
    return results


# Each case runs with even per-replica batches under one device count and
# uneven ones under the other (4 replicas: one of them empty), which covers
# both at half the run time.
def step_averages(strategy, sizes, steps=3):
    """`debias_moving_statistics=True` and `momentum=None` with
    `synchronized=True`: every replica's moving statistics against the
    float64 average of the global batches' statistics, and its step count."""
    import bnlayers

    rng = np.random.default_rng(7)
    results = {}
    options = {
        "debiased": {"debias_moving_statistics": True, "momentum": 0.9},
        "cumulative": {"momentum": None},
    }
    for name, kwargs in options.items():
        with strategy.scope():
            layer = bnlayers.BatchNormalization(
                synchronized=True, epsilon=EPSILON, **kwargs
            )
            layer.build((None, 3))
        mean_est, var_est = np.zeros(3), np.ones(3)
        for t in range(1, steps + 1):
            x = 3.0 + rng.uniform(0.5, 2.0) * rng.standard_normal(
                (sum(sizes), 3)
            )
            x = x.astype("float32")
            train_once(strategy, layer, split(x, sizes))
            x = x.astype("float64")
            m = kwargs["momentum"]
            w = 1.0 / t if m is None else (1.0 - m) / (1.0 - m**t)
            mean_est = mean_est + w * (x.mean(0) - mean_est)
            var_est = var_est + w * (x.var(0) - var_est)
        results[name] = {
            "mean_rel_err": max(
                rel_err(c, mean_est)
                for c in variable_copies(strategy, layer.moving_mean)
            ),
            "var_rel_err": max(
                rel_err(c, var_est)
                for c in variable_copies(strategy, layer.moving_variance)
            ),
            "counts": [
                c.tolist()
                for c in variable_copies(strategy, layer.moving_count)
            ],
        }
    return results


PLAN = {
    2: {
        "exactness": [64, 64],
        "even": list(EQUIVALENCE_CASES),
        "uneven": ["conv_masked"],
    },
    4: {
        "exactness": [64, 77, 90, 103],
        "even": ["conv"],
        "uneven": list(EQUIVALENCE_CASES),
    },
}
UNEVEN = {2: [7, 3], 4: [5, 3, 0, 2]}


def main(replicas):
    strategy = setup(replicas)
    plan = PLAN[replicas]
    results = {
        "replicas": replicas,
        "num_replicas_in_sync": strategy.num_replicas_in_sync,
        "exactness_sizes": plan["exactness"],
        "exactness": exactness(strategy, plan["exactness"]),
        "mixed_precision": mixed_precision(strategy, [32] * replicas),
        "dataset_remainder": dataset_remainder(strategy, replicas),
        "equivalence": {},
        "step_averages": step_averages(strategy, UNEVEN[replicas]),
    }
    if replicas == 4:
        results["reference_cases"] = reference_cases(strategy)
    for case in plan["even"]:
        results["equivalence"][case + "_even"] = equivalence(
            strategy, case, [6] * replicas
        )
    for case in plan["uneven"]:
        results["equivalence"][case + "_uneven"] = equivalence(
            strategy, case, UNEVEN[replicas]
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main(int(sys.argv[1]))
