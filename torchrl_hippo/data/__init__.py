"""TorchRL replay-buffer parts: storage, writer and sampler of the episodic memory."""

from torchrl_hippo.data.prioritized import TorchPrioritizedSampler
from torchrl_hippo.data.sampler import HippoSampler
from torchrl_hippo.data.segmenters import (
    ChangePointSegmenter,
    FixedWindowSegmenter,
    GoalSegmenter,
    Segmenter,
)
from torchrl_hippo.data.storage import HippoStorage
from torchrl_hippo.data.writer import HippoWriter

__all__ = [
    "ChangePointSegmenter",
    "FixedWindowSegmenter",
    "GoalSegmenter",
    "HippoSampler",
    "HippoStorage",
    "HippoWriter",
    "Segmenter",
    "TorchPrioritizedSampler",
]
