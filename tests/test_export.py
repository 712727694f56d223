"""Exported models run in their own runtimes and predict what the Keras model predicts.

The article's model with `bnlayers.BatchNormalization`, as it is and after
`bnlayers.fold_batchnorm`, goes through `model.export` to a SavedModel
(`tf.saved_model.load`), LiteRT (`ai_edge_litert`) and ONNX (`onnxruntime`;
exported by tf2onnx on TensorFlow, by `torch.onnx` on PyTorch), and a
full-integer LiteRT model is checked for its test accuracy. The runtimes
come with the `export` extra; without it the tests are skipped.
"""

import keras
import numpy as np
import pytest

import bnlayers
from article import article_model
from backend_ops import BACKEND

EXTRA = 'the export extra is not installed (pip install -e ".[export]")'

pytestmark = pytest.mark.backends(
    "tensorflow",
    "torch",
    reason="Keras exports ONNX through TensorFlow or torch.onnx",
)


def _runtime(module):
    return pytest.importorskip(module, reason=f"{module} missing: {EXTRA}")


@pytest.fixture(scope="module")
def inputs(mnist_subset):
    return mnist_subset[2][:64]


@pytest.fixture(
    scope="module",
    params=["unfolded", "folded", "activation", "activation-folded"],
)
def model(request, inputs):
    """The article's model, random weights and random BN statistics (so that
    neither BN nor its folding is an identity), as it is or folded; or with
    a fused activation in its BN layer."""
    keras.utils.set_random_seed(0)
    activation = "silu" if request.param.startswith("activation") else None
    original = article_model(bnlayers.BatchNormalization(activation=activation))
    bn = original.layers[1]
    rng = np.random.default_rng(0)
    bn.set_weights(
        [
            rng.uniform(0.5, 1.5, 32).astype("float32"),
            rng.normal(0.0, 0.1, 32).astype("float32"),
            rng.uniform(0.0, 0.2, 32).astype("float32"),
            rng.uniform(0.005, 0.02, 32).astype("float32"),
        ]
    )
    if request.param in ("unfolded", "activation"):
        return original
    return bnlayers.fold_batchnorm(original)


def _keras_predictions(model, x):
    return np.asarray(model.predict(x, verbose=0))


def _litert_predictions(path, x):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    if np.issubdtype(inp["dtype"], np.integer):
        scale, zero = inp["quantization"]
        info = np.iinfo(inp["dtype"])
        x = np.clip(np.round(x / scale + zero), info.min, info.max)
    interpreter.set_tensor(inp["index"], x.astype(inp["dtype"]))
    interpreter.invoke()
    y = interpreter.get_tensor(out["index"])
    if np.issubdtype(out["dtype"], np.integer):
        scale, zero = out["quantization"]
        y = (y.astype("float32") - zero) * scale
    return y


def test_onnx_runs_in_onnxruntime(model, inputs, tmp_path):
    ort = _runtime("onnxruntime")
    _runtime("onnx")
    if BACKEND == "tensorflow":
        _runtime("tf2onnx")
    expected = _keras_predictions(model, inputs)
    path = tmp_path / "model.onnx"
    model.export(str(path), format="onnx", verbose=False)
    session = ort.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: inputs})[0]
    # Measured: largest difference 4.6e-7 unfolded and 5.4e-7 folded on
    # TensorFlow (tf2onnx), 3.9e-7 and 4.5e-7 on torch (torch.onnx); with
    # the fused activation 1.8e-7 and 1.5e-7 on TensorFlow, 8.3e-7 and
    # 8.0e-7 on torch.
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-6)


@pytest.mark.backends(
    "tensorflow", reason="SavedModel export traces the model with TensorFlow"
)
def test_saved_model_runs_in_tensorflow(model, inputs, tmp_path):
    import tensorflow as tf

    path = tmp_path / "saved_model"
    model.export(str(path), format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(str(path))
    got = loaded.serve(inputs).numpy()
    # Measured: largest difference 2.7e-7 unfolded (sums in another order
    # than predict's), 0 folded; 0 and 0 with the fused activation.
    np.testing.assert_allclose(
        got, _keras_predictions(model, inputs), rtol=0, atol=3e-6
    )


@pytest.mark.backends(
    "tensorflow", reason="LiteRT export goes through a TensorFlow SavedModel"
)
def test_litert_runs_in_ai_edge_litert(model, inputs, tmp_path):
    _runtime("ai_edge_litert")
    path = tmp_path / "model.tflite"
    model.export(str(path), format="litert", verbose=False)
    got = _litert_predictions(path, inputs)
    # Measured: largest difference 2.4e-6 unfolded, 2.2e-6 folded; 1.3e-6
    # and 1.3e-6 with the fused activation.
    np.testing.assert_allclose(
        got, _keras_predictions(model, inputs), rtol=0, atol=2.5e-5
    )


@pytest.mark.backends(
    "tensorflow", reason="the fused fast path exists on TensorFlow only"
)
@pytest.mark.parametrize("rule", [None, "compiled"])
def test_inference_graphs_hold_no_nested_compiled_call(inputs, tmp_path, rule):
    """Converters cannot read a nested XLA-compiled call or a `Case`: no
    inference graph holds one (Keras' predict, a user's own `tf.function`,
    what `model.export` and `tf.saved_model.save` write), under the default
    rule and under one that always compiles. The compiled form is there, as
    ops marked for XLA, where the size is in its range or unknown (the
    export tests above run it in each runtime: a batch of 64 at the
    article's shape is in its range)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    def check(graph_def, compiled=True):
        nested = [
            f.signature.name
            for f in graph_def.library.function
            if f.attr["_XlaMustCompile"].b
        ]
        nodes = list(graph_def.node)
        for f in graph_def.library.function:
            nodes += list(f.node_def)
        ops = {n.op for n in nodes}
        marked = [n.name for n in nodes if n.attr["_XlaCompile"].b]
        assert nested == [] and not ops & {"Case", "StatelessCase"}, ops
        assert bool(marked) == compiled, ops

    def saved(path):
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
        check(proto.meta_graphs[0].graph_def)

    previous = bnlayers.set_form_rule(rule)
    try:
        model = article_model(bnlayers.BatchNormalization())
        model.predict(inputs, verbose=0)
        steps = model.predict_function._list_all_concrete_functions()
        assert steps
        for step in steps:
            # Keras traces batches of 32 here: the kernel's range, by default.
            check(step.graph.as_graph_def(), compiled=rule is not None)
        own = tf.function(lambda x: model(x, training=False))
        check(
            own.get_concrete_function(tf.constant(inputs)).graph.as_graph_def()
        )

        # What model.export writes for SavedModel (and LiteRT converts).
        model.export(
            str(tmp_path / "exported"), format="tf_saved_model", verbose=False
        )
        saved(tmp_path / "exported")
        module = tf.Module()
        module.model = model
        module.serve = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)],
        )
        tf.saved_model.save(module, str(tmp_path / "module"))
        saved(tmp_path / "module")
    finally:
        bnlayers.set_form_rule(previous)


@pytest.mark.slow
@pytest.mark.backends(
    "tensorflow", reason="LiteRT export goes through a TensorFlow SavedModel"
)
def test_int8_litert_keeps_the_float_accuracy(mnist_subset, tmp_path):
    """A full-integer LiteRT model of the folded model, trained briefly (4,000
    images, one epoch), calibrated on 100 other training images."""
    _runtime("ai_edge_litert")
    import tensorflow as tf

    x_train, y_train, x_test, y_test = mnist_subset
    keras.utils.set_random_seed(0)
    model = article_model(bnlayers.BatchNormalization())
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(
        x_train[:4000], y_train[:4000], batch_size=64, epochs=1, verbose=0
    )
    folded = bnlayers.fold_batchnorm(model)

    def representative():
        for i in range(100):
            yield [x_train[4000 + i : 4001 + i]]

    path = tmp_path / "int8.tflite"
    folded.export(
        str(path),
        format="litert",
        verbose=False,
        optimizations=[tf.lite.Optimize.DEFAULT],
        representative_dataset=representative,
        target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
        inference_input_type=tf.int8,
        inference_output_type=tf.int8,
    )
    float_accuracy = np.mean(
        _keras_predictions(model, x_test).argmax(-1) == y_test
    )
    int8_accuracy = np.mean(
        _litert_predictions(path, x_test).argmax(-1) == y_test
    )
    assert float_accuracy > 0.75  # measured 0.8255: the training did train
    # Measured: 0.8285 for int8, 0.3 points from the float model.
    assert abs(int8_accuracy - float_accuracy) <= 0.03, (
        int8_accuracy,
        float_accuracy,
    )
