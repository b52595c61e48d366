"""Tests of ``triton_kernels.topk``: the fused kernel against its PyTorch reference.

The kernel runs on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set by the
conftest), on small shapes. The tests also compile it ahead of time for Hopper (sm_90) and Ampere
(sm_80) with no GPU present, which catches code that the interpreter accepts but the compiler
rejects, and checks that bf16 products use Hopper's ``wgmma`` tensor-core instructions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import triton_kernels
from triton_kernels import topk as topk_module
from triton_kernels import topk_similarity, topk_similarity_reference

pytestmark = pytest.mark.skipif(not triton_kernels.triton_available(), reason="needs triton")

interpreter = pytest.mark.skipif(
    not (triton_kernels.triton_available() and triton_kernels.runs_on("cpu")),
    reason="Triton's interpreter is off (TRITON_INTERPRET is not 1)",
)

# Absolute score tolerance per key dtype (rows are L2-normalised, so scores lie in [-1, 1]). The
# kernel rounds the queries to the keys' dtype, the reference does not.
ATOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = list(ATOL)


def _unit(rows: int, dim: int, dtype=torch.float32) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, dim), dim=1).to(dtype)


def _mask(kind: str, n: int, k: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.rand(n) < 0.5 if kind == "random" else torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n)[:k]] = True
    return mask


def _check(queries, keys, k, valid, scores, indices, atol):
    """Scores equal the reference's; index sets equal apart from near-ties at the k-th score."""
    assert scores.shape == indices.shape == (queries.shape[0], k)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    assert bool((scores[:, :-1] >= scores[:, 1:]).all()), "not sorted by descending score"
    ref_scores, ref_indices = topk_similarity_reference(queries, keys, k, valid=valid)
    torch.testing.assert_close(scores, ref_scores, atol=atol, rtol=0)
    true_scores = (queries.float() @ keys.float().T).gather(1, indices)
    if valid is not None:
        true_scores = torch.where(valid[indices], true_scores, float("-inf"))
    torch.testing.assert_close(scores, true_scores, atol=atol, rtol=0)
    for row in range(queries.shape[0]):
        returned = set(indices[row].tolist())
        assert len(returned) == k, "an index was returned twice"
        if valid is not None:
            assert bool(valid[indices[row]].all()), "an invalid key was returned"
        sure = ref_indices[row][ref_scores[row] > ref_scores[row, -1] + 2 * atol].tolist()
        assert set(sure) <= returned


# --------------------------------------------------------------------------------------------------
# The kernel against the reference (interpreter)
# --------------------------------------------------------------------------------------------------
@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 5, 16])
@pytest.mark.parametrize("mask", ["none", "random"])
def test_matches_reference(dtype, k, mask):
    keys = _unit(300, 24, dtype)  # 300 keys: not a multiple of the key tile
    queries = _unit(5, 24)  # 5 queries: not a multiple of the query block
    valid = _mask(mask, 300, k)
    scores, indices = topk_similarity(queries, keys, k, valid=valid)
    _check(queries, keys, k, valid, scores, indices, ATOL[dtype])


@interpreter
@pytest.mark.parametrize(
    "num_queries,num_keys,dim,k,num_splits",
    [
        (7, 1, 8, 1, None),  # a single key
        (2, 33, 5, 33, None),  # k = N, odd D
        (3, 129, 130, 4, 2),  # D above one 128-wide chunk: the kernel loops over D
        (9, 200, 16, 7, 5),  # more splits than needed, and a final merge across them
        (1, 100, 1, 3, None),  # D = 1
    ],
)
def test_shapes_and_splits(num_queries, num_keys, dim, k, num_splits):
    keys, queries = _unit(num_keys, dim), _unit(num_queries, dim)
    scores, indices = topk_similarity(queries, keys, k, num_splits=num_splits)
    _check(queries, keys, k, None, scores, indices, ATOL[torch.float32])


@interpreter
@pytest.mark.parametrize("k,num_keys", [(64, 200), (256, 260)])
def test_large_k(k, num_keys):
    keys, queries = _unit(num_keys, 8, torch.bfloat16), _unit(2, 8)
    valid = _mask("random", num_keys, k)
    scores, indices = topk_similarity(queries, keys, k, valid=valid)
    _check(queries, keys, k, valid, scores, indices, ATOL[torch.bfloat16])


@interpreter
def test_exactly_k_valid_keys_all_come_back():
    keys, queries = _unit(150, 8), _unit(3, 8)
    valid = _mask("exactly_k", 150, 6)
    scores, indices = topk_similarity(queries, keys, 6, valid=valid, num_splits=4)
    for row in indices.tolist():
        assert set(row) == set(valid.nonzero().squeeze(1).tolist())
    _check(queries, keys, 6, valid, scores, indices, ATOL[torch.float32])


@interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_masked_garbage_never_leaks():
    """Masked rows may hold NaN or inf; a valid key scoring -inf still beats them."""
    keys = torch.tensor(
        [[float("-inf"), 0.0], [float("nan"), 1.0], [float("inf"), 1.0], [0.5, 0.5], [1.0, 1.0]]
    )
    valid = torch.tensor([True, False, False, True, False])
    scores, indices = topk_similarity(torch.ones(2, 2), keys, 2, valid=valid)
    assert indices.tolist() == [[3, 0], [3, 0]]
    assert scores[:, 0].tolist() == [1.0, 1.0]
    assert scores[0, 1].item() == torch.finfo(torch.float32).min


@interpreter
def test_ties_and_strided_keys():
    base = _unit(20, 8)
    keys = base.repeat(10, 1)  # every score tied ten times
    queries = _unit(3, 8)
    scores, indices = topk_similarity(queries, keys, 25)
    torch.testing.assert_close(scores, topk_similarity_reference(queries, keys, 25)[0])
    assert all(len(set(row)) == 25 for row in indices.tolist())
    # Rows with a stride (every other row of a larger tensor) are read in place.
    wide = _unit(300, 8)
    scores, indices = topk_similarity(queries.double(), wide[::2], 5)
    _check(queries, wide[::2], 5, None, scores, indices, ATOL[torch.float32])


@interpreter
def test_no_queries():
    scores, indices = topk_similarity(torch.empty(0, 4), _unit(10, 4), 3)
    assert scores.shape == indices.shape == (0, 3)


@interpreter
def test_output_is_o_q_k_not_o_q_n():
    """The only buffer the launch allocates holds num_splits * Q * k_pad candidates."""
    cfg = topk_module._config(256, 10_000_000, 10, 128, torch.bfloat16, torch.device("cpu"), None)
    assert cfg.num_splits * 256 * cfg.k_pad < 256 * 10_000_000 // 1000
    assert cfg.num_splits * cfg.keys_per_split >= 10_000_000


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def _bad_inputs():
    q, keys = torch.randn(3, 4), torch.randn(10, 4)
    nan_q = q.clone()
    nan_q[0, 0] = float("nan")
    few = torch.zeros(10, dtype=torch.bool)
    few[:2] = True
    big = torch.randn(300, 4)
    return [
        ("d-mismatch", dict(keys=torch.randn(10, 5)), ValueError, r"same embedding size D"),
        ("k-above-valid", dict(k=3, valid=few), ValueError, r"keys has only 2 valid key"),
        ("k-above-max", dict(keys=big, k=257), ValueError, r"k must be at most 256"),
        ("k-zero", dict(k=0), ValueError, r"k must be at least 1"),
        ("int-keys", dict(keys=torch.ones(10, 4, dtype=torch.int32)), TypeError, r"keys must"),
        ("double-keys", dict(keys=keys.double()), TypeError, r"float32, float16 or bfloat16"),
        ("col-strided", dict(keys=torch.randn(4, 10).T), ValueError, r"unit stride along D"),
        ("nan-queries", dict(queries=nan_q), ValueError, r"queries contains NaN"),
        ("valid-int", dict(valid=torch.ones(10, dtype=torch.int8)), TypeError, r"bool tensor"),
        ("devices", dict(keys=keys.to("meta")), ValueError, r"must be on the same device"),
        ("splits", dict(num_splits=0), ValueError, r"num_splits must be a positive int"),
    ], dict(queries=q, keys=keys, k=2)


_CASES, _GOOD = _bad_inputs()


@pytest.mark.parametrize(
    "overrides,error,match", [c[1:] for c in _CASES], ids=[c[0] for c in _CASES]
)
def test_bad_inputs(overrides, error, match):
    with pytest.raises(error, match=match):
        topk_similarity(**{**_GOOD, **overrides})


def test_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_kernels._launch, "interpreted", lambda kernel: False)
    with pytest.raises(ValueError, match=r"needs CUDA tensors, got tensors on cpu"):
        topk_similarity(torch.randn(2, 4), torch.randn(5, 4), 2)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for the GPU, without a GPU
# --------------------------------------------------------------------------------------------------
def run_aot(*args: str) -> list[dict]:
    """``python -m triton_kernels.aot ...`` in a process without Triton's interpreter."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "triton_kernels.aot", *args],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_compiles_for_hopper_with_wgmma():
    (report,) = run_aot("--op", "topk", "--arch", "90", "--dtype", "bf16", "--k", "10")
    assert report["instructions"]["wgmma"]  # bf16 tl.dot on Hopper tensor cores
    assert report["shared_bytes"] <= 227 * 1024


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,arch,k,dim,instruction",
    [
        ("fp32", 90, 16, 128, "wgmma"),  # 3xTF32 on Hopper tensor cores
        ("fp16", 80, 10, 128, "mma.sync"),  # Ampere tensor cores
        ("bf16", 90, 256, 64, "mma.sync"),  # k = 256: 32-query blocks
        ("bf16", 90, 1, 256, "wgmma"),  # D above one 128-wide chunk
    ],
)
def test_compiles_for_other_configurations(dtype, arch, k, dim, instruction):
    args = ("--op", "topk", "--arch", str(arch), "--dtype", dtype, "--k", str(k), "--dim", str(dim))
    (report,) = run_aot(*args)
    assert report["instructions"][instruction]
    assert report["shared_bytes"] <= (227 if arch == 90 else 163) * 1024
