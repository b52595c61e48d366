"""Consolidator, ConsolidationHook and reporting: does consolidation do its job, safely?"""

import copy
import re
from pathlib import Path

import pytest
import torch
from conftest import make_buffer, make_episodes
from tensordict import TensorDict
from torchrl.record.loggers import CSVLogger, TensorboardLogger

from torchrl_hippo import metrics
from torchrl_hippo.consolidation import (
    ConsolidationHook,
    Consolidator,
    eligible_rows,
    log_key_snapshot,
    log_metrics,
)
from torchrl_hippo.data.storage import HIPPO_KEYS
from torchrl_hippo.search import topk_similarity_reference

OBS, WINDOW = 4, 4


def filled(lengths=(10,) * 12, capacity=500, rewards=None, **kwargs):
    rb = make_buffer(capacity, obs_dim=OBS, window=WINDOW, **kwargs)
    rewards = [float(i % 4) for i in range(len(lengths))] if rewards is None else rewards
    rb.extend(make_episodes(list(lengths), obs_dim=OBS, reward=rewards))
    return rb


def snapshot(consolidator):
    return (
        copy.deepcopy(consolidator.encoder.state_dict()),
        copy.deepcopy(consolidator.optimizer.state_dict()),
    )


def assert_same_state(a, b):
    def flat(obj, prefix=""):
        if isinstance(obj, dict):
            for key, value in obj.items():
                yield from flat(value, f"{prefix}/{key}")
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                yield from flat(value, f"{prefix}/{i}")
        else:
            yield prefix, obj

    left, right = dict(flat(a)), dict(flat(b))
    assert left.keys() == right.keys()
    for name, value in left.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, right[name]), name
        else:
            assert value == right[name], name


# ---------------------------------------------------------------------------------------------
# Consolidation does its job
# ---------------------------------------------------------------------------------------------
def two_group_memory(episodes_per_group=20, length=16, shift=0.2, episode_scale=0.5):
    """Episodes in a high-return and a low-return group whose observations differ subtly.

    Every observation is N(0, 1) noise plus an episode offset N(0, episode_scale^2), plus
    +shift (high group) or -shift (low group) on each feature: per step the groups overlap
    almost entirely, and the episode offsets are larger than the group shift. The reward is
    sparse: 1 at the last step of a high-return episode, 0 everywhere else, so a window says
    nothing about its group through its rewards (except the very last one).
    """
    n = 2 * episodes_per_group
    data = make_episodes([length] * n, obs_dim=OBS, reward=0.0, seed=1)
    high = torch.arange(n) % 2 == 1
    offset = episode_scale * torch.randn(n, OBS) + shift * (2 * high.float() - 1)[:, None]
    data["observation"] = data["observation"] + offset.repeat_interleave(length, 0)
    reward = torch.zeros(n * length, 1)
    reward[torch.arange(1, n + 1) * length - 1, 0] = high.float()
    data["next", "reward"] = reward
    rb = make_buffer(1000, obs_dim=OBS, window=WINDOW, embed_dim=16)
    rb.extend(data)
    return rb


def chance_level(storage, num_bins):
    """Probability that a random key's return falls in a given key's return bin."""
    ret = storage.get(eligible_rows(storage))["hippo", "return"].double()
    edges = torch.quantile(ret, torch.arange(1, num_bins).double() / num_bins)
    share = torch.bincount(torch.bucketize(ret, edges)).double() / ret.numel()
    return float(share.square().sum())


def test_reward_clustering_makes_nearest_neighbours_share_returns():
    rb = two_group_memory()
    consolidator = Consolidator(
        rb.writer.encoder, reward_weight=1.0, lr=2e-3, momentum=0.95, quality_bins=2
    )
    chance = chance_level(rb.storage, 2)
    before = consolidator.key_quality(rb)
    out = consolidator.consolidate(rb, steps=300, batch_size=64, report_quality=True)
    print(
        f"nn_return_consistency: chance {chance:.3f}, before {before['nn_return_consistency']:.3f}, after {out['nn_return_consistency']:.3f}"
    )
    print(
        f"reward_alignment: before {before['reward_alignment']:.3f}, after {out['reward_alignment']:.3f}"
    )
    assert abs(before["nn_return_consistency"].item() - chance) < 0.15  # at chance before
    assert out["nn_return_consistency"].item() >= 0.9
    assert out["reward_alignment"].item() > before["reward_alignment"].item() + 0.3
    assert out["refreshed_rows"].item() == rb.storage.num_valid  # measured on refreshed keys


def test_time_clustering_brings_temporal_neighbours_nearer():
    rb = two_group_memory()
    consolidator = Consolidator(rb.writer.encoder, reward_weight=0.0, lr=2e-3, momentum=0.95)
    before = consolidator.key_quality(rb)
    out = consolidator.consolidate(rb, steps=250, batch_size=64, report_quality=True)
    print(
        f"temporal_margin: before {before['temporal_margin']:.3f}, after {out['temporal_margin']:.3f}"
    )
    assert out["temporal_margin"].item() > 0
    assert out["temporal_margin"].item() > before["temporal_margin"].item() + 0.2
    # Clustering by time is not clustering by return.
    assert out["nn_return_consistency"].item() < 0.9


# ---------------------------------------------------------------------------------------------
# The steps: momentum update, key refresh, sampler cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, None])
def test_momentum_update_follows_the_ema_formula(momentum):
    rb = filled()
    encoder = rb.writer.encoder
    consolidator = Consolidator(encoder, momentum=momentum)
    m = encoder.momentum if momentum is None else momentum
    target_before = [p.clone() for p in encoder.target.parameters()]
    online_before = [p.clone() for p in encoder.online.parameters()]
    out = consolidator.consolidate(rb, steps=1, batch_size=16)
    assert int(encoder.version) == 1 and int(out["version"]) == 1
    for before, p_online, p_target in zip(
        target_before, encoder.online.parameters(), encoder.target.parameters()
    ):
        torch.testing.assert_close(p_target, m * before + (1 - m) * p_online)
    assert any(not torch.equal(a, b) for a, b in zip(online_before, encoder.online.parameters()))


def test_each_step_updates_the_target():
    rb = filled()
    out = Consolidator(rb.writer.encoder).consolidate(rb, steps=4, batch_size=16)
    assert int(out["version"]) == int(rb.writer.encoder.version) == 4


def three_generation_memory():
    """Rows written under encoder versions 0 (episodes A), 1 (B); the target is now at 2."""
    rb = make_buffer(500, obs_dim=OBS, window=WINDOW)
    encoder = rb.writer.encoder
    rb.extend(make_episodes([10, 10, 10], obs_dim=OBS, seed=1))  # A: rows 0..29
    for _ in range(2):
        with torch.no_grad():
            for p in encoder.online.parameters():
                p.add_(0.1 * torch.randn_like(p))
        encoder.update_target(0.0)
        if int(encoder.version) == 1:
            rb.extend(make_episodes([10, 10], obs_dim=OBS, seed=2))  # B: rows 30..49
    return rb


def target_keys(rb, rows):
    encoder = rb.writer.encoder
    windows = rb.storage.gather_windows(rows, encoder.window)
    return encoder(windows, target=True)["hippo", "key"]


@pytest.mark.parametrize("chunk", [7, 4096])
def test_refresh_takes_the_stalest_rows_and_leaves_the_others(chunk):
    rb = three_generation_memory()
    storage = rb.storage
    keys_before = storage.keys.clone()
    version = storage._storage.get(HIPPO_KEYS["key_version"])
    assert version[:30].eq(0).all() and version[30:50].eq(1).all()
    revision = storage.key_revision
    consolidator = Consolidator(rb.writer.encoder, refresh_fraction=0.6, refresh_chunk=chunk)
    assert consolidator.refresh_keys(rb) == 30  # ceil(0.6 * 50) stalest rows: all of A
    assert version[:30].eq(2).all() and version[30:50].eq(1).all()
    torch.testing.assert_close(storage.keys[:30], target_keys(rb, torch.arange(30)))
    assert not torch.allclose(storage.keys[:30], keys_before[:30])
    assert torch.equal(storage.keys[30:50], keys_before[30:50])  # untouched
    assert storage.key_revision == revision + 1
    # Rows computed by the current target are skipped: only B is left.
    consolidator.refresh_fraction = 1.0
    assert consolidator.refresh_keys(rb) == 20
    assert version[:50].eq(2).all()
    torch.testing.assert_close(storage.keys[30:50], target_keys(rb, torch.arange(30, 50)))
    assert consolidator.refresh_keys(rb) == 0
    assert storage.key_revision == revision + 2  # nothing written, no bump


@pytest.mark.parametrize("refresh_fraction", [0.0, 1.0])
def test_deferred_keys_are_encoded_first(refresh_fraction):
    rb = filled(defer_keys=True)
    storage = rb.storage
    n = storage.num_valid
    consolidator = Consolidator(rb.writer.encoder, refresh_fraction=refresh_fraction)
    out = consolidator.consolidate(rb, steps=0, batch_size=8, report_quality=True)
    # Refreshed by the consolidator (fraction 1), or by the quality report's encode_pending.
    assert int(out["refreshed_rows"]) == (n if refresh_fraction else 0)
    assert storage._storage.get(HIPPO_KEYS["key_version"])[:n].eq(0).all()
    torch.testing.assert_close(storage.keys, target_keys(rb, torch.arange(n)))
    assert torch.isfinite(out["effective_rank"])


def test_refresh_fraction_zero_refreshes_nothing():
    rb = three_generation_memory()
    out = Consolidator(rb.writer.encoder, refresh_fraction=0.0).consolidate(rb, 0, 8)
    assert int(out["refreshed_rows"]) == 0
    assert out["key_staleness"].item() == pytest.approx((30 * 2 + 20 * 1) / 50)


def test_sampler_retrieval_pool_is_rebuilt_from_the_new_keys():
    rb = filled(mixture_ratio=1.0, top_k=4)
    rb.sampler.set_query(torch.randn(3, 16))
    rb.sample()
    pool = rb.sampler._pool
    Consolidator(rb.writer.encoder).consolidate(rb, steps=2, batch_size=16)
    batch = rb.sample()
    assert rb.sampler._pool is not pool
    scores, index = topk_similarity_reference(rb.sampler._pool.queries, rb.storage.keys, 4)
    torch.testing.assert_close(rb.sampler._pool.score, scores)
    assert set(batch["index"].tolist()) <= set(index.flatten().tolist())


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
TRAIN_KEYS = {"loss_contrastive", "temporal_nce", "return_nce", "pair_similarity", "grad_norm"}
BASE_KEYS = {"steps", "version", "refreshed_rows", "key_staleness"}
QUALITY_KEYS = {
    "retrieval_sharpness",
    "reward_alignment",
    "nn_return_consistency",
    "temporal_margin",
    "effective_rank",
    "collapse_score",
    "mean_cosine",
}


@pytest.mark.parametrize(("steps", "quality"), [(0, False), (2, False), (2, True), (0, True)])
def test_metric_entries(steps, quality):
    rb = filled()
    out = Consolidator(rb.writer.encoder, report_quality=quality).consolidate(rb, steps, 16)
    expected = BASE_KEYS | (TRAIN_KEYS if steps else set()) | (QUALITY_KEYS if quality else set())
    assert set(out.keys()) == expected
    assert all(v.shape == () for v in out.values())
    assert int(out["steps"]) == steps
    assert out["key_staleness"].item() == 0.0


def test_quality_metrics_are_the_documented_formulas_on_the_stored_keys():
    rb = filled()
    consolidator = Consolidator(rb.writer.encoder, quality_rows=10_000, quality_top_k=3)
    quality = consolidator.key_quality(rb)
    rows = eligible_rows(rb.storage)
    data = rb.storage.get(rows)
    keys, ret = data["hippo", "key"], data["hippo", "return"]
    episode, step = data["hippo", "episode"], data["hippo", "step"]
    expected = {
        "retrieval_sharpness": metrics.retrieval_sharpness(keys, 3),
        "reward_alignment": metrics.reward_alignment(keys, ret),
        "nn_return_consistency": metrics.nn_return_consistency(keys, ret, episode),
        "temporal_margin": metrics.temporal_margin(keys, episode, step, radius=2),
        "effective_rank": metrics.effective_rank(keys),
        "collapse_score": metrics.collapse_score(keys),
        "mean_cosine": metrics.mean_pairwise_cosine(keys),
    }
    for name, value in expected.items():
        torch.testing.assert_close(quality[name], value.float(), msg=name)


def test_quality_on_a_sample_of_the_memory():
    rb = filled()
    quality = Consolidator(rb.writer.encoder, quality_rows=40).key_quality(rb)
    assert set(quality) == QUALITY_KEYS
    assert 0.0 <= quality["collapse_score"].item() <= 1.0


# ---------------------------------------------------------------------------------------------
# Empty and tiny memories, bad input, NaN
# ---------------------------------------------------------------------------------------------
def test_empty_memory_is_a_clear_error():
    rb = make_buffer(100, obs_dim=OBS, window=WINDOW)
    consolidator = Consolidator(rb.writer.encoder)
    for call in (
        lambda: consolidator.consolidate(rb, steps=5, batch_size=8),
        lambda: consolidator.consolidate(rb, steps=0, batch_size=8),
        lambda: consolidator.refresh_keys(rb),
        lambda: consolidator.key_quality(rb),
    ):
        with pytest.raises(RuntimeError, match="Cannot consolidate an empty memory"):
            call()


def test_tiny_memory_is_a_clear_error_and_leaves_the_encoder_alone():
    rb = filled(lengths=(3,), rewards=[1.0])
    consolidator = Consolidator(rb.writer.encoder)
    state = snapshot(consolidator)
    with pytest.raises(ValueError, match=r"batch_size=8 is larger than the 3 row\(s\)"):
        consolidator.consolidate(rb, steps=5, batch_size=8)
    assert_same_state(state, snapshot(consolidator))
    # Too small for the quality metrics: nan, not an error.
    quality = Consolidator(rb.writer.encoder).key_quality(filled(lengths=(1,), rewards=[1.0]))
    assert all(torch.isnan(v) for v in quality.values())


def test_only_a_running_episode_is_a_clear_error():
    rb = make_buffer(100, obs_dim=OBS, window=WINDOW)
    data = make_episodes([20], obs_dim=OBS)
    data["next", "done"][-1] = False
    rb.extend(data)
    with pytest.raises(RuntimeError, match="no finished episode"):
        Consolidator(rb.writer.encoder).consolidate(rb, steps=1, batch_size=8)
    out = Consolidator(rb.writer.encoder, include_running=True).consolidate(rb, 1, 8)
    assert int(out["steps"]) == 1


def test_zero_steps_only_refreshes_and_reports():
    rb = three_generation_memory()
    consolidator = Consolidator(rb.writer.encoder)
    online = copy.deepcopy(rb.writer.encoder.online.state_dict())
    out = consolidator.consolidate(rb, steps=0, batch_size=8)
    assert int(out["refreshed_rows"]) == 50 and int(out["version"]) == 2
    assert_same_state(online, rb.writer.encoder.online.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": -1}, ValueError, "steps must be an int >= 0"),
        ({"steps": 1.5}, ValueError, "steps must be an int >= 0"),
        ({"batch_size": 1}, ValueError, "batch_size must be an int >= 2"),
        ({"rb_or_storage": object()}, TypeError, "needs a HippoStorage"),
    ],
)
def test_bad_consolidate_arguments(kwargs, error, match):
    rb = filled()
    args = {"rb_or_storage": rb, "steps": 1, "batch_size": 8, **kwargs}
    with pytest.raises(error, match=match):
        Consolidator(rb.writer.encoder).consolidate(**args)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reward_weight": 1.2}, ValueError, r"reward_weight must be in \[0, 1\]"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"positive_radius": 0}, ValueError, "positive_radius must be a positive int"),
        ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\]"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm must be > 0"),
        ({"refresh_fraction": -0.1}, ValueError, r"refresh_fraction must be in \[0, 1\]"),
        ({"refresh_chunk": 0}, ValueError, "refresh_chunk must be an int >= 1"),
        ({"quality_rows": 1}, ValueError, "quality_rows must be an int >= 2"),
        ({"lr": 0.0}, ValueError, "lr must be > 0"),
        ({"optimizer": "adam"}, TypeError, "optimizer must be a torch.optim.Optimizer"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Consolidator(make_buffer(10).writer.encoder, **kwargs)


def _nan_observations(consolidator, rb):
    rb.storage._storage.get("observation").fill_(float("nan"))


def _nan_gradient(consolidator, rb):
    weight = consolidator.encoder.online.head[-1].weight
    weight.register_hook(lambda grad: grad * float("nan"))


def _nan_loss(consolidator, rb):
    def forward(batch):
        nan = torch.tensor(float("nan"), requires_grad=True)
        return TensorDict(loss_contrastive=nan * 1.0)

    consolidator.loss_module.forward = forward


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (_nan_observations, "encoder produced NaN or inf embeddings"),
        (_nan_gradient, r"consolidation step 1/3: the gradient norm is nan"),
        (_nan_loss, r"consolidation step 1/3: the contrastive loss is nan"),
    ],
    ids=["nan_observations", "nan_gradient", "nan_loss"],
)
def test_nan_stops_with_a_clear_error_and_corrupts_nothing(corrupt, match):
    rb = filled()
    consolidator = Consolidator(rb.writer.encoder)
    consolidator.consolidate(rb, steps=2, batch_size=16)  # the optimiser now has state
    state = snapshot(consolidator)
    keys = rb.storage.keys.clone()
    corrupt(consolidator, rb)
    with pytest.raises(FloatingPointError, match=match):
        consolidator.consolidate(rb, steps=3, batch_size=16)
    assert_same_state(state, snapshot(consolidator))
    assert torch.equal(rb.storage.keys, keys)
    assert all(p.grad is None for p in consolidator.encoder.online.parameters())


def test_refresh_needs_the_writers_encoder():
    rb = filled()
    other = make_buffer(10, obs_dim=OBS, window=WINDOW).writer.encoder
    with pytest.raises(ValueError, match="written by another encoder"):
        Consolidator(other).consolidate(rb, steps=0, batch_size=8)


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------
def test_state_dict_round_trip_resumes_identically():
    rb = filled()
    first = Consolidator(rb.writer.encoder, queue_size=32)
    first.consolidate(rb, steps=3, batch_size=16)
    state = copy.deepcopy(first.state_dict())
    twin_rb = filled()  # the same data, another encoder
    twin = Consolidator(twin_rb.writer.encoder, queue_size=32)
    twin.load_state_dict(state)
    assert_same_state(snapshot(first), snapshot(twin))
    assert torch.equal(first.loss_module.queue, twin.loss_module.queue)
    for consolidator, memory in ((first, rb), (twin, twin_rb)):
        torch.manual_seed(3)
        consolidator.consolidate(memory, steps=1, batch_size=16)
    for a, b in zip(first.encoder.online.parameters(), twin.encoder.online.parameters()):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Hook and logging
# ---------------------------------------------------------------------------------------------
class RecordingTrainer:
    """What ConsolidationHook.register needs from a torchrl Trainer."""

    def __init__(self):
        self.ops, self.modules = [], {}

    def register_op(self, dest, op, **kwargs):
        self.ops.append((dest, op))

    def register_module(self, name, module):
        self.modules[name] = module


def test_hook_consolidates_every_interval_batches(tmp_path):
    rb = make_buffer(1000, obs_dim=OBS, window=WINDOW)
    logger = CSVLogger("run", log_dir=str(tmp_path))
    hook = ConsolidationHook(
        Consolidator(rb.writer.encoder), rb, interval=3, steps=2, batch_size=16, logger=logger
    )
    trainer = RecordingTrainer()
    hook.register(trainer)
    assert trainer.ops == [("post_steps_log", hook)] and trainer.modules["consolidation"] is hook
    results = []
    for i in range(7):
        rb.extend(make_episodes([10, 10], obs_dim=OBS, seed=i))
        results.append(hook(TensorDict(batch_size=[])))
    assert [r is not None for r in results] == [False, False, True, False, False, True, False]
    assert results[2]["consolidation/steps"] == 2.0
    assert int(rb.writer.encoder.version) == 4
    scalars = logger.experiment.scalars
    assert [step for step, _ in scalars["consolidation/loss_contrastive"]] == [3, 6]
    state = hook.state_dict()
    resumed = ConsolidationHook(Consolidator(rb.writer.encoder), rb, interval=3)
    resumed.load_state_dict(state)
    assert resumed.calls == 7


def test_hook_waits_for_enough_data():
    rb = make_buffer(1000, obs_dim=OBS, window=WINDOW)
    hook = ConsolidationHook(Consolidator(rb.writer.encoder), rb, interval=1, batch_size=32)
    assert hook() is None  # empty memory
    rb.extend(make_episodes([10, 10], obs_dim=OBS))
    assert hook() is None  # 20 rows < batch_size
    rb.extend(make_episodes([10, 10], obs_dim=OBS))
    assert hook() is not None
    with pytest.raises(ValueError, match="interval must be an int >= 1"):
        ConsolidationHook(Consolidator(rb.writer.encoder), rb, interval=0)


def test_log_metrics_names_and_errors(tmp_path):
    logger = CSVLogger("run", log_dir=str(tmp_path))
    out = log_metrics(logger, {"a": torch.tensor(1.0), "b": 2}, step=5, prefix="sleep")
    assert out == {"sleep/a": 1.0, "sleep/b": 2.0}
    assert logger.experiment.scalars["sleep/a"] == [(5, 1.0)]
    assert log_metrics(None, TensorDict({("x", "y"): torch.tensor(3.0)}), 0, prefix="") == {
        "x/y": 3.0
    }
    with pytest.raises(ValueError, match="metric 'v' is not a scalar"):
        log_metrics(None, {"v": torch.ones(2)}, 0)
    with pytest.raises(TypeError, match="logger must be a torchrl Logger"):
        log_metrics(object(), {}, 0)


def test_key_snapshot_writes_projector_and_png(tmp_path):
    rb = filled()
    logger = TensorboardLogger("run", log_dir=str(tmp_path))
    png = log_key_snapshot(logger, rb, step=7, max_points=50)
    logger.experiment.close()
    assert png == Path(logger.log_dir) / "memory_keys_pca_step7.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = (Path(logger.log_dir) / "projector_config.pbtxt").read_text()
    assert "memory/keys" in config
    metadata_path = re.search(r'metadata_path: "([^"]+)"', config).group(1)
    lines = (Path(logger.log_dir) / metadata_path).read_text().strip().split("\n")
    assert lines[0] == "return\tepisode" and len(lines) == 51
    returns = {float(line.split("\t")[0]) for line in lines[1:]}
    assert returns <= {0.0, 10.0, 20.0, 30.0}
    assert list(Path(logger.log_dir).glob("events.out.tfevents.*"))


def test_key_snapshot_errors(tmp_path):
    rb = filled(lengths=(1,), rewards=[1.0])
    with pytest.raises(TypeError, match="needs a logger that writes to TensorBoard"):
        log_key_snapshot(CSVLogger("run", log_dir=str(tmp_path)), rb, 0)
    with pytest.raises(ValueError, match="at least 2 keys"):
        log_key_snapshot(TensorboardLogger("run", log_dir=str(tmp_path)), rb, 0)
