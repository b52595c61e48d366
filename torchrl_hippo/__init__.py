"""torchrl_hippo: a learnable, searchable episodic memory for TorchRL replay buffers."""

from torchrl_hippo.data import HippoSampler, HippoStorage, HippoWriter
from torchrl_hippo.modules import DualEncoder

__all__ = ["DualEncoder", "HippoSampler", "HippoStorage", "HippoWriter"]
__version__ = "0.1.0"
