"""A memory shared by processes: workers of a MultiSyncCollector, concurrent writers and a sampler."""

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_buffer, make_episodes
from torchrl.collectors import MultiSyncCollector
from torchrl.envs import GymEnv

import torchrl_hippo.envs  # noqa: F401  (registers the environments)
from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter


def check_memory(storage, *, traj_key=("collector", "traj_ids")):
    """The bookkeeping invariants of a memory, after any interleaving of writes."""
    n = len(storage)
    rows = storage.get(torch.arange(n))
    valid = storage.row_slot[:n] >= 0
    episode, step, prev = (rows["hippo", name] for name in ("episode", "step", "prev"))
    table = storage.episodes
    alive = table["rows"] > 0
    # Each stored row belongs to exactly one table slot, whose id is the row's episode id.
    slots = storage.row_slot[:n][valid]
    assert (table["id"][slots] == episode[valid]).all()
    assert torch.bincount(slots, minlength=table.shape[0]).tolist() == table["rows"].tolist()
    ids = table["id"][alive]
    assert ids.unique().numel() == ids.numel(), "two table slots hold the same episode"
    # Within an episode, the steps are consecutive and linked by "prev".
    for ep in episode[valid].unique().tolist():
        mine = (episode == ep).nonzero().squeeze(1)
        order = mine[step[mine].argsort()]
        steps = step[order]
        assert (steps.diff() == 1).all(), f"episode {ep} has gaps: {steps.tolist()}"
        assert (prev[order[1:]] == order[:-1]).all()
        if traj_key is not None and traj_key in rows.keys(True):
            assert rows[traj_key][mine].unique().numel() == 1, f"episode {ep} mixes trajectories"
    if traj_key is not None and traj_key in rows.keys(True):
        traj = rows[traj_key][valid]
        for t in traj.unique().tolist():
            assert episode[valid][traj == t].unique().numel() == 1, f"trajectory {t} split"
    return rows


def corridor():
    return GymEnv("hippo/Corridor-ZeroNoise-v0", length=6)


@pytest.mark.slow
def test_multisync_collector_workers_share_one_memory():
    env = corridor()
    encoder = DualEncoder(
        env.observation_spec["observation"].shape[-1],
        env.action_spec.shape[-1],
        16,
        window=4,
        hidden_dim=32,
    )
    env.close()
    rb_kwargs = {"storage": HippoStorage(5000), "sampler": HippoSampler(top_k=3)}
    from torchrl.data import TensorDictReplayBuffer

    rb = TensorDictReplayBuffer(writer=HippoWriter(encoder), batch_size=32, **rb_kwargs)
    collector = MultiSyncCollector(
        [corridor, corridor], frames_per_batch=120, total_frames=600, replay_buffer=rb
    )
    try:
        for _ in collector:
            pass
    finally:
        collector.shutdown()
    storage = rb.storage
    assert storage.is_shared
    assert len(rb) == rb.write_count == 600
    rows = check_memory(storage)
    # Every finished episode is whole: as long as its trajectory, and marked done.
    done = rows["next", "done"].squeeze(-1)
    finished = rows["hippo", "episode"][done].unique()
    table = storage.episodes
    for ep in finished.tolist():
        slot = int((table["id"] == ep).nonzero())
        assert bool(table["done"][slot])
        assert int(table["length"][slot]) == int((rows["hippo", "episode"] == ep).sum())
    batch = rb.sample()
    assert torch.isfinite(batch["priority_weight"]).all()


def _writer(rb, worker, batches, barrier):
    barrier.wait()
    for b in range(batches):
        # Episodes of 5..11 steps, cut into batches of 7 rows: most span two batches.
        lengths = [5 + (worker + b + i) % 7 for i in range(3)]
        data = make_episodes(lengths, seed=100 * worker + b)
        # A stream per worker; its trajectory ids are unique across workers.
        traj = torch.zeros(data.shape[0], dtype=torch.int64)
        traj[data["is_init"].squeeze(-1).nonzero().squeeze(1)] = 1
        data["collector", "traj_ids"] = traj.cumsum(0) + 1000 * worker + 10 * b
        for start in range(0, data.shape[0], 7):
            rb.extend(data[start : start + 7])


def _sampler(rb, draws, barrier, out):
    barrier.wait()
    bad = 0
    for _ in range(draws):
        try:
            batch = rb.sample()
        except RuntimeError:  # the memory may still be empty
            continue
        index = batch["index"]
        bad += int((index < 0).sum() + (index >= rb.storage.max_size).sum())
        bad += int((~torch.isfinite(batch["priority_weight"])).sum())
    out.put(bad)


@pytest.mark.slow
@pytest.mark.parametrize("defer_keys", [False, True])
def test_two_writers_and_a_sampler_in_three_processes(defer_keys):
    rb = make_buffer(400, defer_keys=defer_keys, mixture_ratio=0.5)
    rb.extend(make_episodes([3]))  # the rows' layout must be known before sharing
    rb.share()  # TorchRL's write lock; the storage shares itself when sent to the processes
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(rb, w, 6, barrier)) for w in (1, 2)]
    procs.append(ctx.Process(target=_sampler, args=(rb, 30, barrier, out)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    assert out.get(timeout=10) == 0
    # Both workers' rows (6 batches x 3 episodes each) plus the first 3 fit the memory.
    total = 3 + sum(sum(5 + (w + b + i) % 7 for i in range(3)) for w in (1, 2) for b in range(6))
    assert rb.write_count == len(rb) == total
    rows = check_memory(rb.storage)
    assert rb.storage.num_episodes == 1 + 2 * 6 * 3
    if defer_keys:
        rb.storage.encode_pending()
    keys = rb.storage.get(torch.arange(total))["hippo", "key"]
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(total))
    assert (rows["hippo", "key_version"] >= 0).all() or defer_keys


def test_share_memory_needs_data_and_keeps_state():
    rb = make_buffer(50)
    with pytest.raises(RuntimeError, match="empty HippoStorage"):
        rb.storage.share_memory_()
    data = make_episodes([4, 6])
    rb.extend(data[:7])  # the second episode stays open
    before = rb.storage.open_episodes.clone()
    rb.storage.share_memory_()
    assert rb.storage.is_shared and rb.storage.episodes.is_shared()
    assert (rb.storage.open_episodes == before).all()
    rb.extend(data[7:])  # stitched through the shared copy
    rows = check_memory(rb.storage)
    assert rows["hippo", "step"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    rb.empty()
    assert len(rb) == 0 and rb.storage.num_episodes == 0 and rb.storage.is_shared
    rb.extend(data)
    check_memory(rb.storage)
    assert rb.write_count == 10


def test_a_pickled_copy_is_private():
    import pickle

    rb = make_buffer(50)
    rb.extend(make_episodes([4, 6])[:7])
    rb.storage.share_memory_()
    copy = pickle.loads(pickle.dumps(rb.storage))
    assert not copy.is_shared
    assert (copy.open_episodes == rb.storage.open_episodes).all()
    assert copy.clock == rb.storage.clock == 7
