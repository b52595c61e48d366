"""Benchmark environments for episodic memory: long episodes, sparse rewards, partial views.

Importing this package registers the environments with gymnasium (again on a re-import, a
registered id is left alone), so they can be made by id, with gymnasium or through TorchRL:

=================================  ==================================================
id                                 environment
=================================  ==================================================
``hippo/Corridor-v0``              :class:`Corridor` (``noise=0.5``)
``hippo/Corridor-ZeroNoise-v0``    :class:`Corridor` (``noise=0.0``)
``hippo/Corridor-Cue-v0``          :class:`Corridor` (``cue=True``)
``hippo/MultiRoomKeys-v0``         :class:`MultiRoomKeys`
``hippo/Crafting-v0``              :class:`Crafting`
``hippo/SequenceGames-v0``         :class:`SequenceGames` (``game="matching"``)
``hippo/SequenceGames-Auction-v0`` :class:`SequenceGames` (``game="auction"``)
``hippo/StoryGen-v0``              :class:`StoryGen`
=================================  ==================================================

Episode lengths are capped inside each environment (``max_steps`` or ``steps``), so the ids are
registered without a ``TimeLimit`` wrapper. Keyword arguments given to ``gymnasium.make``
override the registered ones. In a process that has not imported this package (e.g. a spawned
worker), prefix the id with the module, ``"torchrl_hippo.envs:hippo/Corridor-v0"``, and
gymnasium imports it first.

Examples:
    >>> import gymnasium as gym
    >>> import torchrl_hippo.envs
    >>> env = gym.make("hippo/Corridor-ZeroNoise-v0", length=10)
    >>> obs, info = env.reset(seed=0)
    >>> obs.shape
    (8,)
    >>> from torchrl.envs import GymEnv
    >>> td = GymEnv("hippo/SequenceGames-Auction-v0").rollout(5)
    >>> td["next", "reward"].shape
    torch.Size([5, 1])
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from torchrl_hippo.envs.corridor import Corridor, CorridorCurriculum
from torchrl_hippo.envs.crafting import Crafting
from torchrl_hippo.envs.multi_room import MultiRoomKeys
from torchrl_hippo.envs.novelty import EpisodicNovelty
from torchrl_hippo.envs.sequence_games import SequenceGames
from torchrl_hippo.envs.story import StoryGen
from torchrl_hippo.envs.transforms import MemoryRetrieval

__all__ = [
    "ENV_IDS",
    "Corridor",
    "CorridorCurriculum",
    "Crafting",
    "EpisodicNovelty",
    "MemoryRetrieval",
    "MultiRoomKeys",
    "SequenceGames",
    "StoryGen",
    "register_envs",
]

_REGISTRY: dict[str, tuple[str, dict[str, Any]]] = {
    "hippo/Corridor-v0": ("corridor:Corridor", {}),
    "hippo/Corridor-ZeroNoise-v0": ("corridor:Corridor", {"noise": 0.0}),
    "hippo/Corridor-Cue-v0": ("corridor:Corridor", {"cue": True}),
    "hippo/MultiRoomKeys-v0": ("multi_room:MultiRoomKeys", {}),
    "hippo/Crafting-v0": ("crafting:Crafting", {}),
    "hippo/SequenceGames-v0": ("sequence_games:SequenceGames", {"game": "matching"}),
    "hippo/SequenceGames-Auction-v0": ("sequence_games:SequenceGames", {"game": "auction"}),
    "hippo/StoryGen-v0": ("story:StoryGen", {}),
}
ENV_IDS: tuple[str, ...] = tuple(_REGISTRY)
"""Every id this package registers."""


def register_envs() -> None:
    """Registers the ids of :data:`ENV_IDS` with gymnasium; ids already registered are skipped."""
    for env_id, (entry, kwargs) in _REGISTRY.items():
        if env_id not in gym.registry:
            gym.register(
                id=env_id,
                entry_point=f"torchrl_hippo.envs.{entry}",
                kwargs=dict(kwargs),
                disable_env_checker=False,
            )


register_envs()
