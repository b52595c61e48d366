"""Triton kernels of torchrl_hippo. Imports torch and triton only, never torchrl_hippo.

* :func:`topk_similarity`: fused ``queries @ keys.T`` + streaming top-k (CUDA), with
  :func:`topk_similarity_reference`.
* :func:`info_nce`: fused InfoNCE forward and backward with compact per-row targets (:class:`RowInfo`),
  with :func:`info_nce_reference`.

Importing this package does not import Triton: the ``@triton.jit`` kernels live in private modules
loaded on the first launch, so ``TRITON_INTERPRET=1`` (Triton's CPU interpreter) may be set any time
before then, and the references work where Triton is not installed.
"""

from triton_kernels._launch import runs_on, triton_available
from triton_kernels.info_nce import RowInfo, info_nce, info_nce_reference
from triton_kernels.topk import topk_similarity, topk_similarity_reference

__all__ = [
    "RowInfo",
    "info_nce",
    "info_nce_reference",
    "runs_on",
    "topk_similarity",
    "topk_similarity_reference",
    "triton_available",
]
