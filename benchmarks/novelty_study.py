"""Study: DQN with and without ``EpisodicNovelty`` on the zero-noise corridor.

``hippo/Corridor-ZeroNoise-v0`` pays ``1.0`` only for reaching the far end, ``--length`` moves
from the start, within ``4 * (length + 1)`` steps; reaching it is the only way an episode
*terminates* (otherwise it is truncated), so ``("next", "terminated")`` is the env's success
flag (``info["success"]``). An epsilon-greedy random walk needs about ``length²`` steps to get
there, so at ``--length 100`` it almost never succeeds by chance; DQN, which learns nothing from
all-zero rewards, succeeds only if its untrained greedy policy happens to walk right.

Three arms, the same compact TorchRL DQN (``Collector``, ``GymEnv``, ``DQNLoss`` with double DQN
and a soft-updated target, uniform replay: ``LazyTensorStorage`` + ``RandomSampler``,
epsilon-greedy annealed from 1 to 0.05 over half the frames), ``--seeds`` seeds each:

- ``dqn``: the env as is;
- ``dqn+novelty``: the env wrapped in :class:`~torchrl_hippo.envs.novelty.EpisodicNovelty`
  (identity embedding of the observation, ``k=10``, ``beta=--beta``, running normalisation with
  ``center=True``: the bonus is ``(r - mean) / std``), added to ``("next", "reward")``, so the
  agent trains on the sum;
- ``dqn+novelty-uncentred``: the same with ``center=False`` (``r / std``, always positive).
  A positive bonus on every step pays the agent to *stay* in the episode, and in this corridor
  ending the episode is success: this arm shows that trap.

Success is always read from ``("next", "terminated")``. Per run the study records the frames to
the first success (``null`` if none within ``--frames``), the success rate over all episodes and
over the last quarter of the frames, and whether the greedy policy succeeds in one evaluation
episode at the end (on the plain env). Output: ``<output-dir>/<prefix>.json`` and
``<prefix>.png`` (frames to first success per seed, and cumulative successes against frames),
TensorBoard logs in ``--logdir/<arm>_seed<seed>``.

Commands (from the repository root)::

    python3 benchmarks/novelty_study.py                    # the study (~13 CPU-minutes)
    python3 benchmarks/novelty_study.py --measure-fps      # frames/s of each arm, nothing saved
    python3 benchmarks/novelty_study.py --frames 400 --seeds 0 --prefix smoke --output-dir /tmp
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tensordict.nn import TensorDictSequential
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, RandomSampler, TensorDictReplayBuffer
from torchrl.envs import ExplorationType, GymEnv, TransformedEnv, set_exploration_type
from torchrl.modules import MLP, EGreedyModule, QValueActor
from torchrl.objectives import DQNLoss, SoftUpdate
from torchrl.record.loggers import TensorboardLogger
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torchrl_hippo.envs  # noqa: E402,F401  (registers hippo/Corridor-ZeroNoise-v0)
from torchrl_hippo.envs.novelty import EpisodicNovelty  # noqa: E402

ENV_ID = "hippo/Corridor-ZeroNoise-v0"
ARMS = ("dqn", "dqn+novelty", "dqn+novelty-uncentred")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=100, help="corridor length")
    parser.add_argument("--frames", type=int, default=25_000, help="env steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--beta", type=float, default=0.1, help="weight of the novelty bonus")
    parser.add_argument("--k", type=int, default=10, help="neighbours of the novelty bonus")
    parser.add_argument("--frames-per-batch", type=int, default=50)
    parser.add_argument("--updates-per-batch", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=500, help="frames before learning")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--prefix", default="novelty_study")
    parser.add_argument("--logdir", default=str(ROOT / "runs" / "novelty_study"))
    parser.add_argument(
        "--measure-fps", action="store_true", help="time 2,000 frames of each arm and exit"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    return parser.parse_args(argv)


def make_env(args: argparse.Namespace, arm: str, seed: int) -> TransformedEnv:
    env = TransformedEnv(GymEnv(ENV_ID, length=args.length))
    if arm != "dqn":
        # Identity embedding of the 8-dim observation (position / length, at-end flag, zeros).
        env.append_transform(
            EpisodicNovelty(
                k=args.k,
                capacity=4 * (args.length + 1) + 1,
                beta=args.beta,
                center=arm == "dqn+novelty",
            )
        )
    env.set_seed(seed)
    return env


def greedy_success(actor: QValueActor, args: argparse.Namespace, seed: int) -> bool:
    """One evaluation episode of the greedy policy, on the plain env."""
    env = make_env(args, "dqn", seed=10_000 + seed)
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        td = env.rollout(4 * (args.length + 1), actor)
    env.close()
    return bool(td["next", "terminated"].any())


def run(arm: str, seed: int, args: argparse.Namespace, frames: int | None = None) -> dict:
    """Trains one DQN run; returns its record (frames to first success, success rates, ...)."""
    frames = frames or args.frames
    torch.manual_seed(seed)
    env = make_env(args, arm, seed)
    actor = QValueActor(
        MLP(
            in_features=env.observation_spec["observation"].shape[-1],
            out_features=2,
            num_cells=[64, 64],
        ),
        in_keys=["observation"],
        spec=env.action_spec,
    )
    exploration = EGreedyModule(
        env.action_spec, eps_init=1.0, eps_end=0.05, annealing_num_steps=max(frames // 2, 1)
    )
    collector = Collector(
        env,
        TensorDictSequential(actor, exploration),
        frames_per_batch=args.frames_per_batch,
        total_frames=frames,
        auto_register_policy_transforms=False,
    )
    rb = TensorDictReplayBuffer(
        storage=LazyTensorStorage(frames), sampler=RandomSampler(), batch_size=args.batch_size
    )
    loss = DQNLoss(actor, action_space=env.action_spec, delay_value=True, double_dqn=True)
    loss.make_value_estimator(gamma=args.gamma)
    target_updater = SoftUpdate(loss, eps=0.99)
    optim = torch.optim.Adam(loss.parameters(), lr=args.lr)
    logger = TensorboardLogger(exp_name=f"{arm.replace('+', '_')}_seed{seed}", log_dir=args.logdir)

    seen = episodes = successes = late_episodes = late_successes = 0
    first_success = None
    curve = []  # (frames, cumulative successes) after each batch
    start = time.perf_counter()
    bar = tqdm(
        total=frames,
        desc=f"{arm} seed {seed}",
        disable=args.no_progress,
        leave=False,
        mininterval=2.0,
    )
    for batch in collector:
        n = batch.numel()
        flat = batch.reshape(-1)
        done = flat["next", "done"].squeeze(-1)
        success = flat["next", "terminated"].squeeze(-1)
        if first_success is None and bool(success.any()):
            first_success = seen + int(success.nonzero()[0, 0]) + 1
        episodes += int(done.sum())
        successes += int(success.sum())
        if seen >= frames * 3 // 4:
            late_episodes += int(done.sum())
            late_successes += int(success.sum())
        seen += n
        curve.append((seen, successes))
        rb.extend(flat)
        logs = {}
        if seen >= args.warmup:
            for _ in range(args.updates_per_batch):
                out = loss(rb.sample())
                out["loss"].backward()
                optim.step()
                optim.zero_grad()
                target_updater.step()
            logs["train/loss"] = float(out["loss"].detach())
        exploration.step(n)
        logs.update(
            {
                "train/reward": float(flat["next", "reward"].mean()),
                "train/episodes": episodes,
                "train/successes": successes,
                "train/epsilon": float(exploration.eps),
                "train/max_position": float(flat["next", "observation"][:, 0].max()),
            }
        )
        for name, value in logs.items():
            logger.log_scalar(name, value, step=seen)
        bar.update(n)
        bar.set_postfix(successes=successes, first=first_success)
    bar.close()
    collector.shutdown()
    elapsed = time.perf_counter() - start
    greedy = greedy_success(actor, args, seed)
    return {
        "arm": arm,
        "seed": seed,
        "frames": seen,
        "frames_to_first_success": first_success,
        "episodes": episodes,
        "successes": successes,
        "success_rate": successes / max(episodes, 1),
        "success_rate_last_quarter": late_successes / max(late_episodes, 1),
        "greedy_success": greedy,
        "seconds": elapsed,
        "frames_per_second": seen / elapsed,
        "curve": curve,
    }


def summarize(runs: list[dict], arms: list[str], budget: int) -> dict:
    out = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        hits = [
            r["frames_to_first_success"] for r in mine if r["frames_to_first_success"] is not None
        ]
        out[arm] = {
            "seeds": len(mine),
            "seeds_with_a_success": len(hits),
            "frames_to_first_success": [r["frames_to_first_success"] for r in mine],
            "median_frames_to_first_success": (
                float(torch.tensor(hits, dtype=torch.float).median())
                if len(hits) == len(mine)
                else None
            ),
            "mean_success_rate": sum(r["success_rate"] for r in mine) / max(len(mine), 1),
            "mean_success_rate_last_quarter": (
                sum(r["success_rate_last_quarter"] for r in mine) / max(len(mine), 1)
            ),
            "greedy_successes": sum(r["greedy_success"] for r in mine),
            "frame_budget": budget,
        }
    return out


def plot(runs: list[dict], arms: list[str], args: argparse.Namespace, path: Path) -> None:
    colors = {"dqn": "tab:gray", "dqn+novelty": "tab:blue", "dqn+novelty-uncentred": "tab:orange"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, arm in enumerate(arms):
        mine = [r for r in runs if r["arm"] == arm]
        for j, r in enumerate(mine):
            x = i + (j - (len(mine) - 1) / 2) * 0.12
            first = r["frames_to_first_success"]
            if first is None:
                ax1.scatter(x, args.frames, marker="x", color=colors[arm], s=70)
            else:
                ax1.scatter(x, first, marker="o", color=colors[arm], s=50)
            frames, succ = zip(*r["curve"]) if r["curve"] else ((), ())
            ax2.plot(frames, succ, color=colors[arm], alpha=0.8, label=arm if j == 0 else None)
    ax1.axhline(args.frames, color="k", lw=0.8, ls="--")
    ax1.text(
        len(arms) - 0.5, args.frames, " budget (x: no success)", va="bottom", ha="right", fontsize=8
    )
    ax1.set_xticks(range(len(arms)), arms)
    ax1.set_xlim(-0.5, len(arms) - 0.5)
    ax1.set_ylim(0, args.frames * 1.1)
    ax1.set_ylabel("frames to first success")
    ax1.set_title("first success, per seed")
    ax2.set_xlabel("frames")
    ax2.set_ylabel("successful episodes (cumulative)")
    ax2.set_title("successes during training")
    ax2.legend()
    fig.suptitle(f"DQN on {ENV_ID}, length {args.length}: with and without EpisodicNovelty")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure_fps:
        for arm in args.arms:
            record = run(arm, args.seeds[0], args, frames=2_000)
            print(f"{arm}: {record['frames_per_second']:.0f} frames/s (2,000 frames with learning)")
        return None
    runs = []
    for arm in args.arms:
        for seed in args.seeds:
            record = run(arm, seed, args)
            runs.append(record)
            tqdm.write(
                f"{arm} seed {seed}: first success at {record['frames_to_first_success']} frames, "
                f"success rate {record['success_rate']:.2f} "
                f"(last quarter {record['success_rate_last_quarter']:.2f}), greedy "
                f"{'success' if record['greedy_success'] else 'failure'}, "
                f"{record['frames_per_second']:.0f} frames/s"
            )
    result = {
        "study": "DQN with and without EpisodicNovelty on the zero-noise corridor",
        "env": ENV_ID,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": {k: v for k, v in vars(args).items() if k not in ("no_progress", "measure_fps")},
        "load_average": os.getloadavg(),
        "summary": summarize(runs, args.arms, args.frames),
        "runs": runs,
    }
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{args.prefix}.json"
    json_path.write_text(json.dumps(result, indent=1))
    plot(runs, args.arms, args, out_dir / f"{args.prefix}.png")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
