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

:func:`info_nce` is the differentiable entry point. It dispatches to the fused Triton kernel for
CUDA tensors when Triton is available, and to the reference elsewhere; both give the same loss and
gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["RowInfo", "info_nce", "info_nce_reference"]

_REDUCTIONS = ("none", "mean", "sum")


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
    return _reduce(loss, has_positive, reduction)


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
) -> Tensor:
    """Multi-positive InfoNCE; takes the same arguments as :func:`info_nce_reference`.

    On CUDA tensors with Triton available it runs the fused kernel (``O(B + M)`` memory); elsewhere
    it runs :func:`info_nce_reference`.

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
    return info_nce_reference(
        q, k, temperature=temperature, q_info=q_info, k_info=k_info,
        positive_radius=positive_radius, reward_weight=reward_weight,
        return_bandwidth=return_bandwidth, mask_radius=mask_radius, queue=queue,
        reduction=reduction,
    )
