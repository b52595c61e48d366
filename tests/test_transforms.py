"""MemoryRetrieval: specs, exact retrieval from per-env windows, resets, collectors, errors."""

import functools

import pytest
import torch
from conftest import make_buffer
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.data import TensorDictReplayBuffer
from torchrl.envs import Compose, GymEnv, SerialEnv, StepCounter, TransformedEnv
from torchrl.envs.utils import check_env_specs

from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
from torchrl_hippo.envs.transforms import MemoryRetrieval
from torchrl_hippo.query import memory_query

EMBED, WINDOW = 16, 4


def cartpole_memory(capacity=2_000):
    encoder = DualEncoder(4, 2, EMBED, window=WINDOW, hidden_dim=32)
    return TensorDictReplayBuffer(
        storage=HippoStorage(capacity),
        writer=HippoWriter(encoder),
        sampler=HippoSampler(top_k=3),
        batch_size=16,
    )


def make_env(batch, memory, max_steps=None, **kwargs):
    base = (
        GymEnv("CartPole-v1")
        if batch is None
        else SerialEnv(batch, functools.partial(GymEnv, "CartPole-v1"))
    )
    transforms = [StepCounter(max_steps)] if max_steps else []
    env = TransformedEnv(base, Compose(*transforms, MemoryRetrieval(memory, **kwargs)))
    env.set_seed(0)
    return env


def fill(memory, frames=200):
    env = TransformedEnv(GymEnv("CartPole-v1"), StepCounter(25))
    env.set_seed(1)
    memory.extend(env.rollout(frames, break_when_any_done=False))


@pytest.mark.parametrize("batch", [None, 2], ids=["batch[]", "batch[2]"])
@pytest.mark.parametrize("filled", [False, True], ids=["empty", "filled"])
@pytest.mark.parametrize("include_returns", [False, True], ids=["", "returns"])
def test_specs(batch, filled, include_returns):
    memory = cartpole_memory()
    if filled:
        fill(memory)
    env = make_env(batch, memory, k=3, include_returns=include_returns)
    check_env_specs(env)
    shape = () if batch is None else (batch,)
    spec = env.observation_spec["retrieval"]
    assert spec["key"].shape == (*shape, 3, EMBED) and spec["key"].dtype == torch.float32
    assert spec["score"].shape == (*shape, 3) and spec["score"].dtype == torch.float32
    assert spec["mask"].shape == (*shape, 3) and spec["mask"].dtype == torch.bool
    assert ("return" in spec.keys()) == include_returns
    td = env.rollout(4)
    assert td["next", "retrieval", "mask"].all() == filled
    assert not td["retrieval", "mask"][..., 0, :].any()  # the reset step queries nothing


def reference_windows(data, window):
    """For every step of a [T] rollout: the window of this episode's transitions up to it."""
    time = data.shape[0]
    done = data["next", "done"].reshape(time)
    obs = torch.zeros(time, window, *data["observation"].shape[1:])
    action = torch.zeros(time, window, *data["action"].shape[1:], dtype=data["action"].dtype)
    reward = torch.zeros(time, window, 1)
    mask = torch.zeros(time, window, dtype=torch.bool)
    start = 0
    for t in range(time):
        if t and done[t - 1]:
            start = t
        first = max(start, t - window + 1)
        n = t - first + 1
        obs[t, -n:] = data["observation"][first : t + 1]
        action[t, -n:] = data["action"][first : t + 1]
        reward[t, -n:] = data["next", "reward"][first : t + 1]
        mask[t, -n:] = True
    return obs, action, reward, mask


def capped_cartpole(max_steps):
    return TransformedEnv(GymEnv("CartPole-v1"), StepCounter(max_steps))


@pytest.mark.parametrize("batch", [None, 3], ids=["batch[]", "batch[3]"])
def test_retrieval_is_exact_across_resets(batch):
    memory = cartpole_memory()
    fill(memory, 300)
    encoder = memory.writer.encoder
    retrieval = MemoryRetrieval(memory, k=5, include_returns=True)
    if batch is None:
        env = TransformedEnv(GymEnv("CartPole-v1"), Compose(StepCounter(6), retrieval))
    else:  # episodes of different lengths: the envs are reset at different steps
        makers = [functools.partial(capped_cartpole, 5 + i) for i in range(batch)]
        env = TransformedEnv(SerialEnv(batch, makers), retrieval)
    env.set_seed(0)
    data = env.rollout(40, break_when_any_done=False)
    if batch is not None:
        done = data["next", "done"].squeeze(-1)
        assert (done.any(0) & ~done.all(0)).sum() >= 4  # partial resets
    rows = [data] if batch is None else list(data.unbind(0))
    access = memory.storage.episodes["access"].clone()
    for td in rows:
        done = td["next", "done"].reshape(-1)
        assert done[:-1].sum() >= 4  # several (partial) resets happened
        windows = reference_windows(td, WINDOW)
        with torch.no_grad():
            queries = encoder.encode(*windows, target=False)
        expected = memory_query(memory, queries, 5)
        out = td["next", "retrieval"]
        torch.testing.assert_close(out["key"], expected["hippo", "key"])
        torch.testing.assert_close(out["score"], expected["hippo", "similarity"])
        torch.testing.assert_close(out["return"], expected["hippo", "return"])
        assert out["mask"].all()
        # The observation at t carries what was retrieved after step t - 1; nothing at a reset.
        start = torch.cat([torch.ones(1, dtype=torch.bool), done[:-1]])
        assert not td["retrieval", "mask"][start].any()
        torch.testing.assert_close(
            td["retrieval", "key"][1:][~start[1:]], out["key"][:-1][~start[1:]]
        )
    assert torch.equal(memory.storage.episodes["access"], access)  # read-only


def test_fewer_rows_than_k_are_masked():
    memory = cartpole_memory()
    env = TransformedEnv(GymEnv("CartPole-v1"), MemoryRetrieval(memory, k=4))
    env.set_seed(0)
    memory.extend(env.rollout(2, break_when_any_done=False))
    assert len(memory) == 2
    out = env.rollout(3)["next", "retrieval"]
    assert out["mask"].tolist() == [[True, True, False, False]] * 3
    assert (out["key"][:, 2:] == 0).all() and (out["score"][:, 2:] == 0).all()
    torch.testing.assert_close(out["key"][:, :2].norm(dim=-1), torch.ones(3, 2))


def test_collector_with_a_live_memory():
    memory = cartpole_memory()
    env = make_env(2, memory, k=3)
    collector = Collector(env, policy=None, frames_per_batch=40, total_frames=120)
    masks = []
    for batch in collector:
        assert batch["next", "retrieval", "key"].shape == (*batch.shape, 3, EMBED)
        masks.append(batch["next", "retrieval", "mask"].all().item())
        memory.extend(batch)  # the writer stores the retrieval entries as extra columns
    collector.shutdown()
    assert masks == [False, True, True]  # empty at first, then the memory is read live
    assert len(memory) == 120
    assert memory.storage.get(torch.arange(3))["retrieval", "mask"].shape == (3, 3)


def test_defer_keys_memory_is_encoded_on_query():
    encoder = DualEncoder(4, 2, EMBED, window=WINDOW, hidden_dim=32)
    memory = TensorDictReplayBuffer(
        storage=HippoStorage(1_000), writer=HippoWriter(encoder, defer_keys=True)
    )
    fill(memory, 50)
    env = make_env(None, memory, k=2)
    assert memory.storage.has_pending_keys
    assert env.rollout(3)["next", "retrieval", "mask"].all()
    assert not memory.storage.has_pending_keys
    fill(memory, 10)
    env_skip = make_env(None, memory, k=2, encode_pending=False)
    env_skip.rollout(3)
    assert memory.storage.has_pending_keys  # skipped, not encoded


def test_errors():
    memory = cartpole_memory()
    with pytest.raises(ValueError, match="k must be a positive int"):
        MemoryRetrieval(memory, k=0)
    with pytest.raises(ValueError, match="reserves"):
        MemoryRetrieval(memory, out_key=("hippo", "recall"))
    with pytest.raises(TypeError, match="HippoStorage"):
        MemoryRetrieval(object())
    with pytest.raises(ValueError, match="encoder"):
        MemoryRetrieval(HippoStorage(10))
    fill(memory, 10)
    with pytest.raises(ValueError, match="embed_dim=8"):
        MemoryRetrieval(memory, encoder=DualEncoder(4, 2, 8, window=WINDOW))
    transform = MemoryRetrieval(memory)
    with pytest.raises(NotImplementedError, match="memory_query"):
        transform(TensorDict({"observation": torch.zeros(4)}))
    env = make_env(None, memory, action_key="not_there")
    with pytest.raises(KeyError, match="not_there"):
        env.rollout(2)


def test_repr_and_keys():
    transform = MemoryRetrieval(make_buffer(obs_dim=4), k=2, out_key=("memory", "recall"))
    assert transform.out_keys == [
        ("memory", "recall", "key"),
        ("memory", "recall", "score"),
        ("memory", "recall", "mask"),
    ]
    assert "k=2" in repr(transform)
    assert transform.in_keys == ["observation", "action", "reward"]
