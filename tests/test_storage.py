"""HippoStorage: lazy initialisation, episode table, devices and lossless round trips."""

import pickle

import pytest
import torch
from conftest import make_buffer, make_episodes
from tensordict import TensorDict
from torchrl.data import TensorStorage

from torchrl_hippo import HippoStorage

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def assert_tree_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_tree_equal(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a.cpu(), b.cpu(), equal_nan=True, rtol=0, atol=0)
    else:
        assert a == b


def full_state(rb):
    return {
        "storage": rb.storage.state_dict(),
        "writer": rb.writer.state_dict(),
        "sampler": rb.sampler.state_dict(),
    }


def test_is_a_lazy_tensor_storage():
    storage = HippoStorage(10)
    assert isinstance(storage, TensorStorage)
    assert not storage.initialized
    assert storage.embed_dim is None
    assert len(storage) == 0 and storage.num_episodes == 0
    rb = make_buffer(10)
    rb.extend(make_episodes([3]))
    assert rb.storage.initialized and rb.storage.embed_dim == 16


@pytest.mark.parametrize("max_size", [0, -3, 2.5, True])
def test_bad_capacity(max_size):
    with pytest.raises(ValueError, match="max_size must be a positive integer"):
        HippoStorage(max_size)


def test_bad_key_dtype():
    with pytest.raises(TypeError, match="key_dtype"):
        HippoStorage(10, key_dtype=torch.int64)


@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_key_dtype(key_dtype):
    from torchrl.data import TensorDictReplayBuffer

    from torchrl_hippo import DualEncoder, HippoSampler, HippoWriter

    rb = TensorDictReplayBuffer(
        storage=HippoStorage(50, key_dtype=key_dtype),
        writer=HippoWriter(DualEncoder(3, 2, 16, window=4)),
        sampler=HippoSampler(top_k=2),
        batch_size=8,
    )
    rb.extend(make_episodes([10, 10]))
    assert rb.storage.keys.dtype == key_dtype
    assert rb.sample()["hippo", "key"].dtype == key_dtype


@pytest.mark.parametrize("device", DEVICES)
def test_rows_and_table_live_on_the_storage_device(device):
    from torchrl.data import TensorDictReplayBuffer

    from torchrl_hippo import DualEncoder, HippoSampler, HippoWriter

    rb = TensorDictReplayBuffer(
        storage=HippoStorage(50, device=device),
        writer=HippoWriter(DualEncoder(3, 2, 16, window=4).to(device)),
        sampler=HippoSampler(top_k=2),
        batch_size=8,
    )
    rb.extend(make_episodes([10, 10]).to(device))
    batch = rb.sample()
    assert batch.device.type == device
    assert rb.storage.episodes.device.type == device
    assert rb.storage.row_slot.device.type == device


def test_reads_serve_the_episode_table_return():
    rb = make_buffer(20)
    data = make_episodes([8], reward=2.0)
    rb.extend(data[:3])
    assert rb.storage.get(torch.tensor([0, 2]))["hippo", "return"].tolist() == [6.0, 6.0]
    rb.extend(data[3:])
    assert rb.storage.get(torch.tensor([0, 2]))["hippo", "return"].tolist() == [16.0, 16.0]
    assert rb.storage.get(1)["hippo", "return"].item() == 16.0
    assert rb[:]["hippo", "return"].eq(16.0).all()


@pytest.mark.parametrize("forgetting", ["fifo", "importance"])
@pytest.mark.parametrize("how", ["state_dict", "dumps", "pickle"])
def test_round_trip_loses_nothing(forgetting, how, tmp_path):
    data = make_episodes([7, 9, 4, 12, 6], reward=[1.0, 2.0, 3.0, 4.0, 5.0])
    rb = make_buffer(25, forgetting=forgetting)
    rb.extend(data[:30])  # wraps/evicts, leaves an episode open
    rb.sample()
    before = full_state(rb)
    if how == "pickle":
        other = pickle.loads(pickle.dumps(rb))
    else:
        other = make_buffer(25, forgetting=forgetting)
        other.writer.encoder.load_state_dict(rb.writer.encoder.state_dict())
        if how == "state_dict":
            other.load_state_dict(rb.state_dict())
        else:
            rb.dumps(tmp_path / "memory")
            other.loads(tmp_path / "memory")
    assert_tree_equal(before, full_state(other))
    # Both continue identically: stitching, bookkeeping and sampling.
    rb.extend(data[30:])
    other.extend(data[30:])
    assert_tree_equal(full_state(rb), full_state(other))
    torch.manual_seed(0)
    a = rb.sample()
    torch.manual_seed(0)
    b = other.sample()
    assert_tree_equal(a.to_dict(), b.to_dict())  # nan similarities included


def test_round_trip_of_an_empty_memory(tmp_path):
    rb = make_buffer(10)
    rb.dumps(tmp_path / "empty")
    other = make_buffer(10)
    other.loads(tmp_path / "empty")
    assert len(other) == 0
    other.extend(make_episodes([3]))
    assert len(other) == 3
    fresh = HippoStorage(10)
    fresh.load_state_dict(HippoStorage(10).state_dict())
    assert not fresh.initialized


def test_load_state_dict_rejects_foreign_state():
    from torchrl.data import LazyTensorStorage

    other = LazyTensorStorage(10)
    other.set(torch.arange(2), TensorDict({"a": torch.ones(2)}, [2]))
    with pytest.raises(KeyError, match="not made by a HippoStorage"):
        HippoStorage(10).load_state_dict(other.state_dict())


def test_empty_resets_everything():
    rb = make_buffer(20)
    rb.extend(make_episodes([5, 5]))
    rb.empty()
    assert len(rb) == 0 and rb.storage.num_episodes == 0
    assert rb.writer._write_count == 0
    rb.extend(make_episodes([3]))
    assert rb.storage.get(torch.arange(3))["hippo", "episode"].tolist() == [0, 0, 0]


def test_episode_table_fields():
    rb = make_buffer(50)
    rb.extend(make_episodes([4, 6], reward=[1.0, 0.5]))
    table = rb.storage.episodes
    live = table["rows"] > 0
    assert table["id"][live].tolist() == [0, 1]
    assert table["return"][live].tolist() == [4.0, 3.0]
    assert table["length"][live].tolist() == [4, 6]
    assert table["inserted"][live].tolist() == [0, 4]
    assert table["updated"][live].tolist() == [3, 9]
    assert table["access"][live].tolist() == [0, 0]
    assert repr(rb.storage).startswith("HippoStorage(max_size=50, len=10, episodes=2")


def test_rows_waiting_for_their_key_never_show_the_key_they_replaced():
    """A deferred write leaves the key column alone: reads give those rows a zero key, and
    searches skip them (or encode them first)."""
    from torchrl_hippo import memory_query

    rb = make_buffer(6, defer_keys=True, mixture_ratio=0.0, batch_size=64)
    rb.extend(make_episodes([6]))
    rb.storage.encode_pending()
    replaced = rb.storage.keys[:3].clone()
    rb.extend(make_episodes([3], seed=1))  # rows 0..2 again, keys deferred
    torch.manual_seed(0)
    batch = rb.sample()  # uniform draws read rows through HippoStorage.get
    pending = batch["hippo", "key_version"] == -1
    assert pending.any() and (~pending).any()
    assert (batch["hippo", "key"][pending] == 0).all()
    assert (batch["hippo", "key"][~pending].norm(dim=-1) > 0.99).all()
    found = memory_query(rb, replaced, k=3, encode_pending=False)
    assert not set(found["index"].flatten().tolist()) & {0, 1, 2}
    assert rb.storage.has_pending_keys
    found = memory_query(rb, replaced, k=3)  # encodes them first
    assert not rb.storage.has_pending_keys
    assert (rb.storage.get(torch.arange(3))["hippo", "key_version"] >= 0).all()
    assert found["hippo", "key"].norm(dim=-1).gt(0.99).all()


def _dead_slots(table):
    return ((table["id"] >= 0) & (table["rows"] == 0) & table["done"]).nonzero().squeeze(1)


def test_overwritten_episodes_are_reclaimed_in_bulk():
    """Slots of episodes whose rows were all overwritten wait (as dead slots, read as no
    episode) until reclaimed; reclaiming frees exactly them."""
    rb = make_buffer(10)
    rb.extend(make_episodes([3, 3, 4]))
    rb.extend(make_episodes([4, 2], seed=1))  # overwrites the first two episodes
    storage = rb.storage
    table = storage.episodes
    dead = _dead_slots(table)
    assert sorted(table["id"][dead].tolist()) == [0, 1]
    assert storage.num_episodes == 3  # dead slots are no stored episode
    free_before = storage._num_free_slots
    assert storage.reclaim_slots() == 2
    assert storage._num_free_slots == free_before + 2
    assert not _dead_slots(table).numel()
    assert (table["id"][dead] == -1).all() and (table["access"][dead] == 0).all()
    assert storage.num_episodes == 3
    assert storage.reclaim_slots() == 0  # nothing left to do
    # Reclaimed slots are handed out again to new episodes.
    rb.extend(make_episodes([1, 1], seed=2))
    assert sorted(table["id"][dead].tolist()) == [5, 6]


def test_a_long_run_keeps_the_episode_table_bounded():
    """Dead slots are recycled as writes go on: the table does not grow with the stream."""
    rb = make_buffer(32)
    for seed in range(200):
        rb.extend(make_episodes([2, 3, 1, 2], seed=seed))
    storage = rb.storage
    assert storage.episodes.shape[0] == 256  # the table's first size, never grown
    live = int((storage.episodes["rows"] > 0).sum())
    dead = _dead_slots(storage.episodes).numel()
    assert live == storage.num_episodes <= 32
    assert live + dead + storage._num_free_slots == 256


def test_saved_state_holds_no_dead_slot():
    rb = make_buffer(10)
    rb.extend(make_episodes([3, 3, 4]))
    rb.extend(make_episodes([4, 2], seed=1))
    assert _dead_slots(rb.storage.episodes).numel() == 2
    state = rb.storage.state_dict()["hippo"]
    table = TensorDict(state["episodes"], batch_size=[])
    assert not _dead_slots(table).numel()


@pytest.mark.parametrize(
    "index",
    [
        torch.tensor([3, 0, 7, 7, 19]),  # 1-D int64 rows: the index_select path
        torch.tensor([[1, 2], [3, 4]]),  # other shapes: TensorStorage.get
        slice(2, 9),
        5,
        torch.tensor([-1, 2]),  # negative rows are left to TensorDict indexing
    ],
    ids=["rows", "2d", "slice", "int", "negative"],
)
def test_get_matches_tensordict_indexing(index):
    rb = make_buffer(20)
    rb.extend(make_episodes([8, 14]))  # wraps: rows 0, 1 rewritten
    storage = rb.storage
    out = storage.get(index)
    ref = storage._storage[: len(storage)][index]
    torch.testing.assert_close(out.exclude(("hippo", "return")), ref.exclude(("hippo", "return")))
    assert out.batch_size == ref.batch_size


def test_refresh_keys_updates_given_rows_only():
    rb = make_buffer(30)
    rb.extend(make_episodes([12, 9]))
    storage, encoder = rb.storage, rb.writer.encoder
    before = storage.keys.clone()
    revision = storage.key_revision
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(0.05 * torch.randn_like(param))
    encoder.update_target(momentum=0.0)  # target := online, version 1
    rows = torch.tensor([2, 5, 20])
    assert storage.refresh_keys(rows) == 3
    versions = storage.get(torch.arange(21))["hippo", "key_version"]
    assert versions[rows].tolist() == [1, 1, 1]
    assert (versions.sum() - 3) == 0
    others = torch.ones(21, dtype=torch.bool)
    others[rows] = False
    torch.testing.assert_close(storage.keys[others], before[others], rtol=0, atol=0)
    assert not torch.allclose(storage.keys[rows], before[rows])
    windows = storage.gather_windows(rows, encoder.window)
    with torch.no_grad():
        expected = encoder(windows, target=True)["hippo", "key"]
    torch.testing.assert_close(storage.keys[rows], expected)
    assert storage.key_revision == revision + 1
    with pytest.raises(IndexError, match="rows must lie in"):
        storage.refresh_keys(torch.tensor([25]))


def test_refresh_keys_refuses_non_finite_keys_and_skips_empty_refreshes():
    rb = make_buffer(30)
    rb.extend(make_episodes([12, 9]))
    storage, encoder = rb.storage, rb.writer.encoder
    before = storage.keys.clone()
    revision = storage.key_revision
    assert storage.refresh_keys(torch.empty(0, dtype=torch.int64)) == 0
    assert storage.key_revision == revision
    with torch.no_grad():
        next(encoder.parameters()).fill_(float("nan"))
    encoder.update_target(momentum=0.0)
    with pytest.raises(FloatingPointError, match="NaN or inf keys"):
        storage.refresh_keys()
    torch.testing.assert_close(storage.keys, before, rtol=0, atol=0)
