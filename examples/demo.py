"""DQN on CartPole-v1 with an episodic memory as its replay buffer: the memory at work.

Run it with ``make demo`` (or ``python3 examples/demo.py``; ``--help`` lists the options).
It takes about a minute and a half on a 2-core CPU.

The pipeline is plain TorchRL, with the three parts of the replay buffer swapped in::

    GymEnv("CartPole-v1") --Collector--> td[200] --rb.extend--> HippoWriter --> HippoStorage
                                                                                    |
    DQNLoss + SoftUpdate <--rb.sample()-- HippoSampler (30% retrieval, 70% uniform) <--+

- :class:`~torchrl_hippo.HippoWriter` cuts the collector's batches into episodes (stitching the
  ones that run over a batch boundary), and gives every transition a key: the
  :class:`~torchrl_hippo.DualEncoder`'s embedding of the 8 steps that end there.
- :class:`~torchrl_hippo.HippoStorage` keeps the transitions, their keys and an episode table
  (return, length, access count, ...).
- :class:`~torchrl_hippo.HippoSampler` draws 30% of each batch by retrieval: with no query set,
  its *default anchors* are transitions of episodes picked with probability
  ``softmax(z(return) / 0.5)``, so rare high-return episodes; the sampler retrieves their
  16 nearest keys and draws among them with ``softmax(similarity / 0.1)``. The other 70% are
  uniform. Each batch carries ``"priority_weight"``, the importance weight that undoes the
  non-uniform draws, and ``DQNLoss`` reads it on its own (its ``use_prioritized_weights="auto"``
  takes the weighted mean ``sum(w * loss) / sum(w)`` whenever the key is present), so nothing
  has to be multiplied by hand.

Every few batches the demo prints what the memory holds and what it serves: the number of
episodes, the best stored return, a summary of the episode table's returns, and the share of
draws that came from the top-10% return episodes, for retrieval draws and for uniform draws.
The retrieval share is far above the uniform one: that is the memory at work, replaying the
rare good episodes more often (and ``"priority_weight"`` keeping the loss unbiased).
TensorBoard logs go to ``runs/demo/<run name>`` (``tensorboard --logdir runs/demo``).

CartPole's action is GymEnv's default int64 one-hot vector of size 2, which the encoder reads
as two discrete actions (``action_dim=2``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tensordict.nn import TensorDictSequential
from torchrl.collectors import Collector
from torchrl.data import TensorDictReplayBuffer
from torchrl.envs import Compose, GymEnv, RewardSum, StepCounter, TransformedEnv
from torchrl.modules import MLP, EGreedyModule, QValueActor
from torchrl.objectives import DQNLoss, SoftUpdate
from torchrl.record.loggers import TensorboardLogger
from tqdm import tqdm

from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=30_000, help="environment steps in total")
    parser.add_argument("--frames-per-batch", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=1_000, help="frames before learning")
    parser.add_argument(
        "--updates-per-batch", type=int, default=50, help="optimiser steps per batch"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--memory", type=int, default=50_000, help="transitions the memory holds")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--stats-every", type=int, default=20, help="print memory stats every N batches"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on 2 cores)"
    )
    parser.add_argument("--logdir", default="runs/demo", help="TensorBoard root directory")
    return parser.parse_args()


def make_env(device: torch.device) -> TransformedEnv:
    env = GymEnv("CartPole-v1", device=device)
    # StepCounter: episode lengths; RewardSum: ("next", "episode_reward") for the logs.
    return TransformedEnv(env, Compose(StepCounter(), RewardSum()))


class MemoryStats:
    """Accumulates, over sampled batches, where the semantic and the uniform draws come from."""

    def __init__(self) -> None:
        self.reset()
        self.total = {"sem": [0, 0], "uni": [0, 0]}  # [draws from the top decile, all draws]

    def reset(self) -> None:
        self.window = {"sem": [0, 0], "uni": [0, 0]}
        self.sim = {"sem": [0.0, 0], "uni": [0.0, 0]}

    @staticmethod
    def top_decile_episodes(storage: HippoStorage) -> tuple[torch.Tensor, float]:
        """Bool over episode-table slots: finished episodes in the top 10% of stored returns."""
        table = storage.episodes
        finished = (table["rows"] > 0) & table["done"]
        if not bool(finished.any()):
            return finished, math.nan
        threshold = float(torch.quantile(table["return"][finished].float(), 0.9))
        return finished & (table["return"] >= threshold), threshold

    def update(self, storage: HippoStorage, batch) -> None:
        top, _ = self.top_decile_episodes(storage)
        slot = storage.row_slot[batch["index"]]
        from_top = (slot >= 0) & top[slot.clamp_min(0)]
        semantic = batch["hippo", "semantic"]
        similarity = batch["hippo", "similarity"]
        for name, mask in (("sem", semantic), ("uni", ~semantic)):
            hits, n = int(from_top[mask].sum()), int(mask.sum())
            for acc in (self.window, self.total):
                acc[name][0] += hits
                acc[name][1] += n
            self.sim[name][0] += float(similarity[mask].sum())
            self.sim[name][1] += n

    @staticmethod
    def share(acc: dict, name: str) -> float:
        hits, n = acc[name]
        return hits / n if n else math.nan

    def mean_similarity(self, name: str) -> float:
        total, n = self.sim[name]
        return total / n if n else math.nan


def report_memory(rb: TensorDictReplayBuffer, stats: MemoryStats, frames: int) -> dict[str, float]:
    """Prints what the memory holds and what it served since the last report."""
    storage: HippoStorage = rb.storage
    table = storage.episodes
    finished = (table["rows"] > 0) & table["done"]
    returns = table["return"][finished].float()
    top, threshold = stats.top_decile_episodes(storage)
    # The share of stored transitions that belong to top-decile episodes: what uniform draws get.
    row_slot = storage.row_slot[: len(storage)]
    rows_top = float(((row_slot >= 0) & top[row_slot.clamp_min(0)]).float().mean())
    out = {
        "memory/episodes": storage.num_episodes,
        "memory/transitions": storage.num_valid,
        "memory/best_return": float(returns.max()) if returns.numel() else math.nan,
        "memory/top_decile_threshold": threshold,
        "memory/top_decile_share_semantic": stats.share(stats.window, "sem"),
        "memory/top_decile_share_uniform": stats.share(stats.window, "uni"),
        "memory/top_decile_share_of_rows": rows_top,
        "memory/similarity_semantic": stats.mean_similarity("sem"),
        "memory/similarity_uniform": stats.mean_similarity("uni"),
    }
    if returns.numel():
        q = torch.quantile(returns, torch.tensor([0.0, 0.5, 0.9, 1.0])).tolist()
        table_txt = "min {:.0f} | median {:.0f} | p90 {:.0f} | max {:.0f}".format(*q)
    else:
        table_txt = "no finished episode yet"
    tqdm.write(
        f"[memory @ {frames:>6} frames] {out['memory/episodes']} episodes, "
        f"{out['memory/transitions']} transitions; episode returns: {table_txt}\n"
        f"    draws from top-10% return episodes: retrieval {out['memory/top_decile_share_semantic']:.0%}"
        f" vs uniform {out['memory/top_decile_share_uniform']:.0%}"
        f" (their share of stored rows: {rows_top:.0%}); mean similarity to the anchors:"
        f" retrieval {out['memory/similarity_semantic']:.2f} vs uniform"
        f" {out['memory/similarity_uniform']:.2f}"
    )
    stats.reset()
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    start = time.perf_counter()

    # ---- environment, Q-network, exploration
    env = make_env(device)
    env.set_seed(args.seed)
    actor = QValueActor(
        MLP(in_features=4, out_features=2, num_cells=[128, 128], device=device),
        in_keys=["observation"],
        spec=env.action_spec,
    )
    exploration = EGreedyModule(
        env.action_spec, eps_init=1.0, eps_end=0.05, annealing_num_steps=args.frames // 2
    )
    policy = TensorDictSequential(actor, exploration)
    collector = Collector(
        env,
        policy,
        frames_per_batch=args.frames_per_batch,
        total_frames=args.frames,
        device=device,
        auto_register_policy_transforms=False,
    )

    # ---- the episodic memory as the replay buffer
    encoder = DualEncoder(observation_dim=4, action_dim=2, embed_dim=64, window=8).to(device)
    rb = TensorDictReplayBuffer(
        storage=HippoStorage(args.memory, device=device),
        writer=HippoWriter(encoder),
        sampler=HippoSampler(mixture_ratio=0.3, top_k=16, temperature=0.1, score_uniform=True),
        batch_size=args.batch_size,
    )

    # ---- DQN: the loss reads "priority_weight" from the sampled batch by itself.
    loss_fn = DQNLoss(
        actor,
        action_space=env.action_spec,
        delay_value=True,
        double_dqn=True,
        loss_function="smooth_l1",
    )
    loss_fn.make_value_estimator(gamma=0.99)
    target_updater = SoftUpdate(loss_fn, eps=0.99)
    optim = torch.optim.Adam(loss_fn.parameters(), lr=args.lr)

    run_name = f"dqn-hippo-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    logger = TensorboardLogger(exp_name=run_name, log_dir=args.logdir)
    stats = MemoryStats()
    episode_returns: list[float] = []
    frames = 0
    loss_value = math.nan

    pbar = tqdm(total=args.frames, unit="frames", dynamic_ncols=True)
    for i, batch in enumerate(collector):
        rb.extend(batch)
        frames += batch.numel()
        exploration.step(batch.numel())
        done = batch["next", "done"].squeeze(-1)
        finished = batch["next", "episode_reward"][done].reshape(-1).tolist()
        episode_returns.extend(finished)
        for r in finished:
            logger.log_scalar("train/episode_return", r, step=frames)

        if frames >= args.warmup:
            for _ in range(args.updates_per_batch):
                sample = rb.sample().to(device)
                loss = loss_fn(sample)["loss"]
                optim.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(loss_fn.parameters(), 10.0)
                optim.step()
                target_updater.step()
                stats.update(rb.storage, sample)
            loss_value = loss.item()
            collector.update_policy_weights_()
            logger.log_scalar("train/loss", loss_value, step=frames)
        logger.log_scalar("train/epsilon", float(exploration.eps), step=frames)

        recent = episode_returns[-10:]
        pbar.update(batch.numel())
        pbar.set_postfix(
            episodes=len(episode_returns),
            ret10=f"{sum(recent) / max(len(recent), 1):.1f}",
            eps=f"{float(exploration.eps):.2f}",
            loss=f"{loss_value:.3f}",
        )
        if (i + 1) % args.stats_every == 0 and frames >= args.warmup:
            for name, value in report_memory(rb, stats, frames).items():
                logger.log_scalar(name, value, step=frames)
            finished_returns = rb.storage.episodes["return"][
                (rb.storage.episodes["rows"] > 0) & rb.storage.episodes["done"]
            ]
            logger.log_histogram(
                "memory/episode_returns", finished_returns, step=frames, bins="auto"
            )
    pbar.close()
    collector.shutdown()

    # ---- summary
    recent = episode_returns[-10:]
    sem = MemoryStats.share(stats.total, "sem")
    uni = MemoryStats.share(stats.total, "uni")
    table = rb.storage.episodes
    best = float(table["return"][(table["rows"] > 0) & table["done"]].max())
    rows = [
        ("frames", f"{frames}"),
        ("episodes (finished)", f"{len(episode_returns)}"),
        ("episodes in memory", f"{rb.storage.num_episodes}"),
        ("best return in memory", f"{best:.0f}"),
        ("mean return, last 10 episodes", f"{sum(recent) / max(len(recent), 1):.1f}"),
        ("top-10% episode share: retrieval draws", f"{sem:.1%}"),
        ("top-10% episode share: uniform draws", f"{uni:.1%}"),
        ("wall time", f"{time.perf_counter() - start:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "-" * (width + 12))
    for key, value in rows:
        print(f"{key:<{width}}  {value:>8}")
    print("-" * (width + 12))
    logdir = Path(logger.experiment.log_dir)
    print(f"TensorBoard logs: {logdir}  (tensorboard --logdir {Path(args.logdir)})")
    logger.experiment.close()


if __name__ == "__main__":
    main()
