"""Inference-mode accuracy against population statistics, by moving-statistics option.

Trains the article's model (Adam 1e-3, batch 64, the bundled MNIST subset)
with Keras' BatchNormalization and with bnlayers' under each way of keeping
the moving statistics, from the same initial weights on the same batches,
and after given numbers of steps compares the test accuracy in inference
mode (the moving statistics) with that of the same weights with the exact
population statistics of the training set (`bnlayers.recalibrate`).

    python examples/moving_statistics.py --steps 10 30 100 500 --seeds 3

`measure(...)` returns the rows for other code (the docs' experiment).
"""

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

import _common

# Name -> the layer's constructor arguments (None: Keras' own layer).
VARIANTS = {
    "keras": None,
    "bnlayers": {},
    "debiased": {"debias_moving_statistics": True},
    "cumulative": {"momentum": None},
}


def _layer(options):
    import keras

    import bnlayers

    if options is None:
        return keras.layers.BatchNormalization()
    return bnlayers.BatchNormalization(**options)


def _accuracy(model, x, y):
    probabilities = model.predict(x, batch_size=500, verbose=0)
    return float(np.mean(np.argmax(probabilities, axis=-1) == y))


def run_variant(options, steps, seed, data, batch_size=64):
    """`{steps: (inference-mode accuracy, population-statistics accuracy)}`."""
    import keras

    import bnlayers

    x_train, y_train, x_test, y_test = data
    keras.utils.set_random_seed(seed)
    model = _common.article_model(_layer(options))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
    )
    rng = np.random.default_rng(seed)
    order = np.concatenate(
        [
            rng.permutation(len(x_train))
            for _ in range(max(steps) * batch_size // len(x_train) + 1)
        ]
    )
    results = {}
    for step in range(1, max(steps) + 1):
        batch = order[(step - 1) * batch_size : step * batch_size]
        model.train_on_batch(x_train[batch], y_train[batch])
        if step in steps:
            moving = _accuracy(model, x_test, y_test)
            saved = model.get_weights()
            bnlayers.recalibrate(model, x_train, batch_size=1000, verbose=0)
            population = _accuracy(model, x_test, y_test)
            model.set_weights(saved)
            results[step] = (moving, population)
    return results


def measure(steps=(10, 30, 100, 500), seeds=(0,), variants=tuple(VARIANTS)):
    """Rows `(variant, steps, inference %, population %, gap in points)`,
    each a median over `seeds`, plus the per-seed figures."""
    data = _common.load_bundled()
    per_seed = {}
    for name in variants:
        for seed in seeds:
            per_seed[name, seed] = run_variant(
                VARIANTS[name], steps, seed, data
            )
    rows = []
    for name in variants:
        for step in steps:
            pairs = [per_seed[name, seed][step] for seed in seeds]
            moving = statistics.median(100 * m for m, _ in pairs)
            population = statistics.median(100 * p for _, p in pairs)
            gap = statistics.median(100 * (p - m) for m, p in pairs)
            rows.append((name, step, moving, population, gap))
    return rows, per_seed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[10, 30, 100, 500]
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="how many seeds (0, 1, ...)"
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS)
    )
    args = parser.parse_args(argv)
    import keras

    rows, per_seed = measure(args.steps, range(args.seeds), args.variants)
    print(f"backend {keras.backend.backend()}, {args.seeds} seed(s), medians")
    print(
        "| layer | steps | inference mode | population statistics | gap (points) |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, step, moving, population, gap in rows:
        print(
            f"| {name} | {step} | {moving:.1f} % | {population:.1f} % | {gap:.1f} |"
        )
    if args.seeds > 1:
        print("per seed (inference %, population %):")
        for (name, seed), results in per_seed.items():
            cells = ", ".join(
                f"{s}: {100 * m:.1f}/{100 * p:.1f}"
                for s, (m, p) in results.items()
            )
            print(f"  {name} seed {seed}: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
