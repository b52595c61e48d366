"""HippoWriter: segments collector output into episodes, encodes keys, places and forgets rows."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import NestedKey, TensorDict, TensorDictBase, unravel_key
from torchrl.data.replay_buffers.writers import Writer

from torchrl_hippo._checks import as_nested_key, check_positive_int
from torchrl_hippo.data import fifo_numba
from torchrl_hippo.data.sampler import HippoSampler
from torchrl_hippo.data.storage import _C, HIPPO_KEYS, HippoStorage

__all__ = ["HippoWriter"]

_FORGETTING = ("fifo", "importance")
_BACKENDS = ("auto", "torch", "numba")
#: The per-row entries the writer computes, under "hippo", with their dtypes (and "key").
_HIPPO_DTYPES = {
    "episode": torch.int64,
    "step": torch.int64,
    "return": torch.float32,
    "key_version": torch.int64,
    "prev": torch.int64,
}
_DEFAULT_EVICTION_WEIGHTS = {"return": 1.0, "access": 0.5, "recency": 1.0}
# The orders in which fifo_numba.fifo_write takes the open-episode, episode-table and "hippo"
# columns, and absent entries.
_OPEN_COLUMNS = ("key", "episode", "slot", "step", "ret", "last_row")
_TABLE_ORDER = ("id", "inserted", "return", "length", "rows", "access", "updated", "done")
_HIPPO_ORDER = ("episode", "step", "return", "key_version", "prev")
_NO_FLAGS = np.zeros(0, np.bool_)
_NO_IDS = np.zeros(0, np.int64)
_CURSOR, _WRITES = _C["writer_cursor"], _C["write_count"]


class HippoWriter(Writer):
    """Writes collector output into a :class:`~torchrl_hippo.HippoStorage`, one episode at a time.

    For every ``extend`` the writer

    1. segments the rows into episodes, with ``("next", "done")``, ``("collector", "traj_ids")``
       and ``"is_init"``. An episode still running at the end of a batch stays *open* and is
       stitched to its continuation in a later ``extend`` (same episode id, steps counting on,
       windows reaching back across the boundary);
    2. computes ``("hippo", "key")`` for each row with the encoder's momentum **target**
       network, over the trailing window of ``encoder.window`` steps, in chunks under
       ``torch.no_grad()``;
    3. chooses rows to write (the forgetting policy) and writes rows and episode table.

    Input may be flat ``[N]`` (one stream, or several told apart by ``traj_ids``) or
    ``[env, time]`` as a batched collector returns it. The returned index has the shape of the
    input, with ``-1`` for rows that were not written (a batch larger than the memory keeps
    its last ``max_size`` rows). Everything is validated and encoded before anything is
    written, so a bad batch never corrupts the memory.

    Forgetting policies:

    - ``"fifo"`` (default): a ring, like TorchRL's round-robin writer;
    - ``"importance"``: when the memory is full, whole episodes with the lowest score are
      evicted, ``score = w_return * return_rank + w_access * access + w_recency * recency``,
      each term in ``[0, 1]`` (return rank among stored episodes, ``log1p`` access count over
      its maximum, last-write time relative to the oldest and newest), computed for all
      episodes at once. Episodes still running are evicted last. Each eviction frees at least
      ``evict_fraction`` of the memory so its cost is amortised over many writes.

    Args:
        encoder (DualEncoder): the dual encoder whose target network makes the keys. Its
            ``in_keys`` name the observation, action and reward entries the writer reads.

    Keyword Args:
        forgetting (str, optional): ``"fifo"`` or ``"importance"``. Defaults to ``"fifo"``.
        eviction_weights (Mapping[str, float], optional): weights of ``"return"``,
            ``"access"`` and ``"recency"`` in the importance score. Defaults to
            ``{"return": 1.0, "access": 0.5, "recency": 1.0}``.
        evict_fraction (float, optional): the least fraction of the memory freed by one
            importance eviction. Defaults to ``0.05``.
        encode_chunk (int, optional): rows encoded per forward pass. Defaults to ``8192``.
        done_key (NestedKey, optional): the end-of-episode flag. Defaults to ``("next", "done")``.
        traj_key (NestedKey, optional): trajectory ids, used when present.
            Defaults to ``("collector", "traj_ids")``.
        is_init_key (NestedKey, optional): the first-step flag, used when present.
            Defaults to ``"is_init"``.
        max_open_episodes (int, optional): how many running episodes are remembered for
            stitching; past that the oldest are closed. Defaults to ``4096``.
        defer_keys (bool, optional): write rows without computing their keys; they are marked
            pending (``("hippo", "key_version")`` is ``-1``, the key zero) and encoded in one
            go by :meth:`HippoStorage.encode_pending() <torchrl_hippo.HippoStorage.encode_pending>`,
            which the sampler calls before any retrieval. This keeps the collection loop's
            write cheap and batches the encoder's work. Defaults to ``False`` (keys are
            computed during ``extend``).
        segmenter (callable, optional): cuts episodes further, besides the done flags,
            ``is_init`` and trajectory ids (see :mod:`torchrl_hippo.data.segmenters`). It is
            called as ``segmenter(data, step, stream)`` with the batch flat in sequence order
            (each stream's rows contiguous, in time order), every row's step within its
            episode as the default segmentation counts it (an episode continued from an
            earlier batch counts on from its stored rows) and every row's stream id; it returns
            a bool ``[n]``, ``True`` where a new episode starts. Defaults to ``None`` (the
            default segmentation only).
        backend (str, optional): what runs the bookkeeping of a write (segmentation,
            stitching, episode table, the rows' ``"hippo"`` entries). ``"torch"``: tensor ops,
            for every case. ``"numba"``: one compiled call
            (:mod:`torchrl_hippo.data.fifo_numba`, ``pip install "torchrl-hippo[fast]"``),
            for FIFO forgetting with ``defer_keys=True`` and no ``segmenter``, on CPU tables;
            the few writes it does not cover (the first one, a batch larger than the memory,
            new entries) run in torch. Both give the same memory, bit for bit. ``"auto"``:
            ``"numba"`` where it applies and numba is installed, else ``"torch"``. Defaults
            to ``"auto"``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
        >>> encoder = DualEncoder(observation_dim=3, action_dim=2, embed_dim=16, window=4)
        >>> rb = TensorDictReplayBuffer(
        ...     storage=HippoStorage(6), writer=HippoWriter(encoder), sampler=HippoSampler()
        ... )
        >>> def batch(env, time, done_at=()):
        ...     done = torch.zeros(env, time, 1, dtype=torch.bool)
        ...     for e, t in done_at:
        ...         done[e, t] = True
        ...     return TensorDict(
        ...         {
        ...             "observation": torch.randn(env, time, 3),
        ...             "action": torch.randn(env, time, 2),
        ...             "next": {"reward": torch.ones(env, time, 1), "done": done},
        ...         },
        ...         batch_size=[env, time],
        ...     )
        >>> rb.extend(batch(2, 2))  # [env, time] in, index of the same shape out
        tensor([[0, 1],
                [2, 3]])
        >>> rb.extend(batch(2, 2, done_at=[(0, 1)]))  # the episodes continue: stitched
        tensor([[4, 5],
                [0, 1]])
        >>> rb.storage.get(torch.tensor([4, 5]))["hippo", "step"]
        tensor([2, 3])
        >>> rb.writer._write_count
        8
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        *,
        forgetting: str = "fifo",
        eviction_weights: Mapping[str, float] | None = None,
        evict_fraction: float = 0.05,
        encode_chunk: int = 8192,
        done_key: NestedKey = ("next", "done"),
        traj_key: NestedKey = ("collector", "traj_ids"),
        is_init_key: NestedKey = "is_init",
        max_open_episodes: int = 4096,
        defer_keys: bool = False,
        segmenter: Callable[[TensorDictBase, torch.Tensor, torch.Tensor], torch.Tensor]
        | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for attr in ("encode", "window", "embed_dim", "in_keys", "version"):
            if not hasattr(encoder, attr):
                raise TypeError(
                    f"encoder must be a DualEncoder-like module with `{attr}`, got {type(encoder).__name__}."
                )
        if forgetting not in _FORGETTING:
            raise ValueError(f"forgetting must be one of {_FORGETTING}, got {forgetting!r}.")
        weights = dict(_DEFAULT_EVICTION_WEIGHTS if eviction_weights is None else eviction_weights)
        unknown = set(weights) - set(_DEFAULT_EVICTION_WEIGHTS)
        if unknown:
            raise ValueError(
                f"eviction_weights has unknown entries {sorted(unknown)}; expected a subset of "
                f"{sorted(_DEFAULT_EVICTION_WEIGHTS)}."
            )
        if any(not math.isfinite(w) or w < 0 for w in weights.values()):
            raise ValueError(f"eviction_weights must be finite and >= 0, got {weights}.")
        if not 0.0 <= evict_fraction <= 1.0:
            raise ValueError(f"evict_fraction must be in [0, 1], got {evict_fraction}.")
        check_positive_int(encode_chunk, "encode_chunk")
        check_positive_int(max_open_episodes, "max_open_episodes")
        if segmenter is not None and not callable(segmenter):
            raise TypeError(
                f"segmenter must be callable (data, step, stream) -> starts, got "
                f"{type(segmenter).__name__}."
            )
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}.")
        if backend == "numba":
            if not fifo_numba.AVAILABLE:
                raise ImportError(
                    'backend="numba" needs numba: pip install "torchrl-hippo[fast]" (or numba).'
                )
            if forgetting != "fifo" or not defer_keys or segmenter is not None:
                raise ValueError(
                    'backend="numba" covers forgetting="fifo" with defer_keys=True and no '
                    f"segmenter, got forgetting={forgetting!r}, defer_keys={defer_keys}, "
                    f"segmenter={segmenter!r}; use backend='auto' or 'torch'."
                )
        self.encoder = encoder
        self.forgetting = forgetting
        self.eviction_weights = {k: float(weights.get(k, 0.0)) for k in _DEFAULT_EVICTION_WEIGHTS}
        self.evict_fraction = float(evict_fraction)
        self.encode_chunk = int(encode_chunk)
        self.done_key = as_nested_key(done_key, "done_key")
        self.traj_key = as_nested_key(traj_key, "traj_key")
        self.is_init_key = as_nested_key(is_init_key, "is_init_key")
        self.max_open_episodes = int(max_open_episodes)
        self.defer_keys = bool(defer_keys)
        self.segmenter = segmenter
        self.backend = backend
        # Until the writer is registered with a storage; then the storage holds them (so
        # that processes sharing the memory share them too).
        self._local = {"cursor": 0, "write_count": 0, "open": None}

    @property
    def _checked_obs_dim(self) -> int | None:
        """The observation size ``extend`` checks (``None`` with an observation encoder)."""
        cache = self.__dict__.get("_obs_dim_cache")
        if cache is None or cache[0] is not self.encoder:  # once per encoder
            dim = getattr(self.encoder, "observation_dim", None)
            if getattr(self.encoder, "observation_encoder", None) is not None:
                dim = None
            cache = self.__dict__["_obs_dim_cache"] = (self.encoder, dim)
        return cache[1]

    # The writer's state lives in its storage once registered: the ring cursor, the rows
    # written, and the episodes still running (stitched to the next batch).
    @property
    def _cursor(self) -> int:
        storage = self._storage
        return self._local["cursor"] if storage is None else storage._cv[_CURSOR].item()

    @_cursor.setter
    def _cursor(self, value: int) -> None:
        if self._storage is None:
            self._local["cursor"] = int(value)
        else:
            self._storage._cv[_CURSOR] = value

    @property
    def _write_count(self) -> int:
        storage = self._storage
        return self._local["write_count"] if storage is None else storage._cv[_WRITES].item()

    @_write_count.setter
    def _write_count(self, value: int) -> None:
        if self._storage is None:
            self._local["write_count"] = int(value)
        else:
            self._storage._cv[_WRITES] = value

    @property
    def _open(self) -> TensorDict | None:
        storage = self._storage
        return self._local["open"] if storage is None else storage.open_episodes

    @_open.setter
    def _open(self, value: TensorDict | None) -> None:
        if self._storage is None:
            self._local["open"] = value
        else:
            self._storage.open_episodes = value

    # ------------------------------------------------------------------ wiring
    @property
    def observation_key(self) -> NestedKey:
        return self.encoder.in_keys[0]

    @property
    def action_key(self) -> NestedKey:
        return self.encoder.in_keys[1]

    @property
    def reward_key(self) -> NestedKey:
        return self.encoder.in_keys[2]

    def register_storage(self, storage: HippoStorage) -> None:
        if not isinstance(storage, HippoStorage):
            raise TypeError(
                f"HippoWriter writes into a HippoStorage, got {type(storage).__name__}."
            )
        self._check_embed_dim(storage)
        local = self._local if getattr(self, "_storage", None) is None else None
        super().register_storage(storage)
        storage.encoder = self.encoder
        storage._open_capacity = self.max_open_episodes
        storage._open_factory = self._empty_open
        if local is not None and not storage.is_shared:
            self._cursor, self._write_count = local["cursor"], local["write_count"]
            self._open = local["open"]

    def _empty_open(self) -> TensorDict:
        """An empty open-episode table laid out for the storage's rows."""
        storage = self._storage
        rows = storage._storage[:1]
        return self._new_open(rows, self.encoder.window, storage.table_device)

    def _check_embed_dim(self, storage: HippoStorage) -> None:
        columns = self._store_columns(storage)
        key = None if columns is None else columns.get(HIPPO_KEYS["key"])
        dim = storage.embed_dim if key is None else key.shape[-1]
        if dim is not None and dim != self.encoder.embed_dim:
            raise ValueError(
                f"encoder.embed_dim={self.encoder.embed_dim} does not match the storage's stored "
                f"keys of size {dim}."
            )

    # ------------------------------------------------------------------ writing
    def add(self, data: TensorDictBase) -> int | torch.Tensor:
        """Writes a single transition (a TensorDict with empty batch size)."""
        if not isinstance(data, TensorDictBase):
            raise TypeError(f"data must be a TensorDict, got {type(data).__name__}.")
        return self.extend(data.unsqueeze(0))[0]

    def extend(self, data: TensorDictBase) -> torch.Tensor:
        storage = self._storage
        # The bookkeeping runs in inference mode, which takes a good part of the fixed cost
        # of each of its small ops. The tensors it keeps are made outside of it (the storage's
        # columns and tables, see ``_write_rows`` and ``HippoStorage._ensure_tables``), and
        # the index it returns is a plain tensor.
        with torch.inference_mode():
            if storage is not None and storage.is_shared:
                with storage.lock:  # one writer at a time across processes
                    index = self._extend(data)
            else:
                index = self._extend(data)
        return index.clone()

    def _extend(self, data: TensorDictBase) -> torch.Tensor:
        # Hot path: a few dozen small tensor ops per call, so ops are chosen for their fixed
        # cost (index_select / index_copy_ rather than advanced indexing, slices where a set of
        # rows is a run) and per-segment work is done once, on segments rather than rows.
        storage: HippoStorage = self._storage
        if storage is None:
            raise RuntimeError("HippoWriter has no storage: use it inside a replay buffer.")
        flat, shape, entries, leaves = self._validate(data)
        if self._numba_applies(storage, flat, shape):
            index = self._extend_numba(storage, data, flat, shape, entries, leaves)
            if index is not None:
                return index
        data_device = flat.device
        # The device of the tables, found without touching the storage yet.
        dev = data_device if storage.device == "auto" and data_device is not None else None
        dev = storage.table_device if dev is None else torch.device(dev)
        seq = _Segments(entries, shape, dev)
        if not seq.finite and not torch.isfinite(entries["reward"]).all():
            raise ValueError(f"reward {self.reward_key!r} contains NaN or inf values.")
        storage._ensure_tables(device=data_device)
        self._check_embed_dim(storage)
        n = seq.n
        if seq.order is not None:
            flat = flat[seq.order.to(data_device) if data_device is not None else seq.order]
        # The batch's entries against the stored columns, before anything is written.
        pairs = self._column_pairs(storage, flat, leaves if flat is data else None)
        window = self.encoder.window
        self._ensure_open(flat, window, dev)
        open_ = self._open_columns()
        stitch = seq.match(open_["key"])
        if self.segmenter is not None:
            seq, stitch = self._apply_segmenter(flat, seq, stitch, entries, shape, dev)
        first, last = seq.first, seq.last

        # Per segment: where its episode stood before this batch (None: nowhere, all fresh).
        base_step = stitch.per_segment(open_["step"])
        base_ret = stitch.per_segment(open_["ret"])
        origin = first if base_step is None else first - base_step  # step = row - origin
        csum = seq.csum
        # Segments tile the batch: one's rewards start where the one before ended.
        seg_return = torch.diff(seq.csum_last, prepend=_constants(dev).zeros(1, torch.float64))
        start_sum = seq.csum_last - seg_return  # running = csum - start_sum
        if base_ret is not None:
            seg_return += base_ret
        seg_length = seq.length if base_step is None else base_step + seq.length

        # A batch larger than the memory keeps its last rows: rows[tail] are written.
        n_write = min(n, storage.max_size)
        tail = slice(n - n_write, n)

        # Windows and keys (target encoder, no grad) before any mutation.
        if self.defer_keys:
            win_idx = win_mask = pools = None
            # The rows' keys are computed later; key_version -1 marks them, and every read
            # sees a zero key for them (see HippoStorage.get), never the key of the
            # transition they replace. Their key column is written only to create it.
            keys = None
            if pairs is None or HIPPO_KEYS["key"] not in self._store_columns(storage):
                keys = torch.zeros((), dtype=storage.key_dtype, device=dev).expand(
                    n_write, self.encoder.embed_dim
                )
        else:
            win_idx, win_mask = self._window_index(seq, stitch, window, open_, dev)
            pools = self._pools(flat, open_, window, dev)
            keys = self._encode(pools, win_idx[tail], win_mask[tail], storage)

        # ---- from here on the memory is mutated ----
        # Rows about to be overwritten may hold no transition (slot -1) if the memory is not
        # full or has evicted rows, or is about to evict some (importance forgetting).
        capacity = storage.max_size
        importance = self.forgetting == "importance"
        some_unset = importance or len(storage) < capacity or storage.num_free_rows > 0
        protected = open_["slot"].index_select(0, stitch.open) if importance else None
        rows, start = self._place(n_write, storage, protected)
        if n_write == n:
            idx_seq = rows
        else:
            idx_seq = torch.full((n,), -1, dtype=torch.int64, device=dev)
            idx_seq[tail] = rows
        # The usual fifo write is one run of rows: the storage's "hippo" entries there are
        # then computed in place (``cols``, views of the storage's columns).
        run = start is not None and n_write == n and start + n <= capacity
        cols = self._hippo_columns(storage, start, n) if run else {}

        # Episode table: fresh segments get a new slot and id, every segment its new state.
        n_new = seq.num - stitch.num
        new_slots = storage.allocate_slots(n_new)  # cleared slots: no rows, no access
        new_ids = storage.new_episode_ids(n_new)
        seg_slot = stitch.per_segment(open_["slot"], new_slots)
        seg_ep = stitch.per_segment(open_["episode"], new_ids)
        clock = storage.clock
        table = storage._table
        if n_new:
            table["id"].index_copy_(0, new_slots, new_ids)
            table["inserted"].index_copy_(0, new_slots, _select(first, stitch.fresh) + clock)
        table["return"].index_copy_(0, seg_slot, seg_return.to(torch.float32))
        table["length"].index_copy_(0, seg_slot, seg_length)
        table["updated"].index_copy_(0, seg_slot, last + clock)
        table["done"].index_copy_(0, seg_slot, seq.closed)
        if stitch.abandoned.numel():
            table["done"].index_fill_(0, open_["slot"].index_select(0, stitch.abandoned), True)

        # Live rows per episode: minus the rows overwritten (one per row), plus the rows
        # written (per segment). Slots left with no row are recycled later, in bulk (see
        # HippoStorage.reclaim_slots).
        row_slot = storage.row_slot
        old_slot = row_slot[rows] if start is None else _ring(row_slot, start, n_write)
        if some_unset:
            old_slot = old_slot[old_slot >= 0]
        table_rows = table["rows"]
        table_rows.index_add_(0, old_slot, _constants(dev).ones(old_slot.shape[0]), alpha=-1)
        if n_write == n:
            written = seq.length
        else:
            written = seq.end.clamp_min(tail.start) - first.clamp_min(tail.start)
        table_rows.index_add_(0, seg_slot, written)
        slot_of_row = seq.per_row(seg_slot, out=row_slot[start : start + n] if run else None)
        if not run:
            slot_of_row = slot_of_row[tail]
            if start is None:
                row_slot.index_copy_(0, rows, slot_of_row)
            else:
                _ring_set(row_slot, start, slot_of_row)

        # The rows' own entries: episode, step, running return, key version, previous row
        # (the row before, or the episode's last stored row).
        hippo = {
            "episode": seq.per_row(seg_ep, out=cols.get("episode")),
            "step": torch.sub(_arange(n, dev), seq.per_row(origin), out=cols.get("step")),
        }
        # running = csum - start_sum (+ base_ret): one per-segment offset spread over rows.
        offset = start_sum if base_ret is None else start_sum - base_ret
        if "return" in cols:
            torch.sub(csum, seq.per_row(offset), out=cols["return"])
        else:
            hippo["return"] = (csum - seq.per_row(offset)).to(torch.float32)
        version = -1 if self.defer_keys else int(self.encoder.version)
        if "key_version" in cols:
            cols["key_version"].fill_(version)
        else:
            hippo["key_version"] = torch.full((n,), version, dtype=torch.int64, device=dev)
        prev = torch.sub(rows, 1, out=cols.get("prev")) if run else idx_seq.roll(1)
        prev.index_fill_(0, first, -1)
        if stitch.num:
            prev.index_copy_(
                0, _select(first, stitch.seg), open_["last_row"].index_select(0, stitch.open)
            )
        hippo["prev"] = prev
        hippo = {
            name: value[tail] if tail.start else value
            for name, value in hippo.items()
            if name not in cols
        }
        if keys is not None:
            hippo["key"] = keys
        self._write_rows(storage, rows, start, flat, tail, hippo, pairs)
        if self.defer_keys:
            storage.add_pending_keys(rows)

        self._update_open(
            seq,
            stitch,
            seg_ep,
            seg_slot,
            seg_length,
            seg_return,
            idx_seq,
            win_idx,
            win_mask,
            pools,
            storage,
        )
        storage.clock = clock + n
        storage._cv[_WRITES] += n_write  # self._write_count, which lives in the storage
        self._after_write(storage, rows)

        index = idx_seq
        if seq.order is not None:
            index = torch.empty_like(idx_seq).index_copy_(0, seq.order, idx_seq)
        if index.shape != shape:
            index = index.reshape(shape)
        if data_device is not None and index.device != data_device:
            index = index.to(data_device)
        return index

    def _after_write(self, storage: HippoStorage, rows: torch.Tensor) -> None:
        """Counts the write (slots are reclaimed in bulk) and tells the storage's other
        entities which rows changed."""
        storage.note_write()
        for ent in storage._attached_entities_iter():
            if isinstance(ent, HippoSampler):  # it can then merge these rows into its pool
                ent.mark_update(rows, storage=storage)
            else:
                ent.mark_update(rows)

    # ------------------------------------------------------------------ compiled path
    def _numba_applies(self, storage: HippoStorage, flat: TensorDictBase, shape) -> bool:
        """Whether :mod:`~torchrl_hippo.data.fifo_numba` can write this batch (see ``backend``)."""
        return (
            self.backend != "torch"
            and fifo_numba.AVAILABLE
            and self.defer_keys
            and self.forgetting == "fifo"
            and self.segmenter is None
            and shape.numel() <= storage.max_size
            and storage.table_device.type == "cpu"
            and (flat.device is None or flat.device.type == "cpu")
            and storage.episodes is not None
            and self._store_columns(storage) is not None
            and len(self._columns_cache[2]) == len(_HIPPO_DTYPES)
            and HIPPO_KEYS["key"] in self._columns_cache[1]
        )

    def _extend_numba(
        self,
        storage: HippoStorage,
        data: TensorDictBase,
        flat: TensorDictBase,
        shape: torch.Size,
        entries: dict,
        leaves: dict,
    ) -> torch.Tensor | None:
        """The write of :meth:`_extend` with its bookkeeping in one compiled call.

        Returns ``None``, having changed nothing, where the torch path must write the batch
        instead (entries the storage does not hold yet, an eager writer's open episodes,
        rewards whose float64 sum overflows).
        """
        n = shape.numel()

        def flat_entry(name: str, dtype: torch.dtype) -> torch.Tensor | None:
            value = entries[name]
            return None if value is None else value.reshape(n).to(dtype)

        reward = entries["reward"].reshape(n)
        if reward.dtype not in (torch.float32, torch.float64):
            reward = reward.double()
        done, is_init = flat_entry("done", torch.bool), flat_entry("is_init", torch.bool)
        traj = flat_entry("traj", torch.int64)
        order = _stream_order(traj, shape)
        if order is not None:
            reward, done, is_init, traj = (
                None if t is None else t.index_select(0, order)
                for t in (reward, done, is_init, traj)
            )
            flat = flat[order]
        if traj is not None:
            layout, time = fifo_numba.TRAJ_IDS, 0
        elif len(shape) == 2 and shape[0] > 1:
            layout, time = fifo_numba.ENV_TIME, shape[1]
        else:
            layout, time = fifo_numba.ONE_STREAM, 0
        self._check_embed_dim(storage)
        pairs = self._column_pairs(storage, flat, leaves if flat is data else None)
        if pairs is None:
            return None
        self._ensure_open(flat, self.encoder.window, storage.table_device)
        open_arrays = self._open_arrays()
        if open_arrays is None:
            return None
        start = self._cursor
        index = np.empty(n, np.int64)
        batch = (
            reward.detach().numpy(),
            _NO_FLAGS if done is None else done.numpy(),
            _NO_FLAGS if is_init is None else is_init.numpy(),
            _NO_IDS if traj is None else traj.numpy(),
            layout,
            time,
            _NO_IDS if order is None else order.numpy(),
        )
        for _ in range(2):  # once more when the episode table needs free slots
            status, needed, *open_out = fifo_numba.fifo_write(
                n, *batch, *open_arrays, self.max_open_episodes, storage.max_size,
                *self._numpy_views(storage), index,
            )  # fmt: skip
            if status != fifo_numba.NEED_SLOTS:
                break
            storage.reserve_slots(needed)
        if status == fifo_numba.NOT_FINITE:
            if not bool(torch.isfinite(reward).all()):
                raise ValueError(f"reward {self.reward_key!r} contains NaN or inf values.")
            return None  # finite rewards whose sum overflows: the torch path writes them
        columns = dict(zip(_OPEN_COLUMNS, (torch.from_numpy(a) for a in open_out)))
        table = TensorDict._new_unsafe(
            columns, batch_size=[open_out[0].shape[0]], device=storage.table_device
        )
        self._open = table
        self.__dict__["_open_cache"] = (table, columns)
        self.__dict__["_open_numpy"] = (table, tuple(open_out))
        index = torch.from_numpy(index)
        self._write_rows(storage, index, start, flat, slice(0, n), {}, pairs)
        storage.add_pending_keys(index)
        self._after_write(storage, index)
        return index if len(shape) == 1 else index.reshape(shape)

    def _open_arrays(self) -> tuple[np.ndarray, ...] | None:
        """The open episodes' columns as numpy arrays, in :data:`_OPEN_COLUMNS` order (``None``
        for an eager writer's table, which the compiled path does not update)."""
        open_ = self._open
        cache = self.__dict__.get("_open_numpy")
        if cache is None or cache[0] is not open_:
            columns = self._open_columns()
            if set(columns) != set(_OPEN_COLUMNS):
                return None
            arrays = tuple(columns[name].numpy() for name in _OPEN_COLUMNS)
            cache = self.__dict__["_open_numpy"] = (open_, arrays)
        return cache[1]

    def _numpy_views(self, storage: HippoStorage) -> tuple[np.ndarray, ...]:
        """The arrays :func:`fifo_numba.fifo_write` updates, as numpy views of the storage's
        tensors (made again when the storage replaces one)."""
        owners = (storage._cv, storage._free_slots, storage._table, storage._row_slot)
        owners = (*owners, storage._storage)
        cache = self.__dict__.get("_numpy_cache")
        if cache is None or any(a is not b for a, b in zip(cache[0], owners)):
            table = storage._table
            hippo = dict(self._columns_cache[2])
            views = (
                storage._cv,
                storage._free_slots.numpy(),
                *(table[name].numpy() for name in _TABLE_ORDER),
                storage._row_slot.numpy(),
                *(hippo[name].numpy() for name in _HIPPO_ORDER),
            )
            cache = self.__dict__["_numpy_cache"] = (owners, views)
        return cache[1]

    # ------------------------------------------------------------------ helpers
    def _validate(self, data: Any) -> tuple[TensorDictBase, torch.Size, dict, dict]:
        """Checks the batch's structure; returns it flat, its shape, the entries we read and
        all its leaves by key.

        The entries are ``reward`` and the optional ``done``, ``is_init`` and ``traj`` (``None``
        when absent). Whether the rewards are finite is checked by :class:`_Segments`.
        """
        if not isinstance(data, TensorDictBase):
            raise TypeError(f"data must be a TensorDict, got {type(data).__name__}.")
        if data.ndim not in (1, 2):
            raise ValueError(
                f"data must have batch size [N] or [env, time], got {list(data.batch_size)}."
            )
        n = data.batch_size.numel()
        if n == 0:
            raise ValueError(
                f"data is empty (batch size {list(data.batch_size)}): extend needs at least one "
                "transition."
            )

        # One walk over the entries serves every lookup (and, see ``_column_pairs``, the
        # check of the entries against the stored columns).
        leaves = dict(data.items(True, True))
        lookup = self._lookup_keys()

        def leaf(name: str) -> torch.Tensor | None:
            value = leaves.get(lookup[name])
            return value if isinstance(value, torch.Tensor) else None

        obs, action = leaf("observation"), leaf("action")
        for name, key, value in (
            ("observation", self.observation_key, obs),
            ("action", self.action_key, action),
        ):
            if value is None:
                raise ValueError(f"data has no {name} entry {key!r}.")
            if value.numel() % n:
                raise ValueError(
                    f"{name} {key!r} of shape {list(value.shape)} does not hold the same "
                    f"features for each of the {n} transitions."
                )
            # NaN / inf inputs would give NaN keys, which every search would rank first.
            if value.is_floating_point() and not _all_finite(value):
                raise ValueError(f"{name} {key!r} contains NaN or inf values.")
        act_dim = getattr(self.encoder, "action_dim", None)
        feat = action.numel() // n
        if act_dim is not None and not (
            feat == act_dim or (not action.is_floating_point() and feat == 1)
        ):
            raise ValueError(
                f"action {self.action_key!r} has {feat} features per transition, the encoder "
                f"expects action_dim={act_dim} (or one integer index per transition)."
            )
        reward = leaf("reward")
        if reward is None:
            raise ValueError(f"data has no reward entry {self.reward_key!r}.")
        done, traj = leaf("done"), leaf("traj")
        if done is None and traj is None:
            raise ValueError(
                f"data has neither a done entry {self.done_key!r} nor trajectory ids "
                f"{self.traj_key!r}: episodes cannot be segmented."
            )
        shape = data.batch_size
        if not reward.is_floating_point():
            raise TypeError(
                f"reward {self.reward_key!r} must be floating point, got {reward.dtype}."
            )
        if reward.numel() != n:
            raise ValueError(
                f"reward {self.reward_key!r} must hold one scalar per transition, got shape "
                f"{list(reward.shape)} for batch {list(shape)}."
            )
        is_init = leaf("is_init")
        for name, key, value in (
            ("done", self.done_key, done),
            ("is_init", self.is_init_key, is_init),
            ("traj_ids", self.traj_key, traj),
        ):
            if value is not None and value.numel() != n:
                raise ValueError(
                    f"{name} {key!r} must hold one {'id' if name == 'traj_ids' else 'flag'} "
                    f"per transition, got shape "
                    f"{list(value.shape)} for batch {list(shape)}."
                )
        obs_dim = self._checked_obs_dim
        if obs_dim is not None:
            feat = obs.numel() // n
            if feat != obs_dim:
                raise ValueError(
                    f"observation {self.observation_key!r} has {feat} features per transition, "
                    f"the encoder expects observation_dim={obs_dim}."
                )
        flat = data.reshape(-1) if data.ndim == 2 else data
        entries = {
            "reward": reward,
            "done": done,
            "is_init": is_init,
            "traj": traj,
        }
        return flat, shape, entries, leaves

    def _lookup_keys(self) -> dict[str, NestedKey]:
        """The entries ``extend`` reads, by name, as keys of ``data.items(True, True)``."""
        keys = (
            self.observation_key,
            self.action_key,
            self.reward_key,
            self.done_key,
            self.traj_key,
            self.is_init_key,
        )
        cache = self.__dict__.get("_lookup_cache")
        if cache is None or cache[0] != keys:  # once per change of keys
            names = ("observation", "action", "reward", "done", "traj", "is_init")
            lookup = {name: unravel_key(key) for name, key in zip(names, keys)}
            cache = self.__dict__["_lookup_cache"] = (keys, lookup)
        return cache[1]

    def _apply_segmenter(
        self,
        flat: TensorDictBase,
        seq: _Segments,
        stitch: _Stitch,
        entries: dict,
        shape: torch.Size,
        device: torch.device,
    ) -> tuple[_Segments, _Stitch]:
        """Asks :attr:`segmenter` for further episode starts; re-segments if it gives any."""
        n = seq.n
        base_step = stitch.per_segment(self._open_columns()["step"])
        origin = seq.first if base_step is None else seq.first - base_step
        step = _arange(n, device) - seq.per_row(origin)
        if seq.key is None:
            stream = torch.zeros(n, dtype=torch.int64, device=device)
        else:
            stream = seq.per_row(seq.key)
        with torch.inference_mode(False):  # user code: it may keep tensors of its own
            starts = self.segmenter(flat, step, stream)
        if not isinstance(starts, torch.Tensor) or starts.dtype != torch.bool:
            raise TypeError(
                f"segmenter must return a bool tensor of episode starts, got "
                f"{starts.dtype if isinstance(starts, torch.Tensor) else type(starts).__name__}."
            )
        if starts.numel() != n:
            raise ValueError(
                f"segmenter must return one flag per transition ({n}), got shape "
                f"{list(starts.shape)}."
            )
        extra = starts.reshape(n).to(device) & (step != 0)
        if not bool(extra.any()):
            return seq, stitch
        seq = _Segments(entries, shape, device, extra_starts=extra)
        return seq, seq.match(self._open_columns()["key"])

    def _open_columns(self) -> dict[str, Any]:
        """The open episodes' entries by name, for the TensorDict the storage holds now."""
        open_ = self._open
        cache = self.__dict__.get("_open_cache")
        if cache is None or cache[0] is not open_:
            cache = self.__dict__["_open_cache"] = (open_, dict(open_.items()))
        return cache[1]

    def _ensure_open(self, flat: TensorDictBase, window: int, device: torch.device) -> None:
        if self._open is None:
            self._open = self._new_open(flat, window, device)

    def _new_open(self, flat: TensorDictBase, window: int, device: torch.device) -> TensorDict:
        """An empty open-episode table (``flat``'s rows give the layout of the window tails)."""
        entries = {
            name: torch.zeros(
                0, dtype=torch.float64 if name == "ret" else torch.int64, device=device
            )
            for name in ("key", "episode", "slot", "step", "ret", "last_row")
        }
        if not self.defer_keys:
            tail = self._step_td(flat[:1]).unsqueeze(1).expand(1, window - 1)[:0].clone()
            tail.set("mask", torch.zeros(0, window - 1, dtype=torch.bool, device=device))
            entries["tail"] = tail
        return TensorDict(entries, batch_size=[0], device=device)

    def _step_td(self, rows: TensorDictBase) -> TensorDict:
        """The per-step entries the encoder reads, as a TensorDict of batch ``[n]``."""
        dev = self._storage.table_device
        return TensorDict(
            {
                "observation": rows.get(self.observation_key),
                "action": rows.get(self.action_key),
                "reward": rows.get(self.reward_key).reshape(rows.shape[0], 1).float(),
            },
            batch_size=rows.shape[:1],
        ).to(dev)

    def _pools(self, flat, open_, window, device) -> TensorDict:
        """Rows of the batch, then the open episodes' tails, then one zero row."""
        steps = self._step_td(flat)
        tails = open_["tail"].exclude("mask").flatten(0, 1)
        zero = steps[:1].clone().zero_()
        return torch.cat([steps, tails, zero], 0)

    def _window_index(self, seq, stitch, window, open_, device):
        """Rows of the pools (see :meth:`_pools`) making up each row's window, and its mask."""
        n = seq.n
        k = open_["key"].shape[0]
        offset = _arange(n, device) - seq.first[seq.seg]
        back = torch.arange(window - 1, -1, -1, device=device)[None, :]
        off = offset[:, None]
        in_batch = back <= off
        src = _arange(n, device)[:, None] - back
        zero_row = n + k * (window - 1)
        if window == 1 or k == 0:
            idx = torch.where(in_batch, src, zero_row)
            return idx, in_batch
        seg_stitched, seg_oidx = stitch.masks()
        stitched = seg_stitched[seq.seg][:, None]
        oidx = seg_oidx[seq.seg][:, None]
        tail_pos = (window - 1) - (back - off)
        tail_pos_c = tail_pos.clamp(0, window - 2)
        ctx_ok = stitched & ~in_batch & open_["tail"].get("mask")[oidx, tail_pos_c]
        ctx_src = n + oidx * (window - 1) + tail_pos_c
        idx = torch.where(in_batch, src, torch.where(ctx_ok, ctx_src, zero_row))
        return idx, in_batch | ctx_ok

    @torch.inference_mode(False)  # the encoder is user code: it runs as it would elsewhere
    @torch.no_grad()
    def _encode(self, pools, win_idx, win_mask, storage) -> torch.Tensor:
        enc = self.encoder
        param = next(enc.parameters(), None)
        enc_dev = param.device if param is not None else storage.table_device
        out = torch.empty(
            win_idx.shape[0], enc.embed_dim, dtype=storage.key_dtype, device=storage.table_device
        )
        for start in range(0, win_idx.shape[0], self.encode_chunk):
            sl = slice(start, start + self.encode_chunk)
            win = pools[win_idx[sl]].to(enc_dev)
            keys = enc.encode(
                win["observation"],
                win["action"],
                win["reward"],
                win_mask[sl].to(enc_dev),
                target=True,
            )
            if not bool(torch.isfinite(keys).all()):
                raise FloatingPointError(
                    "The encoder produced NaN or inf keys (check its weights); nothing was written."
                )
            out[sl] = keys.to(device=out.device, dtype=out.dtype)
        return out

    def _place(
        self, n_write: int, storage: HippoStorage, protected: torch.Tensor | None
    ) -> tuple[torch.Tensor, int | None]:
        """Rows for the next ``n_write`` transitions, and the ring position they start at.

        The start is ``None`` when the rows are not one ring run (importance forgetting).
        """
        capacity = storage.max_size
        dev = storage.table_device
        if self.forgetting == "fifo":
            start = self._cursor
            rows = torch.arange(start, start + n_write, device=dev)
            if start + n_write > capacity:
                rows %= capacity
            self._cursor = (start + n_write) % capacity
            return rows, start
        high = len(storage)
        fresh = min(capacity - high, n_write)
        need = n_write - fresh
        if need > storage.num_free_rows:
            headroom = math.ceil(self.evict_fraction * capacity)
            self._evict(storage, need - storage.num_free_rows + headroom, protected)
        rows = torch.arange(high, high + fresh, device=dev)
        if need:
            rows = torch.cat([rows, storage.pop_free_rows(need)])
        return rows, (high if not need else None)

    def _store_columns(self, storage: HippoStorage) -> dict[NestedKey, torch.Tensor] | None:
        """Every leaf column of the storage's rows by key, or ``None`` when they cannot be
        written leaf by leaf (not yet created, or not a plain TensorDict of tensors).

        Cached for as long as the storage holds the same TensorDict (its columns are written
        in place, never replaced).
        """
        store = storage._storage
        cache = self.__dict__.get("_columns_cache")
        if cache is not None and cache[0] is store:
            return cache[1]
        if not (
            storage.initialized and type(store) is TensorDict and storage._storage_keys is None
        ):
            return None
        columns = dict(store.items(True, True))
        if not all(isinstance(column, torch.Tensor) for column in columns.values()):
            return None
        # The "hippo" columns computed in place (see _hippo_columns): all of them, with the
        # writer's dtypes, or none.
        hippo = [(name, columns.get(("hippo", name))) for name in _HIPPO_DTYPES]
        if any(c is None or c.dtype != _HIPPO_DTYPES[name] for name, c in hippo):
            hippo = []
        self.__dict__["_columns_cache"] = (store, columns, hippo)
        return columns

    def _hippo_columns(self, storage: HippoStorage, start: int, n: int) -> dict[str, torch.Tensor]:
        """Views of the storage's ``"hippo"`` entries at rows ``start:start + n`` (a run).

        Empty unless the storage holds them all with the writer's dtypes (so not before the
        first write), in which case :meth:`_write_rows` would write them the same way.
        """
        if self._store_columns(storage) is None:
            return {}
        return {name: column[start : start + n] for name, column in self._columns_cache[2]}

    def _column_pairs(
        self, storage: HippoStorage, flat: TensorDictBase, leaves: dict | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The (stored column, batch value) of each entry of the batch, but ``"hippo"``
        (``leaves``: the batch's leaves by key, if already at hand).

        Raises ``ValueError`` naming the entry when a value cannot be written into the column
        that holds it (another per-transition shape, or integers into floats and the other way
        round), so that nothing is written. ``None`` when the rows must go through
        :meth:`HippoStorage.set` (first write, or entries the storage does not hold yet).
        """
        columns = self._store_columns(storage)
        if columns is None:
            return None
        pairs = []
        complete = True
        batch_dims = len(flat.batch_size)
        for key, value in flat.items(True, True) if leaves is None else leaves.items():
            if key == "hippo" or (isinstance(key, tuple) and key[0] == "hippo"):
                continue
            column = columns.get(key)
            if column is None or not isinstance(value, torch.Tensor):
                complete = False  # a new entry: the storage creates it
                continue
            if value.shape[batch_dims:] != column.shape[1:] or (
                value.is_floating_point() != column.is_floating_point()
            ):
                raise ValueError(
                    f"entry {key!r} of the batch ({value.dtype}, {list(value.shape[batch_dims:])} "
                    f"per transition) does not fit the memory's ({column.dtype}, "
                    f"{list(column.shape[1:])} per transition)."
                )
            pairs.append((column, value))
        return pairs if complete else None

    def _write_rows(
        self,
        storage: HippoStorage,
        rows: torch.Tensor,
        start: int | None,
        flat: TensorDictBase,
        tail: slice,
        hippo: dict[str, torch.Tensor],
        pairs: list[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> None:
        """Writes ``flat[tail]`` (its ``"hippo"`` entries replaced by ``hippo``) at ``rows``.

        A ring run (``start`` given) is written as (at most two) slices. Once the storage
        exists and holds every entry of the batch, the entries are copied leaf by leaf;
        otherwise (first write, new entries, a locked storage) through
        :meth:`HippoStorage.set`, which creates them.
        """
        if pairs is not None:
            columns = self._store_columns(storage)
            pairs = [(column, value[tail] if tail.start else value) for column, value in pairs]
            for name, value in hippo.items():
                column = columns.get(("hippo", name))
                if column is None:  # not created yet: the storage creates it
                    pairs = None
                    break
                pairs.append((column, value))
        if pairs is None:
            self.__dict__.pop("_columns_cache", None)  # the storage may gain entries
            out = self._rows_td(flat, tail, hippo)
            with torch.inference_mode(False):  # new columns are plain tensors
                if start is None:
                    storage.set(rows, out, set_cursor=False)
                else:
                    for ring_rows, part in _ring_parts(start, out.shape[0], storage.max_size):
                        storage.set(ring_rows, out[part], set_cursor=False)
        else:
            for column, value in pairs:
                if start is None:
                    column[rows] = value.to(column.device)
                else:
                    _ring_set(column, start, value)
            storage._bump_mutation_revision()
        # The cursor and length as ints: TorchRL's setters turn tensors into ints themselves,
        # and the length (a process-shared value) only changes until the memory is full.
        n = rows.shape[0]
        if start is None:
            high, last = int(rows.max()) + 1, int(rows[-1])
        else:
            high = start + min(n, storage.max_size - start)
            last = (start + n - 1) % storage.max_size
        storage._set_last_cursor(last)
        if high > len(storage):
            storage._len = high

    def episode_scores(self, storage: HippoStorage | None = None) -> torch.Tensor:
        """The importance score of every episode-table slot (``nan`` for empty slots).

        ``score = w_return * return_rank + w_access * access + w_recency * recency`` with
        ``return_rank`` the rank of the episode's return among stored episodes scaled to
        ``[0, 1]``, ``access = log1p(count) / log1p(max count)`` and ``recency`` the last write
        time scaled to ``[0, 1]`` between the oldest and newest stored episode.
        """
        storage = self._storage if storage is None else storage
        table = storage.episodes
        alive = table["rows"] > 0
        ret = table["return"].double()
        n_alive = int(alive.sum())
        # Ranks among alive episodes: sort alive returns, dead ones pushed to the end.
        order = torch.argsort(torch.where(alive, ret, torch.inf), stable=True)
        rank = torch.empty_like(ret)
        rank[order] = torch.arange(ret.numel(), device=ret.device, dtype=ret.dtype)
        rank = rank / max(n_alive - 1, 1)
        access = torch.log1p(table["access"].double())
        access = access / access[alive].max().clamp_min(1e-12) if n_alive else access
        updated = table["updated"].double()
        if n_alive:
            lo, hi = updated[alive].min(), updated[alive].max()
            recency = (updated - lo) / (hi - lo).clamp_min(1.0)
        else:
            recency = updated
        w = self.eviction_weights
        score = w["return"] * rank + w["access"] * access + w["recency"] * recency
        return torch.where(alive, score, torch.nan)

    def _evict(self, storage: HippoStorage, target: int, protected: torch.Tensor) -> None:
        table = storage.episodes
        score = self.episode_scores(storage)
        alive = table["rows"] > 0
        # Running episodes go last, the ones continued by this very batch after them.
        score = score + (~table["done"]).double() * 10.0
        score[protected] = score[protected] + 100.0
        score = torch.where(alive, score, torch.inf)
        order = torch.argsort(score)
        n_alive = int(alive.sum())
        order = order[:n_alive]
        cum = torch.cumsum(table["rows"][order], 0)
        target = min(target, int(cum[-1])) if n_alive else 0
        if target <= 0:
            return
        k = int(torch.searchsorted(cum, torch.tensor(target, device=cum.device))) + 1
        evicted = order[:k]
        high = len(storage)
        row_slot = storage.row_slot[:high]
        rows = torch.isin(row_slot, evicted).nonzero().squeeze(1)
        storage.row_slot[rows] = -1
        storage._storage.get(HIPPO_KEYS["episode"])[rows] = -1
        storage.push_free_rows(rows)
        table["rows"][evicted] = 0
        storage.release_slots(evicted[table["done"][evicted]])
        storage.bump_key_revision()

    def _rows_td(
        self, flat: TensorDictBase, tail: slice, hippo: dict[str, torch.Tensor]
    ) -> TensorDictBase:
        """The rows to store: the input's entries (any ``"hippo"`` ones replaced) and ours."""
        out = flat.exclude("hippo")
        if tail.start:
            out = out[tail]
        dev = self._storage.table_device
        if out.device != dev:
            out = out.to(dev)
        out.set("hippo", TensorDict._new_unsafe(hippo, batch_size=out.batch_size, device=dev))
        return out

    def _update_open(
        self,
        seq: _Segments,
        stitch: _Stitch,
        seg_ep: torch.Tensor,
        seg_slot: torch.Tensor,
        seg_length: torch.Tensor,
        seg_return: torch.Tensor,
        idx_seq: torch.Tensor,
        win_idx: torch.Tensor | None,
        win_mask: torch.Tensor | None,
        pools: TensorDict | None,
        storage: HippoStorage,
    ) -> None:
        """Drops the open episodes that ended or were continued, adds this batch's running ones."""
        open_ = self._open_columns()
        still = seq.still_open()
        last = _select(seq.last, still)
        new = {
            "key": seq.keys(still),
            "episode": _select(seg_ep, still),
            "slot": _select(seg_slot, still),
            "step": _select(seg_length, still),
            "ret": _select(seg_return, still),
            "last_row": idx_seq.index_select(0, last),
        }
        if pools is not None:
            tail = pools[win_idx[last, 1:]]
            tail.set("mask", win_mask[last, 1:])
            new["tail"] = tail
        size = open_["key"].shape[0]
        if stitch.ended.numel() == size:
            merged = new
        else:
            keep = torch.ones(size, dtype=torch.bool, device=last.device)
            keep[stitch.ended] = False
            keep = keep.nonzero().squeeze(1)
            merged = {name: torch.cat([open_[name][keep], value]) for name, value in new.items()}
        size = merged["key"].shape[0]
        excess = size - self.max_open_episodes
        if excess > 0:
            dropped = merged["slot"][:excess]
            storage.episodes["done"][dropped] = True
            table_rows = storage.episodes["rows"][dropped]
            storage.release_slots(dropped[table_rows == 0])
            merged = {name: value[excess:] for name, value in merged.items()}
            size -= excess
        device = merged["key"].device
        table = TensorDict._new_unsafe(merged, batch_size=[size], device=device)
        self._open = table
        self.__dict__["_open_cache"] = (table, merged)

    # ------------------------------------------------------------------ contract
    def _empty(self, empty_write_count: bool = True) -> None:
        self._cursor = 0
        self._open = None
        reset = getattr(self.segmenter, "reset", None)
        if callable(reset):
            reset()
        if empty_write_count:
            self._write_count = 0

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this writer, but the code ones (``encoder``,
        ``segmenter``).

        Examples:
            >>> from torchrl_hippo import DualEncoder, HippoWriter
            >>> writer = HippoWriter(DualEncoder(3, 2, 16, window=4), forgetting="importance")
            >>> config = writer.config
            >>> config["forgetting"], config["defer_keys"]
            ('importance', False)
            >>> HippoWriter(writer.encoder, **config).config == config
            True
        """
        return {
            "forgetting": self.forgetting,
            "eviction_weights": dict(self.eviction_weights),
            "evict_fraction": self.evict_fraction,
            "encode_chunk": self.encode_chunk,
            "done_key": self.done_key,
            "traj_key": self.traj_key,
            "is_init_key": self.is_init_key,
            "max_open_episodes": self.max_open_episodes,
            "defer_keys": self.defer_keys,
            "backend": self.backend,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "cursor": self._cursor,
            "write_count": self._write_count,
            "open": None if self._open is None else self._open.clone().state_dict(),
            "segmenter": self._segmenter_state(),
        }

    def _segmenter_state(self) -> dict[str, Any] | None:
        state_dict = getattr(self.segmenter, "state_dict", None)
        return state_dict() if callable(state_dict) else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._cursor = int(state_dict["cursor"])
        self._write_count = int(state_dict["write_count"])
        segmenter_state = state_dict.get("segmenter")
        if segmenter_state is not None:
            if not callable(getattr(self.segmenter, "load_state_dict", None)):
                raise ValueError(
                    "state_dict holds a segmenter's state, but this writer's segmenter "
                    f"({type(self.segmenter).__name__}) has no load_state_dict."
                )
            self.segmenter.load_state_dict(segmenter_state)
        open_state = state_dict["open"]
        if open_state is None:
            self._open = None
            return
        open_ = TensorDict().load_state_dict(open_state, strict=False).clone()
        device = self._storage.table_device if self._storage is not None else None
        if device is not None:
            open_ = open_.to(device)
        if not self.defer_keys and "tail" not in open_.keys():
            raise ValueError(
                "state_dict holds the open episodes of a writer with defer_keys=True, which "
                "keeps no window tails; load it into a HippoWriter(defer_keys=True)."
            )
        self._open = open_

    def dumps(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path / "hippo_writer.pt")

    def loads(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(Path(path) / "hippo_writer.pt", weights_only=True))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(forgetting={self.forgetting!r}, window={self.encoder.window}, "
            f"defer_keys={self.defer_keys}, backend={self.backend!r}, "
            f"embed_dim={self.encoder.embed_dim}, write_count={self._write_count})"
        )


class _Segments:
    """Episode segments of one batch, in sequence order (streams contiguous).

    Rows are taken in *sequence order*: the input's, or sorted by trajectory id (``order``)
    when a flat batch interleaves streams. A segment is a run of rows of one stream and one
    episode, rows ``first[s]`` to ``last[s]`` (``end = last + 1``); :meth:`per_row` spreads
    per-segment values over the rows. A stream is told apart by its trajectory id, else by
    its environment in an ``[env, time]`` batch; a flat batch without trajectory ids is one
    stream (``key is None``): only its first segment can continue an open episode (that of
    key 0), only its last one can stay open. ``extra_starts`` (sequence order) are further
    episode starts, treated like ``is_init``.
    """

    def __init__(
        self,
        entries: dict,
        shape: torch.Size,
        device: torch.device,
        extra_starts: torch.Tensor | None = None,
    ) -> None:
        n = shape.numel()
        self.n = n

        def flat(name: str, dtype: torch.dtype) -> torch.Tensor | None:
            value = entries[name]
            if value is None:
                return None
            value = value.reshape(n)
            if value.dtype is dtype and value.device == device:
                return value
            return value.to(device=device, dtype=dtype)

        done, is_init = flat("done", torch.bool), flat("is_init", torch.bool)
        reward, key = flat("reward", entries["reward"].dtype), flat("traj", torch.int64)
        self.order = _stream_order(key, shape)
        if self.order is not None:
            done, is_init, reward, key = (
                None if t is None else t.index_select(0, self.order)
                for t in (done, is_init, reward, key)
            )
        if extra_starts is not None:  # further starts (sequence order), treated as is_init
            is_init = extra_starts if is_init is None else is_init | extra_starts
        # bound[i]: a segment starts at row i (row 0, after a done, at an is_init, where the
        # stream changes); bound[n] closes the last one.
        true = _constants(device).true
        if done is None:
            bound = torch.zeros(n + 1, dtype=torch.bool, device=device)
            bound[::n] = True
        else:
            bound = torch.cat([true, done[:-1], true])
        if is_init is not None:
            bound[:n] |= is_init
        time = shape[1] if key is None and len(shape) == 2 and shape[0] > 1 else None
        if time is not None:  # one stream per environment: row e * time + t belongs to env e
            bound[::time] = True
        elif key is not None:
            bound[1:n] |= key[1:] != key[:-1]
        edges = bound.nonzero().squeeze(1)
        self.first, self.end = edges[:-1], edges[1:]
        self.last = self.end - 1
        self.length = self.end - self.first
        self.num = self.first.shape[0]
        self._seg = bound[:n].cumsum(0)
        self._seg -= 1
        self.csum = torch.cumsum(reward, 0, dtype=torch.float64)
        self.csum_last = self.csum.index_select(0, self.last)  # at each segment's last row
        # The total is finite iff every reward is (a float64 sum of float32s cannot overflow).
        self.finite = math.isfinite(self.csum_last[-1])
        self._is_init = is_init

        # Per segment: the stream (key), whether it is the stream's first segment here, and
        # whether its episode ended in this batch (done, or a later segment of it follows).
        done_last = (
            torch.zeros(self.num, dtype=torch.bool, device=device)
            if done is None
            else done.index_select(0, self.last)
        )
        if time is not None:
            self.key = self.first // time
            self._first_of_key = self.first % time == 0
            self.closed = done_last | (self.end % time != 0)
        elif key is not None:
            self.key = key.index_select(0, self.first)
            change = self.key[1:] != self.key[:-1]
            self._first_of_key = torch.cat([true, change])
            self.closed = done_last | ~torch.cat([change, true])
        else:
            self.key = self._first_of_key = None
            done_last[:-1] = True
            self.closed = done_last

    @property
    def seg(self) -> torch.Tensor:
        """The segment of every row."""
        return self._seg

    def per_row(self, values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-segment ``values`` spread over the segments' rows (into ``out`` if given)."""
        return torch.index_select(values, 0, self._seg, out=out)

    def still_open(self) -> torch.Tensor | slice:
        """The segments whose episode goes on after the batch."""
        if self.key is None:
            return slice(self.num - 1, self.num - int(self.closed[-1]))
        return (~self.closed).nonzero().squeeze(1)

    def keys(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The streams of the segments ``index``."""
        if self.key is None:  # one stream, key 0: at most one segment stays open
            size = index.stop - index.start if isinstance(index, slice) else index.shape[0]
            return _constants(self.first.device).zeros(size, torch.int64)
        return _select(self.key, index)

    def match(self, open_keys: torch.Tensor) -> _Stitch:
        """Which segments continue which open episodes (those of ``open_keys``).

        A stream's first segment in the batch continues the stream's open episode unless it
        starts with ``is_init``, in which case the open episode is abandoned.
        """
        none = _constants(open_keys.device).zeros(0, torch.int64)
        if not open_keys.numel():
            return _Stitch(self.num, slice(0, 0), none, slice(0, None), 0, none, none)
        if self.key is None:
            hit = (open_keys == 0).nonzero().squeeze(1)
            if not hit.numel():
                return _Stitch(self.num, slice(0, 0), none, slice(0, None), 0, none, none)
            if self._is_init is not None and bool(self._is_init[0]):
                return _Stitch(self.num, slice(0, 0), none, slice(0, None), 0, hit, hit)
            return _Stitch(self.num, slice(0, 1), hit, slice(1, None), 1, hit, none)
        same = self.key[:, None] == open_keys[None, :]
        hit = same & self._first_of_key[:, None]
        match = hit
        if self._is_init is not None:
            match = hit & ~self._is_init.index_select(0, self.first)[:, None]
        stitched = match.any(1)
        seg = stitched.nonzero().squeeze(1)
        opened = match.index_select(0, seg).to(torch.int8).argmax(1)
        fresh = (~stitched).nonzero().squeeze(1)
        ended = hit.any(0)
        abandoned = (ended & ~match.any(0)).nonzero().squeeze(1)
        return _Stitch(
            self.num, seg, opened, fresh, seg.shape[0], ended.nonzero().squeeze(1), abandoned
        )


class _Stitch:
    """How a batch's segments continue the open episodes.

    Segments ``seg`` continue open episodes ``open`` (``num`` of them), segments ``fresh``
    start new episodes; ``ended`` are the open episodes continued or abandoned (their stream
    restarted without continuing them), ``abandoned`` the latter. Segment indices are a slice
    where they are a run, else a tensor; open-episode indices are tensors.
    """

    __slots__ = ("abandoned", "ended", "fresh", "num", "open", "seg", "segments")

    def __init__(self, segments, seg, open, fresh, num, ended, abandoned) -> None:
        self.segments = segments
        self.seg = seg
        self.open = open
        self.fresh = fresh
        self.num = num
        self.ended = ended
        self.abandoned = abandoned

    def per_segment(
        self, from_open: torch.Tensor, fresh: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Per segment: ``from_open[o]`` where it continues open episode ``o``, else ``fresh``.

        ``fresh`` holds one value per fresh segment; ``None`` stands for zeros (then ``None``
        comes back when no segment continues an episode).
        """
        if not self.num:
            return fresh
        continued = from_open.index_select(0, self.open)
        if isinstance(self.seg, slice):  # the first segment continues, the others are fresh
            if fresh is None:
                fresh = _constants(continued.device).zeros(self.segments - 1, continued.dtype)
            return torch.cat([continued, fresh])
        if fresh is None:
            out = continued.new_zeros(self.segments)
        else:
            out = continued.new_empty(self.segments).index_copy_(0, self.fresh, fresh)
        return out.index_copy_(0, self.seg, continued)

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per segment: whether it continues an open episode, and which (0 where not)."""
        device = self.open.device
        stitched = torch.zeros(self.segments, dtype=torch.bool, device=device)
        oidx = torch.zeros(self.segments, dtype=torch.int64, device=device)
        stitched[self.seg] = True
        oidx[self.seg] = self.open
        return stitched, oidx


def _stream_order(traj: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """The rows of a flat batch sorted by trajectory id (stable), so that each stream's rows
    are contiguous; ``None`` when they already are (or there are no ids)."""
    if traj is None or len(shape) != 1 or traj.shape[0] < 2:
        return None
    if not bool((traj[1:] < traj[:-1]).any()):
        return None
    return torch.argsort(traj, stable=True)


def _all_finite(value: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN or inf, in one reduction pass.

    A finite sum means every value is finite (NaN and inf propagate); only a non-finite sum,
    which large finite values can also give by overflowing, is checked element by element.
    Half-precision values are summed in float32, where they cannot overflow.
    """
    dtype = torch.float32 if value.element_size() < 4 else None
    if math.isfinite(value.sum(dtype=dtype)):
        return True
    return bool(torch.isfinite(value).all())


def _select(values: torch.Tensor, index: torch.Tensor | slice) -> torch.Tensor:
    """``values[index]`` for a slice (a view) or an index tensor (``index_select``)."""
    return values[index] if isinstance(index, slice) else values.index_select(0, index)


class _Constants:
    """Small constant tensors of one device, made once (never write into them)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.true = torch.ones(1, dtype=torch.bool, device=device)
        self.arange = torch.arange(1024, device=device)
        self._zeros: dict[torch.dtype, torch.Tensor] = {}
        self._one = torch.ones((), dtype=torch.int64, device=device)

    def ones(self, n: int) -> torch.Tensor:
        """``torch.ones(n, dtype=torch.int64)``, an expanded view: never write into it."""
        return self._one.expand(n)

    def zeros(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """``torch.zeros(n, dtype=dtype)``, a view of a cached buffer: never write into it."""
        buffer = self._zeros.get(dtype)
        if buffer is None or buffer.shape[0] < n:
            size = max(n, 64 if buffer is None else 2 * buffer.shape[0])
            buffer = self._zeros[dtype] = torch.zeros(size, dtype=dtype, device=self.device)
        return buffer[:n]


_CONSTANTS: dict[torch.device, _Constants] = {}


def _constants(device: torch.device) -> _Constants:
    constants = _CONSTANTS.get(device)
    if constants is None:
        constants = _CONSTANTS[device] = _Constants(device)
    return constants


def _arange(n: int, device: torch.device) -> torch.Tensor:
    """``torch.arange(n)``, a view of a cached buffer: never write into it."""
    constants = _constants(device)
    if constants.arange.shape[0] < n:
        constants.arange = torch.arange(max(n, 2 * constants.arange.shape[0]), device=device)
    return constants.arange[:n]


def _ring_parts(start: int, n: int, capacity: int):
    """The (ring rows, batch rows) slices of ``n`` rows written from ring position ``start``."""
    first = min(n, capacity - start)
    yield slice(start, start + first), slice(0, first)
    if first < n:
        yield slice(0, n - first), slice(first, n)


def _ring(column: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Rows ``start, start + 1, ...`` (``n`` of them, wrapping) of ``column``."""
    if start + n <= column.shape[0]:
        return column[start : start + n]
    return torch.cat([column[rows] for rows, _ in _ring_parts(start, n, column.shape[0])])


def _ring_set(column: torch.Tensor, start: int, value: torch.Tensor) -> None:
    """Writes ``value`` at rows ``start, start + 1, ...`` (wrapping) of ``column``."""
    n = value.shape[0]
    if start + n <= column.shape[0]:
        column[start : start + n].copy_(value)
        return
    for rows, part in _ring_parts(start, n, column.shape[0]):
        column[rows].copy_(value[part])
