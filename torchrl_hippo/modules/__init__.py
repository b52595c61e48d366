"""Neural network and TensorDict modules of torchrl_hippo."""

from torchrl_hippo.modules.encoder import DualEncoder

__all__ = ["DualEncoder"]
