"""Ahead-of-time compilation of the kernels for a GPU architecture, without a GPU.

Triton's interpreter accepts code that the real compiler rejects, so the tests also compile every
kernel for Hopper (sm_90) and Ampere (sm_80) on a CPU-only machine, with the block sizes the
launchers would pick, and look at the PTX: bf16 products must use Hopper's ``wgmma`` tensor-core
instructions. From the command line (in a process without ``TRITON_INTERPRET=1``: Triton builds its
own library functions for the interpreter when that is set at import)::

    python -m triton_kernels.aot --arch 90 --dtype bf16          # every kernel, a JSON report
    python -m triton_kernels.aot --arch 80 --dtype fp16 --k 256  # the top-k kernel at k = 256

Examples:
    >>> import torch
    >>> from triton_kernels.aot import info_nce_specs, topk_spec
    >>> spec = topk_spec(torch.bfloat16, k=10, dim=128)
    >>> spec.kernel, spec.constexprs["K_PAD"], spec.signature["k_ptr"]
    ('topk_kernel', 16, '*bf16')
    >>> sorted(spec.kernel for spec in info_nce_specs(torch.float32, dim=64))
    ['info_nce_bwd_dk_kernel', 'info_nce_bwd_dq_kernel', 'info_nce_fwd_kernel']
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import NamedTuple

import torch

from triton_kernels import topk as topk_module

# The package's `info_nce` attribute is the function: fetch the module itself.
info_nce_module = importlib.import_module("triton_kernels.info_nce")

__all__ = ["KernelSpec", "compile_spec", "info_nce_specs", "main", "topk_spec"]

_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DTYPES = {name: dtype for dtype, name in _TYPE_NAMES.items()}
# Tensor-core instructions looked for in the PTX.
_INSTRUCTIONS = ("wgmma", "mma.sync")


class KernelSpec(NamedTuple):
    """One kernel specialisation: the module, the kernel, argument types, constexprs, options."""

    module: str
    kernel: str
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int


def topk_spec(
    dtype: torch.dtype,
    *,
    k: int,
    dim: int,
    num_queries: int = 256,
    num_keys: int = 1_000_000,
    has_valid: bool = True,
) -> KernelSpec:
    """The top-k kernel as :func:`triton_kernels.topk_similarity` would launch it on a GPU."""
    cfg = topk_module._config(num_queries, num_keys, k, dim, dtype, torch.device("cpu"), None)
    pointer = f"*{_TYPE_NAMES[dtype]}"
    signature = {
        "q_ptr": pointer,
        "k_ptr": pointer,
        "valid_ptr": "*u8",
        "out_ptr": "*i64",
        **dict.fromkeys(
            ("num_queries", "num_keys", "dim", "keys_per_split", "stride_q", "stride_k"), "i32"
        ),
    }
    constexprs = {
        "K": k,
        "K_PAD": cfg.k_pad,
        "BLOCK_Q": cfg.block_q,
        "BLOCK_N": cfg.block_n,
        "BLOCK_D": cfg.block_d,
        "SINGLE_D": dim <= cfg.block_d,
        "HAS_VALID": has_valid,
        "EXTRACT_LIMIT": 4,
        "DOT_PRECISION": "tf32x3" if dtype == torch.float32 else "tf32",
        "DOT_UPCAST": False,
    }
    return KernelSpec(
        "_topk_kernel", "topk_kernel", signature, constexprs, cfg.num_warps, cfg.num_stages
    )


def info_nce_specs(
    dtype: torch.dtype, *, dim: int, has_info: bool = True, has_ret: bool = True
) -> list[KernelSpec]:
    """The forward, dq and dk kernels as :func:`triton_kernels.info_nce` would launch them."""
    block_b, block_m, block_d, num_warps, num_stages = info_nce_module._block_sizes(
        dim, dtype, False
    )
    pointer = f"*{_TYPE_NAMES[dtype]}"
    info = {
        "q_ep_ptr": "*i64",
        "q_step_ptr": "*i64",
        "q_ret_ptr": "*fp32",
        "k_ep_ptr": "*i64",
        "k_step_ptr": "*i64",
        "k_ret_ptr": "*fp32",
    }
    rows = dict.fromkeys(("lse_ptr", "coef_t_ptr", "coef_r_ptr"), "*fp32")
    sizes = dict.fromkeys(("num_q", "num_k", "dim", "stride_q", "stride_k"), "i32")
    radii = {"positive_radius": "i32", "mask_radius": "i32", "inv_bandwidth": "fp32"}
    queue = {"queue_ptr": pointer, "num_queue": "i32", "stride_queue": "i32"}
    constexprs = {
        "HAS_INFO": has_info,
        "HAS_RET": has_ret,
        "BLOCK_B": block_b,
        "BLOCK_M": block_m,
        "BLOCK_D": block_d,
        "DOT_PRECISION": "tf32x3" if dtype == torch.float32 else "tf32",
        "DOT_UPCAST": False,
    }
    with_queue = {**constexprs, "HAS_QUEUE": True}
    forward = {
        "q_ptr": pointer,
        "k_ptr": pointer,
        **queue,
        **info,
        **rows,
        "loss_ptr": "*fp32",
        **sizes,
        "scale": "fp32",
        "reward_weight": "fp32",
        **radii,
    }
    grad_q = {
        "q_ptr": pointer,
        "k_ptr": pointer,
        **queue,
        **info,
        **rows,
        "grad_ptr": "*fp32",
        "dq_ptr": pointer,
        **sizes,
        "stride_dq": "i32",
        "scale": "fp32",
        **radii,
    }
    grad_k = {
        "q_ptr": pointer,
        "k_ptr": pointer,
        **info,
        **rows,
        "grad_ptr": "*fp32",
        "dk_ptr": pointer,
        **sizes,
        "stride_dk": "i32",
        "scale": "fp32",
        **radii,
    }
    module = "_info_nce_kernel"
    return [
        KernelSpec(module, "info_nce_fwd_kernel", forward, with_queue, num_warps, num_stages),
        KernelSpec(module, "info_nce_bwd_dq_kernel", grad_q, with_queue, num_warps, num_stages),
        KernelSpec(module, "info_nce_bwd_dk_kernel", grad_k, constexprs, num_warps, num_stages),
    ]


def compile_spec(spec: KernelSpec, arch: int) -> dict:
    """Compiles one specialisation for ``sm_<arch>``; returns its PTX and a short report.

    Raises:
        RuntimeError: under ``TRITON_INTERPRET=1``, where Triton's own library functions were
            built for the interpreter and cannot be compiled.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.knobs.runtime.interpret:
        raise RuntimeError(
            "ahead-of-time compilation needs a process without TRITON_INTERPRET=1 (Triton's "
            "library functions were built for the interpreter); run `python -m triton_kernels.aot`."
        )
    fn = getattr(importlib.import_module(f"triton_kernels.{spec.module}"), spec.kernel)
    missing = set(fn.arg_names) ^ (set(spec.signature) | set(spec.constexprs))
    if missing:
        raise ValueError(
            f"the spec of {spec.kernel} disagrees with the kernel on {sorted(missing)}."
        )
    signature = {**spec.signature, **dict.fromkeys(spec.constexprs, "constexpr")}
    source = ASTSource(fn=fn, signature=signature, constexprs=spec.constexprs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    return {
        "kernel": spec.kernel,
        "arch": arch,
        "constexprs": spec.constexprs,
        "num_warps": spec.num_warps,
        "shared_bytes": compiled.metadata.shared,
        "instructions": {name: name in ptx for name in _INSTRUCTIONS},
        "ptx": ptx,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line: compile the kernels for one architecture and print a JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 or 80")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--op", choices=("all", "topk", "info_nce"), default="all")
    parser.add_argument("--k", type=int, default=10, help="k of the top-k kernel")
    parser.add_argument("--dim", type=int, default=128, help="embedding size D")
    args = parser.parse_args(argv)
    dtype = _DTYPES[args.dtype]
    specs = []
    if args.op in ("all", "topk"):
        specs.append(topk_spec(dtype, k=args.k, dim=args.dim))
    if args.op in ("all", "info_nce"):
        specs.extend(info_nce_specs(dtype, dim=args.dim))
    reports = []
    for spec in specs:
        report = compile_spec(spec, args.arch)
        report.pop("ptx")
        reports.append(report)
    print(json.dumps(reports, indent=1))
    return reports


if __name__ == "__main__":  # pragma: no cover - command line
    main()
