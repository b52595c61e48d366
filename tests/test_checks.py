"""torchrl_hippo._checks: the argument checks every constructor shares."""

import pytest

from torchrl_hippo._checks import as_nested_key, check_positive_int


@pytest.mark.parametrize(
    "value, expected",
    [("obs", "obs"), (("obs",), "obs"), (("next", "reward"), ("next", "reward"))],
)
def test_nested_keys_are_normalised(value, expected):
    assert as_nested_key(value, "in_key") == expected


@pytest.mark.parametrize("value", [3, None, ("a", 1), ["a"], (), ("a", ())])
def test_non_keys_are_refused_by_name(value):
    with pytest.raises(TypeError, match=r"in_key must be a NestedKey \(str or tuple of str\)"):
        as_nested_key(value, "in_key")


@pytest.mark.parametrize(
    "value, error, message",
    [
        (0, ValueError, "slots must be a positive int"),
        (-2, ValueError, "slots must be a positive int"),
        (True, TypeError, "slots must be an int, got bool"),
        (2.0, TypeError, "slots must be an int, got float"),
    ],
)
def test_positive_ints(value, error, message):
    with pytest.raises(error, match=message):
        check_positive_int(value, "slots")
    assert check_positive_int(5, "slots") == 5
