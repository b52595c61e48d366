"""TorchRL loss modules of torchrl_hippo (mirrors ``torchrl.objectives``)."""

from torchrl_hippo.objectives.contrastive import ReturnAwareContrastiveLoss

__all__ = ["ReturnAwareContrastiveLoss"]
