"""Throughput of the episodic memory's sampler and writer, side by side with TorchRL's own parts.

One run builds the same data twice, once into the memory and once into a plain TorchRL buffer:

- ``TensorDictReplayBuffer(storage=HippoStorage(N), writer=HippoWriter(encoder),
  sampler=HippoSampler(mixture_ratio=0.3, top_k=5))`` with
  ``DualEncoder(observation_dim=64, action_dim=4, embed_dim=128, window=8)``;
- ``TensorDictReplayBuffer(storage=LazyTensorStorage(N), sampler=RandomSampler(),
  writer=TensorDictRoundRobinWriter())`` with the very same TensorDicts (no ``"hippo"`` keys).

The data is one flat collector stream (64-dim observations, 4-dim float actions, scalar rewards,
``("next", "done")`` every ~200 steps, episodes running across ``extend`` calls), written in
chunks of ``--chunk`` rows. Then it measures (``time.perf_counter``, warm-up calls first, the
median of ``--repeats`` repeats; PASS/FAIL against the targets):

1. **Sampling with a cached pool**: ``rb.sample()`` (index + gather + info) and the bare
   ``sampler.sample(storage, B)`` of both buffers, with no write in between. Target: full
   ``rb.sample`` throughput hippo / random >= 0.5.
2. **One retrieval refresh with 16 new queries**: ``sampler.set_query(q16)`` plus the first
   ``sampler.sample(storage, B)`` (which rebuilds the pool), against the bare search
   ``torchrl_hippo.search.topk_similarity(q16, storage.keys, 5)`` on the same keys and queries.
   Target: refresh / bare <= 1.2. The cached sample time is shown for the decomposition.
3. **Realistic loop**: ``rb.sample()`` with 16 new random queries every 100 calls
   (``--loop-calls`` calls in all), and the same loop on the random buffer.
4. **Writer throughput** into a full (wrapped) memory, ``rb.extend`` of ``--write-batch``-row
   collector batches: (a) ``HippoWriter`` with its real encoder, (b)
   ``HippoWriter(encoder, defer_keys=True)`` (rows written without their keys, which
   ``storage.encode_pending()`` computes later in bulk: only the writer's own bookkeeping is
   measured), TorchRL's ``TensorDictRoundRobinWriter`` on ``LazyTensorStorage``, and the encoder's own
   forward (``encoder.encode(..., target=True)`` under ``no_grad`` on the batch's
   ``[B, 8, ...]`` windows). (b) runs the writer's default ``backend="auto"``: its bookkeeping
   is one compiled call where numba is installed (``pip install ".[fast]"``), and (c) is the
   same writer with ``backend="torch"`` (tensor ops), in its own memory, for comparison.
   Targets: (b) / round-robin throughput >= 0.5, and
   ``t_row(a) / (t_row(encoder forward) + t_row(round-robin))`` <= 1.5.
5. **Flatness**: 1 (``sampler.sample`` only) and 4(b) again at 10k, 100k and ``--size``
   transitions (``--quick``: 10k and 50k), to show these costs do not grow with the memory.
6. **Collector batch size**: 4(b) and round-robin again, in the same full memories, with
   ``--write-batches`` rows per ``extend`` (256, 1000 and 4096; about 20k rows per timed block),
   to show which part of the writer's cost is per call and which per row.

It prints a table and writes ``benchmarks/results/bench_sampler_<device-name>.json`` (device
name ``cpu-<n>core`` or the CUDA device's name; ``--quick`` adds ``_quick``) with the measured
numbers, the targets and their PASS/FAIL, and the run's metadata (versions, threads, sizes,
date, load average, peak RSS, hashes of the package's sources). It exits 0 whether the targets
pass or not.

Commands (from the repository root)::

    python3 benchmarks/bench_sampler.py --quick             # smoke run, ~1 minute, 50k rows
    python3 benchmarks/bench_sampler.py --threads 2         # the full run: 1M transitions
    python3 benchmarks/bench_sampler.py --device cuda       # the same on a GPU

On a small machine shared with other processes these sub-millisecond timings vary by 10-20%
from run to run: every figure is the median of ``--repeats`` interleaved blocks (15 by
default), and ``--threads 1`` gives steadier numbers still.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tensordict
import torch
import torchrl
from tensordict import TensorDict
from torchrl.data import (
    LazyTensorStorage,
    RandomSampler,
    TensorDictReplayBuffer,
    TensorDictRoundRobinWriter,
)

from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
from torchrl_hippo.data import fifo_numba
from torchrl_hippo.search import topk_similarity

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Targets: (name, measured key in the results, comparison, threshold).
TARGETS = {
    "sample_ratio": (">=", 0.5),
    "refresh_ratio": ("<=", 1.2),
    "writer_noencode_ratio": (">=", 0.5),
    "writer_encode_overhead": ("<=", 1.5),
}


# ----------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------
def _make_encoder(args) -> DualEncoder:
    encoder = DualEncoder(
        observation_dim=args.obs_dim,
        action_dim=args.action_dim,
        embed_dim=args.embed_dim,
        window=args.window,
    )
    return encoder.to(args.device)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
class _Stream:
    """A deterministic flat collector stream: episodes of ~``episode_len`` steps, done flags.

    Observations sit around a per-episode centre and rewards around a per-episode mean, so
    that keys and returns have some structure. Episodes run on across ``next`` calls.
    """

    def __init__(self, args, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.obs_dim = args.obs_dim
        self.action_dim = args.action_dim
        self.episode_len = args.episode_len
        self.device = torch.device(args.device)
        self._left = 0  # steps left in the running episode
        self._centre = torch.zeros(self.obs_dim)
        self._reward_mean = 0.0

    def _new_episode(self) -> None:
        lo = max(1, int(0.75 * self.episode_len))
        hi = max(lo + 1, int(1.25 * self.episode_len) + 1)
        self._left = int(torch.randint(lo, hi, (1,), generator=self.gen))
        self._centre = 0.5 * torch.randn(self.obs_dim, generator=self.gen)
        self._reward_mean = float(torch.randn((), generator=self.gen))

    def next(self, n: int) -> TensorDict:
        done = torch.zeros(n, 1, dtype=torch.bool)
        centre = torch.empty(n, self.obs_dim)
        reward_mean = torch.empty(n, 1)
        pos = 0
        while pos < n:
            if self._left == 0:
                self._new_episode()
            take = min(self._left, n - pos)
            centre[pos : pos + take] = self._centre
            reward_mean[pos : pos + take] = self._reward_mean
            self._left -= take
            pos += take
            if self._left == 0:
                done[pos - 1] = True
        g = self.gen
        td = TensorDict(
            {
                "observation": centre + torch.randn(n, self.obs_dim, generator=g),
                "action": torch.randn(n, self.action_dim, generator=g).clamp_(-1, 1),
                "next": {
                    "reward": reward_mean + 0.1 * torch.randn(n, 1, generator=g),
                    "done": done,
                },
            },
            batch_size=[n],
        )
        return td.to(self.device)


def _hippo_buffer(
    args, size: int, encoder: DualEncoder, *, defer_keys: bool = False, backend: str = "auto"
) -> TensorDictReplayBuffer:
    return TensorDictReplayBuffer(
        storage=HippoStorage(size, device=args.device),
        writer=HippoWriter(encoder, defer_keys=defer_keys, backend=backend),
        sampler=HippoSampler(mixture_ratio=args.mixture_ratio, top_k=args.top_k),
        batch_size=args.batch,
    )


def _random_buffer(args, size: int) -> TensorDictReplayBuffer:
    return TensorDictReplayBuffer(
        storage=LazyTensorStorage(size, device=args.device),
        sampler=RandomSampler(),
        writer=TensorDictRoundRobinWriter(),
        batch_size=args.batch,
    )


def _fill(buffers: list[TensorDictReplayBuffer], stream: _Stream, size: int, chunk: int) -> float:
    """Extends every buffer with the same ``size`` rows, ``chunk`` at a time. Returns seconds."""
    start = time.perf_counter()
    written = 0
    while written < size:
        n = min(chunk, size - written)
        td = stream.next(n)
        for rb in buffers:
            # A shallow copy each: ``extend`` writes "index" into the TensorDict it is given.
            rb.extend(td.copy())
        written += n
    _sync()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
# Every comparison is timed *interleaved*: repeat r times block r of each contender in turn
# (the order rotating), so that a load that drifts during the run (other processes on a shared
# machine) hits both sides of a ratio alike. A block is a callable ``block(r) -> seconds per
# call`` that does its own preparation outside its timed region.
def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _summary(per_call: list[float]) -> dict:
    return {
        "median_s": statistics.median(per_call),
        "min_s": min(per_call),
        "max_s": max(per_call),
        "repeats_s": per_call,
    }


def _interleave(blocks: dict[str, Callable[[int], float]], repeats: int) -> dict[str, dict]:
    names = list(blocks)
    per_call: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            per_call[name].append(blocks[name](r))
    return {name: _summary(v) for name, v in per_call.items()}


def _calls_block(fn: Callable[[], object], calls: int, warmup: int) -> Callable[[int], float]:
    """A block of ``calls`` calls of ``fn``; ``warmup`` calls are made once, right away."""
    for _ in range(warmup):
        fn()
    _sync()

    def block(r: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync()
        return (time.perf_counter() - start) / calls

    return block


def _extend_block(
    rb: TensorDictReplayBuffer, batches: list[list[TensorDict]], warmup: int, last: dict
) -> Callable[[int], float]:
    """Block ``r`` extends ``rb`` with ``batches[r + 1]``; ``batches[0]`` is the warm-up.

    Each call gets its own shallow copy (``extend`` writes ``"index"`` into its input), made
    outside the timed region. ``last["index"]`` keeps the index returned by the last call.
    """
    for td in batches[0][:warmup]:
        rb.extend(td.copy())
    _sync()

    def block(r: int) -> float:
        copies = [td.copy() for td in batches[r + 1]]
        start = time.perf_counter()
        for td in copies:
            index = rb.extend(td)
        _sync()
        elapsed = (time.perf_counter() - start) / len(copies)
        last["index"] = index
        return elapsed

    return block


def _random_queries(n: int, dim: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1).to(device)


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
def _sampler_blocks(args, hippo, rand) -> dict[str, Callable[[int], float]]:
    b = args.batch
    return {
        name: _calls_block(
            lambda rb=rb: rb.sampler.sample(rb.storage, b), args.sample_calls, args.warmup
        )
        for name, rb in (("hippo", hippo), ("random", rand))
    }


def measure_sampling(args, hippo: TensorDictReplayBuffer, rand: TensorDictReplayBuffer) -> dict:
    """1. Cached-pool sampling: full ``rb.sample()`` and bare ``sampler.sample`` of both."""
    b = args.batch
    hippo.sample()  # builds the retrieval pool (default anchors) after the writes
    blocks = {
        "hippo_rb_sample": _calls_block(hippo.sample, args.sample_calls, args.warmup),
        "random_rb_sample": _calls_block(rand.sample, args.sample_calls, args.warmup),
    }
    sampler_blocks = _sampler_blocks(args, hippo, rand)
    blocks["hippo_sampler_sample"] = sampler_blocks["hippo"]
    blocks["random_sampler_sample"] = sampler_blocks["random"]
    out = _interleave(blocks, args.repeats)
    for kind in ("rb_sample", "sampler_sample"):
        for name in ("hippo", "random"):
            out[f"{name}_{kind}"]["samples_per_s"] = b / out[f"{name}_{kind}"]["median_s"]
        out[f"{kind}_ratio"] = (
            out[f"hippo_{kind}"]["samples_per_s"] / out[f"random_{kind}"]["samples_per_s"]
        )
    return out


def measure_sampler_only(args, hippo: TensorDictReplayBuffer, rand: TensorDictReplayBuffer) -> dict:
    """The bare ``sampler.sample`` of both buffers (for the flatness sweep)."""
    hippo.sample()
    out = _interleave(_sampler_blocks(args, hippo, rand), args.repeats)
    for name in ("hippo", "random"):
        out[name]["samples_per_s"] = args.batch / out[name]["median_s"]
    out["ratio"] = out["hippo"]["samples_per_s"] / out["random"]["samples_per_s"]
    return out


def measure_refresh(args, hippo: TensorDictReplayBuffer) -> dict:
    """2. ``set_query(q16)`` + first ``sampler.sample`` against the bare top-k search.

    Each repeat draws 16 new random queries and times, in turn (the order alternating), the
    refresh, the bare search on the same queries, and one more ``sampler.sample`` (the cached
    sample, for the decomposition ``refresh = search + sample + pool overhead``).
    """
    sampler, storage = hippo.sampler, hippo.storage
    gen = torch.Generator().manual_seed(args.seed + 2)
    times: dict[str, list[float]] = {"refresh": [], "bare_search": [], "sample_only": []}
    for i in range(args.warmup_refresh + args.refresh_repeats):
        q = _random_queries(args.queries, args.embed_dim, gen, args.device)
        _sync()
        for which in ("refresh", "bare_search") if i % 2 == 0 else ("bare_search", "refresh"):
            start = time.perf_counter()
            if which == "refresh":
                sampler.set_query(q)
                sampler.sample(storage, args.batch)
            else:
                topk_similarity(q, storage.keys, args.top_k)
            _sync()
            elapsed = time.perf_counter() - start
            if i >= args.warmup_refresh:
                times[which].append(elapsed)
        start = time.perf_counter()
        sampler.sample(storage, args.batch)  # the pool for q is built: a cached sample
        _sync()
        if i >= args.warmup_refresh:
            times["sample_only"].append(time.perf_counter() - start)
    out = {name: _summary(v) for name, v in times.items()}
    r, s, c = (out[k]["median_s"] for k in ("refresh", "bare_search", "sample_only"))
    out["overhead_s"] = r - s - c  # what the pool build adds beyond search + cached sample
    out["refresh_ratio"] = r / s
    sampler.set_query(None)
    return out


def measure_loop(args, hippo: TensorDictReplayBuffer, rand: TensorDictReplayBuffer) -> dict:
    """3. ``rb.sample()`` with 16 new queries every ``--refresh-every`` calls."""
    gen = torch.Generator().manual_seed(args.seed + 3)
    calls, every = args.loop_calls, args.refresh_every
    queries = [
        _random_queries(args.queries, args.embed_dim, gen, args.device)
        for _ in range(math.ceil(calls / every) * args.loop_repeats)
    ]
    q_iter = iter(queries)

    def hippo_loop() -> None:
        for i in range(calls):
            if i % every == 0:
                hippo.sampler.set_query(next(q_iter))
            hippo.sample()

    def random_loop() -> None:
        for _ in range(calls):
            rand.sample()

    # No warm-up loop: measurements 1 and 2 have warmed both buffers up already.
    out = _interleave(
        {"hippo": _calls_block(hippo_loop, 1, 0), "random": _calls_block(random_loop, 1, 0)},
        args.loop_repeats,
    )
    for name in ("hippo", "random"):
        out[name]["samples_per_s"] = calls * args.batch / out[name]["median_s"]
    out["ratio"] = out["hippo"]["samples_per_s"] / out["random"]["samples_per_s"]
    out["calls"] = calls
    out["refresh_every"] = every
    hippo.sampler.set_query(None)
    return out


def _write_batches(args, stream: _Stream) -> list[list[TensorDict]]:
    """``repeats + 1`` blocks of ``write_calls`` collector batches (the first for the warm-up)."""
    return [
        [stream.next(args.write_batch) for _ in range(args.write_calls)]
        for _ in range(args.repeats + 1)
    ]


def _skip(stream: _Stream, size: int, chunk: int) -> None:
    """Advances ``stream`` past the ``size`` rows a fill of ``chunk`` rows at a time draws."""
    done = 0
    while done < size:
        n = min(chunk, size - done)
        stream.next(n)
        done += n


def measure_writers(
    args, size: int, buffers: dict[str, TensorDictReplayBuffer], encoder: DualEncoder | None
) -> dict:
    """4. ``rb.extend`` of collector batches into full memories, interleaved.

    ``buffers`` are full memories of ``size`` rows filled from the stream of seed ``args.seed``;
    the timed batches continue that stream. With ``encoder``, the encoder's own forward on the
    windows of the hippo buffer's last written batch is timed as well (block ``"encoder"``).
    """
    stream = _Stream(args, args.seed)
    _skip(stream, size, args.chunk)
    batches = _write_batches(args, stream)
    last: dict[str, dict] = {name: {} for name in buffers}
    blocks = {
        name: _extend_block(rb, batches, args.warmup, last[name]) for name, rb in buffers.items()
    }
    if encoder is not None:
        # Windows of a batch just written, gathered from the storage: [B, window, ...].
        index = buffers["hippo_encode"].extend(batches[0][-1].copy()).reshape(-1)
        win = buffers["hippo_encode"].storage.gather_windows(index, args.window)
        obs, act = win["observation"], win["action"]
        rew, mask = win["next", "reward"], win["hippo", "window_mask"]

        def forward() -> None:
            with torch.no_grad():
                encoder.encode(obs, act, rew, mask, target=True)

        blocks["encoder_forward"] = _calls_block(forward, args.write_calls, args.warmup)
    out = _interleave(blocks, args.repeats)
    for v in out.values():
        v["rows_per_s"] = args.write_batch / v["median_s"]
        v["s_per_row"] = v["median_s"] / args.write_batch
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _check(name: str, value: float) -> dict:
    op, threshold = TARGETS[name]
    ok = value >= threshold if op == ">=" else value <= threshold
    return {"value": value, "target": f"{op} {threshold}", "pass": bool(ok)}


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def _print_table(rows: list[tuple[str, str, str, str, str, str]]) -> None:
    header = ("measurement", "hippo", "reference", "ratio", "target", "result")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def _device_name(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _source_hashes() -> dict[str, str]:
    """sha256 (first 12 hex digits) of the package's sources, to tell which code was measured."""
    import torchrl_hippo

    root = Path(torchrl_hippo.__file__).resolve().parent
    return {
        str(f.relative_to(root.parent)): hashlib.sha256(f.read_bytes()).hexdigest()[:12]
        for f in sorted(root.rglob("*.py"))
    }


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1_000_000, help="transitions in the memory")
    p.add_argument("--obs-dim", type=int, default=64)
    p.add_argument("--action-dim", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--batch", type=int, default=256, help="sample batch size")
    p.add_argument("--mixture-ratio", type=float, default=0.3)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--queries", type=int, default=16, help="queries per refresh")
    p.add_argument("--episode-len", type=int, default=200, help="mean episode length")
    p.add_argument("--chunk", type=int, default=50_000, help="rows per extend while filling")
    p.add_argument("--write-batch", type=int, default=1000, help="rows per extend when timing")
    p.add_argument("--write-calls", type=int, default=20, help="extends per timed repeat")
    p.add_argument(
        "--write-batches",
        type=int,
        nargs="+",
        default=None,
        help="rows per extend of the batch-size sweep (default 256 1000 4096; --quick: 1000)",
    )
    p.add_argument("--sample-calls", type=int, default=200, help="sample calls per timed repeat")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up calls")
    p.add_argument("--refresh-repeats", type=int, default=15)
    p.add_argument("--warmup-refresh", type=int, default=2)
    p.add_argument("--loop-calls", type=int, default=1000)
    p.add_argument("--refresh-every", type=int, default=100)
    p.add_argument("--loop-repeats", type=int, default=5)
    p.add_argument(
        "--flat-sizes",
        type=int,
        nargs="+",
        default=None,
        help="memory sizes of the flatness sweep (default 10k 100k --size; --quick: 10k 50k)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="50k transitions, fewer repeats (~1 min)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: results/)")
    args = p.parse_args(argv)
    if args.quick:
        args.size = min(args.size, 50_000)
        args.sample_calls = 50
        args.repeats = 3
        args.write_calls = 5
        args.refresh_repeats = 5
        args.loop_calls = 300
        args.loop_repeats = 1
        if args.flat_sizes is None:
            args.flat_sizes = [10_000, 50_000]
    if args.flat_sizes is None:
        args.flat_sizes = sorted({s for s in (10_000, 100_000) if s < args.size} | {args.size})
    if args.write_batches is None:
        args.write_batches = [args.write_batch] if args.quick else [256, 1000, 4096]
    args.write_batches = sorted(set(args.write_batches))
    args.flat_sizes = sorted(set(args.flat_sizes))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device_name = _device_name(args.device)
    print(
        f"bench_sampler: size={args.size:,} obs={args.obs_dim} key={args.embed_dim} "
        f"batch={args.batch} device={args.device} ({device_name}) "
        f"threads={torch.get_num_threads()} (os.cpu_count()={os.cpu_count()})"
    )
    load_start = os.getloadavg()
    sources = _source_hashes()  # now: the modules are imported, and files may change meanwhile
    t_start = time.perf_counter()
    results: dict = {}

    # ---- build the two buffers from the same stream
    encoder = _make_encoder(args)
    hippo = _hippo_buffer(args, args.size, encoder)
    rand = _random_buffer(args, args.size)
    fill_s = _fill([hippo, rand], _Stream(args, args.seed), args.size, args.chunk)
    results["build_s"] = fill_s
    print(f"built {args.size:,} transitions into both buffers in {fill_s:.1f} s")

    # ---- 1. cached sampling
    samp = measure_sampling(args, hippo, rand)
    results["sampling"] = samp
    print("1. cached sampling done")

    # ---- 2. refresh
    refresh = measure_refresh(args, hippo)
    results["refresh"] = refresh
    print("2. refresh done")

    # ---- 3. realistic loop
    loop = measure_loop(args, hippo, rand)
    results["loop"] = loop
    print("3. realistic loop done")

    # ---- 4. writers into full memories; (b) gets its own memory, filled from the same stream
    noenc = _hippo_buffer(args, args.size, _make_encoder(args), defer_keys=True)
    noenc_torch = _hippo_buffer(
        args, args.size, _make_encoder(args), defer_keys=True, backend="torch"
    )
    _fill([noenc, noenc_torch], _Stream(args, args.seed), args.size, args.chunk)
    w = measure_writers(
        args,
        args.size,
        {
            "hippo_encode": hippo,
            "hippo_noencode": noenc,
            "hippo_noencode_torch": noenc_torch,
            "roundrobin": rand,
        },
        encoder,
    )
    t_a, t_b, t_rr, t_enc = (
        w[k]["s_per_row"]
        for k in ("hippo_encode", "hippo_noencode", "roundrobin", "encoder_forward")
    )
    w["batch_rows"] = args.write_batch
    w["noencode_ratio"] = t_rr / t_b
    w["noencode_torch_ratio"] = t_rr / w["hippo_noencode_torch"]["s_per_row"]
    del noenc_torch
    w["encode_overhead"] = t_a / (t_enc + t_rr)
    results["writer"] = w
    print("4. writers done")

    # ---- 6. the collector's batch size (same memories; step 5 builds its own)
    by_batch = {}
    for rows in args.write_batches:
        if rows == args.write_batch:
            by_batch[rows] = {
                "writer_noencode_s_per_row": t_b,
                "roundrobin_s_per_row": t_rr,
                "from_main_run": True,
            }
            continue
        calls = max(5, round(args.write_calls * args.write_batch / rows))
        sweep_args = argparse.Namespace(**{**vars(args), "write_batch": rows, "write_calls": calls})
        ws = measure_writers(
            sweep_args, args.size, {"hippo_noencode": noenc, "roundrobin": rand}, None
        )
        by_batch[rows] = {
            "writer_noencode_s_per_row": ws["hippo_noencode"]["s_per_row"],
            "roundrobin_s_per_row": ws["roundrobin"]["s_per_row"],
            "calls_per_repeat": calls,
            "from_main_run": False,
        }
        print(f"6. extend({rows}) done")
    results["writer_by_batch"] = {str(k): v for k, v in by_batch.items()}
    del hippo, rand, noenc
    gc.collect()

    # ---- 5. flatness
    flat = {}
    for size in args.flat_sizes:
        if size == args.size:
            flat[size] = {
                "sampler_sample_hippo_s": samp["hippo_sampler_sample"]["median_s"],
                "sampler_sample_random_s": samp["random_sampler_sample"]["median_s"],
                "writer_noencode_s_per_row": t_b,
                "roundrobin_s_per_row": t_rr,
                "from_main_run": True,
            }
            continue
        h = _hippo_buffer(args, size, _make_encoder(args))
        r = _random_buffer(args, size)
        nb = _hippo_buffer(args, size, _make_encoder(args), defer_keys=True)
        _fill([h, r, nb], _Stream(args, args.seed), size, args.chunk)
        so = measure_sampler_only(args, h, r)
        ws = measure_writers(args, size, {"hippo_noencode": nb, "roundrobin": r}, None)
        del h, r, nb
        gc.collect()
        flat[size] = {
            "sampler_sample_hippo_s": so["hippo"]["median_s"],
            "sampler_sample_random_s": so["random"]["median_s"],
            "writer_noencode_s_per_row": ws["hippo_noencode"]["s_per_row"],
            "roundrobin_s_per_row": ws["roundrobin"]["s_per_row"],
            "from_main_run": False,
        }
        print(f"5. flatness at {size:,} done")
    results["flatness"] = {str(k): v for k, v in flat.items()}

    # ---- targets
    targets = {
        "sample_ratio": _check("sample_ratio", samp["rb_sample_ratio"]),
        "refresh_ratio": _check("refresh_ratio", refresh["refresh_ratio"]),
        "writer_noencode_ratio": _check("writer_noencode_ratio", w["noencode_ratio"]),
        "writer_encode_overhead": _check("writer_encode_overhead", w["encode_overhead"]),
    }
    results["targets"] = targets

    def res(name: str) -> str:
        return "PASS" if targets[name]["pass"] else "FAIL"

    b = args.batch
    rows_table = [
        (
            "1. rb.sample() [samples/s]",
            _fmt_rate(samp["hippo_rb_sample"]["samples_per_s"]),
            _fmt_rate(samp["random_rb_sample"]["samples_per_s"]),
            f"{samp['rb_sample_ratio']:.3f}",
            ">= 0.5",
            res("sample_ratio"),
        ),
        (
            "   rb.sample() [per call]",
            _fmt_time(samp["hippo_rb_sample"]["median_s"]),
            _fmt_time(samp["random_rb_sample"]["median_s"]),
            "",
            "",
            "",
        ),
        (
            "1. sampler.sample only [samples/s]",
            _fmt_rate(samp["hippo_sampler_sample"]["samples_per_s"]),
            _fmt_rate(samp["random_sampler_sample"]["samples_per_s"]),
            f"{samp['sampler_sample_ratio']:.3f}",
            "(info)",
            "",
        ),
        (
            "   sampler.sample only [per call]",
            _fmt_time(samp["hippo_sampler_sample"]["median_s"]),
            _fmt_time(samp["random_sampler_sample"]["median_s"]),
            "",
            "",
            "",
        ),
        (
            f"2. refresh: set_query(q{args.queries})+sample vs bare search",
            _fmt_time(refresh["refresh"]["median_s"]),
            _fmt_time(refresh["bare_search"]["median_s"]),
            f"{refresh['refresh_ratio']:.3f}",
            "<= 1.2",
            res("refresh_ratio"),
        ),
        (
            "   decomposition: cached sample / pool overhead",
            _fmt_time(refresh["sample_only"]["median_s"]),
            _fmt_time(refresh["overhead_s"]),
            "",
            "",
            "",
        ),
        (
            f"3. loop {args.loop_calls} rb.sample(), new q every {args.refresh_every} [samples/s]",
            _fmt_rate(loop["hippo"]["samples_per_s"]),
            _fmt_rate(loop["random"]["samples_per_s"]),
            f"{loop['ratio']:.3f}",
            "(info)",
            "",
        ),
        (
            f"4a. extend({args.write_batch}) with encoding vs round-robin [rows/s]",
            _fmt_rate(w["hippo_encode"]["rows_per_s"]),
            _fmt_rate(w["roundrobin"]["rows_per_s"]),
            f"{t_rr / t_a:.3f}",
            "(info)",
            "",
        ),
        (
            "4a. encoder forward alone [rows/s]",
            _fmt_rate(w["encoder_forward"]["rows_per_s"]),
            "",
            "",
            "",
            "",
        ),
        (
            "4a. t_row(encode) / (t_row(fwd) + t_row(rr))",
            f"{t_a * 1e6:.2f} us/row",
            f"{(t_enc + t_rr) * 1e6:.2f} us/row",
            f"{w['encode_overhead']:.3f}",
            "<= 1.5",
            res("writer_encode_overhead"),
        ),
        (
            f"4b. extend({args.write_batch}) defer_keys vs round-robin [rows/s]",
            _fmt_rate(w["hippo_noencode"]["rows_per_s"]),
            _fmt_rate(w["roundrobin"]["rows_per_s"]),
            f"{w['noencode_ratio']:.3f}",
            ">= 0.5",
            res("writer_noencode_ratio"),
        ),
        (
            f"4c. extend({args.write_batch}) defer_keys, backend='torch' vs round-robin",
            _fmt_rate(w["hippo_noencode_torch"]["rows_per_s"]),
            _fmt_rate(w["roundrobin"]["rows_per_s"]),
            f"{w['noencode_torch_ratio']:.3f}",
            "(info)",
            "",
        ),
    ]
    for size, f in flat.items():
        rows_table.append(
            (
                f"5. size {size:>9,}: sampler.sample only [per call]",
                _fmt_time(f["sampler_sample_hippo_s"]),
                _fmt_time(f["sampler_sample_random_s"]),
                f"{f['sampler_sample_random_s'] / f['sampler_sample_hippo_s']:.3f}",
                "",
                "",
            )
        )
        rows_table.append(
            (
                f"5. size {size:>9,}: writer defer_keys [us/row]",
                f"{f['writer_noencode_s_per_row'] * 1e6:.2f}",
                f"{f['roundrobin_s_per_row'] * 1e6:.2f}",
                f"{f['roundrobin_s_per_row'] / f['writer_noencode_s_per_row']:.3f}",
                "",
                "",
            )
        )
    for rows, f in by_batch.items():
        hippo_s, rr_s = f["writer_noencode_s_per_row"], f["roundrobin_s_per_row"]
        rows_table.append(
            (
                f"6. extend({rows:>5}) defer_keys [us/row; us/call]",
                f"{hippo_s * 1e6:.2f}; {hippo_s * rows * 1e6:.0f}",
                f"{rr_s * 1e6:.2f}; {rr_s * rows * 1e6:.0f}",
                f"{rr_s / hippo_s:.3f}",
                "",
                "",
            )
        )
    print()
    print(
        f"batch={b}, mixture_ratio={args.mixture_ratio}, top_k={args.top_k}; "
        "reference = RandomSampler / TensorDictRoundRobinWriter on LazyTensorStorage; "
        "ratio = hippo throughput / reference throughput (2.: time / time)"
    )
    _print_table(rows_table)

    results["metadata"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "torchrl": torchrl.__version__,
        "tensordict": tensordict.__version__,
        "numba": fifo_numba.numba.__version__ if fifo_numba.AVAILABLE else None,
        "writer_backend_auto": "numba" if fifo_numba.AVAILABLE else "torch",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": args.device,
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "peak_rss_gb": _peak_rss_gb(),
        "wall_s": time.perf_counter() - t_start,
        "quick": args.quick,
        "source_sha256": sources,
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("output",)
        },
    }
    # A smoke run never overwrites the full run's results.
    suffix = "_quick" if args.quick else ""
    out = args.output or RESULTS_DIR / f"bench_sampler_{device_name}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(
        f"\npeak RSS {results['metadata']['peak_rss_gb']:.2f} GB, "
        f"wall {results['metadata']['wall_s']:.0f} s; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
