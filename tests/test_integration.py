"""End-to-end: a real TorchRL collector on CartPole-v1 feeding the episodic memory.

``GymEnv`` -> ``Collector`` / ``MultiSyncCollector`` -> ``TensorDictReplayBuffer`` with
``HippoStorage`` + ``HippoWriter`` + ``HippoSampler``, extended with each collector batch as it
comes and sampled after every extend. No mocks: the collector's own bookkeeping
(``("collector", "traj_ids")``, ``("next", "step_count")``, rewards) is the ground truth that
the memory's entries (``("hippo", "episode")``, ``("hippo", "step")``, ``("hippo", "return")``)
are checked against, for flat ``[N]`` batches and for ``[env, time]`` batches.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchrl.collectors import Collector, MultiSyncCollector
from torchrl.data import TensorDictReplayBuffer
from torchrl.envs import GymEnv, InitTracker, SerialEnv, StepCounter, TransformedEnv
from torchrl.modules import MLP, QValueActor

from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter

pytest.importorskip("gymnasium")

OBS_DIM = 4
N_ACTIONS = 2
EMBED_DIM = 32
BATCH = 64
MIXTURE = 0.3
TOP_K = 8
FRAMES_PER_BATCH = 200
TOTAL_FRAMES = 1000


def make_env(*, categorical: bool = False, init_tracker: bool = False) -> TransformedEnv:
    """CartPole-v1 with a step counter (and optionally ``is_init``).

    The action is GymEnv's default int64 one-hot ``[2]``, or with ``categorical`` an integer
    index; the encoder reads both as ``action_dim=2``.
    """
    env = TransformedEnv(
        GymEnv("CartPole-v1", categorical_action_encoding=categorical), StepCounter()
    )
    if init_tracker:
        env.append_transform(InitTracker())
    return env


# Module-level factories, so that MultiSyncCollector workers can pickle them.
def make_one_hot_env() -> TransformedEnv:
    return make_env()


def make_tracked_env() -> TransformedEnv:
    return make_env(init_tracker=True)


def make_buffer(capacity: int) -> TensorDictReplayBuffer:
    encoder = DualEncoder(
        observation_dim=OBS_DIM, action_dim=N_ACTIONS, embed_dim=EMBED_DIM, window=8
    )
    return TensorDictReplayBuffer(
        storage=HippoStorage(capacity),
        writer=HippoWriter(encoder),
        sampler=HippoSampler(mixture_ratio=MIXTURE, top_k=TOP_K, temperature=0.1),
        batch_size=BATCH,
    )


class GroundTruth:
    """What the collector says about every transition it produced, and where it was written."""

    def __init__(self) -> None:
        self.row_traj: dict[int, int] = {}  # storage row -> traj id of the transition there
        self.row_step: dict[int, int] = {}  # storage row -> 0-based step in its trajectory
        self.traj_return: dict[int, float] = {}  # traj id -> sum of rewards seen so far
        self.traj_done: set[int] = set()
        self.traj_first_step: dict[int, int] = {}

    def record(self, batch, index: torch.Tensor) -> None:
        flat = batch.reshape(-1)
        traj = flat["collector", "traj_ids"].reshape(-1).tolist()
        step = (flat["next", "step_count"].reshape(-1) - 1).tolist()
        reward = flat["next", "reward"].reshape(-1).double().tolist()
        done = flat["next", "done"].reshape(-1).tolist()
        for row, t, s, r, d in zip(index.reshape(-1).tolist(), traj, step, reward, done):
            assert row >= 0, "every transition of a batch smaller than the memory is written"
            self.row_traj[row] = t
            self.row_step[row] = s
            self.traj_return[t] = self.traj_return.get(t, 0.0) + r
            self.traj_first_step.setdefault(t, s)
            if d:
                self.traj_done.add(t)


def check_sample(rb: TensorDictReplayBuffer, sample) -> None:
    """The sampled batch: shapes, the mixture share, weights, similarities, consistency."""
    assert sample.batch_size == torch.Size([BATCH])
    assert sample["index"].shape == (BATCH,)
    weight = sample["priority_weight"]
    semantic = sample["hippo", "semantic"]
    similarity = sample["hippo", "similarity"]
    assert weight.shape == (BATCH,) and weight.is_floating_point()
    assert semantic.shape == (BATCH,) and semantic.dtype == torch.bool
    assert similarity.shape == (BATCH,) and similarity.is_floating_point()
    assert semantic.float().mean().item() == pytest.approx(round(BATCH * MIXTURE) / BATCH)
    assert torch.isfinite(weight).all() and (weight > 0).all() and (weight <= 1 + 1e-6).all()
    # Retrieved items carry their similarity; uniform items are not scored by default.
    assert torch.isfinite(similarity[semantic]).all()
    assert similarity[~semantic].isnan().all()
    assert (similarity[semantic].abs() <= 1 + 1e-4).all()
    assert sample["hippo", "key"].shape == (BATCH, EMBED_DIM)
    # The sampled rows are the stored rows (no free rows here: nothing was evicted).
    stored = rb.storage.get(sample["index"])
    for key in (("hippo", "episode"), ("hippo", "step"), "observation", ("next", "reward")):
        torch.testing.assert_close(sample[key], stored[key])
    assert sample["observation"].shape == (BATCH, OBS_DIM)


def check_memory(rb: TensorDictReplayBuffer, truth: GroundTruth) -> None:
    """The memory's entries against the collector's bookkeeping, for every live row."""
    storage: HippoStorage = rb.storage
    rows = torch.tensor(sorted(truth.row_traj))
    assert storage.num_valid == len(rows) == len(storage)
    stored = storage.get(rows)
    episode = stored["hippo", "episode"].tolist()
    step = stored["hippo", "step"].tolist()
    ret = stored["hippo", "return"].double().tolist()

    # Steps count on across batches: the stored step is the collector's step count - 1.
    assert step == [truth.row_step[r] for r in rows.tolist()]

    # One episode id per trajectory id, and one trajectory per episode id.
    traj_of_episode: dict[int, int] = {}
    episode_of_traj: dict[int, int] = {}
    for r, ep in zip(rows.tolist(), episode):
        t = truth.row_traj[r]
        assert traj_of_episode.setdefault(ep, t) == t, f"episode {ep} mixes trajectories"
        assert episode_of_traj.setdefault(t, ep) == ep, f"trajectory {t} split into episodes"
    assert storage.num_episodes == len(episode_of_traj)

    # Returns: the sum of the trajectory's rewards (final once done, running sum otherwise).
    for r, value in zip(rows.tolist(), ret):
        t = truth.row_traj[r]
        assert value == pytest.approx(truth.traj_return[t]), f"trajectory {t}"

    # The episode table agrees: finished episodes are flagged done, with the full return
    # and length (every CartPole trajectory here starts at step 0).
    table = storage.episodes
    n_done = 0
    for t, ep in episode_of_traj.items():
        slot = int((table["id"] == ep).nonzero().squeeze())
        assert bool(table["done"][slot]) == (t in truth.traj_done)
        assert float(table["return"][slot]) == pytest.approx(truth.traj_return[t])
        if t in truth.traj_done:
            n_done += 1
            assert truth.traj_first_step[t] == 0
            assert int(table["length"][slot]) == round(truth.traj_return[t])
    assert n_done > 10, "CartPole under a random policy finishes many episodes in 1000 frames"

    # Keys are unit norm and come from the target encoder.
    keys = stored["hippo", "key"]
    assert keys.shape == (len(rows), EMBED_DIM)
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(len(rows)), atol=1e-4, rtol=0)
    assert (stored["hippo", "key_version"] == 0).all()


def run_pipeline(collector, rb: TensorDictReplayBuffer, *, expected_batch: torch.Size):
    truth = GroundTruth()
    n_batches = 0
    try:
        for batch in collector:
            assert batch.batch_size == expected_batch
            index = rb.extend(batch)
            assert index.shape == batch.batch_size
            truth.record(batch, index)
            check_sample(rb, rb.sample())
            n_batches += 1
    finally:
        collector.shutdown()
    assert n_batches == math.ceil(TOTAL_FRAMES / FRAMES_PER_BATCH)
    assert rb.writer._write_count == TOTAL_FRAMES
    return truth


@pytest.mark.parametrize(
    "categorical, init_tracker",
    [(False, False), (True, False), (False, True)],
    ids=["one-hot", "categorical", "one-hot-is_init"],
)
def test_collector_flat_batches(categorical, init_tracker):
    """One env, a random policy: flat ``[200]`` batches, episodes spanning batches."""
    env = make_env(categorical=categorical, init_tracker=init_tracker)
    env.set_seed(0)
    collector = Collector(env, None, frames_per_batch=FRAMES_PER_BATCH, total_frames=TOTAL_FRAMES)
    rb = make_buffer(2 * TOTAL_FRAMES)
    truth = run_pipeline(collector, rb, expected_batch=torch.Size([FRAMES_PER_BATCH]))
    check_memory(rb, truth)
    # Some episodes did span a batch boundary, so stitching was exercised.
    spans = 0
    for k in range(1, TOTAL_FRAMES // FRAMES_PER_BATCH):
        row = k * FRAMES_PER_BATCH
        if truth.row_traj[row - 1] == truth.row_traj[row]:
            spans += 1
    assert spans >= 1


def test_collector_qvalue_policy_env_time_batches():
    """Two envs in a ``SerialEnv``, a small ``QValueActor``: ``[env, time]`` batches."""
    env = SerialEnv(2, make_tracked_env)
    env.set_seed(1)
    actor = QValueActor(
        MLP(in_features=OBS_DIM, out_features=N_ACTIONS, num_cells=[32]),
        in_keys=["observation"],
        spec=env.action_spec_unbatched,
    )
    collector = Collector(env, actor, frames_per_batch=FRAMES_PER_BATCH, total_frames=TOTAL_FRAMES)
    rb = make_buffer(2 * TOTAL_FRAMES)
    truth = run_pipeline(collector, rb, expected_batch=torch.Size([2, FRAMES_PER_BATCH // 2]))
    check_memory(rb, truth)
    # The policy's outputs travel with the transitions.
    assert rb.storage.get(torch.arange(4))["action_value"].shape == (4, N_ACTIONS)


@pytest.mark.slow
def test_multisync_collector_env_time_batches():
    """A ``MultiSyncCollector`` with two worker processes: ``[worker, time]`` batches."""
    collector = MultiSyncCollector(
        [make_one_hot_env, make_one_hot_env],
        None,
        frames_per_batch=FRAMES_PER_BATCH,
        total_frames=TOTAL_FRAMES,
    )
    collector.set_seed(2)
    rb = make_buffer(2 * TOTAL_FRAMES)
    truth = run_pipeline(collector, rb, expected_batch=torch.Size([2, FRAMES_PER_BATCH // 2]))
    check_memory(rb, truth)


def test_collector_fifo_overwrites_whole_history():
    """A memory smaller than the run: FIFO overwrites, the survivors keep correct entries."""
    env = make_env()
    env.set_seed(3)
    collector = Collector(env, None, frames_per_batch=FRAMES_PER_BATCH, total_frames=TOTAL_FRAMES)
    capacity = 500
    rb = make_buffer(capacity)
    truth = run_pipeline(collector, rb, expected_batch=torch.Size([FRAMES_PER_BATCH]))
    assert len(rb.storage) == capacity
    check_memory(rb, truth)
