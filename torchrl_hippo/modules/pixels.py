"""A convolutional frame encoder, so that the memory can key windows of pixel observations.

:class:`PixelEncoder` maps one frame (``uint8`` or float, channels first or last) to a feature
vector. Given to :class:`~torchrl_hippo.DualEncoder` as its ``observation_encoder``, it encodes
every frame of a key window; the writer, the storage (deferred keys, refresh, consolidation) and
:func:`~torchrl_hippo.query.memory_query` then all accept ``uint8`` frames, which the memory
stores as they come (four times smaller than floats). :func:`make_pixel_dual_encoder` builds
the two together.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchrl.modules import ConvNet

from torchrl_hippo.modules.encoder import DualEncoder

__all__ = ["PixelEncoder", "make_pixel_dual_encoder"]


def _positive_ints(value: Sequence[int] | int, name: str, length: int | None = None) -> list[int]:
    values = [value] * (length or 1) if isinstance(value, int) else list(value)
    if (
        not values
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values)
        or (length is not None and len(values) != length)
    ):
        expected = f"{length} " if length is not None else ""
        raise ValueError(
            f"{name} must be a positive int or a sequence of {expected}positive ints, got {value!r}."
        )
    return values


class PixelEncoder(nn.Module):
    """Encodes frames ``[..., C, H, W]`` (or ``[..., H, W, C]``) into ``out_features`` features.

    A Nature-DQN-like stack of convolutions (TorchRL's :class:`~torchrl.modules.ConvNet`: by
    default 32, 64 and 64 channels with kernels 8, 4, 3 and strides 4, 2, 1, ReLU), flattened,
    then ``Linear -> LayerNorm -> tanh`` to ``out_features``. The bounded, normalised output
    sits well next to the action and reward features that
    :class:`~torchrl_hippo.DualEncoder` concatenates to it.

    Integer frames (``uint8`` as environments and the memory hold them, or ``bool``) are
    converted to float and multiplied by ``scale`` (``1 / 255`` by default) inside the module, so
    the replay memory can keep the raw bytes. Floating-point frames are taken as they are
    (already scaled, e.g. by TorchRL's :class:`~torchrl.envs.ToTensorImage`).

    Args:
        frame_shape (sequence of int): the shape of one frame as it is stored: ``(C, H, W)``, or
            ``(H, W, C)`` with ``channels_last=True`` (e.g. a gymnasium ``"pixels"`` entry). Stacked
            frames are channels (``C = 4`` for four grey frames).
        out_features (int, optional): size of the output features. Defaults to ``256``.

    Keyword Args:
        num_cells (sequence of int, optional): output channels of each convolution.
            Defaults to ``(32, 64, 64)``.
        kernel_sizes (int or sequence of int, optional): kernel size of each convolution.
            Defaults to ``(8, 4, 3)``.
        strides (int or sequence of int, optional): stride of each convolution.
            Defaults to ``(4, 2, 1)``.
        channels_last (bool, optional): frames come as ``[..., H, W, C]`` and are permuted inside.
            Defaults to ``False``.
        scale (float, optional): factor applied to integer frames after their conversion to float.
            Defaults to ``1 / 255``.

    Attributes:
        out_features (int): the size of the output (what ``DualEncoder`` calls
            ``observation_dim``).
        conv_features (int): the size of the flattened convolution output.

    Examples:
        >>> import torch
        >>> from torchrl_hippo.modules.pixels import PixelEncoder
        >>> encoder = PixelEncoder((3, 64, 64), out_features=32)
        >>> frames = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
        >>> features = encoder(frames)  # divided by 255 inside
        >>> features.shape, features.dtype
        (torch.Size([5, 32]), torch.float32)
        >>> torch.allclose(encoder(frames / 255.0), features, atol=1e-5)  # float frames: as they are
        True
        >>> encoder.out_features, encoder.conv_features
        (32, 1024)
    """

    def __init__(
        self,
        frame_shape: Sequence[int],
        out_features: int = 256,
        *,
        num_cells: Sequence[int] = (32, 64, 64),
        kernel_sizes: Sequence[int] | int = (8, 4, 3),
        strides: Sequence[int] | int = (4, 2, 1),
        channels_last: bool = False,
        scale: float = 1.0 / 255.0,
    ) -> None:
        super().__init__()
        if isinstance(frame_shape, (str, bytes)) or not isinstance(frame_shape, Sequence):
            raise TypeError(
                f"frame_shape must be a sequence of 3 ints, got {type(frame_shape).__name__}."
            )
        frame_shape = tuple(_positive_ints(frame_shape, "frame_shape", 3))
        out_features = _positive_ints(out_features, "out_features", 1)[0]
        cells = _positive_ints(num_cells, "num_cells")
        kernels = _positive_ints(kernel_sizes, "kernel_sizes", len(cells))
        steps = _positive_ints(strides, "strides", len(cells))
        if not isinstance(channels_last, bool):
            raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}.")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a number > 0, got {scale!r}.")
        self.frame_shape = frame_shape
        self.channels_last = channels_last
        self.scale = float(scale)
        channels, height, width = (
            (frame_shape[2], frame_shape[0], frame_shape[1]) if channels_last else frame_shape
        )
        # Output size of the valid (unpadded) convolutions, layer by layer.
        size_h, size_w = height, width
        for kernel, stride in zip(kernels, steps):
            size_h, size_w = (size_h - kernel) // stride + 1, (size_w - kernel) // stride + 1
            if size_h < 1 or size_w < 1:
                raise ValueError(
                    f"frame_shape={frame_shape}: frames of {height}x{width} pixels are too small "
                    f"for kernel_sizes={kernels} and strides={steps} (the output would be empty)."
                )
        self.conv_features = cells[-1] * size_h * size_w
        self.out_features = out_features
        self.convnet = ConvNet(
            in_features=channels,
            num_cells=cells,
            kernel_sizes=kernels,
            strides=steps,
            activation_class=nn.ReLU,
        )
        self.head = nn.Sequential(
            nn.Linear(self.conv_features, out_features),
            nn.LayerNorm(out_features),
            nn.Tanh(),
        )

    def forward(self, frames: Tensor) -> Tensor:
        """Encodes ``frames`` of shape ``[*batch, *frame_shape]`` into ``[*batch, out_features]``."""
        if not isinstance(frames, Tensor):
            raise TypeError(f"frames must be a Tensor, got {type(frames).__name__}.")
        if frames.ndim < 3 or tuple(frames.shape[-3:]) != self.frame_shape:
            layout = "[..., H, W, C]" if self.channels_last else "[..., C, H, W]"
            raise ValueError(
                f"frames: expected shape {layout} with frame_shape={self.frame_shape}, got "
                f"{list(frames.shape)}."
            )
        if frames.is_complex():
            raise TypeError(f"frames must be real (integer or floating), got {frames.dtype}.")
        dtype = self.head[0].weight.dtype
        if frames.is_floating_point():
            x = frames.to(dtype)
        else:
            x = frames.to(dtype).mul_(self.scale)
        if self.channels_last:
            x = x.movedim(-1, -3)
        batch = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:])
        return self.head(self.convnet(x)).reshape(*batch, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"frame_shape={self.frame_shape}, out_features={self.out_features}, "
            f"channels_last={self.channels_last}, scale={self.scale:.6g}"
        )


def make_pixel_dual_encoder(
    frame_shape: Sequence[int],
    action_dim: int,
    embed_dim: int = 128,
    *,
    features: int = 256,
    channels_last: bool = False,
    pixel_kwargs: dict | None = None,
    **encoder_kwargs,
) -> DualEncoder:
    """A :class:`~torchrl_hippo.DualEncoder` whose steps see frames through a :class:`PixelEncoder`.

    Args:
        frame_shape (sequence of int): one stored frame, ``(C, H, W)`` (or ``(H, W, C)`` with
            ``channels_last=True``).
        action_dim (int): size of a continuous action, or number of discrete actions.
        embed_dim (int, optional): size of the keys. Defaults to ``128``.

    Keyword Args:
        features (int, optional): the pixel encoder's ``out_features`` (the dual encoder's
            ``observation_dim``). Defaults to ``256``.
        channels_last (bool, optional): frames come as ``[..., H, W, C]``. Defaults to ``False``.
        pixel_kwargs (dict, optional): further :class:`PixelEncoder` keyword arguments
            (``num_cells``, ``kernel_sizes``, ``strides``, ``scale``). Defaults to ``None``.
        **encoder_kwargs: :class:`~torchrl_hippo.DualEncoder` keyword arguments (``window``,
            ``hidden_dim``, ``momentum``, keys...).

    Examples:
        >>> import torch
        >>> from torchrl_hippo.modules.pixels import make_pixel_dual_encoder
        >>> encoder = make_pixel_dual_encoder((1, 36, 36), action_dim=3, embed_dim=16, window=4,
        ...                                   features=32, hidden_dim=32)
        >>> frames = torch.randint(0, 256, (2, 4, 1, 36, 36), dtype=torch.uint8)  # [B, W, C, H, W]
        >>> keys = encoder.encode(frames, torch.randint(3, (2, 4)), torch.zeros(2, 4), target=True)
        >>> keys.shape
        torch.Size([2, 16])
    """
    pixel = PixelEncoder(frame_shape, features, channels_last=channels_last, **(pixel_kwargs or {}))
    return DualEncoder(
        pixel.out_features, action_dim, embed_dim, observation_encoder=pixel, **encoder_kwargs
    )
