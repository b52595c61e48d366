"""Resource budget of PPO with HierarchicalMemory, against a GRUModule PPO of the same width.

Both agents run on the same cue-recall env (``benchmarks/cue_recall_env.py``: ``--num-envs``
envs in one in-process vector env, ``--delay`` 60) with the same shape of networks:
``observation -> MLP encoder (tanh, width) -> memory -> MLP head``, for the actor and, with its
own memory, for the critic:

- ``hmem``: :func:`~torchrl_hippo.modules.builders.make_hierarchical_actor_critic`
  (``HierarchicalMemory(width)``: 32 / 16 / 8 slots, 32-dim summaries);
- ``gru``: the same encoders and heads around ``torchrl.modules.GRUModule(width, width)``.

Each (agent, phase) is measured in a fresh Python process, so its peak memory is its own:

- **inference**: the actor alone (no critic, no gradient) acting in the env for
  ``--inference-frames`` frames, step after step (``actor``, then
  ``env.step_and_maybe_reset``), keeping no trajectory, as a deployed policy does (env
  transforms from ``get_env_transforms_from_module(actor)``); plus the actor's forward alone on
  a ``[num_envs]`` step (no env), as steps/s.
- **training**: ``--train-iters`` PPO iterations: collect ``num_envs x (delay + 1)`` frames
  with actor + critic, GAE (``shifted=True``), ``--epochs`` x ``--minibatches`` updates of
  ``ClipPPOLoss`` (+ ``MemoryELBOLoss`` for hmem) on ``[envs, T]`` chunks, Adam.

Memory: once the worker process has imported its libraries (torch, torchrl, the package), the
script records its resident set size (RSS, the baseline), resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), then builds the env and the modules, runs a warm-up batch and the
timed phase, and reads the peak (``VmHWM``). It reports the process's peak RSS and the peak
above the baseline: everything the agent needed (modules, env, collector buffers, collected
data, autograd graphs, optimiser state). The baseline itself, a Python process that has
imported torch and torchrl, is ~0.4 GB whatever the model. Speed: environment frames per second
of wall time (median of the timed batches for inference).

Writes ``benchmarks/results/bench_hierarchical_<device>.json`` (``cpu-<n>core``) and prints a
table. Targets (from the issue): training peak < 2 GB, inference peak < 200 MB.

Commands (from the repository root)::

    python3 benchmarks/bench_hierarchical.py           # under a minute on a 2-core CPU
    python3 benchmarks/bench_hierarchical.py --quick   # smoke run, writes ..._quick.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS_MB = {"training": 2048.0, "inference": 200.0}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def make_gru_actor_critic(env, width: int) -> dict:
    """The GRU counterpart of ``make_hierarchical_actor_critic``: same encoders and heads."""
    from tensordict.nn import TensorDictModule, TensorDictSequential
    from torchrl.envs import Compose, InitTracker, RewardSum, StepCounter
    from torchrl.modules import GRUModule, ProbabilisticActor

    from torchrl_hippo.modules.builders import make_encoder, make_head

    obs_dim = env.observation_spec_unbatched["observation"].shape[-1]
    n_actions = env.action_spec_unbatched.space.n

    def branch(prefix: str, out_features: int, out_key: str, last_scale: float):
        gru = GRUModule(
            input_size=width,
            hidden_size=width,
            in_keys=[f"{prefix}embed", f"{prefix}rs", "is_init"],
            out_keys=[f"{prefix}features", ("next", f"{prefix}rs")],
        )
        body = TensorDictSequential(
            TensorDictModule(
                make_encoder(obs_dim, width, width), ["observation"], [f"{prefix}embed"]
            ),
            gru,
            TensorDictModule(
                make_head(width, out_features, width, last_scale), [f"{prefix}features"], [out_key]
            ),
        )
        return body, gru

    actor_body, actor_gru = branch("", n_actions, "logits", 0.01)
    critic, critic_gru = branch("critic_", 1, "state_value", 1.0)
    actor = ProbabilisticActor(
        actor_body,
        in_keys=["logits"],
        spec=env.action_spec_unbatched,
        distribution_class=torch.distributions.OneHotCategorical,
        return_log_prob=True,
    )
    transforms = Compose(
        InitTracker(),
        StepCounter(),
        RewardSum(),
        actor_gru.make_tensordict_primer(),
        critic_gru.make_tensordict_primer(),
    )
    return {
        "actor": actor,
        "critic": critic,
        "policy": TensorDictSequential(actor, critic),
        "transforms": transforms,
        "memories": (),
    }


def _build(agent: str, args: argparse.Namespace):
    from benchmarks.cue_recall_env import make_cue_recall_env
    from torchrl_hippo.modules.builders import make_hierarchical_actor_critic

    base = make_cue_recall_env(args.num_envs, delay=args.delay, seed=args.seed)
    if agent == "hmem":
        modules = make_hierarchical_actor_critic(
            base, embed_dim=args.width, hidden_dim=args.width
        )._asdict()
    else:
        modules = make_gru_actor_critic(base, args.width)
    return base, modules


def run_inference(agent: str, args: argparse.Namespace) -> dict:
    from torchrl.envs import TransformedEnv
    from torchrl.modules.utils import get_env_transforms_from_module, get_primers_from_module

    base, modules = _build(agent, args)
    actor = modules["actor"]
    env = TransformedEnv(base, get_env_transforms_from_module(actor))
    steps_per_block = args.delay + 1  # one episode per env
    blocks = max(1, args.inference_frames // (args.num_envs * steps_per_block))
    times = []
    with torch.no_grad():
        td = env.reset()
        for block in range(blocks + 1):  # the first block is a warm-up
            start = time.perf_counter()
            for _ in range(steps_per_block):
                td = actor(td)
                _, td = env.step_and_maybe_reset(td)  # acts, keeps no trajectory
            if block:
                times.append(time.perf_counter() - start)
        step = env.reset()
        calls = 100
        start = time.perf_counter()
        for _ in range(calls):
            actor(step.clone())
        policy_time = (time.perf_counter() - start) / calls
    return {
        "frames": blocks * steps_per_block * args.num_envs,
        "frames_per_s": steps_per_block * args.num_envs / statistics.median(times),
        "actor_forward_steps_per_s": args.num_envs / policy_time,
        "actor_forward_ms": policy_time * 1e3,
        "actor_parameters": sum(p.numel() for p in actor.parameters()),
        "actor_state_numbers_per_env": sum(
            math.prod(spec.shape)
            for spec in get_primers_from_module(actor).primers.values(True, True)
        ),
    }


def run_training(agent: str, args: argparse.Namespace) -> dict:
    from torchrl.collectors import Collector
    from torchrl.envs import TransformedEnv
    from torchrl.objectives import ClipPPOLoss
    from torchrl.objectives.value import GAE

    from torchrl_hippo.modules.hierarchical import MemoryELBOLoss

    base, modules = _build(agent, args)
    env = TransformedEnv(base, modules["transforms"])
    frames_per_batch = args.num_envs * (args.delay + 1)
    collector = Collector(
        env,
        modules["policy"],
        frames_per_batch=frames_per_batch,
        total_frames=(args.train_iters + 1) * frames_per_batch,
    )
    loss_module = ClipPPOLoss(
        modules["actor"], modules["critic"], entropy_coeff=0.01, critic_coeff=0.5
    )
    gae = GAE(gamma=0.99, lmbda=0.95, value_network=modules["critic"], shifted=True)
    elbo = MemoryELBOLoss(modules["memories"]) if modules["memories"] else None
    params = {id(p): p for p in loss_module.parameters()}
    if elbo is not None:
        params.update({id(p): p for p in elbo.parameters()})
    optimizer = torch.optim.Adam(list(params.values()), lr=1e-3)

    def iteration(data) -> float:
        with torch.no_grad():
            gae(data)
        kl = []
        for _ in range(args.epochs):
            for rows in torch.randperm(data.shape[0]).chunk(args.minibatches):
                batch = data[rows]
                out = loss_module(batch)
                kl.append(float(out["kl_approx"]))
                total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
                if elbo is not None:
                    total = total + elbo(batch)["loss_elbo"]
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
        return kl[0]

    iterator = iter(collector)
    iteration(next(iterator))  # warm-up
    start = time.perf_counter()
    kl_first = []
    bytes_per_frame = 0.0
    for _ in range(args.train_iters):
        data = next(iterator)
        bytes_per_frame = data.bytes() / data.numel()
        kl_first.append(iteration(data))
    elapsed = time.perf_counter() - start
    collector.shutdown()
    return {
        "frames": args.train_iters * frames_per_batch,
        "frames_per_s": args.train_iters * frames_per_batch / elapsed,
        "seconds_per_iteration": elapsed / args.train_iters,
        "collected_bytes_per_frame": bytes_per_frame,
        "kl_first_minibatch": kl_first,
        "parameters": sum(p.numel() for p in params.values()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--delay", type=int, default=60)
    parser.add_argument("--width", type=int, default=64, help="embedding / hidden size")
    parser.add_argument("--inference-frames", type=int, default=20_000)
    parser.add_argument("--train-iters", type=int, default=3, help="timed PPO iterations")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--minibatches", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run (small sizes)")
    parser.add_argument("--output", default=None, help="JSON path (default: by device)")
    parser.add_argument("--worker", nargs=2, metavar=("AGENT", "PHASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.inference_frames, args.train_iters, args.epochs = 2_000, 1, 1
    return args


def _worker(args: argparse.Namespace) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # Import everything first: the baseline is a process that has loaded the libraries.
    import torchrl.collectors
    import torchrl.objectives  # noqa: F401

    import benchmarks.cue_recall_env  # noqa: F401
    import torchrl_hippo.modules.builders  # noqa: F401

    agent, phase = args.worker
    baseline = _status_mb("VmRSS")
    _reset_peak()
    result = run_inference(agent, args) if phase == "inference" else run_training(agent, args)
    peak = _status_mb("VmHWM")
    result.update(
        baseline_rss_mb=baseline, peak_rss_mb=peak, peak_above_baseline_mb=peak - baseline
    )
    print("RESULT " + json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    passthrough = [
        f"--{name.replace('_', '-')}={value}"
        for name, value in vars(args).items()
        if name not in ("worker", "output", "quick")
    ]
    load_start = os.getloadavg()
    results: dict[str, dict[str, dict]] = {}
    for phase in ("inference", "training"):
        for agent in ("hmem", "gru"):
            cmd = [sys.executable, __file__, *passthrough, "--worker", agent, phase]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise RuntimeError(f"the {agent}/{phase} worker failed")
            results.setdefault(agent, {})[phase] = json.loads(lines[-1][len("RESULT ") :])
            print(f"{agent:>5} {phase:<9}: {results[agent][phase]}", flush=True)

    checks = {}
    for phase, target in TARGETS_MB.items():
        m = results["hmem"][phase]
        checks[phase] = {
            "target_mb": target,
            "peak_above_baseline_mb": m["peak_above_baseline_mb"],
            "peak_rss_mb": m["peak_rss_mb"],
            "met_above_baseline": m["peak_above_baseline_mb"] < target,
            "met_process_rss": m["peak_rss_mb"] < target,
        }
    ratios = {
        "inference_frames_per_s_hmem_over_gru": results["hmem"]["inference"]["frames_per_s"]
        / results["gru"]["inference"]["frames_per_s"],
        "actor_forward_hmem_over_gru": results["hmem"]["inference"]["actor_forward_steps_per_s"]
        / results["gru"]["inference"]["actor_forward_steps_per_s"],
        "training_frames_per_s_hmem_over_gru": results["hmem"]["training"]["frames_per_s"]
        / results["gru"]["training"]["frames_per_s"],
    }

    print("\n| agent | phase | frames/s | peak RSS (MB) | peak above baseline (MB) |")
    print("|---|---|---|---|---|")
    for agent, phases in results.items():
        for phase, m in phases.items():
            print(
                f"| {agent} | {phase} | {m['frames_per_s']:.0f} | {m['peak_rss_mb']:.0f} | "
                f"{m['peak_above_baseline_mb']:.1f} |"
            )
    for phase, c in checks.items():
        print(
            f"hmem {phase}: {c['peak_above_baseline_mb']:.1f} MB above baseline "
            f"(target < {c['target_mb']:.0f} MB: {'met' if c['met_above_baseline'] else 'NOT met'}); "
            f"process peak {c['peak_rss_mb']:.0f} MB"
        )
    print({k: round(v, 3) for k, v in ratios.items()})

    import tensordict
    import torchrl

    device = f"cpu-{os.cpu_count()}core"
    output = Path(
        args.output
        or ROOT
        / "benchmarks"
        / "results"
        / f"bench_hierarchical_{device}{'_quick' if args.quick else ''}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "bench_hierarchical",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "output")},
        "results": results,
        "checks": checks,
        "ratios": ratios,
        "versions": {
            "torch": torch.__version__,
            "torchrl": torchrl.__version__,
            "tensordict": tensordict.__version__,
            "python": platform.python_version(),
        },
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
