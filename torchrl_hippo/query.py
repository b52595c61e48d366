"""Read-only retrieval from the episodic memory: the ``k`` stored transitions nearest a query.

:func:`memory_query` answers "what does the memory hold that resembles this?" without touching
what sampling changes: it counts no access, refreshes no key and leaves the sampler's state
alone. Queries are embeddings, a TensorDict carrying ``("hippo", "key")``, or a TensorDict of
windows that the memory's encoder embeds with its **online** network (stored keys come from the
target network, see :class:`~torchrl_hippo.DualEncoder`). The search is
:func:`torchrl_hippo.search.topk_similarity` (the fused Triton kernel on CUDA).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn

from torchrl_hippo.data.storage import HIPPO_KEYS, HippoStorage
from torchrl_hippo.search import topk_similarity

__all__ = ["QUERY_KEYS", "memory_query"]

#: The entries :func:`memory_query` adds next to the retrieved rows' own.
QUERY_KEYS = {
    "index": "index",
    "similarity": ("hippo", "similarity"),
    "attention": ("hippo", "attention"),
}


def _as_storage(memory: Any, name: str = "memory") -> HippoStorage:
    """The :class:`~torchrl_hippo.HippoStorage` of a replay buffer (or the storage itself)."""
    storage = getattr(memory, "storage", memory) if not isinstance(memory, HippoStorage) else memory
    if not isinstance(storage, HippoStorage):
        raise TypeError(
            f"{name} must be a replay buffer built on a HippoStorage, or a HippoStorage, got "
            f"{type(memory).__name__}."
        )
    return storage


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Puts every submodule of ``module`` in eval mode, then restores each one's own mode.

    A query must not change the encoder: in train mode, dropout would make it random and batch
    normalisation would update its running statistics.
    """
    modes = [(m, m.training) for m in module.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _query_embeddings(
    storage: HippoStorage,
    query: Tensor | TensorDictBase,
    *,
    encoder: nn.Module | None = None,
) -> tuple[Tensor, torch.Size]:
    """Checks ``query`` and returns its L2-normalised fp32 embeddings ``[Q, D]`` and batch shape.

    Embeddings must be ``[..., D]`` (``D`` the stored keys' size), floating point, finite and
    non-zero. A TensorDict carrying ``("hippo", "key")`` gives its keys (batch shape: the
    TensorDict's); any other TensorDict holds windows, embedded by the **online** network of
    ``encoder`` (default: the encoder the memory's writer attached) in eval mode, without
    gradient.
    """
    dim = storage.embed_dim
    if isinstance(query, TensorDictBase):
        key = query.get(HIPPO_KEYS["key"], None)
        if key is not None:
            if not isinstance(key, Tensor) or key.shape[: query.batch_dims] != query.batch_size:
                raise ValueError(
                    f"query's {HIPPO_KEYS['key']} entry must be a [*batch_size, embed_dim] tensor "
                    f"for batch size {list(query.batch_size)}."
                )
            embeddings, name = key, f"query[{HIPPO_KEYS['key']!r}]"
        else:
            encoder = storage.encoder if encoder is None else encoder
            if encoder is None:
                raise ValueError(
                    "query is a TensorDict of windows but no encoder was given and none is "
                    "attached to the memory (a HippoWriter attaches its encoder): pass "
                    "encoder=... or embeddings."
                )
            if encoder.embed_dim != dim:
                raise ValueError(
                    f"encoder.embed_dim={encoder.embed_dim} does not match the memory's keys of "
                    f"size {dim}."
                )
            param = next(encoder.parameters(), None)
            windows = query.copy()  # the key is written into this shallow copy only
            if param is not None:
                windows = windows.to(param.device)
            with torch.no_grad(), _eval_mode(encoder):
                out = encoder(windows, target=False)
            embeddings, name = out.get(encoder.out_keys[0]), "encoded query windows"
        batch_shape = query.batch_size
        if embeddings.shape != (*batch_shape, dim):
            raise ValueError(
                f"{name}: expected shape [*batch_size, embed_dim={dim}] = "
                f"{[*batch_shape, dim]}, got {list(embeddings.shape)}."
            )
    elif isinstance(query, Tensor):
        embeddings, name = query, "query"
        if embeddings.ndim < 1 or embeddings.shape[-1] != dim:
            raise ValueError(
                f"query embeddings must have shape [..., embed_dim={dim}] (the memory's key "
                f"size), got {list(embeddings.shape)}."
            )
        batch_shape = embeddings.shape[:-1]
    else:
        raise TypeError(
            f"query must be a Tensor of embeddings or a TensorDict, got {type(query).__name__}."
        )
    if not embeddings.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {embeddings.dtype}.")
    flat = embeddings.detach().reshape(-1, dim).to(device=storage.table_device, dtype=torch.float32)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{name} contain NaN or inf values.")
    norms = flat.norm(dim=-1)
    if bool((norms == 0).any()):
        raise ValueError(f"{name} contain an all-zero embedding, which resembles nothing.")
    return flat / norms.unsqueeze(-1), batch_shape


def _search_memory(
    storage: HippoStorage,
    queries: Tensor,
    k: int,
    *,
    encode_pending: bool = True,
    backend: str = "auto",
    allow_fewer: bool = False,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` stored rows for unit queries ``[Q, D]``: ``(similarity [Q, k'], rows [Q, k'])``.

    Only valid rows are searched: evicted rows never, rows waiting for a deferred key either
    after :meth:`HippoStorage.encode_pending` (``encode_pending=True``) or not at all. ``k'`` is
    ``k``, or with ``allow_fewer=True`` ``min(k, valid rows)`` (possibly 0); otherwise fewer
    valid rows than ``k`` raise ``ValueError`` and an empty memory ``RuntimeError``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}.")
    if not storage.initialized or len(storage) == 0:
        if allow_fewer:
            empty = queries.new_empty(queries.shape[0], 0)
            return empty, empty.long()
        raise RuntimeError("memory_query: the memory is empty; extend the replay buffer first.")
    if storage.has_pending_keys and encode_pending:
        # Fills keys that were never computed (key_version -1); counts and versions of the
        # other rows, access counts and key_revision are untouched.
        storage.encode_pending()
    valid = storage.valid_mask() if storage.num_free_rows else None
    if storage.has_pending_keys:  # encode_pending=False: unkeyed rows hold no key yet
        pending = storage._storage.get(HIPPO_KEYS["key_version"])[: len(storage)] < 0
        valid = ~pending if valid is None else valid & ~pending
    n_valid = len(storage) if valid is None else int(valid.sum())
    if n_valid < k:
        if allow_fewer:
            k = n_valid
            if k == 0:
                empty = queries.new_empty(queries.shape[0], 0)
                return empty, empty.long()
        elif n_valid == 0:
            raise RuntimeError(
                "memory_query: the memory holds no searchable row (every row waits for a "
                "deferred key; pass encode_pending=True)."
            )
        else:
            raise ValueError(
                f"k={k} is larger than the number of searchable rows in the memory ({n_valid})."
            )
    return topk_similarity(queries, storage.keys, k, valid=valid, backend=backend)


@torch.no_grad()
def memory_query(
    memory: Any,
    query: Tensor | TensorDictBase,
    k: int,
    *,
    temperature: float = 0.07,
    rows: bool = True,
    encoder: nn.Module | None = None,
    encode_pending: bool = True,
    backend: str = "auto",
) -> TensorDict:
    """Retrieves the ``k`` stored transitions most similar to each query, read-only.

    The similarity is the cosine between the L2-normalised query and the stored keys,
    ``torch.topk(normalize(queries) @ keys[valid].T, k)`` exactly (fp32 products, ties in any
    order), computed by :func:`torchrl_hippo.search.topk_similarity` over the rows that hold a
    transition (evicted rows are never returned).

    Nothing that sampling changes is changed: no access is counted, no stale key is refreshed,
    the sampler's pool and RNG are untouched. The one write is lazy completion: rows written
    by ``HippoWriter(defer_keys=True)`` have no key yet, and ``encode_pending=True`` computes
    them with :meth:`HippoStorage.encode_pending() <torchrl_hippo.HippoStorage.encode_pending>`
    (target encoder, exactly what the sampler does before its first retrieval). With
    ``encode_pending=False`` those rows are skipped.

    Args:
        memory: a replay buffer built on a :class:`~torchrl_hippo.HippoStorage`, or the storage.
        query: the queries, one of

            - embeddings ``[..., embed_dim]`` (floating point, finite, non-zero; normalised here);
            - a TensorDict carrying ``("hippo", "key")`` (e.g. a sampled batch, or rows
              returned by this function), batch size ``[...]``;
            - a TensorDict of windows, as :class:`~torchrl_hippo.DualEncoder` reads them
              (observation, action, reward and optional mask entries with the window as their
              first feature dim), batch size ``[...]``, embedded by the encoder's **online**
              network in eval mode.

        k (int): neighbours per query, ``1 <= k <=`` the number of valid rows.

    Keyword Args:
        temperature (float, optional): temperature of the attention
            ``softmax(similarity / temperature)`` over each query's ``k`` neighbours, ``> 0``.
            Defaults to ``0.07``.
        rows (bool, optional): include every stored entry of the retrieved rows (observations,
            actions, ...). With ``False`` only the ``"hippo"`` entries come back. Defaults to
            ``True``.
        encoder (DualEncoder, optional): the encoder of query windows. Defaults to ``None`` (the
            encoder of the memory's writer).
        encode_pending (bool, optional): compute deferred keys first (see above).
            Defaults to ``True``.
        backend (str, optional): backend of :func:`~torchrl_hippo.search.topk_similarity`.
            Defaults to ``"auto"``.

    Returns:
        A TensorDict of batch size ``[..., k]`` (neighbours sorted by decreasing similarity) on
        the storage's device, holding

        - ``"index"``: the storage rows;
        - ``("hippo", "similarity")``: the cosine similarity to the query;
        - ``("hippo", "attention")``: ``softmax(similarity / temperature)`` over the ``k``
          neighbours;
        - the rows' ``"hippo"`` entries (``key``, ``episode``, ``step``, ``return``: the
          episode's current return, ``key_version``, ``prev``) and, with ``rows=True``, all
          their other stored entries.

    Raises:
        RuntimeError: the memory is empty.
        ValueError: ``k`` is not a positive int or exceeds the valid rows; the embeddings have
            the wrong size, hold NaN/inf or an all-zero vector; ``temperature <= 0``; the
            encoder's ``embed_dim`` differs from the memory's.
        TypeError: ``memory`` is not a hippo memory; the query is neither a Tensor nor a
            TensorDict, or is not floating point.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
        >>> from torchrl_hippo.query import memory_query
        >>> encoder = DualEncoder(observation_dim=3, action_dim=2, embed_dim=16, window=4)
        >>> rb = TensorDictReplayBuffer(
        ...     storage=HippoStorage(100), writer=HippoWriter(encoder), sampler=HippoSampler()
        ... )
        >>> done = torch.zeros(40, 1, dtype=torch.bool)
        >>> done[9::10] = True
        >>> _ = rb.extend(TensorDict(
        ...     {
        ...         "observation": torch.randn(40, 3),
        ...         "action": torch.randn(40, 2),
        ...         "next": {"reward": torch.rand(40, 1), "done": done},
        ...     },
        ...     batch_size=[40],
        ... ))
        >>> out = memory_query(rb, rb.storage.keys[:2], k=3)  # two stored keys as queries
        >>> out.batch_size, out["index"][:, 0].tolist()  # each finds itself first
        (torch.Size([2, 3]), [0, 1])
        >>> out["observation"].shape, out["hippo", "episode"].shape
        (torch.Size([2, 3, 3]), torch.Size([2, 3]))
        >>> bool(torch.allclose(out["hippo", "attention"].sum(-1), torch.ones(2)))
        True
        >>> windows = rb.storage.gather_windows(torch.tensor([5, 25]), encoder.window)
        >>> memory_query(rb, windows, k=4, rows=False)["hippo", "similarity"].shape
        torch.Size([2, 4])
        >>> int(rb.storage.episodes["access"].sum())  # nothing was counted
        0
    """
    storage = _as_storage(memory)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float > 0, got {type(temperature).__name__}.")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}.")
    if not storage.initialized or len(storage) == 0:
        raise RuntimeError("memory_query: the memory is empty; extend the replay buffer first.")
    queries, batch_shape = _query_embeddings(storage, query, encoder=encoder)
    scores, index = _search_memory(
        storage, queries, k, encode_pending=encode_pending, backend=backend
    )
    flat = index.reshape(-1)
    if rows:
        out = storage.get(flat)
    else:
        out = storage._storage.select(*HIPPO_KEYS.values())[flat]
        slots = storage.row_slot.index_select(0, flat)
        out.set(HIPPO_KEYS["return"], storage.episodes.get("return")[slots])
    out.set(QUERY_KEYS["index"], flat)
    out.set(QUERY_KEYS["similarity"], scores.reshape(-1))
    attention = torch.softmax(scores / temperature, dim=-1)
    out.set(QUERY_KEYS["attention"], attention.reshape(-1))
    return out.reshape(*batch_shape, k)
