"""A stable-baselines3 replay buffer backed by the episodic memory.

:class:`HippoReplayBuffer` is a drop-in ``replay_buffer_class`` for stable-baselines3's
off-policy algorithms (DQN, SAC, TD3, ...): they train on its hybrid semantic / uniform
batches without any other change.

Needs ``stable-baselines3`` (``pip install "torchrl-hippo[sb3]"``); this module imports without it,
and the class then raises an :class:`ImportError` when built.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from tensordict import TensorDict, TensorDictBase
from torchrl.data import TensorDictReplayBuffer

from torchrl_hippo.consolidation import ConsolidationHook, Consolidator
from torchrl_hippo.data import HippoSampler, HippoStorage, HippoWriter
from torchrl_hippo.modules import DualEncoder

try:
    from stable_baselines3.common.buffers import ReplayBuffer as _SB3ReplayBuffer
    from stable_baselines3.common.type_aliases import ReplayBufferSamples
    from stable_baselines3.common.vec_env import VecNormalize

    _SB3_IMPORT_ERROR: ImportError | None = None
except ImportError as err:  # the class below is defined, and refuses to be built
    _SB3ReplayBuffer = object
    ReplayBufferSamples = VecNormalize = None
    _SB3_IMPORT_ERROR = err

__all__ = ["HippoReplayBuffer"]

_DEFAULT_ENCODER_KWARGS = {"embed_dim": 64, "window": 8, "hidden_dim": 128}


class HippoReplayBuffer(_SB3ReplayBuffer):
    """A stable-baselines3 ``ReplayBuffer`` whose transitions live in the episodic memory.

    Pass it as ``replay_buffer_class`` to an off-policy algorithm (DQN, SAC, TD3, ...) and
    configure it with ``replay_buffer_kwargs``. The algorithm is unchanged: it adds
    transitions and samples :class:`~stable_baselines3.common.type_aliases.ReplayBufferSamples`
    as with SB3's own buffer, but a ``mixture_ratio`` share of every batch is drawn by semantic
    retrieval from the memory (the stored transitions whose trailing windows resemble the
    queries; by default, anchors from rare high-return episodes) and the rest uniformly.

    Inside is a TorchRL :class:`~torchrl.data.TensorDictReplayBuffer` (:attr:`memory`) made of
    :class:`~torchrl_hippo.HippoStorage`, :class:`~torchrl_hippo.HippoWriter` and
    :class:`~torchrl_hippo.HippoSampler`, holding ``buffer_size`` transitions. Added steps are
    staged and written to it every ``flush_every`` steps in one ``extend``, as an ``[n_envs,
    time]`` batch whose ``("collector", "traj_ids")`` number each environment's episodes, so
    the writer segments and stitches them exactly. A memory write has a fixed cost (episode
    bookkeeping, encoding), so batching writes keeps training fast; the newest
    ``flush_every - 1`` steps at most wait to be sampled (``flush_every=1`` writes every step
    at once, as SB3's own buffer does). Every stored transition has ``"observation"``, ``"action"``, ``("next",
    "observation")``, ``("next", "reward")``, ``("next", "done")`` (the episode ended),
    ``("next", "terminated")`` (it ended without a time-out), ``("next", "truncated")`` and
    the memory's ``"hippo"`` entries. An environment reset without a ``done`` (a new
    ``learn`` call resets the environments) is detected, since the step's observation is not
    the previous step's next observation, and starts a new episode.

    As in SB3, observations are stored unnormalised and normalised when sampled with a
    :class:`~stable_baselines3.common.vec_env.VecNormalize` ``env``, and the ``dones`` of a
    sample exclude time-outs (``info["TimeLimit.truncated"]``) when
    ``handle_timeout_termination`` is set. SB3's losses do not read importance weights; the
    last sampled TensorDict, with ``"index"``, ``"priority_weight"`` and ``("hippo",
    "semantic")``, is kept as :attr:`last_sample`.

    Args:
        buffer_size (int): the number of transitions the memory holds.
        observation_space (gymnasium.spaces.Space): a non-``Dict`` observation space.
        action_space (gymnasium.spaces.Space): the action space.
        device (torch.device or str, optional): where sampled tensors go. Defaults to ``"auto"``.
        n_envs (int, optional): the number of parallel environments. Defaults to ``1``.
        optimize_memory_usage (bool, optional): not supported (the memory rebuilds windows by
            itself, and stores next observations explicitly); must be ``False``.
            Defaults to ``False``.
        handle_timeout_termination (bool, optional): treat time-outs as non-terminal in the
            sampled ``dones``. Defaults to ``True``.

    Keyword Args:
        encoder (DualEncoder, optional): the memory's encoder. Defaults to ``None``: a
            :class:`~torchrl_hippo.DualEncoder` for the flattened observation and the action
            (``Discrete(n)``: ``n`` categories), built with ``encoder_kwargs``.
        encoder_kwargs (dict, optional): keyword arguments of the default encoder.
            Defaults to ``{"embed_dim": 64, "window": 8, "hidden_dim": 128}``.
        mixture_ratio (float, optional): share of each batch drawn by retrieval.
            Defaults to ``0.5``.
        top_k (int, optional): neighbours retrieved per query. Defaults to ``5``.
        temperature (float, optional): softmax temperature over neighbour similarities.
            Defaults to ``0.07``.
        sampler_kwargs (dict, optional): further :class:`~torchrl_hippo.HippoSampler` keyword
            arguments. Defaults to ``None``.
        forgetting (str, optional): ``"fifo"`` or ``"importance"``. Defaults to ``"fifo"``.
        writer_kwargs (dict, optional): further :class:`~torchrl_hippo.HippoWriter` keyword
            arguments. Defaults to ``None``.
        consolidation_interval (int, optional): run a consolidation phase
            (:class:`~torchrl_hippo.consolidation.Consolidator`) every this many ``sample``
            calls, once enough finished episodes are stored. Defaults to ``None`` (never).
        consolidation_steps (int, optional): optimiser steps per phase. Defaults to ``20``.
        consolidation_batch_size (int, optional): pairs per step. Defaults to ``64``.
        consolidator_kwargs (dict, optional): :class:`~torchrl_hippo.consolidation.Consolidator`
            keyword arguments. Defaults to ``None``.
        flush_every (int, optional): ``add`` calls staged before they are written to the
            memory together. Defaults to ``64``.
        detect_resets (bool, optional): start a new episode where a step's observation is
            not the previous step's next observation (the environment was reset without a
            ``done``). Turn it off only for transitions added out of order.
            Defaults to ``True``.

    Examples:
        >>> import numpy as np
        >>> import torch
        >>> from gymnasium import spaces
        >>> from torchrl_hippo.integrations.sb3 import HippoReplayBuffer
        >>> rb = HippoReplayBuffer(
        ...     1000, spaces.Box(-1, 1, (4,), np.float32), spaces.Discrete(2), device="cpu",
        ...     mixture_ratio=0.25, top_k=4,
        ... )
        >>> rng = np.random.default_rng(0)
        >>> obs = rng.random((1, 4), np.float32)
        >>> for t in range(100):  # episodes of 10 steps
        ...     next_obs = rng.random((1, 4), np.float32)
        ...     done = np.array([t % 10 == 9])
        ...     rb.add(obs, next_obs, np.array([t % 2]), np.ones(1, np.float32), done, [{}])
        ...     obs = next_obs
        >>> batch = rb.sample(16)
        >>> batch.observations.shape, batch.actions.dtype, batch.dones.shape
        (torch.Size([16, 4]), torch.int64, torch.Size([16, 1]))
        >>> int(rb.last_sample["hippo", "semantic"].sum())
        4
        >>> len(rb.memory), rb.memory.storage.num_episodes  # 36 steps are still staged
        (64, 7)
        >>> rb.flush()
        >>> len(rb.memory), rb.memory.storage.num_episodes
        (100, 10)

        With an algorithm, e.g. ``DQN("MlpPolicy", "CartPole-v1",
        replay_buffer_class=HippoReplayBuffer, replay_buffer_kwargs={"mixture_ratio": 0.3})``.
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: torch.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        *,
        encoder: DualEncoder | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        mixture_ratio: float = 0.5,
        top_k: int = 5,
        temperature: float = 0.07,
        sampler_kwargs: dict[str, Any] | None = None,
        forgetting: str = "fifo",
        writer_kwargs: dict[str, Any] | None = None,
        consolidation_interval: int | None = None,
        consolidation_steps: int = 20,
        consolidation_batch_size: int = 64,
        consolidator_kwargs: dict[str, Any] | None = None,
        flush_every: int = 64,
        detect_resets: bool = True,
    ) -> None:
        if _SB3_IMPORT_ERROR is not None:
            raise ImportError(
                "HippoReplayBuffer needs stable-baselines3: pip install 'torchrl-hippo[sb3]'."
            ) from _SB3_IMPORT_ERROR
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be a positive int, got {buffer_size!r}.")
        if isinstance(n_envs, bool) or not isinstance(n_envs, int) or n_envs < 1:
            raise ValueError(f"n_envs must be a positive int, got {n_envs!r}.")
        if isinstance(observation_space, spaces.Dict):
            raise TypeError(
                "observation_space must not be a Dict space: HippoReplayBuffer stores flat "
                "observations (flatten them, e.g. with gymnasium's FlattenObservation)."
            )
        if not isinstance(observation_space, spaces.Space) or not isinstance(
            action_space, spaces.Space
        ):
            raise TypeError("observation_space and action_space must be gymnasium spaces.")
        if optimize_memory_usage:
            raise ValueError(
                "optimize_memory_usage=True is not supported by HippoReplayBuffer; pass False."
            )
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be a positive int, got {flush_every!r}.")
        # SB3's BaseBuffer sets the spaces, shapes, device, pos/full; ReplayBuffer.__init__
        # would allocate numpy arrays of the whole capacity, which the memory replaces.
        super(_SB3ReplayBuffer, self).__init__(
            buffer_size, observation_space, action_space, device, n_envs=n_envs
        )
        self.buffer_size = max(buffer_size // n_envs, 1)  # steps, as SB3's ReplayBuffer counts
        self.optimize_memory_usage = False
        self.handle_timeout_termination = bool(handle_timeout_termination)
        self.flush_every = flush_every
        self.detect_resets = bool(detect_resets)
        self._action_dtype = self._maybe_cast_dtype(action_space.dtype)

        if encoder is None:
            encoder = DualEncoder(
                math.prod(self.obs_shape) or 1,
                int(action_space.n)
                if isinstance(action_space, spaces.Discrete)
                else self.action_dim,
                **{**_DEFAULT_ENCODER_KWARGS, **(encoder_kwargs or {})},
            )
        elif encoder_kwargs:
            raise ValueError("encoder_kwargs is only used without an encoder; got both.")
        self.encoder = encoder
        self.memory = TensorDictReplayBuffer(
            storage=HippoStorage(self.buffer_size * n_envs),
            writer=HippoWriter(encoder, forgetting=forgetting, **(writer_kwargs or {})),
            sampler=HippoSampler(mixture_ratio, top_k, temperature, **(sampler_kwargs or {})),
        )
        self.consolidation = None
        if consolidation_interval is not None:
            self.consolidation = ConsolidationHook(
                Consolidator(encoder, **(consolidator_kwargs or {})),
                self.memory,
                interval=consolidation_interval,
                steps=consolidation_steps,
                batch_size=consolidation_batch_size,
            )
        elif consolidator_kwargs:
            raise ValueError("consolidator_kwargs needs consolidation_interval; got None.")
        #: The metrics of the last consolidation phase (``{"consolidation/<name>": float}``).
        self.consolidation_metrics: dict[str, float] | None = None
        #: The last sampled TensorDict (``"index"``, ``"priority_weight"``, ``"hippo"``, ...).
        self.last_sample: TensorDictBase | None = None
        self._reset_streams()

    # ------------------------------------------------------------------ SB3 API
    def add(
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        n = self.n_envs
        obs = np.array(obs, dtype=self.observation_space.dtype).reshape(n, *self.obs_shape)
        next_obs = np.array(next_obs, dtype=self.observation_space.dtype).reshape(
            n, *self.obs_shape
        )
        action = np.array(action, dtype=self._action_dtype).reshape(n, self.action_dim)
        reward = np.asarray(reward, dtype=np.float32).reshape(n)
        done = np.asarray(done).astype(bool).reshape(n)
        if len(infos) != n:
            raise ValueError(f"infos must hold one dict per environment ({n}), got {len(infos)}.")
        if not np.isfinite(reward).all():
            raise ValueError("reward contains NaN or inf values.")
        if self.handle_timeout_termination:
            timeout = np.array([bool(info.get("TimeLimit.truncated", False)) for info in infos])
        else:
            timeout = np.zeros(n, dtype=bool)
        # An environment reset without a done (e.g. a new ``learn`` call resets the env):
        # this step does not continue the previous one, so it starts a new episode.
        if self.detect_resets and self._last_next_obs is not None:
            moved = obs != self._last_next_obs
            if np.issubdtype(obs.dtype, np.floating):
                moved &= ~(np.isnan(obs) & np.isnan(self._last_next_obs))
            self._new_episodes(moved.reshape(n, -1).any(1) & ~self._last_done)
        self._staged.append((obs, next_obs, action, reward, done, timeout, self._traj.copy()))
        self._new_episodes(done)  # environments whose episode ended start a new one
        self._last_next_obs, self._last_done = next_obs, done
        self.pos += 1
        if self.pos == self.buffer_size:
            self.full = True
            self.pos = 0
        if len(self._staged) >= self.flush_every:
            self.flush()

    def sample(self, batch_size: int, env: VecNormalize | None = None) -> ReplayBufferSamples:
        """Draws ``batch_size`` transitions: ``round(batch_size * mixture_ratio)`` by retrieval.

        Steps still staged (at most ``flush_every - 1``) are written first when the memory is
        empty; otherwise they wait for the next flush.
        """
        if len(self.memory) == 0:
            self.flush()
        if len(self.memory) == 0:
            raise RuntimeError(
                "Cannot sample from an empty HippoReplayBuffer: add transitions first."
            )
        batch = self.memory.sample(batch_size)
        self.last_sample = batch
        if self.consolidation is not None:
            metrics = self.consolidation()
            if metrics is not None:
                self.consolidation_metrics = metrics
        return self._to_samples(batch, env)

    def _get_samples(
        self, batch_inds: np.ndarray, env: VecNormalize | None = None
    ) -> ReplayBufferSamples:
        """The transitions at memory rows ``batch_inds`` (no retrieval, no access counting)."""
        self.flush()
        index = torch.as_tensor(np.asarray(batch_inds), dtype=torch.int64)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self.memory)):
            raise IndexError(
                f"batch_inds must lie in [0, {len(self.memory)}), got "
                f"[{int(index.min())}, {int(index.max())}]."
            )
        return self._to_samples(self.memory.storage.get(index), env)

    def reset(self) -> None:
        """Empties the memory and forgets the running episodes."""
        super().reset()
        self.memory.empty()
        self.last_sample = None
        self._reset_streams()

    # ------------------------------------------------------------------ memory side
    def flush(self) -> None:
        """Writes the staged steps to the memory (one ``extend`` of ``[n_envs, time]``)."""
        if not self._staged:
            return
        obs, next_obs, action, reward, done, timeout, traj = (
            torch.from_numpy(np.stack(column, axis=1)) for column in zip(*self._staged)
        )
        self._staged = []
        n, t = traj.shape
        data = TensorDict(
            {
                "observation": obs,
                "action": action,
                ("collector", "traj_ids"): traj.to(torch.int64),
                ("next", "observation"): next_obs,
                ("next", "reward"): reward.unsqueeze(-1),
                ("next", "done"): done.unsqueeze(-1),
                ("next", "terminated"): (done & ~timeout).unsqueeze(-1),
                ("next", "truncated"): (done & timeout).unsqueeze(-1),
            },
            batch_size=[n, t],
        )
        self.memory.extend(data)

    def _reset_streams(self) -> None:
        self._staged: list[tuple[np.ndarray, ...]] = []
        self._traj = np.arange(self.n_envs, dtype=np.int64)  # each env's running episode
        self._next_traj = self.n_envs
        self._last_next_obs: np.ndarray | None = None
        self._last_done = np.zeros(self.n_envs, dtype=bool)

    def _new_episodes(self, envs: np.ndarray) -> None:
        """Gives the environments flagged in ``envs`` a new trajectory id."""
        ended = np.flatnonzero(envs)
        if ended.size:
            self._traj[ended] = np.arange(self._next_traj, self._next_traj + ended.size)
            self._next_traj += ended.size

    def _to_samples(self, batch: TensorDictBase, env: VecNormalize | None) -> ReplayBufferSamples:
        obs, next_obs = batch["observation"], batch["next", "observation"]
        reward = batch["next", "reward"]
        if env is not None:
            obs = torch.as_tensor(self._normalize_obs(obs.numpy(), env))
            next_obs = torch.as_tensor(self._normalize_obs(next_obs.numpy(), env))
            reward = torch.as_tensor(self._normalize_reward(reward.numpy(), env))
        dones = batch["next", "terminated" if self.handle_timeout_termination else "done"]
        return ReplayBufferSamples(
            observations=obs.to(self.device),
            actions=batch["action"].to(self.device),
            next_observations=next_obs.to(self.device),
            dones=dones.to(device=self.device, dtype=torch.float32),
            rewards=reward.to(device=self.device, dtype=torch.float32),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(buffer_size={self.buffer_size}, n_envs={self.n_envs}, "
            f"memory={self.memory.storage!r}, sampler={self.memory.sampler!r})"
        )


if _SB3_IMPORT_ERROR is not None and HippoReplayBuffer.__doc__:  # nothing to run the example with
    HippoReplayBuffer.__doc__ = HippoReplayBuffer.__doc__.split("    Examples:")[0]
