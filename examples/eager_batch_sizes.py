"""Eager calls with a new batch size every time: bnlayers against the built-in.

Each round calls both layers eagerly (TensorFlow) on 20 batch sizes neither
has seen, in inference and in training mode; the rounds alternate which
layer goes first. Prints the first round (which includes bnlayers' one-time
tracing) and the median ratio over the rounds.

    TF_CPP_MIN_LOG_LEVEL=3 python examples/eager_batch_sizes.py [--rounds 5]
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import bnlayers  # noqa: E402

SHAPE = (8, 8, 16)
SIZES_PER_ROUND = 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for training in (False, True):
        layers = {
            "bnlayers": bnlayers.BatchNormalization(),
            "built-in": keras.layers.BatchNormalization(),
        }
        for layer in layers.values():
            layer.build((None,) + SHAPE)
        times = {name: [] for name in layers}
        for r in range(args.rounds):
            first = 1 + r * SIZES_PER_ROUND
            batches = [
                keras.ops.convert_to_tensor(
                    rng.standard_normal((n,) + SHAPE).astype("float32")
                )
                for n in range(first, first + SIZES_PER_ROUND)
            ]
            order = list(layers) if r % 2 == 0 else list(layers)[::-1]
            for name in order:
                start = time.perf_counter()
                for x in batches:
                    layers[name](x, training=training)
                times[name].append(time.perf_counter() - start)
        ratios = [
            a / b
            for a, b in zip(times["bnlayers"], times["built-in"], strict=True)
        ]
        print(
            f"{'training ' if training else 'inference'}: first round "
            f"{times['bnlayers'][0]:.3f} s vs {times['built-in'][0]:.3f} s "
            f"(ratio {ratios[0]:.2f}); median ratio over {args.rounds} rounds "
            f"{float(np.median(ratios)):.2f}"
        )


if __name__ == "__main__":
    main()
