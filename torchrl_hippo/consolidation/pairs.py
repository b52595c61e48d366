"""PairSampler: anchor and positive windows for consolidation, drawn from the stored episodes."""

from __future__ import annotations

from typing import NamedTuple

import torch
from tensordict import NestedKey, TensorDict
from torch import Tensor

from torchrl_hippo.data.storage import HIPPO_KEYS, HippoStorage

__all__ = ["PairSampler", "eligible_rows"]

_EMPTY = "Cannot consolidate an empty memory: extend the replay buffer first."


def eligible_rows(storage: HippoStorage, *, include_running: bool = False) -> Tensor:
    """Storage rows that consolidation may use: stored rows of finished episodes.

    Rows of episodes still running carry a running sum rather than a return, so they are left
    out unless ``include_running`` is set.

    Args:
        storage (HippoStorage): the memory.

    Keyword Args:
        include_running (bool, optional): also take rows of episodes that have not ended.
            Defaults to ``False``.

    Returns:
        The rows, int64 ``[n]``, increasing, on the storage's device (empty when none).

    Raises:
        RuntimeError: if the memory is empty.

    Examples:
        >>> from tensordict import TensorDict
        >>> import torch
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
        >>> from torchrl_hippo.consolidation import eligible_rows
        >>> rb = TensorDictReplayBuffer(
        ...     storage=HippoStorage(50),
        ...     writer=HippoWriter(DualEncoder(3, 2, 16, window=4)),
        ...     sampler=HippoSampler(),
        ... )
        >>> done = torch.zeros(8, 1, dtype=torch.bool)
        >>> done[4] = True  # one finished episode of 5 steps, one still running
        >>> _ = rb.extend(TensorDict(
        ...     {"observation": torch.randn(8, 3), "action": torch.randn(8, 2),
        ...      "next": {"reward": torch.ones(8, 1), "done": done}},
        ...     batch_size=[8],
        ... ))
        >>> eligible_rows(rb.storage)
        tensor([0, 1, 2, 3, 4])
        >>> eligible_rows(rb.storage, include_running=True).numel()
        8
    """
    if not isinstance(storage, HippoStorage):
        raise TypeError(f"storage must be a HippoStorage, got {type(storage).__name__}.")
    if not storage.initialized or storage.num_valid == 0:
        raise RuntimeError(_EMPTY)
    table = storage.episodes
    usable = table["rows"] > 0
    if not include_running:
        usable = usable & table["done"]
    slot = storage.row_slot[: len(storage)]
    keep = (slot >= 0) & usable[slot.clamp_min(0)]
    return keep.nonzero().squeeze(1)


class _EpisodeIndex(NamedTuple):
    """Eligible rows sorted by (episode slot, step), so each episode is one contiguous run."""

    rows: Tensor  # [n] storage rows, sorted by slot then step
    slot: Tensor  # [n] their episode-table slots
    start: Tensor  # [table size] first position of each slot's run
    count: Tensor  # [table size] length of each slot's run (0 for unused slots)
    slots: Tensor  # [E] the slots that have a run


def _draw_neighbour(pos: Tensor, lo: Tensor, hi: Tensor, radius: int, u: Tensor) -> Tensor:
    """A uniform position ``pos + d``, ``0 < |d| <= radius``, inside ``[lo, hi)``; else ``pos``.

    ``u`` holds uniform draws in ``[0, 1)``, one per position.
    """
    below = (pos - lo).clamp(max=radius)
    above = (hi - 1 - pos).clamp(max=radius)
    n = below + above
    pick = (u * n).long().clamp_max((n - 1).clamp_min(0))
    offset = torch.where(pick < below, pick - below, pick - below + 1)
    return torch.where(n > 0, pos + offset, pos)


class PairSampler:
    """Draws anchor windows and their positives from a :class:`~torchrl_hippo.HippoStorage`.

    Anchors are stored rows of finished episodes, drawn uniformly (with replacement). Each
    anchor's positive is, with probability ``reward_weight``, a window of *another* episode
    with a similar return, and otherwise a temporal neighbour in its own episode:

    - **temporal**: a row of the same episode ``d`` steps away, ``d`` uniform among the
      non-zero offsets with ``|d| <= positive_radius`` that the memory holds (a one-row
      episode is its own positive);
    - **by return**: the stored episodes are ranked by return (ties in random order, drawn
      anew for every batch), an episode is picked uniformly among the ``return_neighbours``
      ranks on either side of the anchor's, and one of its rows uniformly. With a single
      eligible episode every positive is temporal.

    Windows are rebuilt with :meth:`HippoStorage.gather_windows`, and everything is
    vectorised over the batch on the storage's device: no Python loop over episodes. The
    per-episode index (rows sorted by episode and step, built with one sort) is cached until
    the memory is written to.

    The result has batch ``[batch_size]`` and holds ``"anchor"`` and ``"positive"``
    sub-TensorDicts (the window entries, the window mask, ``("hippo", "episode")``,
    ``("hippo", "step")``, ``("hippo", "return")`` and the storage row ``"index"``) and
    ``"by_return"``, ``True`` where the positive comes from another episode: the input of
    :class:`~torchrl_hippo.objectives.ReturnAwareContrastiveLoss`.

    Args:
        window (int): window length, as the encoder's ``window``.

    Keyword Args:
        positive_radius (int, optional): the largest step offset of a temporal positive
            (``>= 1``). Defaults to ``2``.
        reward_weight (float, optional): probability that a positive is drawn by return, in
            ``[0, 1]``. Defaults to ``0.5``.
        return_neighbours (int, optional): return ranks on either side that a by-return
            positive may come from (``>= 1``). Defaults to ``4``.
        include_running (bool, optional): also draw rows of episodes that have not ended
            (their return is a running sum). Defaults to ``False``.
        window_keys (tuple of NestedKey, optional): the entries gathered into windows.
            Defaults to ``("observation", "action", ("next", "reward"))``.
        mask_key (NestedKey, optional): where the window mask goes.
            Defaults to ``("hippo", "window_mask")``.
        generator (torch.Generator, optional): the random generator, on the storage's device.
            Defaults to ``None`` (torch's global generator).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
        >>> from torchrl_hippo.consolidation import PairSampler
        >>> encoder = DualEncoder(observation_dim=3, action_dim=2, embed_dim=16, window=4)
        >>> rb = TensorDictReplayBuffer(
        ...     storage=HippoStorage(200), writer=HippoWriter(encoder), sampler=HippoSampler()
        ... )
        >>> done = torch.zeros(100, 1, dtype=torch.bool)
        >>> done[9::10] = True  # ten episodes of ten steps
        >>> _ = rb.extend(TensorDict(
        ...     {"observation": torch.randn(100, 3), "action": torch.randn(100, 2),
        ...      "next": {"reward": torch.rand(100, 1), "done": done}},
        ...     batch_size=[100],
        ... ))
        >>> pairs = PairSampler(4, positive_radius=2, reward_weight=0.0).sample(rb.storage, 8)
        >>> pairs["anchor", "observation"].shape  # [batch, window, observation_dim]
        torch.Size([8, 4, 3])
        >>> gap = pairs["anchor", "hippo", "step"] - pairs["positive", "hippo", "step"]
        >>> bool((gap.abs() <= 2).all() and (gap != 0).all())
        True
        >>> bool((pairs["anchor", "hippo", "episode"] == pairs["positive", "hippo", "episode"]).all())
        True
    """

    def __init__(
        self,
        window: int,
        *,
        positive_radius: int = 2,
        reward_weight: float = 0.5,
        return_neighbours: int = 4,
        include_running: bool = False,
        window_keys: tuple[NestedKey, ...] = ("observation", "action", ("next", "reward")),
        mask_key: NestedKey = ("hippo", "window_mask"),
        generator: torch.Generator | None = None,
    ) -> None:
        for name, value in (
            ("window", window),
            ("positive_radius", positive_radius),
            ("return_neighbours", return_neighbours),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if isinstance(reward_weight, bool) or not isinstance(reward_weight, (int, float)):
            raise TypeError(f"reward_weight must be a float, got {type(reward_weight).__name__}.")
        if not 0.0 <= reward_weight <= 1.0:
            raise ValueError(f"reward_weight must be in [0, 1], got {reward_weight}.")
        self.window = window
        self.positive_radius = positive_radius
        self.reward_weight = float(reward_weight)
        self.return_neighbours = return_neighbours
        self.include_running = bool(include_running)
        self.window_keys = tuple(window_keys)
        self.mask_key = mask_key
        self.generator = generator
        self._cache: tuple[HippoStorage, tuple, _EpisodeIndex] | None = None

    # ------------------------------------------------------------------ index
    def _index(self, storage: HippoStorage) -> _EpisodeIndex:
        # Rows, episodes and returns only change when the memory is written to (clock), emptied
        # or loaded (key_revision, TorchRL's mutation revision).
        revision = (
            storage.clock,
            len(storage),
            storage.num_free_rows,
            storage.key_revision,
            storage._mutation_revision,
        )
        if self._cache is not None and self._cache[0] is storage and self._cache[1] == revision:
            return self._cache[2]
        rows = eligible_rows(storage, include_running=self.include_running)
        slot = storage.row_slot[rows]
        step = storage._storage.get(HIPPO_KEYS["step"])[rows]
        order = torch.argsort(step, stable=True)
        order = order[torch.argsort(slot[order], stable=True)]
        rows, slot = rows[order], slot[order]
        count = torch.bincount(slot, minlength=storage.episodes.shape[0])
        start = count.cumsum(0) - count
        index = _EpisodeIndex(rows, slot, start, count, (count > 0).nonzero().squeeze(1))
        self._cache = (storage, revision, index)
        return index

    def num_eligible(self, storage: HippoStorage) -> int:
        """The number of rows anchors are drawn from (see :func:`eligible_rows`)."""
        return self._index(storage).rows.numel()

    # ------------------------------------------------------------------ sampling
    def _rand(self, n: int, device: torch.device) -> Tensor:
        return torch.rand(n, generator=self.generator, device=device)

    def sample(self, storage: HippoStorage, batch_size: int) -> TensorDict:
        """Draws ``batch_size`` anchor / positive window pairs.

        Raises:
            RuntimeError: if the memory is empty or holds no eligible row.
            ValueError: if ``batch_size`` is not an int >= 1 or exceeds the eligible rows.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        index = self._index(storage)
        n = index.rows.numel()
        if n == 0:
            what = "stored row" if self.include_running else "finished episode"
            raise RuntimeError(
                f"The memory holds no {what} to consolidate yet"
                + ("" if self.include_running else " (or pass include_running=True)")
                + "."
            )
        if batch_size > n:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {n} row(s) consolidation can draw "
                "from (rows of finished episodes): lower batch_size or wait for more data."
            )
        dev = index.rows.device
        pos = torch.randint(n, (batch_size,), generator=self.generator, device=dev)
        slot = index.slot[pos]
        lo = index.start[slot]
        positive = _draw_neighbour(
            pos, lo, lo + index.count[slot], self.positive_radius, self._rand(batch_size, dev)
        )
        n_episodes = index.slots.numel()
        if self.reward_weight > 0 and n_episodes > 1:
            by_return = self._rand(batch_size, dev) < self.reward_weight
            ret = storage.episodes["return"][index.slots]
            shuffle = torch.randperm(n_episodes, generator=self.generator, device=dev)
            by_rank = index.slots[shuffle[torch.argsort(ret[shuffle], stable=True)]]
            rank = torch.empty_like(index.count)
            rank[by_rank] = torch.arange(n_episodes, device=dev)
            other_rank = _draw_neighbour(
                rank[slot],
                torch.zeros_like(slot),
                torch.full_like(slot, n_episodes),
                self.return_neighbours,
                self._rand(batch_size, dev),
            )
            other = by_rank[other_rank]
            within = (self._rand(batch_size, dev) * index.count[other]).long()
            within = torch.minimum(within, index.count[other] - 1)
            positive = torch.where(by_return, index.start[other] + within, positive)
        else:
            by_return = torch.zeros(batch_size, dtype=torch.bool, device=dev)
        rows = index.rows[torch.cat([pos, positive])]
        windows = storage.gather_windows(
            rows, self.window, keys=self.window_keys, mask_key=self.mask_key
        )
        columns = storage._storage
        windows.set(HIPPO_KEYS["episode"], columns.get(HIPPO_KEYS["episode"])[rows])
        windows.set(HIPPO_KEYS["step"], columns.get(HIPPO_KEYS["step"])[rows])
        windows.set(HIPPO_KEYS["return"], storage.episodes["return"][storage.row_slot[rows]])
        windows.set("index", rows)
        return TensorDict(
            {
                "anchor": windows[:batch_size],
                "positive": windows[batch_size:],
                "by_return": by_return,
            },
            batch_size=[batch_size],
            device=windows.device,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(window={self.window}, positive_radius={self.positive_radius}, "
            f"reward_weight={self.reward_weight}, return_neighbours={self.return_neighbours})"
        )
