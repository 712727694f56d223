"""Which form the TensorFlow fast path takes in a graph: one rule, one table.

The TensorFlow fast path computes the same thing in three forms:

- ``"plain"``: plain TensorFlow ops, in the inputs' own layout;
- ``"kernel"``: TensorFlow's fused batch-norm kernel (`FusedBatchNormV3`),
  fed values shifted by one sample per feature;
- ``"compiled"``: the arithmetic compiled by XLA: in training nested
  ``jit_compile=True`` functions, in inference the plain ops marked for XLA
  where they stand (inlined where the caller is compiled too).

Eager calls take "plain" (or "kernel" on a GPU), calls traced inside an
XLA-compiled function take "compiled". In a graph that TensorFlow runs op by
op (Keras' `fit`, `evaluate` and `predict` without ``jit_compile``, a
user's own `tf.function`) a `FormRule` decides by the number of elements of
the inputs: known when traced, the form is picked then; unknown (Keras
traces with an unknown batch size), in inference the same table picks it
when the graph runs (nested `tf.cond`s), and in training a rule that names
the compiled form gives it every size (TensorFlow cannot differentiate a
`tf.cond` that holds it).

Inference graphs are convertible by design, whatever the rule: every form
in inference is ordinary TensorFlow ops (XLA's mark is an attribute that
converters ignore), and the run-time choice is `tf.cond`, which
`model.export`, tf2onnx and the LiteRT converter read. See the performance
page for the measurements behind each breakpoint.
"""

import bisect
import dataclasses
from typing import Any

PLAIN = "plain"
KERNEL = "kernel"
COMPILED = "compiled"
FORMS = (PLAIN, KERNEL, COMPILED)

# Below this many elements plain ops beat the kernel and the compiled call
# in inference (measured on 2 CPU cores: plain the faster at (256, 128) and
# (16, 2, 2, 1280), the others from (16, 4, 4, 672) up).
PLAIN_MAX_ELEMENTS = 1 << 17

# In training the compiled form beat plain ops from this many elements
# (3 * 2^15): in every BN layer of EfficientNetB0, MobileNetV3Small and
# DenseNet121 from 98,304 elements to 2^17, activation or not (0.43x to
# 0.74x the built-in's time against plain ops' 0.65x to 0.82x, and so in
# each of three runs: examples/benchmark_forms.py --model, AMD EPYC);
# below, plain ops won in most layers (all under 32,768 elements).
PLAIN_TRAINING_MAX_ELEMENTS = 3 << 15

# In training the compiled form beat the kernel from (16, 4, 4, 672) up to
# (16, 32, 32, 128) (examples/benchmark_forms.py on an AMD EPYC: without
# oneDNN's kernels 0.49x to 0.78x the built-in's time against the kernel's
# 0.88x to 1.16x, with them 0.58x to 0.84x against 0.64x to 1.05x), and was
# level with it in a whole ResNet50 on an Intel Xeon; the kernel won only
# at (32, 56, 56, 64) with oneDNN's kernels (0.52x against 0.63x).

# Above this many elements the compiled form beat the kernel in inference
# (measured on 2 CPU cores: 0.65x to 0.87x the built-in's time from
# (16, 32, 32, 128) up against the kernel's 0.80x to 1.07x; level at and
# below (16, 16, 16, 256)).
KERNEL_INFERENCE_MAX_ELEMENTS = 1 << 20


@dataclasses.dataclass(frozen=True)
class FormRule:
    """Which form of the TensorFlow fast path a call takes, by its size.

    A call with `n` elements takes ``forms[i]``, where `i` is how many of
    the `breakpoints` are at most `n`; `training` and `inference` list the
    forms of each range (one more than there are breakpoints). The same
    table picks the form when the graph is traced (size known) and when
    it runs (size unknown when traced); in training, a size unknown when
    traced takes the compiled form wherever the rule names it for some
    range.

    Where a rule names "kernel" for a call the kernel cannot take on this
    device (features not on the last axis off a GPU, float64, an epsilon
    below cuDNN's bound) the call takes "compiled" instead.

    The default: in training plain ops below `PLAIN_TRAINING_MAX_ELEMENTS`
    elements and the compiled form from there; in inference plain ops below
    `PLAIN_MAX_ELEMENTS`, the kernel up to `KERNEL_INFERENCE_MAX_ELEMENTS`
    and the compiled form beyond (the fastest forms measured on CPU).

    Args:
        breakpoints: increasing element counts, each the first size of a
            range.
        training: the form of each range in training.
        inference: the form of each range in inference.
    """

    breakpoints: tuple[int, ...] = (
        PLAIN_TRAINING_MAX_ELEMENTS,
        PLAIN_MAX_ELEMENTS,
        KERNEL_INFERENCE_MAX_ELEMENTS + 1,
    )
    training: tuple[str, ...] = (PLAIN, COMPILED, COMPILED, COMPILED)
    inference: tuple[str, ...] = (PLAIN, PLAIN, KERNEL, COMPILED)

    def __post_init__(self):
        points = tuple(self.breakpoints)
        if any(
            isinstance(b, bool) or not isinstance(b, int) or b < 0
            for b in points
        ) or list(points) != sorted(set(points)):
            raise ValueError(
                "`breakpoints` must be increasing non-negative ints. "
                f"Received: breakpoints={self.breakpoints!r}"
            )
        for name in ("training", "inference"):
            forms = tuple(getattr(self, name))
            if len(forms) != len(points) + 1 or not set(forms) <= set(FORMS):
                raise ValueError(
                    f"`{name}` must name {len(points) + 1} forms (one more than "
                    f"the breakpoints), each one of {FORMS}. "
                    f"Received: {name}={getattr(self, name)!r}"
                )
            object.__setattr__(self, name, forms)
        object.__setattr__(self, "breakpoints", points)

    @classmethod
    def always(cls, form: str) -> "FormRule":
        """A rule that gives every call `form`: the choice switched off.

        Returns:
            One range, `form` in training and inference.
        """
        return cls(breakpoints=(), training=(form,), inference=(form,))

    def forms(self, inference: bool) -> tuple[str, ...]:
        """The forms of each range, for inference or training.

        Returns:
            One form per range.
        """
        return self.inference if inference else self.training

    def index(self, n: int) -> int:
        """The range of a call of `n` elements (known when traced).

        Returns:
            How many breakpoints are at most `n`.
        """
        return bisect.bisect_right(self.breakpoints, n)

    def runtime_index(self, n: Any) -> Any:
        """`index` for a scalar int64 tensor `n`, computed when the graph runs.

        Returns:
            An int32 scalar, the index of the range.
        """
        import tensorflow as tf

        index = tf.constant(0, tf.int32)
        for b in self.breakpoints:
            index += tf.cast(n >= b, tf.int32)
        return index


# The rule on a GPU: the kernel (cuDNN) wherever XLA does not compile.
GPU_RULE = FormRule.always(KERNEL)

_user_rule: FormRule | None = None


def set_form_rule(rule: FormRule | str | None) -> FormRule | None:
    """Set how the TensorFlow fast path picks its form in graphs.

    Takes effect for functions traced afterwards (a traced graph keeps the
    forms it was traced with). Applies on the TensorFlow backend only.

    Args:
        rule: a `FormRule`; a form name ("plain", "kernel", "compiled"),
            short for `FormRule.always(name)`; or None for the default (on a
            GPU the kernel, else plain ops for small tensors, the compiled
            form for larger ones in training, and in inference the kernel,
            then the compiled form for the largest: see the
            [performance page](performance.md)).

    Returns:
        The rule set before (None: the default).

    Raises:
        ValueError: `rule` is neither a `FormRule`, a form name nor None.
    """
    global _user_rule
    if isinstance(rule, str):
        if rule not in FORMS:
            raise ValueError(
                f"`rule` must be a FormRule, one of {FORMS} or None. "
                f"Received: rule={rule!r}"
            )
        rule = FormRule.always(rule)
    if rule is not None and not isinstance(rule, FormRule):
        raise ValueError(
            f"`rule` must be a FormRule, one of {FORMS} or None. "
            f"Received: rule={rule!r}"
        )
    previous, _user_rule = _user_rule, rule
    return previous


def form_rule(gpu: bool = False) -> FormRule:
    """The rule in force: the user's, else the default for the device.

    Args:
        gpu: whether TensorFlow sees a GPU.

    Returns:
        The rule that picks the forms of calls traced now.
    """
    if _user_rule is not None:
        return _user_rule
    return GPU_RULE if gpu else FormRule()
