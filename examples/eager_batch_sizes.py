"""Eager calls with a new batch size every time: bnlayers against the built-in.

Each round calls both layers eagerly (TensorFlow) on 20 batch sizes neither
has seen, in inference and then in training mode; the rounds alternate
which layer goes first. The first calls in a process also pay TensorFlow's
own one-time costs (each op's kernel is set up on its first use), which
would fall on whichever layer runs first; so the script runs twice, in two
fresh processes, each layer going first in one of them. It prints each
layer's first round from the process where it went first, and the median
ratio over all rounds of both processes.

    TF_CPP_MIN_LOG_LEVEL=3 python examples/eager_batch_sizes.py [--rounds 5]
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

SHAPE = (8, 8, 16)
SIZES_PER_ROUND = 20
LAYERS = ("bnlayers", "built-in")
MODES = ("inference", "training")


def measure(rounds, first):
    """{mode: {layer: [seconds per round]}}, `first` going first in round 0."""
    import keras

    import bnlayers

    rng = np.random.default_rng(0)
    results = {}
    for mode in MODES:
        layers = {
            "bnlayers": bnlayers.BatchNormalization(),
            "built-in": keras.layers.BatchNormalization(),
        }
        for layer in layers.values():
            layer.build((None,) + SHAPE)
        times = {name: [] for name in layers}
        order = [first] + [name for name in LAYERS if name != first]
        for r in range(rounds):
            start_size = 1 + r * SIZES_PER_ROUND
            batches = [
                keras.ops.convert_to_tensor(
                    rng.standard_normal((n,) + SHAPE).astype("float32")
                )
                for n in range(start_size, start_size + SIZES_PER_ROUND)
            ]
            for name in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                for x in batches:
                    layers[name](x, training=mode == "training")
                times[name].append(time.perf_counter() - start)
        results[mode] = times
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    # The child processes: which layer goes first; prints JSON.
    parser.add_argument("--first", choices=LAYERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(
            f"--rounds must be at least 1. Received: --rounds={args.rounds}"
        )
    if args.first:
        print(json.dumps(measure(args.rounds, args.first)))
        return
    runs = {}
    for first in LAYERS:
        child = subprocess.run(
            [sys.executable, __file__, "--rounds", str(args.rounds)]
            + ["--first", first],
            capture_output=True,
            text=True,
            check=True,
        )
        runs[first] = json.loads(child.stdout.splitlines()[-1])
    for mode in MODES:
        firsts = {name: runs[name][mode][name][0] for name in LAYERS}
        ratios = [
            a / b
            for run in runs.values()
            for a, b in zip(
                run[mode]["bnlayers"], run[mode]["built-in"], strict=True
            )
        ]
        print(
            f"{mode:9s}: first round (each layer going first in a fresh "
            f"process) {firsts['bnlayers']:.3f} s vs "
            f"{firsts['built-in']:.3f} s (ratio "
            f"{firsts['bnlayers'] / firsts['built-in']:.2f}); median ratio "
            f"over {len(ratios)} rounds {float(np.median(ratios)):.2f}"
        )


if __name__ == "__main__":
    main()
