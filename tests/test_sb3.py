"""HippoReplayBuffer: the stable-baselines3 replay buffer backed by the episodic memory."""

import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")

from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer

from torchrl_hippo import DualEncoder
from torchrl_hippo.integrations import HippoReplayBuffer

OBS = spaces.Box(-5.0, 5.0, (3,), np.float32)
SMALL = {"embed_dim": 16, "window": 4, "hidden_dim": 32}


def make_buffer(capacity=500, *, n_envs=1, action_space=None, **kwargs):
    kwargs.setdefault("encoder_kwargs", SMALL)
    return HippoReplayBuffer(
        capacity,
        OBS,
        spaces.Discrete(3) if action_space is None else action_space,
        device="cpu",
        n_envs=n_envs,
        **kwargs,
    )


def feed(buffers, steps, *, n_envs=1, action_space=None, seed=0, timeout_at=None):
    """Adds the same random transitions to every buffer (episodes end with probability 0.1).

    ``timeout_at``: every this many steps of an env, its episode ends by a time-out instead.
    """
    rng = np.random.default_rng(seed)
    action_space = spaces.Discrete(3) if action_space is None else action_space
    action_space.seed(seed)
    age = np.zeros(n_envs, dtype=int)
    obs = rng.standard_normal((n_envs, 3)).astype(np.float32)
    for _ in range(steps):
        next_obs = rng.standard_normal((n_envs, 3)).astype(np.float32)
        action = np.stack([action_space.sample() for _ in range(n_envs)])
        reward = rng.standard_normal(n_envs).astype(np.float32)
        age += 1
        timeout = (age == timeout_at) if timeout_at else np.zeros(n_envs, dtype=bool)
        done = (rng.random(n_envs) < 0.1) | timeout
        infos = [{"TimeLimit.truncated": bool(t)} for t in timeout]
        for rb in buffers:
            rb.add(obs, next_obs, action, reward, done, infos)
        age[done] = 0
        # As with a VecEnv: after an episode ends, the next step starts a fresh one.
        obs = np.where(done[:, None], rng.standard_normal((n_envs, 3)), next_obs).astype(np.float32)


def stored(rb):
    rb.flush()
    storage = rb.memory.storage
    return storage.get(torch.arange(len(storage)))


def assert_episodes_continuous(rows):
    """Within each episode (by step) every next observation is the next step's observation."""
    episode = rows["hippo", "episode"]
    for ep in episode.unique():
        ep_rows = rows[episode == ep]
        ep_rows = ep_rows[ep_rows["hippo", "step"].argsort()]
        assert torch.equal(ep_rows["hippo", "step"], torch.arange(len(ep_rows)))
        torch.testing.assert_close(ep_rows["next", "observation"][:-1], ep_rows["observation"][1:])
        assert not ep_rows["next", "done"][:-1].any()


class TestAgainstSB3Buffer:
    """With one environment the memory's rows are SB3's rows, in order."""

    @pytest.mark.parametrize("handle_timeout_termination", [True, False])
    @pytest.mark.parametrize(
        "action_space",
        [spaces.Discrete(3), spaces.Box(-1.0, 1.0, (2,), np.float32)],
        ids=["discrete", "box"],
    )
    def test_rows_equal_sb3_rows(self, action_space, handle_timeout_termination):
        kwargs = {"handle_timeout_termination": handle_timeout_termination}
        ours = make_buffer(action_space=action_space, flush_every=7, **kwargs)
        ref = ReplayBuffer(500, OBS, action_space, device="cpu", **kwargs)
        feed([ours, ref], 120, action_space=action_space, timeout_at=9)
        index = np.arange(120)
        a, b = ours._get_samples(index), ref._get_samples(index)
        for name in ("observations", "actions", "next_observations", "dones", "rewards"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
        assert ours.size() == ref.size() == 120

    def test_vec_normalize(self):
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.vec_env import VecNormalize

        env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=1))
        env.reset()
        for _ in range(20):  # moves the running statistics away from the identity
            env.step(np.zeros((1, 1), np.float32))
        space = env.observation_space
        ours = HippoReplayBuffer(100, space, env.action_space, device="cpu", encoder_kwargs=SMALL)
        ref = ReplayBuffer(100, space, env.action_space, device="cpu")
        rng = np.random.default_rng(0)
        for t in range(30):
            args = (
                rng.standard_normal((1, 3)).astype(np.float32),
                rng.standard_normal((1, 3)).astype(np.float32),
                rng.uniform(-1, 1, (1, 1)).astype(np.float32),
                rng.standard_normal(1).astype(np.float32),
                np.array([t % 10 == 9]),
                [{}],
            )
            ours.add(*args)
            ref.add(*args)
        index = np.arange(30)
        a, b = ours._get_samples(index, env), ref._get_samples(index, env)
        for name in ("observations", "next_observations", "rewards"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), msg=name)


class TestMemory:
    @pytest.mark.parametrize("n_envs", [1, 3])
    def test_episodes_follow_each_env(self, n_envs):
        rb = make_buffer(n_envs=n_envs, flush_every=5)
        feed([rb], 60, n_envs=n_envs)
        rows = stored(rb)
        assert len(rows) == 60 * n_envs
        episode = rows["hippo", "episode"]
        traj = rows["collector", "traj_ids"]
        # One trajectory id per episode and back.
        pairs = torch.stack([episode, traj], 1).unique(dim=0)
        assert pairs.shape[0] == episode.unique().numel() == traj.unique().numel()
        assert_episodes_continuous(rows)
        table = rb.memory.storage.episodes
        done = table["done"] & (table["id"] >= 0)
        for ep_id, ret, length in zip(
            table["id"][done], table["return"][done], table["length"][done]
        ):
            ep_rows = rows[episode == ep_id]
            assert len(ep_rows) == length
            torch.testing.assert_close(ep_rows["next", "reward"].sum(), ret, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("detect_resets", [True, False])
    @pytest.mark.parametrize("n_envs", [1, 2])
    def test_reset_without_done_starts_an_episode(self, n_envs, detect_resets):
        rb = make_buffer(n_envs=n_envs, flush_every=8, detect_resets=detect_resets)
        feed([rb], 30, n_envs=n_envs)
        feed([rb], 30, n_envs=n_envs, seed=1)  # the envs were reset: fresh observations
        if detect_resets:
            assert_episodes_continuous(stored(rb))
        else:  # the episodes running at the reset were continued by the new ones
            with pytest.raises(AssertionError):
                assert_episodes_continuous(stored(rb))

    def test_timeouts_are_not_terminal(self):
        rb = make_buffer(flush_every=3)
        feed([rb], 80, timeout_at=6)
        rows = stored(rb)
        done, term, trunc = (
            rows["next", k].squeeze(-1) for k in ("done", "terminated", "truncated")
        )
        assert trunc.any() and term.any()
        assert torch.equal(done, term | trunc) and not (term & trunc).any()
        samples = rb._get_samples(np.arange(80))
        assert torch.equal(samples.dones.squeeze(-1).bool(), term)

    def test_sample_mixes_retrieval_and_uniform(self):
        rb = make_buffer(mixture_ratio=0.25, top_k=4)
        feed([rb], 200)
        batch = rb.sample(32)
        assert batch.observations.shape == (32, 3) and batch.actions.shape == (32, 1)
        assert batch.dones.dtype == batch.rewards.dtype == torch.float32
        sample = rb.last_sample
        assert int(sample["hippo", "semantic"].sum()) == 8
        assert sample["priority_weight"].shape == (32,)
        # The samples are the stored rows at the sampled indices.
        torch.testing.assert_close(
            batch.observations, rb.memory.storage.get(sample["index"])["observation"]
        )

    def test_flush_every(self):
        rb = make_buffer(flush_every=10)
        feed([rb], 25)
        assert len(rb.memory) == 20  # two flushes; five steps staged
        rb.sample(4)  # a non-empty memory does not flush before sampling
        assert len(rb.memory) == 20
        rb.flush()
        assert len(rb.memory) == 25
        first = make_buffer(flush_every=1)
        feed([first], 3)
        assert len(first.memory) == 3

    def test_capacity_and_ring(self):
        rb = make_buffer(50, n_envs=2, flush_every=4)
        feed([rb], 40, n_envs=2)
        assert rb.buffer_size == 25 and rb.full and rb.size() == 25
        assert len(stored(rb)) == 50
        assert rb.memory.writer._write_count == 80

    def test_reset(self):
        rb = make_buffer()
        feed([rb], 50)
        rb.sample(8)
        rb.reset()
        assert len(rb.memory) == 0 and rb.size() == 0 and rb.last_sample is None
        with pytest.raises(RuntimeError, match="empty"):
            rb.sample(8)
        feed([rb], 20, seed=1)
        assert len(stored(rb)) == 20
        assert int(stored(rb)["hippo", "step"][0]) == 0

    def test_pickle_round_trip_continues_episodes(self):
        rb = make_buffer(flush_every=4)
        feed([rb], 30)
        copy = pickle.loads(pickle.dumps(rb))
        torch.testing.assert_close(stored(copy), stored(rb))
        # Both go on identically: open episodes and staged steps travel with the pickle.
        feed([rb, copy], 30, seed=1)
        a, b = stored(rb), stored(copy)
        assert torch.equal(a["hippo", "episode"], b["hippo", "episode"])
        assert torch.equal(a["hippo", "step"], b["hippo", "step"])

    def test_consolidation(self):
        rb = make_buffer(
            consolidation_interval=2, consolidation_steps=2, consolidation_batch_size=16
        )
        feed([rb], 200)
        version = int(rb.encoder.version)
        rb.sample(8)
        assert rb.consolidation_metrics is None
        rb.sample(8)
        assert rb.consolidation_metrics["consolidation/steps"] == 2.0
        assert int(rb.encoder.version) == version + 2

    def test_given_encoder(self):
        encoder = DualEncoder(3, 2, 8, window=2, hidden_dim=16)
        rb = HippoReplayBuffer(
            100, OBS, spaces.Box(-1, 1, (2,), np.float32), device="cpu", encoder=encoder
        )
        feed([rb], 20, action_space=spaces.Box(-1, 1, (2,), np.float32))
        assert rb.memory.writer.encoder is encoder
        assert stored(rb)["hippo", "key"].shape == (20, 8)


class TestErrors:
    @pytest.mark.parametrize(
        "kwargs, error, match",
        [
            ({"optimize_memory_usage": True}, ValueError, "optimize_memory_usage"),
            ({"flush_every": 0}, ValueError, "flush_every"),
            ({"n_envs": 0}, ValueError, "n_envs"),
            ({"encoder": DualEncoder(3, 3, 8)}, ValueError, "encoder_kwargs"),
            ({"consolidator_kwargs": {"lr": 1e-3}}, ValueError, "consolidation_interval"),
            ({"mixture_ratio": 1.5}, ValueError, "mixture_ratio"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            make_buffer(**kwargs)

    def test_dict_observations(self):
        space = spaces.Dict({"a": OBS})
        with pytest.raises(TypeError, match="Dict"):
            HippoReplayBuffer(10, space, spaces.Discrete(2), device="cpu")

    def test_bad_adds(self):
        rb = make_buffer(n_envs=2)
        obs = np.zeros((2, 3), np.float32)
        with pytest.raises(ValueError, match="infos"):
            rb.add(obs, obs, np.zeros(2), np.zeros(2), np.zeros(2), [{}])
        with pytest.raises(ValueError, match="NaN"):
            rb.add(obs, obs, np.zeros(2), np.array([0.0, np.nan]), np.zeros(2), [{}, {}])
        with pytest.raises(RuntimeError, match="empty"):
            rb.sample(4)
        feed([rb], 5, n_envs=2)
        with pytest.raises(IndexError, match="batch_inds"):
            rb._get_samples(np.array([0, 10]))


def _policy_params(model):
    return torch.cat([p.detach().flatten().clone() for p in model.policy.parameters()])


@pytest.mark.slow
def test_dqn_cartpole():
    """SB3's DQN trains on the memory unchanged; the memory holds exactly the env's episodes."""
    from stable_baselines3 import DQN

    model = DQN(
        "MlpPolicy",
        "CartPole-v1",
        learning_starts=500,
        train_freq=4,
        batch_size=64,
        target_update_interval=250,
        buffer_size=10_000,
        policy_kwargs={"net_arch": [64, 64]},
        replay_buffer_class=HippoReplayBuffer,
        replay_buffer_kwargs={"mixture_ratio": 0.3, "encoder_kwargs": SMALL},
        seed=0,
        device="cpu",
    )
    before = _policy_params(model)
    model.learn(3_000)
    rb = model.replay_buffer
    assert isinstance(rb, HippoReplayBuffer)
    assert model._n_updates == (3_000 - 500) // 4
    assert not torch.equal(before, _policy_params(model))
    assert int(rb.last_sample["hippo", "semantic"].sum()) == round(64 * 0.3)

    rows = stored(rb)
    assert len(rows) == 3_000
    # The memory's finished episodes are the Monitor's episodes, in order.
    monitor = model.get_env().envs[0]
    table = rb.memory.storage.episodes
    done = table["done"] & (table["id"] >= 0)
    order = table["id"][done].argsort()
    lengths = table["length"][done][order]
    returns = table["return"][done][order]
    assert lengths.tolist() == monitor.get_episode_lengths()
    torch.testing.assert_close(
        returns, torch.tensor(monitor.get_episode_rewards(), dtype=torch.float32)
    )


@pytest.mark.slow
def test_sac_pendulum():
    """SAC trains on the memory; Pendulum's time-outs are stored as truncations, not terminal."""
    from stable_baselines3 import SAC

    model = SAC(
        "MlpPolicy",
        "Pendulum-v1",
        learning_starts=100,
        batch_size=64,
        buffer_size=5_000,
        policy_kwargs={"net_arch": [32, 32]},
        replay_buffer_class=HippoReplayBuffer,
        replay_buffer_kwargs={"mixture_ratio": 0.5, "encoder_kwargs": SMALL, "flush_every": 16},
        seed=0,
        device="cpu",
    )
    before = _policy_params(model)
    model.learn(400)
    assert model._n_updates == 300
    assert not torch.equal(before, _policy_params(model))
    rows = stored(model.replay_buffer)
    assert len(rows) == 400
    ends = rows["next", "done"].squeeze(-1)
    assert ends.sum() == 2  # 200-step episodes
    assert rows["next", "truncated"].squeeze(-1)[ends].all()
    assert not rows["next", "terminated"].any()
    batch = model.replay_buffer.sample(64)
    assert batch.actions.dtype == torch.float32 and batch.actions.abs().max() <= 1.0
    assert not batch.dones.any()
