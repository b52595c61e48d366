"""Scale-out: worker-unique trajectory ids, calls into the buffer, and the memory on Ray."""

import functools
import pickle

import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.data import TensorDictReplayBuffer
from torchrl.envs import Compose, GymEnv, StepCounter, TransformedEnv

from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
from torchrl_hippo.distributed import WorkerTrajIds, call_in_buffer, worker_collector_kwargs

TRAJ, WORKER = ("collector", "traj_ids"), ("collector", "worker_id")


def small_encoder():
    return DualEncoder(observation_dim=4, action_dim=2, embed_dim=16, window=4, hidden_dim=32)


def local_buffer(capacity=2_000):
    return TensorDictReplayBuffer(
        storage=HippoStorage(capacity),
        writer=HippoWriter(small_encoder()),
        sampler=HippoSampler(mixture_ratio=0.5, top_k=3),
        batch_size=16,
    )


def assert_memory_consistent(storage: HippoStorage, worker_key=WORKER, traj_key=TRAJ) -> None:
    """Episodes never span workers or trajectories, and the episode table matches the rows."""
    rows = storage.get(torch.arange(len(storage)))
    episode = rows["hippo", "episode"]
    assert (episode >= 0).all()
    stream = torch.stack([rows[worker_key], rows[traj_key]], 1)
    # Episode id <-> (worker, trajectory) is one-to-one.
    pairs = torch.cat([episode[:, None], stream], 1).unique(dim=0)
    assert pairs.shape[0] == episode.unique().numel() == stream.unique(dim=0).shape[0]
    table = storage.episodes
    live = (table["id"] >= 0) & (table["rows"] > 0)
    assert sorted(table["id"][live].tolist()) == episode.unique().tolist()
    for slot in live.nonzero().squeeze(1).tolist():
        mine = rows[episode == table["id"][slot]]
        assert len(mine) == table["rows"][slot]
        steps = mine["hippo", "step"].sort().values
        assert torch.equal(steps, torch.arange(len(mine)) + steps[0])
        if table["rows"][slot] == table["length"][slot]:  # the whole episode is stored
            assert steps[0] == 0
            torch.testing.assert_close(mine["next", "reward"].sum(), table["return"][slot])
            if table["done"][slot]:
                assert mine["next", "done"][mine["hippo", "step"].argmax()].all()


class TestWorkerTrajIds:
    @pytest.mark.parametrize("worker, bits", [(0, 32), (5, 32), (3, 8), (2**30, 32)])
    def test_fold_and_split(self, worker, bits):
        traj = torch.tensor([[0, 0, 1], [7, 7, 8]])
        td = TensorDict({TRAJ: traj.clone(), "x": torch.zeros(2, 3)}, [2, 3])
        out = WorkerTrajIds(worker, bits=bits)(td)
        assert out is td
        assert torch.equal(td[TRAJ], worker * 2**bits + traj)
        assert torch.equal(td[WORKER], torch.full_like(traj, worker))
        w, t = WorkerTrajIds.split(td[TRAJ], bits)
        assert torch.equal(w, torch.full_like(traj, worker)) and torch.equal(t, traj)

    def test_keys(self):
        td = TensorDict({"ids": torch.tensor([1, 2])}, [2])
        WorkerTrajIds(1, traj_key="ids", worker_key=None)(td)
        assert set(td.keys()) == {"ids"}
        assert td["ids"].tolist() == [2**32 + 1, 2**32 + 2]

    def test_is_a_postproc(self):
        collector = Collector(
            GymEnv("CartPole-v1"),
            None,
            frames_per_batch=30,
            total_frames=60,
            postproc=WorkerTrajIds(2),
        )
        for batch in collector:
            assert (WorkerTrajIds.split(batch[TRAJ])[0] == 2).all()
            assert (batch[WORKER] == 2).all()
        collector.shutdown()

    def test_pickles(self):
        stamp = pickle.loads(pickle.dumps(WorkerTrajIds(4, bits=16)))
        assert (stamp.worker_id, stamp.bits) == (4, 16)

    @pytest.mark.parametrize(
        "kwargs, error, match",
        [
            ({"worker_id": -1}, ValueError, "worker_id"),
            ({"worker_id": 2**31}, ValueError, "worker_id"),
            ({"worker_id": 1.0}, TypeError, "worker_id"),
            ({"worker_id": 0, "bits": 0}, ValueError, "bits"),
            ({"worker_id": 0, "bits": 63}, ValueError, "bits"),
            ({"worker_id": 0, "traj_key": 3}, TypeError, "traj_key"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            WorkerTrajIds(**kwargs)

    @pytest.mark.parametrize(
        "data, error, match",
        [
            ({TRAJ: torch.tensor([-1, 0])}, ValueError, "traj_ids"),
            ({TRAJ: torch.tensor([2**32])}, ValueError, "folded already"),
            ({TRAJ: torch.tensor([0.0, 1.0])}, TypeError, "integers"),
            ({"other": torch.tensor([0])}, KeyError, "no trajectory ids"),
        ],
    )
    def test_bad_data(self, data, error, match):
        td = TensorDict(data, [len(next(iter(data.values())))])
        with pytest.raises(error, match=match):
            WorkerTrajIds(1)(td)

    def test_not_an_env_transform(self):
        env = TransformedEnv(GymEnv("CartPole-v1"), WorkerTrajIds(0))
        with pytest.raises(RuntimeError, match="postproc"):
            env.reset()


class TestWorkerCollectorKwargs:
    def test_one_stamp_per_worker(self):
        shared = {"max_frames_per_traj": 50}
        kwargs = worker_collector_kwargs(3, shared, first_worker=2)
        assert [kw["postproc"].worker_id for kw in kwargs] == [2, 3, 4]
        assert all(kw["max_frames_per_traj"] == 50 for kw in kwargs)
        assert shared == {"max_frames_per_traj": 50}  # not modified
        assert kwargs[0] is not kwargs[1]

    def test_runs_after_the_given_postproc(self):
        counter = StepCounter()
        kwargs = worker_collector_kwargs(2, {"postproc": counter})
        post = kwargs[1]["postproc"]
        assert isinstance(post, Compose)
        assert isinstance(post[0], StepCounter) and post[0] is not counter
        assert post[-1].worker_id == 1

        def tag(td):  # any callable
            return td.set("tagged", torch.ones(td.shape))

        td = TensorDict({TRAJ: torch.tensor([0, 1])}, [2])
        td = worker_collector_kwargs(2, {"postproc": tag})[1]["postproc"](td)
        assert td["tagged"].all() and td[WORKER].tolist() == [1, 1]

    @pytest.mark.parametrize(
        "args, kwargs, error, match",
        [
            ((0,), {}, ValueError, "num_workers"),
            ((2, [{}]), {}, TypeError, "collector_kwargs"),
            ((2, {"postproc": 3}), {}, TypeError, "postproc"),
            ((2,), {"first_worker": -1}, ValueError, "first_worker"),
        ],
    )
    def test_bad_arguments(self, args, kwargs, error, match):
        with pytest.raises(error, match=match):
            worker_collector_kwargs(*args, **kwargs)


class TestCallInBuffer:
    def test_local(self):
        rb = local_buffer()
        assert call_in_buffer(rb, lambda b, x, *, y: (b is rb, x + y), 1, y=2) == (True, 3)
        with pytest.raises(TypeError, match="callable"):
            call_in_buffer(rb, 3)


def _collect_two_workers(rb, stamp: bool, seeds=(0, 1), batches=4):
    """Two real collectors writing alternately into one memory, as two remote workers do."""
    if stamp:
        kwargs = worker_collector_kwargs(2)
    else:  # only a worker id, traj ids left as they are

        def tag(worker):
            return lambda td: td.set(WORKER, torch.full(td.shape, worker))

        kwargs = [{"postproc": tag(0)}, {"postproc": tag(1)}]
    collectors = []
    for seed, kw in zip(seeds, kwargs):
        env = GymEnv("CartPole-v1")
        env.set_seed(seed)
        collectors.append(
            Collector(env, None, frames_per_batch=50, total_frames=50 * batches, **kw)
        )
    for pair in zip(*collectors):
        for batch in pair:
            rb.extend(batch)
    for collector in collectors:
        collector.shutdown()


@pytest.mark.parametrize("stamp", [True, False], ids=["stamped", "colliding"])
def test_workers_sharing_a_memory(stamp):
    """Without the fold the writer merges different workers' episodes; with it, never."""
    rb = local_buffer()
    _collect_two_workers(rb, stamp)
    storage = rb.storage
    assert len(storage) == 400
    if stamp:
        assert_memory_consistent(storage)
    else:
        rows = storage.get(torch.arange(len(storage)))
        spans = torch.stack([rows["hippo", "episode"], rows[WORKER]], 1).unique(dim=0)
        assert spans[:, 0].unique().numel() < spans.shape[0]  # an episode spans both workers
        with pytest.raises(AssertionError):
            assert_memory_consistent(storage)


# ---------------------------------------------------------------------------------------- Ray
def _ray_buffer(capacity=2_000):
    return TensorDictReplayBuffer(
        storage=functools.partial(HippoStorage, capacity),
        writer=functools.partial(HippoWriter, encoder=small_encoder()),
        sampler=functools.partial(HippoSampler, mixture_ratio=0.5, top_k=3),
        batch_size=16,
        service_backend="ray",
        service_backend_options={"remote_config": {"num_cpus": 0, "memory": 512 * 1024**2}},
    )


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    owner = not ray.is_initialized()
    if owner:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=128 * 1024**2,
        )
    yield ray
    if owner:
        ray.shutdown()


@pytest.mark.slow
def test_ray_buffer(ray_session):
    """The three parts, given as constructors, are built inside the actor and work there."""
    rb = _ray_buffer()
    try:
        assert type(rb).__name__ == "RayReplayBuffer"
        done = torch.zeros(100, 1, dtype=torch.bool)
        done[9::10] = True
        data = TensorDict(
            {
                "observation": torch.randn(100, 4),
                "action": torch.randint(2, (100, 1)),
                ("next", "reward"): torch.rand(100, 1),
                ("next", "done"): done,
            },
            [100],
        )
        index = rb.extend(data)
        assert torch.equal(index, torch.arange(100))
        assert len(rb) == 100 and rb.write_count == 100
        sample = rb.sample()
        assert sample.shape == (16,) and int(sample["hippo", "semantic"].sum()) == 8
        # Hippo-specific calls run inside the actor.
        assert call_in_buffer(rb, lambda b: b.storage.num_episodes) == 10
        call_in_buffer(rb, lambda b, q: b.sampler.set_query(q), torch.randn(3, 16))
        sample = rb.sample()
        assert int(sample["hippo", "semantic"].sum()) == 8
        keys = call_in_buffer(rb, lambda b: b.storage.keys.clone())
        assert keys.shape == (100, 16)
        assert call_in_buffer(rb.client(), lambda b: len(b)) == 100
    finally:
        rb.close()


@pytest.mark.slow
@pytest.mark.filterwarnings(
    "ignore:The policy is not an nn.Module", "ignore:RayCollector iteration"
)
def test_ray_collector_writes_unique_episodes(ray_session):
    """RayCollector's workers write into the Ray-hosted memory; episodes never mix workers."""
    from torchrl.collectors.distributed import RayCollector

    rb = _ray_buffer()
    collector = RayCollector(
        [functools.partial(GymEnv, "CartPole-v1")] * 2,
        policy=None,
        frames_per_batch=200,
        total_frames=400,
        sync=True,
        replay_buffer=rb,
        collector_kwargs=worker_collector_kwargs(2),
        remote_configs={"num_cpus": 1, "memory": 512 * 1024**2},
    )
    try:
        for _ in collector:
            pass
        storage = call_in_buffer(rb, lambda b: b.storage)  # a copy of the actor's storage
        assert len(storage) == 400
        rows = storage.get(torch.arange(400))
        assert torch.bincount(rows[WORKER]).tolist() == [200, 200]
        assert torch.equal(WorkerTrajIds.split(rows[TRAJ])[0], rows[WORKER])
        assert_memory_consistent(storage)
        assert rb.sample()["hippo", "semantic"].sum() == 8
    finally:
        collector.shutdown()
        rb.close()
