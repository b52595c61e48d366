"""fifo_numba: the compiled FIFO bookkeeping gives the torch writer's memory, bit for bit."""

import contextlib

import numpy as np
import pytest
import torch
from conftest import assert_same_state, make_buffer, make_episodes, plan_batch, write_plans
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchrl_hippo import DualEncoder, HippoWriter
from torchrl_hippo.data import fifo_numba

pytestmark = pytest.mark.skipif(not fifo_numba.AVAILABLE, reason="numba is not installed")


def memory_state(rb):
    """Everything a write changes: rows, episode table, free lists, counters, open episodes."""
    storage = rb.storage
    # Trajectory ids are left out: a plan's first batch with them creates their column, whose
    # earlier rows hold whatever memory it was given.
    rows = storage._storage[: len(storage)].exclude("collector").clone()
    # A row waiting for its key holds none: its key entry is whatever the column held.
    pending = rows["hippo", "key_version"] < 0
    rows["hippo", "key"][pending] = 0
    return {
        "rows": rows,
        "episodes": storage.episodes.clone(),
        "row_slot": storage._row_slot.clone(),
        "free_slots": storage._free_slots[: storage._num_free_slots].clone(),
        "counters": torch.from_numpy(storage._cv.copy()),
        "len": len(storage),
        "open": rb.writer._open.clone(),
        "pending": torch.cat(storage._pending).sort().values
        if storage._pending
        else torch.zeros(0, dtype=torch.int64),
    }


def pair(capacity, max_open=4096):
    """Two memories, written by the torch and the numba bookkeeping, same encoder."""
    torch_rb = make_buffer(
        capacity,
        defer_keys=True,
        writer_kwargs={"backend": "torch", "max_open_episodes": max_open},
    )
    numba_rb = make_buffer(
        capacity,
        defer_keys=True,
        writer_kwargs={"backend": "numba", "max_open_episodes": max_open},
    )
    numba_rb.writer.encoder.load_state_dict(torch_rb.writer.encoder.state_dict())
    return torch_rb, numba_rb


@contextlib.contextmanager
def counting_calls():
    """Counts the calls to fifo_numba.fifo_write made inside the block (a list, one per call)."""
    calls = []
    original = fifo_numba.fifo_write

    def spy(*args):
        calls.append(1)
        return original(*args)

    fifo_numba.fifo_write = spy
    try:
        yield calls
    finally:
        fifo_numba.fifo_write = original


@pytest.fixture
def count_calls():
    with counting_calls() as calls:
        yield calls


_REWARDS = {
    "halves": None,
    "normal": lambda g, n: torch.randn(n, generator=g),
    "float64": lambda g, n: torch.randn(n, generator=g, dtype=torch.float64) * 1e3,
    "float16": lambda g, n: torch.randn(n, generator=g).half(),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(write_plans(), st.sampled_from([1, 2, 4096]), st.sampled_from(sorted(_REWARDS)))
def test_same_memory_as_the_torch_writer(plan, max_open, rewards):
    capacity, batches = plan
    torch_rb, numba_rb = pair(capacity, max_open)
    with counting_calls() as calls:
        for i, (layout, envs, time, done, init, traj) in enumerate(batches):
            data, _ = plan_batch(layout, envs, time, done, init, traj, i, _REWARDS[rewards])
            index_torch = torch_rb.extend(data.clone())
            index_numba = numba_rb.extend(data.clone())
            assert_same_state(index_torch, index_numba, f"index of batch {i}")
            assert_same_state(memory_state(torch_rb), memory_state(numba_rb), f"batch {i}")
    # Every write goes through the compiled path but the first, those larger than the memory
    # and those with new entries (the first one with trajectory ids), which create columns.
    expected = 0
    for i, (layout, envs, time, *_) in enumerate(batches):
        new_entries = layout == "traj" and all(b[0] != "traj" for b in batches[:i])
        expected += i > 0 and envs * time <= capacity and not new_entries
    assert len(calls) == expected
    if len(torch_rb.storage):
        torch_rb.storage.encode_pending()
        numba_rb.storage.encode_pending()
        assert_same_state(memory_state(torch_rb), memory_state(numba_rb), "after encoding")


@pytest.mark.parametrize("max_size", [1000, 37])
def test_many_short_episodes_grow_and_recycle_the_table(max_size, count_calls):
    """More episodes than free slots: the compiled call asks for slots, and is run again."""
    torch_rb, numba_rb = pair(max_size)
    for i in range(40):
        data = make_episodes([1, 2, 1, 3] * 5, seed=i)
        assert_same_state(torch_rb.extend(data.clone()), numba_rb.extend(data.clone()))
        assert_same_state(memory_state(torch_rb), memory_state(numba_rb), f"batch {i}")
    assert numba_rb.storage.episodes.shape[0] > 256 or max_size < 256
    assert len(count_calls) >= 39


def test_non_finite_reward_is_refused_and_changes_nothing(count_calls):
    rb = make_buffer(50, defer_keys=True, writer_kwargs={"backend": "numba"})
    rb.extend(make_episodes([4, 6], seed=0))
    rb.extend(make_episodes([5], seed=1))
    before = memory_state(rb)
    bad = make_episodes([3, 4], seed=2)
    bad["next", "reward"][5] = float("nan")
    with pytest.raises(ValueError, match=r"reward .* NaN or inf"):
        rb.extend(bad)
    assert_same_state(before, memory_state(rb))
    assert len(count_calls) == 2


def test_finite_rewards_whose_sum_overflows_are_written_as_in_torch():
    torch_rb, numba_rb = pair(20)
    for seed in range(2):
        data = make_episodes([3, 2], seed=seed)
        data["next", "reward"] = torch.full((5, 1), 1e308, dtype=torch.float64)
        assert_same_state(torch_rb.extend(data.clone()), numba_rb.extend(data.clone()))
        assert_same_state(memory_state(torch_rb), memory_state(numba_rb))


def test_cases_it_does_not_cover_run_in_torch(count_calls):
    rb = make_buffer(10, defer_keys=True, writer_kwargs={"backend": "numba"})
    rb.extend(make_episodes([3], seed=0))  # the first write creates the columns: torch
    assert count_calls == []
    rb.extend(make_episodes([12], seed=1))  # larger than the memory: torch
    assert count_calls == []
    rb.extend(make_episodes([4], seed=2))
    assert count_calls == [1]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"backend": "numba"}, ValueError, "defer_keys=True"),
        ({"backend": "numba", "defer_keys": True, "forgetting": "importance"}, ValueError, "fifo"),
        (
            {"backend": "numba", "defer_keys": True, "segmenter": lambda d, s, t: s == 0},
            ValueError,
            "segmenter",
        ),
    ],
)
def test_bad_backend_is_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        HippoWriter(DualEncoder(3, 2, 8, window=2), **kwargs)


def test_backend_is_part_of_the_config():
    writer = HippoWriter(DualEncoder(3, 2, 8, window=2), defer_keys=True, backend="numba")
    assert writer.config["backend"] == "numba"
    assert HippoWriter(writer.encoder, **writer.config).backend == "numba"


@pytest.mark.parametrize(
    ("layout", "time", "done", "is_init", "traj", "first", "end"),
    [
        (fifo_numba.ONE_STREAM, 0, [0, 1, 0, 0], [], [], [0, 2], [2, 4]),
        (fifo_numba.ONE_STREAM, 0, [0, 0, 0, 0], [0, 0, 1, 0], [], [0, 2], [2, 4]),
        (fifo_numba.ENV_TIME, 2, [0, 0, 0, 0], [], [], [0, 2], [2, 4]),
        (fifo_numba.TRAJ_IDS, 0, [], [], [3, 3, 5, 5], [0, 2], [2, 4]),
        (fifo_numba.TRAJ_IDS, 0, [1, 0, 0, 0], [], [3, 3, 3, 5], [0, 1, 3], [1, 3, 4]),
    ],
)
def test_segment_bounds(layout, time, done, is_init, traj, first, end):
    got = fifo_numba.segment_bounds(
        4,
        np.array(done, dtype=np.bool_),
        np.array(is_init, dtype=np.bool_),
        np.array(traj, dtype=np.int64),
        layout,
        time,
    )
    assert [a.tolist() for a in got] == [first, end]
