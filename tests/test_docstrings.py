"""Runs the ``Examples:`` blocks of every public module's docstrings."""

import doctest
import importlib
import pkgutil

import pytest

import torchrl_hippo
import triton_kernels


def _modules():
    names = []
    for package in (torchrl_hippo, triton_kernels):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"
