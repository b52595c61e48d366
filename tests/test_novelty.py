"""Tests of the EpisodicNovelty transform (torchrl_hippo/envs/novelty.py) and its study script."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.data import TensorDictReplayBuffer
from torchrl.envs import GymEnv, SerialEnv, TransformedEnv
from torchrl.envs.utils import check_env_specs, step_mdp

import torchrl_hippo.envs  # noqa: F401  (registers the corridor ids)
from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
from torchrl_hippo.envs.novelty import EpisodicNovelty

ENV_ID = "hippo/Corridor-ZeroNoise-v0"
OBS_DIM = 8
ROOT = Path(__file__).resolve().parents[1]


def corridor(length=10):
    return GymEnv(ENV_ID, length=length)


def fixed_policy(env, actions):
    """A policy that plays ``actions`` in order (one-hot, as GymEnv expects)."""
    it = iter(actions)

    def policy(td):
        return td.set("action", env.action_spec.encode(next(it)))

    return policy


def make_embedding(kind):
    if kind == "identity":
        return None
    if kind == "linear":
        return torch.nn.Linear(OBS_DIM, 4).requires_grad_(False)
    if kind == "tdmodule":
        return TensorDictModule(
            torch.nn.Linear(OBS_DIM, 4), in_keys=["observation"], out_keys=["embedding"]
        )
    if kind == "dual_encoder":
        return DualEncoder(OBS_DIM, 2, embed_dim=8, window=3, hidden_dim=16)
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------------
# kNN search against a brute-force reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("num_envs", "capacity"), [(1, 16), (3, 5), (35, 4)])
def test_neighbours_match_cdist(num_envs, capacity):
    """Per-env neighbours (ring buffers, partial resets, envs with fewer than k) equal cdist's."""
    dim, k = 6, 4
    g = torch.Generator().manual_seed(num_envs)
    t = EpisodicNovelty(k=k, capacity=capacity, normalize=False)
    stored = [[] for _ in range(num_envs)]

    def obs():
        return torch.randn(num_envs, dim, generator=g) * 3.0

    first = obs()
    t._reset(TensorDict({}, [num_envs]), TensorDict({"observation": first}, [num_envs]))
    for i in range(num_envs):
        stored[i].append(first[i])
    for step in range(7):
        nxt = obs()
        t._step(
            TensorDict({}, [num_envs]),
            TensorDict({"observation": nxt, "reward": torch.zeros(num_envs, 1)}, [num_envs]),
        )
        for i in range(num_envs):
            stored[i].append(nxt[i])
        if step == 3:  # reset every third env: it starts over with one embedding
            mask = (torch.arange(num_envs) % 3 == 0).unsqueeze(-1)
            new = obs()
            t._reset(
                TensorDict({"_reset": mask}, [num_envs]),
                TensorDict({"observation": new}, [num_envs]),
            )
            for i in range(0, num_envs, 3):
                stored[i] = [new[i]]
    query = obs()
    got = t.neighbour_distances(query)
    for i in range(num_envs):
        keep = torch.stack(stored[i][-capacity:])
        ref = torch.cdist(query[i : i + 1], keep).pow(2).squeeze(0).sort().values[:k]
        ref = torch.cat((ref, torch.full((k - ref.numel(),), math.inf)))
        torch.testing.assert_close(got[i], ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(t.episodic_embeddings(i), keep)
    assert t.episodic_counts.tolist() == [min(len(s), capacity) for s in stored]


# ---------------------------------------------------------------------------------------------
# the bonus
# ---------------------------------------------------------------------------------------------
def test_unseen_states_are_more_novel():
    """Stepping into new corridor cells pays more than stepping back into visited ones."""
    env = TransformedEnv(corridor(10), EpisodicNovelty(k=3, normalize=False, out_key="bonus"))
    actions = [1] * 5 + [0] * 4
    td = env.rollout(len(actions), fixed_policy(env, actions))
    bonus = td["next", "bonus"].squeeze(-1)
    assert bonus[:5].min() > 3 * bonus[5:].max()
    assert torch.equal(td["next", "reward"], torch.zeros(len(actions), 1))  # untouched


def test_add_to_reward_equals_out_key():
    actions = [1] * 12  # reaches the end of a length-10 corridor: reward 1 at the last step
    plain = TransformedEnv(corridor(10), EpisodicNovelty(k=3, beta=0.5, out_key="bonus"))
    added = TransformedEnv(corridor(10), EpisodicNovelty(k=3, beta=0.5))
    td_plain = plain.rollout(12, fixed_policy(plain, actions))
    td_added = added.rollout(12, fixed_policy(added, actions))
    assert td_plain["next", "reward"].sum() == 1.0
    torch.testing.assert_close(
        td_added["next", "reward"], td_plain["next", "reward"] + td_plain["next", "bonus"]
    )
    assert td_plain["next", "bonus"].abs().max() <= 0.5 * 5.0  # beta * reward_clip


def test_exact_bonus_with_constant_kernel():
    """kernel = 1 for every neighbour: r = 1 / sqrt(#neighbours + c), the neighbours capped at k."""
    t = EpisodicNovelty(k=3, kernel=lambda d: torch.ones_like(d), normalize=False, out_key="r")
    env = TransformedEnv(corridor(10), t)
    td = env.rollout(5, fixed_policy(env, [1] * 5))
    expected = [1 / math.sqrt(min(n, 3) + 1e-3) for n in range(1, 6)]
    torch.testing.assert_close(td["next", "r"].squeeze(-1), torch.tensor(expected))


@pytest.mark.parametrize("kernel", ["inverse", "gaussian"])
def test_max_similarity_zeroes_the_bonus(kernel):
    # sqrt(sum K + c) >= sqrt(1e-3) > 0.01 always
    t = EpisodicNovelty(kernel=kernel, max_similarity=0.01, normalize=False, out_key="r")
    td = TransformedEnv(corridor(), t).rollout(4)
    assert torch.equal(td["next", "r"], torch.zeros(4, 1))


def test_running_statistics_update_until_frozen():
    t = EpisodicNovelty(k=2, center=True, out_key="r")
    env = TransformedEnv(corridor(), t)
    env.rollout(6, break_when_any_done=False)
    count = float(t.reward_stats.count)
    assert count == pytest.approx(6, abs=1e-3)
    assert float(t.distance_stats.count) > 6  # up to k distances per step
    assert t.freeze() is t and t.frozen
    td = env.rollout(4, break_when_any_done=False)
    assert float(t.reward_stats.count) == count
    t.unfreeze()
    env.rollout(2, break_when_any_done=False)
    assert float(t.reward_stats.count) == pytest.approx(count + 2, abs=1e-3)
    assert td["next", "r"].abs().max() <= 5.0
    state = t.state_dict()
    assert {"distance_stats.mean", "reward_stats.var"} <= set(state)
    assert not any(name.startswith("_rows") for name in state)  # episodic state is not saved
    fresh = EpisodicNovelty(k=2, center=True, out_key="r")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.reward_stats.mean, t.reward_stats.mean)


def test_capacity_is_a_ring():
    t = EpisodicNovelty(capacity=3)
    env = TransformedEnv(corridor(10), t)
    env.rollout(5, fixed_policy(env, [1] * 5))
    assert int(t.episodic_counts) == 3
    torch.testing.assert_close(t.episodic_embeddings()[:, 0], torch.tensor([0.3, 0.4, 0.5]))
    t.clear()
    assert int(t.episodic_counts) == 0


# ---------------------------------------------------------------------------------------------
# specs, batch dims and resets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "out_key"),
    [
        ("identity", None),
        ("identity", "intrinsic_reward"),
        ("linear", None),
        ("tdmodule", ("novelty", "bonus")),
        ("dual_encoder", "intrinsic_reward"),
    ],
)
@pytest.mark.parametrize("batched", [False, True])
def test_check_env_specs(kind, out_key, batched):
    base = SerialEnv(2, corridor) if batched else corridor()
    env = TransformedEnv(base, EpisodicNovelty(make_embedding(kind), k=3, out_key=out_key))
    check_env_specs(env, seed=0)
    td = env.rollout(5, break_when_any_done=False)
    batch = (2, 5) if batched else (5,)
    key = ("next", "reward") if out_key is None else ("next", out_key)
    assert td[key].shape == (*batch, 1)
    assert td[key].dtype == torch.float32
    if out_key is not None:
        assert env.full_reward_spec[out_key].shape == env.full_reward_spec["reward"].shape
    env.close()


def test_partial_reset_clears_only_the_marked_envs():
    env = TransformedEnv(SerialEnv(2, corridor), EpisodicNovelty(k=3))
    td = env.reset()
    for _ in range(3):
        td = step_mdp(env.step(env.rand_action(td)))
    assert env.transform.episodic_counts.tolist() == [4, 4]
    kept = env.transform.episodic_embeddings(1)
    env.reset(TensorDict({"_reset": torch.tensor([[True], [False]])}, [2]))
    assert env.transform.episodic_counts.tolist() == [1, 4]
    torch.testing.assert_close(env.transform.episodic_embeddings(1), kept)
    assert env.transform.episodic_embeddings(0)[0, 0] == 0.0  # back at the start
    env.close()


# ---------------------------------------------------------------------------------------------
# the live memory
# ---------------------------------------------------------------------------------------------
def test_dual_encoder_queries_match_the_memory_keys():
    """With a DualEncoder the query of a transition is the key HippoWriter stores for it."""
    encoder = DualEncoder(OBS_DIM, 2, embed_dim=16, window=4, hidden_dim=32)
    rb = TensorDictReplayBuffer(
        storage=HippoStorage(100),
        writer=HippoWriter(encoder),
        sampler=HippoSampler(top_k=2),
        batch_size=4,
    )
    t = EpisodicNovelty(encoder, memory=rb, k=2, out_key="novelty", normalize=False)
    env = TransformedEnv(corridor(10), t)
    assert encoder.training  # the transform does not own the encoder
    assert not any(name.startswith("embedding") for name in t.state_dict())
    env.set_seed(0)
    td = env.rollout(6, fixed_policy(env, [1, 1, 0, 1, 1, 1]))
    rb.extend(td)
    keys = rb.storage.keys
    torch.testing.assert_close(t.episodic_embeddings(0), keys, rtol=1e-5, atol=1e-5)

    # A memory-only transform: the same walk again is not novel, a new one is.
    t2 = EpisodicNovelty(
        encoder, memory=rb, episodic=False, k=2, out_key="novelty", normalize=False
    )
    assert t2.neighbour_distances(keys)[:, 0].abs().max() < 1e-5
    env2 = TransformedEnv(corridor(10), t2)
    env2.set_seed(0)
    again = env2.rollout(6, fixed_policy(env2, [1, 1, 0, 1, 1, 1]))
    new = env2.rollout(6, fixed_policy(env2, [0, 0, 0, 1, 0, 0]))
    assert again["next", "novelty"].sum() < new["next", "novelty"].sum()


def test_memory_size_mismatch_is_reported():
    encoder = DualEncoder(OBS_DIM, 2, embed_dim=16, window=2, hidden_dim=16)
    rb = TensorDictReplayBuffer(storage=HippoStorage(50), writer=HippoWriter(encoder))
    env = TransformedEnv(corridor(), EpisodicNovelty(memory=rb))  # identity: 8 features
    rb.extend(corridor().rollout(4))
    with pytest.raises(ValueError, match="embedding has size 8, but the memory's keys have 16"):
        env.rollout(2)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, "k must be an int >= 1"),
        ({"k": 2.5}, TypeError, "k must be an int"),
        ({"capacity": 0}, ValueError, "capacity must be"),
        ({"kernel": "cosine"}, ValueError, "Unknown kernel 'cosine'"),
        ({"kernel_epsilon": 0.0}, ValueError, "kernel_epsilon must be a number > 0"),
        ({"c": -1.0}, ValueError, "c must be a number >= 0"),
        ({"cluster_distance": -0.1}, ValueError, "cluster_distance must be"),
        ({"beta": math.inf}, TypeError, "beta must be a finite number"),
        ({"reward_clip": 0}, ValueError, "reward_clip must be a number > 0"),
        ({"embedding": "pixels"}, TypeError, "embedding must be None"),
        ({"memory": object()}, TypeError, "memory must be a HippoStorage"),
        ({"episodic": False}, ValueError, "episodic=False needs a memory"),
        ({"episodic": 1}, TypeError, "episodic must be a bool"),
        ({"center": True, "normalize": False}, ValueError, "center=True needs normalize=True"),
        ({"out_key": "reward"}, ValueError, "out_key must differ from reward_key"),
        ({"out_key": 3}, TypeError, "out_key must be a NestedKey"),
        ({"in_keys": ["a", "b"]}, ValueError, "in_keys must be a list of one NestedKey"),
        (
            {"embedding": make_embedding("tdmodule"), "in_keys": ["observation"]},
            ValueError,
            "in_keys is read from the embedding",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        EpisodicNovelty(**kwargs)


def test_runtime_errors():
    t = EpisodicNovelty()
    with pytest.raises(RuntimeError, match="environment transform"):
        t(TensorDict({"observation": torch.zeros(3, OBS_DIM)}, [3]))
    with pytest.raises(RuntimeError, match="reset the env first"):
        t.episodic_embeddings()
    with pytest.raises(KeyError, match="reward_key 'return' is not in the env's reward spec"):
        _ = TransformedEnv(corridor(), EpisodicNovelty(reward_key="return")).reward_spec
    env = TransformedEnv(corridor(), t)
    env.rollout(2)
    with pytest.raises(ValueError, match="set up for an env batch of"):
        t._step(TensorDict({}, [2]), TensorDict({"observation": torch.zeros(2, OBS_DIM)}, [2]))
    bad = EpisodicNovelty(torch.nn.Flatten(0), out_key="r")  # returns [batch * D]
    with pytest.raises(ValueError, match=r"embedding must return \[\*batch, D\]"):
        TransformedEnv(SerialEnv(2, corridor), bad).rollout(2)


# ---------------------------------------------------------------------------------------------
# the study script
# ---------------------------------------------------------------------------------------------
def test_study_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "novelty_study", ROOT / "benchmarks" / "novelty_study.py"
    )
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    result = study.main(
        [
            "--length", "4", "--frames", "100", "--seeds", "0", "--frames-per-batch", "25",
            "--warmup", "50", "--updates-per-batch", "1", "--output-dir", str(tmp_path),
            "--prefix", "smoke", "--logdir", str(tmp_path / "runs"), "--no-progress",
            "--arms", "dqn", "dqn+novelty",
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.png").stat().st_size > 10_000
    assert set(saved["summary"]) == {"dqn", "dqn+novelty"}
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    for run in saved["runs"]:
        first = run["frames_to_first_success"]
        assert first is None or 4 <= first <= 100
        assert run["frames"] == 100
    assert any((tmp_path / "runs").rglob("events.out.tfevents.*"))
