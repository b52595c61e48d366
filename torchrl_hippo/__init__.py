"""torchrl_hippo: a learnable, searchable episodic memory for TorchRL replay buffers."""

from torchrl_hippo.consolidation import (
    ConsolidationHook,
    Consolidator,
    MixtureRatioScheduler,
    PairSampler,
)
from torchrl_hippo.data import (
    ChangePointSegmenter,
    FixedWindowSegmenter,
    GoalSegmenter,
    HippoSampler,
    HippoStorage,
    HippoWriter,
    Segmenter,
    TorchPrioritizedSampler,
)
from torchrl_hippo.modules import (
    DualEncoder,
    HierarchicalMemory,
    MemoryELBOLoss,
    make_hierarchical_actor_critic,
)
from torchrl_hippo.objectives import ReturnAwareContrastiveLoss
from torchrl_hippo.query import memory_query

__all__ = [
    "ChangePointSegmenter",
    "ConsolidationHook",
    "Consolidator",
    "DualEncoder",
    "FixedWindowSegmenter",
    "GoalSegmenter",
    "HierarchicalMemory",
    "HippoSampler",
    "HippoStorage",
    "HippoWriter",
    "MemoryELBOLoss",
    "MixtureRatioScheduler",
    "PairSampler",
    "ReturnAwareContrastiveLoss",
    "Segmenter",
    "TorchPrioritizedSampler",
    "make_hierarchical_actor_critic",
    "memory_query",
]
__version__ = "0.1.0"
