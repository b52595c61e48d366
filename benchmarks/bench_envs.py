"""Steps per second of the benchmark environments (``torchrl_hippo.envs``).

For every registered id (``torchrl_hippo.envs.ENV_IDS``, default sizes), it times:

1. **raw**: ``env.step`` of the environment class itself (``gym.make(id).unwrapped``) in a
   plain Python loop, with uniformly random actions drawn beforehand (a numpy array, so each
   action is a ``np.int64`` as a policy would give), resetting whenever an episode ends (the
   resets are included). Targets: >= 50,000 steps/s for ``Corridor`` and ``SequenceGames``,
   >= 10,000 for the others.
2. **gym.make**: the same loop through ``gymnasium.make``'s wrappers (the passive environment
   checker and order enforcing).
3. **sync vec**: ``gymnasium.make_vec(id, num_envs=--num-envs, vectorization_mode="sync")``
   (autoreset included), counted in environment steps (``calls * num_envs``).
4. **torchrl**: ``torchrl.envs.GymEnv(id).rollout(--torchrl-steps, break_when_any_done=False)``
   with TorchRL's random policy: the cost of the TensorDict layer around one environment.
5. with ``--parallel``: ``torchrl.envs.ParallelEnv(--workers, GymEnv(...))`` rollouts, counted
   in frames (``steps * workers``); workers are forked (``mp_start_method="fork"``).

Each figure is the median of ``--repeats`` timed repeats (``time.perf_counter``) after a
warm-up. The script prints a table with PASS/FAIL for the targets and writes
``benchmarks/results/bench_envs_<device-name>.json`` (``cpu-<n>core``; ``--quick`` adds
``_quick``) with every repeat, the targets and the run's metadata (versions, load average, hashes
of the measured sources). It exits 0 whether the targets pass or not.

Commands (from the repository root)::

    python3 benchmarks/bench_envs.py --quick        # smoke run, ~20 s
    python3 benchmarks/bench_envs.py                # the full run, a few minutes
    python3 benchmarks/bench_envs.py --parallel     # also TorchRL's ParallelEnv (~8 min on 2 cores)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np

import torchrl_hippo.envs as hippo_envs

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Minimum raw single-process steps/s, by environment class name.
TARGETS = {
    "Corridor": 50_000,
    "SequenceGames": 50_000,
    "MultiRoomKeys": 10_000,
    "Crafting": 10_000,
    "StoryGen": 10_000,
}


def _summary(steps: int, times: list[float]) -> dict:
    rates = [steps / t for t in times]
    return {
        "steps": steps,
        "steps_per_s": statistics.median(rates),
        "min_steps_per_s": min(rates),
        "max_steps_per_s": max(rates),
        "repeats_s": times,
    }


def _timed(block: Callable[[], None], repeats: int) -> list[float]:
    block()  # warm-up
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        block()
        times.append(time.perf_counter() - t0)
    return times


def bench_loop(env: gym.Env, steps: int, repeats: int, seed: int) -> dict:
    """A plain ``env.step`` loop over pre-drawn random actions, resetting at episode ends."""
    actions = np.random.default_rng(seed).integers(env.action_space.n, size=steps)
    env.reset(seed=seed)

    def block() -> None:
        step, reset = env.step, env.reset
        for a in actions:
            _, _, terminated, truncated, _ = step(a)
            if terminated or truncated:
                reset()

    return _summary(steps, _timed(block, repeats))


def bench_sync_vector(env_id: str, steps: int, num_envs: int, repeats: int, seed: int) -> dict:
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync")
    calls = max(steps // num_envs, 1)
    actions = np.random.default_rng(seed).integers(
        envs.single_action_space.n, size=(calls, num_envs)
    )
    envs.reset(seed=seed)

    def block() -> None:
        step = envs.step
        for a in actions:
            step(a)

    out = _summary(calls * num_envs, _timed(block, repeats))
    out["num_envs"] = num_envs
    envs.close()
    return out


def bench_torchrl(env_id: str, steps: int, repeats: int, seed: int) -> dict:
    from torchrl.envs import GymEnv

    env = GymEnv(env_id)
    env.set_seed(seed)
    out = _summary(steps, _timed(lambda: env.rollout(steps, break_when_any_done=False), repeats))
    env.close()
    return out


def bench_parallel(env_id: str, steps: int, workers: int, repeats: int, seed: int) -> dict:
    from torchrl.envs import GymEnv, ParallelEnv

    env = ParallelEnv(
        workers,
        functools.partial(GymEnv, f"torchrl_hippo.envs:{env_id}"),
        mp_start_method="fork",
    )
    env.set_seed(seed)
    block = functools.partial(env.rollout, steps, break_when_any_done=False)
    out = _summary(steps * workers, _timed(block, repeats))
    out["workers"] = workers
    env.close()
    return out


def _device_name() -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"cpu-{os.cpu_count()}core").strip("-")


def _source_hashes() -> dict[str, str]:
    """sha256 (first 12 hex digits) of the environments' sources, to tell which code was measured."""
    root = Path(hippo_envs.__file__).resolve().parent
    return {
        f"envs/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest()[:12]
        for f in sorted(root.glob("*.py"))
    }


def _print_table(rows: list[tuple[str, ...]]) -> None:
    header = (
        "environment",
        "raw",
        "gym.make",
        "sync vec",
        "torchrl",
        "parallel",
        "target",
        "result",
    )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100_000, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    p.add_argument("--num-envs", type=int, default=8, help="sub-environments of the sync vector")
    p.add_argument("--torchrl-steps", type=int, default=2_000, help="GymEnv rollout length")
    p.add_argument("--parallel", action="store_true", help="also time torchrl's ParallelEnv")
    p.add_argument("--workers", type=int, default=2, help="ParallelEnv workers")
    p.add_argument("--envs", nargs="+", default=None, help="ids to time (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats (~20 s)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: results/)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 20_000)
        args.repeats = min(args.repeats, 3)
        args.torchrl_steps = min(args.torchrl_steps, 500)
    unknown = set(args.envs or ()) - set(hippo_envs.ENV_IDS)
    if unknown:
        p.error(f"unknown ids {sorted(unknown)}; known: {', '.join(hippo_envs.ENV_IDS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    device_name = _device_name()
    print(
        f"bench_envs: steps={args.steps:,} repeats={args.repeats} num_envs={args.num_envs} "
        f"({device_name}, load {load_start[0]:.2f})"
    )
    results: dict = {"envs": {}}
    rows = []
    for env_id in args.envs or hippo_envs.ENV_IDS:
        raw_env = gym.make(env_id).unwrapped
        name = type(raw_env).__name__
        entry = {
            "class": name,
            "observation_shape": list(raw_env.observation_space.shape),
            "actions": int(raw_env.action_space.n),
            "raw": bench_loop(raw_env, args.steps, args.repeats, args.seed),
            "gym_make": bench_loop(gym.make(env_id), args.steps, args.repeats, args.seed),
            "sync_vector": bench_sync_vector(
                env_id, args.steps, args.num_envs, args.repeats, args.seed
            ),
            "torchrl_gymenv": bench_torchrl(
                env_id, args.torchrl_steps, min(args.repeats, 3), args.seed
            ),
        }
        if args.parallel:
            entry["torchrl_parallel"] = bench_parallel(
                env_id, args.torchrl_steps, args.workers, min(args.repeats, 3), args.seed
            )
        target = TARGETS[name]
        entry["target"] = {
            "raw_steps_per_s": f">= {target}",
            "pass": bool(entry["raw"]["steps_per_s"] >= target),
        }
        results["envs"][env_id] = entry

        def rate(key: str, entry: dict = entry) -> str:
            return f"{entry[key]['steps_per_s']:,.0f}" if key in entry else "-"

        rows.append(
            (
                env_id,
                rate("raw"),
                rate("gym_make"),
                rate("sync_vector"),
                rate("torchrl_gymenv"),
                rate("torchrl_parallel"),
                f">= {target:,}",
                "PASS" if entry["target"]["pass"] else "FAIL",
            )
        )
        print(f"  {env_id}: {rows[-1][1]} steps/s raw", flush=True)

    print()
    print(
        f"steps/s, median of {args.repeats} repeats; raw = the class's step() in a Python loop, "
        f"sync vec = {args.num_envs} envs in gymnasium's SyncVectorEnv (env steps), torchrl = "
        f"GymEnv.rollout"
        + (f", parallel = ParallelEnv({args.workers}) frames" if args.parallel else "")
    )
    _print_table(rows)

    import torchrl

    results["metadata"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "gymnasium": gym.__version__,
        "torchrl": torchrl.__version__,
        "platform": platform.platform(),
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "wall_s": time.perf_counter() - t_start,
        "quick": args.quick,
        "source_sha256": _source_hashes(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    suffix = "_quick" if args.quick else ""  # a smoke run never overwrites the full run
    out = args.output or RESULTS_DIR / f"bench_envs_{device_name}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwall {results['metadata']['wall_s']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
