"""Triton kernels of torchrl_hippo. Imports torch and triton only, never torchrl_hippo."""

from triton_kernels.info_nce import RowInfo, info_nce, info_nce_reference

__all__ = ["RowInfo", "info_nce", "info_nce_reference"]
