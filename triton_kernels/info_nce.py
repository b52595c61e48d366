"""InfoNCE with multi-positive, reward-aware targets described by compact per-row data.

:func:`info_nce_reference` defines the semantics. Given queries ``q [B, D]`` and keys ``k [M, D]``,
the logits are ``s[i, j] = q[i] · k[j] / temperature`` (accumulated in fp32). Optional MoCo-style
``queue [Kq, D]`` rows add negative logits ``q[i] · queue[l] / temperature``; the queue never
receives a gradient and is never a positive.

**Without row data** (``q_info`` and ``k_info`` both ``None``), row ``i``'s only positive is
``k[i]`` (so ``B <= M``) and, with no queue, the per-row loss is exactly
``F.cross_entropy(q @ k.T / temperature, arange(B), reduction="none")``.

**With row data**, each row of ``q`` and ``k`` carries a :class:`RowInfo` (episode id, step and,
for reward-aware targets, the episode's return). For row ``i`` and column ``j``:

* ``same[i, j] = episode_i == episode_j`` and ``dt[i, j] = |step_i - step_j|``;
* ``masked[i, j] = same & (positive_radius < dt <= mask_radius)``: near windows of the same
  episode that are not positives leave the softmax altogether (neither positive nor negative);
* temporal positives ``T[i, j] = same & (dt <= positive_radius)``;
* return positives ``R[i, j] = exp(-((ret_i - ret_j) / return_bandwidth) ** 2 / 2)`` on every
  column that is not masked (only computed when ``reward_weight > 0``);
* target weights ``p[i, j] = (1 - w) T[i, j] / sum_j T[i, j] + w R[i, j] / sum_j R[i, j]`` with
  ``w = reward_weight``. When one part has no mass in a row, the other takes its weight; a row
  with no positive at all has loss 0 and is left out of the mean.

The loss of row ``i`` is ``logsumexp_{j not masked, and the queue} s[i, j] - sum_j p[i, j] s[i, j]``
(a cross-entropy against the soft target ``p``). ``reward_weight=0`` clusters windows by time,
``reward_weight=1`` by return.

:func:`info_nce` is the differentiable entry point. It dispatches to the fused Triton kernels for
CUDA tensors when Triton is available, and to the reference elsewhere; both give the same loss and
gradients. The fused forward (``triton_kernels/_info_nce_kernel.py``) streams the key tiles of each
block of rows once, keeping an online log-sum-exp over the columns left in the softmax (and the
queue) together with the row sums ``sum T``, ``sum R``, ``sum T s`` and ``sum R s``, so the
normalised targets come out of the same pass. The backward recomputes the logits tile by tile: a
row-parallel kernel for ``dq`` and a column-parallel one for ``dk``. Memory is ``O(B + M)``: four
floats per row are saved for the backward, never a ``B x M`` matrix.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from triton_kernels._launch import can_launch, interpreted, next_power_of_2, require_launch

__all__ = ["RowInfo", "info_nce", "info_nce_reference"]

_REDUCTIONS = ("none", "mean", "sum")
_BACKENDS = ("auto", "triton", "reference")
# The fused kernels hold a whole row of q and k in registers.
MAX_FUSED_DIM = 256


class RowInfo(NamedTuple):
    """Per-row description of where a window comes from: O(rows) data, never a ``B x M`` matrix.

    Attributes:
        episode (Tensor): integer episode id of each row, ``[n]``.
        step (Tensor): integer step of the window's last transition within its episode, ``[n]``.
        ret (Tensor, optional): the episode's return, ``[n]`` floating. Needed only when
            ``reward_weight > 0``.

    Examples:
        >>> import torch
        >>> from triton_kernels import RowInfo
        >>> info = RowInfo(episode=torch.tensor([0, 0, 1]), step=torch.tensor([3, 4, 0]))
        >>> info.ret is None
        True
    """

    episode: Tensor
    step: Tensor
    ret: Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------
def _check_matrix(name: str, tensor: Tensor, dim: int | None = None) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}.")
    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}.")
    if dim is not None and tensor.shape[1] != dim:
        raise ValueError(
            f"{name} must have the queries' embedding size D={dim}, got D={tensor.shape[1]}."
        )


def _check_info(name: str, info: RowInfo, rows: int, device: torch.device, need_ret: bool) -> None:
    if not isinstance(info, RowInfo):
        raise TypeError(f"{name} must be a RowInfo or None, got {type(info).__name__}.")
    fields = [("episode", info.episode, False), ("step", info.step, False)]
    if need_ret:
        if info.ret is None:
            raise ValueError(f"{name}.ret is needed when reward_weight > 0, got None.")
        fields.append(("ret", info.ret, True))
    for field, value, floating in fields:
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}.{field} must be a torch.Tensor, got {type(value).__name__}.")
        if value.shape != (rows,):
            raise ValueError(
                f"{name}.{field} must have shape ({rows},) (one entry per row), "
                f"got {tuple(value.shape)}."
            )
        if value.device != device:
            raise ValueError(f"{name}.{field} must be on {device}, got {value.device}.")
        if floating and not value.is_floating_point():
            raise TypeError(f"{name}.{field} must be floating, got {value.dtype}.")
        if not floating and (value.is_floating_point() or value.is_complex()):
            raise TypeError(f"{name}.{field} must be an integer tensor, got {value.dtype}.")
        if floating and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}.{field} holds NaN or inf; returns must be finite.")


def _check_inputs(
    q: Tensor,
    k: Tensor,
    temperature: float,
    q_info: RowInfo | None,
    k_info: RowInfo | None,
    positive_radius: int,
    reward_weight: float,
    return_bandwidth: float,
    mask_radius: int,
    queue: Tensor | None,
    reduction: str,
) -> None:
    _check_matrix("q", q)
    _check_matrix("k", k, q.shape[1])
    if k.device != q.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}.")
    if queue is not None:
        _check_matrix("queue", queue, q.shape[1])
        if queue.device != q.device:
            raise ValueError(f"queue must be on q's device {q.device}, got {queue.device}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}.")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}.")
    if not 0.0 <= reward_weight <= 1.0:
        raise ValueError(f"reward_weight must be in [0, 1], got {reward_weight}.")
    if not return_bandwidth > 0:
        raise ValueError(f"return_bandwidth must be > 0, got {return_bandwidth}.")
    if positive_radius < 0:
        raise ValueError(f"positive_radius must be >= 0, got {positive_radius}.")
    if mask_radius < 0:
        raise ValueError(f"mask_radius must be >= 0, got {mask_radius}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    if (q_info is None) != (k_info is None):
        raise ValueError("q_info and k_info must be given together (or both left None).")
    if q_info is None:
        if q.shape[0] > k.shape[0]:
            raise ValueError(
                f"without row data, row i's positive is k[i], so k needs at least B={q.shape[0]} "
                f"rows; got M={k.shape[0]}."
            )
    else:
        need_ret = reward_weight > 0
        _check_info("q_info", q_info, q.shape[0], q.device, need_ret)
        _check_info("k_info", k_info, k.shape[0], q.device, need_ret)
    for name, tensor in (("q", q), ("k", k), ("queue", queue)):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} holds NaN or inf; embeddings must be finite.")


def _reduce(loss: Tensor, has_positive: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / has_positive.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def target_weights(
    q_info: RowInfo,
    k_info: RowInfo,
    *,
    positive_radius: int = 0,
    reward_weight: float = 0.0,
    return_bandwidth: float = 1.0,
    mask_radius: int = 0,
) -> tuple[Tensor, Tensor]:
    """The dense ``[B, M]`` soft targets ``p`` and the ``masked`` columns (reference only).

    See the module docstring for the formulas. Rows without any positive get an all-zero ``p``.
    """
    same = q_info.episode[:, None] == k_info.episode[None, :]
    dt = (q_info.step[:, None] - k_info.step[None, :]).abs()
    masked = same & (dt > positive_radius) & (dt <= mask_radius)
    temporal = (same & (dt <= positive_radius)).float()
    t_sum = temporal.sum(1, keepdim=True)
    if reward_weight > 0:
        diff = (q_info.ret.float()[:, None] - k_info.ret.float()[None, :]) / return_bandwidth
        by_return = torch.exp(-0.5 * diff.square()).masked_fill(masked, 0.0)
    else:
        by_return = torch.zeros_like(temporal)
    r_sum = by_return.sum(1, keepdim=True)
    w_r = torch.full_like(t_sum, float(reward_weight))
    w_r = torch.where(t_sum == 0, 1.0, torch.where(r_sum == 0, 0.0, w_r))
    p = (1 - w_r) * temporal / t_sum.clamp_min(1e-30) + w_r * by_return / r_sum.clamp_min(1e-30)
    return p, masked


def info_nce_reference(
    q: Tensor,
    k: Tensor,
    *,
    temperature: float = 0.07,
    q_info: RowInfo | None = None,
    k_info: RowInfo | None = None,
    positive_radius: int = 0,
    reward_weight: float = 0.0,
    return_bandwidth: float = 1.0,
    mask_radius: int = 0,
    queue: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """InfoNCE computed with dense ``[B, M]`` matrices: the definition every kernel must match.

    Differentiable with respect to ``q`` and ``k`` through ordinary autograd. It uses ``O(B * M)``
    memory; :func:`info_nce` is the memory-lean entry point.

    Args:
        q (Tensor): queries (anchors), ``[B, D]``, float32/float16/bfloat16.
        k (Tensor): keys (positives and in-batch negatives), ``[M, D]``.

    Keyword Args:
        temperature (float): softmax temperature, ``> 0``. Defaults to ``0.07``.
        q_info (RowInfo, optional): episode/step/return of each query row.
        k_info (RowInfo, optional): episode/step/return of each key row.
        positive_radius (int): same-episode windows within this many steps are positives.
        reward_weight (float): in ``[0, 1]``; the share of the target given to similar-return
            windows. Defaults to ``0``.
        return_bandwidth (float): the return difference at which the return kernel falls to
            ``exp(-1/2)``. Defaults to ``1``.
        mask_radius (int): same-episode windows with ``positive_radius < dt <= mask_radius`` are
            left out of the softmax. Defaults to ``0`` (nothing masked).
        queue (Tensor, optional): extra negatives ``[Kq, D]``; no gradient flows into them.
        reduction (str): ``"none"`` (per-row ``[B]``), ``"mean"`` (over rows with a positive) or
            ``"sum"``. Defaults to ``"mean"``.

    Returns:
        The loss, ``[B]`` fp32 for ``reduction="none"``, else a scalar.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from triton_kernels import info_nce_reference
        >>> q, k = torch.randn(4, 8), torch.randn(4, 8)
        >>> loss = info_nce_reference(q, k, temperature=0.5, reduction="none")
        >>> expected = F.cross_entropy(q @ k.T / 0.5, torch.arange(4), reduction="none")
        >>> torch.allclose(loss, expected)
        True
    """
    _check_inputs(
        q, k, temperature, q_info, k_info, positive_radius, reward_weight, return_bandwidth,
        mask_radius, queue, reduction,
    )
    loss, has_positive = _reference_rows(
        q, k, temperature, q_info, k_info, positive_radius, reward_weight, return_bandwidth,
        mask_radius, queue,
    )
    return _reduce(loss, has_positive, reduction)


def _reference_rows(
    q: Tensor,
    k: Tensor,
    temperature: float,
    q_info: RowInfo | None,
    k_info: RowInfo | None,
    positive_radius: int,
    reward_weight: float,
    return_bandwidth: float,
    mask_radius: int,
    queue: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Per-row loss and has-positive mask of the reference, for checked inputs."""
    logits = q.float() @ k.float().T / temperature
    if q_info is None:
        p = torch.zeros_like(logits)
        p[torch.arange(q.shape[0]), torch.arange(q.shape[0])] = 1.0
        masked = torch.zeros_like(logits, dtype=torch.bool)
    else:
        p, masked = target_weights(
            q_info, k_info, positive_radius=positive_radius, reward_weight=reward_weight,
            return_bandwidth=return_bandwidth, mask_radius=mask_radius,
        )
    denominator = logits.masked_fill(masked, float("-inf"))
    if queue is not None:
        queue_logits = q.float() @ queue.detach().float().T / temperature
        denominator = torch.cat((denominator, queue_logits), dim=1)
    has_positive = p.sum(1) > 0
    positive_term = (p * logits.masked_fill(masked, 0.0)).sum(1)
    loss = torch.where(has_positive, torch.logsumexp(denominator, dim=1) - positive_term, 0.0)
    return loss, has_positive


# --------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------
class _Launch(NamedTuple):
    """Everything the three kernels share besides the tensors."""

    kernels: ModuleType
    scale: float
    positive_radius: int
    mask_radius: int
    reward_weight: float
    inv_bandwidth: float
    has_info: bool
    has_ret: bool
    block_b: int
    block_m: int
    block_d: int
    num_warps: int
    num_stages: int
    dot_precision: str
    dot_upcast: bool

    def constexprs(self) -> dict:
        return {
            "HAS_INFO": self.has_info,
            "HAS_RET": self.has_ret,
            "BLOCK_B": self.block_b,
            "BLOCK_M": self.block_m,
            "BLOCK_D": self.block_d,
            "DOT_PRECISION": self.dot_precision,
            "DOT_UPCAST": self.dot_upcast,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }


def _block_sizes(dim: int, dtype: torch.dtype, small_blocks: bool) -> tuple[int, int, int, int, int]:
    """``(BLOCK_B, BLOCK_M, BLOCK_D, num_warps, num_stages)`` for a row size and dtype.

    Chosen by compiling for sm_90 without a GPU (``wgmma``, shared memory within an H100's 227 KiB,
    no register spills for 16-bit inputs; 3xTF32 fp32 products still spill a little in the
    backward); they still need tuning on the device. ``small_blocks``
    is for Triton's interpreter, where smaller tiles run faster and cover more tile edges.
    """
    block_d = max(16, next_power_of_2(dim))
    if small_blocks:
        return 16, 16, block_d, 4, 1
    if dtype == torch.float32 or block_d > 128:
        return 64, 32, block_d, 8, 2
    return 64, 64, block_d, 8, 2


class _FusedInfoNCE(torch.autograd.Function):
    """Per-row InfoNCE loss with the fused kernels: returns ``(loss [B], has_positive [B])``."""

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        queue: Tensor | None,
        q_info: tuple[Tensor, Tensor, Tensor | None] | None,
        k_info: tuple[Tensor, Tensor, Tensor | None] | None,
        launch: _Launch,
    ) -> tuple[Tensor, Tensor]:
        num_q, dim = q.shape
        loss, lse, coef_t, coef_r = torch.empty(4, num_q, dtype=torch.float32, device=q.device)
        q_ep, q_step, q_ret = q_info if q_info is not None else (q, q, q)
        k_ep, k_step, k_ret = k_info if k_info is not None else (k, k, k)
        neg = queue if queue is not None else k
        launch.kernels.info_nce_fwd_kernel[(-(-num_q // launch.block_b),)](
            q, k, neg,
            q_ep, q_step, q if q_ret is None else q_ret,
            k_ep, k_step, k if k_ret is None else k_ret,
            loss, lse, coef_t, coef_r,
            num_q, k.shape[0], 0 if queue is None else queue.shape[0], dim,
            q.stride(0), k.stride(0), neg.stride(0),
            launch.scale, launch.positive_radius, launch.mask_radius, launch.reward_weight,
            launch.inv_bandwidth,
            HAS_QUEUE=queue is not None,
            **launch.constexprs(),
        )
        has_positive = (coef_t > 0) | (coef_r > 0)
        ctx.mark_non_differentiable(has_positive)
        ctx.save_for_backward(q, k, queue, lse, coef_t, coef_r, has_positive)
        ctx.q_info, ctx.k_info, ctx.launch = q_info, k_info, launch
        return loss, has_positive

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_has_positive: Tensor | None):
        q, k, queue, lse, coef_t, coef_r, has_positive = ctx.saved_tensors
        launch: _Launch = ctx.launch
        num_q, dim = q.shape
        # Rows without a positive have a constant loss of 0.
        grad = torch.where(has_positive, grad_loss.float(), 0.0).contiguous()
        q_ep, q_step, q_ret = ctx.q_info if ctx.q_info is not None else (q, q, q)
        k_ep, k_step, k_ret = ctx.k_info if ctx.k_info is not None else (k, k, k)
        q_ret = q if q_ret is None else q_ret
        k_ret = k if k_ret is None else k_ret
        dq = dk = None
        if ctx.needs_input_grad[0]:
            dq = torch.empty_like(q)
            neg = queue if queue is not None else k
            launch.kernels.info_nce_bwd_dq_kernel[(-(-num_q // launch.block_b),)](
                q, k, neg, q_ep, q_step, q_ret, k_ep, k_step, k_ret,
                lse, coef_t, coef_r, grad, dq,
                num_q, k.shape[0], 0 if queue is None else queue.shape[0], dim,
                q.stride(0), k.stride(0), neg.stride(0), dq.stride(0),
                launch.scale, launch.positive_radius, launch.mask_radius, launch.inv_bandwidth,
                HAS_QUEUE=queue is not None,
                **launch.constexprs(),
            )
        if ctx.needs_input_grad[1]:
            dk = torch.empty_like(k)
            launch.kernels.info_nce_bwd_dk_kernel[(-(-k.shape[0] // launch.block_m),)](
                q, k, q_ep, q_step, q_ret, k_ep, k_step, k_ret,
                lse, coef_t, coef_r, grad, dk,
                num_q, k.shape[0], dim,
                q.stride(0), k.stride(0), dk.stride(0),
                launch.scale, launch.positive_radius, launch.mask_radius, launch.inv_bandwidth,
                **launch.constexprs(),
            )
        return dq, dk, None, None, None, None


def _info_tensors(
    info: RowInfo | None, need_ret: bool
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    if info is None:
        return None
    ret = info.ret.float().contiguous() if need_ret else None
    return info.episode.long().contiguous(), info.step.long().contiguous(), ret


def _fused_rows(
    q: Tensor,
    k: Tensor,
    temperature: float,
    q_info: RowInfo | None,
    k_info: RowInfo | None,
    positive_radius: int,
    reward_weight: float,
    return_bandwidth: float,
    mask_radius: int,
    queue: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Per-row loss and has-positive mask from the fused kernels, for checked inputs."""
    kernels = require_launch(
        "_info_nce_kernel", "info_nce_fwd_kernel", q.device, "info_nce(backend='triton')"
    )
    if q.shape[1] > MAX_FUSED_DIM:
        raise ValueError(
            f"the fused InfoNCE kernels hold whole rows in registers: D must be at most "
            f"{MAX_FUSED_DIM}, got D={q.shape[1]}; use backend='reference'."
        )
    # One compute dtype for the products (tl.dot needs equal operand dtypes); autograd casts the
    # gradients back to each input's dtype.
    dtype = torch.promote_types(q.dtype, k.dtype)
    if queue is not None:
        dtype = torch.promote_types(dtype, queue.dtype)
        queue = queue.detach().to(dtype).contiguous()
    q = q.to(dtype).contiguous()
    k = k.to(dtype).contiguous()
    has_info = q_info is not None
    has_ret = has_info and reward_weight > 0
    interpreting = interpreted(kernels.info_nce_fwd_kernel)
    block_b, block_m, block_d, num_warps, num_stages = _block_sizes(
        q.shape[1], dtype, interpreting
    )
    launch = _Launch(
        kernels=kernels,
        scale=1.0 / float(temperature),
        positive_radius=int(positive_radius) if has_info else 0,
        mask_radius=int(mask_radius) if has_info else 0,
        reward_weight=float(reward_weight),
        inv_bandwidth=1.0 / float(return_bandwidth),
        has_info=has_info,
        has_ret=has_ret,
        block_b=block_b,
        block_m=block_m,
        block_d=block_d,
        num_warps=num_warps,
        num_stages=num_stages,
        dot_precision="tf32x3" if dtype == torch.float32 else "tf32",
        dot_upcast=interpreting and dtype == torch.bfloat16,
    )
    return _FusedInfoNCE.apply(
        q, k, queue, _info_tensors(q_info, has_ret), _info_tensors(k_info, has_ret), launch
    )


def _resolve_backend(backend: str, q: Tensor) -> str:
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}.")
    if backend != "auto":
        return backend
    usable = q.device.type == "cuda" and q.shape[1] <= MAX_FUSED_DIM
    usable = usable and can_launch("_info_nce_kernel", "info_nce_fwd_kernel", q.device)
    return "triton" if usable else "reference"


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def info_nce(
    q: Tensor,
    k: Tensor,
    *,
    temperature: float = 0.07,
    q_info: RowInfo | None = None,
    k_info: RowInfo | None = None,
    positive_radius: int = 0,
    reward_weight: float = 0.0,
    return_bandwidth: float = 1.0,
    mask_radius: int = 0,
    queue: Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Multi-positive InfoNCE; takes the same arguments as :func:`info_nce_reference`.

    With the fused Triton kernels the memory is ``O(B + M)``: the logits are recomputed tile by
    tile in the backward pass instead of being stored. Both backends give the same loss and
    gradients (up to fp32 rounding; fp16/bf16 products round like any tensor-core matmul).

    Keyword Args:
        backend (str): ``"auto"`` (the fused kernels for CUDA tensors when Triton is installed and
            ``D <= 256``, the reference otherwise), ``"triton"`` (the fused kernels; on CPU tensors
            only under Triton's interpreter, ``TRITON_INTERPRET=1``) or ``"reference"``.
            Defaults to ``"auto"``.

    See :func:`info_nce_reference` for the other arguments.

    Raises:
        TypeError, ValueError: on invalid arguments (see :func:`info_nce_reference`), an unknown
            backend, or ``backend="triton"`` where the kernels cannot run.

    Examples:
        >>> import torch
        >>> from triton_kernels import RowInfo, info_nce
        >>> q = torch.randn(6, 8, requires_grad=True)
        >>> k = torch.randn(6, 8, requires_grad=True)
        >>> info = RowInfo(episode=torch.tensor([0, 0, 0, 1, 1, 1]), step=torch.tensor([0, 1, 2] * 2))
        >>> loss = info_nce(q, k, q_info=info, k_info=info, positive_radius=1)
        >>> loss.backward()
        >>> q.grad.shape, k.grad.shape
        (torch.Size([6, 8]), torch.Size([6, 8]))
    """
    _check_inputs(
        q, k, temperature, q_info, k_info, positive_radius, reward_weight, return_bandwidth,
        mask_radius, queue, reduction,
    )
    rows = _fused_rows if _resolve_backend(backend, q) == "triton" else _reference_rows
    loss, has_positive = rows(
        q, k, temperature, q_info, k_info, positive_radius, reward_weight, return_bandwidth,
        mask_radius, queue,
    )
    return _reduce(loss, has_positive, reduction)
