"""Curriculum retention: after the later corridor stages, does the agent still solve the early ones?

A DQN agent (``dqn_memory.py``'s pipeline, unchanged) trains on a
:class:`~torchrl_hippo.envs.CorridorCurriculum`: a zero-noise corridor that lengthens, stage
by stage (``--lengths``, default 5, 10, 20, 40), once the last ``--window`` episodes of a
stage succeeded at a rate ``>= --threshold`` (``mode="success"``; ``--mode schedule``
advances every ``--episodes-per-stage`` episodes instead). Each of the collector's
environments runs its own curriculum.

At every checkpoint the greedy policy is evaluated on a plain corridor of *each* stage
length, so the curves show when each stage is learnt and whether it is kept. The replay
buffer is deliberately smaller than the run (``--buffer-size``, default 20,000 transitions
of 81,920 frames), so early stages must be retained by the network, or by what the memory
chooses to keep:

- ``uniform``: TorchRL's FIFO ring: the early stages' transitions are gone after
  ``buffer_size`` frames;
- ``hippo``: the episodic memory with ``forgetting="importance"`` (``--forgetting``), which
  evicts low-return, rarely-replayed, old episodes first, and replays high-return episodes by
  retrieval; everything else as in ``dqn_memory.py``.

Besides the greedy success, the probes measure the value error on each stage length: the
mean over the corridor's cells of ``|max_a Q(s, a) - V*(s)|`` with ``V*(s) = gamma ** (L - 1
- cell)``. The observation holds the position as a fraction of the length, so the stages
share one optimal policy (always right) but ask for different values of the same inputs:
the value function is where later stages overwrite earlier ones, even when the policy is
kept.

Outputs (``--out``, default ``results``): ``<name>.json`` (per seed: the curves, the stage
reached, the retention table), ``<name>.png`` (greedy success and value error per stage
length against frames, one column per replay, plus the mean stage) and a printed table:
for each stage length, the greedy success and the value error over the last quarter of the
run, with the best earlier checkpoint in brackets.

Examples::

    python examples/curriculum_retention.py --seeds 0 1 2 --out benchmarks/results \\
        --name curriculum_retention
    python examples/curriculum_retention.py --help
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict
from torchrl.envs import EnvBase
from torchrl.modules import QValueActor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dqn_memory import DQNConfig, episode_step_limit, evaluate, make_env, train

from torchrl_hippo.envs import Corridor, CorridorCurriculum

__all__ = [
    "CURRICULUM_ID",
    "main",
    "make_curriculum_corridor",
    "parse_args",
    "plot_retention",
    "retention_table",
    "run_retention",
]

CURRICULUM_ID = "hippo-examples/CorridorCurriculum-v0"
"""The gymnasium id this script registers for :func:`make_curriculum_corridor`."""
CORRIDOR = "hippo/Corridor-ZeroNoise-v0"


def make_curriculum_corridor(
    lengths: Sequence[int] = (5, 10, 20, 40),
    *,
    mode: str = "success",
    threshold: float = 0.8,
    window: int = 20,
    episodes_per_stage: int = 100,
    noise: float = 0.0,
) -> CorridorCurriculum:
    """A zero-noise (by default) :class:`Corridor` wrapped in a :class:`CorridorCurriculum`.

    Examples:
        >>> env = make_curriculum_corridor((2, 4), mode="schedule", episodes_per_stage=1)
        >>> _ = env.reset(seed=0)
        >>> env.length
        2
    """
    corridor = Corridor(int(lengths[0]), noise=noise)
    return CorridorCurriculum(
        corridor,
        tuple(int(n) for n in lengths),
        mode=mode,
        threshold=threshold,
        window=window,
        episodes_per_stage=episodes_per_stage,
    )


if CURRICULUM_ID not in gym.registry:
    gym.register(CURRICULUM_ID, entry_point=make_curriculum_corridor, disable_env_checker=True)


def corridor_states(length: int, noise_dim: int = 4) -> torch.Tensor:
    """The observation of every non-terminal cell of a zero-noise corridor, ``[length, 4 + noise_dim]``.

    The layout is :class:`~torchrl_hippo.envs.Corridor`'s: position ``cell / length``, the
    far-end flag, two cue entries and the distractors, all zero here.
    """
    obs = torch.zeros(length, 4 + noise_dim)
    obs[:, 0] = torch.arange(length) / length
    return obs


class StageProbe:
    """At each checkpoint, for every stage length: greedy success, value error; and the stage.

    - ``success_len<L>``: success of the greedy policy on a plain corridor of length ``L``;
    - ``value_error_len<L>``: mean over the corridor's cells ``c < L`` of
      ``|max_a Q(s_c, a) - gamma ** (L - 1 - c)|``, the error of the learnt value against
      the optimal one. The observation carries the position as a *fraction* of the length,
      so stages of different lengths ask the same network for different values of the same
      inputs: the greedy policy (always right) is shared by all stages, the value function
      is not, and it is where later stages overwrite earlier ones;
    - ``stage``: the mean over the collector's environments of their curriculum stage.
    """

    def __init__(
        self, lengths: Sequence[int], episodes: int, seed: int, device: str, gamma: float
    ) -> None:
        self.lengths = [int(n) for n in lengths]
        self.envs = {
            n: make_env(CORRIDOR, num_envs=episodes, seed=seed + n, device=device, length=n)
            for n in self.lengths
        }
        self.limits = {n: episode_step_limit(CORRIDOR, {"length": n}) for n in self.lengths}
        self.states = {n: corridor_states(n).to(device) for n in self.lengths}
        self.values = {
            n: gamma ** (n - 1 - torch.arange(n, dtype=torch.float32, device=device))
            for n in self.lengths
        }

    @torch.no_grad()
    def __call__(self, frames: int, actor: QValueActor, env: EnvBase) -> dict[str, float]:
        out = {}
        for n, probe in self.envs.items():
            out[f"success_len{n}"], _ = evaluate(probe, actor, self.limits[n], 1.0)
            td = actor(TensorDict({"observation": self.states[n]}, batch_size=[n]))
            error = (td["action_value"].max(-1).values - self.values[n]).abs().mean()
            out[f"value_error_len{n}"] = float(error)
        vector = env.base_env._env  # the gymnasium SyncVectorEnv inside TorchRL's GymWrapper
        out["stage"] = float(np.mean(vector.get_attr("stage")))
        return out

    def close(self) -> None:
        for env in self.envs.values():
            env.close()


def retention_table(run: dict[str, Any], lengths: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per stage length, over the last quarter of the checkpoints against those before it.

    ``final`` / ``peak``: the last quarter's mean greedy success / the best earlier
    checkpoint (at least ``final``), ``forgetting = peak - final``; when the curve has value
    errors, ``value_error`` / ``best_value_error``: the last quarter's mean / the lowest
    earlier one (at most ``value_error``).
    """
    curve = run["curve"]
    n = len(curve["frames"])
    k = max(1, math.ceil(n / 4))
    out = {}
    for length in lengths:
        values = np.asarray(curve[f"success_len{length}"], dtype=float)
        final = float(values[n - k :].mean())
        peak = float(values[: n - k].max()) if n > k else final
        peak = max(peak, final)
        cell = {"final": final, "peak": peak, "forgetting": max(0.0, peak - final)}
        errors = curve.get(f"value_error_len{length}")
        if errors is not None:
            errors = np.asarray(errors, dtype=float)
            cell["value_error"] = float(errors[n - k :].mean())
            best = float(errors[: n - k].min()) if n > k else cell["value_error"]
            cell["best_value_error"] = min(best, cell["value_error"])
        out[str(length)] = cell
    return out


def run_retention(
    base: DQNConfig,
    replays: Sequence[str],
    seeds: Sequence[int],
    lengths: Sequence[int],
    *,
    probe_episodes: int = 2,
) -> dict[str, Any]:
    """Trains every (replay, seed) on the curriculum; returns runs, retention and summaries."""
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in replays}
    for seed in seeds:
        for kind in replays:
            cfg = replace(base, replay=kind, seed=seed)
            probe = StageProbe(lengths, probe_episodes, seed + 31_337, cfg.device, cfg.gamma)
            try:
                result = train(cfg, on_checkpoint=probe)
            finally:
                probe.close()
            result["retention"] = retention_table(result, lengths)
            result["final_stage"] = result["curve"]["stage"][-1]
            runs[kind].append(result)
            table = "  ".join(
                f"len {n}: {v['final']:.2f} (peak {v['peak']:.2f})"
                for n, v in result["retention"].items()
            )
            print(f"{kind:>8} seed {seed}: stage {result['final_stage']:.2f}; {table}", flush=True)
    summary = {}
    for kind, rs in runs.items():
        summary[kind] = {
            str(n): {
                key: float(np.mean([r["retention"][str(n)][key] for r in rs]))
                for key in ("final", "peak", "forgetting", "value_error", "best_value_error")
            }
            for n in lengths
        }
        summary[kind]["final_stage"] = float(np.mean([r["final_stage"] for r in rs]))
    return {
        "config": {k: v for k, v in vars(base).items() if k not in ("replay", "seed")},
        "lengths": [int(n) for n in lengths],
        "replays": list(replays),
        "seeds": list(seeds),
        "runs": runs,
        "summary": summary,
    }


def format_retention(study: dict[str, Any]) -> str:
    """Markdown: one row per replay and measure, one column per stage length.

    ``greedy success``: the last quarter's (the best earlier checkpoint's); ``value error``:
    the last quarter's (the lowest earlier).
    """
    lengths = study["lengths"]
    head = "| replay | measure | " + " | ".join(f"length {n}" for n in lengths) + " |"
    rows = [head, "|---" * (len(lengths) + 2) + "|"]
    for kind, s in study["summary"].items():
        success = " | ".join(f"{s[str(n)]['final']:.2f} ({s[str(n)]['peak']:.2f})" for n in lengths)
        error = " | ".join(
            f"{s[str(n)]['value_error']:.3f} ({s[str(n)]['best_value_error']:.3f})" for n in lengths
        )
        stage = f"stage reached {s['final_stage']:.2f} / {len(lengths) - 1}"
        rows.append(f"| {kind} | greedy success; {stage} | {success} |")
        rows.append(f"| {kind} | value error | {error} |")
    return "\n".join(rows)


def plot_retention(study: dict[str, Any], path: str | Path) -> Path:
    """One column per replay: greedy success (top, with the mean stage) and value error
    (bottom) per stage length against frames, means over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    replays = [k for k, rs in study["runs"].items() if rs]
    fig, axes = plt.subplots(2, len(replays), figsize=(5.5 * len(replays), 7.5), squeeze=False)
    cmap = plt.get_cmap("viridis")
    lengths = study["lengths"]
    for col, kind in enumerate(replays):
        runs = study["runs"][kind]
        frames = np.asarray(runs[0]["curve"]["frames"], dtype=float)
        top, bottom = axes[0][col], axes[1][col]
        for i, n in enumerate(lengths):
            color = cmap(i / max(1, len(lengths) - 1))
            success = np.asarray([r["curve"][f"success_len{n}"] for r in runs], dtype=float)
            top.plot(frames, success.mean(0), color=color, label=f"length {n}")
            if f"value_error_len{n}" in runs[0]["curve"]:
                error = np.asarray([r["curve"][f"value_error_len{n}"] for r in runs], dtype=float)
                bottom.plot(frames, error.mean(0), color=color, label=f"length {n}")
        stage = np.asarray([r["curve"]["stage"] for r in runs], dtype=float).mean(0)
        twin = top.twinx()
        twin.plot(frames, stage, color="black", linestyle="--", label="mean stage")
        twin.set_ylabel("curriculum stage (mean)")
        twin.set_ylim(-0.1, len(lengths) - 0.9)
        top.set_ylim(-0.05, 1.05)
        top.set_ylabel("greedy success")
        top.set_title(f"{kind} (n={len(runs)})")
        handles, labels = top.get_legend_handles_labels()
        extra_h, extra_l = twin.get_legend_handles_labels()
        top.legend(handles + extra_h, labels + extra_l, fontsize="small", loc="lower right")
        bottom.set_yscale("log")
        bottom.set_ylabel("value error |max Q - V*| (mean over cells)")
        if bottom.get_legend_handles_labels()[0]:
            bottom.legend(fontsize="small")
        for ax in (top, bottom):
            ax.set_xlabel("frames")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--replay", nargs="+", default=["hippo", "uniform"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lengths", nargs="+", type=int, default=[5, 10, 20, 40])
    parser.add_argument("--mode", choices=("success", "schedule"), default="success")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--episodes-per-stage", type=int, default=100)
    parser.add_argument("--frames", type=int, default=81_920)
    parser.add_argument("--frames-per-batch", type=int, default=256)
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=4_096)
    parser.add_argument("--probe-episodes", type=int, default=2)
    parser.add_argument("--buffer-size", type=int, default=20_000)
    parser.add_argument("--forgetting", choices=("fifo", "importance"), default="importance")
    parser.add_argument("--init-frames", type=int, default=1_024)
    parser.add_argument("--updates-per-batch", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--consolidate-every", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="results")
    parser.add_argument("--name", default="curriculum_retention")
    parser.add_argument("--logdir", default="runs/curriculum_retention", help="'none' disables")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true", help="tqdm bar per run")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the study (also written as JSON + PNG)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env_kwargs = {
        "lengths": list(args.lengths),
        "mode": args.mode,
        "threshold": args.threshold,
        "window": args.window,
        "episodes_per_stage": args.episodes_per_stage,
    }
    base = DQNConfig(
        env_id=CURRICULUM_ID,
        env_kwargs=env_kwargs,
        frames=args.frames,
        frames_per_batch=args.frames_per_batch,
        num_envs=args.num_envs,
        eval_every=args.eval_every,
        eval_episodes=0,  # the probes evaluate every stage length instead
        buffer_size=args.buffer_size,
        forgetting=args.forgetting,
        init_frames=args.init_frames,
        updates_per_batch=args.updates_per_batch,
        batch_size=args.batch_size,
        consolidate_every=args.consolidate_every,
        success_threshold=1.0,
        device=args.device,
        logdir=None if args.logdir.lower() == "none" else args.logdir,
        run_name=args.name,
        progress=args.progress,
    )
    study = run_retention(
        base, args.replay, args.seeds, args.lengths, probe_episodes=args.probe_episodes
    )
    study["command"] = "python examples/curriculum_retention.py " + shlex.join(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{args.name}.json"
    json_path.write_text(json.dumps(study, indent=1, default=float) + "\n")
    png_path = plot_retention(study, out / f"{args.name}.png")
    print(
        "last quarter of the run (in brackets: the best earlier checkpoint); value error: "
        "mean |max_a Q - V*| over the corridor's cells"
    )
    print(format_retention(study))
    print(f"results: {json_path}  plot: {png_path}")
    if base.logdir is not None:
        print(f"TensorBoard: tensorboard --logdir {base.logdir}")
    return study


if __name__ == "__main__":
    main()
