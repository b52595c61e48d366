"""torchrl_hippo: a learnable, searchable episodic memory for TorchRL replay buffers."""

from torchrl_hippo.consolidation import (
    ConsolidationHook,
    Consolidator,
    MixtureRatioScheduler,
    PairSampler,
)
from torchrl_hippo.data import HippoSampler, HippoStorage, HippoWriter
from torchrl_hippo.modules import (
    DualEncoder,
    HierarchicalMemory,
    MemoryELBOLoss,
    make_hierarchical_actor_critic,
)
from torchrl_hippo.objectives import ReturnAwareContrastiveLoss

__all__ = [
    "ConsolidationHook",
    "Consolidator",
    "DualEncoder",
    "HierarchicalMemory",
    "HippoSampler",
    "HippoStorage",
    "HippoWriter",
    "MemoryELBOLoss",
    "MixtureRatioScheduler",
    "PairSampler",
    "ReturnAwareContrastiveLoss",
    "make_hierarchical_actor_critic",
]
__version__ = "0.1.0"
