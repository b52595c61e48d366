"""Test-session setup: one torch thread, Triton's interpreter, and a fixed RNG per test."""

import os

# Must be set before triton is imported anywhere, so kernels run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import strategies as st

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fixed_rng():
    """Seeds torch before each test and restores the RNG state afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


def make_episodes(lengths, *, obs_dim=3, act_dim=2, reward=None, seed=0):
    """A flat batch of consecutive episodes with the given lengths (``done`` at each end).

    ``reward`` is a float (the same reward everywhere), a list (one per episode) or ``None``
    (random uniform rewards).
    """
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    done = torch.zeros(n, 1, dtype=torch.bool)
    ends = torch.tensor(lengths).cumsum(0) - 1
    done[ends] = True
    is_init = torch.zeros(n, 1, dtype=torch.bool)
    is_init[ends - torch.tensor(lengths) + 1] = True
    if reward is None:
        rew = torch.rand(n, 1, generator=g)
    elif isinstance(reward, (list, tuple)):
        rew = torch.cat([torch.full((ln, 1), float(r)) for ln, r in zip(lengths, reward)])
    else:
        rew = torch.full((n, 1), float(reward))
    return TensorDict(
        {
            "observation": torch.randn(n, obs_dim, generator=g),
            "action": torch.randn(n, act_dim, generator=g),
            "is_init": is_init,
            "next": {"reward": rew, "done": done},
        },
        batch_size=[n],
    )


@st.composite
def write_plans(draw):
    """A memory size and a sequence of batches to write: layouts (flat, trajectory ids
    interleaved, ``[env, time]``), done and ``is_init`` flags; see :func:`plan_batch`."""
    capacity = draw(st.sampled_from([7, 16, 60]))
    batches = []
    next_traj = 0
    streams = {}
    for _ in range(draw(st.integers(1, 6))):
        layout = draw(st.sampled_from(["flat", "traj", "env"]))
        envs = draw(st.integers(1, 3)) if layout != "flat" else 1
        time = draw(st.integers(1, 9 if layout != "flat" else 25))
        p_done = draw(st.sampled_from([0.05, 0.3]))
        n = envs * time
        done = [draw(st.floats(0, 1)) < p_done for _ in range(n)]
        init = [draw(st.floats(0, 1)) < 0.1 for _ in range(n)]
        traj = None
        if layout == "traj":
            traj = []
            for i in range(n):
                e = draw(st.integers(0, envs - 1))
                if e not in streams:
                    streams[e] = next_traj
                    next_traj += 1
                traj.append(streams[e])
                if done[i]:  # a collector gives the next episode a new trajectory id
                    streams[e] = next_traj
                    next_traj += 1
        batches.append((layout, envs, time, done, init, traj))
    return capacity, batches


def plan_batch(layout, envs, time, done, init, traj, seed, reward=None):
    """The TensorDict of one planned batch (see :func:`write_plans`) and each row's stream.

    Rewards are multiples of 0.5 in [-1.5, 1.5] unless ``reward(generator, n)`` makes them.
    """
    from tensordict import TensorDict

    n = envs * time
    g = torch.Generator().manual_seed(seed)
    rewards = (
        torch.randint(-3, 4, (n, 1), generator=g).float() / 2
        if reward is None
        else reward(g, n).reshape(n, 1)
    )
    data = TensorDict(
        {
            "observation": torch.randn(n, 3, generator=g),
            "action": torch.randn(n, 2, generator=g),
            "is_init": torch.tensor(init).reshape(n, 1),
            "next": {"reward": rewards, "done": torch.tensor(done).reshape(n, 1)},
        },
        batch_size=[n],
    )
    if traj is not None:
        data["collector", "traj_ids"] = torch.tensor(traj)
        return data, traj
    if layout == "env":
        return data.reshape(envs, time), [i // time for i in range(n)]
    return data, [0] * n


def make_buffer(
    capacity=100,
    *,
    forgetting="fifo",
    mixture_ratio=0.5,
    top_k=3,
    batch_size=16,
    obs_dim=3,
    act_dim=2,
    embed_dim=16,
    window=4,
    defer_keys=False,
    writer_kwargs=None,
    **sampler_kwargs,
):
    """A TensorDictReplayBuffer made of the three hippo parts."""
    from torchrl.data import TensorDictReplayBuffer

    from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter

    encoder = DualEncoder(
        observation_dim=obs_dim,
        action_dim=act_dim,
        embed_dim=embed_dim,
        window=window,
        hidden_dim=32,
    )
    return TensorDictReplayBuffer(
        storage=HippoStorage(capacity),
        writer=HippoWriter(
            encoder, forgetting=forgetting, defer_keys=defer_keys, **(writer_kwargs or {})
        ),
        sampler=HippoSampler(mixture_ratio=mixture_ratio, top_k=top_k, **sampler_kwargs),
        batch_size=batch_size,
    )


@pytest.fixture
def episodes():
    return make_episodes


@pytest.fixture
def buffer():
    return make_buffer


def assert_same_state(a, b, path="state"):
    """Nested dicts / TensorDicts / tensors / values are exactly equal (NaN equals NaN)."""
    from tensordict import TensorDictBase

    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, TensorDictBase):
        assert_same_state(a.to_dict(), b.to_dict(), path)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=path)
    else:
        assert a == b, path
