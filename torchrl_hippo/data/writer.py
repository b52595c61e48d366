"""HippoWriter: segments collector output into episodes, encodes keys, places and forgets rows."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase
from torchrl.data.replay_buffers.writers import Writer

from torchrl_hippo.data.storage import HIPPO_KEYS, HippoStorage

__all__ = ["HippoWriter"]

_FORGETTING = ("fifo", "importance")
_DEFAULT_EVICTION_WEIGHTS = {"return": 1.0, "access": 0.5, "recency": 1.0}


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
        if encode_chunk < 1:
            raise ValueError(f"encode_chunk must be >= 1, got {encode_chunk}.")
        if max_open_episodes < 1:
            raise ValueError(f"max_open_episodes must be >= 1, got {max_open_episodes}.")
        self.encoder = encoder
        self.forgetting = forgetting
        self.eviction_weights = {k: float(weights.get(k, 0.0)) for k in _DEFAULT_EVICTION_WEIGHTS}
        self.evict_fraction = float(evict_fraction)
        self.encode_chunk = int(encode_chunk)
        self.done_key = done_key
        self.traj_key = traj_key
        self.is_init_key = is_init_key
        self.max_open_episodes = int(max_open_episodes)
        self.defer_keys = bool(defer_keys)
        self._cursor = 0
        self._write_count = 0
        self._open: TensorDict | None = None

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
        super().register_storage(storage)
        storage.encoder = self.encoder

    def _check_embed_dim(self, storage: HippoStorage) -> None:
        if storage.embed_dim is not None and storage.embed_dim != self.encoder.embed_dim:
            raise ValueError(
                f"encoder.embed_dim={self.encoder.embed_dim} does not match the storage's stored "
                f"keys of size {storage.embed_dim}."
            )

    # ------------------------------------------------------------------ writing
    def add(self, data: TensorDictBase) -> int | torch.Tensor:
        """Writes a single transition (a TensorDict with empty batch size)."""
        if not isinstance(data, TensorDictBase):
            raise TypeError(f"data must be a TensorDict, got {type(data).__name__}.")
        return self.extend(data.unsqueeze(0))[0]

    def extend(self, data: TensorDictBase) -> torch.Tensor:
        storage: HippoStorage = self._storage
        if storage is None:
            raise RuntimeError("HippoWriter has no storage: use it inside a replay buffer.")
        flat, shape, keys = self._validate(data)
        storage._ensure_tables(device=flat.device if flat.device is not None else None)
        self._check_embed_dim(storage)
        dev = storage.table_device
        n = flat.shape[0]
        seq = _Segments(flat, self, keys, shape=shape, device=dev)
        if seq.order is not None:
            flat = flat[seq.order.to(flat.device) if flat.device is not None else seq.order]
        window = self.encoder.window
        self._ensure_open(flat, window, dev)
        open_ = self._open
        stitch = seq.match(open_["key"])
        stitched = stitch.stitched

        def from_open(field: str, default: float) -> torch.Tensor:
            """Per segment: the open episode's ``field`` where stitched, else ``default``."""
            if not open_.shape[0]:
                return torch.full((seq.num,), default, device=dev, dtype=open_[field].dtype)
            return torch.where(stitched, open_[field][stitch.oidx], default)

        # Per-row episode bookkeeping, all vectorised over rows and segments.
        offset = torch.arange(n, device=dev) - seq.first[seq.seg]
        base_step = from_open("step", 0)
        base_ret = from_open("ret", 0.0)
        step = base_step[seq.seg] + offset
        csum = torch.cumsum(seq.reward, 0)
        running = csum - (csum[seq.first] - seq.reward[seq.first])[seq.seg] + base_ret[seq.seg]
        seg_return = running[seq.last]

        # A batch larger than the memory keeps its last rows: rows[tail] are written.
        n_write = min(n, storage.max_size)
        tail = slice(n - n_write, n)

        # Windows and keys (target encoder, no grad) before any mutation.
        if self.defer_keys:
            win_idx = win_mask = pools = None
            # The rows' keys are computed later (key_version -1 marks them). The key column is
            # left as it is, except on the very first write, which creates it (zeros).
            keys = None
            if not storage.initialized:
                keys = torch.zeros((), dtype=storage.key_dtype, device=dev).expand(
                    n_write, self.encoder.embed_dim
                )
        else:
            win_idx, win_mask = self._window_index(seq, stitch, offset, window, open_, dev)
            pools = self._pools(flat, open_, window, dev)
            keys = self._encode(pools, win_idx[tail], win_mask[tail], storage)

        # ---- from here on the memory is mutated ----
        rows, start = self._place(n_write, storage, open_["slot"][stitch.oidx[stitched]])
        if n_write == n:
            idx_seq = rows
        else:
            idx_seq = torch.full((n,), -1, dtype=torch.int64, device=dev)
            idx_seq[tail] = rows

        n_new = int(seq.num - stitched.sum())
        new_slots = storage.allocate_slots(n_new)
        new_ids = storage.new_episode_ids(n_new)
        seg_slot = from_open("slot", 0)
        seg_ep = from_open("episode", 0)
        fresh = ~stitched
        seg_slot[fresh] = new_slots
        seg_ep[fresh] = new_ids

        clock = storage.clock
        table = storage.episodes
        if n_new:
            table["id"][new_slots] = new_ids
            table["inserted"][new_slots] = clock + seq.first[fresh]
            table["access"][new_slots] = 0
            table["rows"][new_slots] = 0
        table["return"][seg_slot] = seg_return.to(torch.float32)
        table["length"][seg_slot] = base_step + seq.length
        table["updated"][seg_slot] = clock + seq.last
        table["done"][seg_slot] = seq.done_last | ~seq.last_of_key
        abandoned_slots = open_["slot"][stitch.abandoned]
        table["done"][abandoned_slots] = True

        prev = torch.full((n,), -1, dtype=torch.int64, device=dev)
        prev[1:] = idx_seq[:-1]
        prev[seq.first] = from_open("last_row", -1)

        row_slot = seg_slot[seq.seg][tail]
        old_slot = storage.row_slot[rows]
        overwritten = old_slot[old_slot >= 0]
        table_rows = table["rows"]
        table_rows.index_add_(0, overwritten, overwritten.new_full((), -1).expand_as(overwritten))
        table_rows.index_add_(0, row_slot, row_slot.new_ones(()).expand_as(row_slot))
        storage.row_slot[rows] = row_slot

        hippo = {
            "episode": seg_ep[seq.seg][tail],
            "step": step[tail],
            "return": running[tail].to(torch.float32),
            "key_version": torch.full(
                (n_write,),
                -1 if self.defer_keys else int(self.encoder.version),
                dtype=torch.int64,
                device=dev,
            ),
            "prev": prev[tail],
        }
        if keys is not None:
            hippo["key"] = keys
        out = self._rows_td(flat, tail, hippo)
        self._write_rows(storage, rows, start, out)
        if self.defer_keys:
            storage.add_pending_keys(rows)

        # Slots whose episode has ended and has no row left are recycled. Overwritten rows come
        # in runs of one episode each, so unique_consecutive first shrinks them cheaply.
        maybe_free = torch.cat(
            [torch.unique_consecutive(overwritten), abandoned_slots, seg_slot]
        ).unique()
        free = maybe_free[(table_rows[maybe_free] == 0) & table["done"][maybe_free]]
        storage.release_slots(free)

        self._update_open(
            seq, stitch, seg_ep, seg_slot, base_step, seg_return, idx_seq, win_idx, win_mask,
            pools, storage,
        )
        storage.clock = clock + n
        self._write_count += n_write
        for ent in storage._attached_entities_iter():
            ent.mark_update(rows)

        if seq.order is None:
            index = idx_seq
        else:
            index = torch.empty_like(idx_seq)
            index[seq.order] = idx_seq
        index = index.reshape(shape)
        return index.to(data.device) if data.device is not None else index

    # ------------------------------------------------------------------ helpers
    def _validate(self, data: Any) -> tuple[TensorDictBase, torch.Size, set]:
        if not isinstance(data, TensorDictBase):
            raise TypeError(f"data must be a TensorDict, got {type(data).__name__}.")
        if data.ndim not in (1, 2):
            raise ValueError(
                f"data must have batch size [N] or [env, time], got {list(data.batch_size)}."
            )
        if data.numel() == 0:
            raise ValueError("data is empty: extend needs at least one transition.")
        keys = set(data.keys(True, True))
        for name, key in (
            ("observation", self.observation_key),
            ("action", self.action_key),
            ("reward", self.reward_key),
        ):
            if key not in keys:
                raise ValueError(f"data has no {name} entry {key!r}.")
        if self.done_key not in keys and self.traj_key not in keys:
            raise ValueError(
                f"data has neither a done entry {self.done_key!r} nor trajectory ids "
                f"{self.traj_key!r}: episodes cannot be segmented."
            )
        shape = data.batch_size
        reward = data.get(self.reward_key)
        if not reward.is_floating_point():
            raise TypeError(
                f"reward {self.reward_key!r} must be floating point, got {reward.dtype}."
            )
        if reward[0 if data.ndim == 1 else (0, 0)].numel() != 1:
            raise ValueError(
                f"reward {self.reward_key!r} must hold one scalar per transition, got shape "
                f"{list(reward.shape)} for batch {list(shape)}."
            )
        if not torch.isfinite(reward).all():
            raise ValueError(f"reward {self.reward_key!r} contains NaN or inf values.")
        if self.done_key in keys:
            done = data.get(self.done_key)
            if done.reshape(*shape, -1).shape[-1] != 1:
                raise ValueError(
                    f"done {self.done_key!r} must hold one flag per transition, got shape "
                    f"{list(done.shape)} for batch {list(shape)}."
                )
        obs = data.get(self.observation_key)
        obs_dim = getattr(self.encoder, "observation_dim", None)
        if getattr(self.encoder, "observation_encoder", None) is None and obs_dim is not None:
            feat = obs.reshape(*shape, -1).shape[-1]
            if feat != obs_dim:
                raise ValueError(
                    f"observation {self.observation_key!r} has {feat} features per transition, "
                    f"the encoder expects observation_dim={obs_dim}."
                )
        flat = data.reshape(-1) if data.ndim == 2 else data
        return flat, shape, keys

    def _ensure_open(self, flat: TensorDictBase, window: int, device: torch.device) -> None:
        if self._open is not None:
            return
        entries = {
            name: torch.zeros(0, dtype=torch.float64 if name == "ret" else torch.int64, device=device)
            for name in ("key", "episode", "slot", "step", "ret", "last_row")
        }
        if not self.defer_keys:
            tail = self._step_td(flat[:1]).unsqueeze(1).expand(1, window - 1)[:0].clone()
            tail.set("mask", torch.zeros(0, window - 1, dtype=torch.bool, device=device))
            entries["tail"] = tail
        self._open = TensorDict(entries, batch_size=[0], device=device)

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

    def _window_index(self, seq, stitch, offset, window, open_, device):
        """Rows of the pools (see :meth:`_pools`) making up each row's window, and its mask."""
        n = offset.shape[0]
        k = open_.shape[0]
        back = torch.arange(window - 1, -1, -1, device=device)[None, :]
        off = offset[:, None]
        in_batch = back <= off
        src = torch.arange(n, device=device)[:, None] - back
        zero_row = n + k * (window - 1)
        if window == 1 or k == 0:
            idx = torch.where(in_batch, src, zero_row)
            return idx, in_batch
        stitched = stitch.stitched[seq.seg][:, None]
        oidx = stitch.oidx[seq.seg][:, None]
        tail_pos = (window - 1) - (back - off)
        tail_pos_c = tail_pos.clamp(0, window - 2)
        ctx_ok = stitched & ~in_batch & open_["tail", "mask"][oidx, tail_pos_c]
        ctx_src = n + oidx * (window - 1) + tail_pos_c
        idx = torch.where(in_batch, src, torch.where(ctx_ok, ctx_src, zero_row))
        return idx, in_batch | ctx_ok

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
            out[sl] = keys.to(device=out.device, dtype=out.dtype)
        return out

    def _place(
        self, n_write: int, storage: HippoStorage, protected: torch.Tensor
    ) -> tuple[torch.Tensor, int | None]:
        """Rows for the next ``n_write`` transitions, and the ring position they start at.

        The start is ``None`` when the rows are not one ring run (importance forgetting).
        """
        capacity = storage.max_size
        dev = storage.table_device
        if self.forgetting == "fifo":
            start = self._cursor
            rows = (start + torch.arange(n_write, device=dev)) % capacity
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

    @staticmethod
    def _write_rows(
        storage: HippoStorage, rows: torch.Tensor, start: int | None, out: TensorDictBase
    ) -> None:
        """Writes ``out`` at ``rows``; a ring run is written as (at most two) slices."""
        n = out.shape[0]
        capacity = storage.max_size
        if start is None:
            storage.set(rows, out, set_cursor=False)
            high = int(rows.max()) + 1
        else:
            first = min(n, capacity - start)
            if first == n:
                storage.set(slice(start, start + n), out, set_cursor=False)
            else:
                storage.set(slice(start, capacity), out[:first], set_cursor=False)
                storage.set(slice(0, n - first), out[first:], set_cursor=False)
            high = start + first
        storage._set_last_cursor(rows)
        storage._len = max(len(storage), high)

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
        base_step: torch.Tensor,
        seg_return: torch.Tensor,
        idx_seq: torch.Tensor,
        win_idx: torch.Tensor | None,
        win_mask: torch.Tensor | None,
        pools: TensorDict | None,
        storage: HippoStorage,
    ) -> None:
        """Drops the open episodes that ended or were continued, adds this batch's running ones."""
        open_ = self._open
        keep = (~(stitch.consumed | stitch.abandoned)).nonzero().squeeze(1)
        still_open = (~seq.done_last & seq.last_of_key).nonzero().squeeze(1)
        last = seq.last[still_open]
        new = {
            "key": seq.key[still_open],
            "episode": seg_ep[still_open],
            "slot": seg_slot[still_open],
            "step": (base_step + seq.length)[still_open],
            "ret": seg_return[still_open],
            "last_row": idx_seq[last],
        }
        if pools is not None:
            tail = pools[win_idx[last, 1:]]
            tail.set("mask", win_mask[last, 1:])
            new["tail"] = tail
        if keep.numel() == 0:
            merged = new
        else:
            merged = {name: torch.cat([open_.get(name)[keep], value]) for name, value in new.items()}
        size = merged["key"].shape[0]
        excess = size - self.max_open_episodes
        if excess > 0:
            dropped = merged["slot"][:excess]
            storage.episodes["done"][dropped] = True
            table_rows = storage.episodes["rows"][dropped]
            storage.release_slots(dropped[table_rows == 0])
            merged = {name: value[excess:] for name, value in merged.items()}
            size -= excess
        self._open = TensorDict._new_unsafe(merged, batch_size=[size], device=open_.device)

    # ------------------------------------------------------------------ contract
    def _empty(self, empty_write_count: bool = True) -> None:
        self._cursor = 0
        self._open = None
        if empty_write_count:
            self._write_count = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "cursor": self._cursor,
            "write_count": self._write_count,
            "open": None if self._open is None else self._open.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._cursor = int(state_dict["cursor"])
        self._write_count = int(state_dict["write_count"])
        open_state = state_dict["open"]
        if open_state is None:
            self._open = None
            return
        open_ = TensorDict().load_state_dict(open_state, strict=False).clone()
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
            f"defer_keys={self.defer_keys}, "
            f"embed_dim={self.encoder.embed_dim}, write_count={self._write_count})"
        )


class _Segments:
    """Episode segments of one batch, in sequence order (streams contiguous)."""

    def __init__(
        self,
        flat: TensorDictBase,
        writer: HippoWriter,
        keys: set,
        *,
        shape: torch.Size,
        device: torch.device,
    ) -> None:
        n = flat.shape[0]

        def flag(key: NestedKey) -> torch.Tensor:
            if key not in keys:
                return torch.zeros(n, dtype=torch.bool, device=device)
            return flat.get(key).reshape(n).to(device=device, dtype=torch.bool)

        done, is_init = flag(writer.done_key), flag(writer.is_init_key)
        reward = flat.get(writer.reward_key).reshape(n).to(device=device, dtype=torch.float64)
        self.order = None
        if writer.traj_key in keys:
            key = flat.get(writer.traj_key).reshape(n).to(device=device, dtype=torch.int64)
            if len(shape) == 1 and n > 1 and bool((key[1:] < key[:-1]).any()):
                self.order = torch.argsort(key, stable=True)
        elif len(shape) == 2:
            # One stream per environment: row e * time + t belongs to env e.
            key = torch.arange(shape[0], device=device).repeat_interleave(shape[1])
        else:
            key = torch.zeros(n, dtype=torch.int64, device=device)
        if self.order is not None:
            key, done, is_init, reward = (t[self.order] for t in (key, done, is_init, reward))
        start = torch.ones(n, dtype=torch.bool, device=device)
        start[1:] = (key[1:] != key[:-1]) | done[:-1]
        start |= is_init
        self.seg = torch.cumsum(start, 0) - 1
        self.first = start.nonzero().squeeze(1)
        self.num = self.first.shape[0]
        self.last = torch.cat([self.first[1:] - 1, torch.tensor([n - 1], device=device)])
        self.length = self.last - self.first + 1
        self.key = key[self.first]
        self.done_last = done[self.last]
        self.reward = reward
        first_of_key = torch.ones(self.num, dtype=torch.bool, device=device)
        first_of_key[1:] = self.key[1:] != self.key[:-1]
        self.first_of_key = first_of_key
        self.can_stitch = first_of_key & ~is_init[self.first]
        last_of_key = torch.ones(self.num, dtype=torch.bool, device=device)
        last_of_key[:-1] = self.key[:-1] != self.key[1:]
        self.last_of_key = last_of_key

    def match(self, open_keys: torch.Tensor) -> _Stitch:
        same = self.key[:, None] == open_keys[None, :]
        hit = same & self.first_of_key[:, None]
        match = same & self.can_stitch[:, None]
        stitched = match.any(1)
        if open_keys.numel():
            oidx = torch.where(stitched, match.to(torch.int8).argmax(1), 0)
        else:
            oidx = torch.zeros_like(self.key)
        return _Stitch(
            stitched=stitched,
            oidx=oidx,
            consumed=match.any(0),
            abandoned=hit.any(0) & ~match.any(0),
        )


class _Stitch:
    """How a batch's segments continue the open episodes.

    ``stitched[s]``: segment ``s`` continues open episode ``oidx[s]`` (``oidx`` is 0 where not
    stitched); ``consumed[o]``: open episode ``o`` is continued; ``abandoned[o]``: its stream
    restarted without continuing it.
    """

    __slots__ = ("abandoned", "consumed", "oidx", "stitched")

    def __init__(self, stitched, oidx, consumed, abandoned) -> None:
        self.stitched = stitched
        self.oidx = oidx
        self.consumed = consumed
        self.abandoned = abandoned
