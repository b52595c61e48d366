"""Segmenters: further episode cuts for :class:`~torchrl_hippo.HippoWriter`.

By default the writer cuts episodes where the data says so: at ``("next", "done")``, at
``"is_init"`` and where ``("collector", "traj_ids")`` changes. A *segmenter*, passed as
``HippoWriter(encoder, segmenter=...)``, adds cuts of its own, turning long or unending
trajectories into episodes of a useful size:

- :class:`FixedWindowSegmenter`: a cut every ``length`` steps;
- :class:`GoalSegmenter`: an episode ends where a predicate on the transition holds (a goal is
  reached);
- :class:`ChangePointSegmenter`: a cut where the observation jumps, i.e. where the distance
  between consecutive observations exceeds ``mean + k * std`` of the distances seen so far,
  with a least and a largest episode length.

``segmenter=None`` (the default) means the default segmentation only. Every segmenter is
called by the writer once per ``extend`` as ``segmenter(data, step, stream)``:

- ``data``: the batch, flat ``[n]``, in *sequence order*: each stream's rows are contiguous
  and in time order;
- ``step``: int64 ``[n]``, each row's step within its episode under the default
  segmentation. An episode continued from an earlier ``extend`` counts on from its stored
  length, and since the segmenter's cuts become real episode boundaries, it counts from the
  segmenter's last cut. ``step == 0`` marks a default episode start;
- ``stream``: int64 ``[n]``, the stream of each row (trajectory id, environment index of an
  ``[env, time]`` batch, or ``0``).

It returns a bool ``[n]``, ``True`` at the rows where an additional episode starts (only
rows with ``step > 0``: the default starts are the writer's). All segmenters work on the whole
batch with tensor operations; none loops over rows in Python. Stateful segmenters (those that
carry something from one batch to the next) keep their state in ``state_dict()`` /
``load_state_dict()``, which the writer's own ``state_dict`` includes, and forget it with
``reset()``.

Examples:
    >>> import torch
    >>> from tensordict import TensorDict
    >>> from torchrl_hippo.data.segmenters import FixedWindowSegmenter
    >>> data = TensorDict({"observation": torch.zeros(7, 2)}, batch_size=[7])
    >>> step = torch.tensor([5, 6, 7, 0, 1, 2, 3])  # an episode continued, then a new one
    >>> stream = torch.zeros(7, dtype=torch.int64)
    >>> FixedWindowSegmenter(3)(data, step, stream)
    tensor([False,  True, False, False, False, False,  True])
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch
from tensordict import NestedKey, TensorDictBase

from torchrl_hippo._checks import as_nested_key

__all__ = [
    "ChangePointSegmenter",
    "FixedWindowSegmenter",
    "GoalSegmenter",
    "Segmenter",
]


class Segmenter(ABC):
    """Base class of the episode segmenters of :class:`~torchrl_hippo.HippoWriter`.

    A subclass implements :meth:`segment`; calling the segmenter checks the inputs, calls
    :meth:`segment` and checks its answer (a bool ``[n]``), keeping only the starts at rows
    with ``step > 0`` (the default starts are the writer's own). Stateless segmenters need
    nothing else; stateful ones override :meth:`state_dict`, :meth:`load_state_dict` and
    :meth:`reset`.

    The inputs (see :mod:`torchrl_hippo.data.segmenters`) are checked: ``data`` a
    TensorDict of batch size ``[n]``, ``step`` and ``stream`` int64 ``[n]``, each stream's
    rows contiguous, and ``step`` counting on by one within a stream or restarting at ``0``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_hippo.data.segmenters import Segmenter
        >>> class EveryOther(Segmenter):
        ...     def segment(self, data, step, stream):
        ...         return step % 2 == 0
        >>> data = TensorDict({}, batch_size=[5])
        >>> EveryOther()(data, torch.arange(5), torch.zeros(5, dtype=torch.int64))
        tensor([False, False,  True, False,  True])
    """

    def __call__(
        self, data: TensorDictBase, step: torch.Tensor, stream: torch.Tensor
    ) -> torch.Tensor:
        n = _check_inputs(data, step, stream)
        if n == 0:
            return torch.zeros(0, dtype=torch.bool, device=step.device)
        starts = self.segment(data, step, stream)
        if not isinstance(starts, torch.Tensor) or starts.dtype != torch.bool:
            got = starts.dtype if isinstance(starts, torch.Tensor) else type(starts).__name__
            raise TypeError(
                f"{type(self).__name__}.segment must return a bool tensor of episode starts, "
                f"got {got}."
            )
        if starts.shape != (n,):
            raise ValueError(
                f"{type(self).__name__}.segment must return one flag per transition, shape "
                f"[{n}], got {list(starts.shape)}."
            )
        return starts.to(step.device) & (step != 0)

    @abstractmethod
    def segment(
        self, data: TensorDictBase, step: torch.Tensor, stream: torch.Tensor
    ) -> torch.Tensor:
        """Returns a bool ``[n]``: ``True`` where an additional episode starts.

        Called with inputs already checked (see the class docstring); ``True`` at rows with
        ``step == 0`` is allowed and ignored.
        """

    def reset(self) -> None:  # noqa: B027 (a no-op unless the segmenter keeps state)
        """Forgets the state carried from earlier batches (nothing for a stateless segmenter)."""

    def state_dict(self) -> dict[str, Any]:
        """The state carried from batch to batch (empty for a stateless segmenter)."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`; a stateless segmenter accepts only an empty one."""
        if state_dict:
            raise ValueError(
                f"{type(self).__name__} keeps no state, got a state_dict with entries "
                f"{sorted(state_dict)}."
            )


class FixedWindowSegmenter(Segmenter):
    """Cuts episodes every ``length`` steps.

    A new episode starts where ``step % length == 0``: episodes are at most ``length`` steps
    long, and an episode that ends by itself (``done``) keeps its shorter last piece. Across
    ``extend`` calls this is consistent, since a continued episode's ``step`` counts from the
    last cut. Stateless.

    Args:
        length (int): the episode length, at least ``1``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_hippo.data.segmenters import FixedWindowSegmenter
        >>> segmenter = FixedWindowSegmenter(2)
        >>> data = TensorDict({}, batch_size=[6])
        >>> step = torch.tensor([0, 1, 2, 3, 0, 1])  # two default episodes of one stream
        >>> segmenter(data, step, torch.zeros(6, dtype=torch.int64))
        tensor([False, False,  True, False, False, False])
    """

    def __init__(self, length: int) -> None:
        self.length = _positive_int("length", length)

    def segment(
        self, data: TensorDictBase, step: torch.Tensor, stream: torch.Tensor
    ) -> torch.Tensor:
        return step % self.length == 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(length={self.length})"


class GoalSegmenter(Segmenter):
    """Ends an episode at every transition where a goal is achieved.

    ``predicate(data)`` returns a bool ``[n]`` (or ``[n, 1]``, the shape of a done flag)
    marking the rows where a goal is achieved. The episode ends at such a row: the next
    row of the same stream starts a new episode. When the goal row is the last row of its
    stream in the batch, the new episode starts at that stream's first row in the next
    call: the segmenter remembers, per stream, that a goal was pending (the state).

    Args:
        predicate (Callable[[TensorDictBase], torch.Tensor]): maps the batch to a bool
            ``[n]`` (or ``[n, 1]``), ``True`` where a goal is achieved. It must not modify
            the batch.

    Keyword Args:
        max_streams (int, optional): how many streams with a pending goal are remembered;
            past that the oldest are forgotten. Defaults to ``4096``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_hippo.data.segmenters import GoalSegmenter
        >>> segmenter = GoalSegmenter(lambda td: td["next", "reward"] > 0)
        >>> reward = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0]).unsqueeze(-1)
        >>> data = TensorDict({"next": {"reward": reward}}, batch_size=[5])
        >>> step, stream = torch.arange(3, 8), torch.zeros(5, dtype=torch.int64)
        >>> segmenter(data, step, stream)  # the goal at row 1 ends an episode
        tensor([False, False,  True, False, False])
        >>> data = TensorDict({"next": {"reward": torch.zeros(2, 1)}}, batch_size=[2])
        >>> segmenter(data, torch.tensor([3, 4]), torch.zeros(2, dtype=torch.int64))
        tensor([ True, False])
    """

    def __init__(
        self,
        predicate: Callable[[TensorDictBase], torch.Tensor],
        *,
        max_streams: int = 4096,
    ) -> None:
        if not callable(predicate):
            raise TypeError(
                f"predicate must be callable (data) -> bool [n], got {type(predicate).__name__}."
            )
        self.predicate = predicate
        self.max_streams = _positive_int("max_streams", max_streams)
        self._pending = _StreamTable(self.max_streams)

    def segment(
        self, data: TensorDictBase, step: torch.Tensor, stream: torch.Tensor
    ) -> torch.Tensor:
        n = step.shape[0]
        goal = self.predicate(data)
        if not isinstance(goal, torch.Tensor) or goal.dtype != torch.bool:
            got = goal.dtype if isinstance(goal, torch.Tensor) else type(goal).__name__
            raise TypeError(f"predicate must return a bool tensor, got {got}.")
        if goal.shape not in ((n,), (n, 1)):
            raise ValueError(
                f"predicate must return one flag per transition, shape [{n}] or [{n}, 1], got "
                f"{list(goal.shape)}."
            )
        goal = goal.reshape(n).to(step.device)
        runs = _Runs(stream)
        starts = torch.zeros(n, dtype=torch.bool, device=step.device)
        starts[1:] = goal[:-1] & ~runs.change
        found, _ = self._pending.lookup(runs.ids)
        starts[runs.first[found]] = True
        # The batch's streams consumed their pending goal; those ending on one carry it on.
        self._pending.remove(runs.ids)
        self._pending.add(runs.ids[goal.index_select(0, runs.last)])
        return starts

    def reset(self) -> None:
        self._pending = _StreamTable(self.max_streams)

    def state_dict(self) -> dict[str, Any]:
        return {"pending_streams": self._pending.ids.clone()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        _check_state_keys(self, state_dict, {"pending_streams"})
        ids = _int_vector("pending_streams", state_dict["pending_streams"])
        self._pending = _StreamTable(self.max_streams)
        self._pending.add(ids[-self.max_streams :])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(predicate={self.predicate!r}, "
            f"pending_streams={self._pending.ids.numel()})"
        )


class ChangePointSegmenter(Segmenter):
    """Cuts episodes where the observation jumps.

    The distance between consecutive observations of a stream is
    ``||obs[t] - obs[t - 1]||_p`` (observations flattened; the first row of a stream in a
    batch is compared with the stream's last observation of the previous call, when known).
    A row is a *change point* when its distance exceeds ``mean + k * std`` of all the
    distances seen before it: those of earlier calls and those of earlier rows of this batch,
    in sequence order, so a jump is always judged against history, and a single stream
    split over several calls is cut exactly as if it came in one. The statistics are exact
    running ones (a count, a mean and a sum of squared deviations, merged batch by batch
    with Chan's formula; ``std`` is the population one) over all streams. Distances at a
    default episode start (``step == 0``: a reset, not a move) and non-finite ones are not
    counted, and are never change points.

    A new episode starts at a change point unless the episode it closes would be shorter
    than ``min_length``; and an episode that reaches ``max_length`` steps is cut there
    whatever the distances (``step`` counts the steps, restarting at every default start
    and every cut). Change points are only looked for once ``warmup`` distances have been
    seen; the ``max_length`` cuts apply from the start. An episode closed by the data
    itself (``done``) can still be shorter than ``min_length``.

    Because each cut moves the next allowed ones, the cuts are a chain: from a cut ``c``
    the next is the first of: a change point at or after ``c + min_length``, ``c +
    max_length``, the next default start. The segmenter computes this "next cut" for every
    row at once, then marks the chain through the batch by pointer doubling: about
    ``log2(number of cuts)`` rounds of tensor operations, no loop over rows.

    Args:
        key (NestedKey, optional): the observation entry. Defaults to ``"observation"``.

    Keyword Args:
        k (float, optional): the jump threshold in standard deviations, ``>= 0``;
            ``float("inf")`` finds no change points (only ``max_length`` cuts). Defaults to
            ``3.0``.
        min_length (int, optional): the least length of an episode closed at a change point.
            Defaults to ``1``.
        max_length (int, optional): the largest episode length; ``None`` for no bound.
            Defaults to ``None``.
        warmup (int, optional): how many distances must have been seen before change points
            are looked for, at least ``1``. Defaults to ``100``.
        p (float, optional): the order of the norm of the distance. Defaults to ``2.0``.
        max_streams (int, optional): how many streams' last observations are remembered;
            past that the oldest are forgotten. Defaults to ``4096``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_hippo.data.segmenters import ChangePointSegmenter
        >>> segmenter = ChangePointSegmenter(k=3.0, min_length=2, max_length=6, warmup=3)
        >>> position = torch.tensor([0.0, 1, 2, 3, 4, 50, 51, 52, 53, 54, 55, 56, 57, 58])
        >>> data = TensorDict({"observation": position.unsqueeze(-1)}, batch_size=[14])
        >>> step, stream = torch.arange(14), torch.zeros(14, dtype=torch.int64)
        >>> segmenter(data, step, stream).nonzero().squeeze(-1)  # the jump, then max_length
        tensor([ 5, 11])
        >>> segmenter.count, round(segmenter.mean, 3)  # the 13 distances, the jump included
        (13, 4.462)
    """

    def __init__(
        self,
        key: NestedKey = "observation",
        *,
        k: float = 3.0,
        min_length: int = 1,
        max_length: int | None = None,
        warmup: int = 100,
        p: float = 2.0,
        max_streams: int = 4096,
    ) -> None:
        key = as_nested_key(key, "key")
        if isinstance(k, bool) or not isinstance(k, (int, float)) or math.isnan(k) or k < 0:
            raise ValueError(f"k must be a number >= 0 (inf allowed), got {k!r}.")
        self.key = key
        self.k = float(k)
        self.min_length = _positive_int("min_length", min_length)
        if max_length is not None:
            max_length = _positive_int("max_length", max_length)
            if max_length < self.min_length:
                raise ValueError(
                    f"max_length must be >= min_length ({self.min_length}), got {max_length}."
                )
        self.max_length = max_length
        self.warmup = _positive_int("warmup", warmup)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
            raise ValueError(f"p must be a norm order > 0 (inf allowed), got {p!r}.")
        self.p = float(p)
        self.max_streams = _positive_int("max_streams", max_streams)
        self.reset()

    # ------------------------------------------------------------------ state
    @property
    def std(self) -> float:
        """The (population) standard deviation of the distances seen so far."""
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def reset(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self._last = _StreamTable(self.max_streams, observation=None)

    def state_dict(self) -> dict[str, Any]:
        obs = self._last.values["observation"]
        return {
            "count": self.count,
            "mean": self.mean,
            "m2": self.m2,
            "streams": self._last.ids.clone(),
            "last_observation": torch.zeros(0, 0) if obs is None else obs.clone(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        _check_state_keys(self, state_dict, {"count", "mean", "m2", "streams", "last_observation"})
        count, mean, m2 = (state_dict[name] for name in ("count", "mean", "m2"))
        if not (float(count) >= 0 and float(m2) >= 0 and math.isfinite(float(mean))):
            raise ValueError(
                f"state_dict holds invalid statistics: count={count}, mean={mean}, m2={m2}."
            )
        ids = _int_vector("streams", state_dict["streams"])
        obs = state_dict["last_observation"]
        if not isinstance(obs, torch.Tensor) or obs.ndim != 2 or obs.shape[0] != ids.shape[0]:
            raise ValueError(
                f"state_dict['last_observation'] must be a [{ids.shape[0]}, features] tensor, "
                f"got {getattr(obs, 'shape', type(obs).__name__)}."
            )
        self.reset()
        self.count, self.mean, self.m2 = int(count), float(mean), float(m2)
        if ids.numel():
            keep = slice(-self.max_streams, None)
            self._last.add(ids[keep], observation=obs[keep].clone())

    # ------------------------------------------------------------------ segmentation
    def segment(
        self, data: TensorDictBase, step: torch.Tensor, stream: torch.Tensor
    ) -> torch.Tensor:
        device = step.device
        n = step.shape[0]
        obs = self._observation(data, n).to(device)
        runs = _Runs(stream)
        dist = self._distances(obs, runs)
        valid = torch.isfinite(dist) & (step > 0)
        candidate = self._change_points(dist, valid)
        starts = self._chain(candidate, step, runs)
        # Commit the state: the streams' last observations, then the statistics.
        self._last.remove(runs.ids)
        self._last.add(runs.ids, observation=obs.index_select(0, runs.last))
        self._merge(dist[valid])
        return starts

    def _observation(self, data: TensorDictBase, n: int) -> torch.Tensor:
        try:
            obs = data.get(self.key)
        except KeyError:
            obs = None
        if not isinstance(obs, torch.Tensor):
            raise KeyError(
                f"ChangePointSegmenter reads the observation {self.key!r}, which the batch does "
                f"not hold as a tensor (keys: {sorted(map(str, data.keys(True, True)))})."
            )
        obs = obs.reshape(n, -1)
        if obs.dtype not in (torch.float32, torch.float64):
            obs = obs.to(torch.float32)  # integers (pixels) and half precision
        known = self._last.values["observation"]
        if known is not None and known.shape[1] != obs.shape[1]:
            raise ValueError(
                f"observation {self.key!r} has {obs.shape[1]} features per transition, but the "
                f"earlier batches had {known.shape[1]}; call reset() to start over."
            )
        return obs

    def _distances(self, obs: torch.Tensor, runs: _Runs) -> torch.Tensor:
        """``||obs[i] - obs[i - 1]||`` within each stream; NaN where the previous is unknown."""
        prev = torch.empty_like(obs)
        prev[1:] = obs[:-1]
        found, index = self._last.lookup(runs.ids)
        first = runs.first
        prev.index_copy_(0, first, obs.new_full((first.shape[0], obs.shape[1]), math.nan))
        if bool(found.any()):
            known = self._last.values["observation"].to(obs.device, obs.dtype)
            prev.index_copy_(0, first[found], known.index_select(0, index[found]))
        return torch.linalg.vector_norm(obs - prev, ord=self.p, dim=1).double()

    def _change_points(self, dist: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Rows whose distance exceeds ``mean + k * std`` of all the distances before them."""
        if math.isinf(self.k):
            return torch.zeros_like(valid)
        v = valid.double()
        d = torch.where(valid, dist, 0.0)
        # Statistics of the valid distances strictly before each row: the history (count,
        # mean, m2) merged with the batch's prefix (exclusive cumulative sums around a shift).
        count_b = torch.cumsum(v, 0) - v
        if self.count:
            shift = self.mean
        else:
            shift = float(d[valid][0]) if bool(valid.any()) else 0.0
        x = (d - shift) * v
        s = torch.cumsum(x, 0) - x
        q = torch.cumsum(x * x, 0) - x * x
        has = count_b > 0
        safe = count_b.clamp_min(1.0)
        mean_b = shift + torch.where(has, s / safe, 0.0)
        m2_b = torch.where(has, q - s * s / safe, 0.0).clamp_min(0.0)
        total = count_b + self.count
        delta = mean_b - self.mean
        frac = count_b / total.clamp_min(1.0)
        mean = torch.where(total > 0, self.mean + delta * frac, 0.0)
        m2 = self.m2 + m2_b + delta * delta * self.count * frac
        std = torch.sqrt(m2 / total.clamp_min(1.0))
        return valid & (total >= self.warmup) & (dist > mean + self.k * std)

    def _chain(self, candidate: torch.Tensor, step: torch.Tensor, runs: _Runs) -> torch.Tensor:
        """The cuts, given the change points, ``min_length`` and ``max_length``."""
        n = step.shape[0]
        device = step.device
        rows = torch.arange(n, device=device)
        end = torch.full((1,), n, dtype=torch.int64, device=device)
        # Default segments: they start at a default start or a stream's first row.
        head = step == 0
        head[runs.first] = True
        # first_from[x]: the first change point at row >= x; next_head[x]: the first head >= x.
        first_from = torch.cat([_reverse_cummin(torch.where(candidate, rows, n)), end])
        next_head = torch.cat([_reverse_cummin(torch.where(head, rows, n)), end])
        max_length = _NO_BOUND if self.max_length is None else self.max_length
        # From a cut at row c (or a head), the next cut: a change point at c + min_length or
        # later, c + max_length, or the next head, whichever comes first.
        reach = (rows + self.min_length).clamp_max(n)
        nxt = torch.minimum(first_from.index_select(0, reach), rows + max_length)
        nxt = torch.minimum(nxt, next_head[1:])
        # A stream's first row continuing an episode (step > 0) is no cut by itself: its
        # segment began step rows earlier, in an earlier batch, at anchor = row - step.
        cont = runs.first[step.index_select(0, runs.first) > 0]
        not_cut = cont
        if cont.numel():
            anchor = cont - step.index_select(0, cont)
            reach = torch.maximum(anchor + self.min_length, cont).clamp_max(n)
            first_cut = torch.minimum(first_from.index_select(0, reach), anchor + max_length)
            first_cut = torch.minimum(first_cut, next_head.index_select(0, cont + 1))
            first_cut = torch.maximum(first_cut, cont)  # past max_length already: cut now
            is_cut = first_cut == cont
            not_cut = cont[~is_cut]
            nxt.index_copy_(0, not_cut, first_cut[~is_cut])
        # The chain from row 0 through the batch, by pointer doubling: ``on`` holds the first
        # 2**r nodes of the chain, ``jump`` is next applied 2**r times.
        jump = torch.cat([nxt, end])
        on = torch.zeros(n + 1, dtype=torch.bool, device=device)
        on[0] = True
        while int(jump[0]) < n:
            on[jump[on]] = True
            jump = jump.index_select(0, jump)
        starts = on[:n]
        starts[not_cut] = False
        return starts

    def _merge(self, dist: torch.Tensor) -> None:
        """Adds a batch's distances to the running statistics (Chan's parallel merge)."""
        count_b = dist.numel()
        if not count_b:
            return
        mean_b = float(dist.mean())
        m2_b = float(((dist - mean_b) ** 2).sum())
        total = self.count + count_b
        delta = mean_b - self.mean
        self.mean += delta * count_b / total
        self.m2 += m2_b + delta * delta * self.count * count_b / total
        self.count = total

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(key={self.key!r}, k={self.k}, min_length={self.min_length}, "
            f"max_length={self.max_length}, warmup={self.warmup}, p={self.p}, "
            f"count={self.count})"
        )


# ---------------------------------------------------------------------- helpers
#: An episode length past any row or step (max_length=None), with room to add rows to it.
_NO_BOUND = 2**61


class _Runs:
    """The streams of a batch in sequence order: each stream's first and last row, its id."""

    def __init__(self, stream: torch.Tensor) -> None:
        n = stream.shape[0]
        change = torch.zeros(n, dtype=torch.bool, device=stream.device)
        change[1:] = stream[1:] != stream[:-1]
        change[0] = True
        self.change = change[1:]  # row i + 1 starts another stream
        self.first = change.nonzero().squeeze(1)
        self.last = torch.cat([self.first[1:] - 1, self.first.new_full((1,), n - 1)])
        self.ids = stream.index_select(0, self.first)


class _StreamTable:
    """Per-stream values of the streams seen most recently, at most ``capacity`` of them."""

    def __init__(self, capacity: int, **values: torch.Tensor | None) -> None:
        self.capacity = capacity
        self.ids = torch.zeros(0, dtype=torch.int64)
        self.values: dict[str, torch.Tensor | None] = dict(values)

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether each of ``ids`` is in the table, and its position there (0 where not)."""
        if not self.ids.numel():
            zeros = torch.zeros_like(ids)
            return zeros.bool(), zeros
        table, order = torch.sort(self.ids.to(ids.device))
        pos = torch.searchsorted(table, ids).clamp_max(table.shape[0] - 1)
        found = table.index_select(0, pos) == ids
        return found, torch.where(found, order.index_select(0, pos), 0)

    def remove(self, ids: torch.Tensor) -> None:
        if not self.ids.numel():
            return
        keep = ~torch.isin(self.ids.to(ids.device), ids)
        self.ids = self.ids.to(ids.device)[keep]
        for name, value in self.values.items():
            if value is not None:
                self.values[name] = value.to(ids.device)[keep]

    def add(self, ids: torch.Tensor, **values: torch.Tensor) -> None:
        """Appends ``ids`` (not in the table) with their values; drops the oldest past capacity."""
        self.ids = torch.cat([self.ids.to(ids.device), ids])
        for name, value in values.items():
            old = self.values[name]
            self.values[name] = value if old is None else torch.cat([old.to(value.device), value])
        excess = self.ids.shape[0] - self.capacity
        if excess > 0:
            self.ids = self.ids[excess:]
            for name, value in self.values.items():
                if value is not None:
                    self.values[name] = value[excess:]


def _reverse_cummin(values: torch.Tensor) -> torch.Tensor:
    """``out[i] = values[i:].min()``."""
    return torch.cummin(values.flip(0), 0).values.flip(0)


def _check_inputs(data: TensorDictBase, step: torch.Tensor, stream: torch.Tensor) -> int:
    if not isinstance(data, TensorDictBase):
        raise TypeError(f"data must be a TensorDict, got {type(data).__name__}.")
    if data.batch_dims != 1:
        raise ValueError(f"data must be flat, batch size [n], got {list(data.batch_size)}.")
    n = data.batch_size[0]
    for name, value in (("step", step), ("stream", stream)):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.int64:
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"{name} must be an int64 tensor, got {got}.")
        if value.shape != (n,):
            raise ValueError(
                f"{name} must hold one value per transition, shape [{n}], got {list(value.shape)}."
            )
    if not n:
        return n
    # One synchronising check for the usual, valid batch; the details only on failure.
    same = stream[1:] == stream[:-1]
    counts_on = same & (step[1:] != step[:-1] + 1) & (step[1:] != 0)
    run_ids = torch.sort(stream[torch.cat([same.new_ones(1), ~same])]).values
    ok = (step.min() >= 0) & ~counts_on.any() & (run_ids[1:] != run_ids[:-1]).all()
    if bool(ok):
        return n
    if bool((step < 0).any()):
        raise ValueError(f"step must be >= 0, got {int(step.min())}.")
    if bool(counts_on.any()):
        row = int(counts_on.nonzero()[0]) + 1
        raise ValueError(
            f"step must count on by one within a stream or restart at 0, but row {row} has step "
            f"{int(step[row])} after {int(step[row - 1])}."
        )
    repeated = run_ids[1:][run_ids[1:] == run_ids[:-1]]
    raise ValueError(
        "stream must keep each stream's rows contiguous (sequence order), but stream "
        f"{int(repeated[0])} appears in several runs."
    )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    return value


def _int_vector(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.ndim != 1:
        raise ValueError(
            f"state_dict[{name!r}] must be a 1-D int64 tensor, got "
            f"{getattr(value, 'dtype', type(value).__name__)} of shape "
            f"{list(getattr(value, 'shape', []))}."
        )
    return value


def _check_state_keys(owner: Segmenter, state_dict: Mapping[str, Any], expected: set) -> None:
    if not isinstance(state_dict, Mapping) or set(state_dict) != expected:
        got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ValueError(
            f"{type(owner).__name__}.load_state_dict expects the entries {sorted(expected)}, "
            f"got {got}."
        )
