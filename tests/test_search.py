"""Tests of ``torchrl_hippo.search``: every backend against the un-chunked reference."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchrl_hippo import search
from torchrl_hippo.search import (
    FaissKeyIndex,
    available_backends,
    faiss_available,
    topk_similarity,
    topk_similarity_reference,
)

# Backends that run natively on CPU tensors. "triton" runs there only under Triton's interpreter
# (slow): it has its own small tests below and in tests/test_topk_kernel.py.
BACKENDS = [*sorted(set(available_backends()) - {"auto", "triton"}), "auto"]
needs_faiss = pytest.mark.skipif(not faiss_available(), reason="needs faiss")
needs_triton = pytest.mark.skipif("triton" not in available_backends(), reason="needs triton")

# Absolute score tolerance per key dtype (rows are L2-normalised, so scores lie in [-1, 1]).
ATOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = list(ATOL)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def _embeddings(rows: int, dim: int, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Continuous random unit rows: exact ties have probability zero."""
    x = torch.randn(rows, dim, device=device)
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def _mask(kind: str, n: int, k: int, device="cpu") -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "random":
        mask = torch.rand(n, device=device) < 0.5
        mask[torch.randperm(n, device=device)[:k]] = True  # always at least k valid keys
        return mask
    if kind == "exactly_k":
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[torch.randperm(n, device=device)[:k]] = True
        return mask
    raise AssertionError(kind)


def _assert_matches_reference(queries, keys, k, valid, scores, indices, atol):
    """Checks a search result against the definition, robustly to near-ties."""
    num_queries = queries.shape[0]
    assert scores.shape == (num_queries, k) and indices.shape == (num_queries, k)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    assert scores.device == queries.device and indices.device == queries.device
    # Sorted by descending score.
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    # Same scores as the reference.
    ref_scores, ref_indices = topk_similarity_reference(queries, keys, k, valid=valid)
    torch.testing.assert_close(scores, ref_scores, atol=atol, rtol=0)
    # The returned scores are the true scores of the returned keys.
    full = queries.float() @ keys.float().T
    torch.testing.assert_close(scores, full.gather(1, indices), atol=atol, rtol=0)
    for row in range(num_queries):
        returned = set(indices[row].tolist())
        assert len(returned) == k, "an index was returned twice"
        if valid is not None:
            assert bool(valid[indices[row]].all()), "an invalid key was returned"
        # Index sets agree, except where the reference's k-th score is within tolerance.
        kth = ref_scores[row, -1]
        sure = ref_indices[row][ref_scores[row] > kth + 2 * atol].tolist()
        assert set(sure) <= returned


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 5, 64])
@pytest.mark.parametrize("num_queries", [1, 7])
@pytest.mark.parametrize("mask", ["none", "random", "exactly_k"])
@pytest.mark.parametrize("chunk_size", [97, 128, None])
def test_matches_reference(backend, dtype, k, num_queries, mask, chunk_size):
    n, dim = 1000, 24  # N is not a multiple of the chunk size 97
    keys = _embeddings(n, dim, dtype=dtype)
    queries = _embeddings(num_queries, dim)
    valid = _mask(mask, n, k)
    scores, indices = topk_similarity(
        queries, keys, k, valid=valid, backend=backend, chunk_size=chunk_size
    )
    _assert_matches_reference(queries, keys, k, valid, scores, indices, ATOL[dtype])
    if mask == "exactly_k":
        assert set(indices[0].tolist()) == set(valid.nonzero().squeeze(1).tolist())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 3, 64, 1000, 5000])
def test_chunk_sizes_around_k(backend, chunk_size):
    """Chunks smaller than k, equal to it, and larger than N all merge correctly."""
    keys = _embeddings(300, 8)
    queries = _embeddings(5, 8)
    valid = _mask("random", 300, 64)
    scores, indices = topk_similarity(
        queries, keys, 64, valid=valid, backend=backend, chunk_size=chunk_size
    )
    _assert_matches_reference(queries, keys, 64, valid, scores, indices, ATOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("query_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_query_dtype_differs_from_keys(backend, query_dtype):
    keys = _embeddings(200, 16, dtype=torch.bfloat16)
    queries = _embeddings(3, 16, dtype=query_dtype)
    scores, indices = topk_similarity(queries, keys, 10, backend=backend, chunk_size=33)
    _assert_matches_reference(queries, keys, 10, None, scores, indices, ATOL[torch.bfloat16])


@pytest.mark.parametrize("backend", [*BACKENDS, "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_devices(backend, device, dtype):
    if backend not in (*available_backends(), "auto"):
        pytest.skip(f"{backend} is not installed")
    if device == "cpu" and backend == "triton":
        pytest.skip("triton on CPU runs interpreted: see test_triton_backend_on_interpreter")
    if device == "cuda" and backend == "faiss" and not _faiss_has_gpu():
        pytest.skip("faiss without GPU support")
    keys = _embeddings(777, 32, dtype=dtype, device=device)
    queries = _embeddings(4, 32, device=device)
    valid = _mask("random", 777, 16, device=device)
    scores, indices = topk_similarity(queries, keys, 16, valid=valid, backend=backend)
    _assert_matches_reference(queries, keys, 16, valid, scores, indices, ATOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 4])
def test_no_queries_gives_empty_results(backend, k):
    scores, indices = topk_similarity(torch.empty(0, 8), _embeddings(10, 8), k, backend=backend)
    assert scores.shape == (0, k) and scores.dtype == torch.float32
    assert indices.shape == (0, k) and indices.dtype == torch.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_garbage_never_leaks(backend):
    """Masked rows may hold NaN or inf; valid keys scoring -inf still beat them."""
    keys = torch.tensor(
        [
            [float("-inf"), 0.0],  # valid, scores -inf
            [float("nan"), 1.0],  # masked
            [float("inf"), 1.0],  # masked
            [0.5, 0.5],  # valid
            [1.0, 1.0],  # masked
        ]
    )
    valid = torch.tensor([True, False, False, True, False])
    queries = torch.ones(2, 2)
    for chunk_size in (1, 2, None):
        scores, indices = topk_similarity(
            queries, keys, 2, valid=valid, backend=backend, chunk_size=chunk_size
        )
        assert indices.tolist() == [[3, 0], [3, 0]]
        assert scores[:, 0].tolist() == [1.0, 1.0]
    _, ref_indices = topk_similarity_reference(queries, keys, 2, valid=valid)
    assert ref_indices.tolist() == [[3, 0], [3, 0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_carry_no_gradient(backend):
    queries = _embeddings(3, 8).requires_grad_()
    scores, _ = topk_similarity(queries, _embeddings(50, 8), 5, backend=backend)
    assert not scores.requires_grad


def test_available_backends():
    names = available_backends()
    assert isinstance(names, tuple) and all(isinstance(name, str) for name in names)
    assert "torch" in names


class _LargestNewTensor(TorchDispatchMode):
    """Records the largest tensor that an op allocates (views of the inputs are not counted)."""

    def __init__(self, *inputs: torch.Tensor):
        super().__init__()
        self._input_storages = {t.untyped_storage().data_ptr() for t in inputs}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                if tensor.untyped_storage().data_ptr() not in self._input_storages:
                    self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_backend_memory_is_bounded(dtype):
    """A large memory with small chunks: correct, and never a Q x N intermediate."""
    n, dim, chunk, num_queries, k = 200_000, 16, 4096, 7, 32
    keys = _embeddings(n, dim, dtype=dtype)
    queries = _embeddings(num_queries, dim)
    valid = _mask("random", n, k)
    with _LargestNewTensor(queries, keys, valid) as mode:
        scores, indices = topk_similarity(
            queries, keys, k, valid=valid, backend="torch", chunk_size=chunk
        )
    assert mode.largest <= max(num_queries * chunk, chunk * dim, 2 * num_queries * k)
    assert mode.largest < num_queries * n // 10
    _assert_matches_reference(queries, keys, k, valid, scores, indices, ATOL[dtype])


def test_torch_backend_default_chunk_is_bounded():
    """Without chunk_size, one score block holds about 2**22 elements, never Q x N."""
    n, dim, num_queries, k = 200_000, 4, 64, 8
    keys = _embeddings(n, dim)
    queries = _embeddings(num_queries, dim)
    with _LargestNewTensor(queries, keys) as mode:
        scores, indices = topk_similarity(queries, keys, k, backend="torch")
    assert mode.largest <= 2**22
    assert mode.largest < num_queries * n
    _assert_matches_reference(queries, keys, k, None, scores, indices, ATOL[torch.float32])


def _bad_inputs():
    q, keys = torch.randn(3, 4), torch.randn(10, 4)
    meta = torch.randn(10, 4, device="meta")
    nan_q = q.clone()
    nan_q[1, 2] = float("nan")
    few_valid = torch.zeros(10, dtype=torch.bool)
    few_valid[:3] = True
    # (id, kwargs, exception, message regex)
    return [
        ("queries-1d", dict(queries=torch.randn(4)), ValueError, r"queries must be 2-D"),
        ("keys-3d", dict(keys=torch.randn(2, 5, 4)), ValueError, r"keys must be 2-D"),
        ("queries-list", dict(queries=[[0.0] * 4]), TypeError, r"queries must be a torch\.Tensor"),
        ("d-mismatch", dict(keys=torch.randn(10, 5)), ValueError, r"same embedding size D"),
        (
            "int-queries",
            dict(queries=torch.ones(3, 4, dtype=torch.int64)),
            TypeError,
            r"queries must have a floating dtype",
        ),
        (
            "bool-keys",
            dict(keys=torch.ones(10, 4, dtype=torch.bool)),
            TypeError,
            r"keys must have a floating dtype",
        ),
        ("k-zero", dict(k=0), ValueError, r"k must be at least 1, got k=0"),
        ("k-negative", dict(k=-3), ValueError, r"k must be at least 1"),
        ("k-float", dict(k=2.0), TypeError, r"k must be an int"),
        ("k-bool", dict(k=True), TypeError, r"k must be an int"),
        (
            "k-too-large",
            dict(k=11),
            ValueError,
            r"k=11 is larger than the memory: keys has only 10 valid key",
        ),
        (
            "k-above-valid",
            dict(k=4, valid=few_valid),
            ValueError,
            r"larger than the memory: keys has only 3 valid key",
        ),
        ("valid-float", dict(valid=torch.ones(10)), TypeError, r"valid must be a bool tensor"),
        (
            "valid-shape",
            dict(valid=torch.ones(9, dtype=torch.bool)),
            ValueError,
            r"valid must have shape \[N\] = \(10,\)",
        ),
        (
            "valid-2d",
            dict(valid=torch.ones(10, 1, dtype=torch.bool)),
            ValueError,
            r"valid must have shape",
        ),
        (
            "valid-device",
            dict(valid=torch.ones(10, dtype=torch.bool, device="meta")),
            ValueError,
            r"valid must be on the same device as keys",
        ),
        (
            "devices-differ",
            dict(keys=meta),
            ValueError,
            r"queries and keys must be on the same device",
        ),
        ("nan-queries", dict(queries=nan_q), ValueError, r"queries contains NaN"),
        ("chunk-zero", dict(chunk_size=0), ValueError, r"chunk_size must be at least 1"),
        ("chunk-negative", dict(chunk_size=-5), ValueError, r"chunk_size must be at least 1"),
        ("chunk-float", dict(chunk_size=8.5), TypeError, r"chunk_size must be an int"),
        (
            "backend-unknown",
            dict(backend="nope"),
            ValueError,
            r"Unknown or unavailable backend 'nope'; available: 'auto'.*'torch'",
        ),
        ("backend-not-str", dict(backend=None), TypeError, r"backend must be a str"),
    ], dict(queries=q, keys=keys, k=2)


_CASES, _GOOD = _bad_inputs()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "overrides,error,match",
    [case[1:] for case in _CASES],
    ids=[case[0] for case in _CASES],
)
def test_bad_inputs(backend, overrides, error, match):
    kwargs = {**_GOOD, "backend": backend, **overrides}
    with pytest.raises(error, match=match):
        topk_similarity(**kwargs)


@pytest.mark.parametrize(
    "overrides,error,match",
    [case[1:] for case in _CASES if not {"chunk_size", "backend"} & set(case[1])],
    ids=[case[0] for case in _CASES if not {"chunk_size", "backend"} & set(case[1])],
)
def test_reference_bad_inputs(overrides, error, match):
    kwargs = {**_GOOD, **overrides}
    with pytest.raises(error, match=match):
        topk_similarity_reference(**kwargs)


def _faiss_has_gpu() -> bool:
    if not faiss_available():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# --------------------------------------------------------------------------------------------------
# The torch backend's group selection
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 8, 40])
def test_torch_backend_group_selection(k):
    """Chunks that are multiples of 32 use the group selection after the first chunk; ties,
    sorted keys (every chunk beats the last) and reversed keys (no chunk does) all merge right."""
    dim, num_queries = 8, 5
    queries = _embeddings(num_queries, dim)
    keys = _embeddings(3000, dim)
    for order in ("random", "ascending", "descending"):
        if order != "random":
            ranks = (keys @ queries[0]).argsort(descending=order == "descending")
            keys = keys[ranks]
        for chunk_size in (64, 256, 1024):
            scores, indices = topk_similarity(
                queries, keys, k, backend="torch", chunk_size=chunk_size
            )
            _assert_matches_reference(queries, keys, k, None, scores, indices, 1e-5)


def test_torch_backend_exact_ties():
    """Repeated keys give tied scores: the returned scores still equal the reference's."""
    keys = _embeddings(40, 8).repeat(50, 1)  # every key 50 times
    queries = _embeddings(3, 8)
    scores, indices = topk_similarity(queries, keys, 70, backend="torch", chunk_size=128)
    ref_scores, _ = topk_similarity_reference(queries, keys, 70)
    torch.testing.assert_close(scores, ref_scores)
    assert all(len(set(row)) == 70 for row in indices.tolist())


# --------------------------------------------------------------------------------------------------
# auto and the optional backends
# --------------------------------------------------------------------------------------------------
def test_auto_on_cpu():
    keys = _embeddings(500, 8)
    many, one = _embeddings(16, 8), _embeddings(1, 8)
    assert search._resolve_auto(many, keys, 5) == "torch"
    assert search._resolve_auto(one, keys.bfloat16(), 5) == "torch"
    expected = "faiss" if faiss_available() else "torch"
    assert search._resolve_auto(one, keys, 5) == expected
    assert search._resolve_auto(_embeddings(1000, 8), keys, 5) == expected


def test_auto_never_picks_an_uninstalled_backend(monkeypatch):
    monkeypatch.setattr(search, "_BACKENDS", {"torch": search._torch_backend})
    keys = _embeddings(500, 8)
    assert search._resolve_auto(_embeddings(1, 8), keys, 5) == "torch"
    assert available_backends() == ("torch",)
    with pytest.raises(ValueError, match=r"backend 'faiss' \(faiss is not installed"):
        topk_similarity(_embeddings(1, 8), keys, 5, backend="faiss")
    with pytest.raises(ValueError, match=r"backend 'triton' \(triton is not installed"):
        topk_similarity(_embeddings(1, 8), keys, 5, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_triton
def test_auto_picks_triton_on_cuda():
    keys = _embeddings(500, 8, device="cuda")
    assert search._resolve_auto(_embeddings(4, 8, device="cuda"), keys, 5) == "triton"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_backend_on_interpreter(dtype):
    """The search's triton backend on CPU tensors, through Triton's interpreter (small)."""
    if not search.triton_kernels.runs_on("cpu"):
        pytest.skip("Triton's interpreter is off (TRITON_INTERPRET is not 1)")
    keys = _embeddings(150, 16, dtype=dtype)
    queries = _embeddings(3, 16)
    valid = _mask("random", 150, 6)
    # A transposed copy: the backend makes it contiguous for the kernel.
    strided = keys.T.contiguous().T
    scores, indices = topk_similarity(queries, strided, 6, valid=valid, backend="triton")
    _assert_matches_reference(queries, keys, 6, valid, scores, indices, ATOL[dtype])


@needs_faiss
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_faiss_backend_chunks_low_precision_keys(dtype):
    keys = _embeddings(1000, 16, dtype=dtype)
    queries = _embeddings(5, 16)
    valid = _mask("random", 1000, 20)
    for chunk_size in (7, 300, None):
        scores, indices = topk_similarity(
            queries, keys, 20, valid=valid, backend="faiss", chunk_size=chunk_size
        )
        _assert_matches_reference(queries, keys, 20, valid, scores, indices, ATOL[dtype])


# --------------------------------------------------------------------------------------------------
# FaissKeyIndex and approximate search
# --------------------------------------------------------------------------------------------------
def _clustered(rows: int, dim: int, clusters: int, *, seed: int = 0) -> torch.Tensor:
    """Unit keys around a few centres: the structure that inverted lists exploit."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=g), dim=1)
    keys = centres[torch.randint(clusters, (rows,), generator=g)]
    return torch.nn.functional.normalize(keys + 0.15 * torch.randn(rows, dim, generator=g), dim=1)


def _recall(indices: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(b)) for a, b in zip(indices.tolist(), exact.tolist()))
    return hits / exact.numel()


@needs_faiss
def test_index_exact_below_threshold_and_mirrors_rows():
    keys = _embeddings(500, 8)
    index = FaissKeyIndex(8, 500, nlist=16, ivf_threshold=400)
    index.update(torch.arange(300), keys[:300])
    assert len(index) == 300 and not index.is_trained
    queries = _embeddings(4, 8)
    valid = torch.zeros(500, dtype=torch.bool)
    valid[:300] = True
    for approx in (True, False):
        scores, indices = index.search(queries, 10, approx=approx)
        _assert_matches_reference(queries, keys, 10, valid, scores, indices, 1e-5)


@needs_faiss
def test_index_approximate_recall_and_incremental_updates():
    capacity, dim = 20_000, 16
    keys = _clustered(capacity, dim, 200)
    index = FaissKeyIndex(dim, capacity, nlist=64, nprobe=8, ivf_threshold=4096)
    for start in range(0, capacity, 2500):  # written in batches, like HippoWriter
        rows = torch.arange(start, start + 2500)
        index.update(rows, keys[rows])
    assert index.is_trained and len(index) == capacity
    queries = keys[torch.randperm(capacity)[:64]] + 0.05 * torch.randn(64, dim)
    _, exact = topk_similarity_reference(queries, keys, 10)
    scores, indices = topk_similarity(queries, keys, 10, index=index, approx=True)
    assert _recall(indices, exact) >= 0.95
    # Scores are the true inner products of the returned rows.
    torch.testing.assert_close(scores, (queries @ keys.T).gather(1, indices))

    # Evict rows and overwrite others: evicted rows never come back, overwritten rows move.
    evicted = exact[:, 0].unique()
    index.remove(evicted)
    moved = torch.arange(100, 200)
    keys = keys.clone()
    keys[moved] = queries[:1].expand(100, -1) / queries[:1].norm()
    index.update(moved, keys[moved])
    valid = torch.ones(capacity, dtype=torch.bool)
    valid[evicted] = False
    _, indices = topk_similarity(queries, keys, 10, valid=valid, index=index, approx=True)
    assert not bool(torch.isin(indices, evicted).any())
    assert set(indices[0].tolist()) <= set(moved.tolist())

    # A further mask restricts the search; exact search through the index is exact.
    valid[::2] = False
    scores, indices = index.search(queries, 5, valid=valid, approx=False)
    _assert_matches_reference(queries, keys, 5, valid, scores, indices, 1e-5)
    _, indices = index.search(queries, 5, valid=valid)
    assert bool(valid[indices].all())


@needs_faiss
def test_index_retrains_as_it_grows_and_resets():
    keys = _clustered(4096, 8, 32)
    index = FaissKeyIndex(8, 4096, nlist=16, ivf_threshold=256)
    index.update(torch.arange(256), keys[:256])
    assert index.is_trained and index._trained_size == 256
    index.update(torch.arange(256, 1024), keys[256:1024])
    assert index._trained_size == 1024
    index.reset()
    assert len(index) == 0 and not index.is_trained
    with pytest.raises(ValueError, match=r"at least nlist=16 rows"):
        index.train()


@needs_faiss
def test_index_fills_short_probes_exactly():
    """When the probed cells hold fewer than k valid rows, those queries are answered exactly."""
    keys = _clustered(2048, 8, 16)
    index = FaissKeyIndex(8, 2048, nlist=16, nprobe=1, ivf_threshold=512)
    index.update(torch.arange(2048), keys)
    valid = torch.zeros(2048, dtype=torch.bool)
    valid[torch.randperm(2048)[:40]] = True
    queries = _embeddings(6, 8)
    scores, indices = index.search(queries, 30, valid=valid)
    _assert_matches_reference(queries, keys, 30, valid, scores, indices, 1e-5)


@needs_faiss
def test_index_bad_inputs():
    index = FaissKeyIndex(4, 10, nlist=2, ivf_threshold=8)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, capacity=10\)"):
        index.update(torch.tensor([10]), torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"must not repeat a row"):
        index.update(torch.tensor([1, 1]), torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"integer row indices"):
        index.update(torch.tensor([1.0]), torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"keys must have shape \(1, 4\)"):
        index.update(torch.tensor([1]), torch.randn(1, 5))
    with pytest.raises(ValueError, match=r"NaN or inf"):
        index.update(torch.tensor([1]), torch.tensor([[float("nan"), 0.0, 0.0, 0.0]]))
    index.update(torch.arange(3), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"k=4 is larger than the index: only 3 row"):
        index.search(torch.randn(1, 4), 4)
    with pytest.raises(ValueError, match=r"same embedding size D"):
        index.search(torch.randn(1, 5), 1)
    with pytest.raises(ValueError, match=r"queries contains NaN"):
        index.search(torch.full((1, 4), float("nan")), 1)
    with pytest.raises(ValueError, match=r"valid must have shape \[N\] = \(10,\)"):
        index.search(torch.randn(1, 4), 1, valid=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"ivf_threshold must be at least nlist"):
        FaissKeyIndex(4, 10, nlist=8, ivf_threshold=4)
    with pytest.raises(ValueError, match=r"capacity must be a positive int"):
        FaissKeyIndex(4, 0)


def test_approx_needs_a_matching_index():
    keys = _embeddings(20, 4)
    with pytest.raises(ValueError, match=r"approx=True searches a FaissKeyIndex"):
        topk_similarity(keys[:2], keys, 3, approx=True)
    if faiss_available():
        with pytest.raises(ValueError, match=r"index mirrors a \[30, 4\] key tensor"):
            topk_similarity(keys[:2], keys, 3, approx=True, index=FaissKeyIndex(4, 30))


def test_index_without_faiss(monkeypatch):
    monkeypatch.setattr(search, "faiss_available", lambda: False)
    with pytest.raises(ImportError, match=r"FaissKeyIndex needs FAISS, which is not installed"):
        FaissKeyIndex(4, 10)
