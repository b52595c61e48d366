"""A sparse-reward corridor, with optional distractor noise, a start cue, and a curriculum.

The agent starts at cell ``0`` of a corridor and the only reward lies ``length`` moves away, at
the far end. It tests exploration and credit assignment over a long, empty stretch; with
``cue=True`` it also tests memory: the first observation shows a cue that decides which of two
end actions pays, and nothing later repeats it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from torchrl_hippo.envs._utils import (
    check_action,
    check_choice,
    check_float,
    check_int,
    check_render_mode,
)

__all__ = ["Corridor", "CorridorCurriculum"]

_NOISE_BLOCK = 1024  # rows of distractor noise drawn at once


class Corridor(gym.Env[np.ndarray, np.int64]):
    """A corridor whose only reward is at the far end.

    The agent starts at cell ``0``; the far end is cell ``length``. Moving left at cell ``0`` or
    right at the far end leaves the agent in place.

    - Without a cue, stepping onto the far end pays ``1.0`` and terminates the episode.
    - With ``cue=True``, the first observation shows one of two cues (drawn at reset). At the
      far end the agent must pick the end action that matches it: the right one pays ``1.0``,
      the wrong one pays ``0.0``; both terminate. Away from the end, the pick actions do nothing.

    Every other step pays ``0.0``. The episode is truncated after ``max_steps`` steps (an internal
    cap, no ``TimeLimit`` wrapper needed).

    **Observation** (``Box(float32)`` of shape ``[4 + noise_dim]``):

    ==========  ===========================================================================
    index       meaning
    ==========  ===========================================================================
    0           position ``cell / length``, in ``[0, 1]``
    1           ``1.0`` at the far end
    2, 3        cue A / cue B, one of them ``1.0`` on the first observation only (``cue=True``)
    4 ...       distractors, i.i.d. uniform in ``[-noise, noise]`` every step (``0`` if no noise)
    ==========  ===========================================================================

    **Actions** (``Discrete(2)``, or ``Discrete(4)`` with ``cue=True``): ``0`` left, ``1`` right,
    ``2`` pick A, ``3`` pick B.

    ``info`` always holds ``"success"`` (``True`` on the step that earns the reward).

    Args:
        length (int, optional): moves from the start to the far end, ``>= 1``. Defaults to ``50``.

    Keyword Args:
        noise (float, optional): amplitude of the distractor noise, in ``[0, 1]``. ``0`` gives
            the zero-noise variant (``hippo/Corridor-ZeroNoise-v0``). Defaults to ``0.5``.
        noise_dim (int, optional): number of distractor features, ``>= 0``. They are present (and
            zero) even when ``noise=0`` so that variants share one observation space.
            Defaults to ``4``.
        cue (bool, optional): show a start cue and pay only the matching end action.
            Defaults to ``False``.
        max_steps (int, optional): step cap before truncation. Defaults to ``None``:
            ``4 * (length + 1)``, scaled with ``length`` when :meth:`set_length` changes it.
        render_mode (str, optional): ``None`` or ``"ansi"``. Defaults to ``None``.

    Examples:
        >>> from torchrl_hippo.envs import Corridor
        >>> env = Corridor(length=3, noise=0.0)
        >>> obs, info = env.reset(seed=0)
        >>> obs.shape, obs.dtype
        ((8,), dtype('float32'))
        >>> for _ in range(3):
        ...     obs, reward, terminated, truncated, info = env.step(1)  # right
        >>> reward, terminated, info["success"]
        (1.0, True, True)
        >>> env = Corridor(length=2, cue=True, render_mode="ansi")
        >>> obs, _ = env.reset(seed=4)
        >>> obs[2:4]  # the cue: pick B (action 3) at the end
        array([0., 1.], dtype=float32)
        >>> _ = env.step(1); _ = env.step(1)
        >>> env.render()
        '[..A] cue=B t=2'
        >>> env.step(3)[1:3]
        (1.0, True)
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}  # noqa: RUF012

    def __init__(
        self,
        length: int = 50,
        *,
        noise: float = 0.5,
        noise_dim: int = 4,
        cue: bool = False,
        max_steps: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        self.length = check_int("length", length, minimum=1)
        self.noise = check_float("noise", noise, low=0.0, high=1.0)
        self.noise_dim = check_int("noise_dim", noise_dim, minimum=0)
        if not isinstance(cue, (bool, np.bool_)):
            raise TypeError(f"cue must be a bool, got {cue!r}.")
        self.cue = bool(cue)
        self._max_steps_arg = (
            None if max_steps is None else check_int("max_steps", max_steps, minimum=1)
        )
        self.max_steps = self._default_max_steps()
        self.render_mode = check_render_mode(render_mode, self.metadata["render_modes"])

        low = np.zeros(4 + self.noise_dim, dtype=np.float32)
        high = np.ones(4 + self.noise_dim, dtype=np.float32)
        low[4:] = -1.0
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        self.action_space = spaces.Discrete(4 if self.cue else 2)
        self._n_actions = 4 if self.cue else 2

        self._obs = np.zeros(4 + self.noise_dim, dtype=np.float32)
        self._inv_length = 1.0 / self.length
        self._pos = 0
        self._t = -1  # -1 until the first reset
        self._cue_value = 0  # 0: A, 1: B
        self._noise_rows: np.ndarray = np.zeros((0, self.noise_dim), dtype=np.float32)
        self._noise_next = 0

    def _default_max_steps(self) -> int:
        return 4 * (self.length + 1) if self._max_steps_arg is None else self._max_steps_arg

    def set_length(self, length: int) -> None:
        """Changes the corridor's length; it takes effect at the next :meth:`reset`.

        The observation space does not change (the position is a fraction of the length).
        """
        self.length = check_int("length", length, minimum=1)
        self._inv_length = 1.0 / self.length
        self.max_steps = self._default_max_steps()

    def _draw_noise(self) -> None:
        rows = min(_NOISE_BLOCK, self.max_steps + 1)
        block = self.np_random.random((rows, self.noise_dim), dtype=np.float32)
        self._noise_rows = (2.0 * block - 1.0) * np.float32(self.noise)
        self._noise_next = 0

    def _observe(self) -> np.ndarray:
        obs = self._obs
        obs[0] = self._pos * self._inv_length
        obs[1] = 1.0 if self._pos == self.length else 0.0
        if self.noise_dim and self.noise > 0.0:
            if self._noise_next == len(self._noise_rows):
                self._draw_noise()
            obs[4:] = self._noise_rows[self._noise_next]
            self._noise_next += 1
        return obs.copy()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Starts an episode at cell ``0`` (and draws the cue when ``cue=True``).

        ``options`` is accepted for API compatibility and ignored.
        """
        super().reset(seed=seed)
        self._pos = 0
        self._t = 0
        self._obs[:] = 0.0
        if self.noise_dim and self.noise > 0.0:
            self._draw_noise()
        if self.cue:
            self._cue_value = int(self.np_random.integers(2))
            self._obs[2 + self._cue_value] = 1.0
        obs = self._observe()
        self._obs[2:4] = 0.0  # the cue is shown once
        return obs, {"success": False}

    def step(self, action: np.int64 | int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Moves (or picks an end); see the class docstring for the rules."""
        a = check_action(action, self._n_actions)
        if self._t < 0:
            raise RuntimeError("Corridor.step() called before reset().")
        self._t += 1
        pos = self._pos
        reward = 0.0
        terminated = False
        if a == 1:
            if pos < self.length:
                pos += 1
                self._pos = pos
                if pos == self.length and not self.cue:
                    reward, terminated = 1.0, True
        elif a == 0:
            if pos > 0:
                self._pos = pos - 1
        elif pos == self.length:  # a pick at the end (cue mode only)
            terminated = True
            if a - 2 == self._cue_value:
                reward = 1.0
        truncated = not terminated and self._t >= self.max_steps
        return self._observe(), reward, terminated, truncated, {"success": reward > 0.0}

    def render(self) -> str | None:
        """Returns the corridor as text (``render_mode="ansi"``), e.g. ``'[.A...] t=3'``."""
        if self.render_mode != "ansi":
            return None
        cells = ["."] * (self.length + 1)
        cells[self._pos] = "A"
        text = "[" + "".join(cells) + "]"
        if self.cue:
            text += " cue=" + "AB"[self._cue_value]
        return f"{text} t={max(self._t, 0)}"


class _ScalarLogger(Protocol):
    def log_scalar(self, name: str, value: float, step: int | None = None) -> None: ...


class CorridorCurriculum(gym.Wrapper[np.ndarray, np.int64, np.ndarray, np.int64]):
    """Lengthens a :class:`Corridor` in stages, on success rate or on a schedule.

    The curriculum goes through ``lengths`` in order (stage ``0`` is ``lengths[0]``). Whether to
    move on is decided at each :meth:`reset`, from the episodes finished so far, so an episode
    always runs at one length:

    - ``mode="success"``: advance once the last ``window`` episodes of the current stage
      succeeded at a rate ``>= threshold``;
    - ``mode="schedule"``: advance after every ``episodes_per_stage`` episodes.

    The stage is exposed as the :attr:`stage` attribute and in every ``info`` (``"stage"`` and
    ``"length"``). With a TorchRL logger (anything with ``log_scalar(name, value, step)``, e.g.
    :class:`torchrl.record.loggers.CSVLogger`), the stage is logged at the first reset and at
    each change, with the number of finished episodes as step.

    Args:
        env (gym.Env): a :class:`Corridor`, possibly wrapped. Its ``max_steps`` follows the length
            unless it was given explicitly.
        lengths (sequence of int, optional): the corridor length of each stage.
            Defaults to ``(5, 10, 20, 50, 100)``.

    Keyword Args:
        mode (str, optional): ``"success"`` or ``"schedule"``. Defaults to ``"success"``.
        threshold (float, optional): success rate needed to advance, in ``(0, 1]``.
            Defaults to ``0.8``.
        window (int, optional): episodes the success rate is measured over. Defaults to ``20``.
        episodes_per_stage (int, optional): episodes per stage in ``"schedule"`` mode.
            Defaults to ``100``.
        logger (Logger, optional): a TorchRL logger to ``log_scalar`` the stage into.
            Defaults to ``None``.
        log_name (str, optional): the scalar's name. Defaults to ``"corridor/stage"``.

    Examples:
        >>> from torchrl_hippo.envs import Corridor, CorridorCurriculum
        >>> env = CorridorCurriculum(
        ...     Corridor(noise=0.0), lengths=(2, 4), mode="schedule", episodes_per_stage=1
        ... )
        >>> obs, info = env.reset(seed=0)
        >>> env.stage, info["stage"], info["length"]
        (0, 0, 2)
        >>> _ = env.step(1); obs, reward, terminated, truncated, info = env.step(1)
        >>> reward, terminated
        (1.0, True)
        >>> obs, info = env.reset()
        >>> env.stage, info["length"]
        (1, 4)
    """

    def __init__(
        self,
        env: gym.Env,
        lengths: Sequence[int] = (5, 10, 20, 50, 100),
        *,
        mode: str = "success",
        threshold: float = 0.8,
        window: int = 20,
        episodes_per_stage: int = 100,
        logger: _ScalarLogger | None = None,
        log_name: str = "corridor/stage",
    ) -> None:
        if not isinstance(getattr(env, "unwrapped", None), Corridor):
            raise TypeError(f"env must be a Corridor (possibly wrapped), got {type(env).__name__}.")
        super().__init__(env)
        if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or not lengths:
            raise ValueError(f"lengths must be a non-empty sequence of ints >= 1, got {lengths!r}.")
        self.lengths = tuple(check_int("lengths[i]", n, minimum=1) for n in lengths)
        self.mode = check_choice("mode", mode, ("success", "schedule"))
        self.threshold = check_float("threshold", threshold, low=0.0, high=1.0)
        if self.threshold == 0.0:
            raise ValueError("threshold must be a number in (0, 1], got 0.0.")
        self.window = check_int("window", window, minimum=1)
        self.episodes_per_stage = check_int("episodes_per_stage", episodes_per_stage, minimum=1)
        if logger is not None and not callable(getattr(logger, "log_scalar", None)):
            raise TypeError(
                f"logger must have a log_scalar(name, value, step) method, got "
                f"{type(logger).__name__}."
            )
        self.logger = logger
        self.log_name = log_name
        self.stage = 0
        self.episodes = 0  # finished episodes, all stages
        self._stage_episodes = 0  # finished episodes of the current stage
        self._recent: deque[bool] = deque(maxlen=self.window)  # their last successes
        self._running = False
        self._logged = False
        self._corridor: Corridor = env.unwrapped  # type: ignore[assignment]
        self._corridor.set_length(self.lengths[0])

    @property
    def length(self) -> int:
        """The corridor length of the current stage."""
        return self.lengths[self.stage]

    @property
    def success_rate(self) -> float:
        """Success rate over the current stage's last ``window`` finished episodes (``nan`` if none)."""
        return float(np.mean(self._recent)) if self._recent else float("nan")

    def _should_advance(self) -> bool:
        if self.stage == len(self.lengths) - 1:
            return False
        if self.mode == "schedule":
            return self._stage_episodes >= self.episodes_per_stage
        return len(self._recent) == self.window and self.success_rate >= self.threshold

    def _log(self) -> None:
        if self.logger is not None:
            self.logger.log_scalar(self.log_name, float(self.stage), step=self.episodes)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Advances the stage if due, then resets the corridor at the stage's length."""
        if self._running:  # an episode cut short by reset() still counts as a failure
            self._finish(False)
        if self._should_advance():
            self.stage += 1
            self._stage_episodes = 0
            self._recent.clear()
            self._corridor.set_length(self.length)
            self._log()
        elif not self._logged:
            self._log()
        self._logged = True
        obs, info = self.env.reset(seed=seed, options=options)
        self._running = True
        info["stage"] = self.stage
        info["length"] = self.length
        return obs, info

    def _finish(self, success: bool) -> None:
        self._running = False
        self.episodes += 1
        self._stage_episodes += 1
        self._recent.append(success)

    def step(self, action: np.int64 | int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Steps the corridor; records the episode's success when it ends."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        if (terminated or truncated) and self._running:
            self._finish(bool(info.get("success", False)))
        info["stage"] = self.stage
        info["length"] = self.length
        return obs, float(reward), terminated, truncated, info
