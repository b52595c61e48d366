"""The Triton kernel behind :func:`triton_kernels.topk_similarity`.

It lives in its own module so that importing :mod:`triton_kernels` does not import Triton: this module
is loaded on the first launch, so ``TRITON_INTERPRET=1`` may be set any time before that.

Scores and key indices travel together as one int64 per candidate: the high 32 bits hold the fp32
score mapped to an order-preserving integer, the low 32 bits hold ``2**32 - 1 - index``. Comparing
two packed values therefore compares scores first and prefers the lower index on ties, and a single
``max``/``topk`` over int64 moves a score together with its index.
"""

from __future__ import annotations

import triton
import triton.language as tl

_LOW_BITS = tl.constexpr(4294967295)  # 2**32 - 1
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
# The packed value of score -inf with all index bits zero: below every real candidate.
SENTINEL = tl.constexpr(-9187343244130779136)


@triton.jit
def _pack(scores, cols):
    """Packs fp32 scores and int key indices into order-preserving int64 values."""
    bits = scores.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | (_LOW_BITS - cols.to(tl.int64))


@triton.jit
def _unpack_score(packed):
    """The fp32 score held in the high 32 bits of a packed value."""
    key = (packed >> 32).to(tl.int32)
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32. ``UPCAST`` multiplies in fp32: Triton 3.9's interpreter multiplies
    bf16 operands as raw uint16, so the launcher sets it there (and only there) for bf16."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def topk_kernel(
    q_ptr,
    k_ptr,
    valid_ptr,
    out_ptr,
    num_queries,
    num_keys,
    dim,
    keys_per_split,
    stride_q,
    stride_k,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,
    HAS_VALID: tl.constexpr,
    EXTRACT_LIMIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Running top-``K`` of ``q · k`` over one split of the keys for ``BLOCK_Q`` queries.

    Grid: ``(cdiv(num_queries, BLOCK_Q), num_splits)``. Program ``(i, s)`` scores queries
    ``[i * BLOCK_Q, (i + 1) * BLOCK_Q)`` against keys ``[s * keys_per_split, (s + 1) *
    keys_per_split)`` one ``BLOCK_N`` tile at a time (``tl.dot``, fp32 accumulation) and writes its
    ``K_PAD`` best packed candidates, sorted ascending, to ``out[s, row, :]``.

    The running top-k ``best`` is kept sorted ascending, so ``best[:, K_PAD - K]`` is the current
    k-th score of each row. A tile is rejected early when no score in it beats its row's k-th. When
    a few scores do (at most ``EXTRACT_LIMIT`` in every row), they are inserted one at a time: a
    row-wise max, then one bitonic merge of ``K_PAD`` elements. Otherwise the tile's own top
    ``K_PAD`` (sorted descending) is merged with ``best`` by an element-wise max, which leaves the
    ``K_PAD`` largest of both as a bitonic sequence, and one bitonic merge sorts it again.
    ``DOT_UPCAST`` is for Triton's interpreter only (see :func:`_dot`).
    """
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < num_queries
    slots = tl.arange(0, K_PAD)
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, num_keys)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_q

    best = tl.full([BLOCK_Q, K_PAD], SENTINEL, tl.int64)
    threshold = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    if SINGLE_D:
        d = tl.arange(0, BLOCK_D)
        q_tile = tl.load(q_rows + d[None, :], mask=row_ok[:, None] & (d < dim)[None, :], other=0.0)

    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k_cols = k_ptr + cols.to(tl.int64)[None, :] * stride_k
        if SINGLE_D:
            d = tl.arange(0, BLOCK_D)
            k_tile = tl.load(
                k_cols + d[:, None], mask=col_ok[None, :] & (d < dim)[:, None], other=0.0
            )
            scores = _dot(
                q_tile, k_tile, tl.zeros([BLOCK_Q, BLOCK_N], tl.float32), DOT_PRECISION, DOT_UPCAST
            )
        else:
            scores = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_ok = d < dim
                q_part = tl.load(
                    q_rows + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
                )
                k_part = tl.load(
                    k_cols + d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0
                )
                scores = _dot(q_part, k_part, scores, DOT_PRECISION, DOT_UPCAST)

        keep = col_ok
        if HAS_VALID:
            keep = keep & (tl.load(valid_ptr + cols, mask=col_ok, other=0) != 0)
        # Valid scores stay above -inf (the masked value) even when they overflow.
        scores = tl.where(keep[None, :], tl.maximum(scores, -_FLT_MAX), float("-inf"))
        above = (scores > threshold[:, None]) & row_ok[:, None]
        count = tl.max(tl.sum(above.to(tl.int32), axis=1), axis=0)
        if count > 0:
            candidates = tl.where(above, _pack(scores, cols[None, :]), SENTINEL)
            if count > EXTRACT_LIMIT:
                best = tl.bitonic_merge(tl.maximum(best, tl.topk(candidates, K_PAD)))
            else:
                for _ in range(count):
                    top = tl.max(candidates, axis=1)
                    candidates = tl.where(candidates == top[:, None], SENTINEL, candidates)
                    insert = tl.where(slots[None, :] == 0, top[:, None], SENTINEL)
                    best = tl.bitonic_merge(tl.maximum(best, insert))
            kth = tl.max(tl.where(slots[None, :] == K_PAD - K, best, SENTINEL), axis=1)
            threshold = _unpack_score(kth)

    out = out_ptr + pid_s.to(tl.int64) * num_queries * K_PAD + rows.to(tl.int64)[:, None] * K_PAD
    tl.store(out + slots[None, :], best, mask=row_ok[:, None])
