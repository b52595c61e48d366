"""Partial observability and long horizons: PPO with HierarchicalMemory against PPO-GRU and PPO-MLP.

Every model trains with the PPO of ``examples/ppo_hierarchical.py`` (``Collector``, ``GAE``,
``ClipPPOLoss`` on ``[envs, T]`` chunks, the same hyperparameters), on the same frames and the
same seeds, and differs only in the core between the observation encoder and the heads:

- ``hmem``: ``HierarchicalMemory`` (32-step ring, 16 VAE summaries, 8 templates) + its ELBO;
- ``gru``: TorchRL's ``GRUModule`` of the same width;
- ``mlp``: no core (memory-less).

Tasks (``--envs``; presets in ``examples/ppo_hierarchical.py``'s ``ENVS``):

- ``corridor-cue``: ``hippo/Corridor-Cue-v0``: a cue in the first observation names which of
  two end actions pays at the far end of a noisy corridor. A memory-less policy can reach the
  end but must guess: its best success rate is 0.5.
- ``multiroom``: ``hippo/MultiRoomKeys-v0``: a 5x5 view of 4x4 rooms; find the key, open the
  locked door with it, reach the goal; the return counts 0.1 for the door and 1.0 at the goal.

For each (task, model, seed) the script records the curves of one PPO run (per collected batch:
success rate and mean return of the episodes that ended in it, episode length, losses, wall and
CPU time), then summarises each (task, model) cell over seeds: the final success and return
(mean over the last ``--window`` batches, then mean ± std over seeds, the population std
``ddof=0``) and the frames at which
the success rate, smoothed over ``--window`` batches, first reached the task's threshold
(``--threshold``). It writes, under ``--output-dir``:

- ``<prefix>.json``: configuration, the exact command, every curve, the summaries (rewritten
  after every run, so an interrupted study keeps its finished runs; ``--resume`` skips them);
- ``<prefix>.png``: success and return against frames: each seed, their mean and range;
- ``<prefix>.md``: the summary table in markdown.

Commands (from the repository root)::

    python3 benchmarks/ppo_memory_study.py                  # the full study (see --help)
    python3 benchmarks/ppo_memory_study.py --smoke          # 256 frames per run, tiny tasks
    python3 benchmarks/ppo_memory_study.py --resume         # finish an interrupted study
    python3 benchmarks/ppo_memory_study.py --replot         # redraw PNG and table from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.ppo_hierarchical import ENVS, MODELS, train  # noqa: E402
from examples.ppo_hierarchical import parse_args as ppo_args  # noqa: E402

# Success rate that counts as "solved" when counting frames to threshold, per task: above the
# memory-less ceiling of 0.5 for the cue corridor.
DEFAULT_THRESHOLDS = {"corridor-cue": 0.75, "multiroom": 0.5, "cue-recall": 0.9}
# The best success rate of a policy without memory, where it is known.
MEMORYLESS_CEILING = {"corridor-cue": 0.5, "cue-recall": 0.25}
# Smoke mode: tiny tasks whose episodes all end within 16 steps, a few hundred frames per run.
SMOKE_ENV_KWARGS = {
    "corridor-cue": {"length": 3},
    "multiroom": {"rooms": 2, "room_size": 2, "max_steps": 16},
    "cue-recall": {"delay": 8},
}
SMOKE_PPO = ["--num-envs", "4", "--epochs", "1", "--width", "16"]
SMOKE_FRAMES = 256
CURVES = ("success", "return", "episode_length", "time_s", "cpu_s", "kl_first_minibatch")
LABELS = {"hmem": "PPO + HierarchicalMemory", "gru": "PPO + GRUModule", "mlp": "PPO + MLP"}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The study's options, and the rest of ``argv`` (options for every PPO run)."""
    # No abbreviations: "--model" must not pass for "--models" (it is rejected below).
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--envs", nargs="+", choices=sorted(ENVS), default=["corridor-cue", "multiroom"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--frames", type=int, default=None, help="frames per run (default: 180000; 256 in smoke)"
    )
    parser.add_argument("--window", type=int, default=3, help="batches averaged for 'final'")
    parser.add_argument(
        "--threshold",
        nargs="+",
        default=[],
        metavar="ENV=SUCCESS",
        help=f"success thresholds for frames-to-threshold (defaults: {DEFAULT_THRESHOLDS})",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny tasks, a few hundred frames")
    parser.add_argument("--resume", action="store_true", help="skip runs already in the JSON")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the PNG and the table from the JSON"
    )
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--prefix", default=None, help="default: ppo_memory_study[_smoke]")
    parser.add_argument("--logdir", default="runs/ppo_memory_study", help="TensorBoard root")
    parser.add_argument("--progress", action="store_true", help="show tqdm bars")
    # Anything else (--lr, --num-envs, --epochs, --env-kwargs, ...) goes to every PPO run.
    args, rest = parser.parse_known_args(argv)
    if args.frames is None:
        args.frames = SMOKE_FRAMES if args.smoke else 180_000
    if args.frames < 1 or args.window < 1:
        parser.error("--frames and --window must be >= 1.")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}.")
    thresholds = dict(DEFAULT_THRESHOLDS)
    for item in args.threshold:
        name, _, value = item.partition("=")
        if name not in ENVS or not value:
            parser.error(f"--threshold takes ENV=SUCCESS with ENV in {sorted(ENVS)}, got {item!r}.")
        thresholds[name] = float(value)
    args.thresholds = thresholds
    if args.prefix is None:
        args.prefix = "ppo_memory_study_smoke" if args.smoke else "ppo_memory_study"
    for forbidden in ("--model", "--agent", "--env", "--seed", "--output"):
        if any(item == forbidden or item.startswith(forbidden + "=") for item in rest):
            parser.error(f"{forbidden} is set by the study; use --models/--envs/--seeds.")
    return args, rest


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values, NaNs skipped (NaN where the window holds none)."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def summarize_run(records: list[dict[str, float]], window: int, threshold: float) -> dict:
    """One run's curves and its final numbers."""
    frames = [int(r["frames"]) for r in records]
    curves = {name: [float(r[name]) for r in records] for name in CURVES}
    smooth = moving_average(curves["success"], window)
    reached = next((f for f, s in zip(frames, smooth) if s >= threshold), None)
    return {
        "frames": frames,
        **curves,
        "success_smoothed": smooth,
        "final_success": moving_average(curves["success"], window)[-1],
        "final_return": moving_average(curves["return"], window)[-1],
        "frames_to_threshold": reached,
        "wall_time_s": curves["time_s"][-1],
        "cpu_time_s": curves["cpu_s"][-1],
    }


def summarize_cell(runs: dict[str, dict]) -> dict:
    """Mean ± std over seeds of one (task, model) cell."""
    success = _mean_std([run["final_success"] for run in runs.values()])
    ret = _mean_std([run["final_return"] for run in runs.values()])
    reached = [run["frames_to_threshold"] for run in runs.values()]
    hits = [f for f in reached if f is not None]
    return {
        "seeds": len(runs),
        "final_success_mean": success[0],
        "final_success_std": success[1],
        "final_return_mean": ret[0],
        "final_return_std": ret[1],
        "frames_to_threshold": reached,
        "seeds_reaching_threshold": len(hits),
        "frames_to_threshold_mean_of_reached": statistics.fmean(hits) if hits else None,
        "wall_time_s": sum(run["wall_time_s"] for run in runs.values()),
        "cpu_time_s": sum(run["cpu_time_s"] for run in runs.values()),
    }


def _jsonable(value: Any) -> Any:
    """NaN -> None, recursively, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _fmt(mean: float | None, std: float | None) -> str:
    """``mean ± std`` (or ``mean`` when ``std`` is None) to 3 decimals; ``n/a`` for None/NaN."""
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def markdown_table(payload: dict) -> str:
    """The summary table of a study (one row per task and model)."""
    actual = ", ".join(
        f"{env} {next(iter(seeds.values()))['frames'][-1]:,} in {payload['batches'][env]} batches"
        for env, models in payload["runs"].items()
        for seeds in list(models.values())[:1]
        if seeds
    )
    lines = [
        f"PPO memory study: {payload['frames_per_run']:,} frames per run requested, rounded up "
        f"to whole batches ({actual}), the same for every model; seeds {payload['seeds']}. "
        f"Final = mean of the last {payload['window']} batches, then mean ± std over seeds "
        "(population std, ddof=0).",
        "",
        "| task | model | final success | per seed | final return | frames to success ≥ "
        "threshold (per seed) | CPU time (all seeds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for env, cells in payload["summary"].items():
        threshold = payload["thresholds"][env]
        for model, cell in cells.items():
            reached = ", ".join(
                "never" if f is None else f"{f:,}" for f in cell["frames_to_threshold"]
            )
            per_seed = ", ".join(
                _fmt(run["final_success"], None) for run in payload["runs"][env][model].values()
            )
            lines.append(
                f"| {env} | {model} | "
                f"{_fmt(cell['final_success_mean'], cell['final_success_std'])} | {per_seed} | "
                f"{_fmt(cell['final_return_mean'], cell['final_return_std'])} | "
                f"{threshold}: {reached} | {cell['cpu_time_s']:.0f} s |"
            )
    lines += ["", f"Regenerate: `{payload['command']}`", ""]
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    """Success and return against frames: per model, the mean over seeds and its range."""
    envs = list(payload["runs"])
    fig, axes = plt.subplots(2, len(envs), figsize=(6 * len(envs), 7), squeeze=False)
    colours = {"hmem": "tab:blue", "gru": "tab:orange", "mlp": "tab:green"}
    for column, env in enumerate(envs):
        for row, (name, label) in enumerate(
            (("success_smoothed", "success rate"), ("return", "mean episode return"))
        ):
            ax = axes[row][column]
            for model, runs in payload["runs"][env].items():
                if not runs:
                    continue
                frames = next(iter(runs.values()))["frames"]
                curves = [
                    moving_average(run[name], payload["window"]) if name == "return" else run[name]
                    for run in runs.values()
                ]
                per_step = list(zip(*curves))
                mean = [statistics.fmean(v) for v in per_step]
                ax.plot(frames, mean, color=colours[model], linewidth=2, label=LABELS[model])
                ax.fill_between(
                    frames,
                    [min(v) for v in per_step],
                    [max(v) for v in per_step],
                    color=colours[model],
                    alpha=0.12,
                )
                for curve in curves:  # each seed, thin
                    ax.plot(frames, curve, color=colours[model], linewidth=0.7, alpha=0.5)
            if row == 0:
                ceiling = payload["memoryless_ceiling"].get(env)
                if ceiling is not None:
                    ax.axhline(ceiling, color="gray", linestyle=":", label="memory-less best")
                ax.axhline(
                    payload["thresholds"][env],
                    color="black",
                    linestyle="--",
                    linewidth=0.8,
                    label="threshold",
                )
                ax.set_ylim(-0.02, 1.02)
                kwargs = ", ".join(
                    f"{k}={v}" for k, v in payload["env_presets"][env]["kwargs"].items()
                )
                ax.set_title(
                    f"{env} ({kwargs})\n{len(payload['seeds'])} seed(s): mean (thick), "
                    "each seed (thin)",
                    fontsize=10,
                )
            ax.set_xlabel("environment frames")
            ax.set_ylabel(label + f" ({payload['window']}-batch mean)")
            ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Runs the study and writes ``<prefix>.{json,png,md}``; returns the JSON payload."""
    args, rest = parse_args(argv)
    # The command that regenerates the study (a resumed study is the same study).
    argv_used = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{args.prefix}.json"
    runs: dict[str, dict[str, dict[str, dict]]] = {
        env: {model: {} for model in args.models} for env in args.envs
    }
    configs: dict[str, dict] = {}
    if args.replot:
        payload = json.loads(json_path.read_text())
        _write_reports(payload, out_dir, args.prefix)
        return payload
    previous = json.loads(json_path.read_text()) if args.resume and json_path.exists() else None
    if previous is not None:
        dropped = [
            f"{env}/{model}/seed {seed}"
            for env, models in previous.get("runs", {}).items()
            for model, seeds in models.items()
            for seed in seeds
            if env not in args.envs or model not in args.models or int(seed) not in args.seeds
        ]
        if dropped:
            raise SystemExit(
                f"--resume would drop the runs {dropped} of {json_path}: give the same --envs, "
                "--models and --seeds (or more), or another --prefix."
            )

    load_start = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    payload: dict[str, Any] = {}
    for seed in args.seeds:
        for env in args.envs:
            for model in args.models:
                env_args = []
                if args.smoke:
                    env_args = ["--env-kwargs", json.dumps(SMOKE_ENV_KWARGS[env]), *SMOKE_PPO]
                ppo = ppo_args(
                    [
                        *env_args,
                        *rest,
                        *("--model", model, "--env", env, "--seed", str(seed)),
                        *("--frames", str(args.frames), "--logdir", args.logdir),
                        *([] if args.progress else ["--no-progress"]),
                    ]
                )
                config = {
                    k: v
                    for k, v in vars(ppo).items()
                    if k not in ("model", "seed", "seeds", "output", "no_progress", "logdir")
                }
                configs[env] = config
                done = (previous or {}).get("runs", {}).get(env, {}).get(model, {}).get(str(seed))
                if done is not None and previous["ppo_config"].get(env) == config:
                    runs[env][model][str(seed)] = done
                    print(f"{env} {model} seed {seed}: kept from {json_path}", flush=True)
                    continue
                records = train(ppo)
                run = summarize_run(records, args.window, args.thresholds[env])
                runs[env][model][str(seed)] = run
                print(
                    f"{env} {model} seed {seed}: final success {run['final_success']:.3f}, "
                    f"return {run['final_return']:.3f}, threshold reached at "
                    f"{run['frames_to_threshold']} frames; {run['frames'][-1]} frames in "
                    f"{run['wall_time_s']:.0f} s wall, {run['cpu_time_s']:.0f} s CPU",
                    flush=True,
                )
                payload = _payload(args, argv_used, runs, configs, started, load_start)
                json_path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")

    payload = _payload(args, argv_used, runs, configs, started, load_start, complete=True)
    json_path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    _write_reports(payload, out_dir, args.prefix)
    return payload


def _write_reports(payload: dict, out_dir: Path, prefix: str) -> None:
    """Draws ``<prefix>.png`` and writes the table ``<prefix>.md`` from a study's payload."""
    png_path = out_dir / f"{prefix}.png"
    plot(payload, png_path)
    md_path = out_dir / f"{prefix}.md"
    md_path.write_text(markdown_table(payload))
    print(markdown_table(payload))
    print(f"wrote {png_path} and {md_path} (numbers in {out_dir / (prefix + '.json')})")


def _payload(
    args: argparse.Namespace,
    argv: list[str],
    runs: dict,
    configs: dict,
    started: str,
    load_start: tuple[float, float, float],
    *,
    complete: bool = False,
) -> dict[str, Any]:
    summary = {
        env: {model: summarize_cell(seeds) for model, seeds in models.items() if seeds}
        for env, models in runs.items()
    }
    batches = {
        env: len(next(iter(seeds.values()))["frames"])
        for env, models in runs.items()
        for seeds in models.values()
        if seeds
    }
    return {
        "benchmark": "ppo_memory_study",
        "command": shlex.join(["python3", "benchmarks/ppo_memory_study.py", *argv]),
        "complete": complete,
        "started": started,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu-{os.cpu_count()}core",
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "smoke": args.smoke,
        "models": args.models,
        "envs": args.envs,
        "seeds": args.seeds,
        "frames_per_run": args.frames,
        "batches": batches,
        "window": args.window,
        "thresholds": {env: args.thresholds[env] for env in args.envs},
        "memoryless_ceiling": {
            env: MEMORYLESS_CEILING[env] for env in args.envs if env in MEMORYLESS_CEILING
        },
        "env_presets": {
            env: {
                "gym_id": ENVS[env].gym_id,
                "kwargs": {**ENVS[env].kwargs, **(configs.get(env, {}).get("env_kwargs") or {})},
                "success_return": ENVS[env].success_return,
            }
            for env in args.envs
        },
        "ppo_config": configs,
        "summary": summary,
        "runs": runs,
    }


if __name__ == "__main__":
    main()
