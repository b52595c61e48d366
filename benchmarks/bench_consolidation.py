"""Throughput of consolidation: contrastive steps per second and key-refresh rows per second.

One memory is built (``HippoStorage`` + ``HippoWriter`` + ``DualEncoder(obs_dim, 4, embed_dim,
window=8)``) from a synthetic collector stream: 64-dim observations around a per-episode
centre, 4-dim actions, rewards around a per-episode mean, episodes of ~200 steps. Then, with
``time.perf_counter`` (warm-up first, median of ``--repeats`` repeats):

1. **Pair sampling**: ``PairSampler.sample(storage, B)`` with a cached episode index
   (anchors, positives and their windows), and the index build that follows a write.
2. **Consolidation steps**: ``Consolidator.consolidate(rb, steps=S, batch_size=B)`` with
   ``refresh_fraction=0``: pair sampling, online and target forward passes, the InfoNCE (and
   its two detached parts), backward, clipping, Adam and the momentum update. Reported as
   steps/s and pairs/s.
3. **Key refresh**: ``Consolidator.refresh_keys(rb)`` after a target update, so every stored
   key is stale: windows rebuilt by ``gather_windows`` and re-encoded by the target network
   in chunks, keys and versions written. Reported as rows/s, next to its two parts measured
   alone on one chunk (``gather_windows``, the target encoder's forward).
4. **Quality report**: ``Consolidator.key_quality`` on ``quality_rows`` keys.

It prints a table and writes ``benchmarks/results/bench_consolidation_<device-name>.json``
(``cpu-<n>core`` or the CUDA device's name; ``--quick`` adds ``_quick``) with the numbers and
the run's metadata. Commands, from the repository root::

    python3 benchmarks/bench_consolidation.py --quick        # smoke run, about a minute
    python3 benchmarks/bench_consolidation.py                # the recorded CPU run: 100k rows
    python3 benchmarks/bench_consolidation.py --device cuda  # the same on a GPU

Timings use one torch thread by default: on a 2-core machine shared with other processes,
two threads mostly wait on each other (``--threads`` changes it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tensordict
import torch
import torchrl
from tensordict import TensorDict
from torchrl.data import TensorDictReplayBuffer

from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
from torchrl_hippo.consolidation import Consolidator

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _stream(args, n: int, gen: torch.Generator) -> TensorDict:
    """``n`` rows of consecutive episodes (lengths 0.75-1.25 x ``--episode-len``)."""
    lengths = []
    while sum(lengths) < n:
        lo, hi = int(0.75 * args.episode_len), int(1.25 * args.episode_len) + 1
        lengths.append(int(torch.randint(lo, hi, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - n
    lengths = torch.tensor(lengths)
    episodes = lengths.numel()
    centre = (0.5 * torch.randn(episodes, args.obs_dim, generator=gen)).repeat_interleave(
        lengths, 0
    )
    reward_mean = torch.randn(episodes, 1, generator=gen).repeat_interleave(lengths, 0)
    done = torch.zeros(n, 1, dtype=torch.bool)
    done[lengths.cumsum(0) - 1] = True
    return TensorDict(
        {
            "observation": centre + torch.randn(n, args.obs_dim, generator=gen),
            "action": torch.randn(n, args.action_dim, generator=gen).clamp_(-1, 1),
            "next": {"reward": reward_mean + 0.1 * torch.randn(n, 1, generator=gen), "done": done},
        },
        batch_size=[n],
    ).to(args.device)


def build(args) -> tuple[TensorDictReplayBuffer, float]:
    encoder = DualEncoder(
        args.obs_dim, args.action_dim, args.embed_dim, window=args.window, hidden_dim=args.hidden
    ).to(args.device)
    rb = TensorDictReplayBuffer(
        storage=HippoStorage(args.size, device=args.device),
        writer=HippoWriter(encoder),
        sampler=HippoSampler(),
        batch_size=args.batch,
    )
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for offset in range(0, args.size, args.chunk):
        rb.extend(_stream(args, min(args.chunk, args.size - offset), gen))
    _sync()
    return rb, time.perf_counter() - start


def timed(fn: Callable[[], object], repeats: int, warmup: int, prepare=None) -> dict:
    """Median, min and max seconds of ``fn()`` over ``repeats`` calls (``prepare()`` untimed)."""
    for _ in range(warmup):
        if prepare is not None:
            prepare()
        fn()
    seconds = []
    for _ in range(repeats):
        if prepare is not None:
            prepare()
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        seconds.append(time.perf_counter() - start)
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds)}


def measure(args, rb: TensorDictReplayBuffer) -> dict:
    storage = rb.storage
    encoder = rb.writer.encoder
    consolidator = Consolidator(
        encoder, reward_weight=0.5, refresh_fraction=0.0, refresh_chunk=args.refresh_chunk
    )
    sampler = consolidator.pair_sampler
    out: dict = {}

    # 1. pair sampling, and the index build that follows a write
    pairs = timed(lambda: sampler.sample(storage, args.batch), args.sample_calls, args.warmup)
    out["pair_sample"] = {**pairs, "pairs_per_s": args.batch / pairs["median_s"]}
    out["pair_index_build"] = timed(
        lambda: sampler.num_eligible(storage),
        args.repeats,
        1,
        prepare=lambda: setattr(sampler, "_cache", None),
    )

    # 2. consolidation steps (no refresh)
    steps = timed(
        lambda: consolidator.consolidate(rb, steps=args.steps, batch_size=args.batch),
        args.repeats,
        1,
    )
    per_step = steps["median_s"] / args.steps
    out["consolidation_step"] = {
        **{k: v / args.steps for k, v in steps.items()},
        "steps_per_s": 1 / per_step,
        "pairs_per_s": args.batch / per_step,
    }

    # 3. key refresh of every stored row, with its parts on one chunk
    consolidator.refresh_fraction = 1.0
    rows = storage.num_valid
    refresh = timed(
        lambda: consolidator.refresh_keys(rb),
        args.refresh_repeats,
        0,
        prepare=encoder.update_target,
    )
    out["key_refresh"] = {**refresh, "rows": rows, "rows_per_s": rows / refresh["median_s"]}
    chunk = torch.arange(min(args.refresh_chunk, rows), device=storage.table_device)
    windows = storage.gather_windows(chunk, encoder.window).to(args.device)
    gather = timed(lambda: storage.gather_windows(chunk, encoder.window), args.repeats, 1)
    with torch.no_grad():
        forward = timed(lambda: encoder(windows.copy(), target=True), args.repeats, 1)
    out["refresh_parts"] = {
        "chunk_rows": chunk.numel(),
        "gather_windows_rows_per_s": chunk.numel() / gather["median_s"],
        "target_forward_rows_per_s": chunk.numel() / forward["median_s"],
    }

    # 4. quality report
    consolidator.quality_rows = args.quality_rows
    out["quality_report"] = timed(lambda: consolidator.key_quality(rb), args.repeats, 1)
    out["quality_report"]["rows"] = min(args.quality_rows, rows)
    return out


def _device_name(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=100_000, help="transitions in the memory")
    p.add_argument("--obs-dim", type=int, default=64)
    p.add_argument("--action-dim", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256, help="encoder hidden width")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--batch", type=int, default=256, help="pairs per consolidation step")
    p.add_argument("--steps", type=int, default=20, help="consolidation steps per repeat")
    p.add_argument("--episode-len", type=int, default=200, help="mean episode length")
    p.add_argument("--chunk", type=int, default=20_000, help="rows per extend while filling")
    p.add_argument("--refresh-chunk", type=int, default=8192, help="rows per refresh pass")
    p.add_argument("--quality-rows", type=int, default=1024)
    p.add_argument("--sample-calls", type=int, default=50, help="timed pair-sampling calls")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    p.add_argument("--refresh-repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (1: steadiest on 2 cores)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="20k transitions, fewer repeats")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: results/)")
    args = p.parse_args(argv)
    if args.quick:
        args.size = min(args.size, 20_000)
        args.steps, args.repeats, args.refresh_repeats, args.sample_calls = 5, 3, 1, 10
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device_name = _device_name(args.device)
    print(
        f"bench_consolidation: size={args.size:,} obs={args.obs_dim} key={args.embed_dim} "
        f"hidden={args.hidden} window={args.window} batch={args.batch} device={args.device} "
        f"({device_name}) threads={torch.get_num_threads()}"
    )
    load_start = os.getloadavg()
    rb, build_s = build(args)
    print(
        f"built {args.size:,} transitions ({rb.storage.num_episodes} episodes) in {build_s:.1f} s"
    )
    results = measure(args, rb)
    r = results
    table = [
        ("pair sampling", f"{r['pair_sample']['median_s'] * 1e3:.2f} ms/batch",
         f"{r['pair_sample']['pairs_per_s']:,.0f} pairs/s"),
        ("pair index build (after a write)", f"{r['pair_index_build']['median_s'] * 1e3:.1f} ms",
         ""),
        ("consolidation step", f"{r['consolidation_step']['median_s'] * 1e3:.1f} ms/step",
         f"{r['consolidation_step']['steps_per_s']:.1f} steps/s"),
        ("key refresh (all rows)", f"{r['key_refresh']['median_s']:.2f} s",
         f"{r['key_refresh']['rows_per_s']:,.0f} rows/s"),
        ("  gather_windows alone", "",
         f"{r['refresh_parts']['gather_windows_rows_per_s']:,.0f} rows/s"),
        ("  target forward alone", "",
         f"{r['refresh_parts']['target_forward_rows_per_s']:,.0f} rows/s"),
        (f"quality report ({r['quality_report']['rows']} keys)",
         f"{r['quality_report']['median_s'] * 1e3:.0f} ms", ""),
    ]  # fmt: skip
    width = max(len(row[0]) for row in table)
    for name, time_cell, rate in table:
        print(f"{name.ljust(width)}  {time_cell.ljust(16)}  {rate}")

    output = args.output or RESULTS_DIR / (
        f"bench_consolidation_{device_name}{'_quick' if args.quick else ''}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": args.device,
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchrl": torchrl.__version__,
        "tensordict": tensordict.__version__,
        "build_s": build_s,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    output.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
