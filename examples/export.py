"""From training to deployment: fold batch normalization, export, run in each runtime.

Trains the article's model for one epoch on the bundled MNIST subset (or
loads a `.keras` file), folds its batch normalization away with
`bnlayers.fold_batchnorm`, and exports the folded model three ways with
`model.export`: a SavedModel, a LiteRT flatbuffer and an ONNX file (and,
when torch is installed, an ONNX file exported from the same `.keras` file
under the PyTorch backend, in a subprocess), plus a full-integer (int8)
LiteRT model quantized after training with a
representative dataset from the training images. Each file is run in its
own runtime (`tf.saved_model.load`, `ai_edge_litert`, `onnxruntime`) and a
table compares it with the Keras model: file size, largest difference of
the predicted probabilities, time per batch (median over interleaved
rounds, and its ratio to the Keras model's `predict_on_batch`) and, for the
article's model, test accuracy.

    python examples/export.py                          # article's model, 1 epoch, bundled data
    python examples/export.py --load runs/mnist_cnn/bnlayers.keras
    python examples/export.py --model mobilenetv3small # random weights, 64x64x3 random images

`--model mobilenetv3small` builds `keras.applications.MobileNetV3Small`
(weights=None, logits out) with its batch normalization swapped for
bnlayers' and random BN weights and statistics, so that folding has
something to fold; its inputs are random images, so it has no accuracy
column, and the differences are of logits.

Needs the TensorFlow backend and the `export` extra
(`pip install -e ".[export]"`). Files go to `--out` (default runs/export).
Exit status: 0 on success, 2 for a bad argument or a missing runtime, 1
when an export fails or an exported model disagrees with the Keras model
by more than `--max-diff`.
"""

import argparse
import os
import pathlib
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

# The shared module beside this file, also when this file is loaded by path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
RUNTIMES = {
    "onnxruntime": "onnxruntime",
    "ai_edge_litert": "ai-edge-litert",
    "tf2onnx": "tf2onnx",
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", choices=("article", "mobilenetv3small"), default="article"
    )
    parser.add_argument(
        "--load",
        type=pathlib.Path,
        help="a .keras file to load instead of training",
    )
    parser.add_argument(
        "--epochs", type=int, default=1, help="training epochs (article model)"
    )
    parser.add_argument(
        "--batch", type=int, default=128, help="batch size for the timings"
    )
    parser.add_argument(
        "--rounds", type=int, default=15, help="interleaved timing rounds"
    )
    parser.add_argument(
        "--representative",
        type=int,
        default=200,
        help="images in the int8 representative dataset",
    )
    parser.add_argument(
        "--max-diff",
        type=float,
        default=1e-4,
        help="largest difference a float export may show before exit status 1",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("runs/export")
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "batch", "rounds", "representative"):
        if getattr(args, name) < 1:
            parser.error(
                f"--{name} must be >= 1. Received: {name}={getattr(args, name)}"
            )
    if args.load is not None and not args.load.is_file():
        parser.error(
            f"--load must be an existing .keras file. Received: load={args.load}"
        )
    return args


def article_model(keras, bnlayers, args, x_train, y_train):
    if args.load is not None:
        return keras.saving.load_model(args.load)
    keras.utils.set_random_seed(0)
    model = _common.article_model(bnlayers.BatchNormalization())
    model.compile(
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=64, verbose=2)
    return model


def mobilenet(keras, bnlayers, args):
    if args.load is not None:
        return keras.saving.load_model(args.load)
    keras.utils.set_random_seed(0)
    # Logits rather than probabilities: with random weights the softmax over
    # 1000 classes is nearly flat and would hide any difference.
    base = keras.applications.MobileNetV3Small(
        input_shape=(64, 64, 3), weights=None, classifier_activation=None
    )
    model = bnlayers.swap_batchnorm(base, to="bnlayers")
    rng = np.random.default_rng(0)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, bnlayers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.1, n).astype("float32"))
            layer.moving_mean.assign(rng.normal(0.0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(
                rng.uniform(0.5, 1.5, n).astype("float32")
            )
    return model


def size_of(path):
    path = pathlib.Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def litert_runner(path, batch):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], [batch, *inp["shape"][1:]])
    interpreter.allocate_tensors()
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]

    def run(x):
        if np.issubdtype(inp["dtype"], np.integer):
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / in_scale + in_zero), info.min, info.max)
        interpreter.set_tensor(inp["index"], x.astype(inp["dtype"]))
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])
        if np.issubdtype(out["dtype"], np.integer):
            y = (y.astype("float32") - out_zero) * out_scale
        return y

    return run


TORCH_EXPORT = """
import sys
import keras
import numpy as np
import bnlayers  # registers the layers the .keras file names
model = keras.saving.load_model(sys.argv[1])
model.predict(np.zeros((1, *model.input_shape[1:]), "float32"), verbose=0)
model.export(sys.argv[2], format="onnx", verbose=False)
"""


def export_onnx_with_torch(keras_path, onnx_path, bnlayers):
    """The same .keras file exported under the PyTorch backend (torch.onnx), in
    a subprocess: a process has one Keras backend. False if torch is missing."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("torch") is None:
        return False
    root = str(pathlib.Path(bnlayers.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_EXPORT, str(keras_path), str(onnx_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            "the ONNX export under the PyTorch backend failed:\n"
            + proc.stderr[-3000:]
        )
    return True


def predict_all(run, x, batch):
    """`run` over `x` in batches of `batch`, the last one padded (LiteRT's shape is fixed)."""
    outputs = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        padded = np.concatenate(
            [chunk, np.zeros((batch - len(chunk), *x.shape[1:]), x.dtype)]
        )
        outputs.append(np.asarray(run(padded))[: len(chunk)])
    return np.concatenate(outputs)


def missing_runtimes():
    """The export extra's packages that are not installed."""
    missing = []
    for module, package in RUNTIMES.items():
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    return missing


def export_all(model, folded, out, x_train, args, bnlayers):
    """Every file this script writes: {kind: path}; the torch export may be absent."""
    import tensorflow as tf

    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "keras": out / "model.keras",
        "folded": out / "folded.keras",
        "savedmodel": out / "folded_savedmodel",
        "litert": out / "folded.tflite",
        "onnx": out / "folded.onnx",
        "int8": out / "folded_int8.tflite",
    }
    model.save(paths["keras"])
    folded.save(paths["folded"])
    folded.export(
        str(paths["savedmodel"]), format="tf_saved_model", verbose=False
    )
    folded.export(str(paths["litert"]), format="litert", verbose=False)
    folded.export(str(paths["onnx"]), format="onnx", verbose=False)
    onnx_torch = out / "folded_torch.onnx"
    if export_onnx_with_torch(paths["folded"], onnx_torch, bnlayers):
        paths["onnx_torch"] = onnx_torch

    def representative():
        for i in range(min(args.representative, len(x_train))):
            yield [x_train[i : i + 1]]

    folded.export(
        str(paths["int8"]),
        format="litert",
        verbose=False,
        optimizations=[tf.lite.Optimize.DEFAULT],
        representative_dataset=representative,
        target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
        inference_input_type=tf.int8,
        inference_output_type=tf.int8,
    )
    return paths


def runners(model, folded, paths, batch):
    """{runtime: (file, predict function)}, the Keras model first."""
    import onnxruntime
    import tensorflow as tf

    loaded = tf.saved_model.load(str(paths["savedmodel"]))

    def onnx_runner(path):
        session = onnxruntime.InferenceSession(str(path))
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]

    found = {
        "Keras (bnlayers BN)": (
            paths["keras"],
            lambda x: model.predict_on_batch(x),
        ),
        "Keras, folded": (
            paths["folded"],
            lambda x: folded.predict_on_batch(x),
        ),
        "SavedModel (tf.saved_model)": (
            paths["savedmodel"],
            lambda x: loaded.serve(x).numpy(),
        ),
        "LiteRT (ai_edge_litert)": (
            paths["litert"],
            litert_runner(paths["litert"], batch),
        ),
        "ONNX via tf2onnx (onnxruntime)": (
            paths["onnx"],
            onnx_runner(paths["onnx"]),
        ),
        "LiteRT int8 (ai_edge_litert)": (
            paths["int8"],
            litert_runner(paths["int8"], batch),
        ),
    }
    if "onnx_torch" in paths:
        found["ONNX via torch.onnx (onnxruntime)"] = (
            paths["onnx_torch"],
            onnx_runner(paths["onnx_torch"]),
        )
    else:
        print(
            "torch is not installed: no ONNX export from the PyTorch backend",
            file=sys.stderr,
        )
    return found


def measure(found, x_test, y_test, args):
    """Per runtime: file size, largest difference from Keras, accuracy, times."""
    b = args.batch
    reference = predict_all(found["Keras (bnlayers BN)"][1], x_test, b)
    results = {}
    for name, (path, run) in found.items():
        predictions = predict_all(run, x_test, b)
        accuracy = (
            None
            if y_test is None
            else float(np.mean(predictions.argmax(-1) == y_test))
        )
        results[name] = {
            "size": size_of(path),
            "diff": float(np.abs(predictions - reference).max()),
            "accuracy": accuracy,
            "times": [],
        }

    # Interleaved rounds: each runtime runs one batch per round, in turn
    # (they have all run the test set above: no warm-up).
    batch_x = x_test[:b]
    calls = {
        name: (lambda run=run: run(batch_x)) for name, (_, run) in found.items()
    }
    wall, _ = _common.interleaved(calls, args.rounds, min_block=0, warmup=0)
    for name, times in wall.items():
        results[name]["times"] = times
    return results, float(np.abs(reference).max())


def print_table(results, largest, n_test, has_labels, args):
    keras_time = statistics.median(results["Keras (bnlayers BN)"]["times"])
    title = (
        f"article's model, {args.epochs} epoch(s)"
        if args.model == "article"
        else "MobileNetV3Small, 64x64x3"
    )
    if args.load is not None:
        title = f"{args.load}"
    print(
        f"\n{title}; {n_test} test inputs, batches of {args.batch}, "
        f"{args.rounds} interleaved rounds"
    )
    header = "| model / runtime | file size | max abs diff vs Keras | ms per batch | vs Keras |"
    rule = "|---|---:|---:|---:|---:|"
    if has_labels:
        header += " test accuracy |"
        rule += "---:|"
    print(header)
    print(rule)
    for name, r in results.items():
        t = statistics.median(r["times"])
        row = (
            f"| {name} | {r['size'] / 1e6:.2f} MB | {r['diff']:.1e} | {t * 1e3:.2f} "
            f"| {t / keras_time:.2f}x |"
        )
        if has_labels:
            row += f" {r['accuracy']:.4f} |"
        print(row)
    print(f"(the Keras model's outputs reach {largest:.2g} in absolute value)")


def main(argv=None):
    args = parse_args(argv)
    missing = missing_runtimes()
    if missing:
        print(
            f"needs the export extra (missing: {', '.join(missing)}): "
            'pip install -e ".[export]"',
            file=sys.stderr,
        )
        return 2

    import logging

    import keras

    # tf2onnx logs a traceback when its optional transpose optimization
    # meets a scalar addition (MobileNetV3's hard-swish, with Keras' own
    # BatchNormalization as well) and converts without that optimization.
    logging.getLogger("tf2onnx.optimizer").setLevel(logging.ERROR)

    import bnlayers

    if keras.backend.backend() != "tensorflow":
        print(
            f"needs the TensorFlow backend; KERAS_BACKEND={keras.backend.backend()}",
            file=sys.stderr,
        )
        return 2

    rng = np.random.default_rng(1)
    if args.model == "article":
        x_train, y_train, x_test, y_test = _common.load_bundled()
        model = article_model(keras, bnlayers, args, x_train, y_train)
    else:
        model = mobilenet(keras, bnlayers, args)
        x_train = rng.uniform(0, 255, (args.representative, 64, 64, 3)).astype(
            "float32"
        )
        x_test = rng.uniform(0, 255, (4 * args.batch, 64, 64, 3)).astype(
            "float32"
        )
        y_test = None
    folded = bnlayers.fold_batchnorm(model)
    # Export needs a model that has been called.
    folded.predict_on_batch(x_test[:1])

    paths = export_all(model, folded, args.out, x_train, args, bnlayers)
    found = runners(model, folded, paths, args.batch)
    results, largest = measure(found, x_test, y_test, args)
    print_table(results, largest, len(x_test), y_test is not None, args)
    bad = [
        name
        for name, r in results.items()
        if "int8" not in name and r["diff"] > args.max_diff
    ]
    if bad:
        print(
            f"exports differ from the Keras model by more than --max-diff={args.max_diff}: "
            f"{', '.join(bad)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
