"""Each form of the TensorFlow fast path against the built-in layer, by size.

For a range of input shapes, the layer's training step (forward, backward
and the moving-average update in one tf.function) and inference step, with
bnlayers held to one form at a time (`bnlayers.set_form_rule("plain")`,
"kernel", "compiled") and with the built-in `keras.layers.BatchNormalization`,
all in one process, in interleaved rounds; each figure is the median of the
per-round ratios to the built-in (below 1 is faster). The default rule
(`bnlayers.FormRule()`) is the fastest form of each size range measured
this way; on another CPU this script shows whether it still is, and
`bnlayers.set_form_rule` takes a rule of your own.

Whether TensorFlow runs oneDNN's kernels (by default only on CPUs with
AVX-512 features; `TF_ENABLE_ONEDNN_OPTS=1` or `0` sets it) changes the
kernel's and the built-in's speed, so the report says which.

Run from the repository root (TensorFlow backend):

    python examples/benchmark_forms.py           # 8 shapes, 7 rounds: minutes on 2 cores
    TF_ENABLE_ONEDNN_OPTS=1 python examples/benchmark_forms.py --out /tmp/forms-onednn
    python examples/benchmark_forms.py --quick   # seconds: checks the script works
"""

import argparse
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The shared module beside this file, also when this file is loaded by path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import interleaved  # noqa: E402
from _common import load_average  # noqa: E402
from _common import machine_line  # noqa: E402
from _common import median_ratio  # noqa: E402
from _common import publish  # noqa: E402

SHAPES = (
    (256, 128),
    (16, 2, 2, 1280),
    (16, 4, 4, 672),
    (16, 8, 8, 256),
    (16, 16, 16, 128),
    (64, 26, 26, 32),
    (16, 32, 32, 128),
    (32, 56, 56, 64),
)
QUICK_SHAPES = ((8, 6, 6, 4),)
FORMS = ("plain", "kernel", "compiled")


def onednn_enabled():
    """Whether TensorFlow runs oneDNN's kernels in this process."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def bench_shape(shape, rounds):
    """{"train": {form: ratio}, "infer": {form: ratio}} for one shape."""
    import keras

    import bnlayers
    from benchmark import layer_steps

    contenders = {}
    train, infer, _ = layer_steps(keras.layers.BatchNormalization(), shape, 0)
    contenders["keras/train"], contenders["keras/infer"] = train, infer
    for form in FORMS:
        previous = bnlayers.set_form_rule(form)
        try:
            train, infer, _ = layer_steps(
                bnlayers.BatchNormalization(), shape, 0
            )
            train(), infer()  # traced under this form's rule
        finally:
            bnlayers.set_form_rule(previous)
        contenders[f"{form}/train"], contenders[f"{form}/infer"] = train, infer
    wall, _ = interleaved(contenders, rounds)
    return {
        step: {
            form: median_ratio(wall[f"{form}/{step}"], wall[f"keras/{step}"])
            for form in FORMS
        }
        for step in ("train", "infer")
    }


def markdown(report):
    lines = [
        f"{report['machine']}; oneDNN's kernels "
        f"{'on' if report['onednn'] else 'off'}; {report['rounds']} interleaved "
        f"rounds, medians; load average {report['load_before']} before, "
        f"{report['load_after']} after.",
        f"Command: `{report['command']}`",
        "",
        "| shape | elements | training: plain | kernel | compiled "
        "| inference: plain | kernel | compiled | default rule (training, inference) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        cells = [
            f"{r[step][form]:.2f}"
            for step in ("train", "infer")
            for form in FORMS
        ]
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['elements']:,} | "
            + " | ".join(cells)
            + f" | {r['default'][0]}, {r['default'][1]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=7, help="interleaved rounds (default 7)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="one small shape, one round"
    )
    parser.add_argument(
        "--out", metavar="PREFIX", help="write PREFIX.md and PREFIX.json"
    )
    args = parser.parse_args(argv)
    import keras

    if keras.backend.backend() != "tensorflow":
        raise SystemExit(
            "The forms are TensorFlow's: run with KERAS_BACKEND=tensorflow. "
            f"Received: KERAS_BACKEND={keras.backend.backend()!r}"
        )
    import bnlayers

    shapes = QUICK_SHAPES if args.quick else SHAPES
    rounds = 1 if args.quick else args.rounds
    rule = bnlayers.FormRule()
    report = {
        "machine": machine_line(),
        "onednn": onednn_enabled(),
        "rounds": rounds,
        "command": "python examples/benchmark_forms.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "load_before": load_average(),
        "rows": [],
    }
    for shape in shapes:
        n = math.prod(shape)
        index = rule.index(n)
        row = {
            "shape": list(shape),
            "elements": n,
            "default": [rule.training[index], rule.inference[index]],
        }
        row |= bench_shape(shape, rounds)
        report["rows"].append(row)
        print(
            f"{row['shape']}: training {row['train']}, inference {row['infer']}"
        )
    report["load_after"] = load_average()
    publish(markdown(report), report, args.out)
    return report


if __name__ == "__main__":
    main()
