"""ReturnAwareContrastiveLoss: the consolidation ("sleep") loss that trains the memory's keys."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase, unravel_key
from torch import Tensor
from torchrl.objectives import LossModule

from torchrl_hippo.modules.encoder import DualEncoder
from triton_kernels import RowInfo, info_nce

__all__ = ["ReturnAwareContrastiveLoss"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


def _check_float(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}.")
    return float(value)


class ReturnAwareContrastiveLoss(LossModule):
    r"""Multi-positive InfoNCE over episode windows whose positives are near in time or in return.

    Each input row pairs an *anchor* window with a *positive* window (as drawn by
    :class:`~torchrl_hippo.consolidation.PairSampler`). Anchors go through the encoder's online
    network (``q``, trained); positives through its momentum target network (``k``, no
    gradient), MoCo-style, so the keys the memory stores and the queries it is searched with
    live in one space. With :math:`s_{ij} = q_i \cdot k_j / \tau`, the loss of anchor ``i`` is
    the cross-entropy against soft targets :math:`p_{ij}`:

    .. math::

        \ell_i = \log \sum_{j \notin M(i)} e^{s_{ij}} \;(+ \text{queue terms})
                 \;-\; \sum_j p_{ij}\, s_{ij},
        \qquad
        p_{ij} = (1 - w)\, \frac{T_{ij}}{\sum_j T_{ij}} + w\, \frac{G_{ij}}{\sum_j G_{ij}},

    - temporal positives :math:`T_{ij} = 1` when ``k_j`` comes from the anchor's episode
      within ``positive_radius`` steps;
    - return positives :math:`G_{ij} = \exp(-\tfrac12 ((R_i - R_j) / h)^2)` for every unmasked
      ``k_j``, ``R`` being the episode returns and ``h`` the ``return_bandwidth``;
    - masked columns :math:`M(i)`: windows of the anchor's episode with
      ``positive_radius < |dt| <= mask_radius``, which count neither as positives nor as
      negatives;
    - ``w = reward_weight``: ``0`` clusters windows by time, ``1`` by return. With
      ``w > 0``, a row with no temporal positive uses its return targets alone (and vice
      versa); with ``w = 0`` returns are not used, and a row with no temporal positive has
      loss ``0`` and is left out of the mean.

    Negatives are the other positives of the batch and, with ``queue_size > 0``, a MoCo queue
    of the latest ``queue_size`` target keys (filled in training mode after each forward; queue
    entries are never positives, so with ``reward_weight > 0`` they also push away windows of
    similar return: keep the queue small or off for reward clustering). The computation is
    :func:`triton_kernels.info_nce` (fused kernel on CUDA, reference elsewhere).

    The output TensorDict holds ``"loss_contrastive"`` (differentiable) and, detached, its
    parts: ``"temporal_nce"`` (the same InfoNCE with ``reward_weight=0``), ``"return_nce"``
    (with ``reward_weight=1``) and ``"pair_similarity"`` (mean cosine of ``q_i`` and ``k_i``).
    When every row has both kinds of positives,
    ``loss_contrastive = (1 - w) * temporal_nce + w * return_nce``.

    Args:
        encoder (DualEncoder): the encoder whose online network is trained.

    Keyword Args:
        temperature (float, optional): ``tau > 0``. Defaults to ``0.07``.
        reward_weight (float, optional): ``w`` in ``[0, 1]``. Defaults to ``0.5``.
        positive_radius (int, optional): the step radius of temporal positives (``>= 0``).
            Defaults to ``2``.
        mask_radius (int, optional): same-episode windows with
            ``positive_radius < |dt| <= mask_radius`` leave the softmax (``>= 0``).
            Defaults to ``0`` (nothing masked).
        return_bandwidth (float, optional): ``h > 0``, in return units. ``None`` takes
            ``0.25 * std`` of the batch's returns (anchors and positives), or ``1`` when they
            are all equal. Defaults to ``None``.
        queue_size (int, optional): MoCo queue length (``0``: no queue). Defaults to ``0``.
        reduction (str, optional): ``"mean"`` over anchors with a positive, ``"sum"``, or
            ``"none"`` (per anchor). Defaults to ``"mean"``.

    Input entries (see :meth:`set_keys`): ``"anchor"`` and ``"positive"`` sub-TensorDicts of
    batch ``[*B]``, each with the encoder's window entries (``encoder.in_keys``) and the
    window's ``("hippo", "episode")``, ``("hippo", "step")`` and ``("hippo", "return")``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_hippo.modules import DualEncoder
        >>> from torchrl_hippo.objectives import ReturnAwareContrastiveLoss
        >>> encoder = DualEncoder(observation_dim=3, action_dim=2, embed_dim=16, window=4)
        >>> def windows(episode, step, ret):
        ...     return TensorDict(
        ...         {
        ...             "observation": torch.randn(6, 4, 3),
        ...             "action": torch.randn(6, 4, 2),
        ...             ("next", "reward"): torch.randn(6, 4, 1),
        ...             ("hippo", "episode"): torch.tensor(episode),
        ...             ("hippo", "step"): torch.tensor(step),
        ...             ("hippo", "return"): torch.tensor(ret),
        ...         },
        ...         batch_size=[6],
        ...     )
        >>> batch = TensorDict(
        ...     anchor=windows([0, 0, 1, 1, 2, 2], [3, 7, 3, 7, 3, 7], [1.0, 1.0, 5.0, 5.0, 1.2, 1.2]),
        ...     positive=windows([0, 0, 1, 1, 2, 2], [4, 6, 2, 8, 4, 6], [1.0, 1.0, 5.0, 5.0, 1.2, 1.2]),
        ...     batch_size=[6],
        ... )
        >>> loss_fn = ReturnAwareContrastiveLoss(encoder, reward_weight=0.5, positive_radius=1)
        >>> out = loss_fn(batch)
        >>> sorted(out.keys())
        ['loss_contrastive', 'pair_similarity', 'return_nce', 'temporal_nce']
        >>> out["loss_contrastive"].backward()
        >>> encoder.online.head[-1].weight.grad is not None
        True
        >>> loss_fn.set_keys(anchor="query_windows")
        >>> loss_fn.in_keys[0]
        ('query_windows', 'observation')
    """

    @dataclass
    class _AcceptedKeys:
        """Configurable input entries (set with :meth:`set_keys`).

        Attributes:
            anchor (NestedKey): the sub-TensorDict of anchor windows. Defaults to ``"anchor"``.
            positive (NestedKey): the sub-TensorDict of positive windows.
                Defaults to ``"positive"``.
            episode (NestedKey): inside each, the window's episode id.
                Defaults to ``("hippo", "episode")``.
            step (NestedKey): inside each, the step of the window's last transition.
                Defaults to ``("hippo", "step")``.
            episode_return (NestedKey): inside each, the episode's return.
                Defaults to ``("hippo", "return")``.
        """

        anchor: NestedKey = "anchor"
        positive: NestedKey = "positive"
        episode: NestedKey = ("hippo", "episode")
        step: NestedKey = ("hippo", "step")
        episode_return: NestedKey = ("hippo", "return")

    tensor_keys: _AcceptedKeys
    default_keys = _AcceptedKeys

    def __init__(
        self,
        encoder: DualEncoder,
        *,
        temperature: float = 0.07,
        reward_weight: float = 0.5,
        positive_radius: int = 2,
        mask_radius: int = 0,
        return_bandwidth: float | None = None,
        queue_size: int = 0,
        reduction: str = "mean",
    ) -> None:
        if not isinstance(encoder, DualEncoder):
            raise TypeError(f"encoder must be a DualEncoder, got {type(encoder).__name__}.")
        temperature = _check_float(temperature, "temperature")
        if not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}.")
        reward_weight = _check_float(reward_weight, "reward_weight")
        if not 0.0 <= reward_weight <= 1.0:
            raise ValueError(f"reward_weight must be in [0, 1], got {reward_weight}.")
        if return_bandwidth is not None:
            return_bandwidth = _check_float(return_bandwidth, "return_bandwidth")
            if not return_bandwidth > 0 or not math.isfinite(return_bandwidth):
                raise ValueError(
                    f"return_bandwidth must be a finite number > 0 or None, got {return_bandwidth}."
                )
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature
        self.reward_weight = reward_weight
        self.positive_radius = _check_int(positive_radius, "positive_radius", 0)
        self.mask_radius = _check_int(mask_radius, "mask_radius", 0)
        self.return_bandwidth = return_bandwidth
        self.queue_size = _check_int(queue_size, "queue_size", 0)
        self.reduction = reduction
        param = next(encoder.online.parameters())
        self.register_buffer(
            "queue", torch.zeros(self.queue_size, encoder.embed_dim, device=param.device)
        )
        # Keys enqueued so far; the queue holds the latest min(queue_count, queue_size) of them.
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ keys
    def _forward_value_estimator_keys(self, **kwargs) -> None:
        """No value estimator: nothing to forward."""

    @property
    def in_keys(self) -> list[NestedKey]:
        """The entries read: the encoder's window entries and the row data, for both sides."""
        keys = self.tensor_keys
        inner = [*self.encoder.in_keys, keys.episode, keys.step, keys.episode_return]
        return [unravel_key((side, key)) for side in (keys.anchor, keys.positive) for key in inner]

    @property
    def out_keys(self) -> list[NestedKey]:
        """The entries written."""
        return ["loss_contrastive", "temporal_nce", "return_nce", "pair_similarity"]

    # ------------------------------------------------------------------ forward
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Computes the loss of a batch of anchor / positive windows.

        Args:
            tensordict (TensorDictBase): batch ``[*B]`` holding the ``anchor`` and ``positive``
                sub-TensorDicts.

        Returns:
            A TensorDict with empty batch size (``[*B]`` per-anchor losses with
            ``reduction="none"``) holding :attr:`out_keys`.

        Raises:
            KeyError: if an input entry is missing.
            ValueError: if returns are not finite.
            FloatingPointError: if the encoder produces NaN or inf embeddings.
        """
        keys = self.tensor_keys
        anchor = self._side(tensordict, keys.anchor)
        positive = self._side(tensordict, keys.positive)
        batch_shape = anchor.batch_size
        anchor, positive = anchor.reshape(-1), positive.reshape(-1)
        q = self._embed(anchor, target=False, what="anchor")
        with torch.no_grad():
            k = self._embed(positive, target=True, what="positive")
        q_info = self._row_info(anchor, keys.anchor, q.device)
        k_info = self._row_info(positive, keys.positive, q.device)
        filled = min(int(self.queue_count), self.queue_size)
        nce = dict(
            temperature=self.temperature,
            q_info=q_info,
            k_info=k_info,
            positive_radius=self.positive_radius,
            return_bandwidth=self._bandwidth(q_info.ret, k_info.ret),
            mask_radius=self.mask_radius,
            # A copy: the queue is updated in place below, before any backward pass.
            queue=self.queue[:filled].clone() if filled else None,
            reduction=self.reduction,
        )
        loss = info_nce(q, k, reward_weight=self.reward_weight, **nce)
        with torch.no_grad():
            parts = {}
            for name, weight in (("temporal_nce", 0.0), ("return_nce", 1.0)):
                same = weight == self.reward_weight
                parts[name] = loss.detach() if same else info_nce(q, k, reward_weight=weight, **nce)
            pair_similarity = (q * k).sum(-1)
        if self.training and self.queue_size:
            self._enqueue(k)
        if self.reduction == "none":
            out = TensorDict(
                {"loss_contrastive": loss, **parts, "pair_similarity": pair_similarity},
                batch_size=loss.shape,
            )
            return out.reshape(batch_shape)
        return TensorDict(
            {"loss_contrastive": loss, **parts, "pair_similarity": pair_similarity.mean()}
        )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _side(tensordict: TensorDictBase, key: NestedKey) -> TensorDictBase:
        if not isinstance(tensordict, TensorDictBase):
            raise TypeError(f"expected a TensorDict, got {type(tensordict).__name__}.")
        side = tensordict.get(key, None)
        if not isinstance(side, TensorDictBase):
            raise KeyError(
                f"ReturnAwareContrastiveLoss: the input has no sub-TensorDict {key!r} of windows "
                "(set another with set_keys(anchor=..., positive=...))."
            )
        return side

    def _embed(self, windows: TensorDictBase, *, target: bool, what: str) -> Tensor:
        td = windows.select(*self.encoder.in_keys, strict=False).copy()
        emb = self.encoder(td, target=target).get(self.encoder.out_keys[0])
        if not bool(torch.isfinite(emb).all()):
            network = "target" if target else "online"
            raise FloatingPointError(
                f"ReturnAwareContrastiveLoss: the {network} encoder produced NaN or inf "
                f"embeddings for the {what} windows (check the stored observations, actions and "
                "rewards, and the encoder's parameters)."
            )
        return emb

    def _row_info(self, windows: TensorDictBase, side: NestedKey, device: torch.device) -> RowInfo:
        keys = self.tensor_keys
        values = []
        for name, key in (
            ("episode", keys.episode),
            ("step", keys.step),
            ("episode_return", keys.episode_return),
        ):
            value = windows.get(key, None)
            if value is None:
                raise KeyError(
                    f"ReturnAwareContrastiveLoss: the {side!r} windows have no {name} entry "
                    f"{key!r} (set another with set_keys({name}=...))."
                )
            values.append(value.reshape(-1).to(device))
        episode, step, ret = values
        ret = ret.float()
        if not bool(torch.isfinite(ret).all()):
            raise ValueError(
                f"the {side!r} windows' returns {keys.episode_return!r} hold NaN or inf: "
                "consolidation needs the finite return of each window's episode."
            )
        return RowInfo(episode=episode.long(), step=step.long(), ret=ret)

    def _bandwidth(self, q_ret: Tensor, k_ret: Tensor) -> float:
        if self.return_bandwidth is not None:
            return self.return_bandwidth
        spread = float(torch.cat([q_ret, k_ret]).std(unbiased=False))
        return 0.25 * spread if spread > 0 else 1.0

    @torch.no_grad()
    def _enqueue(self, k: Tensor) -> None:
        """Writes the newest target keys into the ring-buffer queue over the oldest entries."""
        n = min(k.shape[0], self.queue_size)
        position = (
            int(self.queue_count) + torch.arange(n, device=self.queue.device)
        ) % self.queue_size
        self.queue[position] = k[-n:].to(self.queue.dtype)
        self.queue_count.add_(n)
