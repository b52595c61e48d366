"""DQN with a choice of replay: episodic memory (hippo), uniform, or prioritized.

One TorchRL pipeline, three replay buffers that differ in nothing but their parts::

    GymWrapper(SyncVectorEnv) --Collector--> td[envs, time] --rb.extend--> replay buffer
                                                                               |
    DQNLoss (double DQN) + SoftUpdate <--rb.sample()-- sampler <---------------+

- ``hippo``: :class:`~torchrl_hippo.HippoStorage` + :class:`~torchrl_hippo.HippoWriter`
  (``defer_keys=True``: keys are computed in bulk at the next retrieval, not at every write)
  + :class:`~torchrl_hippo.HippoSampler`. A ``mixture_ratio`` share of every batch is
  drawn by retrieval: with no query set, the sampler's default anchors are transitions of
  episodes picked with ``softmax(z(return) / anchor_temperature)``, so rare high-return
  episodes (in a sparse-reward task, the few that reached the goal); the sampler retrieves the
  ``top_k`` stored windows nearest to each anchor and draws among them with
  ``softmax(similarity / temperature)``. The rest of the batch is uniform. The share ramps
  from ``mixture_init`` to ``mixture_ratio``
  (:class:`~torchrl_hippo.consolidation.MixtureRatioScheduler`), and every
  ``consolidate_every`` batches a short "sleep" (:class:`~torchrl_hippo.consolidation.
  ConsolidationHook`) trains the key encoder contrastively and refreshes stale keys. With
  ``retrieval_gate`` (the default), retrieval, its ramp and consolidation start only once
  two stored episodes differ in return (in a sparse-reward task: at the first success);
  until then the anchors would have nothing to favour, and the sampler draws uniformly.
- ``uniform``: TorchRL's ``LazyTensorStorage`` + ``RandomSampler``.
- ``prioritized``: ``LazyTensorStorage`` + :class:`~torchrl_hippo.data.prioritized.
  TorchPrioritizedSampler` (pure-torch PER, ``|td_error|`` priorities, ``beta`` annealed to
  1 with TorchRL's ``LinearScheduler``; TorchRL's own sampler needs C++ segment trees that do
  not load under torch 2.13).

Every non-uniform batch carries ``"priority_weight"``, which :class:`~torchrl.objectives.
DQNLoss` reads on its own to correct the sampling bias. Everything else (network, exploration,
optimiser, frames, seeds, environment) is identical across replays.

Each run evaluates the greedy policy every ``eval_every`` frames on ``eval_episodes`` fresh
episodes; success means an episode return of at least the environment's success threshold
(``1.0`` for the Corridor, whose only reward is ``1.0`` at the goal; gymnasium's
``reward_threshold`` otherwise, e.g. 475 for CartPole-v1). ``results/<run>.json`` holds the
per-seed curves (greedy success and return, training success and return), the frame of the
first successful training episode and the timings; ``results/<run>.png`` plots the mean ± std
over seeds against frames for each replay. TensorBoard logs go to ``runs/dqn_memory/<run>``.

Examples::

    python examples/dqn_memory.py --replay hippo uniform --seeds 0 1 --frames 60000 \\
        --env hippo/Corridor-ZeroNoise-v0 --env-kwargs length=50
    python examples/dqn_memory.py --env CartPole-v1 --replay prioritized --frames 30000
    python examples/dqn_memory.py --help

From Python (``examples`` on ``sys.path``)::

    from dqn_memory import DQNConfig, train, run_study, main
    result = train(DQNConfig(replay="hippo", frames=8192, env_kwargs={"length": 5}))
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictSequential
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, RandomSampler, TensorDictReplayBuffer
from torchrl.data.replay_buffers.scheduler import LinearScheduler
from torchrl.envs import EnvBase, GymWrapper, RewardSum, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, EGreedyModule, QValueActor
from torchrl.objectives import DQNLoss, SoftUpdate
from torchrl.record.loggers import TensorboardLogger
from tqdm import tqdm

import torchrl_hippo.envs  # noqa: F401  (registers the hippo/* environments)
from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
from torchrl_hippo.consolidation import ConsolidationHook, Consolidator, MixtureRatioScheduler
from torchrl_hippo.data.prioritized import TorchPrioritizedSampler

__all__ = [
    "REPLAYS",
    "SUCCESS_THRESHOLDS",
    "DQNConfig",
    "DrawStats",
    "Replay",
    "config_from_args",
    "episode_step_limit",
    "evaluate",
    "format_table",
    "late_stats",
    "main",
    "make_env",
    "make_q_actor",
    "make_replay",
    "parse_args",
    "plot_curves",
    "plot_study",
    "reliable_frame",
    "returns_differ",
    "run_study",
    "save_study",
    "success_threshold",
    "summarize",
    "train",
]

REPLAYS: tuple[str, ...] = ("hippo", "uniform", "prioritized")
"""The replay buffers this script compares."""

#: Success thresholds of environments whose gymnasium spec has no ``reward_threshold``.
SUCCESS_THRESHOLDS: dict[str, float] = {
    "hippo/Corridor-v0": 1.0,
    "hippo/Corridor-ZeroNoise-v0": 1.0,
    "hippo/Corridor-Cue-v0": 1.0,
}
# Keys the policy adds to collected data that no replay needs.
_POLICY_KEYS = ("action_value", "chosen_action_value")


@dataclass
class DQNConfig:
    """Every setting of one DQN run; the defaults are the sparse-reward study's.

    Only ``replay`` and ``seed`` differ between the runs of a comparison. See ``--help``
    (:func:`parse_args`) for the meaning of each field.
    """

    env_id: str = "hippo/Corridor-ZeroNoise-v0"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    replay: str = "hippo"
    seed: int = 0
    frames: int = 40_960
    frames_per_batch: int = 256
    num_envs: int = 16
    init_frames: int = 1_024
    updates_per_batch: int = 8
    batch_size: int = 128
    buffer_size: int = 100_000
    lr: float = 1e-3
    gamma: float = 0.99
    hidden: tuple[int, ...] = (64, 64)
    eps_init: float = 1.0
    eps_end: float = 0.05
    eps_fraction: float = 0.5
    target_eps: float = 0.99
    max_grad_norm: float = 10.0
    # hippo
    mixture_ratio: float = 0.5
    mixture_init: float = 0.2
    mixture_ramp: float = 0.5
    top_k: int = 16
    temperature: float = 0.1
    num_anchors: int = 16
    anchor_temperature: float = 0.5
    embed_dim: int = 32
    window: int = 8
    encoder_hidden: int = 64
    consolidate_every: int = 20
    consolidate_steps: int = 10
    consolidate_batch: int = 64
    refresh_fraction: float = 0.25
    forgetting: str = "fifo"
    retrieval_gate: bool = True
    # prioritized
    alpha: float = 0.6
    beta: float = 0.4
    # evaluation, output
    eval_every: int = 4_096
    eval_episodes: int = 4
    success_threshold: float | None = None
    device: str = "cpu"
    logdir: str | None = "runs/dqn_memory"
    run_name: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.replay not in REPLAYS:
            raise ValueError(f"replay must be one of {REPLAYS}, got {self.replay!r}.")
        if self.forgetting not in ("fifo", "importance"):
            raise ValueError(f"forgetting must be 'fifo' or 'importance', got {self.forgetting!r}.")
        for name in (
            "frames",
            "frames_per_batch",
            "num_envs",
            "updates_per_batch",
            "batch_size",
            "buffer_size",
            "eval_every",
            "top_k",
            "num_anchors",
            "embed_dim",
            "window",
            "encoder_hidden",
            "consolidate_every",
            "consolidate_batch",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        for name in ("init_frames", "consolidate_steps", "eval_episodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}.")
        if self.frames_per_batch % self.num_envs:
            raise ValueError(
                f"frames_per_batch ({self.frames_per_batch}) must be a multiple of num_envs "
                f"({self.num_envs}): the collector steps all environments together."
            )
        if self.eval_every % self.frames_per_batch or self.frames % self.eval_every:
            raise ValueError(
                f"eval_every ({self.eval_every}) must be a multiple of frames_per_batch "
                f"({self.frames_per_batch}) and divide frames ({self.frames}), so that every "
                "run's curve has frames // eval_every points at the same frames."
            )
        for name in ("eps_fraction", "mixture_ratio", "mixture_init", "mixture_ramp"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        for name in ("refresh_fraction", "beta", "target_eps", "gamma"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")

    @property
    def name(self) -> str:
        """``<replay>-seed<seed>`` (prefixed with ``run_name`` when set)."""
        base = f"{self.replay}-seed{self.seed}"
        return f"{self.run_name}-{base}" if self.run_name else base


# --------------------------------------------------------------------------- environment
def make_env(
    env_id: str,
    *,
    num_envs: int = 1,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    **env_kwargs: Any,
) -> TransformedEnv:
    """``num_envs`` copies of a gymnasium environment, stepped together, as a TorchRL env.

    The copies run in one process (gymnasium's ``SyncVectorEnv``, wrapped by TorchRL's
    ``GymWrapper``): ``GymEnv(..., num_envs=n)`` would start ``n`` worker processes, which
    only slows things down on a machine with a couple of cores. TorchRL's resets of finished
    copies use the vector env's ``reset_mask`` (``AutoresetMode.DISABLED``). A ``RewardSum``
    transform writes each episode's return to ``("next", "episode_reward")``.

    Examples:
        >>> env = make_env("hippo/Corridor-ZeroNoise-v0", num_envs=2, seed=0, length=3)
        >>> td = env.rollout(4)
        >>> td.batch_size, td["next", "episode_reward"].shape
        (torch.Size([2, 4]), torch.Size([2, 4, 1]))
    """
    vector = gym.vector.SyncVectorEnv(
        [lambda: gym.make(env_id, **env_kwargs)] * num_envs,
        autoreset_mode=gym.vector.AutoresetMode.DISABLED,
    )
    env = TransformedEnv(GymWrapper(vector, device=device), RewardSum())
    if seed is not None:
        env.set_seed(seed)
    return env


def episode_step_limit(env_id: str, env_kwargs: dict[str, Any]) -> int:
    """The most steps an episode of this environment can last."""
    env = gym.make(env_id, **env_kwargs)
    try:
        limit = env.spec.max_episode_steps if env.spec is not None else None
        if limit is None:
            limit = getattr(env.unwrapped, "max_steps", None)
        if limit is None:
            raise ValueError(
                f"{env_id} has no episode step limit (neither spec.max_episode_steps nor "
                "max_steps): evaluation needs one."
            )
        return int(limit)
    finally:
        env.close()


def success_threshold(env_id: str, value: float | None = None) -> float | None:
    """The return at or above which an episode counts as a success (``None``: not tracked)."""
    if value is not None:
        return float(value)
    if env_id in SUCCESS_THRESHOLDS:
        return SUCCESS_THRESHOLDS[env_id]
    threshold = gym.spec(env_id).reward_threshold
    return None if threshold is None else float(threshold)


# --------------------------------------------------------------------------- agent
def make_q_actor(env: EnvBase, hidden: Sequence[int], device: torch.device | str) -> QValueActor:
    """An MLP Q-network over the observation, greedy over the env's one-hot action spec."""
    obs_dim = env.observation_spec["observation"].shape[-1]
    n_actions = env.action_spec.shape[-1]
    net = MLP(in_features=obs_dim, out_features=n_actions, num_cells=list(hidden), device=device)
    return QValueActor(net, in_keys=["observation"], spec=env.action_spec)


# --------------------------------------------------------------------------- replays
@dataclass
class Replay:
    """A replay buffer and what runs alongside it, per batch and per optimiser step."""

    kind: str
    buffer: TensorDictReplayBuffer
    schedulers: list[Any] = field(default_factory=list)
    consolidation: ConsolidationHook | None = None
    retrieval_gate: bool = False
    #: frames at which retrieval started (hippo with ``retrieval_gate``; ``None``: not yet).
    gate_opened_at: int | None = None

    def extend(self, batch: TensorDictBase) -> None:
        """Writes a collector batch ``[envs, time]``; the hippo writer keeps its shape."""
        batch = batch.exclude(*_POLICY_KEYS)
        self.buffer.extend(batch if self.kind == "hippo" else batch.reshape(-1))

    @property
    def retrieving(self) -> bool:
        """Whether retrieval is in use (always, unless the gate is still closed)."""
        return not self.retrieval_gate or self.gate_opened_at is not None

    def after_batch(self, frames: int = 0) -> dict[str, float] | None:
        """Steps the schedules and, every few batches, consolidates the memory.

        With ``retrieval_gate``, the hippo sampler draws uniformly (``mixture_ratio = 0``)
        and neither schedule nor consolidation runs until the memory holds two finished
        episodes with different returns: before that, the default anchors (which favour
        high returns) have nothing to favour, and retrieval would only narrow the replay
        to the neighbourhood of random windows.
        """
        if not self.retrieving:
            if not returns_differ(self.buffer.storage):
                return None
            self.gate_opened_at = frames
        for scheduler in self.schedulers:
            scheduler.step()
        return None if self.consolidation is None else self.consolidation()

    def after_loss(self, sample: TensorDictBase) -> None:
        """Prioritized replay: new priorities ``|td_error|`` (DQNLoss writes its square)."""
        if self.kind == "prioritized":
            priority = sample["td_error"].detach().reshape(-1).sqrt()
            self.buffer.update_priority(sample["index"], priority)


def returns_differ(storage: HippoStorage) -> bool:
    """Whether two finished episodes stored in the memory have different returns."""
    if not storage.initialized:
        return False
    table = storage.episodes
    finished = (table["rows"] > 0) & table["done"]
    returns = table["return"][finished]
    return returns.numel() > 1 and bool(returns.max() > returns.min())


def make_replay(
    cfg: DQNConfig,
    *,
    observation_dim: int,
    action_dim: int,
    total_batches: int,
    logger: TensorboardLogger | None = None,
) -> Replay:
    """Builds the replay buffer named by ``cfg.replay`` (``"hippo"``, ``"uniform"`` or ``"prioritized"``).

    Examples:
        >>> cfg = DQNConfig(replay="prioritized", buffer_size=1000)
        >>> replay = make_replay(cfg, observation_dim=8, action_dim=2, total_batches=10)
        >>> type(replay.buffer.sampler).__name__, replay.buffer.sampler.beta
        ('TorchPrioritizedSampler', 0.4)
    """
    device = torch.device(cfg.device)
    # The buffer draws with its own generator: sampling does not consume the global RNG that
    # network initialisation and exploration use.
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 7_919)
    if cfg.replay == "uniform":
        buffer = TensorDictReplayBuffer(
            storage=LazyTensorStorage(cfg.buffer_size, device=device),
            sampler=RandomSampler(),
            batch_size=cfg.batch_size,
            generator=generator,
        )
        return Replay("uniform", buffer)
    if cfg.replay == "prioritized":
        sampler = TorchPrioritizedSampler(cfg.buffer_size, alpha=cfg.alpha, beta=cfg.beta)
        buffer = TensorDictReplayBuffer(
            storage=LazyTensorStorage(cfg.buffer_size, device=device),
            sampler=sampler,
            priority_key="td_error",
            batch_size=cfg.batch_size,
            generator=generator,
        )
        # Importance correction annealed to full over the run (Schaul et al., 2015).
        beta = LinearScheduler(buffer, "beta", final_value=1.0, num_steps=total_batches)
        return Replay("prioritized", buffer, schedulers=[beta])

    encoder = DualEncoder(
        observation_dim,
        action_dim,
        cfg.embed_dim,
        window=cfg.window,
        hidden_dim=cfg.encoder_hidden,
    ).to(device)
    buffer = TensorDictReplayBuffer(
        storage=HippoStorage(cfg.buffer_size, device=device),
        writer=HippoWriter(encoder, forgetting=cfg.forgetting, defer_keys=True),
        sampler=HippoSampler(
            mixture_ratio=cfg.mixture_init,
            top_k=cfg.top_k,
            temperature=cfg.temperature,
            num_anchors=cfg.num_anchors,
            anchor_temperature=cfg.anchor_temperature,
        ),
        batch_size=cfg.batch_size,
        generator=generator,
    )
    ramp = max(1, round(cfg.mixture_ramp * total_batches))
    schedule = MixtureRatioScheduler(
        buffer, cfg.mixture_ratio, num_steps=ramp, initial_value=cfg.mixture_init
    )
    hook = None
    if cfg.consolidate_steps:
        consolidator = Consolidator(
            encoder,
            refresh_fraction=cfg.refresh_fraction,
            generator=torch.Generator(device=device).manual_seed(cfg.seed + 104_729),
        )
        hook = ConsolidationHook(
            consolidator,
            buffer,
            interval=cfg.consolidate_every,
            steps=cfg.consolidate_steps,
            batch_size=cfg.consolidate_batch,
            logger=logger,
        )
    replay = Replay(
        "hippo",
        buffer,
        schedulers=[schedule],
        consolidation=hook,
        retrieval_gate=cfg.retrieval_gate,
    )
    if cfg.retrieval_gate:
        buffer.sampler.mixture_ratio = 0.0  # uniform until the gate opens
    return replay


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    env: EnvBase, actor: torch.nn.Module, max_steps: int, threshold: float | None
) -> tuple[float, float]:
    """Greedy policy, one episode per copy of ``env``: (success rate, mean return).

    The rollout lasts ``max_steps`` (the episode limit), so every copy finishes its first
    episode; copies that finish early are reset and their later episodes ignored. Success
    is ``nan`` when ``threshold`` is ``None``.
    """
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        td = env.rollout(max_steps, actor, break_when_any_done=False)
    done = td["next", "done"].reshape(td.shape[0], -1)
    reward = td["next", "reward"].reshape(td.shape[0], -1).float()
    # Steps up to and including each copy's first done.
    first = (done.cumsum(-1) - done.long()) == 0
    returns = (reward * first).sum(-1)
    mean_return = float(returns.mean())
    if threshold is None:
        return math.nan, mean_return
    finished = done.any(-1)
    success = (returns >= threshold) & finished
    return float(success.float().mean()), mean_return


# --------------------------------------------------------------------------- training
class DrawStats:
    """Where the hippo sampler's draws come from: successful episodes or not.

    Counts, separately for retrieval (``("hippo", "semantic")``) and uniform draws, the
    sampled transitions whose episode return (``("hippo", "return")``, the episode table's
    value) reaches the success threshold. Their share among retrieval draws, next to the
    share among uniform draws and among stored rows, is the memory at work: it replays the
    rare successful episodes far more often than they occur.
    """

    def __init__(self, threshold: float | None) -> None:
        self.threshold = threshold
        self.total = {"semantic": [0, 0], "uniform": [0, 0]}
        self.window = {"semantic": [0, 0], "uniform": [0, 0]}

    def update(self, sample: TensorDictBase) -> None:
        if self.threshold is None:
            return
        good = sample["hippo", "return"].reshape(-1) >= self.threshold
        semantic = sample["hippo", "semantic"].reshape(-1)
        for name, mask in (("semantic", semantic), ("uniform", ~semantic)):
            hits, n = int(good[mask].sum()), int(mask.sum())
            for acc in (self.total, self.window):
                acc[name][0] += hits
                acc[name][1] += n

    def report(self, storage: HippoStorage, *, total: bool = False) -> dict[str, float]:
        """Shares since the last report (all draws with ``total=True``)."""
        acc = self.total if total else self.window

        def share(name: str) -> float:
            hits, n = acc[name]
            return hits / n if n else math.nan

        out = {
            "success_share_semantic": share("semantic"),
            "success_share_uniform": share("uniform"),
            "success_share_rows": math.nan,
            "episodes": float(storage.num_episodes) if storage.initialized else 0.0,
        }
        if self.threshold is not None and storage.initialized:
            table = storage.episodes
            rows = storage.row_slot[: len(storage)]
            alive = rows >= 0
            good = table["return"][rows.clamp_min(0)] >= self.threshold
            out["success_share_rows"] = float((good & alive).sum()) / max(int(alive.sum()), 1)
        if not total:
            self.window = {"semantic": [0, 0], "uniform": [0, 0]}
        return out


def train(
    cfg: DQNConfig,
    *,
    on_checkpoint: Callable[[int, QValueActor, EnvBase], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Runs one DQN run; returns its curves and summary numbers (JSON-ready).

    Keys: ``replay``, ``seed``, ``curve`` (lists over the ``frames // eval_every``
    checkpoints: ``frames``, greedy ``eval_success`` and ``eval_return``, and over the
    training episodes that ended since the previous checkpoint ``train_success``,
    ``train_return`` and their number ``train_episodes``; for hippo, also the
    :class:`DrawStats` shares of the draws since the previous checkpoint,
    ``memory_success_share_semantic`` and ``memory_success_share_uniform``, ``nan`` while
    there were none of the kind), ``first_success_frame`` (the frame
    at which the first training episode reached the success threshold, ``None`` if none
    did), ``final_eval_success``, ``final_eval_return``, ``train_success_rate`` (all training
    episodes), ``episodes``, ``updates``, ``memory`` (hippo only: :class:`DrawStats` over the
    run), ``wall_time_s``, ``cpu_time_s``, ``logdir``. With ``eval_episodes=0`` the greedy
    evaluation is skipped (``nan``).

    Args:
        cfg (DQNConfig): the run's settings.

    Keyword Args:
        on_checkpoint (callable, optional): called at every checkpoint with
            ``(frames, actor, training_env)``; the floats of the dict it returns are appended
            to the curve under their keys (e.g. the greedy success on other tasks).
            Defaults to ``None``.

    Examples:
        >>> cfg = DQNConfig(frames=256, frames_per_batch=128, num_envs=4, eval_every=128,
        ...                 init_frames=128, updates_per_batch=1, batch_size=32,
        ...                 replay="uniform", env_kwargs={"length": 3}, logdir=None,
        ...                 progress=False)
        >>> out = train(cfg)
        >>> len(out["curve"]["frames"]), out["curve"]["frames"]
        (2, [128, 256])
    """
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    threshold = success_threshold(cfg.env_id, cfg.success_threshold)
    step_limit = episode_step_limit(cfg.env_id, cfg.env_kwargs)
    env = make_env(
        cfg.env_id, num_envs=cfg.num_envs, seed=cfg.seed, device=device, **cfg.env_kwargs
    )
    eval_env = None
    if cfg.eval_episodes:
        eval_env = make_env(
            cfg.env_id,
            num_envs=cfg.eval_episodes,
            seed=cfg.seed + 1_000_003,
            device=device,
            **cfg.env_kwargs,
        )
    actor = make_q_actor(env, cfg.hidden, device)
    exploration = EGreedyModule(
        env.action_spec,
        eps_init=cfg.eps_init,
        eps_end=cfg.eps_end,
        annealing_num_steps=max(1, int(cfg.eps_fraction * cfg.frames)),
        device=device,
    )
    collector = Collector(
        env,
        TensorDictSequential(actor, exploration),
        frames_per_batch=cfg.frames_per_batch,
        total_frames=cfg.frames,
        device=device,
        auto_register_policy_transforms=False,
    )
    logger = None
    if cfg.logdir is not None:
        logger = TensorboardLogger(exp_name=cfg.name, log_dir=cfg.logdir)
    total_batches = cfg.frames // cfg.frames_per_batch
    # Built under its own seed, so that the global RNG stream (exploration) is the same for
    # every replay: runs of one seed act identically until their first update.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 15_485_863)
        replay = make_replay(
            cfg,
            observation_dim=env.observation_spec["observation"].shape[-1],
            action_dim=env.action_spec.shape[-1],
            total_batches=total_batches,
            logger=logger,
        )
    loss_fn = DQNLoss(
        actor,
        action_space=env.action_spec,
        delay_value=True,
        double_dqn=True,
        loss_function="smooth_l1",
    )
    loss_fn.make_value_estimator(gamma=cfg.gamma)
    target_updater = SoftUpdate(loss_fn, eps=cfg.target_eps)
    optim = torch.optim.Adam(loss_fn.parameters(), lr=cfg.lr)

    curve: dict[str, list] = {
        k: []
        for k in (
            "frames",
            "eval_success",
            "eval_return",
            "train_success",
            "train_return",
            "train_episodes",
        )
    }
    draws = DrawStats(threshold) if replay.kind == "hippo" else None
    window_returns: list[float] = []
    all_successes = 0
    episodes = 0
    updates = 0
    first_success: int | None = None
    frames = 0
    loss_value = math.nan
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    pbar = tqdm(
        total=cfg.frames,
        unit="frames",
        desc=cfg.name,
        disable=not cfg.progress,
        dynamic_ncols=True,
        leave=False,
    )
    for batch in collector:
        n_envs = batch.shape[0]
        replay.extend(batch)
        done = batch["next", "done"].squeeze(-1)
        finished = batch["next", "episode_reward"].squeeze(-1)[done].float().tolist()
        if threshold is not None and first_success is None:
            hits = done & (batch["next", "episode_reward"].squeeze(-1) >= threshold)
            if bool(hits.any()):
                t_first = int(hits.any(0).nonzero()[0])
                first_success = frames + (t_first + 1) * n_envs
        frames += batch.numel()
        exploration.step(batch.numel())
        window_returns.extend(finished)
        episodes += len(finished)
        if threshold is not None:
            all_successes += sum(r >= threshold for r in finished)

        if len(replay.buffer) >= max(cfg.init_frames, cfg.batch_size):
            for _ in range(cfg.updates_per_batch):
                sample = replay.buffer.sample().to(device)
                loss = loss_fn(sample)["loss"]
                optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(loss_fn.parameters(), cfg.max_grad_norm)
                optim.step()
                target_updater.step()
                replay.after_loss(sample)
                if draws is not None:
                    draws.update(sample)
                updates += 1
            loss_value = float(loss.detach())
            collector.update_policy_weights_()
        replay.after_batch(frames)

        if logger is not None:
            logger.log_scalar("train/epsilon", float(exploration.eps), step=frames)
            logger.log_scalar("train/loss", loss_value, step=frames)
            if finished:
                logger.log_scalar("train/episode_return", float(np.mean(finished)), step=frames)
            if replay.kind == "hippo":
                logger.log_scalar(
                    "memory/mixture_ratio", replay.buffer.sampler.mixture_ratio, step=frames
                )
        if frames % cfg.eval_every == 0:
            success, ret = math.nan, math.nan
            if eval_env is not None:
                success, ret = evaluate(eval_env, actor, step_limit, threshold)
            if on_checkpoint is not None:
                for key, value in on_checkpoint(frames, actor, env).items():
                    curve.setdefault(key, []).append(value)
            train_ret = float(np.mean(window_returns)) if window_returns else math.nan
            if threshold is None or not window_returns:
                train_success = math.nan
            else:
                train_success = float(np.mean([r >= threshold for r in window_returns]))
            for key, value in (
                ("frames", frames),
                ("eval_success", success),
                ("eval_return", ret),
                ("train_success", train_success),
                ("train_return", train_ret),
                ("train_episodes", len(window_returns)),
            ):
                curve[key].append(value)
            window_returns = []
            memory = {} if draws is None else draws.report(replay.buffer.storage)
            for key in ("success_share_semantic", "success_share_uniform"):
                if key in memory:
                    curve.setdefault(f"memory_{key}", []).append(memory[key])
            if logger is not None:
                logger.log_scalar("eval/success", success, step=frames)
                logger.log_scalar("eval/return", ret, step=frames)
                logger.log_scalar("train/success", train_success, step=frames)
                for key, value in memory.items():
                    logger.log_scalar(f"memory/{key}", value, step=frames)
        pbar.update(batch.numel())
        pbar.set_postfix(
            eps=f"{float(exploration.eps):.2f}",
            loss=f"{loss_value:.3g}",
            eval=f"{curve['eval_return'][-1]:.2f}" if curve["eval_return"] else "-",
            first=first_success if first_success is not None else "-",
        )
    pbar.close()
    collector.shutdown()
    if eval_env is not None:
        eval_env.close()
    logdir = None
    if logger is not None:
        logdir = str(logger.experiment.log_dir)
        logger.experiment.close()
    return {
        "replay": cfg.replay,
        "seed": cfg.seed,
        "curve": curve,
        "first_success_frame": first_success,
        "final_eval_success": curve["eval_success"][-1],
        "final_eval_return": curve["eval_return"][-1],
        "train_success_rate": (all_successes / episodes)
        if threshold is not None and episodes
        else math.nan,
        "episodes": episodes,
        "updates": updates,
        "memory": None if draws is None else draws.report(replay.buffer.storage, total=True),
        "retrieval_from_frame": replay.gate_opened_at if replay.kind == "hippo" else None,
        "wall_time_s": time.perf_counter() - start_wall,
        "cpu_time_s": time.process_time() - start_cpu,
        "logdir": logdir,
    }


# --------------------------------------------------------------------------- studies
def _nanmean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def late_stats(run: dict[str, Any], fraction: float = 0.25) -> dict[str, float]:
    """Success and return over the last ``fraction`` of a run's checkpoints.

    ``late_train_success`` pools the training episodes of those windows (episodes, not
    windows, are averaged); ``late_eval_success`` / ``late_eval_return`` average the greedy
    evaluations at those checkpoints.
    """
    curve = run["curve"]
    n = len(curve["frames"])
    k = max(1, math.ceil(fraction * n))
    counts = np.asarray(curve["train_episodes"][n - k :], dtype=float)
    pooled = {}
    for key in ("train_success", "train_return"):
        rates = np.nan_to_num(np.asarray(curve[key][n - k :], dtype=float))
        pooled[key] = float((rates * counts).sum() / counts.sum()) if counts.sum() else math.nan
    return {
        "late_train_success": pooled["train_success"],
        "late_train_return": pooled["train_return"],
        "late_eval_success": _nanmean(curve["eval_success"][n - k :]),
        "late_eval_return": _nanmean(curve["eval_return"][n - k :]),
    }


def reliable_frame(run: dict[str, Any], threshold: float = 0.8) -> int | None:
    """The first checkpoint whose training episodes succeeded at a rate ``>= threshold``."""
    curve = run["curve"]
    for frames, rate in zip(curve["frames"], curve["train_success"]):
        if rate is not None and not math.isnan(rate) and rate >= threshold:
            return int(frames)
    return None


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates the runs of one replay over seeds (means, with standard deviations).

    - ``success_rate``: the share of training episodes that reached the goal over the last
      quarter of the frame budget (the agent as it acts, epsilon at its final value);
    - ``greedy_success``: the greedy policy's success over the last quarter's evaluations;
    - ``final_eval_success`` / ``final_return``: the last evaluation only;
    - ``late_return``: training-episode return over the last quarter (return-based tasks);
    - ``eval_success_auc``: greedy success averaged over every checkpoint (how early);
    - ``first_success_frames``: each seed's first successful training episode (``None``:
      never within the budget), summarised by ``seeds_with_success`` and the median over
      the seeds that succeeded;
    - ``reliable_frames``: each seed's first checkpoint whose window of training episodes
      succeeded at a rate ``>= 0.8`` (``None``: never), and ``learning_gaps``: that frame
      minus the first success, i.e. how fast the agent turned its first success into a
      reliable policy (median over the seeds that did: ``median_learning_gap``).
    """
    late = [late_stats(r) for r in runs]

    def stat(values: Sequence[float]) -> tuple[float, float]:
        arr = np.asarray(values, dtype=float)
        if np.isnan(arr).all():
            return math.nan, math.nan
        return float(np.nanmean(arr)), float(np.nanstd(arr))

    first = [r["first_success_frame"] for r in runs]
    found = [f for f in first if f is not None]
    reliable = [reliable_frame(r) for r in runs]
    gaps = [None if f is None or g is None else g - f for f, g in zip(first, reliable)]
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
    for name, values in (
        ("success_rate", [x["late_train_success"] for x in late]),
        ("greedy_success", [x["late_eval_success"] for x in late]),
        ("late_return", [x["late_train_return"] for x in late]),
        ("greedy_return", [x["late_eval_return"] for x in late]),
        ("final_eval_success", [r["final_eval_success"] for r in runs]),
        ("final_return", [r["final_eval_return"] for r in runs]),
    ):
        out[name], out[f"{name}_std"] = stat(values)
    out.update(
        {
            "per_seed_success_rate": [x["late_train_success"] for x in late],
            "per_seed_greedy_success": [x["late_eval_success"] for x in late],
            "eval_success_auc": _nanmean([_nanmean(r["curve"]["eval_success"]) for r in runs]),
            "eval_return_auc": _nanmean([_nanmean(r["curve"]["eval_return"]) for r in runs]),
            "train_success_rate": _nanmean([r["train_success_rate"] for r in runs]),
            "first_success_frames": first,
            "seeds_with_success": len(found),
            "median_first_success_frame": float(np.median(found)) if found else None,
            "reliable_frames": reliable,
            "learning_gaps": gaps,
            "median_learning_gap": (
                float(np.median([g for g in gaps if g is not None]))
                if any(g is not None for g in gaps)
                else None
            ),
            "wall_time_s": float(sum(r["wall_time_s"] for r in runs)),
            "cpu_time_s": float(sum(r["cpu_time_s"] for r in runs)),
        }
    )
    return out


def run_study(
    base: DQNConfig,
    replays: Sequence[str],
    seeds: Sequence[int],
    *,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Runs every (replay, seed) with otherwise identical settings; returns runs and summaries."""
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in replays}
    for seed in seeds:
        for kind in replays:
            result = train(replace(base, replay=kind, seed=seed))
            runs[kind].append(result)
            if on_run is not None:
                on_run(result)
    return {
        "config": {k: v for k, v in asdict(base).items() if k not in ("replay", "seed")},
        "replays": list(replays),
        "seeds": list(seeds),
        "success_threshold": success_threshold(base.env_id, base.success_threshold),
        "runs": runs,
        "summary": {kind: summarize(rs) for kind, rs in runs.items()},
        "host": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }


_COLORS = {"hippo": "tab:red", "uniform": "tab:blue", "prioritized": "tab:green"}
_LABELS = {
    "eval_success": "greedy success rate",
    "train_success": "training episode success",
    "eval_return": "greedy episode return",
    "train_return": "training episode return",
}


def plot_curves(ax: Any, study: dict[str, Any], key: str) -> None:
    """Draws, on a matplotlib axis, one curve ``key`` per replay: mean ± std over seeds."""
    for kind in sorted(study["runs"], key=lambda k: (*REPLAYS, k).index(k)):
        runs = study["runs"][kind]
        if not runs:
            continue
        frames = np.asarray(runs[0]["curve"]["frames"], dtype=float)
        values = np.asarray([r["curve"][key] for r in runs], dtype=float)
        if np.isnan(values).all():
            continue
        with warnings.catch_warnings():  # checkpoints with no finished episode: nan
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
        color = _COLORS.get(kind)
        ax.plot(frames, mean, label=f"{kind} (n={len(runs)})", color=color)
        ax.fill_between(frames, mean - std, mean + std, alpha=0.2, color=color)
    ax.set_xlabel("frames")
    ax.set_ylabel(_LABELS.get(key, key))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def plot_study(
    study: dict[str, Any],
    path: str | Path,
    *,
    title: str | None = None,
    metric: str = "auto",
) -> Path:
    """Saves a PNG: greedy and training success (``metric="success"``) or return, per replay.

    ``"auto"`` plots success when the study tracks it (a success threshold), else return.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metric == "auto":
        metric = "success" if study.get("success_threshold") is not None else "return"
    if metric not in ("success", "return"):
        raise ValueError(f"metric must be 'auto', 'success' or 'return', got {metric!r}.")
    keys = (f"eval_{metric}", f"train_{metric}")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        plot_curves(ax, study, key)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pm(mean: float, std: float, fmt: str = ".2f") -> str:
    return "-" if math.isnan(mean) else f"{mean:{fmt}} ± {std:{fmt}}"


def format_table(study: dict[str, Any], *, metric: str = "auto") -> str:
    """A markdown table of the study's summary, one row per replay.

    Success columns (``metric="success"``; ``"auto"``: when the study tracks success):
    success rate of the training episodes over the last quarter of the budget, greedy
    success over the last quarter's evaluations, seeds that succeeded at least once and the
    median frames to the first success. Return columns otherwise.
    """
    if metric == "auto":
        metric = "success" if study.get("success_threshold") is not None else "return"
    order = sorted(study["summary"], key=lambda k: (*REPLAYS, k).index(k))
    summaries = [(kind, study["summary"][kind]) for kind in order]
    if metric == "success":
        rows = [
            "| replay | success rate (last 25% of frames) | greedy success (last 25%) | "
            "seeds with a success | median frames to first success | "
            "median frames from first success to 80% success |",
            "|---|---|---|---|---|---|",
        ]
        for kind, s in summaries:
            median = s["median_first_success_frame"]
            gap = s.get("median_learning_gap")
            rows.append(
                f"| {kind} | {_pm(s['success_rate'], s['success_rate_std'])} | "
                f"{_pm(s['greedy_success'], s['greedy_success_std'])} | "
                f"{s['seeds_with_success']}/{len(s['seeds'])} | "
                f"{'-' if median is None else f'{median:.0f}'} | "
                f"{'-' if gap is None else f'{gap:.0f}'} |"
            )
    else:
        rows = [
            "| replay | training return (last 25%) | greedy return (last 25%) | "
            "final greedy return |",
            "|---|---|---|---|",
        ]
        for kind, s in summaries:
            rows.append(
                f"| {kind} | {_pm(s['late_return'], s['late_return_std'], '.1f')} | "
                f"{_pm(s['greedy_return'], s['greedy_return_std'], '.1f')} | "
                f"{_pm(s['final_return'], s['final_return_std'], '.1f')} |"
            )
    return "\n".join(rows)


# --------------------------------------------------------------------------- CLI
def _parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--env-kwargs expects key=value, got {item!r}.")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; every :class:`DQNConfig` field is an option (``--frames-per-batch``...)."""
    defaults = DQNConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--env", dest="env_id", default=defaults.env_id, help="gymnasium id")
    parser.add_argument(
        "--env-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. length=50"
    )
    parser.add_argument(
        "--replay", nargs="+", default=list(REPLAYS), choices=REPLAYS, help="replays to compare"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default="results", help="directory of <run>.json and <run>.png")
    parser.add_argument("--name", default=None, help="run name (default: from env and time)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on small CPUs)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    helps = {
        "frames": "environment steps per run (equal for every replay)",
        "frames_per_batch": "collector batch size",
        "num_envs": "environments stepped together",
        "init_frames": "frames stored before the first update",
        "updates_per_batch": "optimiser steps per collector batch",
        "eps_fraction": "share of frames over which epsilon anneals",
        "mixture_ratio": "hippo: final share of retrieval draws",
        "mixture_init": "hippo: initial share of retrieval draws",
        "mixture_ramp": "hippo: share of the run over which the share ramps",
        "consolidate_every": "hippo: batches between consolidations",
        "consolidate_steps": "hippo: contrastive steps per consolidation (0: none)",
        "refresh_fraction": "hippo: share of stored keys re-encoded per consolidation",
        "forgetting": "hippo: HippoWriter forgetting policy",
        "retrieval_gate": "hippo: no retrieval until two stored episodes differ in return",
        "alpha": "prioritized: priority exponent",
        "beta": "prioritized: initial importance exponent (annealed to 1)",
        "eval_every": "frames between greedy evaluations",
        "eval_episodes": "greedy episodes per evaluation",
        "success_threshold": "episode return counted as a success (default: per env)",
        "logdir": "TensorBoard root ('none' disables)",
    }
    skip = {"env_id", "env_kwargs", "replay", "seed", "run_name", "progress"}
    for f in fields(DQNConfig):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "hidden":
            parser.add_argument(flag, nargs="+", type=int, default=list(default))
        elif f.name == "success_threshold":
            parser.add_argument(flag, type=float, default=None, help=helps[f.name])
        elif f.name in ("logdir", "device"):
            parser.add_argument(flag, default=default, help=helps.get(f.name))
        elif isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=helps[f.name]
            )
        elif f.name == "forgetting":
            parser.add_argument(
                flag, choices=("fifo", "importance"), default=default, help=helps[f.name]
            )
        else:
            parser.add_argument(flag, type=type(default), default=default, help=helps.get(f.name))
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> DQNConfig:
    """The :class:`DQNConfig` of parsed arguments (replay and seed: the first given)."""
    values = {f.name: getattr(args, f.name) for f in fields(DQNConfig) if hasattr(args, f.name)}
    values["env_kwargs"] = _parse_kwargs(args.env_kwargs)
    values["replay"] = args.replay[0]
    values["seed"] = args.seeds[0]
    values["progress"] = not args.no_progress
    if isinstance(values.get("logdir"), str) and values["logdir"].lower() == "none":
        values["logdir"] = None
    return DQNConfig(**values)


def default_name(cfg: DQNConfig) -> str:
    """``<env>[-k-v...]-<time>``, safe as a file name."""
    env = cfg.env_id.replace("/", "_")
    extra = "".join(f"-{k}{v}" for k, v in sorted(cfg.env_kwargs.items()))
    return f"dqn-{env}{extra}-{time.strftime('%Y%m%d-%H%M%S')}"


def save_study(study: dict[str, Any], out: str | Path, name: str, title: str) -> tuple[Path, Path]:
    """Writes ``<out>/<name>.json`` and ``<out>/<name>.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(study, indent=1, default=float) + "\n")
    png_path = plot_study(study, out / f"{name}.png", title=title)
    return json_path, png_path


def _print_run(result: dict[str, Any]) -> None:
    first = result["first_success_frame"]
    tqdm.write(
        f"{result['replay']:>11} seed {result['seed']}: greedy success "
        f"{result['final_eval_success']:.2f}, return {result['final_eval_return']:.2f}, "
        f"training success {result['train_success_rate']:.3f}, first success at "
        f"{'-' if first is None else first} frames ({result['cpu_time_s']:.0f} s CPU, "
        f"{result['wall_time_s']:.0f} s wall)"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the study (also written as JSON + PNG)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base = config_from_args(args)
    name = args.name or default_name(base)
    base = replace(base, run_name=name)
    study = run_study(base, args.replay, args.seeds, on_run=_print_run)
    study["command"] = "python examples/dqn_memory.py " + shlex.join(argv)
    title = f"{base.env_id} {base.env_kwargs or ''}, {base.frames} frames".strip()
    json_path, png_path = save_study(study, args.out, name, title)
    print(format_table(study))
    print(f"results: {json_path}  plot: {png_path}")
    if base.logdir is not None:
        print(f"TensorBoard: tensorboard --logdir {base.logdir}")
    return study


if __name__ == "__main__":
    main()
