"""HippoStorage: a TorchRL tensor storage that also keeps the memory's episode table."""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Callable
from multiprocessing.context import get_spawning_popen
from pathlib import Path
from typing import Any

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase, is_tensor_collection
from torchrl.data import LazyTensorStorage

__all__ = ["HIPPO_KEYS", "HippoStorage"]

#: The memory's own per-transition entries, stored under the ``"hippo"`` sub-TensorDict.
HIPPO_KEYS: dict[str, NestedKey] = {
    "key": ("hippo", "key"),
    "episode": ("hippo", "episode"),
    "step": ("hippo", "step"),
    "return": ("hippo", "return"),
    "key_version": ("hippo", "key_version"),
    "prev": ("hippo", "prev"),
}

_TABLE_FIELDS: dict[str, torch.dtype] = {
    "id": torch.int64,  # global episode id, -1 for a free slot
    "return": torch.float32,  # running sum of rewards, final once ``done``
    "length": torch.int64,  # steps seen so far (written or not)
    "rows": torch.int64,  # rows of this episode alive in the storage
    "access": torch.int64,  # times a row of this episode was sampled
    "inserted": torch.int64,  # storage clock (rows written) when the episode began
    "updated": torch.int64,  # storage clock at the episode's last write
    "done": torch.bool,  # the episode has ended (or was abandoned)
}
_MIN_TABLE = 256
#: Writes between two bulk recyclings of episode-table slots (see ``reclaim_slots``).
_RECLAIM_EVERY = 256

#: The bookkeeping integers, held in one int64 tensor so that processes sharing the storage
#: (see :meth:`HippoStorage.share_memory_`) see the same values. Positions in that tensor.
_COUNTERS = (
    "num_free_slots",
    "num_free_rows",
    "next_episode_id",
    "clock",
    "key_revision",
    "num_pending",
    "writer_cursor",
    "write_count",
    "open_generation",
    "open_count",
)
_C = {name: i for i, name in enumerate(_COUNTERS)}


class _Counter:
    """An int attribute stored at one position of the storage's counter tensor."""

    def __init__(self, name: str) -> None:
        self.index = _C[name]

    def __get__(self, obj: Any, objtype: Any = None) -> int:
        if obj is None:
            return self
        return int(obj._cv[self.index])

    def __set__(self, obj: Any, value: int) -> None:
        obj._cv[self.index] = value


class HippoStorage(LazyTensorStorage):
    """Episodic-memory storage: the collector's TensorDicts, their keys, and an episode table.

    A :class:`~torchrl.data.LazyTensorStorage` (so a :class:`~torchrl.data.TensorStorage`)
    that is initialised from the first write and holds, for every stored transition, the
    collector's entries as they come plus the memory's entries under ``"hippo"``:

    - ``("hippo", "key")``: ``[embed_dim]`` L2-normalised embedding of the window ending here;
    - ``("hippo", "episode")``: global episode id, ``-1`` for a free (evicted) row;
    - ``("hippo", "step")``: step index inside the episode;
    - ``("hippo", "return")``: the episode's return; reads (:meth:`get`) always serve the
      episode table's current value: the running sum while the episode lasts, the final
      return once it has ended;
    - ``("hippo", "key_version")``: the encoder's update count when the key was computed;
    - ``("hippo", "prev")``: storage row of the previous step of the same episode, or ``-1``.

    Beside the rows it keeps a per-episode table (:attr:`episodes`, a
    :class:`~tensordict.TensorDict` of tensors on the storage device) with each episode's
    ``id``, ``return``, ``length``, live ``rows``, ``access`` count, ``inserted`` and
    ``updated`` times (in rows written, see :attr:`clock`) and ``done`` flag.

    The storage is written by :class:`~torchrl_hippo.HippoWriter`, which segments episodes and
    computes keys, and read by :class:`~torchrl_hippo.HippoSampler`.

    Args:
        max_size (int): the number of transitions the memory holds.

    Keyword Args:
        device (torch.device or str, optional): where rows and tables live. ``"auto"`` takes
            the device of the first batch written. Defaults to ``"cpu"``.
        key_dtype (torch.dtype, optional): dtype of the stored keys (``torch.float16`` or
            ``torch.bfloat16`` halve the memory of the index). Defaults to ``torch.float32``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
        >>> encoder = DualEncoder(observation_dim=3, action_dim=2, embed_dim=16, window=4)
        >>> rb = TensorDictReplayBuffer(
        ...     storage=HippoStorage(100),
        ...     writer=HippoWriter(encoder),
        ...     sampler=HippoSampler(mixture_ratio=0.5, top_k=3),
        ...     batch_size=8,
        ... )
        >>> done = torch.zeros(10, 1, dtype=torch.bool)
        >>> done[4] = done[9] = True
        >>> data = TensorDict(
        ...     {
        ...         "observation": torch.randn(10, 3),
        ...         "action": torch.randn(10, 2),
        ...         "next": {"reward": torch.ones(10, 1), "done": done},
        ...     },
        ...     batch_size=[10],
        ... )
        >>> index = rb.extend(data)
        >>> len(rb.storage), rb.storage.num_episodes
        (10, 2)
        >>> rb.storage.get(torch.arange(10))["hippo", "return"]
        tensor([5., 5., 5., 5., 5., 5., 5., 5., 5., 5.])
        >>> rb.storage.get(torch.arange(10))["hippo", "step"]
        tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    """

    def __init__(
        self,
        max_size: int,
        *,
        device: torch.device | str = "cpu",
        key_dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= 0:
            raise ValueError(f"max_size must be a positive integer, got {max_size!r}.")
        if max_size >= 2**62:
            raise ValueError(f"max_size must be below 2**62 (int64 row indices), got {max_size}.")
        if not isinstance(key_dtype, torch.dtype) or not key_dtype.is_floating_point:
            raise TypeError(f"key_dtype must be a floating torch.dtype, got {key_dtype!r}.")
        super().__init__(max_size, device=device)
        self.key_dtype = key_dtype
        #: The encoder of the writer attached to this storage (set by HippoWriter), used to
        #: encode query windows. Not part of the storage's state.
        self.encoder = None
        self._counters = torch.zeros(len(_COUNTERS), dtype=torch.int64)
        self._cv = self._counters.numpy()
        #: Set by a HippoWriter: how many open episodes it keeps, and how to make an empty
        #: open-episode table (used to lay out the shared copy, see share_memory_).
        self._open_capacity = 4096
        self._open_factory: Callable[[], TensorDict] | None = None
        self._open: TensorDict | None = None
        self._open_seen = 0
        self._open_mirror: TensorDict | None = None
        self._lock = None
        self._reset_bookkeeping()

    # ------------------------------------------------------------------ bookkeeping
    _num_free_slots = _Counter("num_free_slots")
    _num_free_rows = _Counter("num_free_rows")
    next_episode_id = _Counter("next_episode_id")
    clock = _Counter("clock")
    key_revision = _Counter("key_revision")
    _num_pending = _Counter("num_pending")

    def _reset_bookkeeping(self) -> None:
        self.episodes = None
        self._row_slot: torch.Tensor | None = None
        self._free_slots: torch.Tensor | None = None
        self._free_rows: torch.Tensor | None = None
        self._reset_counters()
        self._pending: list[torch.Tensor] = []
        self._writes_since_reclaim = 0
        self.open_episodes = None

    def _reset_counters(self) -> None:
        """Zeroes the counters but those that never go back (revisions) or that the writer
        resets itself (its write count, kept by ``rb.empty(empty_write_count=False)``)."""
        keep = [_C["key_revision"], _C["open_generation"], _C["write_count"]]
        kept = self._cv[keep].copy()
        self._cv[:] = 0
        self._cv[keep] = kept

    def __len__(self) -> int:
        # TorchRL wraps its own in ``torch.compiler.disable``, a few microseconds a call, and
        # the writer and sampler ask on every call; this storage is not meant to be compiled.
        return self._len

    @property
    def episodes(self) -> TensorDict | None:
        """The episode table, one row per slot (``None`` before the first write)."""
        return self._episodes

    @episodes.setter
    def episodes(self, table: TensorDict | None) -> None:
        self._episodes = table
        # Its columns by name, for the writer's hot path (the table's columns are only ever
        # written in place; a new table comes through this setter).
        self._table = None if table is None else dict(table.items())

    @property
    def table_device(self) -> torch.device:
        """The device of the rows and of the episode table."""
        if self.device == "auto":
            return torch.device("cpu")
        return torch.device(self.device)

    def _ensure_tables(self, device: torch.device | None = None) -> None:
        if self.device == "auto" and device is not None:
            self.device = device
        if self.episodes is None:
            self._new_tables()

    @torch.inference_mode(False)  # the tables outlive a writer's inference-mode extend
    def _new_tables(self) -> None:
        dev = self.table_device
        self._row_slot = torch.full((self.max_size,), -1, dtype=torch.int64, device=dev)
        self._free_rows = torch.empty(self.max_size, dtype=torch.int64, device=dev)
        self._num_free_rows = 0
        self.episodes = self._new_table(0, dev)
        self._free_slots = torch.empty(0, dtype=torch.int64, device=dev)
        self._num_free_slots = 0
        self._grow_table(min(self.max_size, _MIN_TABLE))

    @staticmethod
    def _new_table(size: int, device: torch.device) -> TensorDict:
        table = TensorDict(
            {
                name: torch.zeros(size, dtype=dtype, device=device)
                for name, dtype in _TABLE_FIELDS.items()
            },
            batch_size=[size],
            device=device,
        )
        table["id"].fill_(-1)
        return table

    @torch.inference_mode(False)
    def _grow_table(self, min_free: int) -> None:
        if self.is_shared:
            raise RuntimeError(
                "The episode table of a shared HippoStorage is full; this should not happen "
                f"(it holds max_size + open episodes = {self.episodes.shape[0]} slots)."
            )
        old = self.episodes
        size = old.shape[0]
        new_size = max(size * 2, size + min_free, _MIN_TABLE)
        table = self._new_table(new_size, old.device)
        table[:size] = old
        self.episodes = table
        free = torch.empty(new_size, dtype=torch.int64, device=old.device)
        n = self._num_free_slots
        # New slots go below the existing free ones so that low slots are reused first.
        added = torch.arange(new_size - 1, size - 1, -1, device=old.device)
        free[: added.numel()] = added
        free[added.numel() : added.numel() + n] = self._free_slots[:n]
        self._free_slots = free
        self._num_free_slots = n + added.numel()

    def allocate_slots(self, n: int) -> torch.Tensor:
        """Takes ``n`` free rows of the episode table and returns their slots.

        The slots hold no episode (``id`` -1) and count no row and no access (``rows`` and
        ``access`` 0; :class:`~torchrl_hippo.HippoWriter` relies on it and sets every other
        field of a new episode itself).
        """
        self.reserve_slots(n)
        top = self._num_free_slots
        slots = self._free_slots[top - n : top].flip(0)  # a copy
        self._num_free_slots = top - n
        return slots

    def reserve_slots(self, n: int) -> None:
        """Makes sure that at least ``n`` episode-table slots are free: reclaims the dead ones
        (:meth:`reclaim_slots`), then grows the table if that was not enough."""
        self._ensure_tables()
        if n > self._num_free_slots:
            self.reclaim_slots()
        if n > self._num_free_slots:
            self._grow_table(n - self._num_free_slots)

    def release_slots(self, slots: torch.Tensor) -> None:
        """Returns episode-table slots, whose episodes have no row left, to the free list.

        A free slot is one with ``id`` -1 and ``rows`` 0 (every reader of the table filters on
        those); its ``access`` count is cleared for the next episode, its other fields are left
        as they were (the writer sets them when it takes the slot again).
        """
        n = slots.numel()
        if not n:
            return
        self._table["id"].index_fill_(0, slots, -1)
        self._table["access"].index_fill_(0, slots, 0)
        top = self._num_free_slots
        self._free_slots[top : top + n] = slots
        self._num_free_slots = top + n

    def note_write(self) -> None:
        """Counts one write; every ``_RECLAIM_EVERY`` writes, :meth:`reclaim_slots` runs.

        Writers call it once per ``extend``, so that slots are recycled in bulk rather than
        looked for after every write.
        """
        self._writes_since_reclaim += 1
        if self._writes_since_reclaim >= _RECLAIM_EVERY:
            self.reclaim_slots()

    def reclaim_slots(self) -> int:
        """Returns to the free list the slots whose episode ended and has no row left.

        A slot is *dead* when its episode is done, it counts no row and still holds an id (a
        free slot holds ``-1``). Until reclaimed, a dead slot keeps its episode's fields:
        every reader of the table tells stored episodes by ``rows > 0``. The whole table is
        scanned (in a shared memory, the dead slots of every process's writes are found).
        It runs every ``_RECLAIM_EVERY`` writes (see :meth:`note_write`), when the free list
        runs short and before a save. Returns the number of slots reclaimed.

        Examples:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> from torchrl.data import TensorDictReplayBuffer
            >>> from torchrl_hippo import DualEncoder, HippoStorage, HippoWriter
            >>> rb = TensorDictReplayBuffer(
            ...     storage=HippoStorage(4), writer=HippoWriter(DualEncoder(3, 2, 8, window=2))
            ... )
            >>> def batch(done):
            ...     return TensorDict(
            ...         observation=torch.randn(4, 3), action=torch.randn(4, 2),
            ...         next=TensorDict(reward=torch.zeros(4, 1), done=done.view(4, 1), batch_size=[4]),
            ...         batch_size=[4],
            ...     )
            >>> _ = rb.extend(batch(torch.tensor([False, True, False, True])))
            >>> _ = rb.extend(batch(torch.tensor([False, False, False, True])))
            >>> rb.storage.num_episodes, rb.storage.reclaim_slots()
            (1, 2)
        """
        self._writes_since_reclaim = 0
        if self.episodes is None:
            return 0
        table = self._table
        ids, rows, done = table["id"], table["rows"], table["done"]
        dead = ((ids >= 0) & (rows == 0) & done).nonzero().squeeze(1)
        self.release_slots(dead)
        return dead.numel()

    def new_episode_ids(self, n: int) -> torch.Tensor:
        """Returns ``n`` fresh global episode ids (unique for the life of the memory)."""
        ids = torch.arange(self.next_episode_id, self.next_episode_id + n, device=self.table_device)
        self.next_episode_id += n
        return ids

    def push_free_rows(self, rows: torch.Tensor) -> None:
        """Marks storage rows as free (evicted) so a writer can reuse them."""
        n = rows.numel()
        self._free_rows[self._num_free_rows : self._num_free_rows + n] = rows
        self._num_free_rows += n

    def pop_free_rows(self, n: int) -> torch.Tensor:
        """Takes ``n`` free rows (lowest first is not guaranteed)."""
        if n > self._num_free_rows:
            raise RuntimeError(f"asked for {n} free rows, only {self._num_free_rows} are free.")
        top = self._num_free_rows
        self._num_free_rows = top - n
        return self._free_rows[top - n : top].clone()

    @property
    def num_free_rows(self) -> int:
        """Rows below the high-water mark that hold no transition (evicted, not yet reused)."""
        return self._num_free_rows

    @property
    def num_valid(self) -> int:
        """The number of transitions the memory holds (``len(self)`` less the free rows)."""
        return len(self) - self._num_free_rows

    @property
    def num_episodes(self) -> int:
        """The number of episodes with at least one row in the memory."""
        if self.episodes is None:
            return 0
        return int((self.episodes["rows"] > 0).sum())

    @property
    def row_slot(self) -> torch.Tensor:
        """Episode-table slot of every storage row (``-1`` for free rows), shape ``[max_size]``."""
        self._ensure_tables()
        return self._row_slot

    def valid_mask(self) -> torch.Tensor:
        """Bool mask over the first ``len(self)`` rows: ``True`` where a transition is stored."""
        self._ensure_tables()
        return self._row_slot[: len(self)] >= 0

    @property
    def keys(self) -> torch.Tensor:
        """The stored keys, ``[len(self), embed_dim]``: a view of the key column.

        Free rows and rows waiting for their key (``key_version`` -1, written with
        ``HippoWriter(defer_keys=True)``) are included, and their entries are no keys: call
        :meth:`encode_pending` first, or skip those rows, as the library's searches do.
        Reading rows (:meth:`get`, ``rb.sample()``) gives a zero key for waiting rows.
        """
        if not self.initialized:
            raise RuntimeError("The memory is empty: no key has been written yet.")
        return self._storage.get(HIPPO_KEYS["key"])[: len(self)]

    @property
    def embed_dim(self) -> int | None:
        """The size of the stored keys, or ``None`` before the first write."""
        if not self.initialized:
            return None
        return self._storage.get(HIPPO_KEYS["key"]).shape[-1]

    def mark_access(self, index: torch.Tensor) -> None:
        """Counts one access for the episode of each (valid) row in ``index``."""
        slots = self._row_slot.index_select(0, index.reshape(-1))
        if self._num_free_rows:
            slots = slots[slots >= 0]
        access = self.episodes.get("access")
        access.index_add_(0, slots, access.new_ones(()).expand(slots.shape[0]))

    def bump_key_revision(self) -> None:
        """Signals that stored keys changed in place (refresh, eviction, load)."""
        self.key_revision += 1

    # ------------------------------------------------------------------ keys
    def add_pending_keys(self, rows: torch.Tensor) -> None:
        """Records rows written without a key (``key_version == -1``), see :meth:`encode_pending`."""
        if not self.is_shared:  # shared: another process may encode them; found by a scan
            self._pending.append(rows if rows.ndim == 1 else rows.reshape(-1))
        self._num_pending += rows.numel()

    @property
    def has_pending_keys(self) -> bool:
        """Whether rows written with ``HippoWriter(defer_keys=True)`` still wait for a key."""
        return self._num_pending > 0

    def encode_pending(self, *, chunk_size: int = 8192) -> int:
        """Computes the keys of the rows written with deferred keys; returns how many.

        Each pending row's window is rebuilt from the storage (:meth:`gather_windows`) and
        encoded by the attached encoder's target network, as the writer would have done. The
        rows were already announced to the sampler when they were written, so its retrieval
        pool merges them incrementally. :class:`~torchrl_hippo.HippoSampler` calls this before
        every retrieval; call it yourself before reading :attr:`keys` directly.
        """
        if not self.has_pending_keys:
            return 0
        version = self._storage.get(HIPPO_KEYS["key_version"])
        if self.is_shared:
            high = len(self)
            rows = ((version[:high] < 0) & (self._row_slot[:high] >= 0)).nonzero().squeeze(1)
        else:
            rows = torch.cat(self._pending).unique()
            rows = rows[(self._row_slot[rows] >= 0) & (version[rows] < 0)]
        self._pending = []
        self._num_pending = 0
        return self._encode_rows(rows, chunk_size)

    def refresh_keys(self, rows: torch.Tensor | None = None, *, chunk_size: int = 8192) -> int:
        """Recomputes stored keys with the attached encoder's target network; returns how many.

        Args:
            rows (Tensor, optional): the storage rows to refresh (free rows are skipped).
                Defaults to ``None``: every stored row.

        Keyword Args:
            chunk_size (int, optional): rows encoded per forward pass. Defaults to ``8192``.

        The keys change in place, so :attr:`key_revision` is bumped (when any row was refreshed)
        and a sampler's cached retrieval pool is rebuilt at its next draw. Non-finite keys raise
        ``FloatingPointError`` before their chunk is written.
        """
        if not self.initialized:
            raise RuntimeError("Cannot refresh the keys of an empty memory.")
        if rows is None:
            rows = self.valid_mask().nonzero().squeeze(1)
        else:
            rows = torch.as_tensor(rows, device=self.table_device).reshape(-1)
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
                raise IndexError(
                    f"rows must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}."
                )
            rows = rows[self._row_slot[rows] >= 0]
        count = self._encode_rows(rows, chunk_size)
        if count:
            self.bump_key_revision()
        return count

    @torch.no_grad()
    def _encode_rows(self, rows: torch.Tensor, chunk_size: int) -> int:
        encoder = self.encoder
        if encoder is None:
            raise RuntimeError(
                "No encoder is attached to the storage: a HippoWriter attaches its encoder when "
                "the replay buffer is built."
            )
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
        param = next(encoder.parameters(), None)
        enc_dev = param.device if param is not None else self.table_device
        key_col = self._storage.get(HIPPO_KEYS["key"])
        version_col = self._storage.get(HIPPO_KEYS["key_version"])
        observation_key, action_key, reward_key = encoder.in_keys[:3]
        for start in range(0, rows.numel(), chunk_size):
            chunk = rows[start : start + chunk_size]
            win = self.gather_windows(
                chunk, encoder.window, keys=(observation_key, action_key, reward_key)
            ).to(enc_dev)
            reward = win.get(reward_key)
            keys = encoder.encode(
                win.get(observation_key),
                win.get(action_key),
                reward.reshape(*reward.shape[:2], 1).float(),
                win.get(("hippo", "window_mask")),
                target=True,
            )
            if not bool(torch.isfinite(keys).all()):
                raise FloatingPointError(
                    "The encoder produced NaN or inf keys (check the stored observations and the "
                    "encoder's weights); no key of this chunk was written."
                )
            key_col[chunk] = keys.to(device=key_col.device, dtype=key_col.dtype)
            version_col[chunk] = int(encoder.version)
        return int(rows.numel())

    # ------------------------------------------------------------------ reads
    def get(self, index: Any) -> Any:
        """Reads rows; ``("hippo", "return")`` comes from the episode table.

        A 1-D int64 tensor of in-range rows (what samplers produce) is gathered leaf by leaf with
        ``index_select``, several times faster than TensorDict indexing for wide rows; every other
        index goes through :meth:`TensorStorage.get <torchrl.data.TensorStorage.get>`.
        """
        if self.episodes is None:
            return super().get(index)
        if type(self._storage) is TensorDict and _is_row_index(index, len(self)):
            out = _select_rows(self._storage, index)
            slots = self._row_slot.index_select(0, index)
        else:
            out = super().get(index)
            if not is_tensor_collection(out):
                return out
            slots = self._row_slot[: self._len_along_dim0][index]
        ret = self.episodes.get("return")[slots.clamp_min(0)]
        if self._num_free_rows:
            ret = torch.where(slots >= 0, ret, torch.full_like(ret, float("nan")))
        out.set(HIPPO_KEYS["return"], ret.to(out.device) if out.device is not None else ret)
        if self._num_pending:
            _zero_pending_keys(out)
        return out

    def gather_windows(
        self,
        index: torch.Tensor,
        window: int,
        *,
        keys: tuple[NestedKey, ...] = ("observation", "action", ("next", "reward")),
        mask_key: NestedKey = ("hippo", "window_mask"),
    ) -> TensorDict:
        """Gathers the trailing window of ``window`` steps ending at each row of ``index``.

        Follows the ``("hippo", "prev")`` links, so it works whatever the rows' placement.
        Steps before the episode's start, or already overwritten, are zero and masked out.

        Returns:
            a TensorDict of batch ``index.shape`` whose entries carry the window as their
            first feature dimension (``[*index.shape, window, *feature]``), plus ``mask_key``,
            ``True`` for real steps, the last position being the row itself.
        """
        if not self.initialized:
            raise RuntimeError("Cannot gather windows from an empty memory.")
        flat = index.reshape(-1).to(self.table_device)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= len(self)):
            raise IndexError(
                f"index must hold stored rows in [0, {len(self)}), got rows in "
                f"[{int(flat.min())}, {int(flat.max())}]."
            )
        episode = self._storage.get(HIPPO_KEYS["episode"])
        step = self._storage.get(HIPPO_KEYS["step"])
        prev = self._storage.get(HIPPO_KEYS["prev"])
        rows = torch.empty(flat.numel(), window, dtype=torch.int64, device=flat.device)
        mask = torch.empty(flat.numel(), window, dtype=torch.bool, device=flat.device)
        cur = flat
        ok = self._row_slot[flat] >= 0
        ep0, st0 = episode[flat], step[flat]
        for j in range(window - 1, -1, -1):
            rows[:, j] = cur.clamp_min(0)
            mask[:, j] = ok
            back = window - 1 - j
            nxt = prev[cur.clamp_min(0)]
            # A link is only followed while it still points at the same episode's previous step.
            ok = ok & (nxt >= 0)
            nxt_c = nxt.clamp_min(0)
            ok = ok & (episode[nxt_c] == ep0) & (step[nxt_c] == st0 - back - 1)
            cur = nxt
        data = self._storage.select(*keys)[rows]
        data = data.apply(lambda x: x * expand_mask(mask, x).to(x.dtype))
        data.batch_size = rows.shape[:1]
        data.set(mask_key, mask)
        return data.reshape(index.shape)

    # ------------------------------------------------------------------ contract
    def _empty(self) -> None:
        super()._empty()
        # The rows stay allocated (as in TorchRL's storages, and so that an emptied memory
        # can still be shared between processes); only the bookkeeping is cleared.
        if self.is_shared:  # other processes hold these tensors: clear them in place
            self._clear_shared()
        else:
            self._reset_bookkeeping()
        self.bump_key_revision()

    def _find_pending_keys(self) -> None:
        """After a load: the rows still waiting for a key are those with ``key_version < 0``."""
        self._pending = []
        self._num_pending = 0
        if self.initialized and self._row_slot is not None:
            version = self._storage.get(HIPPO_KEYS["key_version"])[: len(self)]
            pending = ((version < 0) & (self._row_slot[: len(self)] >= 0)).nonzero().squeeze(1)
            if pending.numel():
                self._pending.append(pending)
                self._num_pending = pending.numel()

    # ------------------------------------------------------------------ processes
    @property
    def is_shared(self) -> bool:
        """Whether the memory lives in shared memory for several processes (see :meth:`share_memory_`)."""
        return self._lock is not None

    @property
    def lock(self):
        """The inter-process lock writers and samplers hold (``None`` unless shared)."""
        return self._lock

    @property
    def open_episodes(self) -> TensorDict | None:
        """The episodes still running, as their writer left them (``None`` before any write).

        The writer builds this table in inference mode: read it, or ``clone()`` it to change it.

        In a shared memory this is read from the shared copy whenever another process has
        written since this one last looked.
        """
        mirror = self._open_mirror
        if mirror is not None:
            generation = int(self._cv[_C["open_generation"]])
            if generation != self._open_seen:
                count = int(self._cv[_C["open_count"]])
                self._open = None if count < 0 else mirror[:count].clone()
                self._open_seen = generation
        return self._open

    @open_episodes.setter
    def open_episodes(self, value: TensorDict | None) -> None:
        self._open = value
        mirror = getattr(self, "_open_mirror", None)
        if mirror is None:
            return
        if value is None:
            count = -1
        else:
            count = value.shape[0]
            if count > mirror.shape[0]:
                raise RuntimeError(
                    f"{count} open episodes do not fit the shared table of {mirror.shape[0]}."
                )
            if count:
                mirror[:count] = value
        self._cv[_C["open_count"]] = count
        self._cv[_C["open_generation"]] += 1
        self._open_seen = int(self._cv[_C["open_generation"]])

    def share_memory_(self) -> HippoStorage:
        """Places the memory in shared memory so that several processes can write and sample it.

        Rows, episode table, bookkeeping counters and the writer's open episodes then live in
        shared memory, and writers and samplers take :attr:`lock` (a multiprocessing lock), so
        every process sees one coherent memory: episode ids stay unique, the episode table
        matches the rows. The episode table is allocated at its largest size
        (``max_size`` plus the writer's open episodes), since shared tensors cannot grow.

        It is called on its own when the storage is sent to a spawned process (TorchRL's
        multi-process collectors do so with ``replay_buffer=rb``); call it before forking.
        The memory must hold data first (as for any TorchRL storage shared between
        processes), so that the rows' layout is known. Returns the storage.
        """
        if self.is_shared:
            return self
        if not self.initialized:
            raise RuntimeError(
                "Cannot share an empty HippoStorage between processes: write some data first "
                "(TorchRL's multi-process collectors do so with a fake batch), so that the "
                "rows' layout is known."
            )
        self._ensure_tables()
        size = self.episodes.shape[0]
        capacity = self.max_size + self._open_capacity + 1
        if size < capacity:
            self._grow_table(capacity - size)
        open_ = self.open_episodes
        template = open_ if open_ is not None else self._open_factory()
        self._open_mirror = template.apply(
            lambda x: torch.zeros(
                (self._open_capacity, *x.shape[1:]), dtype=x.dtype, device=x.device
            ),
            batch_size=[self._open_capacity],
        )
        if self.table_device.type == "cpu":
            self._storage.share_memory_()
            self.episodes.share_memory_()
            self._open_mirror.share_memory_()
            for tensor in (self._row_slot, self._free_rows, self._free_slots, self._counters):
                tensor.share_memory_()
        self._cv = self._counters.numpy()
        self._len = self._len  # creates the shared length value if it does not exist yet
        self._lock = mp.get_context("spawn").RLock()
        self.open_episodes = open_
        if self._pending:  # a shared memory finds its pending rows by a scan
            self._pending = []
        return self

    def _clear_shared(self) -> None:
        """Empties a shared memory in place (its tensors are held by other processes)."""
        self._row_slot.fill_(-1)
        for name, column in self.episodes.items():
            column.fill_(-1 if name == "id" else 0)
        size = self.episodes.shape[0]
        self._free_slots.copy_(torch.arange(size - 1, -1, -1, device=self._free_slots.device))
        self._reset_counters()
        self._cv[_C["num_free_slots"]] = size
        self._pending = []
        self._writes_since_reclaim = 0
        self.open_episodes = None

    def __getstate__(self) -> dict[str, Any]:
        if get_spawning_popen() is not None and self.initialized:
            self.share_memory_()
        state = super().__getstate__()
        state.pop("_cv", None)
        state.pop("_open", None)
        state.pop("_table", None)
        if get_spawning_popen() is None:  # a plain copy or pickle: a private memory
            state["_lock"] = None
            state["_open_mirror"] = None
            state["_open"] = self.open_episodes
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._cv = self._counters.numpy()
        self.episodes = self._episodes
        if "_open" not in state:
            self._open = None
            self._open_seen = -1  # read the shared copy on first use

    def _bookkeeping_state(self) -> dict[str, Any]:
        if not self.is_shared:
            self.reclaim_slots()  # a saved table holds no dead slot
        return {
            "episodes": self.episodes.to_dict() if self.episodes is not None else None,
            "row_slot": self._row_slot,
            "free_slots": self._free_slots,
            "num_free_slots": self._num_free_slots,
            "free_rows": self._free_rows,
            "num_free_rows": self._num_free_rows,
            "next_episode_id": self.next_episode_id,
            "clock": self.clock,
        }

    def _load_bookkeeping_state(self, state: dict[str, Any]) -> None:
        if self.is_shared:
            raise RuntimeError(
                "Cannot load a state into a shared HippoStorage: load it first, then share it."
            )
        dev = self.table_device
        if state["episodes"] is None:
            self._reset_bookkeeping()
            return
        table = TensorDict(state["episodes"], device=dev)
        table.batch_size = table["id"].shape
        self.episodes = table.clone()
        self._row_slot = state["row_slot"].to(dev).clone()
        self._free_slots = state["free_slots"].to(dev).clone()
        self._num_free_slots = int(state["num_free_slots"])
        self._free_rows = state["free_rows"].to(dev).clone()
        self._num_free_rows = int(state["num_free_rows"])
        self.next_episode_id = int(state["next_episode_id"])
        self.clock = int(state["clock"])

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild an empty storage like this one.

        ``HippoStorage(**storage.config)`` has the same capacity, device and key dtype (a
        storage made with ``device="auto"`` reports the device it settled on at its first write).

        Examples:
            >>> import torch
            >>> from torchrl_hippo import HippoStorage
            >>> HippoStorage(100, key_dtype=torch.float16).config
            {'max_size': 100, 'device': device(type='cpu'), 'key_dtype': torch.float16}
        """
        return {"max_size": self.max_size, "device": self.device, "key_dtype": self.key_dtype}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["hippo"] = self._bookkeeping_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "hippo" not in state_dict:
            raise KeyError("state_dict has no 'hippo' entry: it was not made by a HippoStorage.")
        if state_dict["_storage"] or state_dict["initialized"]:
            super().load_state_dict(state_dict)
            if self._storage.device is None and self.device != "auto":
                # Rows loaded into an empty storage come back without a device: give them the
                # storage's, as a first write does (reads then carry it too).
                self._storage = self._storage.to(self.device)
        elif self.initialized:  # the state of an empty memory: hold nothing
            self._empty()
        self._load_bookkeeping_state(state_dict["hippo"])
        self._find_pending_keys()
        self.bump_key_revision()

    def dumps(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.initialized:
            super().dumps(path)
        state = self._bookkeeping_state()
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if state["episodes"] is not None:
            self.episodes.memmap(path / "episodes", copy_existing=True)
            TensorDict(tensors, batch_size=[]).memmap(path / "bookkeeping", copy_existing=True)
        meta = {k: v for k, v in state.items() if isinstance(v, int)}
        meta.update(initialized=self.initialized, has_tables=state["episodes"] is not None)
        with open(path / "hippo_metadata.json", "w") as file:
            json.dump(meta, file)

    def loads(self, path: str | Path) -> None:
        path = Path(path)
        with open(path / "hippo_metadata.json") as file:
            meta = json.load(file)
        if meta["initialized"]:
            super().loads(path)
        else:
            self._empty()
        if not meta["has_tables"]:
            self._reset_bookkeeping()
        else:
            tensors = TensorDict.load_memmap(path / "bookkeeping").to_dict()
            episodes = TensorDict.load_memmap(path / "episodes").to_dict()
            state = {**meta, **tensors, "episodes": episodes}
            self._load_bookkeeping_state(state)
        self._find_pending_keys()
        self.bump_key_revision()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_size={self.max_size}, len={len(self)}, "
            f"episodes={self.num_episodes}, device={self.device}, key_dtype={self.key_dtype})"
        )


def _is_row_index(index: Any, length: int) -> bool:
    """Whether ``index`` is a 1-D int64 tensor of rows in ``[0, length)``."""
    if not (isinstance(index, torch.Tensor) and index.dtype == torch.int64 and index.ndim == 1):
        return False
    if not index.numel():
        return False
    low, high = torch.aminmax(index)
    return bool(low >= 0) and bool(high < length)


def _select_rows(data: TensorDict, index: torch.Tensor) -> TensorDict:
    """``data[index]`` for a plain (nested) TensorDict of tensors, with ``index_select``."""
    out = {}
    for key, value in data.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.index_select(0, index)
        elif type(value) is TensorDict:
            out[key] = _select_rows(value, index)
        else:  # lazy stacks, non-tensor data...: TensorDict indexing knows them
            out[key] = value[index]
    return TensorDict._new_unsafe(
        out, batch_size=torch.Size([index.shape[0], *data.batch_size[1:]]), device=data.device
    )


def _zero_pending_keys(rows: TensorDictBase) -> None:
    """Reads of rows waiting for their key (``key_version`` -1) give a zero key.

    A writer with ``defer_keys=True`` leaves their key column as it was (the key of the
    transition they replaced) until :meth:`HippoStorage.encode_pending` writes the new one.
    """
    key = rows.get(HIPPO_KEYS["key"], None)
    version = rows.get(HIPPO_KEYS["key_version"], None)
    if not isinstance(key, torch.Tensor) or not isinstance(version, torch.Tensor):
        return
    pending = version < 0
    if bool(pending.any()):
        rows.set(HIPPO_KEYS["key"], key.masked_fill(expand_mask(pending, key), 0))


def expand_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Expands a ``[N, W]`` mask to the trailing shape of ``like`` (``[N, W, *feature]``)."""
    return mask.reshape(*mask.shape, *([1] * (like.ndim - mask.ndim)))
