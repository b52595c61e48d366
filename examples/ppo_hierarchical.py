"""PPO with a HierarchicalMemory, a GRU or an MLP actor-critic, on tasks that need memory.

Run it from the repository root (``--help`` lists every option)::

    python examples/ppo_hierarchical.py                                   # hmem, cue recall
    python examples/ppo_hierarchical.py --model gru --env corridor-cue --frames 200000
    python examples/ppo_hierarchical.py --model mlp --env multiroom --seeds 0 1 2

or from Python: ``records = run(model="gru", env="corridor-cue", frames=20_000)`` (one record
per collected batch), ``main(argv)`` (the command line), ``train(parse_args(argv))``.

**Models** (``--model``), all ``observation -> MLP encoder (tanh, --width) -> core -> MLP head``
for the actor and, with its own core, for the critic, so that only the core differs:

- ``hmem``: :class:`~torchrl_hippo.modules.HierarchicalMemory` (a 32-step ring, 16 VAE
  summaries, 8 templates), from :func:`~torchrl_hippo.modules.make_hierarchical_actor_critic`,
  trained with ``ClipPPOLoss`` plus :class:`~torchrl_hippo.modules.MemoryELBOLoss`;
- ``gru``: TorchRL's :class:`~torchrl.modules.GRUModule` (``--width`` units), its state
  registered with ``make_tensordict_primer()``;
- ``mlp``: no core (the encoder feeds the head): a memory-less baseline.

**Environments** (``--env``; ``--env-kwargs '{"length": 24}'`` overrides a preset):

- ``cue-recall`` (``benchmarks/cue_recall_env.py``): one of ``--num-cues`` cues at step 0, the
  action naming it rewarded ``--delay`` steps later (60 by default: long after the cue has left
  the memory's 32-step ring);
- ``corridor-cue`` (``hippo/Corridor-Cue-v0``, preset ``length=20``, episodes of up to 84
  steps): walk to the far end of a corridor with 4 noisy distractor features and pick the end
  action that the cue, shown only in the first observation, names. Without memory the best
  success rate is 0.5;
- ``multiroom`` (``hippo/MultiRoomKeys-v0``, preset ``rooms=2, room_size=4,
  key_room="earlier", max_steps=256``): a 5x5 view of 4x4 rooms, find the key, carry it into
  the locked door, reach the goal in the next room; ``0.1`` for the door, ``1.0`` at the goal.

Success is the fraction of episodes whose return reaches the task's success return (``1.0``:
the cue named, the right end picked, the goal reached).

The pipeline is plain TorchRL::

    Collector(env + [InitTracker, StepCounter, RewardSum, state primers], actor -> critic)
        --td[num_envs, T]--> GAE(shifted=True) --> epochs x minibatches of [envs, T] chunks
        --> ClipPPOLoss (recurrent mode: each chunk replayed from its stored state)
            (+ MemoryELBOLoss for hmem) --> one Adam step

- The collector runs the actor *and* the critic (``policy``), so the data holds both cores'
  states; GAE reads each step's stored critic state (sequential mode) and ``ClipPPOLoss``
  replays ``[envs, T]`` chunks from the state stored at their first step (recurrent mode,
  entered by the loss itself), so its first-minibatch ``kl_approx`` is 0 for every model.
- Minibatches are whole rows of the ``[num_envs, T]`` batch: chunks of consecutive steps,
  never shuffled steps. ``T`` defaults to the task's longest episode (``delay + 1`` for cue
  recall, the env's ``max_steps`` otherwise), so every batch ends at least one episode per env.
- The learning rate decays linearly to 0 over ``--frames`` (``--no-anneal-lr`` keeps it).

Environments run in-process (a gymnasium ``SyncVectorEnv`` in TorchRL's ``GymWrapper``). Logs go
to TensorBoard under ``--logdir`` (``tensorboard --logdir runs/ppo_hierarchical``); ``--output``
writes the per-batch records as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import torch
from tensordict.nn import TensorDictModule, TensorDictSequential
from torchrl.collectors import Collector
from torchrl.envs import (
    Compose,
    EnvBase,
    GymWrapper,
    InitTracker,
    RewardSum,
    StepCounter,
    TransformedEnv,
)
from torchrl.modules import GRUModule, ProbabilisticActor
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE
from torchrl.record.loggers import TensorboardLogger
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torchrl_hippo.envs  # noqa: E402, F401  (registers the hippo/* ids)
from benchmarks.cue_recall_env import make_cue_recall_env  # noqa: E402
from torchrl_hippo.modules.builders import (  # noqa: E402
    make_encoder,
    make_head,
    make_hierarchical_actor_critic,
)
from torchrl_hippo.modules.hierarchical import HierarchicalMemory, MemoryELBOLoss  # noqa: E402

__all__ = [
    "ENVS",
    "MODELS",
    "ActorCritic",
    "EnvPreset",
    "main",
    "make_actor_critic",
    "make_env",
    "parse_args",
    "run",
    "summarize",
    "train",
]

MODELS = ("hmem", "gru", "mlp")


@dataclass(frozen=True)
class EnvPreset:
    """A task of this script: how to build it and when an episode counts as a success.

    Attributes:
        gym_id (str or None): the gymnasium id (``None`` for the cue-recall task, built by
            ``benchmarks/cue_recall_env.py``).
        kwargs (dict): keyword arguments of the environment.
        success_return (float): an episode whose return reaches it is a success.
        description (str): one line, for logs and plots.
    """

    gym_id: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    success_return: float = 1.0
    description: str = ""


ENVS: dict[str, EnvPreset] = {
    "cue-recall": EnvPreset(
        None, {}, 1.0, "cue recall (benchmarks/cue_recall_env.py): name the cue seen at step 0"
    ),
    "corridor-cue": EnvPreset(
        "hippo/Corridor-Cue-v0",
        {"length": 20},
        1.0,
        "hippo/Corridor-Cue-v0: walk to the end, pick the end the first observation named",
    ),
    "multiroom": EnvPreset(
        "hippo/MultiRoomKeys-v0",
        {"rooms": 2, "room_size": 4, "key_room": "earlier", "max_steps": 256},
        1.0,
        "hippo/MultiRoomKeys-v0: fetch keys from the first room, open the doors, reach the goal",
    ),
}
"""The tasks, by ``--env`` name."""


class ActorCritic(NamedTuple):
    """What :func:`make_actor_critic` builds.

    Attributes:
        actor (ProbabilisticActor): for ``ClipPPOLoss``.
        critic (TensorDictSequential): writes ``"state_value"``; for ``ClipPPOLoss`` and GAE.
        policy (TensorDictSequential): actor then critic, the module to collect with.
        transforms (Compose): ``InitTracker``, ``StepCounter``, ``RewardSum`` and the state
            primers of the cores; append it to the environment.
        memories (tuple of HierarchicalMemory): the cores to train with ``MemoryELBOLoss``
            (empty for ``gru`` and ``mlp``).
    """

    actor: ProbabilisticActor
    critic: TensorDictSequential
    policy: TensorDictSequential
    transforms: Compose
    memories: tuple[HierarchicalMemory, ...]


def make_env(
    name: str,
    num_envs: int,
    *,
    seed: int = 0,
    env_kwargs: dict[str, Any] | None = None,
) -> tuple[EnvBase, int]:
    """Builds ``num_envs`` copies of a task as one batched TorchRL env, run in-process.

    Args:
        name (str): a key of :data:`ENVS`.
        num_envs (int): number of environments (the batch size).

    Keyword Args:
        seed (int, optional): seed of the environments. Defaults to ``0``.
        env_kwargs (dict, optional): overrides the preset's keyword arguments (for
            ``cue-recall``: ``num_cues`` and ``delay``). Defaults to ``None``.

    Returns:
        The env (``batch_size=[num_envs]``) and the longest possible episode, in steps.

    Examples:
        >>> from examples.ppo_hierarchical import make_env
        >>> env, longest = make_env("corridor-cue", 2, env_kwargs={"length": 3})
        >>> env.batch_size, longest
        (torch.Size([2]), 16)
    """
    if name not in ENVS:
        raise ValueError(f"env must be one of {sorted(ENVS)}, got {name!r}.")
    if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}.")
    preset = ENVS[name]
    kwargs = {**preset.kwargs, **(env_kwargs or {})}
    if preset.gym_id is None:
        unknown = sorted(set(kwargs) - {"num_cues", "delay"})
        if unknown:
            raise ValueError(f"env_kwargs for {name!r} may set num_cues and delay, got {unknown}.")
        env = make_cue_recall_env(num_envs, seed=seed, **kwargs)
        return env, kwargs.get("delay", 60) + 1
    vector_env = gym.make_vec(
        preset.gym_id,
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
        **kwargs,
    )
    longest = int(vector_env.get_attr("max_steps")[0])
    env = GymWrapper(vector_env)
    env.set_seed(seed)
    return env, longest


def make_actor_critic(
    model: str,
    env: EnvBase,
    *,
    width: int = 64,
    memory_kwargs: dict[str, Any] | None = None,
) -> ActorCritic:
    """Builds a PPO actor and critic, ``observation -> encoder -> core -> head`` each.

    Args:
        model (str): the core: ``"hmem"`` (a :class:`HierarchicalMemory` per network),
            ``"gru"`` (a :class:`~torchrl.modules.GRUModule` of ``width`` units per network) or
            ``"mlp"`` (none).
        env (EnvBase): the environment, for its specs: a flat ``"observation"`` and a
            ``OneHot`` action.

    Keyword Args:
        width (int, optional): size of the embeddings, of the cores and of the hidden layers.
            Defaults to ``64``.
        memory_kwargs (dict, optional): keyword arguments of the ``HierarchicalMemory``
            (``"hmem"`` only). Defaults to ``None``.

    Returns:
        An :class:`ActorCritic`.

    Examples:
        >>> from torchrl.envs import TransformedEnv
        >>> from examples.ppo_hierarchical import make_actor_critic, make_env
        >>> base, _ = make_env("corridor-cue", 2, env_kwargs={"length": 3})
        >>> modules = make_actor_critic("gru", base, width=8)
        >>> env = TransformedEnv(base, modules.transforms)
        >>> data = env.rollout(5, modules.policy)
        >>> data["next", "critic_gru", "recurrent_state"].shape
        torch.Size([2, 5, 1, 8])
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}.")
    if model == "hmem":
        return ActorCritic(
            *make_hierarchical_actor_critic(
                env, embed_dim=width, hidden_dim=width, memory_kwargs=memory_kwargs
            )
        )
    if memory_kwargs:
        raise ValueError(f"memory_kwargs apply to model='hmem' only, got model={model!r}.")
    obs_dim = env.observation_spec_unbatched["observation"].shape[-1]
    n_actions = env.action_spec_unbatched.space.n

    def branch(prefix: str, out_features: int, out_key: str, last_scale: float):
        layers = [
            TensorDictModule(
                make_encoder(obs_dim, width, width), ["observation"], [f"{prefix}embed"]
            )
        ]
        features = f"{prefix}embed"
        core = None
        if model == "gru":
            features = f"{prefix}features"
            core = GRUModule(
                input_size=width,
                hidden_size=width,
                in_keys=[f"{prefix}embed", (f"{prefix}gru", "recurrent_state"), "is_init"],
                out_keys=[features, ("next", f"{prefix}gru", "recurrent_state")],
            )
            layers.append(core)
        layers.append(
            TensorDictModule(
                make_head(width, out_features, width, last_scale), [features], [out_key]
            )
        )
        return TensorDictSequential(*layers), core

    actor_body, actor_core = branch("", n_actions, "logits", 0.01)
    critic, critic_core = branch("critic_", 1, "state_value", 1.0)
    actor = ProbabilisticActor(
        actor_body,
        in_keys=["logits"],
        spec=env.action_spec_unbatched,
        distribution_class=torch.distributions.OneHotCategorical,
        return_log_prob=True,
    )
    transforms = [InitTracker(), StepCounter(), RewardSum()]
    if model == "gru":
        transforms += [actor_core.make_tensordict_primer(), critic_core.make_tensordict_primer()]
    return ActorCritic(
        actor=actor,
        critic=critic,
        policy=TensorDictSequential(actor, critic),
        transforms=Compose(*transforms),
        memories=(),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv=None`` reads ``sys.argv``); see ``--help``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", "--agent", dest="model", choices=MODELS, default="hmem", help="the core"
    )
    parser.add_argument("--env", choices=sorted(ENVS), default="cue-recall")
    parser.add_argument(
        "--env-kwargs",
        type=json.loads,
        default=None,
        help="JSON object overriding the env preset, e.g. '{\"length\": 24}'",
    )
    parser.add_argument("--frames", type=int, default=300_000, help="environment steps in total")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument(
        "--steps-per-batch",
        type=int,
        default=None,
        help="steps per env per batch (default: the longest episode of the task)",
    )
    parser.add_argument("--num-cues", type=int, default=4, help="cue recall only")
    parser.add_argument("--delay", type=int, default=60, help="cue recall: steps cue -> query")
    parser.add_argument("--epochs", type=int, default=8, help="PPO epochs per batch")
    parser.add_argument("--minibatches", type=int, default=2, help="minibatches per epoch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--no-anneal-lr",
        dest="anneal_lr",
        action="store_false",
        help="keep the learning rate constant (default: linear decay to 0 over --frames)",
    )
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--lmbda", type=float, default=0.95)
    parser.add_argument("--clip-epsilon", type=float, default=0.2)
    parser.add_argument("--entropy-coeff", type=float, default=0.01)
    parser.add_argument("--critic-coeff", type=float, default=0.5)
    parser.add_argument("--elbo-coeff", type=float, default=1.0, help="hmem only")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument(
        "--width", "--embed-dim", dest="width", type=int, default=64, help="network width"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="main(): one run per seed"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--logdir", default="runs/ppo_hierarchical", help="TensorBoard root")
    parser.add_argument("--output", default=None, help="main(): write the records as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    args = parser.parse_args(argv)
    problem = _check_args(args)
    if problem:
        parser.error(problem)
    return args


def _check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the options (named as on the command line), or None."""
    if args.model not in MODELS:
        return f"--model must be one of {MODELS}, got {args.model!r}."
    if args.env not in ENVS:
        return f"--env must be one of {sorted(ENVS)}, got {args.env!r}."
    for name in ("frames", "num_envs", "steps_per_batch", "epochs", "minibatches", "width"):
        value = getattr(args, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            return f"--{name.replace('_', '-')} must be an int, got {value!r}."
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}."
    if args.env_kwargs is not None and not isinstance(args.env_kwargs, dict):
        return f"--env-kwargs must be a JSON object, got {args.env_kwargs!r}."
    return None


def _finite_or_none(value: Any) -> Any:
    """NaN -> None, recursively, for strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _env_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = dict(args.env_kwargs or {})
    if args.env == "cue-recall":
        kwargs = {"num_cues": args.num_cues, "delay": args.delay, **kwargs}
    return kwargs


def train(args: argparse.Namespace) -> list[dict[str, float]]:
    """Trains one model with PPO; returns one record per collected batch.

    Each record holds ``frames`` (collected so far), ``time_s``, ``success`` and ``return``
    (means over the episodes that ended in the batch), ``episode_length``, ``episodes``,
    ``lr``, ``kl_first_minibatch`` and the means over the batch's updates of every loss entry.
    """
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    num_envs = args.num_envs
    base, longest = make_env(args.env, num_envs, seed=args.seed, env_kwargs=_env_kwargs(args))
    modules = make_actor_critic(args.model, base, width=args.width)
    env = TransformedEnv(base, modules.transforms)
    steps_per_batch = args.steps_per_batch or longest
    frames_per_batch = num_envs * steps_per_batch
    total_frames = -(-args.frames // frames_per_batch) * frames_per_batch  # whole batches
    collector = Collector(
        env, modules.policy, frames_per_batch=frames_per_batch, total_frames=total_frames
    )
    loss_module = ClipPPOLoss(
        modules.actor,
        modules.critic,
        clip_epsilon=args.clip_epsilon,
        entropy_coeff=args.entropy_coeff,
        critic_coeff=args.critic_coeff,
        normalize_advantage=True,
    )
    advantage = GAE(gamma=args.gamma, lmbda=args.lmbda, value_network=modules.critic, shifted=True)
    elbo_loss = (
        MemoryELBOLoss(modules.memories, elbo_coeff=args.elbo_coeff) if modules.memories else None
    )
    params = {id(p): p for p in loss_module.parameters()}
    if elbo_loss is not None:
        params.update({id(p): p for p in elbo_loss.parameters()})
    params = list(params.values())
    optimizer = torch.optim.Adam(params, lr=args.lr)
    success_return = ENVS[args.env].success_return
    logger = TensorboardLogger(
        exp_name=f"{args.model}_{args.env}_seed{args.seed}", log_dir=args.logdir
    )

    records: list[dict[str, float]] = []
    frames = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(total=total_frames, disable=args.no_progress, desc=f"{args.model} {args.env}")
    for data in collector:  # [num_envs, steps_per_batch]
        if args.anneal_lr:
            for group in optimizer.param_groups:
                group["lr"] = args.lr * max(0.0, 1.0 - frames / args.frames)
        frames += data.numel()
        with torch.no_grad():
            advantage(data)
        logs: dict[str, list[float]] = {}
        for _ in range(args.epochs):
            for rows in torch.randperm(data.shape[0]).chunk(args.minibatches):
                batch = data[rows]
                out = loss_module(batch)
                total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
                if elbo_loss is not None:
                    elbo = elbo_loss(batch)
                    total = total + elbo["loss_elbo"]
                    out.update(elbo)
                optimizer.zero_grad()
                total.backward()
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                for key, value in out.items():
                    if value.numel() == 1:
                        logs.setdefault(key, []).append(float(value.detach()))
        collector.update_policy_weights_()

        done = data["next", "done"].squeeze(-1)
        returns = data["next", "episode_reward"].squeeze(-1)[done]
        lengths = data["next", "step_count"].squeeze(-1)[done].float()
        record = {
            "frames": frames,
            "time_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu_start,
            "success": float((returns >= success_return).float().mean())
            if returns.numel()
            else math.nan,
            "return": float(returns.mean()) if returns.numel() else math.nan,
            "episode_length": float(lengths.mean()) if lengths.numel() else math.nan,
            "episodes": int(done.sum()),
            "lr": optimizer.param_groups[0]["lr"],
            "kl_first_minibatch": logs["kl_approx"][0],
            **{key: sum(values) / len(values) for key, values in logs.items()},
        }
        records.append(record)
        for key, value in record.items():
            if key != "frames" and not math.isnan(value):
                logger.log_scalar(key, value, step=frames)
        bar.update(data.numel())
        bar.set_postfix(
            success=f"{record['success']:.2f}", kl0=f"{record['kl_first_minibatch']:.1e}"
        )
    bar.close()
    collector.shutdown()
    logger.experiment.close()
    return records


def summarize(records: list[dict[str, float]], window: int = 5) -> dict[str, float]:
    """Means over the last ``window`` batches of ``success`` and ``return`` (NaNs skipped).

    Examples:
        >>> from examples.ppo_hierarchical import summarize
        >>> summarize([{"frames": 10, "success": 0.0, "return": 0.0, "time_s": 1.0},
        ...            {"frames": 20, "success": 1.0, "return": 2.0, "time_s": 2.0}], window=2)
        {'frames': 20, 'success': 0.5, 'return': 1.0, 'time_s': 2.0}
    """
    if not records:
        raise ValueError("records is empty: no batch was collected.")
    last = records[-window:]
    out: dict[str, float] = {"frames": records[-1]["frames"]}
    for key in ("success", "return"):
        values = [r[key] for r in last if not math.isnan(r[key])]
        out[key] = sum(values) / len(values) if values else math.nan
    out["time_s"] = records[-1]["time_s"]
    return out


def run(
    *,
    model: str = "hmem",
    env: str = "cue-recall",
    frames: int = 300_000,
    seed: int = 0,
    **options: Any,
) -> list[dict[str, float]]:
    """Function API of :func:`train`: keyword arguments named like the command-line options.

    Examples:
        >>> from examples.ppo_hierarchical import run
        >>> records = run(model="mlp", env="corridor-cue", frames=128, num_envs=4,
        ...               env_kwargs={"length": 3}, epochs=1, no_progress=True,
        ...               logdir="/tmp/ppo_hierarchical_doctest")
        >>> len(records), records[-1]["frames"], records[-1]["kl_first_minibatch"]
        (2, 128, 0.0)
    """
    args = parse_args([])
    options = {"model": model, "env": env, "frames": frames, "seed": seed, **options}
    for name, value in options.items():
        if not hasattr(args, name) or name in ("seeds", "output"):
            raise TypeError(f"run() got an unexpected option {name!r}.")
        setattr(args, name, value)
    problem = _check_args(args)
    if problem:
        raise ValueError(f"run(): {problem}")
    return train(args)


def main(argv: list[str] | None = None) -> dict[int, list[dict[str, float]]]:
    """The command line: one run per seed of ``--seeds`` (or ``--seed``); returns the records."""
    args = parse_args(argv)
    results: dict[int, list[dict[str, float]]] = {}
    for seed in args.seeds or [args.seed]:
        args.seed = seed
        records = train(args)
        results[seed] = records
        summary = summarize(records)
        print(
            f"{args.model} on {args.env}, seed {seed}: {summary['frames']} frames in "
            f"{summary['time_s']:.0f} s; over the last 5 batches success {summary['success']:.3f}, "
            f"return {summary['return']:.3f}; first-minibatch kl_approx of the last batch "
            f"{records[-1]['kl_first_minibatch']:.2e}",
            flush=True,
        )
    if args.output:
        config = {k: v for k, v in vars(args).items() if k not in ("seed", "output", "no_progress")}
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = _finite_or_none({"config": config, "runs": results})
        path.write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
