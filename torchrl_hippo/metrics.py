"""Key-health metrics: how well a set of memory keys spreads over its embedding space.

Two numbers summarise whether an encoder has collapsed:

* :func:`effective_rank` counts, softly, how many directions the keys really use;
* :func:`mean_pairwise_cosine` says how close the keys sit to one another on average.

Healthy keys have an effective rank near their dimension and a mean pairwise cosine near zero.
Collapsed keys have an effective rank near one and a mean pairwise cosine near one.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["effective_rank", "mean_pairwise_cosine"]


def _check_matrix(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [N, D], got {type(x).__name__}.")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}.")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D with shape [N, D], got shape {tuple(x.shape)}.")
    if x.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 rows (N >= 2), got N={x.shape[0]}.")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must hold at least 1 column (D >= 1), got D={x.shape[1]}.")


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Half precision is too coarse for SVDs and long sums: work in float32 at least.
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def effective_rank(x: Tensor) -> Tensor:
    r"""Effective rank of a set of vectors (Roy & Vetterli, 2007).

    With :math:`s_1, \dots, s_K` the singular values of ``x`` (used as given, not centred),

    .. math::

        p_i = \frac{s_i}{\sum_j s_j}, \qquad
        \operatorname{erank}(x) = \exp\Big(-\sum_i p_i \log p_i\Big),

    with :math:`0 \log 0 = 0`. The value lies in :math:`[1, \min(N, D)]`: it is ``1`` when every
    row is a multiple of the same vector and ``min(N, D)`` when all singular values are equal.
    An all-zero ``x`` has no direction at all and gives ``0``.

    Args:
        x (Tensor): the vectors, one per row, of shape ``[N, D]`` (floating point, ``N >= 2``).

    Returns:
        A 0-dim tensor (float32, or float64 for float64 input) that carries no gradient.

    Raises:
        TypeError: if ``x`` is not a tensor.
        ValueError: if ``x`` is not a 2-D floating-point tensor with at least 2 rows.

    Examples:
        >>> import torch
        >>> from torchrl_hippo.metrics import effective_rank
        >>> round(effective_rank(torch.eye(16)).item(), 3)
        16.0
        >>> rank_one = torch.randn(100, 1) * torch.randn(1, 16)
        >>> round(effective_rank(rank_one).item(), 3)
        1.0
    """
    _check_matrix(x, "x")
    s = torch.linalg.svdvals(x.detach().to(_compute_dtype(x)))
    total = s.sum()
    if total <= 0:
        return total.new_zeros(())
    p = s / total
    return torch.exp(-torch.special.xlogy(p, p).sum())


def mean_pairwise_cosine(x: Tensor) -> Tensor:
    r"""Mean cosine similarity over all ordered pairs of distinct rows of ``x``.

    With :math:`u_i = x_i / \lVert x_i \rVert` (a zero row stays zero),

    .. math::

        \bar c = \frac{1}{N(N-1)} \sum_{i \neq j} u_i \cdot u_j
               = \frac{\lVert \sum_i u_i \rVert^2 - \sum_i \lVert u_i \rVert^2}{N(N-1)}.

    The right-hand side is what is computed: it needs ``O(N D)`` time and memory and never
    builds the ``N x N`` similarity matrix, so any ``N`` is fine. Sums run in float64.

    Args:
        x (Tensor): the vectors, one per row, of shape ``[N, D]`` (floating point, ``N >= 2``).

    Returns:
        A 0-dim tensor in ``[-1 / (N - 1), 1]`` (float32, or float64 for float64 input) that
        carries no gradient.

    Raises:
        TypeError: if ``x`` is not a tensor.
        ValueError: if ``x`` is not a 2-D floating-point tensor with at least 2 rows.

    Examples:
        >>> import torch
        >>> from torchrl_hippo.metrics import mean_pairwise_cosine
        >>> mean_pairwise_cosine(torch.ones(5, 3)).item()
        1.0
        >>> mean_pairwise_cosine(torch.eye(4)).item()
        0.0
        >>> keys = torch.nn.functional.normalize(torch.randn(1000, 64), dim=-1)
        >>> abs(mean_pairwise_cosine(keys).item()) < 0.01
        True
    """
    _check_matrix(x, "x")
    n = x.shape[0]
    u = torch.nn.functional.normalize(x.detach().to(torch.float64), dim=-1)
    total = u.sum(dim=0).square().sum()
    diagonal = u.square().sum()
    return ((total - diagonal) / (n * (n - 1))).to(_compute_dtype(x))
