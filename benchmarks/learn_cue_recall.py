"""Learning check: PPO with HierarchicalMemory against PPO with an MLP actor, on cue recall.

The task (``benchmarks/cue_recall_env.py``) shows one of ``--num-cues`` cues at step 0 and
rewards, ``--delay`` (default 60) steps later, the action that names it; success is the
fraction of episodes that end with that action, chance is ``1 / num_cues``. Both agents train
with the PPO of ``examples/ppo_hierarchical.py`` (``Collector``, ``GAE``, ``ClipPPOLoss``, the
same hyperparameters and frames): ``hmem`` with ``make_hierarchical_actor_critic`` (plus
``MemoryELBOLoss``), ``mlp`` with memory-less MLP actor and critic of the same width.

The check passes when the hmem agent reaches a success of at least 0.9 (mean of the last
``--window`` batches, each of ``--num-envs`` episodes) while the MLP agent stays near chance.
The script records both curves in ``benchmarks/results/learn_cue_recall.json`` and plots them in
``benchmarks/results/learn_cue_recall.png``.

Commands (from the repository root)::

    python3 benchmarks/learn_cue_recall.py                    # 300k frames per agent
    python3 benchmarks/learn_cue_recall.py --frames 100000    # a shorter run
    python3 benchmarks/learn_cue_recall.py --agents hmem --output-prefix hmem_only
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.ppo_hierarchical import parse_args as ppo_args  # noqa: E402
from examples.ppo_hierarchical import train  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=300_000, help="frames per agent")
    parser.add_argument("--agents", nargs="+", choices=["hmem", "mlp"], default=["hmem", "mlp"])
    parser.add_argument("--window", type=int, default=5, help="batches averaged for success")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--output-prefix", default="learn_cue_recall")
    # Anything else (--delay, --num-cues, --lr, --seed, ...) goes to the PPO script.
    return parser.parse_known_args(argv)


def moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(chunk) / len(chunk) if chunk else float("nan"))
    return out


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    runs = {}
    config = None
    for agent in args.agents:
        ppo = ppo_args([*rest, "--agent", agent, "--frames", str(args.frames), "--no-progress"])
        config = {k: v for k, v in vars(ppo).items() if k not in ("agent", "no_progress")}
        records = train(ppo)
        frames = [r["frames"] for r in records]
        success = [r["success"] for r in records]
        smooth = moving_average(success, args.window)
        reached = next((f for f, s in zip(frames, smooth) if s >= args.target), None)
        runs[agent] = {
            "frames": frames,
            "success": success,
            "success_smoothed": smooth,
            "time_s": [r["time_s"] for r in records],
            "kl_first_minibatch": [r["kl_first_minibatch"] for r in records],
            # Per batch: the means over its updates of every logged loss entry.
            "logs": {
                key: [r[key] for r in records]
                for key in records[0]
                if key not in ("frames", "success", "time_s", "kl_first_minibatch")
            },
            "final_success": smooth[-1],
            "frames_to_target": reached,
            "wall_time_s": records[-1]["time_s"],
        }
        print(
            f"{agent}: final success {smooth[-1]:.3f} (mean of the last {args.window} batches), "
            f"{args.target} first reached at {reached} frames, {frames[-1]} frames in "
            f"{records[-1]['time_s']:.0f} s",
            flush=True,
        )

    chance = 1.0 / config["num_cues"]
    verdict = {}
    if "hmem" in runs:
        verdict["hmem_reaches_target"] = runs["hmem"]["final_success"] >= args.target
    if "mlp" in runs:
        # "Near chance": within 0.1 of 1 / num_cues, far below the target.
        verdict["mlp_near_chance"] = abs(runs["mlp"]["final_success"] - chance) <= 0.1
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "learn_cue_recall",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu-{os.cpu_count()}core",
        "frames_per_agent": args.frames,
        "success_window_batches": args.window,
        "target": args.target,
        "chance": chance,
        "ppo_config": config,
        "runs": runs,
        "verdict": verdict,
    }
    json_path = out_dir / f"{args.output_prefix}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4))
    for agent, run in runs.items():
        label = "PPO + HierarchicalMemory" if agent == "hmem" else "PPO + MLP actor"
        ax.plot(run["frames"], run["success"], alpha=0.25)
        ax.plot(run["frames"], run["success_smoothed"], label=label, color=ax.lines[-1].get_color())
    ax.axhline(chance, color="gray", linestyle=":", label=f"chance ({chance:.2f})")
    ax.axhline(args.target, color="black", linestyle="--", linewidth=0.8, label="target")
    ax.set_xlabel("environment frames")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Cue recall, delay {config['delay']}, {config['num_cues']} cues")
    ax.legend(loc="upper left")
    fig.tight_layout()
    png_path = out_dir / f"{args.output_prefix}.png"
    fig.savefig(png_path, dpi=120)
    print(f"wrote {json_path} and {png_path}; verdict {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
