"""The bookkeeping of a FIFO write, compiled with numba, for :class:`~torchrl_hippo.HippoWriter`.

:meth:`HippoWriter.extend <torchrl_hippo.HippoWriter.extend>` segments a batch into episodes,
stitches them to the episodes left open by the batch before, updates the episode table and
computes every row's ``"hippo"`` entries. In torch that is about a hundred small tensor ops per
call, each with a fixed cost of one to three microseconds whatever its size, against about
twenty-five for TorchRL's round-robin writer. :func:`fifo_write` does the same work as a single
compiled call on the CPU arrays, in place.

It covers the writer's usual collection setting: FIFO forgetting, deferred keys
(``defer_keys=True``: no window is encoded during the write), no custom segmenter, tables on the
CPU, a batch no larger than the memory, written into columns that already exist. The torch code in
:mod:`torchrl_hippo.data.writer` stays the reference: it serves every other case, and the tests
check that both give the same memory, bit for bit (``tests/test_writer.py``).

numba is an optional dependency (``pip install "torchrl-hippo[fast]"``); :data:`AVAILABLE` tells
whether it is installed. This module imports without it.

Examples:
    >>> import numpy as np
    >>> from torchrl_hippo.data import fifo_numba
    >>> done = np.array([False, True, False, False, True, False])
    >>> no_entry = np.zeros(0, np.bool_)
    >>> first, end = fifo_numba.segment_bounds(
    ...     6, done, no_entry, np.zeros(0, np.int64), fifo_numba.ONE_STREAM, 0
    ... )
    >>> first.tolist(), end.tolist()
    ([0, 2, 5], [2, 5, 6])
    >>> first, end = fifo_numba.segment_bounds(  # [env=2, time=3]: a stream per environment
    ...     6, done, no_entry, np.zeros(0, np.int64), fifo_numba.ENV_TIME, 3
    ... )
    >>> first.tolist(), end.tolist()
    ([0, 2, 3, 5], [2, 3, 5, 6])
"""

from __future__ import annotations

import numpy as np

from torchrl_hippo.data.storage import _C

try:
    import numba
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None

__all__ = ["AVAILABLE", "ENV_TIME", "ONE_STREAM", "TRAJ_IDS", "fifo_write", "segment_bounds"]

#: Whether numba is installed, so that :func:`fifo_write` can run.
AVAILABLE = numba is not None

#: How the batch's rows form streams: one stream (a flat batch without trajectory ids), one per
#: environment of an ``[env, time]`` batch, or one per trajectory id (rows sorted by id).
ONE_STREAM, ENV_TIME, TRAJ_IDS = 0, 1, 2

#: :func:`fifo_write`'s status: done, rewards not finite (nothing written), too few free
#: episode-table slots (nothing written; free ``needed`` slots and call again).
OK, NOT_FINITE, NEED_SLOTS = 0, 1, 2

_CURSOR = _C["writer_cursor"]
_WRITES = _C["write_count"]
_CLOCK = _C["clock"]
_NEXT_ID = _C["next_episode_id"]
_FREE_SLOTS = _C["num_free_slots"]


def _jit(fn):
    return fn if numba is None else numba.njit(cache=True, nogil=True)(fn)


@_jit
def segment_bounds(n, done, is_init, traj, layout, time):
    """The episode segments of ``n`` rows in sequence order: ``(first, end)`` rows of each.

    A segment starts at row 0, after a ``done``, at an ``is_init``, and where the stream
    changes (``layout``: :data:`ONE_STREAM`, :data:`ENV_TIME` with rows of ``time`` steps per
    environment, or :data:`TRAJ_IDS` with ``traj`` sorted). Empty ``done``/``is_init`` arrays
    stand for absent entries.
    """
    first = np.empty(n, np.int64)
    num = 0
    for i in range(n):
        start = i == 0
        if done.shape[0] and i > 0 and done[i - 1]:
            start = True
        if is_init.shape[0] and is_init[i]:
            start = True
        if layout == ENV_TIME:
            if i % time == 0:
                start = True
        elif layout == TRAJ_IDS:
            if i > 0 and traj[i] != traj[i - 1]:
                start = True
        if start:
            first[num] = i
            num += 1
    first = first[:num].copy()
    end = np.empty(num, np.int64)
    end[: num - 1] = first[1:]
    end[num - 1] = n
    return first, end


@_jit
def fifo_write(
    n,
    reward,
    done,
    is_init,
    traj,
    layout,
    time,
    order,
    open_key,
    open_episode,
    open_slot,
    open_step,
    open_ret,
    open_last_row,
    max_open,
    capacity,
    counters,
    free_slots,
    t_id,
    t_inserted,
    t_return,
    t_length,
    t_rows,
    t_access,
    t_updated,
    t_done,
    row_slot,
    c_episode,
    c_step,
    c_return,
    c_key_version,
    c_prev,
    index,
):
    """Writes the bookkeeping of one FIFO ``extend`` of ``n`` rows with deferred keys.

    The batch comes in sequence order (``reward``, ``done``, ``is_init``, ``traj``: empty
    arrays stand for absent entries; ``order[i]`` is the input position of sequence row ``i``,
    empty when they are the same). The open-episode table comes as its columns, the episode
    table as its columns (``t_*``), the storage's ``"hippo"`` entries as their full columns
    (``c_*``), and ``counters`` is the storage's counter array. On success everything is
    updated in place: episode table, free slots, row slots, the rows' entries, the counters
    (cursor, clock, write count, next episode id, free slots), ``index`` (the ring row of every
    input row); the new open-episode table is returned.

    Returns ``(status, needed, key, episode, slot, step, ret, last_row)``: ``status`` is
    :data:`OK`, :data:`NOT_FINITE` or :data:`NEED_SLOTS` (``needed`` slots must be free); in
    the last two cases nothing was changed.
    """
    first, end = segment_bounds(n, done, is_init, traj, layout, time)
    num = first.shape[0]
    has_done = done.shape[0] > 0
    has_init = is_init.shape[0] > 0

    # Running sum of rewards in float64, row by row as torch.cumsum does.
    csum = np.empty(n, np.float64)
    acc = 0.0
    for i in range(n):
        acc += np.float64(reward[i])
        csum[i] = acc
    k = open_key.shape[0]
    empty = np.zeros(0, np.int64)
    if not np.isfinite(csum[n - 1]):
        return NOT_FINITE, 0, empty, empty, empty, empty, np.zeros(0, np.float64), empty

    # Per segment: its stream, whether it is its stream's first here, whether its episode ended.
    key = np.zeros(num, np.int64)
    first_of_key = np.zeros(num, np.bool_)
    closed = np.zeros(num, np.bool_)
    for s in range(num):
        done_last = has_done and done[end[s] - 1]
        if layout == ENV_TIME:
            key[s] = first[s] // time
            first_of_key[s] = first[s] % time == 0
            closed[s] = done_last or end[s] % time != 0
        elif layout == TRAJ_IDS:
            key[s] = traj[first[s]]
            first_of_key[s] = s == 0 or key[s] != key[s - 1]
            closed[s] = done_last or (s + 1 < num and traj[first[s + 1]] == key[s])
        else:
            first_of_key[s] = s == 0
            closed[s] = done_last or s + 1 < num

    # Stitching: a stream's first segment continues that stream's open episode, unless it
    # starts with is_init, which abandons it.
    opened = np.full(num, -1, np.int64)
    ended = np.zeros(k, np.bool_)
    matched = np.zeros(k, np.bool_)
    num_stitched = 0
    if k:
        by_key = np.argsort(open_key, kind="mergesort")
        sorted_keys = open_key[by_key]
        for s in range(num):
            if not first_of_key[s]:
                continue
            lo = np.searchsorted(sorted_keys, key[s], side="left")
            hi = np.searchsorted(sorted_keys, key[s], side="right")
            restart = has_init and is_init[first[s]]
            for j in range(lo, hi):
                o = by_key[j]
                ended[o] = True
                if not restart:
                    matched[o] = True
                    if opened[s] < 0 or o < opened[s]:
                        opened[s] = o
            if opened[s] >= 0:
                num_stitched += 1
    n_new = num - num_stitched
    top = counters[_FREE_SLOTS]
    if n_new > top:
        return NEED_SLOTS, n_new, empty, empty, empty, empty, np.zeros(0, np.float64), empty

    # ---- from here on the memory is changed ----
    clock = counters[_CLOCK]
    start = counters[_CURSOR]
    next_id = counters[_NEXT_ID]
    seg_slot = np.empty(num, np.int64)
    seg_ep = np.empty(num, np.int64)
    seg_length = np.empty(num, np.int64)
    seg_return = np.empty(num, np.float64)
    offset = np.empty(num, np.float64)
    origin = np.empty(num, np.int64)
    fresh = 0
    stitched_any = num_stitched > 0
    for s in range(num):
        last = end[s] - 1
        before = csum[first[s] - 1] if s else 0.0
        ret = csum[last] - before
        start_sum = csum[last] - ret
        o = opened[s]
        if o >= 0:
            slot, episode = open_slot[o], open_episode[o]
            base_step, base_ret = open_step[o], open_ret[o]
        else:
            slot, episode = free_slots[top - 1 - fresh], next_id + fresh
            base_step, base_ret = 0, 0.0
            fresh += 1
            t_id[slot] = episode
            t_inserted[slot] = first[s] + clock
        if stitched_any:  # as the torch reference: a base is added only if some segment has one
            ret += base_ret
            start_sum -= base_ret
        seg_slot[s], seg_ep[s] = slot, episode
        seg_length[s] = base_step + end[s] - first[s]
        seg_return[s] = ret
        offset[s] = start_sum
        origin[s] = first[s] - base_step
        t_return[slot] = np.float32(ret)
        t_length[slot] = seg_length[s]
        t_updated[slot] = last + clock
        t_done[slot] = closed[s]
    for o in range(k):
        if ended[o] and not matched[o]:  # abandoned
            t_done[open_slot[o]] = True

    # Live rows per episode: minus each row overwritten, plus the rows written.
    for i in range(n):
        old = row_slot[(start + i) % capacity]
        if old >= 0:
            t_rows[old] -= 1
    for s in range(num):
        t_rows[seg_slot[s]] += end[s] - first[s]

    # The rows' own entries, and the index of every input row.
    for s in range(num):
        o = opened[s]
        for i in range(first[s], end[s]):
            row = (start + i) % capacity
            row_slot[row] = seg_slot[s]
            c_episode[row] = seg_ep[s]
            c_step[row] = i - origin[s]
            c_return[row] = np.float32(csum[i] - offset[s])
            c_key_version[row] = -1
            if i > first[s]:
                c_prev[row] = (start + i - 1) % capacity
            elif o >= 0:
                c_prev[row] = open_last_row[o]
            else:
                c_prev[row] = -1
            if order.shape[0]:
                index[order[i]] = row
            else:
                index[i] = row

    # The open episodes: those not ended, then this batch's running ones; the oldest are
    # closed past max_open.
    size = (k - int(ended.sum())) + (num - int(closed.sum()))
    m_key = np.empty(size, np.int64)
    m_episode = np.empty(size, np.int64)
    m_slot = np.empty(size, np.int64)
    m_step = np.empty(size, np.int64)
    m_ret = np.empty(size, np.float64)
    m_last = np.empty(size, np.int64)
    j = 0
    for o in range(k):
        if not ended[o]:
            m_key[j], m_episode[j], m_slot[j] = open_key[o], open_episode[o], open_slot[o]
            m_step[j], m_ret[j], m_last[j] = open_step[o], open_ret[o], open_last_row[o]
            j += 1
    for s in range(num):
        if not closed[s]:
            m_key[j], m_episode[j], m_slot[j] = key[s], seg_ep[s], seg_slot[s]
            m_step[j], m_ret[j] = seg_length[s], seg_return[s]
            m_last[j] = (start + end[s] - 1) % capacity
            j += 1
    top -= n_new
    excess = size - max_open
    if excess > 0:
        for j in range(excess):
            slot = m_slot[j]
            t_done[slot] = True
            if t_rows[slot] == 0:  # release the slot
                t_id[slot] = -1
                t_access[slot] = 0
                free_slots[top] = slot
                top += 1
        m_key, m_episode, m_slot = m_key[excess:], m_episode[excess:], m_slot[excess:]
        m_step, m_ret, m_last = m_step[excess:], m_ret[excess:], m_last[excess:]

    counters[_FREE_SLOTS] = top
    counters[_NEXT_ID] = next_id + n_new
    counters[_CURSOR] = (start + n) % capacity
    counters[_CLOCK] = clock + n
    counters[_WRITES] += n
    return OK, 0, m_key, m_episode, m_slot, m_step, m_ret, m_last
