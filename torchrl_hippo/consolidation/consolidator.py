"""Consolidator: the memory's "sleep" phase, and a TorchRL trainer hook that runs it."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torchrl.data import ReplayBuffer
from torchrl.record.loggers import Logger
from torchrl.trainers import TrainerHookBase

from torchrl_hippo import metrics
from torchrl_hippo.consolidation.pairs import PairSampler, eligible_rows
from torchrl_hippo.consolidation.reporting import log_metrics
from torchrl_hippo.data.storage import HIPPO_KEYS, HippoStorage
from torchrl_hippo.modules.encoder import DualEncoder
from torchrl_hippo.objectives.contrastive import ReturnAwareContrastiveLoss

__all__ = ["ConsolidationHook", "Consolidator"]

_QUALITY_KEYS = (
    "retrieval_sharpness",
    "reward_alignment",
    "nn_return_consistency",
    "temporal_margin",
    "effective_rank",
    "collapse_score",
    "mean_cosine",
)


def _storage_of(rb_or_storage: ReplayBuffer | HippoStorage) -> HippoStorage:
    storage = rb_or_storage.storage if isinstance(rb_or_storage, ReplayBuffer) else rb_or_storage
    if not isinstance(storage, HippoStorage):
        raise TypeError(
            "consolidate needs a HippoStorage or a replay buffer built on one, got "
            f"{type(rb_or_storage).__name__}"
            + (f" with a {type(storage).__name__}." if storage is not rb_or_storage else ".")
        )
    return storage


def _real(value: float, name: str) -> float:
    """``value`` as a float, or a ``TypeError`` naming ``name`` if it is not a real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    return float(value)


def _positive_int(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


class Consolidator:
    """Consolidation ("sleep"): trains the memory's keys, then refreshes the stored ones.

    One :meth:`consolidate` call

    1. runs ``steps`` optimiser steps on the encoder's **online** network, each on a batch of
       anchor / positive windows from :class:`~torchrl_hippo.consolidation.PairSampler`
       scored by :class:`~torchrl_hippo.objectives.ReturnAwareContrastiveLoss`, each followed by
       the momentum update of the **target** network
       (``target = m * target + (1 - m) * online``, :meth:`DualEncoder.update_target`, which
       bumps ``encoder.version``);
    2. re-encodes stored keys with the target network (:meth:`HippoStorage.refresh_keys`, in
       chunks of ``refresh_chunk`` rows): the ``ceil(refresh_fraction * N)`` stalest rows
       (lowest ``("hippo", "key_version")``), skipping rows already computed by the current
       target. Their ``key_version`` becomes ``encoder.version``; other rows are untouched;
    3. the refresh bumps ``storage.key_revision``, which is how every
       :class:`~torchrl_hippo.HippoSampler` on the memory learns that keys changed: its cached
       retrieval pool is rebuilt (and window queries re-encoded) at its next sample;
    4. returns metrics as a TensorDict.

    Before each optimiser step the loss and the gradients are checked: a NaN or inf stops
    consolidation with a :class:`FloatingPointError` before the key refresh, and the step that
    failed leaves the encoder (online and target), the optimiser state and the stored keys as
    they were. After the step the online parameters are checked too: if the step made them
    NaN or inf, it is undone (the optimiser's own state keeps it) and a
    :class:`FloatingPointError` is raised before the momentum update, so the target encoder
    and the stored keys never see such weights.

    Metrics (0-dim tensors): ``steps``, ``version``, ``refreshed_rows``, ``key_staleness``
    (:func:`~torchrl_hippo.metrics.key_staleness` over all stored rows, after the refresh)
    and, when ``steps > 0``, the means over the steps of ``loss_contrastive``,
    ``temporal_nce``, ``return_nce``, ``pair_similarity`` and ``grad_norm`` (before clipping).
    With ``report_quality=True``, on up to ``quality_rows`` stored keys of finished episodes
    (see :mod:`torchrl_hippo.metrics` for the formulas): ``retrieval_sharpness``
    (``quality_top_k`` neighbours), ``reward_alignment``, ``nn_return_consistency``
    (``quality_bins`` return bins), ``temporal_margin`` (radius ``positive_radius``),
    ``effective_rank``, ``collapse_score`` and ``mean_cosine``; ``nan`` when fewer than two
    such keys exist.

    Args:
        encoder (DualEncoder): the memory's encoder (the one its writer uses).

    Keyword Args:
        temperature (float, optional): InfoNCE temperature. Defaults to ``0.07``.
        reward_weight (float, optional): ``0`` clusters by time, ``1`` by return; used by both
            the loss and the pair sampler. Defaults to ``0.5``.
        positive_radius (int, optional): step radius of temporal positives (``>= 1``).
            Defaults to ``2``.
        mask_radius (int, optional): see the loss. Defaults to ``0``.
        return_bandwidth (float, optional): see the loss. Defaults to ``None`` (from the batch).
        queue_size (int, optional): MoCo queue of extra negatives. Defaults to ``0``.
        return_neighbours (int, optional): see the pair sampler. Defaults to ``4``.
        include_running (bool, optional): also use rows of running episodes.
            Defaults to ``False``.
        optimizer (torch.optim.Optimizer, optional): the optimiser of
            ``encoder.online.parameters()``. Defaults to ``None``: Adam with ``lr``.
        lr (float, optional): learning rate of the default optimiser, finite and ``> 0``.
            Defaults to ``1e-3``.
        momentum (float, optional): EMA factor of the target updates. Defaults to ``None``
            (``encoder.momentum``).
        max_grad_norm (float, optional): gradient-norm clipping. Defaults to ``1.0``
            (``None``: no clipping).
        refresh_fraction (float, optional): share of the memory re-encoded per call, in
            ``[0, 1]`` (``1``: every stale key, ``0``: none). Defaults to ``1.0``.
        refresh_chunk (int, optional): rows re-encoded per forward pass. Defaults to ``8192``.
        report_quality (bool, optional): also compute the key-quality metrics.
            Defaults to ``False``.
        quality_rows (int, optional): keys sampled for the quality metrics (they build
            ``N x N`` matrices). Defaults to ``1024``.
        quality_top_k (int, optional): neighbours for ``retrieval_sharpness``. Defaults to ``5``.
        quality_bins (int, optional): return bins of ``nn_return_consistency``.
            Defaults to ``4``.
        generator (torch.Generator, optional): random generator of the pair and quality draws,
            on the storage's device. Defaults to ``None`` (torch's global generator).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
        >>> from torchrl_hippo.consolidation import Consolidator
        >>> encoder = DualEncoder(observation_dim=3, action_dim=2, embed_dim=16, window=4, hidden_dim=32)
        >>> rb = TensorDictReplayBuffer(
        ...     storage=HippoStorage(500), writer=HippoWriter(encoder), sampler=HippoSampler()
        ... )
        >>> done = torch.zeros(200, 1, dtype=torch.bool)
        >>> done[9::10] = True
        >>> _ = rb.extend(TensorDict(
        ...     {"observation": torch.randn(200, 3), "action": torch.randn(200, 2),
        ...      "next": {"reward": torch.rand(200, 1), "done": done}},
        ...     batch_size=[200],
        ... ))
        >>> consolidator = Consolidator(encoder, reward_weight=0.5, report_quality=True)
        >>> out = consolidator.consolidate(rb, steps=3, batch_size=32)
        >>> int(out["steps"]), int(out["version"]), int(out["refreshed_rows"])
        (3, 3, 200)
        >>> out["key_staleness"].item()  # every key now comes from the current target
        0.0
        >>> bool(torch.isfinite(out["loss_contrastive"])), 0.0 <= out["collapse_score"].item() <= 1.0
        (True, True)
    """

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
        return_neighbours: int = 4,
        include_running: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float = 1e-3,
        momentum: float | None = None,
        max_grad_norm: float | None = 1.0,
        refresh_fraction: float = 1.0,
        refresh_chunk: int = 8192,
        report_quality: bool = False,
        quality_rows: int = 1024,
        quality_top_k: int = 5,
        quality_bins: int = 4,
        generator: torch.Generator | None = None,
    ) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}."
            )
        self.loss_module = ReturnAwareContrastiveLoss(
            encoder,
            temperature=temperature,
            reward_weight=reward_weight,
            positive_radius=positive_radius,
            mask_radius=mask_radius,
            return_bandwidth=return_bandwidth,
            queue_size=queue_size,
        )
        self.encoder = encoder
        obs_key, action_key, reward_key, mask_key = encoder.in_keys
        self.pair_sampler = PairSampler(
            encoder.window,
            positive_radius=positive_radius,
            reward_weight=reward_weight,
            return_neighbours=return_neighbours,
            include_running=include_running,
            window_keys=(obs_key, action_key, reward_key),
            mask_key=mask_key,
            generator=generator,
        )
        if momentum is not None and not 0.0 <= _real(momentum, "momentum") <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}.")
        if max_grad_norm is not None and not _real(max_grad_norm, "max_grad_norm") > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}.")
        if not 0.0 <= _real(refresh_fraction, "refresh_fraction") <= 1.0:
            raise ValueError(f"refresh_fraction must be in [0, 1], got {refresh_fraction}.")
        if optimizer is None:
            # An infinite rate turns the first step's parameters into inf/NaN, and the momentum
            # update then carries them into the target encoder that writes the stored keys.
            if not (_real(lr, "lr") > 0 and math.isfinite(lr)):
                raise ValueError(f"lr must be > 0 and finite, got {lr}.")
            optimizer = torch.optim.Adam(encoder.online.parameters(), lr=lr)
        elif not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}."
            )
        self.optimizer = optimizer
        self.momentum = momentum
        self.max_grad_norm = max_grad_norm
        self.refresh_fraction = float(refresh_fraction)
        self.refresh_chunk = _positive_int(refresh_chunk, "refresh_chunk")
        self.report_quality = bool(report_quality)
        self.quality_rows = _positive_int(quality_rows, "quality_rows", 2)
        self.quality_top_k = _positive_int(quality_top_k, "quality_top_k")
        self.quality_bins = _positive_int(quality_bins, "quality_bins")
        self.generator = generator

    # ------------------------------------------------------------------ the sleep phase
    def consolidate(
        self,
        rb_or_storage: ReplayBuffer | HippoStorage,
        steps: int,
        batch_size: int,
        *,
        report_quality: bool | None = None,
    ) -> TensorDict:
        """Runs one consolidation phase on a memory; see the class docstring.

        Args:
            rb_or_storage (ReplayBuffer or HippoStorage): the memory (or its buffer).
            steps (int): optimiser steps (``>= 0``; ``0`` only refreshes keys and reports).
            batch_size (int): anchor / positive pairs per step (``>= 2``).

        Keyword Args:
            report_quality (bool, optional): overrides the constructor's ``report_quality``.
                Defaults to ``None``.

        Returns:
            A TensorDict of 0-dim metrics.

        Raises:
            TypeError: if the memory is not a :class:`~torchrl_hippo.HippoStorage`.
            RuntimeError: if the memory is empty, or ``steps > 0`` and it holds no finished
                episode.
            ValueError: if ``steps`` or ``batch_size`` is invalid, or ``batch_size`` exceeds
                the rows consolidation can draw from.
            FloatingPointError: if a loss, a gradient or the parameters after an optimiser
                step are NaN or inf.
        """
        storage = _storage_of(rb_or_storage)
        steps = _positive_int(steps, "steps", 0)
        batch_size = _positive_int(batch_size, "batch_size", 2)
        eligible_rows(storage)  # raises the clear error on an empty memory
        out: dict[str, Tensor] = {"steps": torch.tensor(steps)}
        if steps:
            out.update(self._train(storage, steps, batch_size))
        out["refreshed_rows"] = torch.tensor(self.refresh_keys(storage))
        version = int(self.encoder.version)
        out["version"] = torch.tensor(version)
        valid = storage.valid_mask()
        key_version = storage._storage.get(HIPPO_KEYS["key_version"])[: len(storage)][valid]
        out["key_staleness"] = metrics.key_staleness(key_version, version).cpu()
        quality = self.report_quality if report_quality is None else report_quality
        if quality:
            out.update(self.key_quality(storage))
        return TensorDict(out)

    def _train(self, storage: HippoStorage, steps: int, batch_size: int) -> dict[str, Tensor]:
        encoder, loss_module = self.encoder, self.loss_module
        device = next(encoder.online.parameters()).device
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        history: dict[str, list[Tensor]] = {}
        was_training = encoder.training
        loss_module.train()
        try:
            for step in range(steps):
                batch = self.pair_sampler.sample(storage, batch_size).to(device)
                losses = loss_module(batch)
                loss = losses["loss_contrastive"]
                if not bool(torch.isfinite(loss)):
                    raise FloatingPointError(
                        f"consolidation step {step + 1}/{steps}: the contrastive loss is "
                        f"{loss.item()}; the encoder and the optimiser were left as they were "
                        "before this step."
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                max_norm = math.inf if self.max_grad_norm is None else self.max_grad_norm
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                if not bool(torch.isfinite(grad_norm)):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise FloatingPointError(
                        f"consolidation step {step + 1}/{steps}: the gradient norm is "
                        f"{grad_norm.item()}; the encoder and the optimiser were left as they "
                        "were before this step."
                    )
                before = [p.detach().clone() for p in params]
                self.optimizer.step()
                # A step too large for the weights (e.g. a diverging learning rate) would reach
                # the target encoder, which computes the stored keys, through the momentum
                # update: check the weights first, and undo the step if they broke.
                if not bool(torch.isfinite(torch.nn.utils.get_total_norm(params))):
                    with torch.no_grad():
                        for p, value in zip(params, before):
                            p.copy_(value)
                    raise FloatingPointError(
                        f"consolidation step {step + 1}/{steps}: the optimiser step made the "
                        "online encoder's parameters NaN or inf (is the learning rate too "
                        "large?); the encoder and the stored keys were left as they were before "
                        "this step (the optimiser's state has taken it)."
                    )
                encoder.update_target(self.momentum)
                for name, value in (*losses.items(), ("grad_norm", grad_norm)):
                    history.setdefault(name, []).append(value.detach())
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            loss_module.train(was_training)
        return {name: torch.stack(values).mean().cpu() for name, values in history.items()}

    # ------------------------------------------------------------------ key refresh
    def refresh_keys(self, rb_or_storage: ReplayBuffer | HippoStorage) -> int:
        """Re-encodes the stalest stored keys with the target encoder; returns how many.

        Takes the ``ceil(refresh_fraction * N)`` stored rows with the lowest
        ``("hippo", "key_version")`` (``N`` the rows stored; rows written with deferred keys,
        version ``-1``, come first), skips those already at ``encoder.version``, and hands
        them to :meth:`HippoStorage.refresh_keys`, which re-encodes them in chunks of
        ``refresh_chunk`` rows (windows rebuilt with :meth:`HippoStorage.gather_windows`),
        writes their keys and ``key_version`` and bumps ``storage.key_revision``, so that
        samplers rebuild their retrieval pools. Other rows are untouched.

        Raises:
            RuntimeError: if the memory is empty.
            ValueError: if the memory's writer encodes with another encoder.
        """
        storage = _storage_of(rb_or_storage)
        eligible_rows(storage, include_running=True)  # the empty-memory error
        if storage.encoder is not self.encoder:
            raise ValueError(
                "the memory's keys are written by another encoder than this Consolidator's: "
                "build the Consolidator with the encoder of the memory's HippoWriter."
            )
        key_version = storage._storage.get(HIPPO_KEYS["key_version"])
        rows = storage.valid_mask().nonzero().squeeze(1)
        budget = math.ceil(self.refresh_fraction * rows.numel())
        if budget < rows.numel():
            rows = rows[torch.topk(key_version[rows], budget, largest=False).indices]
        rows = rows[key_version[rows] < int(self.encoder.version)]
        if rows.numel() == 0:
            return 0
        return storage.refresh_keys(rows, chunk_size=self.refresh_chunk)

    # ------------------------------------------------------------------ quality
    @torch.no_grad()
    def key_quality(self, rb_or_storage: ReplayBuffer | HippoStorage) -> dict[str, Tensor]:
        """The key-quality metrics on up to ``quality_rows`` stored keys of finished episodes.

        See the class docstring for the list, and :mod:`torchrl_hippo.metrics` for the
        formulas. Every value is ``nan`` when fewer than two such keys exist.
        """
        storage = _storage_of(rb_or_storage)
        rows = eligible_rows(storage, include_running=self.pair_sampler.include_running)
        storage.encode_pending()  # rows written with deferred keys get theirs first
        if rows.numel() < 2:
            return {name: torch.tensor(math.nan) for name in _QUALITY_KEYS}
        if rows.numel() > self.quality_rows:
            pick = torch.randperm(rows.numel(), generator=self.generator, device=rows.device)
            rows = rows[pick[: self.quality_rows]]
        keys = storage.keys[rows].float()
        columns = storage._storage
        episode = columns.get(HIPPO_KEYS["episode"])[rows]
        step = columns.get(HIPPO_KEYS["step"])[rows]
        ret = storage.episodes["return"][storage.row_slot[rows]]
        values = {
            "retrieval_sharpness": metrics.retrieval_sharpness(
                keys, min(self.quality_top_k, rows.numel() - 1)
            ),
            "reward_alignment": metrics.reward_alignment(keys, ret),
            "nn_return_consistency": metrics.nn_return_consistency(
                keys, ret, episode, num_bins=self.quality_bins
            ),
            "temporal_margin": metrics.temporal_margin(
                keys, episode, step, radius=self.pair_sampler.positive_radius
            ),
            "effective_rank": metrics.effective_rank(keys),
            "collapse_score": metrics.collapse_score(keys),
            "mean_cosine": metrics.mean_pairwise_cosine(keys),
        }
        return {name: value.float().cpu() for name, value in values.items()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The optimiser's state and the loss module's (encoder and queue included)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "loss_module": self.loss_module.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""
        self.loss_module.load_state_dict(state_dict["loss_module"])
        self.optimizer.load_state_dict(state_dict["optimizer"])

    def __repr__(self) -> str:
        loss = self.loss_module
        return (
            f"{type(self).__name__}(temperature={loss.temperature}, "
            f"reward_weight={loss.reward_weight}, positive_radius={loss.positive_radius}, "
            f"refresh_fraction={self.refresh_fraction}, report_quality={self.report_quality})"
        )


class ConsolidationHook(TrainerHookBase):
    """Runs :meth:`Consolidator.consolidate` every ``interval`` collector batches.

    Call it once per collector batch, from a plain training loop (``hook()``) or from a TorchRL
    :class:`~torchrl.trainers.Trainer`: :meth:`register` adds it as a ``"post_steps_log"``
    operation, so the trainer calls it after each batch's optimisation steps and logs the
    metrics it returns. On the calls where it consolidates it returns the metrics as
    ``{"<prefix>/<name>": float}`` (and logs them to ``logger`` when one is given); otherwise,
    and while the memory does not yet hold ``batch_size`` rows of finished episodes (a
    documented no-op, so early training is not interrupted), it returns ``None``.

    Args:
        consolidator (Consolidator): what to run.
        replay_buffer (ReplayBuffer or HippoStorage): the memory.

    Keyword Args:
        interval (int, optional): collector batches between two consolidations.
            Defaults to ``10``.
        steps (int, optional): optimiser steps per consolidation. Defaults to ``50``.
        batch_size (int, optional): pairs per step. Defaults to ``64``.
        logger (torchrl.record.loggers.Logger, optional): where to log, besides returning.
            Defaults to ``None``.
        prefix (str, optional): metric-name prefix. Defaults to ``"consolidation"``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
        >>> from torchrl_hippo.consolidation import ConsolidationHook, Consolidator
        >>> encoder = DualEncoder(observation_dim=3, action_dim=2, embed_dim=16, window=4, hidden_dim=32)
        >>> rb = TensorDictReplayBuffer(
        ...     storage=HippoStorage(500), writer=HippoWriter(encoder), sampler=HippoSampler()
        ... )
        >>> hook = ConsolidationHook(Consolidator(encoder), rb, interval=2, steps=2, batch_size=16)
        >>> done = torch.zeros(50, 1, dtype=torch.bool)
        >>> done[9::10] = True
        >>> for _ in range(4):  # four collector batches
        ...     _ = rb.extend(TensorDict(
        ...         {"observation": torch.randn(50, 3), "action": torch.randn(50, 2),
        ...          "next": {"reward": torch.rand(50, 1), "done": done}},
        ...         batch_size=[50],
        ...     ))
        ...     logs = hook()
        ...     print(None if logs is None else logs["consolidation/steps"])
        None
        2.0
        None
        2.0
    """

    def __init__(
        self,
        consolidator: Consolidator,
        replay_buffer: ReplayBuffer | HippoStorage,
        *,
        interval: int = 10,
        steps: int = 50,
        batch_size: int = 64,
        logger: Logger | None = None,
        prefix: str = "consolidation",
    ) -> None:
        if not isinstance(consolidator, Consolidator):
            raise TypeError(
                f"consolidator must be a Consolidator, got {type(consolidator).__name__}."
            )
        self.consolidator = consolidator
        self.storage = _storage_of(replay_buffer)
        self.interval = _positive_int(interval, "interval")
        self.steps = _positive_int(steps, "steps", 0)
        self.batch_size = _positive_int(batch_size, "batch_size", 2)
        self.logger = logger
        self.prefix = prefix
        self.calls = 0

    def __call__(self, batch: TensorDictBase | None = None) -> dict[str, float] | None:
        """Counts one collector batch; consolidates on every ``interval``-th call.

        Args:
            batch (TensorDictBase, optional): the collector batch (unused; TorchRL trainers
                pass it to ``"post_steps_log"`` operations).
        """
        self.calls += 1
        if self.calls % self.interval:
            return None
        storage = self.storage
        if not storage.initialized or storage.num_valid == 0:
            return None
        if self.consolidator.pair_sampler.num_eligible(storage) < self.batch_size:
            return None
        out = self.consolidator.consolidate(storage, self.steps, self.batch_size)
        return log_metrics(self.logger, out, self.calls, prefix=self.prefix)

    def register(self, trainer: Any, name: str = "consolidation") -> None:
        """Registers the hook in a TorchRL trainer, after each batch's optimisation steps."""
        trainer.register_module(name, self)
        trainer.register_op("post_steps_log", self)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "consolidator": self.consolidator.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.calls = int(state_dict["calls"])
        self.consolidator.load_state_dict(state_dict["consolidator"])
