"""The checks of `BatchNormalization`'s constructor arguments, as pure functions.

Each takes the value as received and returns it resolved (a float, a list
of ints, a copy of a dict), or raises a `TypeError` or `ValueError` that
names the argument and the value, in Keras' "Received: arg=value" style.
Checks that need the inputs (the axes' range for their rank, a mask's
shape) are `_geometry`'s, made when the layer is built or called.
`resolve` runs them all, in the constructor's order; `config` writes the
resolved values back as `get_config` does.
"""

import numbers
from typing import Any

from keras import constraints
from keras import initializers
from keras import regularizers

from bnlayers import _sync

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def axis(value: Any) -> int | list[int]:
    """An int, or a non-empty list of distinct ints (returned as a list).

    The one check of an `axis` argument's type; `_geometry.feature_axes`
    makes it too, then the checks that need the inputs' rank.
    """
    if _is_int(value):
        return int(value)
    if isinstance(value, (list, tuple)) and value and all(map(_is_int, value)):
        axes = [int(a) for a in value]
        if len(set(axes)) != len(axes):
            raise ValueError(
                f"`axis` must not repeat an axis. Received: axis={value!r}"
            )
        return axes
    raise TypeError(
        "`axis` must be an int or a non-empty list of ints. "
        f"Received: axis={value!r}"
    )


def fraction(name: str, value: Any) -> float:
    """A float in [0, 1] (a momentum)."""
    if not _is_real(value):
        raise TypeError(
            f"`{name}` must be a float in [0, 1]. Received: {name}={value!r}"
        )
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1]. Received: {name}={value!r}"
        )
    return float(value)


def momentum(value: Any) -> float | None:
    """None (a cumulative average of every batch), or a float in [0, 1]."""
    if value is None:
        return None
    if not _is_real(value):
        raise TypeError(
            "`momentum` must be a float in [0, 1], or None (a cumulative "
            f"average). Received: momentum={value!r}"
        )
    return fraction("momentum", value)


def renorm_momentum(value: Any) -> float:
    """A float in [0, 1]; None is `momentum`'s alone (see the message)."""
    if value is None:
        raise ValueError(
            "`renorm_momentum` must be a float in [0, 1]; None (a cumulative "
            "average) is accepted for `momentum` only: renorm's correction "
            "needs statistics that follow the current weights, and a "
            "cumulative average falls further behind them at every step. "
            "Received: renorm_momentum=None"
        )
    return fraction("renorm_momentum", value)


def debias_moving_statistics(value: Any) -> bool:
    """A bool."""
    if not isinstance(value, (bool, numbers.Integral)) or value not in (0, 1):
        raise TypeError(
            "`debias_moving_statistics` must be True or False. "
            f"Received: debias_moving_statistics={value!r}"
        )
    return bool(value)


def epsilon(value: Any) -> float:
    """A float > 0."""
    if not _is_real(value):
        raise TypeError(
            f"`epsilon` must be a positive float. Received: epsilon={value!r}"
        )
    if not float(value) > 0.0:
        raise ValueError(f"`epsilon` must be > 0. Received: epsilon={value!r}")
    return float(value)


def renorm_clipping(value: Any, renorm: bool) -> dict[str, float] | None:
    """A copy of a dict with keys among `RENORM_CLIPPING_KEYS`; None as {} with `renorm`."""
    if value is None:
        return {} if renorm else None
    keys = list(RENORM_CLIPPING_KEYS)
    if not isinstance(value, dict):
        raise TypeError(
            f"`renorm_clipping` must be a dict with keys among {keys}. "
            f"Received: renorm_clipping={value!r}"
        )
    # Each message also carries the built-in layer's phrase ("Received
    # invalid keys", "rmax should be", "dmax should be non-negative"), so
    # that code and tests matching the built-in's errors match these.
    unknown = sorted(set(value) - set(keys), key=repr)
    if unknown:
        raise ValueError(
            f"Unknown keys {unknown} in `renorm_clipping`; the keys are "
            f"{keys}. Received invalid keys for `renorm_clipping`: "
            f"renorm_clipping={value!r}"
        )
    rmax, rmin, dmax = (value.get(key) for key in ("rmax", "rmin", "dmax"))
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(
            "`renorm_clipping` needs rmax >= rmin (rmax should be greater "
            f"than or equal to rmin). Received: renorm_clipping={value!r} "
            f"(rmax={rmax}, rmin={rmin})"
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            "`renorm_clipping` needs dmax >= 0 (dmax should be non-negative). "
            f"Received: renorm_clipping={value!r} (dmax={dmax})"
        )
    return dict(value)


def virtual_batch_size(
    value: Any, renorm: bool, synchronized: bool
) -> int | None:
    """None or a positive int, not combined with `renorm` or `synchronized`."""
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(
            "`virtual_batch_size` must be None or a positive int. "
            f"Received: virtual_batch_size={value!r}"
        )
    value = int(value)
    if renorm:
        raise ValueError(
            "`virtual_batch_size` cannot be combined with `renorm=True`. "
            f"Received: virtual_batch_size={value}, renorm=True"
        )
    if synchronized:
        raise ValueError(
            "`virtual_batch_size` cannot be combined with `synchronized=True`: "
            "ghost batches are per-replica by definition. "
            f"Received: virtual_batch_size={value}, synchronized=True"
        )
    return value


def fused(value: Any) -> bool | None:
    """None, True or False."""
    if value not in (None, True, False):
        raise ValueError(
            f"`fused` must be None, True or False. Received: fused={value!r}"
        )
    return value


# ---------------------------------------------------------------- activation
# The activations the layer can apply to its outputs, by Keras' names
# (`keras.activations`), and the aliases Keras gives them.
ACTIVATIONS = ("relu", "relu6", "silu", "hard_silu", "gelu")
ACTIVATION_ALIASES = {"swish": "silu", "hard_swish": "hard_silu"}


def activation(value: Any) -> str | None:
    """None, or the Keras name of a supported activation (aliases resolved).

    Takes a name (`"relu"`, `"swish"`, ...) or the function itself
    (`keras.activations.relu`); returns the canonical name.
    """
    if value is None:
        return None
    name = value if isinstance(value, str) else getattr(value, "__name__", "")
    name = ACTIVATION_ALIASES.get(str(name), str(name))
    if name in ACTIVATIONS and not isinstance(value, str):
        import keras

        # Only Keras' own functions: a user's function named "relu" may
        # compute anything.
        if keras.activations.get(name) is not value:
            name = None
    if name not in ACTIVATIONS:
        names = sorted(ACTIVATIONS + tuple(ACTIVATION_ALIASES))
        raise ValueError(
            f"`activation` must be None or one of {names} (or that Keras "
            f"activation function). Received: activation={value!r}"
        )
    return name


# ---------------------------------------------------------------- the config
# `get_config`'s keys, in the order the built-in writes its own, then
# bnlayers' own options; and how the arguments that Keras resolves to
# objects are written.
CONFIG_KEYS = (
    "axis momentum epsilon center scale beta_initializer gamma_initializer "
    "moving_mean_initializer moving_variance_initializer beta_regularizer "
    "gamma_regularizer beta_constraint gamma_constraint synchronized renorm "
    "renorm_clipping renorm_momentum virtual_batch_size fused replica_group_size "
    "debias_moving_statistics activation"
).split()
_KINDS = {
    "initializer": (initializers.get, initializers.serialize),
    "regularizer": (regularizers.get, regularizers.serialize),
    "constraint": (constraints.get, constraints.serialize),
}


def _kind(name: str) -> tuple[Any, Any] | None:
    return _KINDS.get(name.rsplit("_", 1)[-1])


def resolve(arguments: dict[str, Any]) -> dict[str, Any]:
    """The constructor's `arguments` (by name, every key of `CONFIG_KEYS`),
    checked and resolved, in the order the checks raise."""
    a = arguments
    resolved: dict[str, Any] = {
        "axis": axis(a["axis"]),
        "momentum": momentum(a["momentum"]),
        "epsilon": epsilon(a["epsilon"]),
        "center": bool(a["center"]),
        "scale": bool(a["scale"]),
    }
    for name in CONFIG_KEYS:
        kind = _kind(name)
        if kind is not None:
            resolved[name] = kind[0](a[name])
    renorm = resolved["renorm"] = bool(a["renorm"])
    resolved["renorm_clipping"] = renorm_clipping(a["renorm_clipping"], renorm)
    resolved["renorm_momentum"] = renorm_momentum(a["renorm_momentum"])
    synced = resolved["synchronized"] = bool(a["synchronized"])
    resolved["virtual_batch_size"] = virtual_batch_size(
        a["virtual_batch_size"], renorm, synced
    )
    resolved["fused"] = fused(a["fused"])
    resolved["replica_group_size"] = _sync.check_replica_group_size(
        a["replica_group_size"], synced
    )
    resolved["debias_moving_statistics"] = debias_moving_statistics(
        a["debias_moving_statistics"]
    )
    resolved["activation"] = activation(a["activation"])
    return resolved


def config(layer: Any) -> dict[str, Any]:
    """`layer`'s resolved arguments as `get_config` writes them."""
    written = {}
    for name in CONFIG_KEYS:
        kind = _kind(name)
        value = getattr(layer, name)
        written[name] = value if kind is None else kind[1](value)
    return written
