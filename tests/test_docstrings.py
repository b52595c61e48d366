"""Runs the ``Examples:`` blocks of every public module's docstrings."""

import doctest
import importlib
import pkgutil

import pytest

import torchrl_hippo


def _modules():
    names = ["torchrl_hippo"]
    for info in pkgutil.walk_packages(torchrl_hippo.__path__, prefix="torchrl_hippo."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"
