"""Top-k similarity search over the episodic memory's keys.

:func:`topk_similarity` is the single entry point. It finds, for every query, the ``k`` keys with the
largest dot product, and dispatches to a backend picked by name. The backends live in a small
registry (name -> function), and only those usable in this installation are registered:

* ``"torch"`` (always): chunked ``torch.mm`` + top-k with a running merge. Its extra memory is
  ``O(Q * chunk + Q * k)``; it never builds the ``Q x N`` score matrix. After the first chunk it
  only looks at the groups of 32 keys whose best score beats a query's running k-th score, so the
  selection costs little next to the matrix product.
* ``"triton"`` (when Triton is installed): the fused kernel :func:`triton_kernels.topk_similarity`,
  for CUDA tensors (and CPU tensors under Triton's interpreter, ``TRITON_INTERPRET=1``).
* ``"faiss"`` (when FAISS is installed): exact brute-force inner-product search
  (``IndexFlatIP``'s search, run on the key tensor in place, without copying it into an index).
  CPU tensors with faiss-cpu; CUDA tensors need a faiss build with GPU support.
* ``"auto"``: Triton for CUDA tensors; on CPU, FAISS where it was measured to win (fp32 keys and
  one or two queries, or a thousand and more), otherwise ``"torch"``.

Approximate search is opt-in: ``approx=True`` searches a :class:`FaissKeyIndex`, an inverted-file
(IVF) index that mirrors the key tensor row for row and is updated incrementally on every write.

:func:`topk_similarity_reference` is the plain, un-chunked definition that every exact backend must
match (apart from the order of tied scores).

This module imports only torch, :mod:`triton_kernels` and, lazily, faiss: it can be loaded on its
own (for instance by ``benchmarks/bench_kernels.py``) without torchrl.
"""

from __future__ import annotations

import functools
import importlib
import operator
from collections.abc import Callable
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

import triton_kernels
from triton_kernels.topk import (
    MAX_K,
    check_topk_inputs,
    mask_scores_,
    topk_similarity_reference,
)

__all__ = [
    "FaissKeyIndex",
    "available_backends",
    "faiss_available",
    "topk_similarity",
    "topk_similarity_reference",
]

# The torch backend sizes its chunks so that one [chunk, Q] score block holds about this many
# elements (4 MiB in fp32: it stays in cache while it is reduced), and one upcast key chunk at most
# `_MAX_CHUNK_KEY_ELEMENTS`.
_TARGET_CHUNK_ELEMENTS = 2**20
_MAX_CHUNK_KEY_ELEMENTS = 2**22
_MIN_CHUNK = 1024
# Keys per group in the torch backend's selection: one max per group is compared with the running
# k-th score, and only the groups that beat it are looked at.
_GROUP = 32
# "auto" picks the faiss backend on CPU for at most `_FAISS_MAX_QUERIES` or at least
# `_FAISS_MIN_QUERIES` queries: there one faiss thread beat one torch thread on the 2-core AMD EPYC
# this was measured on (N=1M, D=128: 4x at Q=1; 1.2-1.4x from Q=1000 on, where faiss-cpu's
# OpenBLAS matrix products turned 8x faster per query than below), while torch won 1.2-5x from
# Q=4 to Q=768 (benchmarks/results/bench_kernels_cpu-2core.json).
_FAISS_MAX_QUERIES = 2
_FAISS_MIN_QUERIES = 1000

BackendFn = Callable[..., tuple[Tensor, Tensor]]
"""A backend: ``fn(queries, keys, k, *, valid, chunk_size) -> (scores, indices)``.

It receives inputs already checked by :func:`topk_similarity` (2-D floating tensors on one device,
``1 <= k <= number of valid keys``, ``valid`` a bool mask or ``None``) and returns fp32 scores and
int64 indices of shape ``[Q, k]``, sorted by descending score.
"""


def _empty_result(queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    scores = torch.empty(0, k, dtype=torch.float32, device=queries.device)
    indices = torch.empty(0, k, dtype=torch.int64, device=queries.device)
    return scores, indices


def _merge(
    best: tuple[Tensor, Tensor] | None, scores: Tensor, indices: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """The top ``k`` (sorted) of the running best and new candidates ``[Q, w]``."""
    if best is not None:
        scores = torch.cat((best[0], scores), dim=1)
        indices = torch.cat((best[1], indices), dim=1)
    top, order = torch.topk(scores, min(k, scores.shape[1]), dim=1, largest=True, sorted=True)
    return top, torch.gather(indices, 1, order)


# --------------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------------
def _default_chunk_size(num_queries: int, k: int, dim: int) -> int:
    """Keys per chunk: a ``[chunk, Q]`` block of about ``2**20`` scores (at least 1024 and ``k``)."""
    chunk = max(_MIN_CHUNK, _TARGET_CHUNK_ELEMENTS // max(num_queries, 1))
    chunk = min(chunk, max(_MAX_CHUNK_KEY_ELEMENTS // max(dim, 1), _MIN_CHUNK))
    return max(chunk, k)


def _groups_above(scores: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor] | None:
    """Candidates from the groups of ``_GROUP`` keys whose best score beats ``threshold``.

    ``scores`` is a key-major ``[c, Q]`` block (``c`` a multiple of ``_GROUP``) and ``threshold``
    the running k-th score of each query. Returns padded ``[Q, w]`` candidate scores and their
    rows in the block (padding scores ``-inf``), or ``None`` when the groups that beat the
    threshold make up more than a quarter of the block (a plain top-k is cheaper then). Keys tied
    with the k-th score are skipped: ties may come in any order.
    """
    rows, num_queries = scores.shape
    grouped = scores.view(rows // _GROUP, _GROUP, num_queries)
    hits = (grouped.amax(dim=1) > threshold).T  # [Q, groups]
    query, group = hits.nonzero().unbind(1)  # sorted by query, then group
    if query.numel() * _GROUP * 4 > scores.numel():
        return None
    counts = torch.bincount(query, minlength=num_queries)
    width = int(counts.max()) if query.numel() else 0
    slot = torch.arange(query.numel(), device=scores.device) - (counts.cumsum(0) - counts)[query]
    cand_scores = scores.new_full((num_queries, width, _GROUP), float("-inf"))
    cand_rows = torch.zeros(num_queries, width, _GROUP, dtype=torch.int64, device=scores.device)
    cand_scores[query, slot] = grouped[group, :, query]
    offsets = torch.arange(_GROUP, device=scores.device)
    cand_rows[query, slot] = group[:, None] * _GROUP + offsets
    return cand_scores.view(num_queries, -1), cand_rows.view(num_queries, -1)


def _torch_backend(
    queries: Tensor,
    keys: Tensor,
    k: int,
    *,
    valid: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked ``torch.mm`` + top-k with a running merge of the per-chunk candidates.

    Scores are computed in fp32: the queries and each key chunk are upcast before the product, so
    the result matches :func:`topk_similarity_reference` for fp32, fp16 and bf16 keys alike. Each
    chunk's scores are computed key-major (``[chunk, Q]``). Once every query holds ``k``
    candidates, the chunk is cut into groups of 32 keys and only the groups whose best score beats
    a query's running k-th score are merged; the others are skipped. Peak extra memory is one
    ``[chunk, Q]`` score block, one upcast ``[chunk, D]`` key block and the candidates: at most a
    quarter of a block (else a plain top-k of the block is taken) plus the running ``[Q, k]``.
    """
    num_queries, num_keys = queries.shape[0], keys.shape[0]
    if chunk_size is None:
        chunk_size = _default_chunk_size(num_queries, k, keys.shape[1])
    chunk_size = min(chunk_size, num_keys)

    q_t = queries.float().T
    best: tuple[Tensor, Tensor] | None = None
    for start in range(0, num_keys, chunk_size):
        stop = min(start + chunk_size, num_keys)
        scores = torch.mm(keys[start:stop].float(), q_t)  # [c, Q]
        if valid is not None:
            mask_scores_(scores, valid[start:stop, None])
        candidates = None
        if best is not None and best[0].shape[1] == k and (stop - start) % _GROUP == 0:
            candidates = _groups_above(scores, best[0][:, -1])
            if candidates is not None and candidates[0].shape[1] == 0:
                continue  # no key of this chunk beats any query's k-th score
        if candidates is None:
            candidates = torch.topk(scores.T, min(k, stop - start), dim=1, sorted=False)
        del scores
        best = _merge(best, candidates[0], candidates[1] + start, k)
    return best


# --------------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------------
def _triton_backend(
    queries: Tensor,
    keys: Tensor,
    k: int,
    *,
    valid: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The fused Triton kernel (``chunk_size`` is not used: the kernel tiles the keys itself)."""
    if keys.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        keys = keys.float()
    if keys.shape[1] > 1 and keys.stride(1) != 1:
        keys = keys.contiguous()
    return triton_kernels.topk_similarity(queries, keys, k, valid=valid)


def _triton_usable(keys: Tensor, k: int) -> bool:
    """Whether ``"auto"`` should run the fused kernel on these keys."""
    return (
        keys.is_cuda
        and k <= MAX_K
        and keys.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and triton_kernels.runs_on(keys.device)
    )


# --------------------------------------------------------------------------------------------------
# faiss backend
# --------------------------------------------------------------------------------------------------
@functools.cache
def faiss_available() -> bool:
    """Whether the ``faiss`` package (faiss-cpu or faiss-gpu) imports here.

    Examples:
        >>> from torchrl_hippo.search import faiss_available
        >>> isinstance(faiss_available(), bool)
        True
    """
    try:
        importlib.import_module("faiss")
    except ImportError:
        return False
    return True


def _require_faiss(what: str) -> ModuleType:
    if not faiss_available():
        raise ImportError(
            f"{what} needs FAISS, which is not installed; install faiss-cpu (or faiss-gpu), "
            "e.g. `pip install torchrl-hippo[faiss]`."
        )
    return importlib.import_module("faiss")


def _bitmap_selector(faiss: ModuleType, mask: np.ndarray) -> tuple[object, np.ndarray]:
    """A faiss ``IDSelectorBitmap`` over a bool mask (keep the returned bitmap alive with it)."""
    bitmap = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(mask.shape[0], faiss.swig_ptr(bitmap)), bitmap


def _faiss_cpu_search(
    faiss: ModuleType, queries: np.ndarray, keys: np.ndarray, k: int, valid: np.ndarray | None
) -> tuple[Tensor, Tensor]:
    """Exact inner-product search of fp32 C-contiguous arrays (``-1`` where fewer than k match)."""
    num_queries, dim = queries.shape
    scores = np.empty((num_queries, k), dtype=np.float32)
    indices = np.empty((num_queries, k), dtype=np.int64)
    selector = bitmap = None
    if valid is not None:
        selector, bitmap = _bitmap_selector(faiss, valid)
    faiss.knn_inner_product(
        faiss.swig_ptr(queries),
        faiss.swig_ptr(keys),
        dim,
        num_queries,
        keys.shape[0],
        k,
        faiss.swig_ptr(scores),
        faiss.swig_ptr(indices),
        selector,
    )
    del bitmap
    return torch.from_numpy(scores), torch.from_numpy(indices)


@functools.cache
def _faiss_gpu_resources() -> object:
    return importlib.import_module("faiss").StandardGpuResources()


def _faiss_gpu_backend(
    faiss: ModuleType, queries: Tensor, keys: Tensor, k: int, valid: Tensor | None
) -> tuple[Tensor, Tensor]:
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        raise ValueError(
            "backend='faiss' got CUDA tensors, but this faiss build has no GPU support "
            "(faiss-cpu); use backend='triton' or 'torch', or move the tensors to the CPU."
        )
    importlib.import_module("faiss.contrib.torch_utils")  # lets faiss.knn_gpu take CUDA tensors
    rows = None
    if valid is not None:
        rows = valid.nonzero().squeeze(1)
        keys = keys[rows]
    if keys.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        keys = keys.float()
    keys = keys.contiguous()
    scores, indices = faiss.knn_gpu(
        _faiss_gpu_resources(),
        queries.to(keys.dtype).contiguous(),
        keys,
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
        device=keys.device.index or 0,
    )
    return scores.float(), indices if rows is None else rows[indices]


def _faiss_backend(
    queries: Tensor,
    keys: Tensor,
    k: int,
    *,
    valid: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact brute-force inner-product search with faiss (``IndexFlatIP``'s search routine).

    fp32 C-contiguous CPU keys are searched in place. Other dtypes or layouts are converted to fp32
    ``chunk_size`` rows at a time (default 65536) and the chunks' results merged. Query rows for
    which faiss cannot return ``k`` keys (it skips valid keys that score ``-inf``) are recomputed
    with the torch backend, so the result always matches the reference.
    """
    faiss = _require_faiss("backend='faiss'")
    if keys.is_cuda:
        return _faiss_gpu_backend(faiss, queries, keys, k, valid)
    q = queries.detach().float().contiguous().numpy()
    mask = None if valid is None else valid.numpy()
    if keys.dtype == torch.float32 and keys.is_contiguous():
        best = _faiss_cpu_search(faiss, q, keys.detach().numpy(), k, mask)
    else:
        step = chunk_size or 65536
        best = None
        for start in range(0, keys.shape[0], step):
            stop = min(start + step, keys.shape[0])
            block = keys[start:stop].detach().float().contiguous().numpy()
            part = None if mask is None else mask[start:stop]
            scores, indices = _faiss_cpu_search(faiss, q, block, min(k, stop - start), part)
            indices = torch.where(indices >= 0, indices + start, -1)
            scores = torch.where(indices >= 0, scores, float("-inf"))
            best = _merge(best, scores, indices, k)
    scores, indices = best
    missing = (indices < 0).any(dim=1)
    if bool(missing.any()):
        fixed = _torch_backend(queries[missing], keys, k, valid=valid)
        scores[missing], indices[missing] = fixed
    return scores, indices


def _check_finite_queries(queries: Tensor) -> None:
    """Rejects infinite queries (NaN ones are rejected by ``check_topk_inputs``).

    An infinite query scores ``inf``, ``-inf`` or NaN against every key, so no ranking of the
    keys is meaningful, and the backends would each return different rows.
    """
    if queries.numel() and not bool(torch.isfinite(queries).all()):
        raise ValueError("queries contains inf; every query must be a finite embedding.")


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
# Only backends usable in this installation are registered.
_BACKENDS: dict[str, BackendFn] = {"torch": _torch_backend}
if triton_kernels.triton_available():
    _BACKENDS["triton"] = _triton_backend
if faiss_available():
    _BACKENDS["faiss"] = _faiss_backend


def available_backends() -> tuple[str, ...]:
    """Names of the search backends usable here, to pass as ``backend=`` to :func:`topk_similarity`.

    ``"torch"`` is always there, ``"triton"`` when Triton is installed (it runs on CUDA tensors),
    ``"faiss"`` when faiss is. ``"auto"`` is always accepted as well; it is not listed because it
    only picks one of these.

    Examples:
        >>> from torchrl_hippo.search import available_backends
        >>> "torch" in available_backends()
        True
    """
    return tuple(_BACKENDS)


def _resolve_auto(queries: Tensor, keys: Tensor, k: int) -> str:
    """Picks the backend that ``backend="auto"`` stands for, given the (checked) inputs.

    CUDA: the fused Triton kernel when Triton is installed (and the dtype and ``k`` fit it), else
    torch. CPU: faiss for contiguous fp32 keys when faiss is installed and the number of queries
    is one where faiss was measured to win (``Q <= 2`` or ``Q >= 1000``), else torch.
    """
    if keys.is_cuda:
        return "triton" if "triton" in _BACKENDS and _triton_usable(keys, k) else "torch"
    if (
        "faiss" in _BACKENDS
        and keys.device.type == "cpu"
        and not _FAISS_MAX_QUERIES < queries.shape[0] < _FAISS_MIN_QUERIES
        and keys.dtype == torch.float32
        and keys.is_contiguous()
    ):
        return "faiss"
    return "torch"


def _resolve_backend(backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}.")
    if backend != "auto" and backend not in _BACKENDS:
        choices = ", ".join(repr(name) for name in ("auto", *_BACKENDS))
        hint = ""
        if backend == "faiss":
            hint = " (faiss is not installed: pip install faiss-cpu)"
        elif backend == "triton":
            hint = " (triton is not installed)"
        raise ValueError(f"Unknown or unavailable backend {backend!r}{hint}; available: {choices}.")
    return backend


# --------------------------------------------------------------------------------------------------
# Approximate search: an incrementally updated FAISS index
# --------------------------------------------------------------------------------------------------
def _default_nlist(capacity: int) -> int:
    """About ``sqrt(capacity)`` inverted lists, a power of two in ``[16, 65536]``."""
    return 1 << min(max(round(np.log2(max(capacity, 1)) / 2), 4), 16)


def _as_rows(rows: Tensor | np.ndarray | list, capacity: int, name: str = "rows") -> Tensor:
    rows = torch.as_tensor(rows).cpu()
    if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
        raise TypeError(f"{name} must hold integer row indices, got dtype {rows.dtype}.")
    rows = rows.long().reshape(-1)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= capacity):
        raise ValueError(
            f"{name} must lie in [0, capacity={capacity}), got values in "
            f"[{int(rows.min())}, {int(rows.max())}]."
        )
    if rows.unique().numel() != rows.numel():
        raise ValueError(f"{name} must not repeat a row.")
    return rows


class FaissKeyIndex:
    """A FAISS index that mirrors a key tensor row for row, for fast approximate search.

    It holds an fp32 copy of the keys that were written (row ``i`` mirrors ``keys[i]`` of a
    memory with ``capacity`` rows) and, once at least ``ivf_threshold`` rows are present, an
    inverted-file index (``IndexIVFFlat``, inner product) over them: ``nlist`` k-means cells, of
    which a search visits the ``nprobe`` nearest to the query. The index follows the memory
    incrementally: :meth:`update` (re)writes rows and :meth:`remove` drops evicted ones, each at a
    cost proportional to the rows touched; nothing is rebuilt when searching. The cells are
    trained on a sample of the rows present when the threshold is crossed, and retrained (every
    row re-added) each time as many rows have been written since the last training as were
    present then: while the memory fills this happens at each doubling, and a full memory is
    retrained once per turnover of its rows, so the cells follow drifting keys at an amortised
    cost of O(nlist * D) per written row. Call :meth:`train` after a sudden change of the key
    distribution (e.g. keys recomputed by a new encoder).

    :meth:`search` with ``approx=True`` scans only the probed cells: the scores it returns are exact
    inner products, but a true neighbour lying in an unvisited cell is missed (recall < 1). Below
    the threshold, with ``approx=False``, or for query rows that the probed cells cannot fill with
    ``k`` keys, the search is exact (over the fp32 mirror).

    Memory: ``capacity * D`` floats for the mirror plus the same again for the IVF lists.

    Args:
        dim (int): the key size ``D``.
        capacity (int): the number of rows of the mirrored key tensor.

    Keyword Args:
        nlist (int, optional): the number of IVF cells. Defaults to ``None``: about
            ``sqrt(capacity)``, a power of two (1024 for a million rows).
        nprobe (int, optional): cells visited per query. Defaults to ``None``: ``max(8, nlist //
            128)``: recall@10 of 0.96 at 20x the speed of exact search, at a million episodic keys
            on one CPU thread (``benchmarks/bench_kernels.py``; 16 gave 0.99 at 10x).
        ivf_threshold (int, optional): rows present before the IVF index is built. Defaults to
            ``None``: ``64 * nlist`` (the training sample size).
        seed (int): seed of the training sample and of k-means. Defaults to ``0``.

    Raises:
        ImportError: if faiss is not installed.

    Examples:
        >>> import torch
        >>> from torchrl_hippo.search import FaissKeyIndex, topk_similarity
        >>> keys = torch.nn.functional.normalize(torch.randn(4096, 16), dim=1)
        >>> index = FaissKeyIndex(16, capacity=4096, nlist=16, ivf_threshold=1024)
        >>> index.update(torch.arange(4096), keys)  # e.g. from HippoWriter, after each write
        >>> index.remove(torch.tensor([7]))  # an evicted row never comes back
        >>> len(index), index.is_trained
        (4095, True)
        >>> scores, indices = topk_similarity(keys[:3], keys, 5, index=index, approx=True)
        >>> indices.shape, bool((indices != 7).all())
        (torch.Size([3, 5]), True)
    """

    def __init__(
        self,
        dim: int,
        capacity: int,
        *,
        nlist: int | None = None,
        nprobe: int | None = None,
        ivf_threshold: int | None = None,
        seed: int = 0,
    ) -> None:
        self._faiss = _require_faiss("FaissKeyIndex")
        for name, value in (("dim", dim), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        self.dim = dim
        self.capacity = capacity
        self.nlist = _default_nlist(capacity) if nlist is None else int(nlist)
        self.nprobe = max(8, self.nlist // 128) if nprobe is None else int(nprobe)
        self.ivf_threshold = 64 * self.nlist if ivf_threshold is None else int(ivf_threshold)
        if self.nlist < 1 or self.nprobe < 1:
            raise ValueError(f"nlist and nprobe must be >= 1, got {self.nlist} and {self.nprobe}.")
        if self.ivf_threshold < self.nlist:
            raise ValueError(
                f"ivf_threshold must be at least nlist={self.nlist} (k-means needs a point per "
                f"cell), got {self.ivf_threshold}."
            )
        self.seed = seed
        self._keys = torch.zeros(capacity, dim)
        self._present = torch.zeros(capacity, dtype=torch.bool)
        self._ivf = None
        self._trained_size = 0
        self._written_since_training = 0

    def __len__(self) -> int:
        """The number of rows present (written and not removed)."""
        return int(self._present.sum())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, capacity={self.capacity}, rows={len(self)}, "
            f"nlist={self.nlist}, nprobe={self.nprobe}, trained={self.is_trained})"
        )

    @property
    def is_trained(self) -> bool:
        """Whether the IVF index exists (approximate searches are possible)."""
        return self._ivf is not None

    @property
    def present(self) -> Tensor:
        """A copy of the bool mask ``[capacity]`` of the rows present."""
        return self._present.clone()

    def update(self, rows: Tensor, keys: Tensor) -> None:
        """Writes ``keys [n, D]`` into rows ``rows [n]`` (new rows or overwrites).

        Raises:
            TypeError, ValueError: on non-integer or out-of-range or repeated rows, keys of the
                wrong shape or dtype, or keys holding NaN or inf.
        """
        rows = _as_rows(rows, self.capacity)
        if not isinstance(keys, Tensor) or not keys.is_floating_point():
            raise TypeError("keys must be a floating torch.Tensor.")
        if keys.shape != (rows.numel(), self.dim):
            raise ValueError(
                f"keys must have shape ({rows.numel()}, {self.dim}) to match rows and dim, "
                f"got {tuple(keys.shape)}."
            )
        keys = keys.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(keys).all()):
            raise ValueError("keys holds NaN or inf; only finite keys can be indexed.")
        if self._ivf is not None:
            self._remove_from_ivf(rows[self._present[rows]])
            self._ivf.add_with_ids(keys.numpy(), rows.numpy())
        self._keys[rows] = keys
        self._present[rows] = True
        self._written_since_training += rows.numel()
        if self._ivf is None:
            if len(self) >= self.ivf_threshold:
                self.train()
        elif self._written_since_training >= self._trained_size:
            self.train()

    def remove(self, rows: Tensor) -> None:
        """Drops rows (evicted or emptied slots); rows not present are ignored."""
        rows = _as_rows(rows, self.capacity)
        rows = rows[self._present[rows]]
        if self._ivf is not None:
            self._remove_from_ivf(rows)
        self._present[rows] = False

    def reset(self) -> None:
        """Drops every row and the IVF index."""
        self._present.zero_()
        self._ivf = None
        self._trained_size = self._written_since_training = 0

    def train(self) -> None:
        """(Re)builds the IVF index: k-means on a sample of the present rows, then adds them all.

        Raises:
            ValueError: if fewer than ``nlist`` rows are present.
        """
        faiss = self._faiss
        rows = self._present.nonzero().squeeze(1)
        if rows.numel() < self.nlist:
            raise ValueError(
                f"training needs at least nlist={self.nlist} rows, only {rows.numel()} present."
            )
        generator = torch.Generator().manual_seed(self.seed)
        sample = rows[torch.randperm(rows.numel(), generator=generator)[: 64 * self.nlist]]
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = self.seed
        ivf.train(self._keys[sample].numpy())
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # O(1) removal by id
        ivf.add_with_ids(self._keys[rows].numpy(), rows.numpy())
        self._ivf = ivf
        self._trained_size = rows.numel()
        self._written_since_training = 0

    def search(
        self,
        queries: Tensor,
        k: int,
        *,
        valid: Tensor | None = None,
        approx: bool = True,
        nprobe: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` present rows with the largest inner product with each query.

        Args:
            queries (Tensor): ``[Q, D]``, floating, finite; any device (the search runs on
                the CPU; results come back on the queries' device).
            k (int): neighbours per query, ``1 <= k <=`` the number of searchable rows.

        Keyword Args:
            valid (Tensor, optional): a bool mask ``[capacity]`` restricting the search further.
                Defaults to ``None`` (every present row).
            approx (bool): search the IVF cells (when trained) instead of every row. Defaults to
                ``True``.
            nprobe (int, optional): cells visited per query. Defaults to ``None``
                (``self.nprobe``).

        Returns:
            fp32 scores ``[Q, k]`` sorted by descending score and int64 rows ``[Q, k]``.

        Raises:
            TypeError, ValueError: as :func:`topk_similarity` on bad queries, ``k`` or ``valid``.
        """
        if not isinstance(queries, Tensor):
            raise TypeError(f"queries must be a torch.Tensor, got {type(queries).__name__}.")
        device, queries = queries.device, queries.detach().cpu()
        if isinstance(valid, Tensor):
            valid = valid.cpu()
        k, _ = check_topk_inputs(queries, self._keys, k, valid)
        _check_finite_queries(queries)
        mask = self._present if valid is None else self._present & valid
        searchable = int(mask.sum())
        if k > searchable:
            raise ValueError(
                f"k={k} is larger than the index: only {searchable} row(s) are present"
                f"{'' if valid is None else ' and valid'}; ask for at most {searchable}."
            )
        if queries.shape[0] == 0:
            return _empty_result(queries.to(device), k)
        if not approx or self._ivf is None:
            scores, indices = topk_similarity(queries, self._keys, k, valid=mask)
            return scores.to(device), indices.to(device)
        faiss = self._faiss
        params = faiss.SearchParametersIVF()
        params.nprobe = self.nprobe if nprobe is None else int(nprobe)
        bitmap = None
        if valid is not None:
            params.sel, bitmap = _bitmap_selector(faiss, mask.numpy())
        scores, indices = self._ivf.search(queries.float().contiguous().numpy(), k, params=params)
        del bitmap
        scores, indices = torch.from_numpy(scores), torch.from_numpy(indices)
        short = (indices < 0).any(dim=1)
        if bool(short.any()):  # the probed cells held fewer than k rows: search those exactly
            scores[short], indices[short] = topk_similarity(
                queries[short], self._keys, k, valid=mask
            )
        return scores.to(device), indices.to(device)

    def _remove_from_ivf(self, rows: Tensor) -> None:
        if rows.numel():
            ids = rows.numpy()
            # The hashtable direct map removes ids from an IDSelectorArray one by one (no scan).
            selector = self._faiss.IDSelectorArray(ids.shape[0], self._faiss.swig_ptr(ids))
            self._ivf.remove_ids(selector)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def topk_similarity(
    queries: Tensor,
    keys: Tensor,
    k: int,
    *,
    valid: Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    approx: bool = False,
    index: FaissKeyIndex | None = None,
) -> tuple[Tensor, Tensor]:
    """Finds, for every query, the ``k`` keys with the largest dot product.

    The score of a key is ``q · key`` accumulated in fp32. Keys may be fp32, fp16 or bf16; queries
    are cast to the backend's compute dtype as needed (the ``"torch"`` and ``"faiss"`` backends
    compute in fp32, the ``"triton"`` kernel in the keys' dtype), and the scores are always
    returned as fp32. Masked keys are never returned. The search works on any device (outputs live
    on the inputs' device) and is not differentiable: if gradients are needed, recompute
    ``queries @ keys[indices].T`` afterwards.

    Args:
        queries (Tensor): the queries, ``[Q, D]``, a floating dtype, finite (no NaN or inf).
        keys (Tensor): the memory's keys, ``[N, D]``, a floating dtype, on the queries' device.
        k (int): how many neighbours to return per query, ``1 <= k <= number of valid keys``.

    Keyword Args:
        valid (Tensor, optional): a bool mask ``[N]`` on the keys' device; keys where it is
            ``False`` (empty or evicted slots) are never returned. Defaults to ``None`` (every
            key is valid).
        backend (str, optional): ``"auto"`` or one of :func:`available_backends`. ``"auto"`` picks
            Triton for CUDA tensors, faiss on CPU for fp32 keys and ``Q <= 2`` or ``Q >= 1000``
            (when installed), and ``"torch"`` otherwise. Defaults to ``"auto"``.
        chunk_size (int, optional): keys scored at once by the chunked backends. Defaults to
            ``None``, which picks about ``2**20 / Q`` keys (at least 1024 and ``k``).
        approx (bool, optional): search ``index`` approximately (its IVF cells) instead of
            scanning every key: much faster on large memories, with recall below 1. Needs
            ``index``. Defaults to ``False`` (exact).
        index (FaissKeyIndex, optional): an index kept in step with ``keys`` (same rows), searched
            when ``approx=True``; ignored by exact searches, which read ``keys`` directly.
            Defaults to ``None``.

    Returns:
        A tuple ``(scores, indices)``: fp32 scores ``[Q, k]`` sorted by descending score, and the
        int64 indices ``[Q, k]`` of the matching rows of ``keys``. Tied scores may come in any
        order. With ``Q == 0`` both are empty ``[0, k]`` tensors.

    Raises:
        TypeError: if an argument has the wrong type or dtype (non-floating queries or keys, a
            non-bool ``valid``, a non-int ``k``).
        ValueError: if queries or keys are not 2-D, their ``D`` or devices differ, ``valid`` has
            the wrong shape or device, ``k < 1``, ``k`` exceeds the number of valid keys, the
            queries hold NaN or inf, ``chunk_size < 1``, the backend is unknown or not
            installed, or ``approx=True`` comes without a matching ``index``.

    Examples:
        >>> import torch
        >>> from torchrl_hippo.search import topk_similarity
        >>> keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
        >>> queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> scores, indices = topk_similarity(queries, keys, k=2)
        >>> scores
        tensor([[1.0000, 0.6000],
                [1.0000, 0.8000]])
        >>> indices
        tensor([[0, 2],
                [1, 2]])

        Masked keys are skipped, and low-precision keys are scored in fp32:

        >>> valid = torch.tensor([False, True, True])
        >>> scores, indices = topk_similarity(queries, keys.bfloat16(), k=2, valid=valid)
        >>> scores.dtype, indices.tolist()
        (torch.float32, [[2, 1], [1, 2]])
        >>> topk_similarity(queries, keys, k=4)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: k=4 is larger than the memory: keys has only 3 valid key(s) (out of N=3); ...
    """
    backend = _resolve_backend(backend)
    if chunk_size is not None:
        if isinstance(chunk_size, bool):
            raise TypeError(f"chunk_size must be an int or None, got {chunk_size!r}.")
        try:
            chunk_size = operator.index(chunk_size)
        except TypeError:
            raise TypeError(
                f"chunk_size must be an int or None, got {type(chunk_size).__name__}."
            ) from None
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1 (or None), got {chunk_size}.")
    k, _ = check_topk_inputs(queries, keys, k, valid)
    _check_finite_queries(queries)
    if approx:
        if not isinstance(index, FaissKeyIndex):
            raise ValueError(
                "approx=True searches a FaissKeyIndex that mirrors keys: pass index=FaissKeyIndex"
                "(D, capacity=N), kept up to date with index.update(rows, keys) and "
                "index.remove(rows)."
            )
        if (index.capacity, index.dim) != tuple(keys.shape):
            raise ValueError(
                f"index mirrors a [{index.capacity}, {index.dim}] key tensor, but keys has shape "
                f"{tuple(keys.shape)}."
            )
        return index.search(queries, k, valid=valid, approx=True)
    if queries.shape[0] == 0:
        return _empty_result(queries, k)
    if backend == "auto":
        backend = _resolve_auto(queries, keys, k)
    with torch.no_grad():
        return _BACKENDS[backend](queries, keys, k, valid=valid, chunk_size=chunk_size)
