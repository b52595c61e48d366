"""HippoSampler: hybrid semantic (top-k retrieval) and uniform sampling of the episodic memory."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data.replay_buffers.samplers import Sampler

from torchrl_hippo.data.storage import HIPPO_KEYS, HippoStorage
from torchrl_hippo.search import FaissKeyIndex, _require_faiss, topk_similarity

__all__ = ["HippoSampler"]

_EMPTY = "Cannot sample from an empty memory: extend the replay buffer first."


class _Pool:
    """The retrieval pool: for each query, its top-k rows and their sampling probabilities.

    ``dense`` holds, for every storage row, the probability that one semantic draw returns it
    (zero outside the pool), so that importance weights cost one gather per sampled item.
    """

    __slots__ = (
        "covered",
        "dense",
        "flat_index",
        "flat_score",
        "index",
        "key",
        "min_prob",
        "prob",
        "queries",
        "score",
    )

    def __init__(self, queries, score, index, temperature, key, capacity) -> None:
        self.queries = queries
        self.key = key
        self.index = index
        self.dense = torch.zeros(capacity, dtype=torch.float64, device=index.device)
        self.set(score, index, temperature)

    def set(self, score: torch.Tensor, index: torch.Tensor, temperature: float) -> None:
        self.dense[self.index.reshape(-1)] = 0.0
        self.score = score
        self.index = index
        q = score.shape[0]
        self.prob = (torch.softmax(score.double() / temperature, dim=-1) / q).reshape(-1)
        self.flat_index = index.reshape(-1)
        self.flat_score = score.reshape(-1)
        self.dense.index_add_(0, self.flat_index, self.prob)
        rows = self.flat_index.unique()
        self.covered = rows.numel()
        self.min_prob = float(self.dense[rows].min())

    def semantic_min(self, valid_rows: int) -> float:
        """The smallest semantic probability over valid rows (zero unless the pool covers all)."""
        return self.min_prob if self.covered >= valid_rows else 0.0


class HippoSampler(Sampler):
    """Hybrid sampler: a ``mixture_ratio`` share of each batch by semantic retrieval, the rest uniform.

    Each batch of ``B`` draws ``round(B * mixture_ratio)`` items semantically and the rest
    uniformly (or by priority, once :meth:`update_priority` has been called). Semantic draws
    search the stored keys with :func:`torchrl_hippo.search.topk_similarity` for the
    ``top_k`` neighbours of each query, pick a query uniformly, then one of its neighbours
    with probability ``softmax(similarity / temperature)``.

    Queries come from :meth:`set_query` (raw embeddings, a TensorDict carrying
    ``("hippo", "key")``, or a TensorDict of windows encoded by the writer's online encoder).
    Without one, the sampler draws ``num_anchors`` default anchors: stored transitions of
    episodes chosen with probability ``softmax(z(return) / anchor_temperature)``, ``z`` being
    the return's z-score among stored episodes, which favours rare high-return episodes.

    The retrieval pool is cached. It is rebuilt when the queries change, when keys change in
    place (consolidation, eviction, loading), and once more than ``refresh_fraction`` of the
    memory has been written since the last build; between rebuilds, newly written rows are
    merged in incrementally (rows overwritten since the build drop out of the pool).

    The sampled batch carries, besides ``"index"``:

    - ``"priority_weight"``: the importance weight ``(p_uniform(i) / p(i)) ** beta`` of the
      mixture ``p = (1 - m) p_base + m p_semantic``, divided by its largest possible value,
      which TorchRL's losses read to correct the non-uniform sampling;
    - ``("hippo", "semantic")``: ``True`` for items drawn by retrieval;
    - ``("hippo", "similarity")``: the item's similarity to the query it was retrieved for;
      for uniform items ``nan``, or the similarity to the closest query with
      ``score_uniform=True``.

    Args:
        mixture_ratio (float, optional): share of semantic draws, in ``[0, 1]``.
            Defaults to ``0.5``.
        top_k (int, optional): neighbours retrieved per query. Defaults to ``5``.
        temperature (float, optional): softmax temperature over neighbour similarities,
            ``> 0``. Defaults to ``0.07``.

    Keyword Args:
        num_anchors (int, optional): default anchors drawn when no query is set.
            Defaults to ``16``.
        anchor_temperature (float, optional): temperature of the anchors' return z-scores.
            Defaults to ``0.5``.
        beta (float, optional): exponent of the importance weights, in ``[0, 1]``.
            Defaults to ``0.4``.
        priority_alpha (float, optional): exponent applied to priorities. Defaults to ``0.6``.
        priority_eps (float, optional): added to priorities. Defaults to ``1e-6``.
        refresh_fraction (float, optional): share of the memory written after which the pool is
            rebuilt from scratch. Defaults to ``0.05``.
        search_backend (str, optional): backend of the top-k search. Defaults to ``"auto"``.
        approx (bool, optional): approximate retrieval through a
            :class:`~torchrl_hippo.search.FaissKeyIndex` (FAISS IVF, needs faiss) that mirrors
            the stored keys. It is updated incrementally with the rows written since the last
            draw, and re-synced in full only when keys change in place (consolidation,
            eviction, loading). Defaults to ``False`` (exact search).
        track_access (bool, optional): count each sampled row's episode access in the episode
            table (used by importance forgetting). Defaults to ``True``.
        score_uniform (bool, optional): also score uniform items against the queries (their
            ``("hippo", "similarity")``; one more key gather per batch). Defaults to ``False``
            (``nan`` for uniform items).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> encoder = DualEncoder(observation_dim=3, action_dim=2, embed_dim=16, window=4)
        >>> rb = TensorDictReplayBuffer(
        ...     storage=HippoStorage(1000),
        ...     writer=HippoWriter(encoder),
        ...     sampler=HippoSampler(mixture_ratio=0.25, top_k=4),
        ...     batch_size=8,
        ... )
        >>> done = torch.zeros(200, 1, dtype=torch.bool)
        >>> done[19::20] = True
        >>> _ = rb.extend(TensorDict(
        ...     {
        ...         "observation": torch.randn(200, 3),
        ...         "action": torch.randn(200, 2),
        ...         "next": {"reward": torch.rand(200, 1), "done": done},
        ...     },
        ...     batch_size=[200],
        ... ))
        >>> batch = rb.sample()
        >>> batch["hippo", "semantic"].sum().item()  # round(8 * 0.25) items by retrieval
        2
        >>> bool((batch["priority_weight"] <= 1).all())
        True
        >>> rb.sampler.set_query(torch.randn(3, 16))  # any [Q, embed_dim] embeddings
        >>> rb.sample()["index"].shape
        torch.Size([8])
    """

    def __init__(
        self,
        mixture_ratio: float = 0.5,
        top_k: int = 5,
        temperature: float = 0.07,
        *,
        num_anchors: int = 16,
        anchor_temperature: float = 0.5,
        beta: float = 0.4,
        priority_alpha: float = 0.6,
        priority_eps: float = 1e-6,
        refresh_fraction: float = 0.05,
        search_backend: str = "auto",
        track_access: bool = True,
        score_uniform: bool = False,
        approx: bool = False,
    ) -> None:
        self.mixture_ratio = mixture_ratio
        self.top_k = top_k
        self.temperature = temperature
        if isinstance(num_anchors, bool) or not isinstance(num_anchors, int) or num_anchors < 1:
            raise ValueError(f"num_anchors must be a positive integer, got {num_anchors!r}.")
        if not anchor_temperature > 0:
            raise ValueError(f"anchor_temperature must be > 0, got {anchor_temperature}.")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}.")
        priority_alpha = _real(priority_alpha, "priority_alpha")
        if not 0 <= priority_alpha < math.inf:
            raise ValueError(f"priority_alpha must be finite and >= 0, got {priority_alpha}.")
        if not priority_eps >= 0:
            raise ValueError(f"priority_eps must be >= 0, got {priority_eps}.")
        if not 0.0 <= refresh_fraction <= 1.0:
            raise ValueError(f"refresh_fraction must be in [0, 1], got {refresh_fraction}.")
        self.num_anchors = num_anchors
        self.anchor_temperature = float(anchor_temperature)
        self.beta = float(beta)
        self.priority_alpha = float(priority_alpha)
        self.priority_eps = float(priority_eps)
        self.refresh_fraction = float(refresh_fraction)
        self.search_backend = search_backend
        self.track_access = bool(track_access)
        self.score_uniform = bool(score_uniform)
        self.approx = bool(approx)
        if self.approx:
            _require_faiss("HippoSampler(approx=True)")  # a clear error now, not at sampling
        self._query: torch.Tensor | TensorDictBase | None = None
        self._query_version = 0
        self._reset_state()

    def _reset_state(self) -> None:
        self._pool: _Pool | None = None
        self._index: FaissKeyIndex | None = None
        self._index_revision: int | None = None
        self._dirty: list[torch.Tensor] = []
        self._dirty_cache: torch.Tensor | None = None
        self._dirty_count = 0
        self._seen_revision: int | None = None
        self._priority: torch.Tensor | None = None
        self._max_priority = 1.0
        self._cdf: torch.Tensor | None = None
        self._base_min = 0.0
        self._batches = 0
        self._ran_out = False

    # ------------------------------------------------------------------ hyper-parameters
    @property
    def mixture_ratio(self) -> float:
        """Share of each batch drawn by semantic retrieval, in ``[0, 1]``."""
        return self._mixture_ratio

    @mixture_ratio.setter
    def mixture_ratio(self, value: float) -> None:
        value = _real(value, "mixture_ratio")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"mixture_ratio must be in [0, 1], got {value}.")
        self._mixture_ratio = value

    @property
    def top_k(self) -> int:
        """Neighbours retrieved per query."""
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"top_k must be a positive integer, got {value!r}.")
        self._top_k = value
        self._pool = None

    @property
    def temperature(self) -> float:
        """Softmax temperature over neighbour similarities (``> 0``)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = _real(value, "temperature")
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"temperature must be a finite number > 0, got {value}.")
        self._temperature = value
        self._pool = None

    # ------------------------------------------------------------------ queries
    def set_query(self, query: torch.Tensor | TensorDictBase | None) -> None:
        """Sets the retrieval queries; ``None`` goes back to the default anchors.

        Args:
            query: raw embeddings ``[Q, embed_dim]`` (or ``[embed_dim]``), L2-normalised here;
                a TensorDict carrying ``("hippo", "key")`` (e.g. a sampled batch); or a
                TensorDict of windows (observation, action, reward and mask entries with the
                window as first feature dimension, see :class:`~torchrl_hippo.DualEncoder`),
                encoded by the writer's **online** encoder when the pool is next built.
        """
        if query is not None and not isinstance(query, (torch.Tensor, TensorDictBase)):
            raise TypeError(
                f"query must be a Tensor, a TensorDict or None, got {type(query).__name__}."
            )
        if isinstance(query, torch.Tensor):
            if not query.is_floating_point():
                raise TypeError(f"query embeddings must be floating point, got {query.dtype}.")
            if query.ndim == 1:
                query = query.unsqueeze(0)
            if query.ndim != 2 or query.shape[0] == 0:
                raise ValueError(
                    f"query embeddings must have shape [Q, embed_dim], got {list(query.shape)}."
                )
            if not torch.isfinite(query).all():
                raise ValueError("query embeddings contain NaN or inf values.")
        elif isinstance(query, TensorDictBase) and query.batch_size.numel() == 0:
            raise ValueError("query TensorDict is empty.")
        self._query = query
        self._query_version += 1
        self._pool = None

    def _resolve_queries(self, storage: HippoStorage) -> torch.Tensor:
        dim = storage.embed_dim
        dev = storage.table_device
        query = self._query
        if query is None:
            return self._default_anchors(storage)
        if isinstance(query, TensorDictBase):
            if HIPPO_KEYS["key"] in query.keys(True, True):
                query = query.get(HIPPO_KEYS["key"]).reshape(
                    -1, query.get(HIPPO_KEYS["key"]).shape[-1]
                )
            else:
                encoder = storage.encoder
                if encoder is None:
                    raise ValueError(
                        "set_query got a TensorDict of windows but no encoder is attached to the "
                        "storage (a HippoWriter attaches its encoder): pass embeddings instead."
                    )
                with torch.no_grad():
                    out = encoder(query.copy())
                query = out.get(encoder.out_keys[0])
                query = query.reshape(-1, query.shape[-1])
        if query.shape[-1] != dim:
            raise ValueError(
                f"query embeddings have size {query.shape[-1]}, the memory's keys have size {dim}."
            )
        query = query.to(device=dev, dtype=torch.float32)
        return torch.nn.functional.normalize(query, dim=-1)

    def _default_anchors(self, storage: HippoStorage) -> torch.Tensor:
        table = storage.episodes
        alive = table["rows"] > 0
        ret = table["return"].double()
        mean = ret[alive].mean()
        std = ret[alive].std(unbiased=False) if int(alive.sum()) > 1 else ret.new_zeros(())
        z = torch.where(std > 0, (ret - mean) / std.clamp_min(1e-12), torch.zeros_like(ret))
        logits = torch.where(alive, z / self.anchor_temperature, -torch.inf)
        episode_w = torch.softmax(logits, 0)
        n = min(self.num_anchors, storage.num_valid)
        # Episodes first (far fewer than rows), then one uniform row within each.
        slots = torch.multinomial(episode_w.float(), n, replacement=True, generator=self._rng)
        row_slot = storage.row_slot[: len(storage)]
        rows = []
        for slot in slots.tolist():
            members = (row_slot == slot).nonzero().squeeze(1)
            pick = torch.randint(members.numel(), (1,), generator=self._rng, device=members.device)
            rows.append(members[pick])
        return storage.keys[torch.cat(rows)].float()

    # ------------------------------------------------------------------ pool
    def _pool_for(self, storage: HippoStorage, n_valid: int) -> _Pool:
        if self.top_k > n_valid:
            raise ValueError(
                f"top_k={self.top_k} is larger than the memory: it holds {n_valid} transition(s)."
            )
        key = (self._query_version, storage.key_revision)
        pool = self._pool
        stale = (
            pool is None
            or pool.key != key
            or self._seen_revision != storage._mutation_revision
            or self._dirty_count > self.refresh_fraction * n_valid
        )
        if not stale and self._dirty:
            self._sync_index(storage)
            stale = not self._merge_dirty(storage, pool)
        if stale:
            pool = self._build_pool(storage, key)
            # Counts rows written since the last *build*: merges do not reset it.
            self._dirty_count = 0
        self._dirty.clear()
        self._dirty_cache = None
        self._seen_revision = storage._mutation_revision
        return pool

    def _sync_index(self, storage: HippoStorage) -> FaissKeyIndex | None:
        """Brings the approximate index up to date with the stored keys (``approx=True``)."""
        if not self.approx:
            return None
        index = self._index
        if (
            index is None
            or self._index_revision != storage.key_revision
            or index.capacity != storage.max_size
        ):
            # Keys changed in place: mirror every stored row again.
            index = FaissKeyIndex(storage.embed_dim, storage.max_size)
            rows = storage.valid_mask().nonzero().squeeze(1)
            index.update(rows, storage.keys[rows])
            self._index, self._index_revision = index, storage.key_revision
        elif self._dirty:
            rows = self._dirty_rows(storage)
            index.update(rows, storage.keys[rows])
        return index

    def _build_pool(self, storage: HippoStorage, key: tuple[int, int]) -> _Pool:
        queries = self._resolve_queries(storage)
        index = self._sync_index(storage)
        if index is None:
            keys = storage.keys
            valid = storage.valid_mask() if storage.num_free_rows else None
        else:  # the index mirrors every row of the storage, written or not
            keys = storage._storage.get(HIPPO_KEYS["key"])
            valid = storage.row_slot >= 0
        score, index = topk_similarity(
            queries,
            keys,
            self.top_k,
            valid=valid,
            backend=self.search_backend,
            index=index,
            approx=index is not None,
        )
        self._pool = _Pool(queries, score, index, self.temperature, key, storage.max_size)
        return self._pool

    def _dirty_rows(self, storage: HippoStorage) -> torch.Tensor:
        """The stored rows written since the last draw (once per draw, however often asked)."""
        if self._dirty_cache is None:
            rows = torch.cat(self._dirty).unique()
            rows = rows[rows >= 0]
            self._dirty_cache = rows[storage.row_slot[rows] >= 0]
        return self._dirty_cache

    def _merge_dirty(self, storage: HippoStorage, pool: _Pool) -> bool:
        rows = self._dirty_rows(storage)
        overwritten = torch.isin(pool.index, rows)
        score = pool.score.masked_fill(overwritten, -torch.inf)
        new_score = pool.queries @ storage.keys[rows].float().T
        cand_score = torch.cat([score, new_score], 1)
        cand_index = torch.cat([pool.index, rows.expand(pool.index.shape[0], -1)], 1)
        top, pos = cand_score.topk(self.top_k, dim=1)
        if not torch.isfinite(top).all():
            return False
        pool.set(top, cand_index.gather(1, pos), self.temperature)
        return True

    # ------------------------------------------------------------------ sampling
    def sample(self, storage: HippoStorage, batch_size: int) -> tuple[torch.Tensor, dict]:
        if not isinstance(storage, HippoStorage):
            raise TypeError(f"HippoSampler samples a HippoStorage, got {type(storage).__name__}.")
        if storage.is_shared:  # no writer in another process changes the memory meanwhile
            with storage.lock:
                return self._sample(storage, batch_size)
        return self._sample(storage, batch_size)

    def _sample(self, storage: HippoStorage, batch_size: int) -> tuple[torch.Tensor, dict]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        n_rows = len(storage) if storage.initialized else 0
        n_valid = n_rows - storage.num_free_rows if n_rows else 0
        if n_valid == 0:
            raise RuntimeError(_EMPTY)
        dev = storage.table_device
        n_sem = round(batch_size * self.mixture_ratio)
        n_uni = batch_size - n_sem
        if storage.has_pending_keys and (n_sem or self.score_uniform):
            storage.encode_pending()
        pool = self._pool_for(storage, n_valid) if n_sem else None

        uni_rows = self._sample_base(storage, n_uni, n_rows)
        if pool is None:
            index = uni_rows
            similarity = torch.full((batch_size,), torch.nan, device=dev)
            semantic = torch.zeros(batch_size, dtype=torch.bool, device=dev)
        else:
            pos = torch.multinomial(pool.prob, n_sem, replacement=True, generator=self._rng)
            index = torch.cat([pool.flat_index[pos], uni_rows])
            if n_uni and self.score_uniform:
                uni_keys = storage._storage.get(HIPPO_KEYS["key"]).index_select(0, uni_rows)
                uni_sim = (uni_keys.float() @ pool.queries.T).amax(1)
            else:
                uni_sim = torch.full((n_uni,), torch.nan, device=dev)
            similarity = torch.cat([pool.flat_score[pos], uni_sim])
            if n_uni:
                # Shuffled, so that any slice of a batch keeps the mixture. Item p of the batch
                # is item perm[p] of the unshuffled one, which is semantic iff perm[p] < n_sem.
                perm = torch.randperm(batch_size, generator=self._rng, device=dev)
                index, similarity = index[perm], similarity[perm]
                semantic = perm < n_sem
            else:
                semantic = torch.ones(batch_size, dtype=torch.bool, device=dev)
        weight = self._importance_weight(storage, index, pool, n_sem / batch_size, n_valid)
        if self.track_access:
            storage.mark_access(index)
        self._batches += 1
        if self._batches >= math.ceil(n_valid / batch_size):
            self._ran_out = True
            self._batches = 0
        info = {
            "priority_weight": weight,
            ("hippo", "semantic"): semantic,
            ("hippo", "similarity"): similarity,
        }
        return index, info

    def _base_probs(self, storage: HippoStorage) -> torch.Tensor | None:
        """Cumulative priorities of the non-semantic draws, or ``None`` without priorities.

        Built once per priority update (``O(N)``), together with the smallest positive base
        probability (``self._base_min``) that the importance weights are normalised by.
        """
        if self._priority is None:
            return None
        if self._cdf is None:
            n = len(storage)
            p = (self._priority[:n] + self.priority_eps).pow(self.priority_alpha)
            p = torch.where(storage.valid_mask(), p, torch.zeros_like(p)).double()
            self._cdf = torch.cumsum(p, 0)
            positive = p[p > 0]
            total = self._cdf[-1]
            self._base_min = float(positive.min() / total) if positive.numel() else 0.0
        return self._cdf

    def _sample_base(self, storage: HippoStorage, n: int, n_rows: int) -> torch.Tensor:
        dev = storage.table_device
        if n == 0:
            return torch.empty(0, dtype=torch.int64, device=dev)
        cdf = self._base_probs(storage)
        if cdf is not None:
            u = torch.rand(n, generator=self._rng, device=dev, dtype=torch.float64) * cdf[-1]
            return torch.searchsorted(cdf, u, right=True).clamp_max(cdf.numel() - 1)
        rows = torch.randint(n_rows, (n,), generator=self._rng, device=dev)
        if storage.num_free_rows:
            # Rejection sampling over the free (evicted) rows, which are a small share.
            bad = storage.row_slot[rows] < 0
            while bool(bad.any()):
                rows[bad] = torch.randint(
                    n_rows, (int(bad.sum()),), generator=self._rng, device=dev
                )
                bad = storage.row_slot[rows] < 0
        return rows

    def _importance_weight(
        self,
        storage: HippoStorage,
        index: torch.Tensor,
        pool: _Pool | None,
        m: float,
        n_valid: int,
    ) -> torch.Tensor:
        """``(p_uniform / p) ** beta`` divided by its largest value over valid rows."""
        uniform = 1.0 / n_valid
        cdf = self._base_probs(storage)
        if cdf is None:
            if pool is None or m == 0.0:
                return torch.ones(index.shape, device=index.device)
            # p / p_uniform = m * n_valid * p_semantic + (1 - m): one gather, three in-place ops.
            prob_min = (1 - m) * uniform + m * pool.semantic_min(n_valid)
            weight = pool.dense.index_select(0, index).mul_(m * n_valid).add_(1 - m)
            weight.pow_(-self.beta)
            if prob_min > 0:
                return weight.mul_((prob_min / uniform) ** self.beta).float()
            return weight.div_(weight.max()).float()
        # Sampled rows are valid, so their base probability is their own normalised priority.
        priority = (self._priority[index] + self.priority_eps).pow(self.priority_alpha).double()
        base = priority / cdf[-1]
        base_min = self._base_min or uniform
        if pool is None or m == 0.0:
            prob, prob_min = base, base_min
        else:
            prob = pool.dense[index] * m + (1 - m) * base
            prob_min = (1 - m) * base_min + m * pool.semantic_min(n_valid)
        weight = (uniform / prob).pow(self.beta)
        if prob_min > 0:
            weight = weight * (prob_min / uniform) ** self.beta
        else:
            weight = weight / weight.max()
        return weight.float()

    @property
    def ran_out(self) -> bool:
        """``True`` once a pass of ``ceil(len / batch_size)`` batches has been drawn."""
        return self._ran_out

    @ran_out.setter
    def ran_out(self, value: bool) -> None:
        self._ran_out = bool(value)
        if not value:
            self._batches = 0

    # ------------------------------------------------------------------ updates
    def extend(self, index: torch.Tensor) -> None:
        if self._priority is None:
            return
        index = torch.as_tensor(index).reshape(-1)
        index = index[index >= 0].to(self._priority.device)
        self._priority[index] = self._max_priority
        self._cdf = None

    def add(self, index: int | torch.Tensor) -> None:
        self.extend(torch.as_tensor(index))

    def mark_update(
        self, index: int | torch.Tensor, *, storage: HippoStorage | None = None
    ) -> None:
        """Records rows written since the pool was built (merged in at the next draw).

        Pass the ``storage`` the rows were written to (the :class:`~torchrl_hippo.HippoWriter`
        does): the write is then known to be accounted for, and the cached pool is merged
        rather than rebuilt. Negative indices (rows not written) are ignored.
        """
        if not (isinstance(index, torch.Tensor) and index.ndim == 1):
            index = torch.as_tensor(index).reshape(-1)
        self._dirty.append(index)
        self._dirty_cache = None
        self._dirty_count += index.numel()
        if storage is not None:
            self._seen_revision = storage._mutation_revision
        self._cdf = None

    def update_priority(
        self,
        index: int | torch.Tensor,
        priority: float | torch.Tensor,
        *,
        storage: HippoStorage | None = None,
    ) -> None:
        """Sets the priority of rows; from then on the non-semantic draws follow priorities.

        Rows are drawn with probability ``(priority + eps) ** alpha`` (normalised), new rows
        entering with the largest priority seen. Pure torch: no C++ segment tree.
        """
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        priority = torch.as_tensor(priority, dtype=torch.float64).reshape(-1)
        if priority.numel() == 1:
            priority = priority.expand(index.numel())
        if priority.numel() != index.numel():
            raise ValueError(f"priority has {priority.numel()} values for {index.numel()} indices.")
        if not torch.isfinite(priority).all() or bool((priority < 0).any()):
            raise ValueError("priority must be finite and >= 0.")
        if self._priority is None:
            if storage is None:
                raise ValueError("the first update_priority call needs the storage (storage=...).")
            self._priority = torch.ones(
                storage.max_size, dtype=torch.float64, device=storage.table_device
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self._priority.numel()):
            raise ValueError(
                f"index out of range: expected rows in [0, {self._priority.numel()}), got "
                f"[{int(index.min())}, {int(index.max())}]."
            )
        index = index.to(self._priority.device)
        self._priority[index] = priority.to(self._priority.device)
        if priority.numel():
            self._max_priority = max(self._max_priority, float(priority.max()))
        self._cdf = None

    # ------------------------------------------------------------------ contract
    def _empty(self) -> None:
        self._reset_state()

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild a sampler like this one (without its state).

        Examples:
            >>> from torchrl_hippo import HippoSampler
            >>> config = HippoSampler(mixture_ratio=0.3, top_k=8).config
            >>> config["mixture_ratio"], config["top_k"], config["temperature"]
            (0.3, 8, 0.07)
            >>> HippoSampler(**config).config == config
            True
        """
        return {
            "mixture_ratio": self.mixture_ratio,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "num_anchors": self.num_anchors,
            "anchor_temperature": self.anchor_temperature,
            "beta": self.beta,
            "priority_alpha": self.priority_alpha,
            "priority_eps": self.priority_eps,
            "refresh_fraction": self.refresh_fraction,
            "search_backend": self.search_backend,
            "track_access": self.track_access,
            "score_uniform": self.score_uniform,
            "approx": self.approx,
        }

    def state_dict(self, *, storage: HippoStorage | None = None) -> dict[str, Any]:
        """The sampler's state: hyper-parameters, queries, priorities and pass count.

        Keyword Args:
            storage (HippoStorage, optional): the storage this sampler draws from. When given,
                the state also holds the cached retrieval pool (queries, top-k scores and rows)
                and the rows written since the last draw, provided the pool is still current
                for that storage, so that :meth:`load_state_dict` with the storage loaded from
                the same checkpoint continues drawing exactly where this sampler is. The
                approximate (FAISS) index is never saved: it is rebuilt from the keys.
                Defaults to ``None`` (the pool is rebuilt after loading, redrawing default
                anchors).
        """
        query = self._query
        state = {
            "mixture_ratio": self.mixture_ratio,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "query": query if isinstance(query, torch.Tensor) else None,
            "query_td": query.state_dict() if isinstance(query, TensorDictBase) else None,
            "query_version": self._query_version,
            "priority": self._priority,
            "max_priority": self._max_priority,
            "batches": self._batches,
            "ran_out": self._ran_out,
        }
        if storage is not None:
            pool = self._pool
            current = (
                pool is not None
                and pool.key == (self._query_version, storage.key_revision)
                and self._seen_revision == storage._mutation_revision
            )
            state["pool"] = (
                {"queries": pool.queries, "score": pool.score, "index": pool.index}
                if current
                else None
            )
            state["dirty"] = torch.cat(self._dirty) if current and self._dirty else None
            state["dirty_count"] = self._dirty_count if current else 0
        return state

    def load_state_dict(
        self, state_dict: dict[str, Any], *, storage: HippoStorage | None = None
    ) -> None:
        """Restores a state made by :meth:`state_dict`.

        Keyword Args:
            storage (HippoStorage, optional): the storage this sampler draws from, already
                loaded from the same checkpoint as ``state_dict``. When given, and the state
                holds a retrieval pool (``state_dict(storage=...)``), the pool is restored, so
                that the next draws are exactly those the saved sampler would have made.
                Defaults to ``None`` (the pool is rebuilt at the next draw).
        """
        self.mixture_ratio = state_dict["mixture_ratio"]
        self.top_k = int(state_dict["top_k"])
        self.temperature = state_dict["temperature"]
        query = state_dict["query"]
        query_td = state_dict.get("query_td")
        if query_td is not None:
            # The device is in the state dict's metadata; an empty TensorDict would drop it.
            device = getattr(query_td, "_metadata", {}).get("", {}).get("device")
            query = TensorDict(device=device).load_state_dict(query_td, strict=False).clone()
        self._reset_state()
        self._query = query
        self._query_version = int(state_dict["query_version"])
        priority = state_dict["priority"]
        self._priority = None if priority is None else priority.clone()
        self._max_priority = float(state_dict["max_priority"])
        self._batches = int(state_dict["batches"])
        self._ran_out = bool(state_dict["ran_out"])
        pool = state_dict.get("pool")
        if storage is None or pool is None:
            return
        index, score, queries = pool["index"], pool["score"], pool["queries"]
        if (
            index.shape != score.shape
            or index.shape != (queries.shape[0], self.top_k)
            or (index.numel() and not 0 <= int(index.min()) <= int(index.max()) < len(storage))
        ):
            raise ValueError(
                f"state_dict's retrieval pool (rows {list(index.shape)}, scores "
                f"{list(score.shape)}, {queries.shape[0]} queries, top_k={self.top_k}) does not "
                f"fit this sampler and a storage of {len(storage)} rows."
            )
        dev = storage.table_device
        key = (self._query_version, storage.key_revision)
        self._pool = _Pool(
            queries.to(dev), score.to(dev), index.to(dev), self.temperature, key, storage.max_size
        )
        dirty = state_dict.get("dirty")
        self._dirty = [] if dirty is None else [dirty.to(dev)]
        self._dirty_count = int(state_dict.get("dirty_count", 0))
        self._seen_revision = storage._mutation_revision

    def dumps(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path / "hippo_sampler.pt")

    def loads(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(Path(path) / "hippo_sampler.pt", weights_only=True))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mixture_ratio={self.mixture_ratio}, top_k={self.top_k}, "
            f"temperature={self.temperature})"
        )


def _real(value: Any, name: str) -> float:
    """``value`` as a float, or a ``TypeError`` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    return float(value)
