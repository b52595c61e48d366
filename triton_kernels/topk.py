"""Fused top-k similarity search: ``(queries @ keys.T)`` and a streaming top-k in one Triton kernel.

:func:`topk_similarity_reference` defines the semantics. For queries ``[Q, D]`` and keys ``[N, D]``
the score of key ``j`` for query ``i`` is ``queries[i] · keys[j]`` accumulated in fp32. Keys where
the optional ``valid`` mask is ``False`` score ``-inf`` and are never returned; valid scores are
clamped at the lowest finite fp32 value, so a valid key always outranks a masked one. The result is
the ``k`` best keys per query: fp32 scores ``[Q, k]`` sorted by descending score and their int64
indices ``[Q, k]``; tied scores may come in any order.

:func:`topk_similarity` runs the fused kernel (``triton_kernels/_topk_kernel.py``). Programs own a
block of queries and a contiguous split of the keys; each streams its key tiles through ``tl.dot``
(tensor cores, fp32 accumulation), rejects a tile early when no score beats the running k-th, and
keeps its running top-k in registers. The ``[Q, N]`` score matrix is never written: the splits'
``[Q, k]`` candidates are merged at the end. Queries are cast to the keys' dtype before the product
(fp16/bf16 keys: fp16/bf16 tensor-core products; fp32 keys: 3xTF32, close to full fp32).

Examples:
    >>> import torch
    >>> from triton_kernels.topk import topk_similarity_reference
    >>> keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    >>> topk_similarity_reference(torch.tensor([[0.0, 1.0]]), keys, 2)
    (tensor([[1.0000, 0.8000]]), tensor([[1, 2]]))
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch import Tensor

from triton_kernels._launch import interpreted, next_power_of_2, num_sms, require_launch

__all__ = ["MAX_K", "check_topk_inputs", "topk_similarity", "topk_similarity_reference"]

MAX_K = 256
"""The largest ``k`` the fused kernel supports."""

# Scores of valid keys are clamped at this value so that a valid key always outranks a masked one
# (masked keys score -inf), even when its own score overflows to -inf.
_LOWEST_VALID_SCORE = torch.finfo(torch.float32).min
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Key indices share an int64 with the score inside the kernel: 32 bits each.
_MAX_KEYS = 2**31 - 1
_LOW_BITS = 2**32 - 1


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------
def check_topk_inputs(
    queries: Tensor, keys: Tensor, k: int, valid: Tensor | None
) -> tuple[int, int]:
    """Validates the inputs of a top-k search and returns ``(k, number of valid keys)``.

    Every search entry point (the reference, the fused kernel and the backends of
    ``torchrl_hippo.search``) runs these checks, so they all fail the same way on bad input.

    Raises:
        TypeError: if an argument has the wrong type or dtype (non-floating queries or keys, a
            non-bool ``valid``, a non-int ``k``).
        ValueError: if queries or keys are not 2-D, their ``D`` or devices differ, ``valid`` has
            the wrong shape or device, ``k < 1``, ``k`` exceeds the number of valid keys or the
            queries hold NaN.

    Examples:
        >>> import torch
        >>> from triton_kernels.topk import check_topk_inputs
        >>> check_topk_inputs(torch.randn(2, 4), torch.randn(5, 4), 3, None)
        (3, 5)
        >>> check_topk_inputs(torch.randn(2, 4), torch.randn(5, 3), 3, None)
        Traceback (most recent call last):
            ...
        ValueError: queries and keys must have the same embedding size D, got queries D=4 and keys D=3.
    """
    for name, tensor in (("queries", queries), ("keys", keys)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
        if tensor.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D ([{name[0].upper()}, D]), got shape {tuple(tensor.shape)}."
            )
        if not tensor.is_floating_point():
            raise TypeError(
                f"{name} must have a floating dtype (float32, float16 or bfloat16), "
                f"got {tensor.dtype}."
            )
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries and keys must have the same embedding size D, got queries D={queries.shape[1]} "
            f"and keys D={keys.shape[1]}."
        )
    if queries.device != keys.device:
        raise ValueError(
            f"queries and keys must be on the same device, got queries on {queries.device} and "
            f"keys on {keys.device}."
        )
    if isinstance(k, bool):
        raise TypeError(f"k must be an int, got {k!r}.")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an int, got {type(k).__name__}.") from None

    num_keys = keys.shape[0]
    if valid is None:
        num_valid = num_keys
    else:
        if not isinstance(valid, Tensor):
            raise TypeError(
                f"valid must be a bool torch.Tensor or None, got {type(valid).__name__}."
            )
        if valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor, got dtype {valid.dtype}.")
        if valid.shape != (num_keys,):
            raise ValueError(
                f"valid must have shape [N] = ({num_keys},) to match keys, got {tuple(valid.shape)}."
            )
        if valid.device != keys.device:
            raise ValueError(
                f"valid must be on the same device as keys ({keys.device}), got {valid.device}."
            )
        num_valid = int(valid.sum())

    if k < 1:
        raise ValueError(f"k must be at least 1, got k={k}.")
    if k > num_valid:
        raise ValueError(
            f"k={k} is larger than the memory: keys has only {num_valid} valid key(s) "
            f"(out of N={num_keys}); ask for at most {num_valid}."
        )
    if queries.numel() and bool(torch.isnan(queries).any()):
        raise ValueError("queries contains NaN; every query must be a finite embedding.")
    return k, num_valid


def mask_scores_(scores: Tensor, valid: Tensor | None) -> Tensor:
    """Sends masked columns of ``scores [.., N]`` to -inf, keeping valid scores above them (in place).

    Examples:
        >>> import torch
        >>> from triton_kernels.topk import mask_scores_
        >>> mask_scores_(torch.tensor([[1.0, float("-inf"), 3.0]]), torch.tensor([True, True, False]))
        tensor([[ 1.0000e+00, -3.4028e+38,        -inf]])
    """
    if valid is None:
        return scores
    scores.clamp_(min=_LOWEST_VALID_SCORE)
    return scores.masked_fill_(~valid, float("-inf"))


def _empty_result(queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    scores = torch.empty(0, k, dtype=torch.float32, device=queries.device)
    indices = torch.empty(0, k, dtype=torch.int64, device=queries.device)
    return scores, indices


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def topk_similarity_reference(
    queries: Tensor, keys: Tensor, k: int, *, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The plain definition of top-k similarity search, computed in one go.

    It builds the full ``[Q, N]`` score matrix ``queries.float() @ keys.float().T``, sets the scores
    of masked keys to ``-inf`` (valid scores are first clamped at the lowest finite fp32 value, so a
    valid key always ranks above a masked one) and takes ``torch.topk``. Every implementation gives
    the same answer, apart from the order of tied scores. It uses ``Q * N`` memory; use it for tests
    and small inputs only.

    Args:
        queries (Tensor): the queries, ``[Q, D]``, any floating dtype.
        keys (Tensor): the keys, ``[N, D]``, any floating dtype.
        k (int): how many neighbours to return per query, ``1 <= k <= number of valid keys``.

    Keyword Args:
        valid (Tensor, optional): a bool mask ``[N]``; keys where it is ``False`` are never
            returned. Defaults to ``None`` (every key is valid).

    Returns:
        A tuple ``(scores, indices)``: fp32 scores ``[Q, k]`` sorted by descending score, and the
        int64 indices ``[Q, k]`` of the matching keys.

    Raises:
        TypeError: if an argument has the wrong type or dtype.
        ValueError: if shapes or devices disagree, ``k`` is out of range or the queries hold NaN.

    Examples:
        >>> import torch
        >>> from triton_kernels import topk_similarity_reference
        >>> keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
        >>> scores, indices = topk_similarity_reference(torch.tensor([[0.0, 1.0]]), keys, k=2)
        >>> scores
        tensor([[1.0000, 0.8000]])
        >>> indices
        tensor([[1, 2]])
    """
    k, _ = check_topk_inputs(queries, keys, k, valid)
    if queries.shape[0] == 0:
        return _empty_result(queries, k)
    with torch.no_grad():
        scores = mask_scores_(queries.float() @ keys.float().T, valid)
        top_scores, top_indices = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    return top_scores, top_indices


# --------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------
class _Config(NamedTuple):
    k_pad: int
    block_q: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    num_splits: int
    keys_per_split: int


def _config(
    num_queries: int,
    num_keys: int,
    k: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    num_splits: int | None,
    small_blocks: bool = False,
) -> _Config:
    """Block sizes and the split of the keys.

    The sizes were chosen by compiling for sm_90 without a GPU (no register spills, shared memory
    within an H100's 227 KiB, ``wgmma`` wherever a block holds 64 queries); they still need tuning
    on the device. ``small_blocks`` shrinks the blocks below the tensor cores' minimum (16) for
    Triton's interpreter, whose sorting networks run element by element in Python.
    """
    k_pad = max(2, next_power_of_2(k))
    block_d = min(128, max(16, next_power_of_2(dim)))
    num_warps, num_stages = 8, 3
    if small_blocks:
        block_q, block_n, block_d = 4, max(32, k_pad), min(128, next_power_of_2(dim))
    elif dtype == torch.float32:
        # 3xTF32 products need more registers, and fp32 tiles twice the shared memory.
        block_q = 16 if num_queries <= 16 else (64 if k_pad <= 32 else 32)
        block_n = max(64, k_pad)
        num_warps, num_stages = (8 if k_pad >= 128 else 4), 2
    elif k_pad >= 256:
        block_q, block_n = (16 if num_queries <= 16 else 32), 256
    else:
        block_q, block_n = (16 if num_queries <= 16 else 64), 128
    if block_q == 16 and block_n <= 128:
        num_warps = 4
    tiles = -(-num_keys // block_n)
    if num_splits is None:
        # About four programs per SM, but at least 8 tiles per split so the warm-up (the first
        # tiles, before the running k-th score rejects anything) stays a small share.
        query_blocks = -(-num_queries // block_q)
        num_splits = min(-(-4 * num_sms(device) // query_blocks), max(tiles // 8, 1))
    num_splits = max(1, min(num_splits, tiles))
    keys_per_split = -(-tiles // num_splits) * block_n
    num_splits = -(-num_keys // keys_per_split)
    return _Config(
        k_pad, block_q, block_n, block_d, num_warps, num_stages, num_splits, keys_per_split
    )


def _decode(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Splits the kernel's packed int64 candidates into fp32 scores and int64 indices."""
    key = packed >> 32
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    scores = bits.to(torch.int32).view(torch.float32)
    indices = _LOW_BITS - (packed & _LOW_BITS)
    return scores, indices


def topk_similarity(
    queries: Tensor,
    keys: Tensor,
    k: int,
    *,
    valid: Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k similarity search with the fused Triton kernel (CUDA tensors).

    Gives the same result as :func:`topk_similarity_reference` (up to the order of ties and the
    rounding of the queries to the keys' dtype) without ever materialising the ``[Q, N]`` scores:
    its extra memory is ``num_splits * Q * k`` candidates.

    Args:
        queries (Tensor): the queries, ``[Q, D]``, a floating dtype, without NaN; cast to the keys'
            dtype for the product.
        keys (Tensor): the keys, ``[N, D]``, float32, float16 or bfloat16, with unit stride along
            ``D`` (rows may be strided), on the queries' device. ``N < 2**31``.
        k (int): how many neighbours to return per query, ``1 <= k <= min(256, valid keys)``.

    Keyword Args:
        valid (Tensor, optional): a bool mask ``[N]``; keys where it is ``False`` (empty or evicted
            slots) are never returned. Defaults to ``None`` (every key is valid).
        num_splits (int, optional): how many contiguous splits of the keys are searched in
            parallel before the final merge. Defaults to ``None``: enough to fill the GPU.

    Returns:
        A tuple ``(scores, indices)``: fp32 scores ``[Q, k]`` sorted by descending score and the
        int64 indices ``[Q, k]`` of the matching keys.

    Raises:
        TypeError: on wrongly typed arguments, including keys that are not float32/16 or bfloat16.
        ValueError: on mismatched shapes or devices, ``k`` out of range, NaN in the queries, keys
            without unit stride along ``D``, or CPU tensors without Triton's interpreter.
        RuntimeError: if Triton is not installed.

    Examples:
        >>> import torch
        >>> from triton_kernels import topk_similarity
        >>> keys = torch.nn.functional.normalize(torch.randn(1000, 64), dim=1)
        >>> if torch.cuda.is_available():  # doctest: +SKIP
        ...     scores, indices = topk_similarity(keys[:4].cuda(), keys.cuda(), k=5)
        ...     assert indices[:, 0].tolist() == [0, 1, 2, 3]
    """
    k, _ = check_topk_inputs(queries, keys, k, valid)
    if keys.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"keys must be float32, float16 or bfloat16 for the Triton kernel, got {keys.dtype}."
        )
    if k > MAX_K:
        raise ValueError(f"k must be at most {MAX_K} for the Triton kernel, got k={k}.")
    num_keys, dim = keys.shape
    if num_keys > _MAX_KEYS:
        raise ValueError(f"keys may have at most 2**31 - 1 rows, got N={num_keys}.")
    if dim > 1 and keys.stride(1) != 1:
        raise ValueError(
            f"keys must have unit stride along D (rows may be strided), got strides "
            f"{keys.stride()}; pass keys.contiguous()."
        )
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
            raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}.")
    kernels = require_launch(
        "_topk_kernel", "topk_kernel", keys.device, "triton_kernels.topk_similarity"
    )
    num_queries = queries.shape[0]
    if num_queries == 0:
        return _empty_result(queries, k)

    interpreting = interpreted(kernels.topk_kernel)
    cfg = _config(num_queries, num_keys, k, dim, keys.dtype, keys.device, num_splits, interpreting)
    with torch.no_grad():
        q = queries.detach().to(keys.dtype).contiguous()
        mask = q if valid is None else valid.contiguous().view(torch.uint8)
        out = torch.empty(
            cfg.num_splits, num_queries, cfg.k_pad, dtype=torch.int64, device=keys.device
        )
        grid = (-(-num_queries // cfg.block_q), cfg.num_splits)
        kernels.topk_kernel[grid](
            q,
            keys.detach(),
            mask,
            out,
            num_queries,
            num_keys,
            dim,
            cfg.keys_per_split,
            q.stride(0),
            keys.stride(0),
            K=k,
            K_PAD=cfg.k_pad,
            BLOCK_Q=cfg.block_q,
            BLOCK_N=cfg.block_n,
            BLOCK_D=cfg.block_d,
            SINGLE_D=dim <= cfg.block_d,
            HAS_VALID=valid is not None,
            EXTRACT_LIMIT=4,
            DOT_PRECISION="tf32x3" if keys.dtype == torch.float32 else "tf32",
            DOT_UPCAST=interpreting and keys.dtype == torch.bfloat16,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        if cfg.num_splits == 1:
            # Each row of the single split is sorted ascending: its last k are the answer.
            top = out[0, :, cfg.k_pad - k :].flip(1)
        else:
            merged = out.permute(1, 0, 2).reshape(num_queries, cfg.num_splits * cfg.k_pad)
            top = torch.topk(merged, k, dim=1, largest=True, sorted=True).values
        return _decode(top)
