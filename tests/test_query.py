"""memory_query: exact top-k against brute force, valid and pending rows, read-only, errors."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_buffer, make_episodes
from tensordict import TensorDict
from torch import nn
from torchrl.data import TensorDictReplayBuffer

from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
from torchrl_hippo.query import memory_query
from torchrl_hippo.search import available_backends

EMBED = 16


def filled(capacity=200, lengths=(20,) * 10, *, key_dtype=torch.float32, **writer_kwargs):
    encoder = DualEncoder(3, 2, EMBED, window=4, hidden_dim=32)
    rb = TensorDictReplayBuffer(
        storage=HippoStorage(capacity, key_dtype=key_dtype),
        writer=HippoWriter(encoder, **writer_kwargs),
        sampler=HippoSampler(top_k=3),
        batch_size=16,
    )
    rb.extend(make_episodes(list(lengths)))
    return rb


def brute_force(storage, queries, k):
    """The reference: torch.topk over the valid rows' keys, mapped back to storage rows."""
    valid = storage.valid_mask().nonzero().squeeze(1)
    keys = storage.keys[valid].float()
    scores, pos = torch.topk(F.normalize(queries.float(), dim=-1) @ keys.T, k, dim=-1)
    return scores, valid[pos]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch_shape", [(), (5,), (2, 3)], ids=["[]", "[5]", "[2,3]"])
def test_matches_brute_force_topk(backend, key_dtype, batch_shape):
    rb = filled(key_dtype=key_dtype)
    queries = torch.randn(*batch_shape, EMBED)
    out = memory_query(rb, queries, 7, backend=backend)
    assert out.batch_size == (*batch_shape, 7)
    scores, rows = brute_force(rb.storage, queries.reshape(-1, EMBED), 7)
    assert out["index"].reshape(-1, 7).tolist() == rows.tolist()
    # The Triton kernel computes in the keys' dtype (queries rounded to fp16 too).
    tol = {"atol": 2e-3, "rtol": 2e-3} if key_dtype == torch.float16 else {}
    torch.testing.assert_close(out["hippo", "similarity"].reshape(-1, 7), scores, **tol)
    assert (out["hippo", "similarity"][..., :-1] >= out["hippo", "similarity"][..., 1:]).all()


def test_evicted_rows_are_never_returned():
    rb = filled(100, lengths=(10,) * 10, forgetting="importance", evict_fraction=0.3)
    rb.extend(make_episodes([4], seed=2))  # evicts at least 30 rows, reuses 4
    storage = rb.storage
    assert storage.num_free_rows > 0
    valid = storage.num_valid
    queries = torch.randn(32, EMBED)
    out = memory_query(rb, queries, valid)  # every valid row, in order
    assert set(out["index"][0].tolist()) == set(storage.valid_mask().nonzero().view(-1).tolist())
    _, rows = brute_force(storage, queries, 10)
    assert out["index"][:, :10].tolist() == rows.tolist()
    with pytest.raises(ValueError, match=f"k={valid + 1} is larger than .* \\({valid}\\)"):
        memory_query(rb, queries, valid + 1)


def test_stored_keys_find_their_own_rows():
    rb = filled()
    rows = torch.tensor([0, 17, 123, 199])
    out = memory_query(rb, rb.storage.keys[rows], 3)
    assert out["index"][:, 0].tolist() == rows.tolist()
    torch.testing.assert_close(out["hippo", "similarity"][:, 0], torch.ones(4))


def test_rows_and_entries():
    rb = filled(lengths=(20,) * 10)
    queries = torch.randn(3, EMBED)
    out = memory_query(rb, queries, 5, temperature=0.5)
    stored = rb.storage.get(out["index"].reshape(-1)).reshape(3, 5)
    for key in stored.keys(True, True):
        torch.testing.assert_close(out[key], stored[key])
    assert out["observation"].shape == (3, 5, 3)
    # The final return of each (finished) episode, from the episode table.
    table = rb.storage.episodes
    slots = rb.storage.row_slot[out["index"]]
    torch.testing.assert_close(out["hippo", "return"], table["return"][slots])
    attention = torch.softmax(out["hippo", "similarity"] / 0.5, dim=-1)
    torch.testing.assert_close(out["hippo", "attention"], attention)
    torch.testing.assert_close(out["hippo", "attention"].sum(-1), torch.ones(3))

    light = memory_query(rb, queries, 5, rows=False)
    assert "observation" not in light.keys() and ("next", "reward") not in light.keys(True)
    for key in [("hippo", "key"), ("hippo", "episode"), ("hippo", "step"), ("hippo", "return")]:
        torch.testing.assert_close(light[key], out[key])
    assert light["index"].tolist() == out["index"].tolist()


def test_query_is_read_only():
    rb = filled()
    storage, sampler = rb.storage, rb.sampler
    rb.sample()  # builds the sampler's pool, counts accesses
    access = storage.episodes["access"].clone()
    keys, versions = storage.keys.clone(), storage._storage["hippo", "key_version"].clone()
    revision, mutation = storage.key_revision, storage._mutation_revision
    pool, rng_state = sampler._pool, torch.random.get_rng_state()
    windows = storage.gather_windows(torch.arange(10), 4)
    for query in (torch.randn(4, EMBED), rb.sample(), windows):
        access = storage.episodes["access"].clone()
        rng_state = torch.random.get_rng_state()
        memory_query(rb, query, 3)
        assert torch.equal(storage.episodes["access"], access)
        assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert torch.equal(storage.keys, keys)
    assert torch.equal(storage._storage["hippo", "key_version"], versions)
    assert (storage.key_revision, storage._mutation_revision) == (revision, mutation)
    assert sampler._pool is pool
    assert windows.get(("hippo", "key"), None) is None  # the caller's windows are untouched


class _Noisy(nn.Module):
    """An observation encoder with dropout and batch norm: train mode would change both."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5))

    def forward(self, x):
        return self.net(x)


def test_windows_use_the_online_network_in_eval_mode():
    encoder = DualEncoder(3, 2, EMBED, window=4, hidden_dim=32, observation_encoder=_Noisy())
    rb = TensorDictReplayBuffer(storage=HippoStorage(200), writer=HippoWriter(encoder))
    rb.extend(make_episodes([20] * 10))
    with torch.no_grad():  # online and target now differ
        for p in encoder.online.parameters():
            p.add_(0.3 * torch.randn_like(p))
    encoder.train()
    stats = encoder.online.observation_encoder.net[1].running_mean.clone()
    windows = rb.storage.gather_windows(torch.tensor([3, 50, 170]), 4)
    first = memory_query(rb, windows, 5)
    second = memory_query(rb, windows, 5)
    torch.testing.assert_close(first["hippo", "similarity"], second["hippo", "similarity"])
    assert encoder.training and encoder.online.observation_encoder.net[2].training
    assert torch.equal(encoder.online.observation_encoder.net[1].running_mean, stats)

    encoder.eval()
    online = encoder.encode(
        windows["observation"],
        windows["action"],
        windows["next", "reward"],
        windows["hippo", "window_mask"],
        target=False,
    )
    target = encoder.encode(
        windows["observation"],
        windows["action"],
        windows["next", "reward"],
        windows["hippo", "window_mask"],
        target=True,
    )
    by_online = memory_query(rb, online, 5)
    assert first["index"].tolist() == by_online["index"].tolist()
    torch.testing.assert_close(first["hippo", "similarity"], by_online["hippo", "similarity"])
    by_target = memory_query(rb, target, 5)
    assert not torch.allclose(first["hippo", "similarity"], by_target["hippo", "similarity"])


def test_tensordict_with_keys_uses_them():
    rb = filled()
    batch = rb.sample()
    out = memory_query(rb, batch, 2)
    assert out.batch_size == (16, 2)
    assert out["index"][:, 0].tolist() == batch["index"].tolist()


def test_deferred_keys_are_encoded_first():
    eager, deferred = filled(), filled(defer_keys=True)
    deferred.writer.encoder.load_state_dict(eager.writer.encoder.state_dict())
    queries = torch.randn(4, EMBED)
    assert deferred.storage.has_pending_keys
    out = memory_query(deferred, queries, 5)
    assert not deferred.storage.has_pending_keys
    torch.testing.assert_close(deferred.storage.keys, eager.storage.keys)
    assert deferred.storage.key_revision == eager.storage.key_revision
    assert out["index"].tolist() == memory_query(eager, queries, 5)["index"].tolist()
    assert out["index"].tolist() == brute_force(deferred.storage, queries, 5)[1].tolist()


def test_pending_rows_are_skipped_without_encoding():
    rb = filled(400, lengths=(20,) * 10, defer_keys=True)
    with pytest.raises(RuntimeError, match="every row waits for a deferred key"):
        memory_query(rb, torch.randn(EMBED), 1, encode_pending=False)
    rb.storage.encode_pending()
    rb.extend(make_episodes([20] * 5, seed=1))  # rows 200..299 wait for their keys
    queries = torch.randn(8, EMBED)
    out = memory_query(rb, queries, 200, encode_pending=False)
    assert sorted(out["index"][0].tolist()) == list(range(200))
    assert rb.storage.has_pending_keys
    with pytest.raises(ValueError, match="k=201"):
        memory_query(rb, queries, 201, encode_pending=False)


@pytest.mark.parametrize(
    ("query", "k", "kwargs", "error", "match"),
    [
        (torch.randn(2, EMBED + 1), 3, {}, ValueError, "embed_dim=16"),
        (torch.randn(2, EMBED).long(), 3, {}, TypeError, "floating point"),
        (torch.full((2, EMBED), float("nan")), 3, {}, ValueError, "NaN"),
        (torch.zeros(2, EMBED), 3, {}, ValueError, "all-zero"),
        (torch.randn(EMBED), 0, {}, ValueError, "k must be a positive int"),
        (torch.randn(EMBED), True, {}, ValueError, "k must be a positive int"),
        (torch.randn(EMBED), 201, {}, ValueError, "k=201 is larger"),
        (torch.randn(EMBED), 3, {"temperature": 0.0}, ValueError, "temperature"),
        ([0.0] * EMBED, 3, {}, TypeError, "Tensor of embeddings or a TensorDict"),
        (
            TensorDict({("hippo", "key"): torch.randn(2, 5)}, batch_size=[2]),
            3,
            {},
            ValueError,
            "embed_dim=16",
        ),
    ],
    ids=[
        "dim",
        "dtype",
        "nan",
        "zero",
        "k0",
        "kbool",
        "k_too_large",
        "temperature",
        "list",
        "td_key_dim",
    ],
)
def test_bad_input(query, k, kwargs, error, match):
    rb = filled()
    with pytest.raises(error, match=match):
        memory_query(rb, query, k, **kwargs)


def test_bad_memory_and_encoder():
    with pytest.raises(TypeError, match="HippoStorage"):
        memory_query([1, 2], torch.randn(EMBED), 1)
    empty = make_buffer()
    with pytest.raises(RuntimeError, match="empty"):
        memory_query(empty, torch.randn(EMBED), 1)
    rb = filled()
    windows = rb.storage.gather_windows(torch.arange(2), 4)
    with pytest.raises(ValueError, match="embed_dim=8"):
        memory_query(rb, windows, 1, encoder=DualEncoder(3, 2, 8, window=4))
    rb.storage.encoder = None
    with pytest.raises(ValueError, match="no encoder"):
        memory_query(rb, windows, 1)
    with pytest.raises(KeyError, match="action"):
        memory_query(rb, windows.exclude("action"), 1, encoder=rb.writer.encoder)
