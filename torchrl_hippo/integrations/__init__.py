"""Adapters of the episodic memory for other ecosystems; each needs its own optional dependency.

- :mod:`torchrl_hippo.integrations.sb3`: :class:`~torchrl_hippo.integrations.sb3.HippoReplayBuffer`,
  a stable-baselines3 replay buffer (``pip install "torchrl-hippo[sb3]"``).

The adapters are imported on first use, so ``import torchrl_hippo.integrations`` needs none of
the optional dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["HippoReplayBuffer"]

_LAZY = {"HippoReplayBuffer": "torchrl_hippo.integrations.sb3"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
