"""Every access the tools make to Keras' private internals, in one place.

Keras exports no API to walk a model's graph, to rebuild a Sequential model
with its input layer, or to see which variables an optimizer was built
for, so the tools read a few private attributes. They were checked against
the Keras versions in `CHECKED` (the test suite runs there); each tool calls
`check_version` first, so that a Keras outside that range fails with a clear
message instead of an AttributeError deep inside a rebuild.

Nothing outside this module may touch a Keras attribute whose name starts
with an underscore or import from `keras.src`.
"""

import re

import keras

# [lowest, highest) Keras versions these accesses were checked against: the
# range pyproject.toml declares (tests/test_ci_config.py holds them equal).
# 3.16 is the Keras that keras-nightly 3.16.0.dev2026102704 installs; CI runs
# the layer and tool tests against keras-nightly.
CHECKED = ((3, 15), (3, 17))
_CHECKED_TEXT = "3.15 and 3.16"


def _installed():
    return keras.version()


def _release(version):
    """`(major, minor)` of a version string such as "3.15.1" or "3.16.0rc1"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_version(function):
    """Raises a RuntimeError naming the installed Keras if it is outside `CHECKED`."""
    installed = _installed()
    low, high = CHECKED
    if not low <= _release(installed) < high:
        raise RuntimeError(
            f"`{function}` reads Keras internals (to walk and rebuild models) that "
            f"bnlayers has checked against Keras {_CHECKED_TEXT} only. Received: installed "
            f"keras=={installed}. Install a Keras in that range "
            f"(pip install 'keras>={low[0]}.{low[1]},<{high[0]}.{high[1]}') or a bnlayers "
            "release that supports yours."
        )


def functional_class():
    """The class of models built with the functional API (not exported by Keras).

    `keras.models.clone_model` dispatches on it too.
    """
    from keras.src.models.functional import Functional

    return Functional


def is_graph_model(model):
    """Whether `model` is a Sequential or Functional model (its layers can be rebuilt)."""
    return isinstance(model, (keras.Sequential, functional_class()))


def sublayers(layer):
    """Every distinct layer inside `layer` (nested ones included, itself not), in order."""
    return list(layer._flatten_layers(include_self=False))


def graph_nodes(model):
    """The nodes of a Functional model's own graph, input nodes included."""
    return [node for nodes in model._nodes_by_depth.values() for node in nodes]


def producer(tensor):
    """The operation (layer) whose call made the symbolic `tensor`."""
    return tensor._keras_history.operation


def sequential_input(model):
    """A fresh `keras.Input` like the input layer of Sequential `model`, or None."""
    first = model._layers[0] if model._layers else None
    if not isinstance(first, keras.layers.InputLayer):
        return None
    return keras.Input(
        batch_shape=first.batch_shape,
        dtype=first._dtype,
        name=first.name,
        optional=first.optional,
    )


def mark_called(model):
    """Sets the flag that `Layer.__call__` sets, which `model.export` checks."""
    model._called = True


def optimizer_targets(optimizer):
    """The variables a built optimizer keeps slots for, in slot order."""
    return list(optimizer._trainable_variables)
