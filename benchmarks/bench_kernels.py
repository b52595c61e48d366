"""Microbenchmarks of the search and contrastive kernels: fused Triton vs PyTorch vs FAISS.

Three parts, each printed as a table and saved together as JSON:

1. **Top-k similarity** at ``Q in {16, 256, 1024}`` queries, ``N in {1e5, 1e6, 1e7}`` keys,
   ``D = 128``, ``k = 10``, bf16 and fp32 keys (rows are unit vectors). Columns:

   - ``triton``: the fused kernel :func:`triton_kernels.topk_similarity` (CUDA only);
   - ``mm+topk``: ``torch.mm`` + ``torch.topk`` over chunks of keys, merging the chunks' top-k (on
     a GPU: ``bf16``/``fp32`` cuBLAS products, as ``q @ keys.T`` would run);
   - ``torch``: the ``"torch"`` backend of ``torchrl_hippo.search`` (chunked products, then only
     the groups of 32 keys that beat the running k-th score are looked at);
   - ``auto``: ``torchrl_hippo.search.topk_similarity(backend="auto")``;
   - ``faiss``: exact inner-product search with faiss (``IndexFlatIP``'s search, on faiss-gpu for
     CUDA tensors when available).

   Each time comes with the effective bandwidth (bytes of keys read per second) and its share of
   the device's peak memory bandwidth: a table of datasheet figures by GPU name (H100 SXM
   3.35 TB/s, H200 4.8 TB/s, ...); on CPU the single-stream copy bandwidth measured at the start.
2. **InfoNCE forward + backward** at ``B = M in {1024, 4096, 16384}``, ``D = 128``: the fused
   kernels (``triton_kernels.info_nce(backend="triton")``, CUDA only) against
   ``F.cross_entropy(q @ k.T / tau, arange(B))``: time and peak memory
   (``torch.cuda.max_memory_allocated`` above the inputs). On CPU only the reference runs, and its
   memory is an estimate: three fp32 ``B x M`` matrices (logits, softmax, their gradient).
3. **Approximate search** (``torchrl_hippo.search.FaissKeyIndex``, faiss IVF on the CPU) at
   ``Q = 256``, ``N = 1e6``, ``D = 128``, ``k = 10``: build time (incremental writes of 64k rows,
   including the k-means training), search time against exact ``backend="auto"``, and recall@10
   against the exact answer, for several ``nprobe``. Keys are "episodic": 2,000 episodes of 500
   steps, each a random walk on the unit sphere (neighbouring windows of an episode are close);
   queries are perturbed stored keys. With ``--isotropic`` it also runs i.i.d. Gaussian keys,
   where no inverted-file index reaches a useful recall.

Times are the best of ``--repeats`` runs after a warm-up (a single run when one takes over 2 s on
CPU); the median is saved too. The script needs only torch, triton and optionally faiss: it imports
``triton_kernels`` and loads ``torchrl_hippo/search.py`` on its own (no torchrl needed).

Commands (from the repository root)::

    python benchmarks/bench_kernels.py                    # GPU box: everything, one command
    python benchmarks/bench_kernels.py --quick            # small sizes, a minute or two
    python benchmarks/bench_kernels.py --threads 1 --max-n 1000000   # CPU: skip N = 1e7

It writes ``benchmarks/results/bench_kernels_<device>.json`` (``<device>``: ``cpu-<n>core`` or
the GPU's name; ``--quick`` adds ``_quick``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton_kernels  # noqa: E402


def load_search():
    """``torchrl_hippo/search.py`` as a stand-alone module (its package imports torchrl)."""
    spec = importlib.util.spec_from_file_location(
        "hippo_search", ROOT / "torchrl_hippo" / "search.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


search = load_search()

# Datasheet peak memory bandwidth (bytes/s) by a fragment of the CUDA device name; the first match
# wins, so more specific names come first.
PEAK_BANDWIDTH = [
    ("B200", 8.0e12),
    ("GH200", 4.0e12),
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5, HBM3
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10", 0.6e12),
    ("RTX 4090", 1.008e12),
    ("V100", 0.9e12),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def device_tag(device: torch.device) -> tuple[str, str]:
    """``(human name, file-name tag)`` of the device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    cores = os.cpu_count() or 1
    return f"{platform.processor() or platform.machine()} ({cores} cores)", f"cpu-{cores}core"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> dict:
    """Best and median wall time of ``fn`` over ``repeats`` runs after a warm-up."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    times = [first] if device.type == "cpu" and first > 2.0 else []
    while len(times) < repeats and not (device.type == "cpu" and sum(times) > 20.0):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"time_s": min(times), "median_s": statistics.median(times), "runs": len(times)}


def peak_bandwidth(device: torch.device, threads: int) -> tuple[float, str]:
    """Peak memory bandwidth (bytes/s) and where the figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, value in PEAK_BANDWIDTH:
            if fragment in name:
                return value, f"datasheet ({fragment})"
        return float("nan"), "unknown device: add it to PEAK_BANDWIDTH"
    src = torch.ones(2**26)  # 256 MiB
    dst = torch.empty_like(src)
    best = measure(lambda: dst.copy_(src), device, 5)["time_s"]
    return 2 * src.numel() * 4 / best, f"measured copy bandwidth ({threads} thread(s))"


def unit_rows(rows: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.empty(rows, dim, dtype=dtype, device=device)
    for start in range(0, rows, 2**20):  # in blocks: N = 1e7 fp32 randn would double the memory
        stop = min(start + 2**20, rows)
        block = F.normalize(torch.randn(stop - start, dim, generator=g), dim=1)
        out[start:stop] = block.to(device, dtype)
    return out


def mm_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int):
    """``torch.mm`` + ``torch.topk`` per chunk of keys and a merge of the chunks' top-k."""
    q = queries.to(keys.dtype)
    best_scores = best_indices = None
    for start in range(0, keys.shape[0], chunk):
        scores, indices = torch.topk(q @ keys[start : start + chunk].T, k, dim=1)
        indices += start
        if best_scores is not None:
            scores = torch.cat((best_scores, scores), dim=1)
            indices = torch.cat((best_indices, indices), dim=1)
            scores, order = torch.topk(scores, k, dim=1)
            indices = indices.gather(1, order)
        best_scores, best_indices = scores, indices
    return best_scores, best_indices


def faiss_usable(device: torch.device) -> bool:
    if not search.faiss_available():
        return False
    if device.type == "cpu":
        return True
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:9.2f} ms" if seconds < 1 else f"{seconds:9.3f} s "


# --------------------------------------------------------------------------------------------------
# 1. Top-k similarity
# --------------------------------------------------------------------------------------------------
def bench_topk(args, device, bandwidth) -> list[dict]:
    rows = []
    fused = device.type == "cuda" and triton_kernels.runs_on(device)
    print(f"\n== Top-k similarity (k = {args.k}, D = {args.dim}) ==")
    header = f"{'dtype':5} {'N':>9} {'Q':>5} {'method':8} {'time':>12} {'GB/s':>8} {'% peak':>7}"
    print(header)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for num_keys in args.sizes:
            keys = unit_rows(num_keys, args.dim, dtype, device, seed=0)
            for num_queries in args.queries:
                queries = unit_rows(num_queries, args.dim, torch.float32, device, seed=1)
                # One [Q, chunk] score block of at most 2 GiB on a GPU, 16 MiB on a CPU.
                budget = 2**29 if device.type == "cuda" else 2**22
                chunk = max(args.k, min(num_keys, budget // num_queries))
                topk = functools.partial(search.topk_similarity, queries, keys, args.k)
                methods: dict[str, Callable[[], object] | None] = {
                    "triton": (
                        functools.partial(triton_kernels.topk_similarity, queries, keys, args.k)
                        if fused
                        else None
                    ),
                    "mm+topk": functools.partial(mm_topk, queries, keys, args.k, chunk),
                    "torch": functools.partial(topk, backend="torch"),
                    "auto": topk,
                    "faiss": functools.partial(topk, backend="faiss")
                    if faiss_usable(device)
                    else None,
                }
                if device.type == "cuda":
                    methods.pop("torch")  # its group selection is tuned for CPUs
                key_bytes = num_keys * args.dim * keys.element_size()
                row = {
                    "dtype": dtype_name,
                    "N": num_keys,
                    "Q": num_queries,
                    "k": args.k,
                    "D": args.dim,
                    "key_bytes": key_bytes,
                    "methods": {},
                }
                for name, fn in methods.items():
                    if fn is None:
                        row["methods"][name] = None
                        continue
                    result = measure(fn, device, args.repeats)
                    result["GB_per_s"] = key_bytes / result["time_s"] / 1e9
                    result["pct_peak_bandwidth"] = 100 * key_bytes / result["time_s"] / bandwidth
                    row["methods"][name] = result
                    print(
                        f"{dtype_name:5} {num_keys:9.0e} {num_queries:5d} {name:8} "
                        f"{fmt_time(result['time_s'])} {result['GB_per_s']:8.2f} "
                        f"{result['pct_peak_bandwidth']:6.1f}%",
                        flush=True,
                    )
                rows.append(row)
            del keys
    return rows


# --------------------------------------------------------------------------------------------------
# 2. InfoNCE
# --------------------------------------------------------------------------------------------------
def bench_info_nce(args, device) -> list[dict]:
    rows = []
    fused = device.type == "cuda" and triton_kernels.runs_on(device)
    print(f"\n== InfoNCE forward + backward (D = {args.dim}, M = B, tau = 0.07) ==")
    print(f"{'dtype':5} {'B':>6} {'method':10} {'time':>12} {'peak extra memory':>22}")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for batch in args.batches:
            q = unit_rows(batch, args.dim, dtype, device, seed=2).requires_grad_()
            k = unit_rows(batch, args.dim, dtype, device, seed=3).requires_grad_()
            reference = functools.partial(_reference_info_nce, q, k)
            kernel = functools.partial(_fused_info_nce, q, k)

            row = {"dtype": dtype_name, "B": batch, "M": batch, "D": args.dim, "methods": {}}
            for name, fn in (("fused", kernel if fused else None), ("reference", reference)):
                if fn is None:
                    row["methods"][name] = None
                    continue
                result = measure(fn, device, args.repeats)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    fn()
                    synchronize(device)
                    result["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base
                    result["memory_note"] = "torch.cuda.max_memory_allocated above the inputs"
                elif name == "reference":
                    result["peak_extra_bytes"] = 3 * batch * batch * 4
                    result["memory_note"] = "estimate: logits, softmax and gradient, fp32 B x M"
                q.grad = k.grad = None
                row["methods"][name] = result
                memory = result.get("peak_extra_bytes")
                shown = "-" if memory is None else f"{memory / 2**20:12.1f} MiB"
                if device.type == "cpu":
                    shown += " (estimate)"
                print(
                    f"{dtype_name:5} {batch:6d} {name:10} {fmt_time(result['time_s'])} {shown:>22}",
                    flush=True,
                )
            if row["methods"]["fused"] and row["methods"]["reference"]:
                fused_r, ref_r = row["methods"]["fused"], row["methods"]["reference"]
                row["speedup"] = ref_r["time_s"] / fused_r["time_s"]
                row["memory_ratio"] = ref_r["peak_extra_bytes"] / max(
                    fused_r["peak_extra_bytes"], 1
                )
            rows.append(row)
            del q, k
    return rows


def _reference_info_nce(q: torch.Tensor, k: torch.Tensor) -> None:
    target = torch.arange(q.shape[0], device=q.device)
    F.cross_entropy((q @ k.T).float() / 0.07, target).backward()


def _fused_info_nce(q: torch.Tensor, k: torch.Tensor) -> None:
    triton_kernels.info_nce(q, k, temperature=0.07, backend="triton").backward()


# --------------------------------------------------------------------------------------------------
# 3. Approximate search
# --------------------------------------------------------------------------------------------------
def episodic_keys(num_keys: int, dim: int, length: int = 500, step: float = 0.15, seed: int = 4):
    """Random walks on the unit sphere: ``num_keys // length`` episodes of ``length`` steps."""
    g = torch.Generator().manual_seed(seed)
    episodes = num_keys // length
    x = F.normalize(torch.randn(episodes, dim, generator=g), dim=1)
    out = torch.empty(episodes, length, dim)
    for t in range(length):
        out[:, t] = x
        x = F.normalize(x + step * torch.randn(episodes, dim, generator=g) / math.sqrt(dim), dim=1)
    return out.reshape(-1, dim)


def bench_approx(args) -> list[dict]:
    if not search.faiss_available():
        print("\n== Approximate search: skipped (faiss is not installed) ==")
        return []
    device = torch.device("cpu")
    print(f"\n== Approximate search (FaissKeyIndex, Q = 256, N = {args.approx_n:.0e}, k = 10) ==")
    print(f"{'keys':10} {'nprobe':>6} {'time':>12} {'speed-up':>9} {'recall@10':>10}")
    kinds = ["episodic", "isotropic"] if args.isotropic else ["episodic"]
    rows = []
    for kind in kinds:
        if kind == "episodic":
            keys = episodic_keys(args.approx_n, args.dim)
        else:
            keys = unit_rows(args.approx_n, args.dim, torch.float32, device, seed=5)
        g = torch.Generator().manual_seed(6)
        picked = keys[torch.randint(keys.shape[0], (256,), generator=g)]
        noise = 0.3 * torch.randn(256, args.dim, generator=g) / math.sqrt(args.dim)
        queries = F.normalize(picked + noise, dim=1)
        exact_search = functools.partial(search.topk_similarity, queries, keys, 10)
        exact = measure(exact_search, device, args.repeats)
        _, exact_indices = search.topk_similarity(queries, keys, 10)

        start = time.perf_counter()
        index = search.FaissKeyIndex(args.dim, keys.shape[0])
        for begin in range(0, keys.shape[0], 65536):
            rows_written = torch.arange(begin, min(begin + 65536, keys.shape[0]))
            index.update(rows_written, keys[rows_written])
        build_s = time.perf_counter() - start
        row = {
            "keys": kind,
            "N": keys.shape[0],
            "Q": 256,
            "k": 10,
            "D": args.dim,
            "nlist": index.nlist,
            "default_nprobe": index.nprobe,
            "build_s": build_s,
            "exact_auto": exact,
            "approx": [],
        }
        print(
            f"{kind:10} {'exact':>6} {fmt_time(exact['time_s'])} {1.0:9.1f} {1.0:10.3f}"
            f"   (index built in {build_s:.1f} s, nlist {index.nlist})"
        )
        for nprobe in sorted({index.nprobe // 2, index.nprobe, 2 * index.nprobe, 4 * index.nprobe}):
            approx_search = functools.partial(index.search, queries, 10, nprobe=nprobe)
            result = measure(approx_search, device, args.repeats)
            _, indices = index.search(queries, 10, nprobe=nprobe)
            hits = sum(
                len(set(a) & set(b)) for a, b in zip(indices.tolist(), exact_indices.tolist())
            )
            result.update(
                nprobe=nprobe,
                recall_at_10=hits / exact_indices.numel(),
                speedup_vs_exact=exact["time_s"] / result["time_s"],
            )
            row["approx"].append(result)
            print(
                f"{kind:10} {nprobe:6d} {fmt_time(result['time_s'])} "
                f"{result['speedup_vs_exact']:9.1f} {result['recall_at_10']:10.3f}",
                flush=True,
            )
        rows.append(row)
        del index, keys
    return rows


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (a minute or two)")
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss CPU threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell")
    parser.add_argument("--max-n", type=float, default=None, help="skip top-k sizes N above this")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument(
        "--isotropic",
        action="store_true",
        help="also measure approximate search on i.i.d. Gaussian keys",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["topk", "info_nce", "approx"])
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.sizes, args.batches, args.approx_n = [16, 256], [10**5], [1024], 200_000
    else:
        args.queries, args.sizes = [16, 256, 1024], [10**5, 10**6, 10**7]
        args.batches, args.approx_n = [1024, 4096, 16384], 10**6
    if args.max_n is not None:
        args.sizes = [n for n in args.sizes if n <= args.max_n]
    if args.repeats is None:
        args.repeats = 10 if args.device.startswith("cuda") else 3
    args.dtypes = list(DTYPES)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
        if search.faiss_available():
            import faiss

            faiss.omp_set_num_threads(args.threads)
    name, tag = device_tag(device)
    bandwidth, bandwidth_source = peak_bandwidth(device, torch.get_num_threads())
    print(
        f"device: {name}; peak bandwidth {bandwidth / 1e9:.1f} GB/s ({bandwidth_source}); "
        f"torch threads {torch.get_num_threads()}; triton kernels: "
        f"{'yes' if device.type == 'cuda' and triton_kernels.runs_on(device) else 'no (CPU)'}; "
        f"faiss: {'yes' if faiss_usable(device) else 'no'}"
    )
    results = {
        "benchmark": "bench_kernels",
        "device": name,
        "device_tag": tag,
        "peak_bandwidth_bytes_per_s": bandwidth,
        "peak_bandwidth_source": bandwidth_source,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "torch": torch.__version__,
            "triton": _version("triton"),
            "faiss": _version("faiss"),
            "python": platform.python_version(),
        },
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "args": {key: value for key, value in vars(args).items() if key != "out"},
        "timing": "time_s: best of the timed runs after a warm-up; median_s: their median",
    }
    if "topk" not in args.skip:
        results["topk"] = bench_topk(args, device, bandwidth)
    if "info_nce" not in args.skip:
        results["info_nce"] = bench_info_nce(args, device)
    if "approx" not in args.skip:
        results["approx"] = bench_approx(args)
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"bench_kernels_{tag}{'_quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return results


def _version(package: str) -> str | None:
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
