"""Sparse-reward study: DQN with hippo, uniform and prioritized replay on equal frames.

Settings (each run by ``examples/dqn_memory.py``'s :func:`run_study`, 5 seeds, the three
replays, every other setting identical):

==================== ============================================ ========== ===========
setting              environment                                  frames     checkpoints
==================== ============================================ ========== ===========
``corridor20``       ``hippo/Corridor-ZeroNoise-v0``, length 20     40,960     every 4,096
``corridor30``       ``hippo/Corridor-ZeroNoise-v0``, length 30     61,440     every 4,096
``corridor50``       ``hippo/Corridor-ZeroNoise-v0``, length 50    102,400     every 4,096
``corridor100``      ``hippo/Corridor-ZeroNoise-v0``, length 100   204,800     every 8,192
``control10``        ``hippo/Corridor-ZeroNoise-v0``, length 10     20,480     every 2,048
``cartpole``         ``CartPole-v1``                                61,440     every 4,096
==================== ============================================ ========== ===========

The corridor pays ``1.0`` at the far end only (a random walk needs about ``length ** 2``
steps to get there, the episode is cut at ``4 * (length + 1)``): a uniformly random policy
succeeds in 23% of the episodes at length 10, 5.1% at 20, 1.2% at 30, 0.09% at 50 and
never (< 1e-5) at 100. ``corridor30`` (not in the issue's grid; added before it was run) is
the regime where successes are rare but do occur under exploration, so that what the replay
makes of them matters most. The two controls have
short episodes (``control10``: solved in 10 steps) or dense reward (CartPole), where an
episodic memory has nothing rare to replay: there hippo should match uniform replay.

Outputs (``--out``, default ``benchmarks/results``): ``sparse_study.json`` (every run's
curves, per-setting summaries, verdicts; rewritten after each run, so an interrupted study
can go on with ``--resume``), ``sparse_study.png`` (one column per setting: greedy and
training success, or return for CartPole) and ``sparse_study.md`` (the tables and
verdicts). TensorBoard logs: ``runs/sparse_study``.

Verdicts, computed from the summaries:

- ``corridor50``: hippo's success rate (training episodes over the last quarter of the
  budget) at least twice uniform's;
- controls: hippo within 5% of uniform (relative), on success rate for ``control10`` and on
  the last quarter's training return for CartPole.

Commands::

    python benchmarks/sparse_study.py                      # everything (~40 min of one core)
    python benchmarks/sparse_study.py --only corridor50    # one setting
    python benchmarks/sparse_study.py --resume             # go on after an interruption
    python benchmarks/sparse_study.py --quick --out /tmp/s # smoke run, a minute
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from dqn_memory import (
    REPLAYS,
    DQNConfig,
    format_table,
    late_stats,
    plot_curves,
    success_threshold,
    summarize,
    train,
)

CORRIDOR = "hippo/Corridor-ZeroNoise-v0"

#: setting name -> (DQNConfig overrides, metric of its verdict and plot)
SETTINGS: dict[str, tuple[dict[str, Any], str]] = {
    "corridor20": (
        {"env_kwargs": {"length": 20}, "frames": 40_960, "eval_every": 4_096},
        "success",
    ),
    "corridor30": (
        {"env_kwargs": {"length": 30}, "frames": 61_440, "eval_every": 4_096},
        "success",
    ),
    "corridor50": (
        {"env_kwargs": {"length": 50}, "frames": 102_400, "eval_every": 4_096},
        "success",
    ),
    "corridor100": (
        {"env_kwargs": {"length": 100}, "frames": 204_800, "eval_every": 8_192},
        "success",
    ),
    "control10": ({"env_kwargs": {"length": 10}, "frames": 20_480, "eval_every": 2_048}, "success"),
    "cartpole": ({"env_id": "CartPole-v1", "frames": 61_440, "eval_every": 4_096}, "return"),
}
QUICK = {"frames": 1_024, "eval_every": 512, "frames_per_batch": 128, "num_envs": 4}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--replay", nargs="+", choices=REPLAYS, default=list(REPLAYS))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--prefix", default="sparse_study", help="output file names")
    parser.add_argument("--logdir", default="runs/sparse_study", help="'none' disables")
    parser.add_argument("--resume", action="store_true", help="keep runs already in the JSON")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,024 frames a run")
    parser.add_argument("--progress", action="store_true", help="tqdm bar per run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-retrieval-gate",
        action="store_true",
        help="hippo retrieves from the start (the study's first version)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the PNG and markdown from the JSON"
    )
    return parser.parse_args(argv)


def setting_config(name: str, args: argparse.Namespace) -> DQNConfig:
    overrides, _ = SETTINGS[name]
    logdir = None if args.logdir.lower() == "none" else args.logdir
    cfg = DQNConfig(env_id=CORRIDOR, run_name=name, logdir=logdir, progress=args.progress)
    cfg = replace(cfg, **overrides, retrieval_gate=not args.no_retrieval_gate)
    return replace(cfg, **QUICK) if args.quick else cfg


def verdicts(studies: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The study's three checks, from the per-setting summaries (``None`` until run)."""

    def value(name: str, kind: str, key: str) -> float:
        study = studies.get(name)
        if not study or kind not in study["summary"]:
            return math.nan
        return study["summary"][kind][key]

    out: dict[str, dict[str, Any]] = {}
    hippo, uniform = (
        value("corridor50", "hippo", "success_rate"),
        value("corridor50", "uniform", "success_rate"),
    )
    if not math.isnan(hippo) and not math.isnan(uniform):
        ratio = hippo / uniform if uniform > 0 else (math.inf if hippo > 0 else math.nan)
        out["corridor50_hippo_2x_uniform"] = {
            "hippo": hippo,
            "uniform": uniform,
            "ratio": ratio,
            "passed": bool(ratio >= 2.0),
        }
    for name, key in (("control10", "success_rate"), ("cartpole", "late_return")):
        hippo, uniform = value(name, "hippo", key), value(name, "uniform", key)
        if math.isnan(hippo) or math.isnan(uniform):
            continue
        if hippo == uniform:
            gap = 0.0
        else:
            gap = (hippo - uniform) / abs(uniform) if uniform else math.inf
        out[f"{name}_hippo_within_5pct"] = {
            "metric": key,
            "hippo": hippo,
            "uniform": uniform,
            "relative_gap": gap,
            "passed": bool(abs(gap) <= 0.05),
        }
    return out


def plot(studies: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SETTINGS if n in studies]
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        metric = SETTINGS[name][1]
        for row, key in enumerate((f"eval_{metric}", f"train_{metric}")):
            plot_curves(axes[row][col], studies[name], key)
        axes[0][col].set_title(name)
    fig.suptitle("DQN: hippo vs uniform vs prioritized replay (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Sparse-reward study",
        "",
        "Regenerate: `python benchmarks/sparse_study.py` (this file was written by "
        f"`{report['command']}`).",
        "",
        *([report["note"], ""] if report.get("note") else []),
        "Success rate: share of training episodes that reached the goal over the last quarter "
        "of the frame budget (epsilon 0.05), mean ± std over seeds. Greedy success: the greedy "
        "policy over the last quarter's evaluations.",
        "",
    ]
    for name in sorted(report["studies"], key=list(SETTINGS).index):
        study = report["studies"][name]
        cfg = study["config"]
        metric = SETTINGS[name][1]
        cpu = sum(s["cpu_time_s"] for s in study["summary"].values())
        kwargs = "".join(f", {k} {v}" for k, v in cfg["env_kwargs"].items())
        lines += [
            f"## {name}: `{cfg['env_id']}`{kwargs} ({cfg['frames']:,} frames, "
            f"seeds {study['seeds']}, {cpu / 60:.1f} min CPU)",
            "",
            format_table(study, metric=metric),
            "",
        ]
    lines += ["## Verdicts", "", "```", json.dumps(report["verdicts"], indent=1), "```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{args.prefix}.json"
    report: dict[str, Any] = {"studies": {}}
    if (args.resume or args.report_only) and json_path.exists():
        report = json.loads(json_path.read_text())
    if args.report_only:
        write_reports(report, out, args.prefix)
        return report
    report["command"] = "python benchmarks/sparse_study.py " + shlex.join(argv)
    report["settings"] = {n: SETTINGS[n][0] for n in args.only}
    start = time.perf_counter()

    def save(complete: bool) -> None:
        report["verdicts"] = verdicts(report["studies"])
        report["complete"] = complete
        json_path.write_text(json.dumps(report, indent=1, default=float) + "\n")

    for name in args.only:
        base = setting_config(name, args)
        study = report["studies"].get(name)
        if study is None or study["config"]["frames"] != base.frames:
            study = {"config": None, "seeds": list(args.seeds), "runs": {}, "summary": {}}
        study["config"] = {k: v for k, v in vars(base).items() if k not in ("replay", "seed")}
        study["success_threshold"] = success_threshold(base.env_id, base.success_threshold)
        study["seeds"] = list(args.seeds)
        report["studies"][name] = study
        for seed in args.seeds:
            for kind in args.replay:
                runs = study["runs"].setdefault(kind, [])
                if any(r["seed"] == seed for r in runs):
                    continue
                result = train(replace(base, replay=kind, seed=seed))
                runs.append(result)
                runs.sort(key=lambda r: r["seed"])
                study["summary"] = {k: summarize(rs) for k, rs in study["runs"].items() if rs}
                save(complete=False)
                first = result["first_success_frame"]
                print(
                    f"[{time.perf_counter() - start:7.0f} s] {name} {kind:>11} seed {seed}: "
                    f"success {late_stats(result)['late_train_success']:.3f}, first success "
                    f"{'-' if first is None else first}, {result['cpu_time_s']:.0f} s CPU",
                    flush=True,
                )
        print(format_table(study, metric=SETTINGS[name][1]), flush=True)
    save(complete=True)
    write_reports(report, out, args.prefix)
    print(json.dumps(report["verdicts"], indent=1))
    return report


def write_reports(report: dict[str, Any], out: Path, prefix: str) -> None:
    """Writes ``<prefix>.png`` and ``<prefix>.md`` from a study report.

    Summaries and verdicts are recomputed from the runs (and written back to the JSON).
    """
    for study in report["studies"].values():
        study["summary"] = {k: summarize(rs) for k, rs in study["runs"].items() if rs}
    report["verdicts"] = verdicts(report["studies"])
    (out / f"{prefix}.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    plot(report["studies"], out / f"{prefix}.png")
    (out / f"{prefix}.md").write_text(markdown(report))
    print(f"wrote {out / (prefix + '.json')}, {out / (prefix + '.png')}, {out / (prefix + '.md')}")


if __name__ == "__main__":
    main()
