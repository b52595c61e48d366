"""Triton kernels of torchrl_hippo. Imports torch and triton only, never torchrl_hippo."""

__all__: list[str] = []
