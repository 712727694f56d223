"""The figures behind the README's `tools` section, measured in one run.

1. swap: agreement of a keras.applications MobileNetV2 (weights=None,
   random BN statistics) with its copy swapped to bnlayers.
2. fold: agreement of folded models with the originals, and `predict`
   throughput before and after folding on a stack of Conv -> BN -> ReLU
   blocks (same process, interleaved rounds, medians, ratio).
3. recalibrate: the article's model after one epoch on the bundled MNIST
   subset, test loss and accuracy before and after recalibration.

Run from the repository root:

    python examples/tools_benchmark.py            # everything (a few minutes on 2 cores)
    python examples/tools_benchmark.py --only fold --rounds 21
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import statistics
import sys
import time

import keras
import numpy as np

import bnlayers

# The shared module beside this file, also when this file is loaded by path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import article_model  # noqa: E402
from _common import interleaved  # noqa: E402
from _common import load_bundled  # noqa: E402
from _common import randomize_batchnorm  # noqa: E402


def agreement(model, other, x):
    """Largest |difference| of the inference outputs, absolute and relative to the largest."""
    ref = model.predict(x, verbose=0)
    out = other.predict(x, verbose=0)
    diff = float(np.max(np.abs(out - ref)))
    return diff, diff / float(np.max(np.abs(ref)))


def swap_figures():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3),
        alpha=0.5,
        weights=None,
        classes=10,
        classifier_activation=None,
    )
    randomize_batchnorm(model, seed=0)
    x = np.random.default_rng(0).normal(size=(64, 96, 96, 3)).astype("float32")
    swapped = bnlayers.swap_batchnorm(model, to="bnlayers")
    count = sum(
        isinstance(layer, bnlayers.BatchNormalization)
        for layer in swapped.layers
    )
    diff, rel = agreement(model, swapped, x)
    print(
        f"swap  MobileNetV2(96x96, alpha=0.5, weights=None): {count} BN layers -> bnlayers"
    )
    print(f"      logits max |diff| {diff:.2e} ({rel:.2e} of max |logit|)")
    back = bnlayers.swap_batchnorm(swapped, to="keras")
    diff, rel = agreement(model, back, x)
    print(f"      and back to keras: max |diff| {diff:.2e}")
    folded = bnlayers.fold_batchnorm(model)
    diff, rel = agreement(model, folded, x)
    print(
        f"fold  the same MobileNetV2: max |diff| {diff:.2e} ({rel:.2e} of max |logit|)"
    )


def conv_stack(bn, blocks=6, width=32):
    layers = [keras.Input((32, 32, 3))]
    for i in range(blocks):
        layers += [
            keras.layers.Conv2D(width, 3, padding="same", use_bias=False),
            bn(),
            keras.layers.ReLU(),
        ]
        if i % 2 == 1:
            layers.append(keras.layers.MaxPooling2D())
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    return keras.Sequential(layers)


def mobilenet(bn):
    model = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3),
        alpha=0.5,
        weights=None,
        classes=10,
        classifier_activation=None,
    )
    if bn is bnlayers.BatchNormalization:
        model = bnlayers.swap_batchnorm(model, to="bnlayers")
    return model


def fold_speed(rounds):
    """predict time of each original and of the folded model, interleaved."""
    cases = [
        (
            "conv stack: 6 x (Conv2D 32, 3x3 -> BN -> ReLU), 32x32x3",
            conv_stack,
            512,
        ),
        (
            "MobileNetV2 96x96, alpha 0.5 (52 Conv/DepthwiseConv -> BN)",
            mobilenet,
            128,
        ),
    ]
    for title, build, n in cases:
        x = np.random.default_rng(1).normal(
            size=(n,) + build(keras.layers.BatchNormalization).input_shape[1:]
        )
        x = x.astype("float32")
        models = {}
        for bn in (
            keras.layers.BatchNormalization,
            bnlayers.BatchNormalization,
        ):
            keras.utils.set_random_seed(1)
            model = build(bn)
            randomize_batchnorm(model, seed=1)
            models[f"{bn.__module__.split('.')[0]} BN"] = model
        original = models["keras BN"]
        models["folded"] = bnlayers.fold_batchnorm(original)
        diff, rel = agreement(original, models["folded"], x)
        # One predict() over all of x per call, long enough to need no blocks of calls.
        predict = {
            name: (lambda m=model, x=x: m.predict(x, batch_size=64, verbose=0))
            for name, model in models.items()
        }
        wall, cpu = interleaved(predict, rounds, min_block=0, warmup=1)
        names = list(models)
        print(
            f"fold  {title}; predict {n} images, batch 64, {rounds} interleaved rounds"
        )
        print(
            f"      agreement: max |diff| {diff:.2e} ({rel:.2e} of max |output|)"
        )
        folded_wall = statistics.median(wall["folded"])
        folded_cpu = statistics.median(cpu["folded"])
        for name in names:
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            line = (
                f"      {name:<12} median {w * 1e3:7.1f} ms wall ({n / w:5.0f} images/s), "
                f"{c * 1e3:7.1f} ms CPU"
            )
            if name != "folded":
                # On a shared machine wall time also measures the other
                # processes; this process's CPU time much less so.
                line += f"  -> folded: {w / folded_wall:.2f}x wall, {c / folded_cpu:.2f}x CPU"
            print(line)


def recalibration_figures():
    x_train, y_train, x_test, y_test = load_bundled()
    for bn in (keras.layers.BatchNormalization, bnlayers.BatchNormalization):
        keras.utils.set_random_seed(1)
        model = article_model(bn())
        model.compile(
            optimizer="adam",
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        model.fit(x_train, y_train, epochs=1, batch_size=64, verbose=0)
        loss0, acc0 = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
        folded = bnlayers.fold_batchnorm(model)
        diff, rel = agreement(model, folded, x_test)
        start = time.perf_counter()
        bnlayers.recalibrate(model, x_train, batch_size=64)
        seconds = time.perf_counter() - start
        loss1, acc1 = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
        name = f"{bn.__module__.split('.')[0]}.BatchNormalization"
        print(
            f"recalibrate  article model with {name}, 1 epoch (125 steps of 64) on 8,000 digits:"
        )
        print(
            f"      test loss {loss0:.3f} -> {loss1:.3f}, "
            f"accuracy {acc0:.2%} -> {acc1:.2%} ({seconds:.1f} s)"
        )
        print(
            "fold  this model (BN carried through max pooling into the Dense): "
            f"softmax max |diff| {diff:.2e}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["swap", "fold", "recalibrate"])
    parser.add_argument(
        "--rounds",
        type=int,
        default=15,
        help="interleaved timing rounds (default 15)",
    )
    args = parser.parse_args()
    if args.only in (None, "swap"):
        swap_figures()
    if args.only in (None, "fold"):
        fold_speed(args.rounds)
    if args.only in (None, "recalibrate"):
        recalibration_figures()


if __name__ == "__main__":
    main()
