"""The fused fast path of `BatchNormalization` on TensorFlow, in three forms.

Which form a call takes is `choose`'s answer (the rule is `_forms`'s):

- ``"kernel"``: TensorFlow's fused batch-norm kernel, `FusedBatchNormV3`,
  differentiated by its registered `FusedBatchNormGradV3`; on a GPU this is
  cuDNN's batch norm. Never under XLA (XLA lowers this op with a one-pass
  variance, E[x^2] - E[x]^2, which cancels to nothing when the mean is
  large next to the spread: a mean of 1e4 with variance 1 came out as
  variances of -34 and 87). In training the kernel is fed ``x - s`` for
  the shift `s` of `_math.choose_shift` (the first sample of each feature)
  and `s` is added back to its mean, so its own summation never sees the
  offset of the data; it returns the unbiased (n / (n - 1)) batch
  variance, and Keras' moving variance follows the biased one, so the
  correction is undone. In inference it subtracts the mean before scaling.
- ``"compiled"``: the batch-norm arithmetic written out here in TensorFlow
  ops, compiled by XLA into a few fused loops: in training forward and
  backward (a `tf.custom_gradient`) as nested compiled functions; in
  inference the plain ops marked for XLA where they stand, so that the
  graph stays readable by converters; inlined into a function that is
  XLA-compiled as a whole (`jit_compile=True`).
- ``"plain"``: the same arithmetic as plain TensorFlow ops: in training
  in a graph the compiled form's forward and backward uncompiled, eagerly
  (and in inference) in the inputs' own layout, differentiated by autodiff.

All compute what the reference path in `_math` computes (see `_fused`).
TensorFlow is imported inside the functions, so that importing bnlayers on
another Keras backend does not import it.
"""

import functools

from keras import backend

from bnlayers import _contract
from bnlayers import _forms
from bnlayers import _geometry
from bnlayers import _math

# FusedBatchNormV3 computes in float32 (its `U` type) for these input types.
KERNEL_DTYPES = ("float16", "bfloat16", "float32")

# cuDNN rejects a smaller epsilon (CUDNN_BN_MIN_EPSILON is 1e-5; and
# tf.nn.fused_batch_norm silently raises anything smaller to this value).
KERNEL_MIN_EPSILON = 1.001e-5


def in_xla_context():
    """True while tracing a function that XLA compiles (`jit_compile=True`).

    TensorFlow has no public way to ask this; its own `tf.function` and
    control flow ask the same private function. Inside such a function the
    compiled form is inlined (no nested call), and the kernel's lowering
    would lose the variance, so the answer decides correctness, not speed.
    """
    import tensorflow as tf

    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - private module moved
        return False
    return bool(
        control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()
        )
    )


@functools.cache
def gpu_visible():
    """Whether TensorFlow sees a GPU (asked once per process)."""
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


def _parameters(x, axis, gamma, beta, dtype):
    """gamma and beta in `dtype`, ones and zeros where they are None."""
    import tensorflow as tf

    def per_feature(v, fill):
        if v is None:
            return tf.fill([tf.shape(x)[axis]], tf.constant(fill, dtype))
        return tf.cast(v, dtype)

    return per_feature(gamma, 1.0), per_feature(beta, 0.0)


def _activate(y, activation):
    """`y` through the activation named by `Spec.activation` (Keras' definitions)."""
    import tensorflow as tf

    if activation is None:
        return y
    if activation == "relu":
        return tf.nn.relu(y)
    if activation == "relu6":
        return tf.nn.relu6(y)
    if activation == "silu":
        return tf.nn.silu(y)
    if activation == "hard_silu":
        return y * tf.nn.relu6(y + 3.0) * (1.0 / 6.0)
    return tf.nn.gelu(y, approximate=False)


def _activation_backward(dy, pre, activation):
    """``dy * activation'(pre)``: the gradient at the activation's input.

    For the compiled backward, which recomputes `pre` (the affine's outputs)
    from `x` rather than storing it: XLA fuses the recomputation into the
    loops that read `x` anyway. TensorFlow's own gradient of each
    activation, so that the result is what autodiff of the layer followed
    by the activation gives (its float64 gelu gradient is 6e-9 off the
    exact derivative: the same 6e-9 here).
    """
    import tensorflow as tf

    if activation is None:
        return dy
    with tf.GradientTape() as tape:
        tape.watch(pre)
        outputs = _activate(pre, activation)
    return tape.gradient(outputs, pre, output_gradients=dy)


def training(x, params, spec):
    """`_fused.training` on TensorFlow, in the form `choose` picks.

    Returns:
        tuple: ``(y, new_moving_mean, new_moving_variance)``.
    """
    return _in_chosen_form(x, params, spec, False)


def inference(x, params, spec):
    """`_fused.inference` on TensorFlow, in the form `choose` picks.

    Returns:
        tf.Tensor: the outputs.
    """
    return _in_chosen_form(x, params, spec, True)


def choose(x, spec, inference):
    """The forms this call may take and which one it takes.

    Eagerly: plain ops (a compiled call would compile for every new input
    shape, and costs more than these few ops), or the kernel on a GPU.
    Traced inside an XLA-compiled function: the compiled call, inlined
    there. In a graph that TensorFlow runs op by op: what the rule in force
    (`_forms.form_rule`) gives for the size of `x`, with "kernel" replaced
    where the kernel cannot take the call (`_kernel_fits`).

    Returns:
        tuple: ``(forms, index)``: the candidate forms and the index of the
        one taken, an int when the size of `x` is known when traced, else
        an int32 tensor computed when the graph runs.
    """
    import tensorflow as tf

    if tf.executing_eagerly():
        return (_forms.KERNEL if gpu_visible() else _forms.PLAIN,), 0
    if in_xla_context():
        return (_forms.COMPILED,), 0
    forms, index = graph_forms(x, spec, inference)
    if index is None:
        index = _forms.form_rule(gpu_visible()).runtime_index(
            tf.size(x, out_type=tf.int64)
        )
    return forms, index


def graph_forms(x, spec, inference):
    """`choose` in a graph that TensorFlow runs op by op (`x`: anything with
    `.shape` and `.dtype`, a `tf.TensorSpec` too).

    Returns:
        tuple: ``(forms, index)``, `index` None when the size of `x` is not
        known (the choice is then made when the graph runs).
    """
    rule = _forms.form_rule(gpu_visible())
    # Where the kernel cannot take the call, the compiled form takes it.
    forms = tuple(
        _forms.COMPILED
        if form == _forms.KERNEL and not _kernel_fits(x, spec)
        else form
        for form in rule.forms(inference)
    )
    n = x.shape.num_elements()
    if n is not None:
        return forms, rule.index(n)
    if not inference and _forms.COMPILED in forms:
        # TensorFlow cannot differentiate a `tf.cond` one of whose branches
        # holds the compiled form (its gradient reads the forward's
        # statistics from inside the branch: "Could not find external tensor
        # capture"), so training of unknown size takes the compiled form,
        # which takes any size. (Plain ops and the compiled form chosen by a
        # `tf.cond` inside one custom gradient can be differentiated, but
        # measured slower in DenseNet121's `fit` on 2 CPU cores, AMD EPYC:
        # 1.00x the built-in's epoch against 0.98x, a first epoch of 117 s
        # against 100 s.)
        return (_forms.COMPILED,), 0
    if len(set(forms)) == 1:
        return forms[:1], 0
    return forms, None


def _kernel_fits(x, spec):
    """Whether the kernel takes this call: float16, bfloat16 or float32, an
    epsilon cuDNN accepts, and off a GPU features on the last axis (the
    kernel transposes any other layout on CPU)."""
    return (
        backend.standardize_dtype(x.dtype) in KERNEL_DTYPES
        and spec.epsilon >= KERNEL_MIN_EPSILON
        and (spec.axis == x.shape.rank - 1 or gpu_visible())
    )


def _in_chosen_form(x, params, spec, inference):
    """The call computed in the form `choose` picks; where that is known
    only when the graph runs, by nested `tf.cond`s, one per change of form
    along the ranges (the branch not taken costs nothing; converters read
    `tf.cond`, not `tf.switch_case`), with the variables read outside the
    branches (a variable read inside one leaves its gradient without a way
    back out of the branch)."""
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    forms, index = choose(x, spec, inference)
    table = _INFERENCE if inference else _TRAINING
    if isinstance(index, int):
        return table[forms[index]](x, params, spec)
    params = _contract.Parameters(
        *(v if v is None else tf.convert_to_tensor(v) for v in params)
    )
    starts = [i for i, f in enumerate(forms) if i == 0 or f != forms[i - 1]]

    def from_range(k):
        taken = functools.partial(table[forms[starts[k]]], x, params, spec)
        if k == len(starts) - 1:
            return taken()
        return tf.cond(index < starts[k + 1], taken, lambda: from_range(k + 1))

    return from_range(0)


def _in_statistics_dtype(x, params, spec):
    """gamma, beta (ones and zeros where None), the moving statistics and
    epsilon as tensors in the statistics dtype of `x`: the inputs of the
    plain and compiled forms."""
    import tensorflow as tf

    dtype = _math.statistics_dtype(x.dtype)
    gamma, beta = _parameters(x, spec.axis, params.gamma, params.beta, dtype)
    return (
        gamma,
        beta,
        tf.cast(params.moving_mean, dtype),
        tf.cast(params.moving_variance, dtype),
        tf.constant(spec.epsilon, dtype),
    )


def _momentum(params, spec, dtype):
    """This step's momentum in `dtype`: `params.momentum` where given (a
    per-step tensor), else `spec.momentum`."""
    import tensorflow as tf

    if params.momentum is None:
        return tf.constant(spec.momentum, dtype)
    return tf.cast(params.momentum, dtype)


def _count(x, axis, dtype):
    """Elements per feature: a constant when the shape is static."""
    import tensorflow as tf

    shape = _geometry.static_shape(x)
    if None not in shape:
        return tf.constant(_geometry.per_feature_count(shape, axis), dtype)
    return tf.cast(tf.size(x, out_type=tf.int64) // shape[axis], dtype)


# ---------------------------------------------------------------- XLA path
#
# The compiled functions see the inputs as a matrix (rows, features) when
# the features are the last axis, else as (before, features, after): XLA
# reduces merged axes fastest (measured). They take the feature axis and
# the output dtype as Python values (one trace each), the rest as tensors;
# arithmetic is in the dtype of `gamma` (the statistics dtype).


# The helpers of `_forward` and `_backward`, on inputs in the merged layout
# (`_geometry.merged_shape`); run when the functions are traced (compiled,
# or as plain ops in a graph).


def _merged(x, axis):
    import tensorflow as tf

    shape = tf.shape(x, out_type=tf.int64)
    dims = [tf.reduce_prod(shape[:axis]), shape[axis]]
    if axis < x.shape.rank - 1:
        dims.append(tf.reduce_prod(shape[axis + 1 :]))
    return tf.reshape(x, dims)


def _stats_axes(x):
    return list(_geometry.merged_reduction(x.shape.rank))


def _per_feature(v, x):
    import tensorflow as tf

    return tf.reshape(v, [1, -1] if x.shape.rank == 2 else [1, -1, 1])


def _first_sample(x):
    """Each feature's first element (`_math.choose_shift`); 0 for an empty batch."""
    import tensorflow as tf

    # A slice and a concatenation, not a reduction: XLA fuses them into
    # the loops that read the shift, where a reduction would be a loop
    # of its own.
    if x.shape.rank == 2:
        rows = tf.concat([x[:1], tf.zeros([1, tf.shape(x)[1]], x.dtype)], 0)
        return rows[0]
    rows = tf.concat(
        [x[:1, :, :1], tf.zeros([1, tf.shape(x)[1], 1], x.dtype)], 0
    )
    return rows[0, :, 0]


def _merged_count(x, dtype):
    """Elements per feature, at least 1 (an empty batch gives zeros, not NaN)."""
    import tensorflow as tf

    n = tf.size(x, out_type=tf.int64) // tf.shape(x, out_type=tf.int64)[1]
    return tf.cast(tf.maximum(n, 1), dtype)


def _updated_moving(x, *pairs, momentum):
    """The new `(moving, batch)` statistics of each pair by the Keras rule.

    In the compiled step rather than in a dozen small ops outside; an empty
    batch `x` leaves the moving statistics as they are.
    """
    import tensorflow as tf

    counted = tf.size(x) > 0
    return [
        tf.where(counted, _math.moving_average(moving, batch, momentum), moving)
        for moving, batch in pairs
    ]


def _forward(
    x,
    gamma,
    beta,
    moving_mean,
    moving_var,
    momentum,
    epsilon,
    axis,
    out_dtype,
    activation,
):
    """Outputs, the shift and residual mean, the variance, the new moving statistics."""
    import tensorflow as tf

    shape = tf.shape(x)
    x = tf.cast(_merged(x, axis), gamma.dtype)
    n = _merged_count(x, gamma.dtype)
    # Every sum is of x - shift, values of the order of the spread: the
    # offset of the data never enters the rounding (see _math).
    shift = _first_sample(x)
    d = x - _per_feature(shift, x)
    # Two passes on shifted values (_math.shifted_moments). The one-pass
    # form (both sums in one read of x) measured slower compiled: XLA's CPU
    # reductions take a materialized operand, so sum(d) and sum(d^2) cost
    # two temporaries either way.
    residual = tf.reduce_sum(d, _stats_axes(x)) / n
    centred = d - _per_feature(residual, x)
    var = tf.reduce_sum(tf.square(centred), _stats_axes(x)) / n
    y = centred * _per_feature(
        tf.math.rsqrt(var + epsilon) * gamma, x
    ) + _per_feature(beta, x)
    new_mean, new_var = _updated_moving(
        x,
        (moving_mean, shift + residual),
        (moving_var, var),
        momentum=momentum,
    )
    y = tf.reshape(tf.cast(_activate(y, activation), out_dtype), shape)
    return y, shift, residual, var, new_mean, new_var


def _backward(
    dy, x, shift, residual, var, gamma, beta, epsilon, axis, activation
):
    """The gradients `(dx, dgamma, dbeta)` of `_forward`'s outputs `y`."""
    import tensorflow as tf

    shape, dtype = tf.shape(x), x.dtype
    x = tf.cast(_merged(x, axis), gamma.dtype)
    dy = tf.cast(_merged(dy, axis), gamma.dtype)
    n = _merged_count(x, gamma.dtype)
    inv = tf.math.rsqrt(var + epsilon)
    # (x - shift) - residual, as in the forward: exact at any offset.
    centred = (x - _per_feature(shift, x)) - _per_feature(residual, x)
    if activation is not None:
        # The activation's input, recomputed from x: nothing more stored.
        pre = centred * _per_feature(inv * gamma, x) + _per_feature(beta, x)
        dy = _activation_backward(dy, pre, activation)
    dbeta = tf.reduce_sum(dy, _stats_axes(x))
    dgamma = tf.reduce_sum(dy * centred, _stats_axes(x)) * inv
    # With xhat = (x - mean) * inv and the batch statistics depending on
    # x, the derivative of gamma * xhat + beta is
    # gamma * inv * (dy - mean(dy) - xhat * mean(dy * xhat)), and
    # sum(dy * xhat) is dgamma.
    dx = _per_feature(gamma * inv, x) * (
        dy
        - _per_feature(dbeta / n, x)
        - centred * _per_feature(inv * dgamma / n, x)
    )
    return tf.reshape(tf.cast(dx, dtype), shape), dgamma, dbeta


@functools.cache
def _compiled_training():
    """`_forward` and `_backward`, XLA-compiled, traced once per input signature.

    Only graphs call them (fit(), a tf.function): there a compiled function
    is traced once for the traced shape. Eager calls take plain ops
    (`_plain_training`, `_plain_inference`) instead, which compile nothing
    for a new input shape.
    """
    import tensorflow as tf

    function = functools.partial(tf.function, jit_compile=True, autograph=False)
    return function(_forward), function(_backward)


def _hand_written_training(x, params, spec, compiled=True):
    """Training by `_forward` and `_backward` (a `tf.custom_gradient`),
    XLA-compiled (the compiled form) or as plain ops (`compiled` False)."""
    import tensorflow as tf

    gamma, beta, moving_mean, moving_var, epsilon = _in_statistics_dtype(
        x, params, spec
    )
    momentum = _momentum(params, spec, gamma.dtype)
    axis, out_dtype, activation = spec.axis, spec.out_dtype, spec.activation
    forward, backward = (
        _compiled_training() if compiled else (_forward, _backward)
    )

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        moving = (moving_mean, moving_var, momentum)
        outputs = forward(
            x, gamma, beta, *moving, epsilon, axis, out_dtype, activation
        )
        y, shift, residual, var, new_mean, new_var = outputs

        def grad(dy, dmean, dvar):
            # The moving statistics carry no gradient.
            del dmean, dvar
            return backward(
                dy,
                x,
                shift,
                residual,
                var,
                gamma,
                beta,
                epsilon,
                axis,
                activation,
            )

        return (y, new_mean, new_var), grad

    y, new_mean, new_var = normalize(x, gamma, beta)
    return y, tf.stop_gradient(new_mean), tf.stop_gradient(new_var)


def _plain_training(x, params, spec):
    """Training as plain TensorFlow ops on `x` in its own layout (autodiff
    gives the gradients): eager calls' form."""
    import tensorflow as tf

    gamma, beta, moving_mean, moving_var, epsilon = _in_statistics_dtype(
        x, params, spec
    )
    momentum = _momentum(params, spec, gamma.dtype)
    axis, out_dtype = spec.axis, spec.out_dtype
    rank = x.shape.rank
    reduction = _geometry.reduction_axes([axis], rank)
    shape = _geometry.vector_shape(rank, axis)
    gamma, beta = tf.reshape(gamma, shape), tf.reshape(beta, shape)
    x = tf.cast(x, gamma.dtype)
    if x.shape.num_elements() == 0:
        # An empty batch leaves the moving statistics as they are; gamma and
        # beta still get their (zero) gradients.
        y = _activate(x * gamma + beta, spec.activation)
        return tf.cast(y, out_dtype), moving_mean, moving_var
    # Every sum is of x - shift (the first sample of each feature, as
    # `_math.choose_shift`): the offset of the data never enters the rounding.
    shift = tf.stop_gradient(x[_geometry.first_sample(rank, axis)])
    d = x - shift
    residual = tf.reduce_mean(d, reduction, keepdims=True)
    centred = d - residual
    var = tf.reduce_mean(tf.square(centred), reduction, keepdims=True)
    # (Autodiff of relu and relu6 takes their mask from their outputs.)
    y = _activate(
        centred * (tf.math.rsqrt(var + epsilon) * gamma) + beta, spec.activation
    )
    mean = tf.stop_gradient(tf.reshape(shift + residual, [-1]))
    var = tf.stop_gradient(tf.reshape(var, [-1]))
    return (
        tf.cast(y, out_dtype),
        _math.moving_average(moving_mean, mean, momentum),
        _math.moving_average(moving_var, var, momentum),
    )


def _xla_inference(x, params, spec):
    """The compiled form in inference: plain ops, marked for XLA in place.

    The ops stay in the caller's graph (a `jit_scope`, not a nested
    compiled function), so TensorFlow compiles them into one loop when the
    graph runs, while `model.export`, `tf.saved_model.save`, tf2onnx and the
    LiteRT converter read them as the ordinary ops they are. Features off
    the last axis are seen as (before, features, after), which XLA's CPU
    loops measured faster at than broadcasting into the 4-D layout.
    Gradients, where asked for, are autodiff's, run op by op.
    """
    import tensorflow as tf

    if in_xla_context():
        # The caller is compiled as a whole already.
        return _plain_inference(x, params, spec)
    with tf.xla.experimental.jit_scope(
        compile_ops=True, separate_compiled_gradients=False
    ):
        if spec.axis == x.shape.rank - 1 or x.shape.rank <= 3:
            return _plain_inference(x, params, spec)
        merged = _merged(x, spec.axis)
        y = _plain_inference(merged, params, spec._replace(axis=1))
        return tf.reshape(y, tf.shape(x))


def _plain_inference(x, params, spec):
    """`inference` as plain ops on `x` in its own layout (autodiff gives the gradients)."""
    import tensorflow as tf

    gamma, beta, mean, var, epsilon = _in_statistics_dtype(x, params, spec)
    rank, axis = x.shape.rank, spec.axis
    if axis == rank - 1:

        def per_feature(v):
            return v

    else:
        shape = _geometry.vector_shape(rank, axis)

        def per_feature(v):
            return tf.reshape(v, shape)

    x = tf.cast(x, gamma.dtype)
    # The mean is subtracted before scaling, as everywhere (x * a + b would
    # lose digits when the mean is large next to the spread).
    scale = tf.math.rsqrt(var + epsilon) * gamma
    y = (x - per_feature(mean)) * per_feature(scale) + per_feature(beta)
    return tf.cast(_activate(y, spec.activation), spec.out_dtype)


# ------------------------------------------------------------- kernel path


def _kernel_layout(shape, axis):
    """How to present inputs of `shape` with feature `axis` to the kernel.

    Returns `(kernel_shape, data_format)`; `kernel_shape` is None when the
    inputs go in as they are. Every single feature axis fits by a reshape
    alone (no data moves): the axes before it merge into N, those after it
    into H, and the features sit last (NHWC) or second (NCHW).
    """
    rank = len(shape)
    channels = shape[axis]
    if axis == rank - 1:
        return (None if rank == 4 else [-1, 1, 1, channels]), "NHWC"
    if rank == 4 and axis == 1:
        return None, "NCHW"
    if None in shape[axis + 1 :]:
        return "dynamic", "NCHW"
    inner = 1
    for d in shape[axis + 1 :]:
        inner *= d
    return [-1, channels, inner, 1], "NCHW"


def _kernel_inputs(x, axis, out_dtype):
    """`x` in the kernel's layout, with what is needed to undo it."""
    import tensorflow as tf

    if backend.standardize_dtype(x.dtype) != out_dtype:
        # The reference path returns the compute dtype computed from float32
        # statistics; a kernel run in the input dtype would round to it.
        x = tf.cast(x, tf.float32)
    shape = _geometry.static_shape(x)
    kernel_shape, data_format = _kernel_layout(shape, axis)
    if kernel_shape == "dynamic":
        kernel_shape = tf.stack(
            [-1, shape[axis], tf.reduce_prod(tf.shape(x)[axis + 1 :]), 1]
        )
    xk = x if kernel_shape is None else tf.reshape(x, kernel_shape)
    return x, xk, kernel_shape, data_format


def _kernel_training(x, params, spec):
    """The kernel form in training (FusedBatchNormV3 on shifted values)."""
    import tensorflow as tf

    gamma, beta, moving_mean, moving_var = params[:4]
    axis, epsilon, out_dtype = spec.axis, spec.epsilon, spec.out_dtype
    momentum = spec.momentum
    if params.momentum is not None:
        momentum = _momentum(params, spec, tf.float32)

    x, xk, kernel_shape, data_format = _kernel_inputs(x, axis, out_dtype)
    scale, offset = _parameters(x, axis, gamma, beta, tf.float32)
    reduction = _geometry.reduction_axes([axis], len(x.shape))
    # The kernel sums what it is given; shifted by one sample per feature
    # it never sees the offset of the data (_math.choose_shift). The
    # shifted values stay float32: rounded back to float16 they would not
    # be the inputs' exact differences (gradients off by 2e-4, measured).
    shift = tf.reshape(
        _math.choose_shift(tf.cast(x, tf.float32), reduction), [-1]
    )
    if data_format == "NHWC":
        shift_k = tf.reshape(shift, [1, 1, 1, -1])
    else:
        shift_k = tf.reshape(shift, [1, -1, 1, 1])
    dk = tf.cast(xk, tf.float32) - shift_k
    y, residual, unbiased_var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=dk,
        scale=scale,
        offset=offset,
        mean=tf.zeros([0], tf.float32),
        variance=tf.zeros([0], tf.float32),
        epsilon=epsilon,
        data_format=data_format,
        is_training=True,
    )
    count = _count(x, axis, tf.float32)
    # Undo the kernel's n / (n - 1). With n = 1 it left the (zero)
    # variance alone, and (n - 1) / n = 0 keeps it zero.
    var = unbiased_var * (tf.maximum(count - 1.0, 0.0) / tf.maximum(count, 1.0))
    mean = tf.stop_gradient(shift + residual)
    var = tf.stop_gradient(var)
    moving_mean = tf.cast(moving_mean, tf.float32)
    moving_var = tf.cast(moving_var, tf.float32)
    counted = count > 0
    new_mean = tf.where(
        counted, _math.moving_average(moving_mean, mean, momentum), moving_mean
    )
    new_var = tf.where(
        counted, _math.moving_average(moving_var, var, momentum), moving_var
    )
    # After the kernel, in float32 (relu's gradient takes its mask from
    # its outputs: nothing more is stored).
    y = _activate(y, spec.activation)
    if kernel_shape is not None:
        y = tf.reshape(y, tf.shape(x))
    return tf.cast(y, out_dtype), new_mean, new_var


def _kernel_inference(x, params, spec):
    """The kernel form in inference (FusedBatchNormV3 with the moving statistics)."""
    import tensorflow as tf

    gamma, beta, moving_mean, moving_var = params[:4]
    axis, epsilon, out_dtype = spec.axis, spec.epsilon, spec.out_dtype

    x, xk, kernel_shape, data_format = _kernel_inputs(x, axis, out_dtype)
    scale, offset = _parameters(x, axis, gamma, beta, tf.float32)
    y = tf.raw_ops.FusedBatchNormV3(
        x=xk,
        scale=scale,
        offset=offset,
        mean=tf.cast(moving_mean, tf.float32),
        variance=tf.cast(moving_var, tf.float32),
        epsilon=epsilon,
        data_format=data_format,
        is_training=False,
    )[0]
    y = _activate(y, spec.activation)
    if kernel_shape is not None:
        y = tf.reshape(y, tf.shape(x))
    return tf.cast(y, out_dtype)


def _ops_training(x, params, spec):
    """The plain form in training: in a graph `_forward` and `_backward` as
    plain ops (a training step measured 0.84x to 0.97x of autodiff's time
    on 2 CPU cores, AMD EPYC, from (256, 128) to (64, 26, 26, 32)); eagerly
    autodiff of `_plain_training` (there a custom gradient costs more than
    the ops it saves: 1.25x to 1.8x)."""
    import tensorflow as tf

    if tf.executing_eagerly():
        return _plain_training(x, params, spec)
    return _hand_written_training(x, params, spec, compiled=False)


# What each form runs, in training and in inference.
_TRAINING = {
    _forms.PLAIN: _ops_training,
    _forms.KERNEL: _kernel_training,
    _forms.COMPILED: _hand_written_training,
}
_INFERENCE = {
    _forms.PLAIN: _plain_inference,
    _forms.KERNEL: _kernel_inference,
    _forms.COMPILED: _xla_inference,
}
