"""What `fold_batchnorm` leaves in seven models, how close the folded models
predict, and whether they load where bnlayers is not installed.

The models: the article's (trained one epoch on the bundled digits, so its
BN weights are the ones training gives), and six `keras.applications`
models with `weights=None` at a small input, every BN layer given random
statistics, gamma and beta (so that folding has something to fold, and a
few scales are negative). For each model it reports the BN layers before
and after folding (trainable ones left, fixed multiply-adds left), why each
one that stayed could not be merged, and the largest |difference| of the
outputs over the largest |output|. Then each folded model is saved to
`.keras` and loaded and run in a fresh Python process in which
`import bnlayers` fails, and its outputs compared with the folded model's
here.

Run from the repository root:

    python examples/fold_models.py                  # all seven, about 3 minutes on 2 cores
    python examples/fold_models.py --models article resnet50v2 --size 32
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import collections
import logging
import pathlib
import re
import subprocess
import sys
import tempfile
import textwrap

import keras
import numpy as np

import bnlayers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import article_model  # noqa: E402
from _common import load_bundled  # noqa: E402
from _common import randomize_batchnorm  # noqa: E402

APPLICATIONS = {
    "resnet50": "ResNet50",
    "resnet50v2": "ResNet50V2",
    "densenet121": "DenseNet121",
    "mobilenetv2": "MobileNetV2",
    "mobilenetv3small": "MobileNetV3Small",
    "efficientnetb0": "EfficientNetB0",
}
MODELS = ["article", *APPLICATIONS]

# Run in the child process: bnlayers cannot be imported there.
LOADER = textwrap.dedent(
    """
    import importlib.abc, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "bnlayers" or name.startswith("bnlayers."):
                raise ImportError(f"{name} is blocked in this process")
            return None

    sys.meta_path.insert(0, Block())
    import keras, numpy as np
    folder = sys.argv[1]
    for name in sys.argv[2:]:
        model = keras.models.load_model(os.path.join(folder, name + ".keras"))
        x = np.load(os.path.join(folder, name + "_x.npy"))
        out = keras.ops.convert_to_numpy(model(x, training=False))
        np.save(os.path.join(folder, name + "_out.npy"), out)
    assert not any(m.split(".")[0] == "bnlayers" for m in sys.modules)
    print("loaded without bnlayers:", " ".join(sys.argv[2:]))
    """
)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def build(name, size, seed):
    keras.utils.set_random_seed(seed)
    if name == "article":
        x_train, y_train, x_test, _ = load_bundled()
        model = article_model(bnlayers.BatchNormalization())
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.fit(x_train, y_train, epochs=1, batch_size=64, verbose=0)
        return model, x_test[:256]
    model = getattr(keras.applications, APPLICATIONS[name])(
        input_shape=(size, size, 3),
        weights=None,
        classes=10,
        classifier_activation=None,
    )
    randomize_batchnorm(model, seed)
    x = np.random.default_rng(seed).uniform(0, 255, (8, size, size, 3))
    return model, x.astype("float32")


def count(model):
    """(trainable BN layers, fixed multiply-adds) inside `model`."""
    layers = model._flatten_layers(include_self=False)
    bn = [
        layer
        for layer in layers
        if isinstance(
            layer,
            (keras.layers.BatchNormalization, bnlayers.BatchNormalization),
        )
    ]
    fixed = [layer for layer in bn if not layer.trainable]
    return len(bn) - len(fixed), len(fixed)


def reasons(messages):
    """The reasons of the BN layers kept, names left out, with their counts."""
    found = collections.Counter()
    for message in messages:
        match = re.search(r"kept as a multiply-add: (.*)$", message)
        if match:
            found[re.sub(r"'[^']*'", "…", match.group(1))] += 1
    return found


def infer(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument(
        "--size", type=int, default=32, help="input size (default 32)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    handler = Records()
    logger = logging.getLogger("bnlayers")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="fold_models_"))
    backend = keras.backend.backend()
    print(
        f"keras {keras.__version__}, {backend}, applications at {args.size}x{args.size}"
    )
    print(
        "model | BN layers | left after folding: trainable BN, multiply-adds "
        "| max |diff| / max |output|"
    )
    outputs, kept = {}, {}
    for name in args.models:
        model, x = build(name, args.size, args.seed)
        if name == "article":
            from bnlayers.tools._common import inference_scale_offset

            scale = inference_scale_offset(model.layers[1])[0]
            print(
                f"article: trained BN scales from {scale.min():.3f} to {scale.max():.3f}"
            )
        handler.messages.clear()
        folded = bnlayers.fold_batchnorm(model)
        before = count(model)[0]
        trainable, fixed = count(folded)
        expected = infer(folded, x)
        ref = infer(model, x)
        rel = float(np.max(np.abs(expected - ref)) / np.max(np.abs(ref)))
        print(f"{name} | {before} | {trainable}, {fixed} | {rel:.1e}")
        kept[name] = reasons(handler.messages)
        folded.save(folder / f"{name}.keras")
        np.save(folder / f"{name}_x.npy", x)
        outputs[name] = expected
    for name, found in kept.items():
        for reason, n in found.most_common():
            print(f"  {name}: {n} kept: {reason}")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), *args.models],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if result.returncode != 0:
        sys.exit(f"loading without bnlayers failed:\n{result.stderr[-3000:]}")
    print(result.stdout.strip())
    for name in args.models:
        out = np.load(folder / f"{name}_out.npy")
        diff = float(np.max(np.abs(out - outputs[name])))
        print(
            f"  {name}: reloaded without bnlayers, max |diff| from the folded model {diff:.1e}"
        )


if __name__ == "__main__":
    main()
