"""Tests of ``triton_kernels.info_nce``: the fused kernels against the dense reference.

The kernels run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set by the
conftest) with ``backend="triton"``, on small shapes that are not multiples of the tiles. They are
also compiled ahead of time for sm_90 / sm_80 without a GPU (see ``tests/test_topk_kernel.py``).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import triton_kernels
from triton_kernels import RowInfo, info_nce, info_nce_reference

# The package's `info_nce` attribute is the function: fetch the module itself.
info_nce_module = importlib.import_module("triton_kernels.info_nce")

interpreter = pytest.mark.skipif(
    not (triton_kernels.triton_available() and triton_kernels.runs_on("cpu")),
    reason="needs triton with its interpreter on (TRITON_INTERPRET=1)",
)

B, M, D, QUEUE = 20, 37, 24, 7  # none of them a multiple of the interpreter's 16-wide tiles
# (loss rtol, gradient atol, gradient rtol) per input dtype. fp16/bf16 products are exact in the
# fp32 accumulator, but the backward rounds d(loss)/d(logits) to the inputs' dtype for the matmul.
TOL = {
    torch.float32: (1e-5, 1e-4, 1e-4),
    torch.float16: (1e-4, 2e-3, 2e-2),
    torch.bfloat16: (1e-4, 1e-2, 5e-2),
}

TARGETS = {
    "diagonal": {},
    "temporal": dict(positive_radius=1),
    "masked": dict(positive_radius=1, mask_radius=3),
    "reward": dict(positive_radius=1, mask_radius=2, reward_weight=0.5, return_bandwidth=0.7),
    "reward_only": dict(positive_radius=0, mask_radius=4, reward_weight=1.0),
}


def _unit(rows: int, dim: int, dtype=torch.float32) -> torch.Tensor:
    x = torch.nn.functional.normalize(torch.randn(rows, dim), dim=1)
    return x.to(dtype).requires_grad_()


def _info(rows: int, episodes: int = 3) -> RowInfo:
    return RowInfo(
        episode=torch.randint(0, episodes, (rows,)),
        step=torch.randint(0, 12, (rows,)),
        ret=torch.rand(rows) * 3,
    )


def _kwargs(target: str, rows_q: int, rows_k: int) -> dict:
    kwargs = dict(TARGETS[target])
    if target != "diagonal":
        kwargs.update(q_info=_info(rows_q), k_info=_info(rows_k))
    return kwargs


def _compare(q, k, dtype, reduction="mean", **kwargs):
    """Loss and gradients of the fused kernels against the reference."""
    loss_rtol, grad_atol, grad_rtol = TOL[dtype]
    fused = info_nce(q, k, backend="triton", reduction=reduction, **kwargs)
    reference = info_nce_reference(q, k, reduction=reduction, **kwargs)
    torch.testing.assert_close(fused, reference, rtol=loss_rtol, atol=1e-6)
    upstream = torch.randn_like(reference)
    inputs = [t for t in (q, k) if t.requires_grad]
    grads = torch.autograd.grad(fused, inputs, upstream)
    ref_grads = torch.autograd.grad(reference, inputs, upstream)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == ref_grad.dtype and grad.shape == ref_grad.shape
        scale = ref_grad.float().abs().max().clamp_min(1.0)
        torch.testing.assert_close(
            grad.float(), ref_grad.float(), atol=grad_atol * scale, rtol=grad_rtol
        )
    return fused, grads


# --------------------------------------------------------------------------------------------------
# The kernels against the reference (interpreter)
# --------------------------------------------------------------------------------------------------
@interpreter
@pytest.mark.parametrize("rows_k", [B, M])
def test_matches_cross_entropy_without_row_data(rows_k):
    q, k = _unit(B, D), _unit(rows_k, D)
    loss = info_nce(q, k, temperature=0.1, reduction="none", backend="triton")
    expected = F.cross_entropy(q @ k.T / 0.1, torch.arange(B), reduction="none")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    _compare(q, k, torch.float32, reduction="none", temperature=0.1)


@interpreter
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("queue", [False, True], ids=["no-queue", "queue"])
def test_matches_reference(dtype, target, queue):
    q, k = _unit(B, D, dtype), _unit(M, D, dtype)
    extra = _unit(QUEUE, D, dtype).detach() if queue else None
    _compare(q, k, dtype, temperature=0.2, queue=extra, **_kwargs(target, B, M))


@interpreter
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions_and_rows_without_positives(reduction):
    q, k = _unit(B, D), _unit(M, D)
    q_info, k_info = _info(B, episodes=4), _info(M, episodes=2)  # episodes 2, 3: no positive
    fused, (grad_q, _) = _compare(
        q, k, torch.float32, reduction=reduction, q_info=q_info, k_info=k_info, positive_radius=2
    )
    lonely = q_info.episode >= 2
    assert bool(lonely.any())
    assert bool((grad_q[lonely] == 0).all())
    if reduction == "none":
        assert bool((fused[lonely] == 0).all())


@interpreter
def test_fully_masked_rows_have_zero_loss_and_finite_gradients():
    q, k = _unit(4, 8), _unit(6, 8)
    same = RowInfo(episode=torch.zeros(4, dtype=torch.int64), step=torch.arange(4) * 10)
    near = RowInfo(episode=torch.zeros(6, dtype=torch.int64), step=torch.arange(6) + 100)
    loss = info_nce(
        q,
        k,
        q_info=same,
        k_info=near,
        positive_radius=0,
        mask_radius=1000,
        reduction="none",
        backend="triton",
    )
    assert loss.tolist() == [0.0] * 4
    loss.sum().backward()
    assert bool(torch.isfinite(q.grad).all()) and bool((q.grad == 0).all())


@interpreter
def test_shared_tensor_frozen_keys_and_mixed_dtypes():
    x = _unit(B, D)
    _compare(x, x, torch.float32, temperature=0.3)  # q is k: both gradients add up
    q, k = _unit(B, D), _unit(M, D).detach()
    _compare(q, k, torch.float32)  # no dk kernel
    q16, k32 = _unit(B, D, torch.bfloat16), _unit(M, D)
    loss = info_nce(q16, k32, backend="triton")
    loss.backward()
    assert q16.grad.dtype == torch.bfloat16 and k32.grad.dtype == torch.float32
    torch.testing.assert_close(loss, info_nce_reference(q16, k32), rtol=1e-5, atol=1e-6)


@interpreter
def test_non_contiguous_inputs_and_int32_row_data():
    q = _unit(D, B).detach().T.requires_grad_()  # a transposed view
    k = _unit(2 * M, D).detach()[::2].requires_grad_()  # every other row
    info_q = RowInfo(_info(B).episode.int(), _info(B).step.int(), torch.rand(B).double())
    info_k = RowInfo(_info(M).episode.int(), _info(M).step.int(), torch.rand(M).double())
    _compare(
        q, k, torch.float32, q_info=info_q, k_info=info_k, positive_radius=1, reward_weight=0.3
    )


class _LargestNewTensor(TorchDispatchMode):
    """Records the largest tensor an op allocates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@interpreter
def test_memory_is_linear_in_rows():
    """No B x M intermediate in the forward or the backward (torch allocations)."""
    rows_q, rows_k, dim = 48, 64, 4
    q, k = _unit(rows_q, dim), _unit(rows_k, dim)
    kwargs = dict(
        q_info=_info(rows_q),
        k_info=_info(rows_k),
        positive_radius=1,
        mask_radius=2,
        reward_weight=0.5,
    )
    with _LargestNewTensor() as mode:
        info_nce(q, k, backend="triton", **kwargs).backward()
    assert mode.largest <= 4 * max(rows_q, rows_k, rows_k * dim)
    assert mode.largest < rows_q * rows_k
    with _LargestNewTensor() as mode:
        info_nce(q, k, backend="reference", **kwargs).backward()
    assert mode.largest >= rows_q * rows_k


# --------------------------------------------------------------------------------------------------
# Dispatch and bad input
# --------------------------------------------------------------------------------------------------
def test_auto_uses_the_reference_on_cpu():
    q = torch.randn(3, 4)
    assert info_nce_module._resolve_backend("auto", q) == "reference"
    assert info_nce_module._resolve_backend("reference", q) == "reference"


def _bad_inputs():
    q, k = torch.randn(3, 4), torch.randn(5, 4)
    nan = q.clone()
    nan[1, 1] = float("nan")
    return [
        ("temperature-zero", dict(temperature=0.0), ValueError, r"temperature must be a finite"),
        ("temperature-negative", dict(temperature=-1.0), ValueError, r"temperature must be"),
        ("nan-q", dict(q=nan), ValueError, r"q holds NaN or inf"),
        ("d-mismatch", dict(k=torch.randn(5, 3)), ValueError, r"k must have the queries' embed"),
        ("int-k", dict(k=torch.ones(5, 4, dtype=torch.int64)), TypeError, r"k must be float32"),
        ("devices", dict(k=k.to("meta")), ValueError, r"q and k must be on the same device"),
        ("backend", dict(backend="nope"), ValueError, r"backend must be one of"),
        ("few-keys", dict(k=torch.randn(2, 4)), ValueError, r"k needs at least B=3 rows"),
    ], dict(q=q, k=k)


_CASES, _GOOD = _bad_inputs()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(
    "overrides,error,match", [c[1:] for c in _CASES], ids=[c[0] for c in _CASES]
)
def test_bad_inputs(backend, overrides, error, match):
    with pytest.raises(error, match=match):
        info_nce(**{"backend": backend, **_GOOD, **overrides})


@interpreter
def test_triton_backend_limits(monkeypatch):
    with pytest.raises(ValueError, match=r"D must be at most 256"):
        info_nce(torch.randn(2, 300), torch.randn(2, 300), backend="triton")
    monkeypatch.setattr(triton_kernels._launch, "interpreted", lambda kernel: False)
    with pytest.raises(ValueError, match=r"needs CUDA tensors, got tensors on cpu"):
        info_nce(torch.randn(2, 4), torch.randn(2, 4), backend="triton")


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for the GPU, without a GPU
# --------------------------------------------------------------------------------------------------
def run_aot(*args: str) -> list[dict]:
    """``python -m triton_kernels.aot ...`` in a process without Triton's interpreter."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "triton_kernels.aot", "--op", "info_nce", *args],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.skipif(not triton_kernels.triton_available(), reason="needs triton")
def test_compiles_for_hopper_with_wgmma():
    reports = run_aot("--arch", "90", "--dtype", "bf16")
    assert [r["kernel"] for r in reports] == [
        "info_nce_fwd_kernel",
        "info_nce_bwd_dq_kernel",
        "info_nce_bwd_dk_kernel",
    ]
    for report in reports:
        assert report["instructions"]["wgmma"], report["kernel"]
        assert report["shared_bytes"] <= 227 * 1024


@pytest.mark.slow
@pytest.mark.skipif(not triton_kernels.triton_available(), reason="needs triton")
@pytest.mark.parametrize(
    "dtype,arch,dim,instruction",
    [("fp32", 90, 128, "wgmma"), ("fp16", 80, 128, "mma.sync"), ("bf16", 90, 256, "wgmma")],
)
def test_compiles_for_other_configurations(dtype, arch, dim, instruction):
    for report in run_aot("--arch", str(arch), "--dtype", dtype, "--dim", str(dim)):
        assert report["instructions"][instruction], report["kernel"]
        assert report["shared_bytes"] <= (227 if arch == 90 else 163) * 1024
