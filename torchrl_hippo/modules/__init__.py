"""Neural network and TensorDict modules of torchrl_hippo."""

from torchrl_hippo.modules.builders import HierarchicalActorCritic, make_hierarchical_actor_critic
from torchrl_hippo.modules.compression import BufferVAE
from torchrl_hippo.modules.encoder import DualEncoder
from torchrl_hippo.modules.hierarchical import HierarchicalMemory, MemoryELBOLoss
from torchrl_hippo.modules.pixels import PixelEncoder, make_pixel_dual_encoder

__all__ = [
    "BufferVAE",
    "DualEncoder",
    "HierarchicalActorCritic",
    "HierarchicalMemory",
    "MemoryELBOLoss",
    "PixelEncoder",
    "make_hierarchical_actor_critic",
    "make_pixel_dual_encoder",
]
