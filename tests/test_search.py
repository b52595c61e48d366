"""Tests of ``torchrl_hippo.search``: every backend against the un-chunked reference."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchrl_hippo.search import (
    available_backends,
    topk_similarity,
    topk_similarity_reference,
)

BACKENDS = [*sorted(set(available_backends()) - {"auto"}), "auto"]

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
@pytest.mark.parametrize("chunk_size", [97, None])
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_devices(backend, device, dtype):
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
