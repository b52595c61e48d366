"""The Triton kernels behind :func:`triton_kernels.info_nce`: forward, dq and dk.

They live in their own module so that importing :mod:`triton_kernels` does not import Triton: this
module is loaded on the first launch.

Every kernel rebuilds the same logits tile ``s = q_tile @ k_tile.T * scale`` and, from the compact
per-row data, the same tile of pair terms (see :func:`_pair_terms`): which columns leave the softmax,
the temporal positives ``T`` and the return kernel ``R``. Nothing of size ``B x M`` is ever stored.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32. ``UPCAST`` multiplies in fp32: Triton 3.9's interpreter multiplies
    bf16 operands as raw uint16, so the launcher sets it there (and only there) for bf16."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_rows(ptr, idx, ok, stride, dim, BLOCK_D: tl.constexpr):
    """Rows ``idx`` of a ``[n, dim]`` matrix as a ``[len(idx), BLOCK_D]`` tile (zeros outside)."""
    d = tl.arange(0, BLOCK_D)
    offsets = idx.to(tl.int64)[:, None] * stride + d[None, :]
    return tl.load(ptr + offsets, mask=ok[:, None] & (d < dim)[None, :], other=0.0)


@triton.jit
def _pair_terms(
    rows,
    cols,
    col_ok,
    q_ep,
    q_step,
    q_ret,
    k_ep,
    k_step,
    k_ret,
    positive_radius,
    mask_radius,
    inv_bandwidth,
    HAS_INFO: tl.constexpr,
    HAS_RET: tl.constexpr,
):
    """The ``[rows, cols]`` tile of ``excluded`` (masked or out of range), ``T`` and ``R``.

    Without row data the only positive of row ``i`` is column ``i`` and nothing is masked.
    """
    if HAS_INFO:
        same = q_ep[:, None] == k_ep[None, :]
        dt = tl.abs(q_step[:, None] - k_step[None, :])
        excluded = (same & (dt > positive_radius) & (dt <= mask_radius)) | (~col_ok)[None, :]
        temporal = same & (dt <= positive_radius) & col_ok[None, :]
    else:
        excluded = (rows[:, None] < 0) | (~col_ok)[None, :]
        temporal = (rows[:, None] == cols[None, :]) & col_ok[None, :]
    if HAS_RET:
        diff = (q_ret[:, None] - k_ret[None, :]) * inv_bandwidth
        by_return = tl.where(excluded, 0.0, tl.exp(-0.5 * diff * diff))
    else:
        by_return = tl.zeros(excluded.shape, tl.float32)
    return excluded, temporal, by_return


@triton.jit
def _load_info(ep_ptr, step_ptr, ret_ptr, idx, ok, HAS_INFO: tl.constexpr, HAS_RET: tl.constexpr):
    """Episode, step and return of rows ``idx`` (placeholders when absent)."""
    ep = idx.to(tl.int64)
    step = idx.to(tl.int64)
    ret = idx.to(tl.float32)
    if HAS_INFO:
        ep = tl.load(ep_ptr + idx, mask=ok, other=-1)
        step = tl.load(step_ptr + idx, mask=ok, other=0)
    if HAS_RET:
        ret = tl.load(ret_ptr + idx, mask=ok, other=0.0)
    return ep, step, ret


@triton.jit
def _online_lse(m, total, s):
    """One step of a streaming log-sum-exp over the columns of ``s`` (``-inf`` entries ignored)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    total = total * tl.exp(m - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
    return m_new, total


@triton.jit
def info_nce_fwd_kernel(
    q_ptr,
    k_ptr,
    queue_ptr,
    q_ep_ptr,
    q_step_ptr,
    q_ret_ptr,
    k_ep_ptr,
    k_step_ptr,
    k_ret_ptr,
    loss_ptr,
    lse_ptr,
    coef_t_ptr,
    coef_r_ptr,
    num_q,
    num_k,
    num_queue,
    dim,
    stride_q,
    stride_k,
    stride_queue,
    scale,
    positive_radius,
    mask_radius,
    reward_weight,
    inv_bandwidth,
    HAS_INFO: tl.constexpr,
    HAS_RET: tl.constexpr,
    HAS_QUEUE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Row-parallel forward: per-row loss, log-sum-exp and target coefficients.

    Grid: ``(cdiv(B, BLOCK_B),)``. One pass over the key tiles (then the queue tiles) keeps an
    online log-sum-exp over the columns left in the softmax and the four row sums ``sum T``,
    ``sum R``, ``sum T * s`` and ``sum R * s``. From these the row's soft target is
    ``p = coef_t * T + coef_r * R``, and the loss is ``lse - coef_t * sum(T s) - coef_r * sum(R s)``.
    The backward kernels read back ``lse``, ``coef_t`` and ``coef_r``.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < num_q
    q = _load_rows(q_ptr, rows, row_ok, stride_q, dim, BLOCK_D)
    q_ep, q_step, q_ret = _load_info(
        q_ep_ptr, q_step_ptr, q_ret_ptr, rows, row_ok, HAS_INFO, HAS_RET
    )

    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_B], tl.float32)
    t_sum = tl.zeros([BLOCK_B], tl.float32)
    r_sum = tl.zeros([BLOCK_B], tl.float32)
    ts_sum = tl.zeros([BLOCK_B], tl.float32)
    rs_sum = tl.zeros([BLOCK_B], tl.float32)
    for start in range(0, num_k, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < num_k
        k = _load_rows(k_ptr, cols, col_ok, stride_k, dim, BLOCK_D)
        s = _dot(
            q, tl.trans(k), tl.zeros([BLOCK_B, BLOCK_M], tl.float32), DOT_PRECISION, DOT_UPCAST
        )
        s = s * scale
        k_ep, k_step, k_ret = _load_info(
            k_ep_ptr, k_step_ptr, k_ret_ptr, cols, col_ok, HAS_INFO, HAS_RET
        )
        excluded, temporal, by_return = _pair_terms(
            rows,
            cols,
            col_ok,
            q_ep,
            q_step,
            q_ret,
            k_ep,
            k_step,
            k_ret,
            positive_radius,
            mask_radius,
            inv_bandwidth,
            HAS_INFO,
            HAS_RET,
        )
        m, total = _online_lse(m, total, tl.where(excluded, float("-inf"), s))
        t_sum += tl.sum(temporal.to(tl.float32), axis=1)
        ts_sum += tl.sum(tl.where(temporal, s, 0.0), axis=1)
        if HAS_RET:
            r_sum += tl.sum(by_return, axis=1)
            rs_sum += tl.sum(by_return * s, axis=1)
    if HAS_QUEUE:
        for start in range(0, num_queue, BLOCK_M):
            cols = start + tl.arange(0, BLOCK_M)
            col_ok = cols < num_queue
            neg = _load_rows(queue_ptr, cols, col_ok, stride_queue, dim, BLOCK_D)
            s = _dot(
                q,
                tl.trans(neg),
                tl.zeros([BLOCK_B, BLOCK_M], tl.float32),
                DOT_PRECISION,
                DOT_UPCAST,
            )
            m, total = _online_lse(m, total, tl.where(col_ok[None, :], s * scale, float("-inf")))

    lse = m + tl.log(tl.maximum(total, 1e-30))  # total >= 1 unless every column is masked
    has_positive = (t_sum > 0) | (r_sum > 0)
    # One part without mass gives its weight to the other (the reference's rule).
    w_r = tl.where(t_sum == 0, 1.0, tl.where(r_sum == 0, 0.0, reward_weight))
    coef_t = tl.where(has_positive, (1.0 - w_r) / tl.maximum(t_sum, 1e-30), 0.0)
    coef_r = tl.where(has_positive, w_r / tl.maximum(r_sum, 1e-30), 0.0)
    loss = tl.where(has_positive, lse - coef_t * ts_sum - coef_r * rs_sum, 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(coef_t_ptr + rows, coef_t, mask=row_ok)
    tl.store(coef_r_ptr + rows, coef_r, mask=row_ok)


@triton.jit
def _logit_grads(
    q,
    k,
    rows,
    cols,
    col_ok,
    lse,
    coef_t,
    coef_r,
    grad,
    q_ep,
    q_step,
    q_ret,
    k_ep,
    k_step,
    k_ret,
    scale,
    positive_radius,
    mask_radius,
    inv_bandwidth,
    HAS_INFO: tl.constexpr,
    HAS_RET: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """``d loss / d s`` on one tile: ``grad_i * (softmax_ij - p_ij)``."""
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_B, BLOCK_M], tl.float32), DOT_PRECISION, DOT_UPCAST)
    s = s * scale
    excluded, temporal, by_return = _pair_terms(
        rows,
        cols,
        col_ok,
        q_ep,
        q_step,
        q_ret,
        k_ep,
        k_step,
        k_ret,
        positive_radius,
        mask_radius,
        inv_bandwidth,
        HAS_INFO,
        HAS_RET,
    )
    prob = tl.where(excluded, 0.0, tl.exp(s - lse[:, None]))
    target = coef_t[:, None] * temporal.to(tl.float32) + coef_r[:, None] * by_return
    return grad[:, None] * (prob - target)


@triton.jit
def info_nce_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    queue_ptr,
    q_ep_ptr,
    q_step_ptr,
    q_ret_ptr,
    k_ep_ptr,
    k_step_ptr,
    k_ret_ptr,
    lse_ptr,
    coef_t_ptr,
    coef_r_ptr,
    grad_ptr,
    dq_ptr,
    num_q,
    num_k,
    num_queue,
    dim,
    stride_q,
    stride_k,
    stride_queue,
    stride_dq,
    scale,
    positive_radius,
    mask_radius,
    inv_bandwidth,
    HAS_INFO: tl.constexpr,
    HAS_RET: tl.constexpr,
    HAS_QUEUE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Row-parallel ``dq = scale * sum_j ds_ij k_j`` (keys and queue), recomputing the tiles.

    Grid: ``(cdiv(B, BLOCK_B),)``. ``grad`` is the upstream gradient of each row's loss, already
    zero for rows without a positive.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < num_q
    q = _load_rows(q_ptr, rows, row_ok, stride_q, dim, BLOCK_D)
    q_ep, q_step, q_ret = _load_info(
        q_ep_ptr, q_step_ptr, q_ret_ptr, rows, row_ok, HAS_INFO, HAS_RET
    )
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    # A row with nothing in its softmax has lse = -inf, no positive and a zero gradient.
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    coef_t = tl.load(coef_t_ptr + rows, mask=row_ok, other=0.0)
    coef_r = tl.load(coef_r_ptr + rows, mask=row_ok, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for start in range(0, num_k, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < num_k
        k = _load_rows(k_ptr, cols, col_ok, stride_k, dim, BLOCK_D)
        k_ep, k_step, k_ret = _load_info(
            k_ep_ptr, k_step_ptr, k_ret_ptr, cols, col_ok, HAS_INFO, HAS_RET
        )
        ds = _logit_grads(
            q,
            k,
            rows,
            cols,
            col_ok,
            lse,
            coef_t,
            coef_r,
            grad,
            q_ep,
            q_step,
            q_ret,
            k_ep,
            k_step,
            k_ret,
            scale,
            positive_radius,
            mask_radius,
            inv_bandwidth,
            HAS_INFO,
            HAS_RET,
            BLOCK_B,
            BLOCK_M,
            DOT_PRECISION,
            DOT_UPCAST,
        )
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PRECISION, DOT_UPCAST)
    if HAS_QUEUE:
        for start in range(0, num_queue, BLOCK_M):
            cols = start + tl.arange(0, BLOCK_M)
            col_ok = cols < num_queue
            neg = _load_rows(queue_ptr, cols, col_ok, stride_queue, dim, BLOCK_D)
            s = _dot(
                q,
                tl.trans(neg),
                tl.zeros([BLOCK_B, BLOCK_M], tl.float32),
                DOT_PRECISION,
                DOT_UPCAST,
            )
            prob = tl.where(col_ok[None, :], tl.exp(s * scale - lse[:, None]), 0.0)
            dq = _dot((grad[:, None] * prob).to(neg.dtype), neg, dq, DOT_PRECISION, DOT_UPCAST)
    d = tl.arange(0, BLOCK_D)
    out = dq_ptr + rows.to(tl.int64)[:, None] * stride_dq + d[None, :]
    tl.store(
        out, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & (d < dim)[None, :]
    )


@triton.jit
def info_nce_bwd_dk_kernel(
    q_ptr,
    k_ptr,
    q_ep_ptr,
    q_step_ptr,
    q_ret_ptr,
    k_ep_ptr,
    k_step_ptr,
    k_ret_ptr,
    lse_ptr,
    coef_t_ptr,
    coef_r_ptr,
    grad_ptr,
    dk_ptr,
    num_q,
    num_k,
    dim,
    stride_q,
    stride_k,
    stride_dk,
    scale,
    positive_radius,
    mask_radius,
    inv_bandwidth,
    HAS_INFO: tl.constexpr,
    HAS_RET: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Column-parallel ``dk = scale * sum_i ds_ij q_i``, recomputing the tiles.

    Grid: ``(cdiv(M, BLOCK_M),)``. Each program owns ``BLOCK_M`` keys and streams the row tiles of
    ``q`` with their saved ``lse`` and target coefficients.
    """
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < num_k
    k = _load_rows(k_ptr, cols, col_ok, stride_k, dim, BLOCK_D)
    k_ep, k_step, k_ret = _load_info(
        k_ep_ptr, k_step_ptr, k_ret_ptr, cols, col_ok, HAS_INFO, HAS_RET
    )

    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, num_q, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        row_ok = rows < num_q
        q = _load_rows(q_ptr, rows, row_ok, stride_q, dim, BLOCK_D)
        q_ep, q_step, q_ret = _load_info(
            q_ep_ptr, q_step_ptr, q_ret_ptr, rows, row_ok, HAS_INFO, HAS_RET
        )
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        coef_t = tl.load(coef_t_ptr + rows, mask=row_ok, other=0.0)
        coef_r = tl.load(coef_r_ptr + rows, mask=row_ok, other=0.0)
        grad = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
        ds = _logit_grads(
            q,
            k,
            rows,
            cols,
            col_ok,
            lse,
            coef_t,
            coef_r,
            grad,
            q_ep,
            q_step,
            q_ret,
            k_ep,
            k_step,
            k_ret,
            scale,
            positive_radius,
            mask_radius,
            inv_bandwidth,
            HAS_INFO,
            HAS_RET,
            BLOCK_B,
            BLOCK_M,
            DOT_PRECISION,
            DOT_UPCAST,
        )
        dk = _dot(tl.trans(ds).to(q.dtype), q, dk, DOT_PRECISION, DOT_UPCAST)
    d = tl.arange(0, BLOCK_D)
    out = dk_ptr + cols.to(tl.int64)[:, None] * stride_dk + d[None, :]
    tl.store(
        out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None] & (d < dim)[None, :]
    )
