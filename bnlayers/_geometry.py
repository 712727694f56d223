"""Which axes of the inputs a batch-norm layer normalizes over, as pure functions.

The layer, its fused fast path and the tools all need the same answers: the
feature axes an `axis` argument names for inputs of a given rank, the axes
the statistics reduce over, the shape that broadcasts a per-feature vector
against the inputs, and how a Keras mask lines up with the inputs. They are
answered here, once, without state.
"""

from keras import ops

from bnlayers import _checks


def _shape_text(input_shape):
    return None if input_shape is None else tuple(input_shape)


def feature_axes(axis, ndim, input_shape=None, virtual_batch_size=None):
    """The feature axes `axis` names for inputs of rank `ndim`.

    Args:
        axis: an int or a list (or tuple) of ints, negative ones counted
            from the end.
        ndim: the rank of the inputs.
        input_shape: the inputs' shape, if known: named in the errors, and
            every feature axis must then have a known size (the weights
            take it).
        virtual_batch_size: the layer's; ghost batches split axis 0, which
            therefore cannot be a feature axis.

    Returns:
        The feature axes as a sorted list of non-negative ints.

    Raises:
        TypeError: `axis` not an int or a non-empty list of ints.
        ValueError: inputs of rank < 2, an axis out of range, an axis named
            twice, axis 0 with ghost batches, or a feature axis of unknown
            size.
    """
    shape = _shape_text(input_shape)
    if ndim < 2:
        raise ValueError(
            "BatchNormalization needs inputs of rank >= 2 (a batch axis and "
            f"a feature axis). Received: input_shape={shape}"
        )
    checked = _checks.axis(axis)
    axes = checked if isinstance(checked, list) else [checked]
    resolved = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`axis` {a} is out of range for inputs of rank {ndim}. "
                f"Received: axis={axis!r}, input_shape={shape}"
            )
        resolved.append(int(a) % ndim)
    if len(set(resolved)) != len(resolved):
        raise ValueError(
            f"`axis` names the same axis twice for inputs of rank {ndim}. "
            f"Received: axis={axis!r}, input_shape={shape}"
        )
    if virtual_batch_size is not None and 0 in resolved:
        raise ValueError(
            "`virtual_batch_size` splits the batch axis 0, which cannot also be a "
            f"feature axis. Received: axis={axis!r}, "
            f"virtual_batch_size={virtual_batch_size}"
        )
    if input_shape is not None:
        for a in resolved:
            if input_shape[a] is None:
                raise ValueError(
                    f"The feature axis {a} must have a known size to build the weights. "
                    f"Received: axis={axis!r}, input_shape={shape}"
                )
    return sorted(resolved)


def reduction_axes(features, ndim):
    """The axes the batch statistics are taken over: every axis but the features."""
    return [i for i in range(ndim) if i not in features]


def param_shape(features, ndim, sizes):
    """The shape that broadcasts a per-feature tensor of shape `sizes` against the inputs.

    `sizes` are the sizes of the feature axes, in the order of `features`
    (the shape of the layer's weights).
    """
    shape = [1] * ndim
    for a, size in zip(features, sizes, strict=True):
        shape[a] = size
    return shape


def _fits(mask_shape, expected):
    """Whether a mask of `mask_shape` broadcasts to `expected` axis by axis."""
    if len(mask_shape) != len(expected):
        return False
    for m, e in zip(mask_shape, expected, strict=True):
        if m is not None and e is not None and m != 1 and m != e:
            return False
    return True


def expand_mask(mask, ndim, features, input_shape=None):
    """`mask` expanded so that it broadcasts against inputs of rank `ndim`, or None.

    Keras' rule, which its `Masking` and sequence layers follow: a mask has
    the rank of the inputs minus one and covers every axis but the last;
    it is expanded at the last axis, whatever the feature axes are. With
    several feature axes (k of them), a mask of rank `ndim - k` covering
    every axis but the feature axes is accepted too, expanded at each
    feature axis, when that rank is not `ndim - 1`.

    Args:
        mask: None, or a tensor (or array) with a `.shape`.
        ndim: the rank of the inputs.
        features: the sorted, non-negative feature axes.
        input_shape: the inputs' shape, if known: checked against the
            mask's, and named in the error.

    Raises:
        ValueError: when the mask fits neither form; the message names
            `mask.shape` and `inputs.shape`.
    """
    if mask is None:
        return None
    mask_shape = tuple(mask.shape)
    rank = len(mask_shape)
    without_features = ndim - len(features)
    if input_shape is None:
        last_ok = features_ok = True
    else:
        input_shape = tuple(input_shape)
        last_ok = _fits(mask_shape, input_shape[:-1])
        kept = [d for i, d in enumerate(input_shape) if i not in features]
        features_ok = _fits(mask_shape, kept)
    if rank == ndim - 1 and last_ok:
        return ops.expand_dims(mask, -1)
    if len(features) > 1 and rank == without_features and features_ok:
        # Ascending, so that each insertion lands where it belongs.
        for a in features:
            mask = ops.expand_dims(mask, a)
        return mask
    expected = (
        f"the shape of the inputs without their last axis (rank {ndim - 1})"
    )
    if len(features) > 1:
        expected += (
            f", or, with {len(features)} feature axes, without the feature axes "
            f"(rank {without_features})"
        )
    raise ValueError(
        f"`mask` must have {expected}, as Keras' masks do. Received: "
        f"mask.shape={mask_shape}, inputs.shape={_shape_text(input_shape)}"
    )


def static_shape(inputs):
    """`inputs.shape` as a tuple of ints and None (unknown sizes)."""
    # Sizes that are ints already are kept: converting a traced PyTorch
    # size would warn (TracerWarning) and bake it into the trace.
    return tuple(
        d if d is None or isinstance(d, int) else int(d) for d in inputs.shape
    )


# ------------------------------------------------- the fast paths' layouts
#
# Every fast path sees inputs with one feature axis `axis` as a matrix
# (rows, C) when the features are the last axis, else as (before, C, after):
# a reshape, no data moves, and reductions over merged axes measured fastest.


def merged_shape(shape, axis):
    """The merged layout of inputs of `shape` (ints) with features on `axis`.

    Returns:
        tuple[int, ...]: ``(rows, C)`` for a last feature axis, else
        ``(before, C, after)``.
    """
    before = after = 1
    for d in shape[:axis]:
        before *= d
    for d in shape[axis + 1 :]:
        after *= d
    if axis == len(shape) - 1:
        return (before, shape[axis])
    return (before, shape[axis], after)


def merged_reduction(rank):
    """The axes the statistics reduce over in a merged layout of `rank` (2 or 3).

    Returns:
        tuple[int, ...]: every axis but the features (axis 1).
    """
    return (0,) if rank == 2 else (0, 2)


def vector_shape(rank, axis):
    """The shape that broadcasts a per-feature vector against inputs of `rank`.

    Returns:
        list[int]: ones, with -1 at `axis`.
    """
    return param_shape([axis], rank, [-1])


def first_sample(rank, axis):
    """The index that takes each feature's first sample (`_math.choose_shift`).

    Returns:
        tuple[slice, ...]: every axis but `axis` cut to its first element,
        dimensions kept (the result broadcasts against the inputs).
    """
    return tuple(slice(None) if i == axis else slice(0, 1) for i in range(rank))


def per_feature_count(shape, axis):
    """Elements per feature, for a static `shape` (ints).

    Returns:
        int: the product of every size but the features'; 0 for an empty
        batch, which leaves the moving statistics as they are.
    """
    n = 1
    for i, d in enumerate(shape):
        if i != axis:
            n *= d
    return n
