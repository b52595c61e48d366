"""Helpers shared by the launch functions: is Triton usable here, and on which tensors."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package imports in this environment."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def load_kernels(name: str) -> ModuleType:
    """Imports the kernel module ``triton_kernels.<name>`` (and with it, Triton) on first use."""
    if not triton_available():
        raise RuntimeError(
            "The Triton kernels need the `triton` package, which is not installed here; "
            "use the PyTorch reference instead."
        )
    return importlib.import_module(f"triton_kernels.{name}")


def interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was built by Triton's interpreter (``TRITON_INTERPRET=1``)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def can_launch(kernels: str, kernel_name: str, device: torch.device) -> bool:
    """Whether ``kernels.kernel_name`` can run on tensors of ``device``.

    CUDA tensors need Triton; CPU tensors additionally need Triton's interpreter, which is on when
    ``TRITON_INTERPRET=1`` was set before the kernel module was first loaded.
    """
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return interpreted(getattr(load_kernels(kernels), kernel_name))


def runs_on(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on tensors of ``device``.

    True for CUDA devices when Triton is installed, and for the CPU under Triton's interpreter
    (``TRITON_INTERPRET=1`` set before the first kernel launch).

    Examples:
        >>> from triton_kernels import runs_on
        >>> runs_on("meta")
        False
    """
    return can_launch("_topk_kernel", "topk_kernel", torch.device(device))


def require_launch(kernels: str, kernel_name: str, device: torch.device, caller: str) -> ModuleType:
    """Returns the kernel module, or raises a clear error when it cannot run on ``device``."""
    if not triton_available():
        raise RuntimeError(f"{caller} needs the `triton` package, which is not installed here.")
    if not can_launch(kernels, kernel_name, device):
        raise ValueError(
            f"{caller} runs a Triton kernel, which needs CUDA tensors, got tensors on {device}. "
            "To run it on CPU tensors, set TRITON_INTERPRET=1 before the first kernel launch "
            "(Triton's interpreter: slow, for tests)."
        )
    return load_kernels(kernels)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (and ``>= 1``)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): how many programs run at once."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
