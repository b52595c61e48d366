"""Key-health and key-quality metrics of the memory's keys.

Whether an encoder has collapsed:

* :func:`effective_rank` counts, softly, how many directions the keys really use;
* :func:`collapse_score` maps it to ``[0, 1]``: ``0`` for keys using every direction evenly,
  ``1`` for keys on a single line;
* :func:`mean_pairwise_cosine` says how close the keys sit to one another on average.

Healthy keys have an effective rank near their dimension and a mean pairwise cosine near zero.
Collapsed keys have an effective rank near one and a mean pairwise cosine near one.

Whether the keys are useful for retrieval (what consolidation is meant to improve):

* :func:`retrieval_sharpness`: how much nearer the retrieved neighbours are than a random key;
* :func:`reward_alignment`: the correlation of key similarity with return similarity;
* :func:`nn_return_consistency`: how often the nearest window of *another* episode comes from
  an episode with a similar return;
* :func:`temporal_margin`: how much nearer a window's temporal neighbours are than other
  episodes' windows;
* :func:`key_staleness`: how many target-encoder updates ago the keys were computed.

Every metric carries no gradient. The pairwise ones build an ``N x N`` similarity matrix, so
they are meant for a sample of the memory (:class:`~torchrl_hippo.consolidation.Consolidator`
uses ``quality_rows`` rows); nearest-neighbour searches go through
:func:`torchrl_hippo.search.topk_similarity`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchrl_hippo.search import topk_similarity

__all__ = [
    "collapse_score",
    "effective_rank",
    "key_staleness",
    "mean_pairwise_cosine",
    "nn_return_consistency",
    "retrieval_sharpness",
    "reward_alignment",
    "temporal_margin",
]


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


def collapse_score(x: Tensor) -> Tensor:
    r"""How collapsed a set of vectors is: ``0`` when they use every direction evenly, ``1`` on a line.

    With :math:`r = \min(N, D)` and :func:`effective_rank` :math:`\operatorname{erank}(x)`,

    .. math::

        \operatorname{collapse}(x) = 1 - \frac{\operatorname{erank}(x) - 1}{r - 1},

    clipped to :math:`[0, 1]`. When :math:`r = 1` every set lies on one line and the score is
    ``1``; an all-zero ``x`` also scores ``1``.

    Args:
        x (Tensor): the vectors, one per row, of shape ``[N, D]`` (floating point, ``N >= 2``).

    Returns:
        A 0-dim tensor in ``[0, 1]`` (float32, or float64 for float64 input), without gradient.

    Examples:
        >>> import torch
        >>> from torchrl_hippo.metrics import collapse_score
        >>> round(collapse_score(torch.eye(8)).item(), 4)
        0.0
        >>> collapse_score(torch.randn(50, 1) * torch.randn(1, 8)).item() > 0.99
        True
    """
    erank = effective_rank(x)
    r = min(x.shape)
    if r == 1:
        return torch.ones_like(erank)
    return (1.0 - (erank - 1.0) / (r - 1)).clamp(0.0, 1.0)


def _unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit norm (a zero row stays zero), in float32 at least, without gradient."""
    return torch.nn.functional.normalize(x.detach().to(_compute_dtype(x)), dim=-1)


def _check_rows(values: Tensor, name: str, n: int, *, floating: bool) -> None:
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [N], got {type(values).__name__}.")
    if values.shape != (n,):
        raise ValueError(
            f"{name} must have shape [N] = ({n},) (one value per key), got {tuple(values.shape)}."
        )
    if floating and not bool(torch.isfinite(values.double()).all()):
        raise ValueError(f"{name} holds NaN or inf values; expected finite numbers.")
    if not floating and values.is_floating_point():
        raise TypeError(f"{name} must be an integer tensor, got dtype {values.dtype}.")


def _neighbours(u: Tensor, k: int, backend: str) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest other rows of each row of ``u``: ``(scores [N, k], indices [N, k])``.

    Searches ``k + 1`` neighbours and drops the row itself (or, when duplicates outrank it, the
    last of them), so exactly ``k`` remain per row.
    """
    n = u.shape[0]
    scores, index = topk_similarity(u, u, k + 1, backend=backend)
    is_self = index == torch.arange(n, device=u.device).unsqueeze(1)
    keep = ~is_self
    keep[:, -1] &= is_self.any(dim=1)
    return scores[keep].reshape(n, k), index[keep].reshape(n, k)


def retrieval_sharpness(keys: Tensor, k: int = 5, *, backend: str = "auto") -> Tensor:
    r"""How much nearer a key's ``k`` nearest neighbours are than the average key.

    With unit rows :math:`u_i` (cosine similarity :math:`c_{ij} = u_i \cdot u_j`) and
    :math:`\mathcal N_k(i)` the ``k`` nearest other rows of row ``i``
    (:func:`torchrl_hippo.search.topk_similarity`),

    .. math::

        \operatorname{sharpness} = \frac1N \sum_i \Big( \frac1k \sum_{j \in \mathcal N_k(i)} c_{ij}
            \;-\; \frac{1}{N - 1} \sum_{j \neq i} c_{ij} \Big).

    It lies in ``[0, 2]``: ``0`` when retrieval cannot tell neighbours from any other key
    (all keys equally similar, e.g. collapsed), larger when retrieved neighbours stand out.
    The mean over all other rows uses :math:`\sum_{j \neq i} c_{ij} = u_i \cdot (\sum_j u_j - u_i)`,
    so no ``N x N`` matrix is built.

    Args:
        keys (Tensor): ``[N, D]`` floating point, ``N >= k + 1``.
        k (int, optional): neighbours per key. Defaults to ``5``.

    Keyword Args:
        backend (str, optional): search backend. Defaults to ``"auto"``.

    Returns:
        A 0-dim tensor (float32, or float64 for float64 input), without gradient.

    Examples:
        >>> import torch
        >>> from torchrl_hippo.metrics import retrieval_sharpness
        >>> centres = torch.eye(4).repeat_interleave(10, dim=0)  # 4 tight clusters of 10
        >>> keys = centres + 0.01 * torch.randn(40, 4)
        >>> round(retrieval_sharpness(keys, k=3).item(), 1)  # 1 - (9 * 1 + 30 * 0) / 39
        0.8
    """
    _check_matrix(keys, "keys")
    n = keys.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - 1:
        raise ValueError(f"k must be an int in [1, N - 1] = [1, {n - 1}], got {k!r}.")
    u = _unit_rows(keys)
    top, _ = _neighbours(u, k, backend)
    mean_other = (u * (u.sum(dim=0, keepdim=True) - u)).sum(dim=1) / (n - 1)
    return (top.to(u.dtype).mean(dim=1) - mean_other).mean()


def reward_alignment(keys: Tensor, returns: Tensor) -> Tensor:
    r"""Pearson correlation between key similarity and return similarity over all pairs.

    Over the pairs :math:`i < j`, with :math:`c_{ij} = u_i \cdot u_j` the cosine similarity of
    the keys and :math:`r_{ij} = -\lvert R_i - R_j \rvert` the (negated) return gap,

    .. math::

        \operatorname{alignment} = \operatorname{corr}_{i<j}\big(c_{ij},\, r_{ij}\big)
            = \frac{\operatorname{cov}(c, r)}{\sigma_c\, \sigma_r} \in [-1, 1].

    Positive when keys of episodes with close returns sit closer together; about ``0`` when
    the keys ignore returns. ``nan`` when either side is constant (e.g. every return equal).
    Builds the ``N x N`` matrices in float64: use a sample of the memory.

    Args:
        keys (Tensor): ``[N, D]`` floating point, ``N >= 2``.
        returns (Tensor): ``[N]`` finite episode returns of the keys' windows.

    Returns:
        A 0-dim tensor (float32, or float64 for float64 input), without gradient.

    Examples:
        >>> import torch
        >>> from torchrl_hippo.metrics import reward_alignment
        >>> returns = torch.tensor([0.0, 0.1, 5.0, 5.1])
        >>> keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> reward_alignment(keys, returns).item() > 0.9
        True
    """
    _check_matrix(keys, "keys")
    n = keys.shape[0]
    _check_rows(returns, "returns", n, floating=True)
    u = torch.nn.functional.normalize(keys.detach().double(), dim=-1)
    upper = torch.triu_indices(n, n, offset=1, device=keys.device)
    sim = (u @ u.T)[upper[0], upper[1]]
    ret = returns.detach().double()
    gap = -(ret[upper[0]] - ret[upper[1]]).abs()
    sim, gap = sim - sim.mean(), gap - gap.mean()
    denom = (sim.square().sum() * gap.square().sum()).sqrt()
    corr = (sim * gap).sum() / denom if denom > 0 else sim.new_tensor(math.nan)
    return corr.to(_compute_dtype(keys))


def nn_return_consistency(
    keys: Tensor,
    returns: Tensor,
    episodes: Tensor,
    *,
    num_bins: int = 4,
    backend: str = "auto",
) -> Tensor:
    r"""Share of keys whose nearest key from *another episode* has a return in the same bin.

    Returns are cut into ``num_bins`` quantile bins, :math:`b(R)`, with edges at the
    :math:`1/B, \dots, (B-1)/B` quantiles of ``returns`` (tied returns share a bin). With
    :math:`n(i)` the most similar key (cosine, :func:`torchrl_hippo.search.topk_similarity`)
    among the keys of episodes other than row ``i``'s,

    .. math::

        \operatorname{consistency} = \frac1N \sum_i \mathbb 1\big[b(R_{n(i)}) = b(R_i)\big].

    Same-episode keys are left out because overlapping windows of one episode are near one
    another whatever the encoder learnt. Chance level is :math:`\sum_b p_b^2` (``p_b`` the share
    of keys in bin ``b``): ``1 / num_bins`` for distinct returns, ``0.5`` for two equal groups.
    ``nan`` when all keys come from one episode.

    Args:
        keys (Tensor): ``[N, D]`` floating point, ``N >= 2``.
        returns (Tensor): ``[N]`` finite episode returns.
        episodes (Tensor): ``[N]`` integer episode ids.

    Keyword Args:
        num_bins (int, optional): quantile bins of the returns (``>= 1``). Defaults to ``4``.
        backend (str, optional): search backend. Defaults to ``"auto"``.

    Returns:
        A 0-dim float32 tensor in ``[0, 1]``.

    Examples:
        >>> import torch
        >>> from torchrl_hippo.metrics import nn_return_consistency
        >>> keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> returns = torch.tensor([0.0, 0.0, 1.0, 1.0])
        >>> episodes = torch.tensor([0, 1, 2, 3])
        >>> nn_return_consistency(keys, returns, episodes, num_bins=2).item()
        1.0
        >>> mixed = torch.tensor([0.0, 1.0, 0.0, 1.0])  # nearest keys have different returns
        >>> nn_return_consistency(keys, mixed, episodes, num_bins=2).item()
        0.0
    """
    _check_matrix(keys, "keys")
    n = keys.shape[0]
    _check_rows(returns, "returns", n, floating=True)
    _check_rows(episodes, "episodes", n, floating=False)
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}.")
    _, counts = torch.unique(episodes, return_counts=True)
    if counts.numel() < 2:
        return torch.tensor(math.nan, device=keys.device)
    ret = returns.detach().double()
    quantiles = torch.arange(1, num_bins, device=ret.device, dtype=torch.float64) / num_bins
    bins = torch.bucketize(ret, torch.quantile(ret, quantiles))
    # At most `largest` rows share row i's episode, so `largest + 1` neighbours include another.
    k = min(n - 1, int(counts.max()))
    _, index = _neighbours(_unit_rows(keys), k, backend)
    other = episodes[index] != episodes.unsqueeze(1)
    first = other.to(torch.uint8).argmax(dim=1, keepdim=True)
    nearest = index.gather(1, first).squeeze(1)
    return (bins[nearest] == bins).float().mean()


def temporal_margin(keys: Tensor, episodes: Tensor, steps: Tensor, *, radius: int) -> Tensor:
    r"""How much more similar a key is to its temporal neighbours than to other episodes' keys.

    With :math:`c_{ij}` the cosine similarity, :math:`T(i) = \{j \neq i : e_j = e_i,
    \lvert t_j - t_i \rvert \le \text{radius}\}` the temporal neighbours and
    :math:`O(i) = \{j : e_j \neq e_i\}` the other episodes' keys,

    .. math::

        \operatorname{margin} = \frac{1}{\lvert I \rvert} \sum_{i \in I}
            \Big(\operatorname{mean}_{j \in T(i)} c_{ij} - \operatorname{mean}_{j \in O(i)} c_{ij}\Big),

    over the rows :math:`I` that have both. It lies in ``[-2, 2]``; positive when temporal
    neighbours are nearer. ``nan`` when no row has both. Builds ``N x N`` matrices: use a sample.

    Args:
        keys (Tensor): ``[N, D]`` floating point, ``N >= 2``.
        episodes (Tensor): ``[N]`` integer episode ids.
        steps (Tensor): ``[N]`` integer steps within the episodes.

    Keyword Args:
        radius (int): the largest step gap of a temporal neighbour (``>= 1``).

    Returns:
        A 0-dim tensor (float32, or float64 for float64 input), without gradient.

    Examples:
        >>> import torch
        >>> from torchrl_hippo.metrics import temporal_margin
        >>> keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        >>> episodes = torch.tensor([0, 0, 1, 1])
        >>> steps = torch.tensor([0, 1, 0, 1])
        >>> temporal_margin(keys, episodes, steps, radius=1).item()
        1.0
    """
    _check_matrix(keys, "keys")
    n = keys.shape[0]
    _check_rows(episodes, "episodes", n, floating=False)
    _check_rows(steps, "steps", n, floating=False)
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ValueError(f"radius must be a positive int, got {radius!r}.")
    u = _unit_rows(keys)
    sim = u @ u.T
    same = episodes.unsqueeze(1) == episodes.unsqueeze(0)
    near = (steps.unsqueeze(1) - steps.unsqueeze(0)).abs() <= radius
    temporal = same & near & ~torch.eye(n, dtype=torch.bool, device=keys.device)
    other = ~same
    n_t, n_o = temporal.sum(1), other.sum(1)
    rows = (n_t > 0) & (n_o > 0)
    if not bool(rows.any()):
        return torch.tensor(math.nan, dtype=u.dtype, device=keys.device)
    mean_t = (sim * temporal).sum(1) / n_t.clamp_min(1)
    mean_o = (sim * other).sum(1) / n_o.clamp_min(1)
    return (mean_t - mean_o)[rows].mean()


def key_staleness(key_version: Tensor, version: int | Tensor) -> Tensor:
    r"""Mean number of target-encoder updates since the keys were computed.

    .. math::

        \operatorname{staleness} = \frac1N \sum_i \big(v - v_i\big),

    with :math:`v` the encoder's current ``version`` and :math:`v_i` each key's
    ``("hippo", "key_version")``. ``0`` means every key comes from the current target encoder.

    Args:
        key_version (Tensor): ``[N]`` integer versions of the keys (``N >= 1``).
        version (int or Tensor): the encoder's current version.

    Returns:
        A 0-dim float32 tensor.

    Examples:
        >>> import torch
        >>> from torchrl_hippo.metrics import key_staleness
        >>> key_staleness(torch.tensor([3, 5, 5, 7]), 7).item()
        2.0
    """
    if not isinstance(key_version, Tensor) or key_version.ndim != 1 or key_version.numel() == 0:
        raise ValueError("key_version must be a non-empty 1-D integer tensor of key versions.")
    _check_rows(key_version, "key_version", key_version.numel(), floating=False)
    version = torch.as_tensor(version, device=key_version.device)
    return (version - key_version).double().mean().float()
