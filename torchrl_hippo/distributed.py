"""Scale-out of the episodic memory on Ray: worker-unique trajectory ids and calls into the buffer.

The memory scales out the way any TorchRL replay buffer does. ``TensorDictReplayBuffer(...,
service_backend="ray")`` returns a :class:`~torchrl.data.replay_buffers.ray_buffer.RayReplayBuffer`
whose storage, writer and sampler live in one Ray actor; give it *constructors* (classes or
:func:`functools.partial`), so the parts are built inside the actor::

    rb = TensorDictReplayBuffer(
        storage=partial(HippoStorage, 100_000),
        writer=partial(HippoWriter, encoder=DualEncoder(4, 2, 64)),  # the encoder is copied
        sampler=partial(HippoSampler, mixture_ratio=0.3),
        batch_size=256,
        service_backend="ray",
    )

:class:`~torchrl.collectors.distributed.RayCollector` then writes into it from its workers.
Two things are missing for the memory, and this module adds them:

- **Episodes stay apart across workers.** Every worker numbers its trajectories from 0, so the
  ``("collector", "traj_ids")`` of different workers collide, and nothing in a batch says which
  worker made it. :class:`~torchrl_hippo.HippoWriter` segments and stitches episodes by
  trajectory id, so two workers' episodes with the same id would be merged into one.
  :class:`WorkerTrajIds`, each worker's collector ``postproc``, folds the worker index into the
  ids (``worker * 2**32 + traj_id``) before the batch leaves the worker;
  :func:`worker_collector_kwargs` gives each worker its own.
- **Calls into the memory.** Hippo-specific calls (``rb.sampler.set_query``, consolidation,
  reading the episode table) must run where the parts live. :func:`call_in_buffer` runs a
  function on the buffer inside its actor (or on a local buffer, the same way).

Ray is imported only by :func:`call_in_buffer`, when it meets a Ray-hosted buffer.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from tensordict import NestedKey, TensorDictBase
from torchrl.envs.transforms import Compose, Transform

from torchrl_hippo._checks import as_nested_key

__all__ = ["WorkerTrajIds", "call_in_buffer", "worker_collector_kwargs"]

T = TypeVar("T")

#: Default number of low bits that hold a worker's own trajectory id.
TRAJ_BITS = 32


_NOT_AN_ENV_TRANSFORM = (
    "WorkerTrajIds rewrites collector output, where trajectory ids exist: pass it as the "
    "collector's postproc (see worker_collector_kwargs), not to an environment."
)


def _check_index(value: int, name: str, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if not 0 <= value < upper:
        raise ValueError(f"{name} must lie in [0, {upper}), got {value}.")
    return value


class WorkerTrajIds(Transform):
    """Makes a collector's trajectory ids unique across workers: ``worker * 2**bits + traj_id``.

    Collectors number trajectories from 0 in every worker, so the ``("collector",
    "traj_ids")`` written by different :class:`~torchrl.collectors.distributed.RayCollector`
    workers collide, and the batches carry nothing else that tells workers apart. A writer
    that segments episodes by trajectory id, like :class:`~torchrl_hippo.HippoWriter`, would
    then merge different workers' episodes. Passed as a worker's collector ``postproc``, this
    transform rewrites the ids in place as ``worker_id * 2**bits + traj_id`` (one stream id
    per worker and trajectory) before the batch is written to the replay buffer or sent to
    the learner, and stamps the worker index under ``worker_key``.

    Give each worker its own (see :func:`worker_collector_kwargs`). Within a worker the ids
    stay as the collector made them, so several environments per worker are fine. It only
    transforms collector output (``forward``, which the collector's ``postproc`` calls); it
    is not an environment transform.

    Args:
        worker_id (int): the worker's index, in ``[0, 2 ** (63 - bits))``.

    Keyword Args:
        traj_key (NestedKey, optional): the trajectory ids to rewrite. Defaults to
            ``("collector", "traj_ids")``.
        worker_key (NestedKey, optional): where the worker index is written (one ``int64``
            per transition); ``None`` writes nothing. Defaults to ``("collector", "worker_id")``.
        bits (int, optional): low bits kept for the worker's own ids, in ``[1, 62]``.
            Defaults to ``32``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_hippo.distributed import WorkerTrajIds
        >>> batch = TensorDict({("collector", "traj_ids"): torch.tensor([0, 0, 1])}, [3])
        >>> batch = WorkerTrajIds(3)(batch)
        >>> batch["collector", "traj_ids"]
        tensor([12884901888, 12884901888, 12884901889])
        >>> batch["collector", "worker_id"]
        tensor([3, 3, 3])
        >>> WorkerTrajIds.split(batch["collector", "traj_ids"])
        (tensor([3, 3, 3]), tensor([0, 0, 1]))
    """

    def __init__(
        self,
        worker_id: int,
        *,
        traj_key: NestedKey = ("collector", "traj_ids"),
        worker_key: NestedKey | None = ("collector", "worker_id"),
        bits: int = TRAJ_BITS,
    ) -> None:
        bits = _check_index(bits, "bits", 63)
        if bits == 0:
            raise ValueError("bits must lie in [1, 62], got 0.")
        traj_key = as_nested_key(traj_key, "traj_key")
        worker_key = None if worker_key is None else as_nested_key(worker_key, "worker_key")
        out_keys = [traj_key] if worker_key is None else [traj_key, worker_key]
        super().__init__(in_keys=[traj_key], out_keys=out_keys)
        self.worker_id = _check_index(worker_id, "worker_id", 2 ** (63 - bits))
        self.traj_key = traj_key
        self.worker_key = worker_key
        self.bits = bits

    @staticmethod
    def split(stream_ids: torch.Tensor, bits: int = TRAJ_BITS) -> tuple[torch.Tensor, torch.Tensor]:
        """Splits folded ids back into ``(worker index, the worker's trajectory id)``."""
        if not isinstance(stream_ids, torch.Tensor) or stream_ids.is_floating_point():
            raise TypeError("stream_ids must be an integer tensor.")
        return stream_ids >> bits, stream_ids & ((1 << bits) - 1)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        if not isinstance(tensordict, TensorDictBase):
            raise TypeError(f"WorkerTrajIds expects a TensorDict, got {type(tensordict).__name__}.")
        traj = tensordict.get(self.traj_key, None)
        if not isinstance(traj, torch.Tensor):
            raise KeyError(
                f"WorkerTrajIds: the batch has no trajectory ids {self.traj_key!r} (a collector "
                "writes them unless track_traj_ids=False)."
            )
        if traj.is_floating_point() or traj.dtype == torch.bool:
            raise TypeError(f"trajectory ids {self.traj_key!r} must be integers, got {traj.dtype}.")
        limit = 1 << self.bits
        if traj.numel() and (bool((traj < 0).any()) or bool((traj >= limit).any())):
            raise ValueError(
                f"trajectory ids {self.traj_key!r} must lie in [0, 2**{self.bits}) to be "
                f"folded with a worker index, got values in [{int(traj.min())}, "
                f"{int(traj.max())}] (were they folded already?)."
            )
        tensordict.set(self.traj_key, traj.to(torch.int64) + (self.worker_id << self.bits))
        if self.worker_key is not None:
            tensordict.set(
                self.worker_key,
                torch.full(traj.shape, self.worker_id, dtype=torch.int64, device=traj.device),
            )
        return tensordict

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        raise RuntimeError(_NOT_AN_ENV_TRANSFORM)

    def transform_output_spec(self, output_spec: Any) -> Any:
        raise RuntimeError(_NOT_AN_ENV_TRANSFORM)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(worker_id={self.worker_id}, traj_key={self.traj_key!r}, "
            f"worker_key={self.worker_key!r}, bits={self.bits})"
        )


def worker_collector_kwargs(
    num_workers: int,
    collector_kwargs: dict[str, Any] | None = None,
    *,
    first_worker: int = 0,
    traj_key: NestedKey = ("collector", "traj_ids"),
    worker_key: NestedKey | None = ("collector", "worker_id"),
    bits: int = TRAJ_BITS,
) -> list[dict[str, Any]]:
    """Per-worker collector keyword arguments whose ``postproc`` makes trajectory ids unique.

    Pass the result as :class:`~torchrl.collectors.distributed.RayCollector`'s
    ``collector_kwargs`` (a list, one dict per worker). Worker ``i`` gets a copy of
    ``collector_kwargs`` with ``postproc=WorkerTrajIds(first_worker + i)``, run after the
    ``postproc`` already there (a deep copy of it, in a
    :class:`~torchrl.envs.transforms.Compose`). The workers' collectors apply their
    ``postproc`` before they write into a replay buffer and before they send a batch back.

    Args:
        num_workers (int): the number of workers (RayCollector's collectors).
        collector_kwargs (dict, optional): keyword arguments shared by all workers.
            Defaults to ``None`` (none).

    Keyword Args:
        first_worker (int, optional): the index of the first worker, so that several
            collectors writing into one memory use disjoint indices. Defaults to ``0``.
        traj_key (NestedKey, optional): see :class:`WorkerTrajIds`.
            Defaults to ``("collector", "traj_ids")``.
        worker_key (NestedKey, optional): see :class:`WorkerTrajIds`.
            Defaults to ``("collector", "worker_id")``.
        bits (int, optional): see :class:`WorkerTrajIds`. Defaults to ``32``.

    Returns:
        A list of ``num_workers`` dicts.

    Examples:
        >>> from torchrl_hippo.distributed import worker_collector_kwargs
        >>> kwargs = worker_collector_kwargs(2, {"max_frames_per_traj": 200}, first_worker=4)
        >>> [kw["postproc"].worker_id for kw in kwargs], kwargs[1]["max_frames_per_traj"]
        ([4, 5], 200)
    """
    _check_index(num_workers, "num_workers", 2**31)
    if num_workers == 0:
        raise ValueError("num_workers must be >= 1, got 0.")
    _check_index(first_worker, "first_worker", 2 ** (63 - bits) - num_workers + 1)
    if collector_kwargs is not None and not isinstance(collector_kwargs, dict):
        raise TypeError(
            f"collector_kwargs must be a dict or None, got {type(collector_kwargs).__name__}."
        )
    shared = dict(collector_kwargs or {})
    postproc = shared.pop("postproc", None)
    if postproc is not None and not callable(postproc):
        raise TypeError(f"collector_kwargs['postproc'] must be callable, got {postproc!r}.")
    out = []
    for i in range(num_workers):
        stamp = WorkerTrajIds(first_worker + i, traj_key=traj_key, worker_key=worker_key, bits=bits)
        kwargs = dict(shared)
        kwargs["postproc"] = stamp if postproc is None else Compose(copy.deepcopy(postproc), stamp)
        out.append(kwargs)
    return out


def _ray_actor(rb: Any) -> Any | None:
    """The Ray actor behind a Ray-hosted replay buffer or one of its clients, else ``None``."""
    ray_buffer = sys.modules.get("torchrl.data.replay_buffers.ray_buffer")
    if ray_buffer is None:  # never imported: no Ray-hosted buffer exists
        return None
    if isinstance(rb, ray_buffer.RayReplayBuffer):
        if not rb.is_alive:
            raise RuntimeError("the RayReplayBuffer is closed: its actor is gone.")
        return rb._rb
    clients = tuple(
        getattr(ray_buffer, name)
        for name in ("_RayReplayBufferClient", "_LazyDistributedReplayClient")
        if hasattr(ray_buffer, name)
    )
    if clients and isinstance(rb, clients):
        return rb._actor
    return None


def call_in_buffer(rb: Any, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Runs ``fn(buffer, *args, **kwargs)`` where the buffer lives, and returns its result.

    For a Ray-hosted buffer (``ReplayBuffer(..., service_backend="ray")`` or one of its
    clients), ``fn`` runs inside the buffer's actor, on the actor's replay buffer, through
    Ray's ``__ray_call__``: ``fn`` and the arguments are sent there (with cloudpickle, so
    lambdas and functions defined in a script work) and the result comes back. For a local
    buffer it is simply ``fn(rb, *args, **kwargs)``, so code written with it runs in both.

    This is how the memory's own calls reach a Ray-hosted memory: setting retrieval queries,
    consolidating, reading the episode table or the stored rows.

    Args:
        rb (ReplayBuffer): a local replay buffer, a ``RayReplayBuffer`` or its client.
        fn (Callable): called with the replay buffer first.
        *args, **kwargs: passed on to ``fn``.

    Returns:
        What ``fn`` returns (a copy, for a Ray-hosted buffer).

    Examples:
        >>> import torch
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
        >>> from torchrl_hippo.distributed import call_in_buffer
        >>> encoder = DualEncoder(observation_dim=3, action_dim=2, embed_dim=16, window=4)
        >>> rb = TensorDictReplayBuffer(
        ...     storage=HippoStorage(100), writer=HippoWriter(encoder), sampler=HippoSampler()
        ... )
        >>> call_in_buffer(rb, lambda buffer, q: buffer.sampler.set_query(q), torch.randn(2, 16))
        >>> call_in_buffer(rb, lambda buffer: buffer.storage.num_episodes)
        0
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
    actor = _ray_actor(rb)
    if actor is None:
        return fn(rb, *args, **kwargs)
    import ray

    return ray.get(actor.__ray_call__.remote(fn, *args, **kwargs))
