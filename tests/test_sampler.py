"""HippoSampler: mixture, retrieval, importance weights, priorities, caching and contract."""

import math

import pytest
import torch
from conftest import make_buffer, make_episodes
from tensordict import TensorDict

from torchrl_hippo import HippoSampler
from torchrl_hippo.search import topk_similarity_reference


def filled(capacity=200, lengths=(20,) * 10, rewards=None, **kwargs):
    rb = make_buffer(capacity, **kwargs)
    rb.extend(make_episodes(list(lengths), reward=rewards))
    return rb


@pytest.mark.parametrize("forgetting", ["fifo", "importance"])
@pytest.mark.parametrize("mixture_ratio", [0.0, 0.3, 0.5, 1.0])
class TestContractMatrix:
    def test_batch_layout(self, forgetting, mixture_ratio):
        rb = filled(forgetting=forgetting, mixture_ratio=mixture_ratio, batch_size=32)
        batch = rb.sample()
        assert batch.shape == (32,)
        assert batch["priority_weight"].shape == (32,)
        assert batch["hippo", "semantic"].dtype == torch.bool
        assert batch["hippo", "semantic"].sum() == round(32 * mixture_ratio)
        assert batch["hippo", "similarity"].shape == (32,)
        assert ((batch["priority_weight"] > 0) & (batch["priority_weight"] <= 1 + 1e-6)).all()
        torch.testing.assert_close(
            batch["observation"], rb.storage.get(batch["index"])["observation"]
        )

    def test_state_round_trips(self, forgetting, mixture_ratio, tmp_path):
        rb = filled(forgetting=forgetting, mixture_ratio=mixture_ratio)
        rb.sampler.set_query(torch.randn(2, 16))
        rb.update_priority(torch.arange(10), torch.rand(10))
        for how in ("state_dict", "dumps"):
            other = make_buffer(200, forgetting=forgetting, mixture_ratio=0.9, top_k=7)
            other._writer.encoder.load_state_dict(rb.writer.encoder.state_dict())
            if how == "state_dict":
                other.load_state_dict(rb.state_dict())
            else:
                rb.dumps(tmp_path / "rb")
                other.loads(tmp_path / "rb")
            assert other.sampler.mixture_ratio == mixture_ratio
            assert other.sampler.top_k == 3
            torch.manual_seed(3)
            a = rb.sample()
            torch.manual_seed(3)
            b = other.sample()
            assert a["index"].tolist() == b["index"].tolist()
            torch.testing.assert_close(a["priority_weight"], b["priority_weight"])

    def test_iteration_ends(self, forgetting, mixture_ratio):
        rb = filled(forgetting=forgetting, mixture_ratio=mixture_ratio, batch_size=64)
        assert sum(1 for _ in rb) == math.ceil(200 / 64)
        assert sum(1 for _ in rb) == math.ceil(200 / 64)


def test_semantic_draws_come_from_the_top_k():
    rb = filled(mixture_ratio=1.0, batch_size=256)
    rb.sampler.top_k = 4
    queries = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    rb.sampler.set_query(queries)
    _, ref = topk_similarity_reference(queries, rb.storage.keys, 4)
    allowed = set(ref.reshape(-1).tolist())
    for _ in range(5):
        batch = rb.sample()
        assert set(batch["index"].tolist()) <= allowed
        assert batch["hippo", "semantic"].all()


def test_semantic_frequencies_follow_the_softmax():
    rb = filled(mixture_ratio=1.0, batch_size=4000, temperature=0.1)
    rb.sampler.top_k = 5
    query = torch.nn.functional.normalize(torch.randn(1, 16), dim=-1)
    rb.sampler.set_query(query)
    score, index = topk_similarity_reference(query, rb.storage.keys, 5)
    expected = torch.softmax(score[0] / 0.1, 0)
    counts = torch.zeros(5)
    n = 0
    for _ in range(5):
        batch = rb.sample()
        n += batch.shape[0]
        counts += (batch["index"][:, None] == index[0][None]).sum(0)
    freq = counts / n
    # Within 5 standard errors of a multinomial proportion.
    tol = 5 * torch.sqrt(expected * (1 - expected) / n) + 1e-3
    assert ((freq - expected).abs() <= tol).all(), (freq, expected)
    # The similarity entry is each item's score with its query.
    batch = rb.sample()
    torch.testing.assert_close(
        batch["hippo", "similarity"], (rb.storage.keys[batch["index"]] @ query[0]).float()
    )


@pytest.mark.parametrize("mixture_ratio", [0.1, 0.3, 0.7])
def test_mixture_ratio_holds_over_many_batches(mixture_ratio):
    rb = filled(mixture_ratio=mixture_ratio, batch_size=50)
    share = torch.stack([rb.sample()["hippo", "semantic"].float().mean() for _ in range(20)])
    assert abs(share.mean().item() - round(50 * mixture_ratio) / 50) < 1e-6


def test_uniform_part_is_uniform():
    rb = filled(capacity=100, lengths=(10,) * 10, mixture_ratio=0.0, batch_size=1000)
    counts = torch.zeros(100)
    for _ in range(20):
        counts += torch.bincount(rb.sample()["index"], minlength=100)
    expected = 20 * 1000 / 100
    # Chi-square statistic well inside the 99.9% quantile for 99 dof (~148).
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 148, chi2


def test_importance_weights_match_the_mixture_density():
    rb = filled(mixture_ratio=0.5, batch_size=64, beta=1.0)
    sampler = rb.sampler
    query = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    sampler.set_query(query)
    batch = rb.sample()
    n = len(rb)
    score, index = topk_similarity_reference(query, rb.storage.keys, 3)
    sem = torch.zeros(n, dtype=torch.float64)
    sem.index_add_(
        0,
        index.reshape(-1),
        (torch.softmax(score / sampler.temperature, 1) / 2).reshape(-1).double(),
    )
    prob = 0.5 / n + 0.5 * sem
    weight = (1.0 / n) / prob
    expected = (weight / weight.max())[batch["index"]]
    torch.testing.assert_close(batch["priority_weight"], expected.float())
    # Items only reachable uniformly carry the largest weight.
    assert batch["priority_weight"][~torch.isin(batch["index"], index)].eq(1).all()


def test_uniform_items_scored_on_request():
    rb = filled(mixture_ratio=0.5, batch_size=64)
    batch = rb.sample()
    assert batch["hippo", "similarity"][~batch["hippo", "semantic"]].isnan().all()
    rb.sampler.score_uniform = True
    batch = rb.sample()
    uniform = ~batch["hippo", "semantic"]
    pool = rb.sampler._pool
    expected = (rb.storage.keys[batch["index"][uniform]] @ pool.queries.T).amax(1)
    torch.testing.assert_close(batch["hippo", "similarity"][uniform], expected)


def test_batches_are_shuffled():
    rb = filled(mixture_ratio=0.5, batch_size=64)
    semantic = rb.sample()["hippo", "semantic"]
    assert semantic.sum() == 32
    assert not semantic[:32].all()


def test_uniform_only_weights_are_one():
    rb = filled(mixture_ratio=0.0)
    assert rb.sample()["priority_weight"].eq(1).all()
    assert rb.sample()["hippo", "similarity"].isnan().all()


def test_default_anchors_favour_rare_high_return_episodes():
    rewards = [0.0] * 19 + [1.0]
    rb = filled(
        capacity=400,
        lengths=(20,) * 20,
        rewards=rewards,
        mixture_ratio=1.0,
        batch_size=512,
        top_k=3,
        num_anchors=8,
    )
    episode = rb.sample()["hippo", "episode"]
    # Anchors come from the one rewarded episode; their nearest neighbours are (mostly) its rows.
    share = (episode == 19).float().mean().item()
    assert share > 0.5, share
    uniform = filled(
        capacity=400, lengths=(20,) * 20, rewards=rewards, mixture_ratio=0.0, batch_size=512
    )
    assert (uniform.sample()["hippo", "episode"] == 19).float().mean().item() < 0.15


def test_queries_from_windows_and_from_keys():
    rb = filled()
    storage = rb.storage
    rows = torch.tensor([5, 50, 150])
    windows = storage.gather_windows(rows, rb.writer.encoder.window)
    rb.sampler.top_k = 1
    rb.sampler.mixture_ratio = 1.0
    rb.sampler.set_query(windows)
    # At construction online == target: each window's nearest key is its own row.
    assert set(rb.sample()["index"].tolist()) == set(rows.tolist())
    rb.sampler.set_query(storage.get(rows))  # a TensorDict carrying ("hippo", "key")
    assert set(rb.sample()["index"].tolist()) == set(rows.tolist())
    rb.sampler.set_query(storage.keys[rows[0]])  # one raw embedding
    assert set(rb.sample()["index"].tolist()) == {5}
    rb.sampler.set_query(None)
    assert rb.sample().shape == (16,)


class TestPoolCache:
    def test_reused_until_queries_or_keys_change(self):
        rb = filled()
        rb.sample()
        pool = rb.sampler._pool
        rb.sample()
        assert rb.sampler._pool is pool
        rb.sampler.set_query(torch.randn(4, 16))
        rb.sample()
        assert rb.sampler._pool is not pool
        pool = rb.sampler._pool
        rb.storage.bump_key_revision()  # e.g. consolidation refreshed the keys
        rb.sample()
        assert rb.sampler._pool is not pool

    def test_new_rows_are_merged_exactly_when_they_win(self):
        rb = filled(capacity=1000)
        rb.sampler.refresh_fraction = 0.5
        query = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
        rb.sampler.set_query(query)
        rb.sample()
        pool = rb.sampler._pool
        rb.extend(make_episodes([20, 20], seed=11))
        rb.sample()
        assert rb.sampler._pool is pool  # merged in place, not rebuilt
        score, index = topk_similarity_reference(query, rb.storage.keys, 3)
        torch.testing.assert_close(pool.score, score)
        assert pool.index.tolist() == index.tolist()

    @pytest.mark.parametrize("defer_keys", [False, True])
    def test_writer_rows_are_merged_not_rebuilt(self, defer_keys, monkeypatch):
        rb = make_buffer(10_000, defer_keys=defer_keys, refresh_fraction=0.5)
        rb.extend(make_episodes([20] * 20))
        rb.sample()
        builds = []
        build = HippoSampler._build_pool
        monkeypatch.setattr(
            HippoSampler, "_build_pool", lambda self, *a: builds.append(1) or build(self, *a)
        )
        for seed in range(6):
            rb.extend(make_episodes([10], seed=seed))
            rb.sample()
        assert builds == []
        pool = rb.sampler._pool
        score, index = topk_similarity_reference(pool.queries, rb.storage.keys, 3)
        torch.testing.assert_close(pool.score, score)
        assert pool.index.tolist() == index.tolist()

    def test_many_small_writes_add_up_to_a_rebuild(self):
        # Default anchors must follow new high-return episodes even when each write is small.
        rb = make_buffer(10_000, mixture_ratio=1.0, top_k=4, batch_size=256)
        rb.extend(make_episodes([20] * 200, reward=0.1))
        rb.sample()
        for seed in range(20):  # 2000 rows of high-return episodes, 100 rows per extend
            rb.extend(make_episodes([50, 50], reward=1.0, seed=seed))
            batch = rb.sample()
        assert (batch["hippo", "return"] > 10).float().mean() > 0.5

    def test_large_writes_trigger_a_rebuild(self):
        rb = filled(capacity=200)
        rb.sample()
        pool = rb.sampler._pool
        rb.extend(make_episodes([40], seed=3))
        rb.sample()
        assert rb.sampler._pool is not pool


class TestPriorities:
    def test_priorities_drive_the_base_draws(self):
        rb = filled(capacity=100, lengths=(10,) * 10, mixture_ratio=0.0, batch_size=2000)
        priority = torch.zeros(100)
        priority[:10] = 1.0
        rb.update_priority(torch.arange(100), priority)
        batch = rb.sample()
        assert (batch["index"] < 10).float().mean() > 0.99
        w = batch["priority_weight"]
        assert w.max() <= 1 and w.min() > 0

    def test_new_rows_enter_with_max_priority(self):
        rb = filled(capacity=300, mixture_ratio=0.0)
        rb.update_priority(torch.arange(200), torch.full((200,), 2.0))
        rb.extend(make_episodes([10], seed=9))
        assert rb.sampler._priority[200:210].eq(2.0).all()

    @pytest.mark.parametrize("priority", [float("nan"), -1.0, float("inf")])
    def test_bad_priorities(self, priority):
        rb = filled()
        with pytest.raises(ValueError, match="priority must be finite"):
            rb.update_priority(torch.tensor([0]), torch.tensor([priority]))


class TestErrors:
    def test_empty_memory(self):
        rb = make_buffer(10)
        with pytest.raises(RuntimeError, match="empty memory"):
            rb.sample()

    def test_top_k_larger_than_memory(self):
        rb = make_buffer(50, top_k=10)
        rb.extend(make_episodes([4]))
        with pytest.raises(ValueError, match="top_k=10 is larger than the memory"):
            rb.sample()

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"mixture_ratio": 1.5}, "mixture_ratio"),
            ({"mixture_ratio": -0.1}, "mixture_ratio"),
            ({"temperature": 0.0}, "temperature"),
            ({"temperature": -1.0}, "temperature"),
            ({"top_k": 0}, "top_k"),
            ({"num_anchors": 0}, "num_anchors"),
            ({"beta": 2.0}, "beta"),
            ({"refresh_fraction": 3.0}, "refresh_fraction"),
        ],
    )
    def test_bad_options(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            HippoSampler(**kwargs)

    def test_bad_queries(self):
        rb = filled()
        with pytest.raises(ValueError, match="size 5"):
            rb.sampler.set_query(torch.randn(2, 5))
            rb.sample()
        with pytest.raises(ValueError, match="NaN"):
            rb.sampler.set_query(torch.full((2, 16), float("nan")))
        with pytest.raises(TypeError, match="floating"):
            rb.sampler.set_query(torch.ones(2, 16, dtype=torch.long))
        with pytest.raises(TypeError, match="Tensor, a TensorDict"):
            rb.sampler.set_query([1.0, 2.0])

    def test_setters_validate(self):
        sampler = HippoSampler()
        with pytest.raises(ValueError, match="mixture_ratio"):
            sampler.mixture_ratio = 2.0


def test_access_counts_are_recorded():
    rb = filled(batch_size=50)
    rb.sample()
    assert rb.storage.episodes["access"].sum() == 50
    rb.sampler.track_access = False
    rb.sample()
    assert rb.storage.episodes["access"].sum() == 50


def test_sampling_honours_the_buffer_generator():
    outs = []
    for run in range(2):
        torch.manual_seed(0)
        rb = filled(mixture_ratio=0.5)
        rb.set_rng(torch.Generator().manual_seed(7))
        torch.manual_seed(100 + run)  # the global RNG differs between the two runs
        outs.append(torch.cat([rb.sample()["index"] for _ in range(3)]))
    assert outs[0].tolist() == outs[1].tolist()


def test_reproducible_under_manual_seed():
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        rb = filled(mixture_ratio=0.5)
        runs.append(rb.sample()["index"].tolist())
    assert runs[0] == runs[1]


def test_pickling_round_trip():
    import pickle

    rb = filled()
    rb.sample()
    clone = pickle.loads(pickle.dumps(rb))
    assert len(clone) == len(rb)
    assert isinstance(clone.sample(), TensorDict)


class TestApproximateRetrieval:
    def test_index_follows_writes_incrementally_and_matches_exact_retrieval(self, monkeypatch):
        pytest.importorskip("faiss")
        rb = make_buffer(2000, approx=True, refresh_fraction=0.5, top_k=3)
        rb.extend(make_episodes([50] * 10))
        rb.sample()
        index = rb.sampler._index
        assert len(index) == 500
        rb.extend(make_episodes([40], seed=4))
        rb.sample()
        assert rb.sampler._index is index and len(index) == 540  # updated, not rebuilt
        queries = rb.sampler._pool.queries
        _, rows = topk_similarity_reference(queries, rb.storage.keys, 3)
        # Below the IVF threshold the index answers exactly.
        assert rb.sampler._pool.index.tolist() == rows.tolist()
        rb.storage.bump_key_revision()  # keys changed in place: the mirror is rebuilt
        rb.sample()
        assert rb.sampler._index is not index and len(rb.sampler._index) == 540

    def test_approx_without_faiss_is_a_clear_error(self, monkeypatch):
        import torchrl_hippo.data.sampler as sampler_module

        def missing(what):
            raise ImportError(f"{what} needs faiss")

        monkeypatch.setattr(sampler_module, "_require_faiss", missing)
        with pytest.raises(ImportError, match="approx=True"):
            HippoSampler(approx=True)
