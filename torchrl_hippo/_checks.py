"""Argument checks shared by the package's constructors: one wording for each kind of error."""

from __future__ import annotations

from tensordict import NestedKey, unravel_key

__all__ = ["as_nested_key", "check_positive_int"]


def as_nested_key(value: object, name: str) -> NestedKey:
    """``value`` as a normalised NestedKey (``("a",)`` becomes ``"a"``), else ``TypeError``.

    Examples:
        >>> as_nested_key(("next", "reward"), "reward_key")
        ('next', 'reward')
        >>> as_nested_key(("obs",), "in_key")
        'obs'
    """
    # unravel_key alone would drop non-str parts of a tuple (("a", 1) gives "a").
    if not _is_key(value):
        raise TypeError(f"{name} must be a NestedKey (str or tuple of str), got {value!r}.")
    return unravel_key(value)


def _is_key(value: object) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, tuple) and len(value) > 0 and all(_is_key(part) for part in value)


def check_positive_int(value: object, name: str) -> int:
    """``value`` if it is an int ``>= 1`` (bools refused), else ``TypeError`` / ``ValueError``.

    Examples:
        >>> check_positive_int(3, "slots")
        3
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value}.")
    return value
