"""The fused fast path on TensorFlow (`_fused.py`, `_fast_tf.py`): when it
is taken, and that it computes what the float64 reference and the built-in
layer compute (through the parity harness, `parity.py`).

The rest of the suite runs the default choice of form (plain ops for its
small tensors). Here the other two forms run on CPU too, through the
`implementation` fixture: "compiled" (the arithmetic compiled by XLA, in
every graph, by the user's rule `bnlayers.set_form_rule("compiled")`) and
"kernel" (TensorFlow's FusedBatchNormV3 everywhere outside XLA, as on a
GPU, by pretending one is visible: `_fast_tf.gpu_visible`). Layers are
built with `fused=True`, which raises unless the fast path is really taken.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import bn_reference as ref
import bnlayers
import parity
from article import article_model
from bnlayers import _fast_tf
from bnlayers import _forms
from bnlayers import _fused
from example_scripts import example_module
from example_scripts import forms_model_quick_run


@pytest.fixture(params=["compiled", "kernel"])
def implementation(request, monkeypatch):
    """The compiled form in every graph, or the kernel as on a GPU."""
    monkeypatch.setattr(
        _fast_tf, "gpu_visible", lambda: request.param == "kernel"
    )
    _rule_for_the_test(
        monkeypatch, "compiled" if request.param == "compiled" else None
    )
    return request.param


def _rule_for_the_test(monkeypatch, rule):
    """`bnlayers.set_form_rule(rule)`, undone after the test."""
    monkeypatch.setattr(_forms, "_user_rule", _forms._user_rule)
    bnlayers.set_form_rule(rule)


# ------------------------------------------------------------ eligibility


def _built(shape=(4, 5, 5, 3), **kwargs):
    layer = bnlayers.BatchNormalization(**kwargs)
    layer.build(shape)
    return layer


def test_default_layer_is_eligible_for_every_single_axis():
    for shape, axis in [
        ((8, 4), -1),
        ((4, 6, 3), 1),
        ((4, 5, 5, 3), -1),
        ((4, 3, 5, 5), 1),
        ((2, 3, 4, 5, 6), 2),
        ((2, 3, 4, 5, 6), -1),
        ((6, 4), 0),
    ]:
        layer = bnlayers.BatchNormalization(axis=axis)
        assert bnlayers.fused_eligibility(layer, shape) is None, (shape, axis)


@pytest.mark.parametrize(
    "kwargs, mask, expected",
    [
        ({"renorm": True}, None, "renorm=True"),
        ({"virtual_batch_size": 2}, None, "virtual_batch_size=2"),
        ({"axis": [1, 3]}, None, "axis=[1, 3] names several feature axes"),
        ({}, np.ones((4, 5, 5), bool), "a mask is given"),
    ],
    ids=["renorm", "virtual_batch_size", "axis-list", "mask"],
)
def test_ineligible_with_reason(kwargs, mask, expected):
    layer = _built(**kwargs)
    x = tf.zeros((4, 5, 5, 3))
    mask = None if mask is None else tf.constant(mask)
    reason = bnlayers.fused_eligibility(layer, x, mask=mask)
    assert reason is not None and expected in reason, reason


def test_synchronized_rule(monkeypatch):
    """Eligible outside a strategy; not with several replicas."""
    layer = _built(synchronized=True)
    assert bnlayers.fused_eligibility(layer, (4, 5, 5, 3)) is None

    from bnlayers import _sync

    monkeypatch.setattr(_sync, "replicas", lambda: _sync._Replicas(2, 0, None))
    reason = bnlayers.fused_eligibility(layer, (4, 5, 5, 3))
    assert "synchronized=True with 2 replicas" in reason


def test_backend_rule(monkeypatch):
    """JAX and PyTorch have fast paths of their own; a backend without one
    gets the reason."""
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    assert _fused.fast_backend() == "jax"
    assert bnlayers.fused_eligibility(_built(), (4, 5, 5, 3)) is None
    # The common rules hold there too.
    reason = bnlayers.fused_eligibility(_built(renorm=True), (4, 5, 5, 3))
    assert "renorm=True" in reason
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    assert _fused.fast_backend() == "torch"
    # Keras' NumPy backend: one with no fast path.
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    assert _fused.fast_backend() is None
    reason = bnlayers.fused_eligibility(_built(), (4, 5, 5, 3))
    assert (
        reason == "the Keras backend is 'numpy', which has no fused fast path"
    )


def test_dtype_and_epsilon_rules(implementation):
    x64 = tf.zeros((4, 5, 5, 3), tf.float64)
    small_eps = _built(epsilon=1e-5)
    if implementation == "compiled":
        assert bnlayers.fused_eligibility(_built(), x64) is None
        assert bnlayers.fused_eligibility(small_eps, (4, 5, 5, 3)) is None
    else:
        assert "inputs of dtype float64" in bnlayers.fused_eligibility(
            _built(), x64
        )
        reason = bnlayers.fused_eligibility(small_eps, (4, 5, 5, 3))
        assert "epsilon=1e-05 is below 1.001e-05" in reason
        assert (
            bnlayers.fused_eligibility(_built(epsilon=1.001e-5), (4, 5, 5, 3))
            is None
        )
    for dtype in ("float16", "bfloat16", "float32"):
        assert (
            bnlayers.fused_eligibility(_built(), tf.zeros((2, 3), dtype))
            is None
        )


def test_unknown_dimension_besides_the_batch(implementation):
    """XLA would compile for every sequence length; the kernel does not compile."""
    layer = _built(shape=(None, None, 8))
    reason = bnlayers.fused_eligibility(layer, (None, None, 8))
    if implementation == "compiled":
        assert (
            "input shape (None, None, 8) has an unknown dimension besides the batch"
            in reason
        )
    else:
        assert reason is None
    # Inside a function that XLA compiles as a whole, there is nothing to avoid.
    seen = []

    @tf.function(
        jit_compile=True, input_signature=[tf.TensorSpec((None, None, 8))]
    )
    def call(x):
        seen.append(bnlayers.fused_eligibility(layer, x))
        return layer(x, training=True)

    call(tf.ones((2, 3, 8)))
    assert seen == [None]


def test_eligibility_of_unbuilt_layer_and_specs():
    layer = bnlayers.BatchNormalization(axis=1)
    assert bnlayers.fused_eligibility(layer, (None, 3, 7)) is None
    assert (
        bnlayers.fused_eligibility(
            layer, tf.TensorSpec((None, 3, 7), tf.float32)
        )
        is None
    )
    assert (
        bnlayers.fused_eligibility(layer, keras.KerasTensor((None, 3, 7)))
        is None
    )
    assert not layer.built


def test_fused_true_raises_when_ineligible():
    layer = bnlayers.BatchNormalization(renorm=True, fused=True)
    with pytest.raises(ValueError, match=r"`fused=True`.*renorm=True"):
        layer(tf.zeros((4, 3)), training=True)
    layer = bnlayers.BatchNormalization(fused=True)
    with pytest.raises(ValueError, match=r"`fused=True`.*a mask is given"):
        layer(tf.zeros((4, 5, 3)), training=True, mask=tf.ones((4, 5), bool))


# ------------------------------------------------- the fast path is taken


def _graph_ops(fn, *args):
    graph = fn.get_concrete_function(*args).graph
    ops = {op.type for op in graph.get_operations()}
    for f in graph.as_graph_def().library.function:
        ops |= {node.op for node in f.node_def}
    return ops


def _nested_compiled(fn, *args):
    """Whether the graph of `fn` calls a function that XLA must compile."""
    library = fn.get_concrete_function(*args).graph.as_graph_def().library
    return any(f.attr["_XlaMustCompile"].b for f in library.function)


def _marked(fn, *args):
    """Whether the graph of `fn` holds ops marked for XLA where they stand."""
    graph = fn.get_concrete_function(*args).graph.as_graph_def()
    nodes = list(graph.node)
    for f in graph.library.function:
        nodes += list(f.node_def)
    return any(
        n.attr["_XlaCompile"].b for n in nodes if "_XlaCompile" in n.attr
    )


def _compiled(fn, *args):
    """Whether the graph of `fn` runs a form that XLA compiles: nested
    compiled functions (training) or marked ops (inference)."""
    return _nested_compiled(fn, *args) or _marked(fn, *args)


def _train_step(layer):
    @tf.function
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(
            y,
            [x] + [v.value for v in layer.trainable_weights],
            output_gradients=dy,
        )

    return step


def test_auto_takes_fast_path_in_graphs(implementation):
    """The traced training step holds the fast path's ops, not the reference path's."""
    x = tf.zeros((4, 5, 5, 3))
    auto = _graph_ops(_train_step(_built(fused=None)), x, x)
    reference = _graph_ops(_train_step(_built(fused=False)), x, x)
    assert "SquaredDifference" in reference or "Square" in reference
    if implementation == "kernel":
        assert {"FusedBatchNormV3", "FusedBatchNormGradV3"} <= auto
        assert "FusedBatchNormV3" not in reference
    else:
        compiled = [
            f.signature.name
            for f in _train_step(_built(fused=None))
            .get_concrete_function(x, x)
            .graph.as_graph_def()
            .library.function
            if f.attr.get("_XlaMustCompile") is not None
            and f.attr["_XlaMustCompile"].b
        ]
        assert any("forward" in name for name in compiled), compiled
        assert any("backward" in name for name in compiled), compiled


def test_auto_takes_fast_path_in_parity_grid(monkeypatch):
    """Every case of the parity grid that can take the fast path does, under `fused=None`."""
    import test_parity

    calls = []
    for name in ("training", "inference"):
        real = getattr(_fused, name)
        monkeypatch.setattr(
            _fused,
            name,
            lambda x, *args, real=real: calls.append(x.shape) or real(x, *args),
        )
    taken = 0
    for case in test_parity.CASES:
        reason = parity.fast_path_reason(case)
        expected = (
            not case.mask and not case.renorm and len(case.feature_axes) == 1
        )
        if _fused._kernel_only():  # on a GPU
            expected = expected and case.epsilon >= _fused.KERNEL_MIN_EPSILON
            expected = expected and case.policy != "float64"
        assert (reason is None) == expected, (case.name, reason)
        taken += reason is None
    assert taken >= 40, taken  # 50 of 82 cases when this was written
    # And a call really goes through the fast path.
    case = next(c for c in test_parity.CASES if c.name == "rank4-axis1")
    layer = parity.make_layer(bnlayers.BatchNormalization, case, fused=None)
    layer(tf.zeros(case.shape), training=True)
    layer(tf.zeros(case.shape), training=False)
    assert calls == [case.shape, case.shape]


def test_jit_never_uses_the_kernel_op(monkeypatch):
    """Under XLA the kernel's lowering computes a one-pass variance: the XLA
    implementation is used even when the kernel is asked for."""
    monkeypatch.setattr(_fast_tf, "gpu_visible", lambda: True)
    layer = _built(fused=True, momentum=0.0)
    step = tf.function(_train_step(layer).python_function, jit_compile=True)
    x = tf.constant(
        np.random.default_rng(0)
        .normal(1e4, 1.0, (4, 5, 5, 3))
        .astype("float32")
    )
    assert "FusedBatchNormV3" not in _graph_ops(step, x, x)
    step(x, x)
    var = x.numpy().astype(np.float64).reshape(-1, 3).var(axis=0)
    # Measured 4.7e-6; a one-pass variance would be off by about 1.
    ref.assert_close(
        layer.moving_variance.numpy(), var, 5e-5, "moving_variance", floor=0.0
    )


# ------------------------------------------------------------------ parity


# Shapes and options the fast path takes: ranks 2 to 5 with the feature axis
# first, in the middle and last, a batch of one, the affine options, momentum
# 0 and a large epsilon, a frozen layer, each policy, inside tf.function.
def _case(name, shape=(4, 5, 5, 6), momentum=0.8, **kwargs):
    return parity.Case(f"fast-{name}", shape=shape, momentum=momentum, **kwargs)


FAST_CASES = [
    _case("rank4-last"),
    _case("rank4-axis1", shape=(4, 6, 5, 5), axis=1),
    _case("rank4-axis2", shape=(3, 4, 6, 5), axis=2),
    _case("rank2", shape=(16, 6)),
    _case("rank2-batch1", shape=(1, 6)),
    _case("rank3-last", shape=(4, 7, 6)),
    _case("rank3-axis1", shape=(4, 6, 7), axis=1),
    _case("rank5-last", shape=(2, 3, 4, 5, 6)),
    _case("rank5-axis1", shape=(2, 6, 3, 4, 5), axis=1),
    _case("rank4-axis0", shape=(6, 4, 3, 2), axis=0),
    _case("no-center-no-scale", center=False, scale=False),
    _case("no-scale", shape=(4, 6, 7), axis=1, scale=False),
    _case("momentum0-eps0.1", momentum=0.0, epsilon=0.1),
    _case("frozen", trainable=False),
    _case("mixed_float16", policy="mixed_float16"),
    _case(
        "mixed_bfloat16-axis1", shape=(4, 6, 7), axis=1, policy="mixed_bfloat16"
    ),
    _case("float16-layer", policy="float16"),
    _case("float64-layer", policy="float64"),
    _case("function", execution="function"),
    _case("function-rank2", shape=(16, 6), execution="function"),
    _case(
        "function-axis1-mixed_float16",
        shape=(4, 6, 7),
        axis=1,
        execution="function",
        policy="mixed_float16",
    ),
]


@pytest.mark.parametrize("case", [parity.param(c) for c in FAST_CASES])
def test_fast_path_matches_reference_and_builtin(
    case, implementation, float32_policy_after
):
    """The fast path, forced (`fused=True`), through the parity harness.

    The default choice (on CPU plain ops for these small tensors) already
    runs the whole parity grid (test_parity.py, `fused=None`, which takes
    the fast path in every eligible case: see
    test_auto_takes_fast_path_in_parity_grid); here run the compiled form
    and the kernel. Under XLA ("jit") the form is always the compiled one.
    """
    if implementation == "kernel" and case.policy == "float64":
        pytest.skip(
            "the kernel takes no float64 (see test_dtype_and_epsilon_rules)"
        )
    parity.set_policy(case.policy)
    layer = parity.make_layer(bnlayers.BatchNormalization, case, fused=True)
    parity.check(case, layer, where=f"fused=True, {implementation}")


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_moving_variance_is_the_biased_one(implementation, batch):
    """The kernel's Bessel correction is undone: with momentum 0 the moving
    variance is the batch's biased variance (0 for a batch of one)."""
    x = (
        np.random.default_rng(batch)
        .normal(1.0, 2.0, (batch, 5))
        .astype("float32")
    )
    layer = _built(shape=(batch, 5), momentum=0.0, fused=True)
    layer(x, training=True)
    x64 = x.astype(np.float64)
    # Measured 1.3e-7 and 1.4e-7 (a Bessel-corrected variance would be off
    # by 1 / (batch - 1) of itself).
    ref.assert_close(
        layer.moving_mean.numpy(), x64.mean(axis=0), 2e-6, "moving_mean"
    )
    ref.assert_close(
        layer.moving_variance.numpy(), x64.var(axis=0), 2e-6, "moving_variance"
    )


@pytest.mark.parametrize("execution", ["eager", "function", "jit"])
def test_variance_of_large_mean_data(implementation, execution):
    """Mean 1e4, standard deviation 1: a one-pass variance would cancel."""
    x = np.random.default_rng(3).normal(1e4, 1.0, (16, 8, 3)).astype("float32")
    layer = _built(shape=x.shape, momentum=0.0, fused=True)
    call = lambda x: layer(x, training=True)  # noqa: E731
    if execution != "eager":
        call = tf.function(call, jit_compile=execution == "jit")
    y = call(tf.constant(x)).numpy()
    _, mean, var = ref.batch_moments(x, [-1])
    # Measured 3.6e-6 and 2.1e-7.
    ref.assert_close(
        layer.moving_variance.numpy(),
        var.ravel(),
        5e-5,
        "moving_variance",
        floor=0.0,
    )
    ref.assert_close(
        layer.moving_mean.numpy(), mean.ravel(), 2e-6, "moving_mean", floor=0.0
    )
    # The output inherits the rounding of the float32 mean (~1e-3 at 1e4;
    # measured 6.0e-4).
    ref.assert_close(y, (x - mean) / np.sqrt(var + 1e-3), 3e-3, "output")


def test_empty_batch_keeps_moving_statistics(implementation):
    layer = _built(shape=(None, 4), momentum=0.5, fused=True)
    before = layer.get_weights()
    x = tf.zeros((0, 4))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
    grads = tape.gradient(y, [x] + [v.value for v in layer.trainable_weights])
    assert y.shape == (0, 4)
    for g in grads[1:]:
        np.testing.assert_array_equal(g.numpy(), np.zeros(4))
    for a, b in zip(before, layer.get_weights(), strict=False):
        np.testing.assert_array_equal(a, b)


def test_unknown_batch_size_in_a_function(implementation):
    """Traced once with a None batch dimension, run at two batch sizes."""
    layer = _built(shape=(None, 6, 3), momentum=0.0, fused=True)
    call = tf.function(
        lambda x: layer(x, training=True),
        input_signature=[tf.TensorSpec((None, 6, 3))],
    )
    rng = np.random.default_rng(4)
    for batch in (5, 2):
        x = rng.normal(0.5, 2.0, (batch, 6, 3)).astype("float32")
        y = call(x).numpy()
        _, mean, var = ref.batch_moments(x, [-1])
        # Measured 9.1e-8 and 1.7e-7.
        ref.assert_close(y, (x - mean) / np.sqrt(var + 1e-3), 1e-6, "output")
        ref.assert_close(
            layer.moving_variance.numpy(), var.ravel(), 2e-6, "moving_variance"
        )


def test_article_model_fits_alike_with_jit_and_without():
    """A few fit steps of the article's model: fast path (graph and XLA) vs built-in."""
    rng = np.random.default_rng(5)
    x = rng.uniform(0.0, 1.0, (128, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, 128)

    def model(bn, jit):
        keras.utils.set_random_seed(0)
        m = article_model(bn)
        m.compile(
            optimizer="adam",
            loss="sparse_categorical_crossentropy",
            jit_compile=jit,
        )
        return m

    models = {
        "builtin": model(keras.layers.BatchNormalization(), False),
        "fused": model(bnlayers.BatchNormalization(fused=True), False),
        "fused-jit": model(bnlayers.BatchNormalization(fused=True), True),
    }
    initial = models["builtin"].get_weights()
    losses = {}
    for name, m in models.items():
        m.set_weights(initial)
        losses[name] = [
            float(m.train_on_batch(x[i : i + 32], y[i : i + 32]))
            for i in range(0, 128, 32)
        ]
    for name in ("fused", "fused-jit"):
        # Measured 1.8e-6.
        ref.assert_close(
            losses[name], losses["builtin"], 2e-5, f"losses ({name})"
        )


# --------------------------------------------------------------- benchmark


def test_benchmark_quick_run(tmp_path):
    """The benchmark script runs end to end and writes what it says (no timing asserted)."""
    benchmark = example_module("benchmark")
    out = tmp_path / "bench"
    report = benchmark.main(
        ["--quick", "--rounds", "1", "--epochs", "1", "--out", str(out)]
    )
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["machine"]["tensorflow"] == tf.__version__
    assert [(r["case"], r["step"]) for r in saved["layer"]] == [
        ("tiny", "train"),
        ("tiny", "infer"),
    ]
    for row in saved["layer"]:
        # 1,152 elements: plain ops in a graph, by the default rule.
        assert row["bnlayers_path"] == "fused (plain)", row
        assert all(v > 0 for v in row["ms"].values())
        assert all(v > 0 for v in row["passes"].values())
        assert (
            row["ratio"] > 0
            and row["ratio_cpu"] > 0
            and row["ratio_reference"] > 0
        )
    model = saved["model"]
    assert model["steps_per_epoch"] == 4 and model["epochs_timed"] == 1
    assert (
        all(v > 0 for v in model["seconds_per_epoch"].values())
        and model["ratio"] > 0
    )
    assert model["ratio_cpu"] > 0
    text = out.with_suffix(".md").read_text()
    assert "| (8, 6, 6, 4) tiny | -1 | train |" in text
    assert "keras.layers.BatchNormalization" in text


def test_forms_benchmark_quick_run(tmp_path):
    """examples/benchmark_forms.py times every form against the built-in
    and writes what it prints (the figures themselves are the
    benchmark's)."""
    forms = example_module("benchmark_forms")
    out = tmp_path / "forms"
    report = forms.main(["--quick", "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["onednn"] == forms.onednn_enabled()
    (row,) = saved["rows"]
    assert row["shape"] == [8, 6, 6, 4] and row["elements"] == 1152
    assert row["default"] == ["plain", "plain"]
    for step in ("train", "infer"):
        assert set(row[step]) == {"plain", "kernel", "compiled"}
        assert all(v > 0 for v in row[step].values())
    assert "| 8x6x6x4 | 1,152 |" in out.with_suffix(".md").read_text()


def test_forms_benchmark_model_quick_run(tmp_path):
    """examples/benchmark_forms.py --model: the BN layers of a real model
    (activations merged as fuse_activations merges them), each form's step
    net of the step itself, totals weighted by the number of layers."""
    saved = forms_model_quick_run(tmp_path)
    assert saved["forms"] == ["plain", "kernel", "compiled"]
    assert isinstance(saved["onednn"], bool)
    net = saved["rows"][0]["net_ms"]
    assert net["best"] == min(
        net[f] for f in ("plain", "kernel", "compiled", "default")
    )
    assert "oneDNN's kernels" in saved["markdown"]
    with pytest.raises(SystemExit, match="--model='NoSuchNet'"):
        example_module("benchmark_forms").main(
            ["--model", "NoSuchNet", "--quick"]
        )


def _penalty_and_gradients(layer, x, training):
    """A gradient penalty (the squared input gradient of a loss) and its
    gradients with respect to the inputs and gamma."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = tf.reduce_sum(layer(x, training=training) ** 3)
        penalty = tf.reduce_sum(inner.gradient(loss, x) ** 2)
    return [penalty] + outer.gradient(penalty, [x, layer.gamma.value])


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_second_order_gradients(implementation, training):
    """A gradient penalty differentiates the gradient: same as the reference path."""
    x = tf.constant(
        np.random.default_rng(6).normal(size=(6, 5, 4)).astype("float32")
    )
    weights = [np.full(4, v, "float32") for v in (1.3, 0.2, 0.1, 1.7)]
    results = []
    for fused in (True, False):
        layer = _built(shape=x.shape, fused=fused)
        layer.set_weights(weights)
        results.append(
            [t.numpy() for t in _penalty_and_gradients(layer, x, training)]
        )
    for a, e in zip(*results, strict=False):
        ref.assert_close(
            a, e, 1e-5, "penalty, its gradients"
        )  # measured 1.1e-6


@pytest.mark.parametrize("form", _forms.FORMS)
def test_second_order_gradients_in_graphs(monkeypatch, form):
    """A gradient penalty in a `tf.function`, each form held by the rule
    (plain ops and the compiled form are a custom gradient there, the
    kernel has its registered one): the reference path's penalty and
    gradients."""
    monkeypatch.setattr(_fast_tf, "gpu_visible", lambda: False)
    x = tf.constant(
        np.random.default_rng(6).normal(size=(6, 5, 4)).astype("float32")
    )
    weights = [np.full(4, v, "float32") for v in (1.3, 0.2, 0.1, 1.7)]
    results = []
    for fused in (True, False):
        _rule_for_the_test(monkeypatch, form)
        layer = _built(shape=x.shape, fused=fused)
        layer.set_weights(weights)

        in_graph = tf.function(_penalty_and_gradients)
        results.append([t.numpy() for t in in_graph(layer, x, True)])
    for a, e in zip(*results, strict=True):
        ref.assert_close(
            a, e, 1e-5, f"penalty, its gradients ({form})"
        )  # measured 8.8e-7


@pytest.mark.parametrize("execution", ["eager", "function"])
def test_inference_at_a_large_mean_is_exact(implementation, execution):
    """At a moving mean of 1e6 (spread 1) inference stays within float32
    rounding of float64 on both implementations (measured 2.7e-7): the mean
    is subtracted before scaling (`x * a + b` would be off by 0.06 there)."""
    rng = np.random.default_rng(7)
    mean = (1e6 + rng.uniform(-1, 1, 3)).astype("float32")
    var = rng.uniform(0.5, 2.0, 3).astype("float32")
    x = (mean + rng.normal(size=(16, 5, 5, 3))).astype("float32")
    layer = _built(shape=(16, 5, 5, 3), fused=True)
    layer.set_weights([np.ones(3), np.zeros(3), mean, var])
    call = lambda v: layer(v, training=False)  # noqa: E731
    if execution == "function":
        call = tf.function(call)
    y = call(tf.constant(x)).numpy()
    expected = (x.astype("float64") - mean) / np.sqrt(
        var.astype("float64") + 1e-3
    )
    np.testing.assert_allclose(y, expected, rtol=0, atol=3e-6)


GRAPH_FORMS = {
    # (shape, axis, dtype, epsilon): the form, and what marks it in the graph
    "small": ((4, 5, 5, 3), -1, "float32", 1e-3, "plain"),
    "channels_last": ((8, 5, 5, 3), -1, "float32", 1e-3, "kernel"),
    "channels_first": ((8, 3, 5, 5), 1, "float32", 1e-3, "compiled"),
    "float64": ((8, 5, 5, 3), -1, "float64", 1e-3, "compiled"),
    "small_epsilon": ((8, 5, 5, 3), -1, "float32", 1e-6, "compiled"),
}


@pytest.mark.parametrize("case", sorted(GRAPH_FORMS))
def test_graphs_pick_the_form_by_size_axis_and_dtype(monkeypatch, case):
    """In a graph TensorFlow runs op by op, under a rule that names the
    kernel above 500 elements: plain ops for a small tensor, the kernel for
    features last in float32, where the kernel cannot take the call the
    compiled call in training. Each gives the reference path's outputs and
    gradients."""
    shape, axis, dtype, epsilon, form = GRAPH_FORMS[case]
    _rule_for_the_test(
        monkeypatch,
        _forms.FormRule((500,), ("plain", "kernel"), ("plain", "kernel")),
    )
    monkeypatch.setattr(_fast_tf, "gpu_visible", lambda: False)
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(3.0, 2.0, shape).astype(dtype))
    dy = tf.constant(rng.normal(size=shape).astype(dtype))
    results = {}
    for fused in (None, False):
        layer = bnlayers.BatchNormalization(
            axis=axis, epsilon=epsilon, fused=fused, dtype=dtype
        )
        layer.build(shape)
        step = _train_step(layer)
        ops = _graph_ops(step, x, dy)
        if fused is None:
            assert _compiled(step, x, dy) == (form == "compiled"), ops
            assert ("FusedBatchNormV3" in ops) == (form == "kernel"), ops
        results[fused] = [t.numpy() for t in step(x, dy)]
    for auto, reference in zip(results[None], results[False], strict=True):
        # Measured, float32: up to 3.6e-7 on the input gradients (of 1.7),
        # 1.2e-5 on beta's and gamma's (of 15 to 21: 8e-7 relative); sums in
        # other orders. float64: 2.5e-14.
        np.testing.assert_allclose(auto, reference, rtol=8e-6, atol=4e-6)


# (shape, form in inference, form in training) under the default rule with
# its breakpoints lowered to 200 elements (plain below; the compiled form in
# training from there), 500 (the kernel in inference) and 1001 (the
# compiled form in inference from there on).
SIZED_FORMS = {
    "small": ((2, 4, 4, 3), "plain", "plain"),
    "between": ((4, 5, 5, 3), "plain", "compiled"),
    "mid": ((8, 5, 5, 3), "kernel", "compiled"),
    "large": ((16, 10, 10, 3), "compiled", "compiled"),
}


def _counting_forms(monkeypatch):
    """Counters of the forms that run, raised when the graph runs a form
    (not when it is traced: `tf.cond` traces every branch)."""
    counts = {form: tf.Variable(0) for form in _forms.FORMS}
    for table in (_fast_tf._TRAINING, _fast_tf._INFERENCE):
        for form, fn in list(table.items()):

            def counted(x, params, spec, form=form, fn=fn):
                with tf.control_dependencies([counts[form].assign_add(1)]):
                    return tf.nest.map_structure(
                        tf.identity, fn(x, params, spec)
                    )

            monkeypatch.setitem(table, form, counted)
    return counts


@pytest.mark.parametrize("batch", ["known", "unknown"])
@pytest.mark.parametrize("case", list(SIZED_FORMS))
def test_forms_by_size_when_traced_and_when_run(monkeypatch, case, batch):
    """One table picks the form by size when traced and when run: plain ops
    below the first breakpoint; from it the compiled form in training, and
    in inference plain ops still, the kernel from the second and the
    compiled form from the third. With
    the batch size unknown when traced (as Keras' `fit`, `evaluate` and
    `predict` trace), inference chooses when the graph runs and training
    takes the compiled form, which takes any size (a `tf.cond` holding it
    could not be differentiated); counters raised by the forms that run
    show which one did. Either way each step's outputs, moving statistics and
    gradients are the reference path's, at a mean offset of 1e4."""
    shape, inference_form, training_form = SIZED_FORMS[case]
    default = _forms.FormRule()
    _rule_for_the_test(
        monkeypatch,
        _forms.FormRule((200, 500, 1001), default.training, default.inference),
    )
    monkeypatch.setattr(_fast_tf, "gpu_visible", lambda: False)
    counts = _counting_forms(monkeypatch)
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(1e4, 2.0, shape).astype("float32"))
    dy = tf.constant(rng.normal(size=shape).astype("float32"))
    weights = [
        rng.uniform(0.5, 2.0, 3),
        rng.normal(size=3),
        1e4 + rng.normal(size=3),
        rng.uniform(0.5, 4.0, 3),
    ]
    spec = tf.TensorSpec((None,) + shape[1:] if batch == "unknown" else shape)
    results = {}
    for fused in (None, False):
        layer = bnlayers.BatchNormalization(fused=fused, momentum=0.5)
        layer.build(shape)
        layer.set_weights(weights)

        def step(x, dy, training, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=training)
            params = [v.value for v in layer.trainable_weights]
            return [y] + tape.gradient(y, [x] + params, output_gradients=dy)

        infer = tf.function(
            lambda x, dy, step=step: step(x, dy, False),
            input_signature=[spec, spec],
        )
        train = tf.function(
            lambda x, dy, step=step: step(x, dy, True),
            input_signature=[spec, spec],
        )
        results[fused] = []
        for fn, form in ((infer, inference_form), (train, training_form)):
            ops = _graph_ops(fn, x, dy)
            if fn is train and batch == "unknown":
                # No `tf.cond` in training: the compiled form takes any size.
                form = "compiled"
            if fused is None and batch == "unknown" and fn is infer:
                assert ops & {"If", "StatelessIf"}, ops
            elif fused is None:
                assert ("FusedBatchNormV3" in ops) == (form == "kernel"), ops
                assert _compiled(fn, x, dy) == (form == "compiled"), ops
                assert not ops & {"If", "StatelessIf"}, ops
            before = {f: int(c.numpy()) for f, c in counts.items()}
            results[fused] += [t.numpy() for t in fn(x, dy)]
            ran = {f: int(c.numpy()) - before[f] for f, c in counts.items()}
            expected = {f: int(fused is None and f == form) for f in counts}
            assert ran == expected, (case, batch, form, ran)
        results[fused] += [w.numpy() for w in layer.non_trainable_weights]
    for auto, reference in zip(results[None], results[False], strict=True):
        # Measured, relative to each result's largest value: up to 1.0e-7
        # on the outputs and 8.4e-7 on gamma's gradient (sums in another
        # order); every path takes its statistics on shifted values.
        scale = np.max(np.abs(reference))
        np.testing.assert_allclose(auto, reference, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("axis", [1, -1])
def test_fit_with_a_last_partial_batch(monkeypatch, axis):
    """`fit` on data that is not a whole number of batches traces its step
    with the batch size unknown; training of unknown size then takes the
    compiled form (here at 150 elements: the rule's first breakpoint
    lowered to 50), with features on the last axis and off it, and trains
    as the built-in layer does."""
    _rule_for_the_test(
        monkeypatch,
        _forms.FormRule((50,), ("plain", "compiled"), ("plain", "compiled")),
    )
    monkeypatch.setattr(_fast_tf, "gpu_visible", lambda: False)
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 3.0, (10, 5, 5, 3)).astype("float32")
    y = rng.normal(size=(10, 2)).astype("float32")
    trained = {}
    for name, layer in (
        ("keras", keras.layers.BatchNormalization(axis=axis)),
        ("bnlayers", bnlayers.BatchNormalization(axis=axis)),
    ):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((5, 5, 3)), keras.layers.Dense(4)]
            + ([keras.layers.Permute((3, 1, 2))] if axis == 1 else [])
            + [layer, keras.layers.Flatten(), keras.layers.Dense(2)]
        )
        model.compile("sgd", "mse")
        history = model.fit(x, y, batch_size=4, epochs=2, verbose=0)
        trained[name] = (history.history["loss"], model.get_weights())
    # Measured: losses 1e-7 apart, weights up to 2e-7 (of 1.6).
    np.testing.assert_allclose(
        trained["bnlayers"][0], trained["keras"][0], rtol=1e-5
    )
    for ours, theirs in zip(*(trained[k][1] for k in trained), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


# ------------------------------------------------------- the rule of forms


def test_one_table_feeds_the_traced_and_the_run_time_choice():
    """`index` (size known when traced) and `runtime_index` (when run) give
    the same range at and around every breakpoint of the default rule."""
    rule = _forms.FormRule()
    sizes = [0, 1]
    for b in rule.breakpoints:
        sizes += [b - 1, b, b + 1]
    for n in sizes:
        traced = rule.index(n)
        run = int(rule.runtime_index(tf.constant(n, tf.int64)).numpy())
        assert traced == run, (rule, n, traced, run)
    sizes = (0, 98_303, 98_304, 1 << 17, 1 << 20, (1 << 20) + 1)
    assert [rule.index(n) for n in sizes] == [0, 0, 1, 2, 2, 3]
    assert [rule.training[rule.index(n)] for n in sizes] == (
        ["plain"] * 2 + ["compiled"] * 4
    )
    assert [rule.inference[rule.index(n)] for n in sizes] == (
        ["plain"] * 3 + ["kernel"] * 2 + ["compiled"]
    )


@pytest.mark.parametrize("rule", ["default", "compiled"])
def test_inference_graphs_are_convertible_under_any_rule(monkeypatch, rule):
    """Whatever the rule, size, axis or dtype, an inference graph that
    TensorFlow runs op by op calls no nested XLA-compiled function and holds
    no `Case` (neither of which converters read): the compiled form is
    ordinary ops marked for XLA, the run-time choice `tf.cond`. Training
    takes the nested compiled call."""
    monkeypatch.setattr(_fast_tf, "gpu_visible", lambda: False)
    default = _forms.FormRule()
    _rule_for_the_test(
        monkeypatch,
        _forms.FormRule((30, 50, 1000), default.training, default.inference)
        if rule == "default"
        else _forms.FormRule.always("compiled"),
    )
    for shape, axis, dtype in [
        ((8, 5, 5, 3), -1, "float32"),
        ((8, 3, 5, 5), 1, "float32"),
        ((8, 5, 5, 3), -1, "float64"),
    ]:
        layer = _built(shape=shape, axis=axis, dtype=dtype)
        fits = axis == -1 and dtype == "float32"  # the kernel takes it
        for batch in (shape[0], None):
            spec = tf.TensorSpec((batch,) + shape[1:], dtype)
            infer = tf.function(
                lambda x, layer=layer: layer(x, training=False),
                input_signature=[spec],
            )
            train = tf.function(
                lambda x, layer=layer: layer(x, training=True),
                input_signature=[spec],
            )
            x = tf.zeros(shape, dtype)
            ops = _graph_ops(infer, x)
            assert not _nested_compiled(infer, x), (shape, axis, dtype, batch)
            assert not ops & {"Case", "StatelessCase"}, ops
            if rule == "compiled":
                expected = {"kernel": False, "marked": True, "cond": False}
            elif batch is not None:
                # 600 elements: the kernel's range.
                expected = {"kernel": fits, "marked": not fits, "cond": False}
            else:
                # Every range's form, chosen when the graph runs.
                expected = {"kernel": fits, "marked": True, "cond": True}
            assert {
                "kernel": "FusedBatchNormV3" in ops,
                "marked": _marked(infer, x),
                "cond": bool(ops & {"If", "StatelessIf"}),
            } == expected, (shape, axis, dtype, batch, ops)
            # Training: the nested compiled call at 600 elements, under
            # either rule (the default's form above its first breakpoint).
            assert _nested_compiled(train, x), ops


def test_set_form_rule(monkeypatch):
    """The public switch: a form name, a rule, None for the default; the
    previous rule is returned; bad values are refused with the value."""
    monkeypatch.setattr(_fast_tf, "gpu_visible", lambda: False)
    _rule_for_the_test(monkeypatch, None)
    x = tf.zeros((4, 5, 5, 3))

    def forms_in_graph():
        layer = _built()
        fn = tf.function(lambda x: layer(x, training=True))
        ops = _graph_ops(fn, x)
        return ("kernel" if "FusedBatchNormV3" in ops else "") + (
            "compiled" if _compiled(fn, x) else ""
        ) or "plain"

    assert bnlayers.form_rule() == bnlayers.FormRule()
    assert forms_in_graph() == "plain"  # 300 elements
    assert bnlayers.set_form_rule("compiled") is None
    assert forms_in_graph() == "compiled"
    previous = bnlayers.set_form_rule(bnlayers.FormRule.always("kernel"))
    assert previous == bnlayers.FormRule.always("compiled")
    assert forms_in_graph() == "kernel"
    bnlayers.set_form_rule(None)
    assert forms_in_graph() == "plain"
    with pytest.raises(ValueError, match=r"Received: rule='xla'"):
        bnlayers.set_form_rule("xla")
    with pytest.raises(ValueError, match=r"Received: breakpoints=\(5, 2\)"):
        bnlayers.FormRule((5, 2), ("plain",) * 3, ("plain",) * 3)
    with pytest.raises(ValueError, match=r"Received: inference=\('plain',\)"):
        bnlayers.FormRule((5,), ("plain", "kernel"), ("plain",))
