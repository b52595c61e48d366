"""Schedules of the sampler's ``mixture_ratio``: hold during a warm-up, then ramp."""

from __future__ import annotations

import math

from torchrl.data import ReplayBuffer
from torchrl.data.replay_buffers.samplers import Sampler
from torchrl.data.replay_buffers.scheduler import ParameterScheduler

__all__ = ["MixtureRatioScheduler"]

_SHAPES = ("linear", "cosine")


class MixtureRatioScheduler(ParameterScheduler):
    r"""Ramps a sampler's ``mixture_ratio`` after a warm-up, linearly or along a half cosine.

    A TorchRL :class:`~torchrl.data.replay_buffers.scheduler.ParameterScheduler`: call
    :meth:`step` once per collector batch (or per optimiser step); after ``t`` calls the
    sampler's ``mixture_ratio`` is

    .. math::

        m(t) = \begin{cases}
            m_0 & t \le t_w \\
            m_0 + (m_1 - m_0)\, f\!\big(\min(1, (t - t_w) / T)\big) & t > t_w
        \end{cases}
        \qquad
        f(x) = \begin{cases} x & \text{linear} \\ (1 - \cos \pi x) / 2 & \text{cosine} \end{cases}

    with :math:`m_0` the initial value, :math:`m_1` ``final_value``, :math:`t_w`
    ``warmup_steps`` and :math:`T` ``num_steps``. The cosine ramp starts and ends flat. The
    value goes through the sampler's ``mixture_ratio`` setter, which checks it lies in
    ``[0, 1]``. ``state_dict`` / ``load_state_dict`` come from the base class.

    The defaults follow the design's guidance: from ``0.2`` to ``0.5``.

    Args:
        obj (ReplayBuffer or Sampler): the buffer whose sampler to drive, or the sampler (a
            :class:`~torchrl_hippo.HippoSampler`, or any sampler with ``mixture_ratio``).
        final_value (float, optional): :math:`m_1`, in ``[0, 1]``. Defaults to ``0.5``.

    Keyword Args:
        num_steps (int): :math:`T`, the length of the ramp (``>= 1``).
        initial_value (float, optional): :math:`m_0`, set on the sampler now. Defaults to
            ``0.2``; ``None`` keeps the sampler's current value.
        warmup_steps (int, optional): :math:`t_w` (``>= 0``). Defaults to ``0``.
        shape (str, optional): ``"linear"`` or ``"cosine"``. Defaults to ``"linear"``.

    Examples:
        >>> from torchrl_hippo import HippoSampler
        >>> from torchrl_hippo.consolidation import MixtureRatioScheduler
        >>> sampler = HippoSampler()
        >>> schedule = MixtureRatioScheduler(sampler, 0.5, num_steps=4, warmup_steps=2)
        >>> values = []
        >>> for _ in range(7):
        ...     schedule.step()
        ...     values.append(round(sampler.mixture_ratio, 3))
        >>> values
        [0.2, 0.2, 0.275, 0.35, 0.425, 0.5, 0.5]
        >>> cosine = MixtureRatioScheduler(sampler, 0.5, num_steps=4, shape="cosine")
        >>> [round(cosine.value_at(t), 3) for t in range(6)]
        [0.2, 0.244, 0.35, 0.456, 0.5, 0.5]
    """

    def __init__(
        self,
        obj: ReplayBuffer | Sampler,
        final_value: float = 0.5,
        *,
        num_steps: int,
        initial_value: float | None = 0.2,
        warmup_steps: int = 0,
        shape: str = "linear",
    ) -> None:
        super().__init__(obj, "mixture_ratio", min_value=0.0, max_value=1.0)
        for name, value, minimum in (
            ("num_steps", num_steps, 1),
            ("warmup_steps", warmup_steps, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
        if shape not in _SHAPES:
            raise ValueError(f"shape must be one of {_SHAPES}, got {shape!r}.")
        for name, value in (("final_value", final_value), ("initial_value", initial_value)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if initial_value is not None:
            self.sampler.mixture_ratio = initial_value
        self.initial_val = float(self.sampler.mixture_ratio)
        self.final_val = float(final_value)
        self.num_steps = num_steps
        self.warmup_steps = warmup_steps
        self.shape = shape

    def value_at(self, step: int) -> float:
        """The ``mixture_ratio`` after ``step`` calls to :meth:`step`."""
        progress = min(1.0, max(0, step - self.warmup_steps) / self.num_steps)
        if self.shape == "cosine":
            progress = (1.0 - math.cos(math.pi * progress)) / 2.0
        return self.initial_val + (self.final_val - self.initial_val) * progress

    def _step(self) -> float:
        return self.value_at(self._step_cnt)
