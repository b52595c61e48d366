"""``make demo``: DQN on a sparse-reward corridor, with episodic, uniform and prioritized replay.

A short version of the sparse-reward study (``benchmarks/sparse_study.py``): one corridor
length (30), 2 seeds, the three replays on 61,440 frames each; these are the study's
``corridor30`` runs for seeds 0 and 1. It takes about a minute and a half on an idle 2-core
CPU (``--quick``: a smoke run of seconds). ``python3 examples/demo.py --help`` lists the
options.

**The task.** ``hippo/Corridor-ZeroNoise-v0``: walk from cell 0 to cell ``length``; the only
reward, ``1.0``, is paid on arrival, and the episode is cut after ``4 * (length + 1)`` steps.
A random walk gets there in about 1% of the episodes at length 30, so successful episodes
are rare until the Q-network has learnt where the goal is, and DQN learns from those few.

**The pipeline** (``examples/dqn_memory.py``, imported here, the same for the three
replays)::

    16 corridors (SyncVectorEnv) --Collector--> td[16, 16] --rb.extend--> replay buffer
                                                                              |
    DQNLoss (double DQN) + SoftUpdate <--rb.sample()-- sampler <--------------+

**What the episodic memory does** (``--replay hippo``):

- :class:`~torchrl_hippo.HippoWriter` cuts the collector's batches into episodes (stitching
  those that run over a batch boundary) and gives each transition a key: the
  :class:`~torchrl_hippo.DualEncoder`'s embedding of the 8 steps that end there (computed
  in bulk when first needed, ``defer_keys=True``).
- :class:`~torchrl_hippo.HippoStorage` keeps the transitions, their keys and an episode table
  (return, length, access count, ...).
- :class:`~torchrl_hippo.HippoSampler` draws part of each batch by retrieval (20%, ramped to
  50%): with no query set, its *default anchors* are transitions of episodes picked with
  probability ``softmax(z(return) / 0.5)``: here, the rare episodes that reached the goal.
  It retrieves the 16 stored windows nearest to each anchor and draws among them with
  ``softmax(similarity / 0.1)``; the rest of the batch is uniform. Each batch carries
  ``"priority_weight"``, the importance weight that undoes the non-uniform draws, which
  ``DQNLoss`` reads on its own.
- Retrieval starts with the first success: before it every stored episode has the same
  return, the anchors have nothing to favour, and the sampler draws uniformly (the same
  draws as the uniform replay's).
- Every 20 batches a short consolidation ("sleep") trains the encoder contrastively
  (temporal neighbours and episodes of similar return are positives) and refreshes stale keys.

The demo prints the share of the memory's draws that came from successful episodes, for
retrieval draws and for uniform ones (the share a uniform replay gives them), just after the
first successes and over the whole run: the retrieval share is several times the uniform one.
That is the memory at work: it replays the rare successful episodes far more often than they
occur. What it does *not* show is a higher success rate: in the full study (README) hippo
matches uniform replay on this task, because success is bounded by exploration (finding the
goal at all), which no replay scheme changes.

At the end it prints a table (replay, success rate, frames to first success), writes
``results/demo_corridor<length>.json`` and ``.png`` (mean ± std success against frames), and
points to the TensorBoard logs (``runs/demo``).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dqn_memory import REPLAYS, DQNConfig, format_table, run_study, save_study

CORRIDOR = "hippo/Corridor-ZeroNoise-v0"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--length", type=int, default=30, help="corridor length")
    parser.add_argument("--frames", type=int, default=61_440, help="frames per run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--replay", nargs="+", choices=REPLAYS, default=list(REPLAYS))
    parser.add_argument("--out", default="results", help="where the JSON and PNG go")
    parser.add_argument("--name", default=None, help="file names (default demo_corridor<L>)")
    parser.add_argument("--logdir", default="runs/demo", help="TensorBoard root")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of 512 frames a run")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return parser.parse_args(argv)


def _share(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1%}"


def describe_memory(result: dict[str, Any]) -> str:
    """Where a hippo run's draws came from (see ``dqn_memory.DrawStats``).

    Successful episodes' share among retrieval draws and among uniform draws (the share a
    uniform replay would give them), in the first checkpoint window with retrieval draws,
    just after the first successes, and over the whole run.
    """
    if result.get("retrieval_from_frame") is None:
        return f"  hippo seed {result['seed']}: no success, so no retrieval: uniform draws only"
    curve = result["curve"]
    semantic = curve.get("memory_success_share_semantic", [])
    first = next((i for i, v in enumerate(semantic) if not math.isnan(v)), None)
    lines = [
        f"  hippo seed {result['seed']}: retrieval from frame {result['retrieval_from_frame']:,}"
    ]
    if first is not None:
        uniform = curve["memory_success_share_uniform"][first]
        lines.append(
            f"    draws from successful episodes up to frame {curve['frames'][first]:,}: "
            f"retrieval {_share(semantic[first])} vs uniform {_share(uniform)}"
        )
    mem = result["memory"]
    lines.append(
        f"    over the whole run: retrieval {_share(mem['success_share_semantic'])} vs "
        f"uniform {_share(mem['success_share_uniform'])}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the demo; returns the study (the dict written as JSON)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    name = args.name or f"demo_corridor{args.length}"
    overrides: dict[str, Any] = {}
    if args.quick:
        overrides = {"frames": 512, "eval_every": 256, "frames_per_batch": 128, "num_envs": 4}
    frames = overrides.pop("frames", args.frames)
    base = DQNConfig(
        env_id=CORRIDOR,
        env_kwargs={"length": args.length},
        frames=frames,
        eval_every=overrides.pop("eval_every", 4_096 if frames % 4_096 == 0 else frames),
        device=args.device,
        logdir=args.logdir,
        run_name=name,
        progress=not args.no_progress,
        **overrides,
    )
    print(
        f"DQN on {CORRIDOR} (length {args.length}): replays {', '.join(args.replay)}, "
        f"seeds {args.seeds}, {base.frames:,} frames each."
    )
    start = time.perf_counter()
    study = run_study(base, args.replay, args.seeds, on_run=_print_run)
    study["command"] = "python examples/demo.py " + shlex.join(argv)
    study["wall_time_s"] = time.perf_counter() - start
    json_path, png_path = save_study(
        study, args.out, name, f"Corridor length {args.length}: {base.frames:,} frames per run"
    )
    print()
    print(format_table(study))
    hippo_runs = study["runs"].get("hippo", [])
    if hippo_runs:
        print("\nThe memory at work:")
        for result in hippo_runs:
            print(describe_memory(result))
    print(f"\nwall time: {study['wall_time_s']:.0f} s")
    print(f"results: {json_path}\nplot:    {png_path}")
    print(f"TensorBoard: tensorboard --logdir {args.logdir}")
    return study


def _print_run(result: dict[str, Any]) -> None:
    first = result["first_success_frame"]
    print(
        f"  {result['replay']:>11} seed {result['seed']}: training success "
        f"{result['train_success_rate']:.2f} (all episodes), greedy success "
        f"{result['final_eval_success']:.2f} at the end, first success at "
        f"{'-' if first is None else f'{first:,}'} frames ({result['wall_time_s']:.0f} s)",
        flush=True,
    )


if __name__ == "__main__":
    main()
