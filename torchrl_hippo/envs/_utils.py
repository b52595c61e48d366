"""Argument checks and small helpers shared by the benchmark environments."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

__all__ = [
    "check_action",
    "check_choice",
    "check_float",
    "check_int",
    "check_render_mode",
    "one_hot_view",
]


def check_int(name: str, value: object, *, minimum: int = 1, maximum: int | None = None) -> int:
    """Returns ``value`` as a python ``int`` after checking that it lies in ``[minimum, maximum]``.

    Raises:
        TypeError: if ``value`` is not an integer (``bool`` is refused too).
        ValueError: if ``value`` is out of range. Both messages name the argument.
    """
    expected = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__}).")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {expected}, got {value}.")
    return int(value)


def check_float(name: str, value: object, *, low: float, high: float | None = None) -> float:
    """Returns ``value`` as a python ``float`` after checking that it lies in ``[low, high]``."""
    expected = f"a number >= {low}" if high is None else f"a number in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not np.isfinite(value) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {expected}, got {value}.")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Checks that ``value`` is one of the strings in ``choices``."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Unknown {name} {value!r}: expected one of {options}.")
    return str(value)


def check_render_mode(render_mode: str | None, modes: Sequence[str]) -> str | None:
    """Checks ``render_mode`` against the environment's declared render modes."""
    if render_mode is not None and render_mode not in modes:
        options = ", ".join(repr(m) for m in modes)
        raise ValueError(f"Unknown render_mode {render_mode!r}: expected None or one of {options}.")
    return render_mode


def check_action(action: object, n: int) -> int:
    """Converts a discrete action to a python ``int`` and checks that it lies in ``[0, n)``."""
    try:
        a = int(action)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise TypeError(f"action must be an int in [0, {n}), got {action!r}.") from None
    if a < 0 or a >= n or a != action:
        raise ValueError(f"action must be an int in [0, {n}), got {action!r}.")
    return a


def one_hot_view(codes: np.ndarray, depth: int, *, pad: int, pad_code: int = -1) -> np.ndarray:
    """One-hot features of a 2-D grid of codes, padded by ``pad`` cells on each side.

    A cell whose code is ``pad_code`` (and the padding) gets an all-zero feature vector.
    Returns a C-contiguous float32 array of shape ``[H + 2 pad, W + 2 pad, depth]``.
    """
    h, w = codes.shape
    out = np.zeros((h + 2 * pad, w + 2 * pad, depth), dtype=np.float32)
    inner = out[pad : pad + h, pad : pad + w]
    ys, xs = np.nonzero(codes != pad_code)
    inner[ys, xs, codes[ys, xs]] = 1.0
    return out
