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

`--model NAME` times the BN layers of a `keras.applications` model
instead (input 64x64, batch 16, each BN layer with the activation after
it merged as `bnlayers.fuse_activations` merges them): each distinct
layer's training step in each form and with the default rule, against
the built-in layer followed by the same activation, each net of the same
step with an identity layer (the cost of the step itself: a function
call, the upstream gradient, returning the gradients). The totals weigh
each layer by how many the model holds: what batch normalization and its
activations cost in a training step of that model, in each form, with
the default rule, and with the fastest form for each layer (chosen on
the same measurements, so an optimistic bound). With the model's ratio
without BN (`benchmark_models.py --fuse-activations --floor`), that bounds
what any choice among the forms can give the whole model: its ratio is at
least ``no_bn + (1 - no_bn) * total``.

`--model` runs on PyTorch too (``KERAS_BACKEND=torch``), where the fast
path has one form: bnlayers' layer against the built-in layer and
activation, layer by layer, and the same bound. (Not on JAX: there a
model's step is one XLA computation, fused across layers, so its BN
layers' costs do not add up one by one.)

Run from the repository root (TensorFlow backend):

    python examples/benchmark_forms.py           # 8 shapes, 7 rounds: minutes on 2 cores
    TF_ENABLE_ONEDNN_OPTS=1 python examples/benchmark_forms.py --out /tmp/forms-onednn
    python examples/benchmark_forms.py --model EfficientNetB0 --rounds 5  # about 2 minutes
    python examples/benchmark_forms.py --quick   # seconds: checks the script works
    KERAS_BACKEND=torch python examples/benchmark_forms.py --model EfficientNetB0 --rounds 5
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
# The backends `--model` runs on.
MODEL_BACKENDS = ("tensorflow", "torch")


def backend_forms():
    """The forms of this Keras backend's fast path that can be chosen."""
    import keras

    return FORMS if keras.backend.backend() == "tensorflow" else ()


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


def model_layers(name, size, batch):
    """The BN layers of `keras.applications` model `name` with activations
    fused, as ``[(shape, axis, activation, count)]``, largest first."""
    import collections

    import bnlayers
    from benchmark_models import application

    model = bnlayers.fuse_activations(
        bnlayers.swap_batchnorm(application(name, size), to="bnlayers")
    )
    counts = collections.Counter(
        ((batch,) + tuple(layer.input.shape[1:]), layer.axis, layer.activation)
        for layer in model.layers
        if isinstance(layer, bnlayers.BatchNormalization)
    )
    return sorted(
        ((shape, axis, act, k) for (shape, axis, act), k in counts.items()),
        key=lambda t: (-math.prod(t[0]), t[2] or ""),
    )


class Chain:
    """Layers called one after the other, as a model calls them (a
    `keras.Sequential` around them would add a call of its own, which on
    PyTorch, run eagerly, costs as much as a small layer's step)."""

    def __init__(self, layers):
        self.layers = layers

    def build(self, shape):
        for layer in self.layers:
            layer.build(shape)

    @property
    def trainable_weights(self):
        return [w for layer in self.layers for w in layer.trainable_weights]

    def __call__(self, x, training=None):
        for layer in self.layers:
            x = layer(x, training=training)
        return x


def bench_model_layer(shape, axis, activation, rounds):
    """Training-step seconds (medians) of one BN layer of a model: "step"
    (an identity layer), "built-in" (Keras' BN, then the activation), each
    form and "default", the rule in force."""
    import statistics

    import keras

    import bnlayers

    if keras.backend.backend() == "tensorflow":
        from benchmark import layer_steps
    else:
        from benchmark_backends import layer_steps

    def builtin():
        layers = [keras.layers.BatchNormalization(axis=axis)]
        if activation is not None:
            layers.append(keras.layers.Activation(activation))
        return Chain(layers)

    contenders = {
        "step": layer_steps(keras.layers.Identity(), shape, 0)[0],
        "built-in": layer_steps(builtin(), shape, 0)[0],
    }
    # (The rule applies on TensorFlow only; elsewhere "default" is the one form.)
    for form in backend_forms() + ("default",):
        previous = bnlayers.set_form_rule(None if form == "default" else form)
        try:
            layer = bnlayers.BatchNormalization(
                axis=axis, activation=activation
            )
            train = layer_steps(layer, shape, 0)[0]
            train()  # traced under this form's rule
        finally:
            bnlayers.set_form_rule(previous)
        contenders[form] = train
    wall, _ = interleaved(contenders, rounds)
    return {name: statistics.median(times) for name, times in wall.items()}


def bench_model(name, size, batch, rounds, last=None):
    """Rows of `bench_model_layer` for each distinct BN layer of `name` (the
    `last` smallest only, where given), and the totals (milliseconds per
    training step, net of "step")."""
    everything = model_layers(name, size, batch)
    layers = everything if last is None else everything[-last:]
    rows = []
    contenders = ("built-in",) + backend_forms() + ("default",)
    totals = dict.fromkeys(contenders + ("best",), 0.0)
    for shape, axis, activation, count in layers:
        seconds = bench_model_layer(shape, axis, activation, rounds)
        net = {c: 1e3 * (seconds[c] - seconds["step"]) for c in contenders}
        net["best"] = min(net[f] for f in backend_forms() + ("default",))
        for c in totals:
            totals[c] += count * net[c]
        rows.append(
            {
                "shape": list(shape),
                "activation": activation,
                "count": count,
                "step_ms": 1e3 * seconds["step"],
                "net_ms": net,
            }
        )
        print(f"{count} x {shape} {activation}: {net}")
    ratios = {c: totals[c] / totals["built-in"] for c in totals}
    return {
        "bn_layers": sum(k for *_, k in everything),
        "with_activation": sum(k for *_, a, k in everything if a is not None),
        "rows": rows,
        "total_ms": totals,
        "total_ratio": ratios,
    }


def heading(report):
    """The lines on the machine, the load and the command that open a report."""
    onednn = report["onednn"]
    kernels = (
        ""
        if onednn is None
        else f"; oneDNN's kernels {'on' if onednn else 'off'}"
    )
    return [
        f"{report['machine']}{kernels}; {report['rounds']} interleaved "
        f"rounds, medians; load average {report['load_before']} before, "
        f"{report['load_after']} after.",
        f"Command: `{report['command']}`",
    ]


def markdown_model(report):
    columns = ("built-in",) + tuple(report["forms"]) + ("default", "best")
    lines = heading(report) + [
        "",
        f"{report['model']}'s BN layers (input {report['size']}x{report['size']}, "
        f"batch {report['batch']}), training step net of the step itself, "
        "milliseconds (ratio to the built-in layer and activation):",
        "",
        "| layers | shape | activation | step itself | "
        + " | ".join(columns)
        + " |",
        "|---:|---|---|---:|" + "---:|" * len(columns),
    ]

    def cells(ms, builtin):
        return " | ".join(
            f"{ms[c]:.3f} ({ms[c] / builtin:.2f})"
            if c != "built-in"
            else f"{ms[c]:.3f}"
            for c in columns
        )

    for r in report["rows"]:
        lines.append(
            f"| {r['count']} | {'x'.join(map(str, r['shape']))} | "
            f"{r['activation'] or '-'} | {r['step_ms']:.3f} | "
            + cells(r["net_ms"], r["net_ms"]["built-in"])
            + " |"
        )
    total = report["total_ms"]
    lines.append(
        f"| {sum(r['count'] for r in report['rows'])} | all, weighted | | | "
        + cells(total, total["built-in"])
        + " |"
    )
    return "\n".join(lines) + "\n"


def markdown(report):
    lines = heading(report) + [
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
        "--model",
        metavar="NAME",
        help="time the BN layers (activations fused) of this "
        "keras.applications model instead of the shapes",
    )
    parser.add_argument(
        "--out", metavar="PREFIX", help="write PREFIX.md and PREFIX.json"
    )
    args = parser.parse_args(argv)
    import keras

    backend = keras.backend.backend()
    if args.model is None and backend != "tensorflow":
        raise SystemExit(
            "The forms are TensorFlow's: run with KERAS_BACKEND=tensorflow "
            "(or time a model's layers with --model). "
            f"Received: KERAS_BACKEND={backend!r}"
        )
    if backend not in MODEL_BACKENDS:
        raise SystemExit(
            "`--model` runs on TensorFlow and PyTorch (a JAX model's step is "
            "one XLA computation, fused across its layers). "
            f"Received: KERAS_BACKEND={backend!r}"
        )
    import bnlayers

    shapes = QUICK_SHAPES if args.quick else SHAPES
    rounds = 1 if args.quick else args.rounds
    rule = bnlayers.FormRule()
    report = {
        "machine": machine_line(),
        "backend": backend,
        "onednn": onednn_enabled() if backend == "tensorflow" else None,
        "forms": list(backend_forms()),
        "rounds": rounds,
        "command": (
            "" if backend == "tensorflow" else f"KERAS_BACKEND={backend} "
        )
        + "python examples/benchmark_forms.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "load_before": load_average(),
        "rows": [],
    }
    if args.model is not None:
        if not hasattr(keras.applications, args.model):
            raise SystemExit(
                "`--model` must name a keras.applications model. "
                f"Received: --model={args.model!r}"
            )
        # With --quick: a small input and batch, the smallest layer.
        size, batch = (32, 2) if args.quick else (64, 16)
        report |= {"model": args.model, "size": size, "batch": batch}
        last = 1 if args.quick else None
        report |= bench_model(args.model, size, batch, rounds, last)
        report["load_after"] = load_average()
        publish(markdown_model(report), report, args.out)
        return report
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
