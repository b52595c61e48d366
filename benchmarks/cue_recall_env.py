"""A cue-recall task: the cue shown at the first step decides the action rewarded ``delay`` steps later.

An episode lasts ``delay + 1`` steps. The first observation shows one of ``num_cues`` cues
(a one-hot vector); the next ``delay - 1`` observations are blank (all zeros); the last one
raises a query flag. Actions are ignored until the query; there, the action equal to the cue
earns a reward of 1 and any other action 0, and the episode ends. Without memory of the first
step the best success rate is chance, ``1 / num_cues``.

Observation: ``[cue one-hot (num_cues), query flag]``, float32. Action: ``Discrete(num_cues)``.
``info["success"]`` is set at the query step.

``make_cue_recall_env`` wraps ``num_envs`` copies in a gymnasium ``SyncVectorEnv`` (same-step
autoreset) and TorchRL's ``GymWrapper``: one batched TorchRL env, ``batch_size=[num_envs]``,
run in-process.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from torchrl.envs import GymWrapper


class CueRecallEnv(gym.Env):
    """Shows a cue, waits ``delay`` steps, then rewards the action that names the cue.

    Args:
        num_cues (int, optional): number of cues and of actions. Defaults to ``4``.
        delay (int, optional): steps between the cue and the query (>= 1). Defaults to ``60``.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, num_cues: int = 4, delay: int = 60) -> None:
        if num_cues < 2:
            raise ValueError(f"num_cues must be >= 2, got {num_cues}.")
        if delay < 1:
            raise ValueError(f"delay must be >= 1, got {delay}.")
        self.num_cues = num_cues
        self.delay = delay
        self.observation_space = gym.spaces.Box(0.0, 1.0, (num_cues + 1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(num_cues)
        self._cue = 0
        self._t = 0

    def _observation(self) -> np.ndarray:
        obs = np.zeros(self.num_cues + 1, dtype=np.float32)
        if self._t == 0:
            obs[self._cue] = 1.0
        elif self._t == self.delay:
            obs[-1] = 1.0
        return obs

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._cue = int(self.np_random.integers(self.num_cues))
        self._t = 0
        return self._observation(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._t == self.delay:
            success = int(action) == self._cue
            self._t += 1
            obs = np.zeros(self.num_cues + 1, dtype=np.float32)
            return obs, float(success), True, False, {"success": success}
        self._t += 1
        return self._observation(), 0.0, False, False, {}


def make_cue_recall_env(
    num_envs: int = 16, *, num_cues: int = 4, delay: int = 60, seed: int = 0
) -> GymWrapper:
    """``num_envs`` cue-recall envs as one batched TorchRL env (in-process ``SyncVectorEnv``)."""
    vector_env = gym.vector.SyncVectorEnv(
        [lambda: CueRecallEnv(num_cues, delay) for _ in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    env = GymWrapper(vector_env)
    env.set_seed(seed)
    return env
