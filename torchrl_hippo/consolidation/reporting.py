"""Logging of consolidation: metrics to any TorchRL logger, key snapshots to TensorBoard."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import Tensor
from torchrl.data import ReplayBuffer
from torchrl.record.loggers import Logger

from torchrl_hippo.data.storage import HIPPO_KEYS, HippoStorage

__all__ = ["log_key_snapshot", "log_metrics"]


def log_metrics(
    logger: Logger | None,
    metrics: TensorDictBase | Mapping[str, Any],
    step: int,
    *,
    prefix: str = "consolidation",
) -> dict[str, float]:
    """Logs scalar metrics (e.g. :meth:`Consolidator.consolidate`'s) as ``<prefix>/<name>``.

    Args:
        logger (torchrl.record.loggers.Logger or None): any TorchRL logger
            (``TensorboardLogger``, ``CSVLogger``, ...); ``None`` only converts.
        metrics (TensorDict or Mapping): scalar entries (0-dim tensors or numbers); nested
            TensorDict keys are joined with ``"/"``.
        step (int): the step to log at.

    Keyword Args:
        prefix (str, optional): prepended to every name (``""``: none).
            Defaults to ``"consolidation"``.

    Returns:
        The logged ``{name: float}``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_hippo.consolidation import log_metrics
        >>> log_metrics(None, TensorDict(loss_contrastive=torch.tensor(1.5)), step=3)
        {'consolidation/loss_contrastive': 1.5}
    """
    if logger is not None and not isinstance(logger, Logger):
        raise TypeError(f"logger must be a torchrl Logger or None, got {type(logger).__name__}.")
    if isinstance(metrics, TensorDictBase):
        metrics = metrics.flatten_keys("/").to_dict()
    elif not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a TensorDict or a Mapping, got {type(metrics).__name__}.")
    values = {}
    for name, value in metrics.items():
        if isinstance(value, Tensor) and value.numel() != 1:
            raise ValueError(f"metric {name!r} is not a scalar: shape {tuple(value.shape)}.")
        values[f"{prefix}/{name}" if prefix else name] = float(value)
    if logger is not None:
        logger.log_metrics(values, step=step)
    return values


def _pca_2d(x: Tensor) -> tuple[Tensor, float]:
    """Projects the rows of ``x`` on their two principal axes; also returns the variance share."""
    centred = x.double() - x.double().mean(dim=0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    var = s.square()
    share = float(var[:2].sum() / var.sum()) if var.sum() > 0 else 0.0
    coords = centred @ vh[:2].T
    if coords.shape[1] < 2:  # a single feature: put everything on the first axis
        coords = torch.cat([coords, torch.zeros_like(coords)], dim=1)
    return coords.float(), share


def log_key_snapshot(
    logger: Logger,
    rb_or_storage: ReplayBuffer | HippoStorage,
    step: int,
    *,
    max_points: int = 2000,
    tag: str = "memory/keys",
    png_dir: str | Path | None = None,
    generator: torch.Generator | None = None,
) -> Path:
    """Writes a snapshot of the stored keys to TensorBoard's projector and a PCA scatter PNG.

    Up to ``max_points`` stored keys (drawn uniformly) go to the projector through
    ``logger.experiment.add_embedding`` with their episode ``return`` and ``episode`` id as
    metadata columns. Their 2-D PCA (the two principal axes of the centred keys), coloured by
    return, is drawn with matplotlib's Agg canvas (no display, no global pyplot state), saved
    as ``<png_dir>/<tag with "/" as "_">_pca_step<step>.png`` and added to TensorBoard as a
    figure (``<tag>_pca``).

    Args:
        logger (TensorboardLogger): a logger whose ``experiment`` is a TensorBoard
            ``SummaryWriter``.
        rb_or_storage (ReplayBuffer or HippoStorage): the memory.
        step (int): the global step of the snapshot.

    Keyword Args:
        max_points (int, optional): most keys written (``>= 2``). Defaults to ``2000``.
        tag (str, optional): the projector tag. Defaults to ``"memory/keys"``.
        png_dir (str or Path, optional): where the PNG goes. Defaults to ``None``
            (``logger.log_dir``).
        generator (torch.Generator, optional): draws the keys. Defaults to ``None``.

    Returns:
        The PNG's path.

    Raises:
        TypeError: if the logger does not write to TensorBoard.
        ValueError: if the memory holds fewer than two keys.

    Examples:
        >>> import tempfile
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> from torchrl.record.loggers import TensorboardLogger
        >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
        >>> from torchrl_hippo.consolidation import log_key_snapshot
        >>> rb = TensorDictReplayBuffer(
        ...     storage=HippoStorage(100),
        ...     writer=HippoWriter(DualEncoder(3, 2, 16, window=4, hidden_dim=32)),
        ...     sampler=HippoSampler(),
        ... )
        >>> done = torch.zeros(40, 1, dtype=torch.bool)
        >>> done[9::10] = True
        >>> _ = rb.extend(TensorDict(
        ...     {"observation": torch.randn(40, 3), "action": torch.randn(40, 2),
        ...      "next": {"reward": torch.rand(40, 1), "done": done}},
        ...     batch_size=[40],
        ... ))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     logger = TensorboardLogger(exp_name="run", log_dir=tmp)
        ...     png = log_key_snapshot(logger, rb, step=0)
        ...     print(png.name, png.exists())
        ...     logger.experiment.close()
        memory_keys_pca_step0.png True
    """
    experiment = getattr(logger, "experiment", None)
    if not hasattr(experiment, "add_embedding"):
        raise TypeError(
            "log_key_snapshot needs a logger that writes to TensorBoard (a TensorboardLogger, "
            f"whose experiment is a SummaryWriter), got {type(logger).__name__}."
        )
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
        raise ValueError(f"max_points must be an int >= 2, got {max_points!r}.")
    storage = rb_or_storage.storage if isinstance(rb_or_storage, ReplayBuffer) else rb_or_storage
    if not isinstance(storage, HippoStorage):
        raise TypeError(f"expected a HippoStorage memory, got {type(storage).__name__}.")
    rows = storage.valid_mask().nonzero().squeeze(1) if storage.initialized else None
    if rows is None or rows.numel() < 2:
        raise ValueError("log_key_snapshot needs a memory holding at least 2 keys.")
    storage.encode_pending()  # rows written with deferred keys get theirs first
    if rows.numel() > max_points:
        pick = torch.randperm(rows.numel(), generator=generator, device=rows.device)
        rows = rows[pick[:max_points]].sort().values
    keys = storage.keys[rows].float().cpu()
    returns = storage.episodes["return"][storage.row_slot[rows]].float().cpu()
    episodes = storage._storage.get(HIPPO_KEYS["episode"])[rows].cpu()
    metadata = [[f"{r:.6g}", str(e)] for r, e in zip(returns.tolist(), episodes.tolist())]
    experiment.add_embedding(
        keys, metadata=metadata, metadata_header=["return", "episode"], global_step=step, tag=tag
    )

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    coords, share = _pca_2d(keys)
    figure = Figure(figsize=(5.5, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    points = axes.scatter(coords[:, 0], coords[:, 1], c=returns, cmap="viridis", s=8)
    figure.colorbar(points, ax=axes, label="episode return")
    axes.set_xlabel("PC 1")
    axes.set_ylabel("PC 2")
    axes.set_title(f"{tag} at step {step}: 2-D PCA ({share:.0%} of variance)")
    figure.tight_layout()
    directory = Path(png_dir if png_dir is not None else logger.log_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{tag.replace('/', '_')}_pca_step{step}.png"
    figure.savefig(path)
    experiment.add_figure(f"{tag}_pca", figure, global_step=step, close=False)
    return path
