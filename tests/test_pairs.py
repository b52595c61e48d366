"""PairSampler: which windows it pairs, from which rows, and its errors."""

import pytest
import torch
from conftest import make_buffer, make_episodes

from torchrl_hippo.consolidation import PairSampler, eligible_rows

WINDOW = 4


def filled(lengths=(12,) * 10, rewards=None, capacity=500, **kwargs):
    rb = make_buffer(capacity, window=WINDOW, **kwargs)
    if rewards is None:
        rewards = [float(i) for i in range(len(lengths))]  # distinct returns
    rb.extend(make_episodes(list(lengths), reward=rewards))
    return rb


def draw(sampler, storage, batches, batch_size=50):
    """Several batches of pairs, concatenated."""
    return torch.cat([sampler.sample(storage, batch_size) for _ in range(batches)])


def columns(storage, rows):
    data = storage.get(rows)
    return data["hippo", "episode"], data["hippo", "step"], data["hippo", "return"]


@pytest.mark.parametrize("forgetting", ["fifo", "importance"])
@pytest.mark.parametrize("radius", [1, 3])
def test_temporal_positives_are_near_neighbours_of_the_same_episode(forgetting, radius):
    # The memory wraps (fifo) or evicts (importance): rows of one episode are not contiguous
    # and the oldest episodes are partial.
    rb = filled(lengths=(7, 13, 9, 30, 5, 11) * 3, capacity=150, forgetting=forgetting)
    sampler = PairSampler(WINDOW, positive_radius=radius, reward_weight=0.0)
    pairs = draw(sampler, rb.storage, 6)
    ep_a, st_a, _ = columns(rb.storage, pairs["anchor", "index"])
    ep_p, st_p, _ = columns(rb.storage, pairs["positive", "index"])
    assert (ep_a == ep_p).all()
    gap = st_p - st_a
    assert ((gap != 0) & (gap.abs() <= radius)).all()
    assert not pairs["by_return"].any()
    # Both directions and every allowed offset come up.
    assert set(gap.tolist()) == set(range(-radius, radius + 1)) - {0}


def test_pairs_carry_their_windows_and_row_data():
    rb = filled()
    pairs = PairSampler(WINDOW).sample(rb.storage, 32)
    assert pairs.batch_size == (32,)
    for side in ("anchor", "positive"):
        rows = pairs[side, "index"]
        expected = rb.storage.gather_windows(rows, WINDOW)
        for key in ("observation", "action", ("next", "reward"), ("hippo", "window_mask")):
            torch.testing.assert_close(pairs[side].get(key), expected.get(key))
        episode, step, ret = columns(rb.storage, rows)
        assert (pairs[side, "hippo", "episode"] == episode).all()
        assert (pairs[side, "hippo", "step"] == step).all()
        torch.testing.assert_close(pairs[side, "hippo", "return"], ret)
    assert pairs["anchor", "observation"].shape == (32, WINDOW, 3)


@pytest.mark.parametrize("neighbours", [1, 2])
def test_return_positives_come_from_other_episodes_of_similar_return(neighbours):
    rb = filled(lengths=(6,) * 20, rewards=[float(i) for i in range(20)])
    sampler = PairSampler(WINDOW, reward_weight=1.0, return_neighbours=neighbours)
    pairs = draw(sampler, rb.storage, 4)
    ep_a, _, ret_a = columns(rb.storage, pairs["anchor", "index"])
    ep_p, _, ret_p = columns(rb.storage, pairs["positive", "index"])
    assert pairs["by_return"].all()
    assert (ep_a != ep_p).all()
    # Returns are 6 * i, one episode per rank: the rank gap is |ret gap| / 6.
    rank_gap = ((ret_a - ret_p) / 6).abs().round()
    assert ((rank_gap >= 1) & (rank_gap <= neighbours)).all()
    assert set(rank_gap.tolist()) == set(range(1, neighbours + 1))


def test_tied_returns_pair_across_the_whole_tie():
    rb = filled(lengths=(6,) * 12, rewards=[1.0] * 12)  # every return is 6
    sampler = PairSampler(WINDOW, reward_weight=1.0, return_neighbours=1)
    partners = set()
    for _ in range(10):
        pairs = sampler.sample(rb.storage, 64)
        ep_a, _, _ = columns(rb.storage, pairs["anchor", "index"])
        ep_p, _, _ = columns(rb.storage, pairs["positive", "index"])
        partners |= {(a, p) for a, p in zip(ep_a.tolist(), ep_p.tolist()) if a == 0}
    assert len(partners) > 3  # ties are reshuffled per batch, not a fixed neighbour


@pytest.mark.parametrize("reward_weight", [0.25, 0.75])
def test_reward_weight_is_the_share_of_return_positives(reward_weight):
    rb = filled()
    pairs = draw(PairSampler(WINDOW, reward_weight=reward_weight), rb.storage, 40, 100)
    assert abs(pairs["by_return"].float().mean().item() - reward_weight) < 0.03


def test_single_episode_and_one_step_episodes():
    rb = filled(lengths=(1, 1, 1), rewards=[0.0, 1.0, 2.0])
    pairs = PairSampler(WINDOW, reward_weight=0.0).sample(rb.storage, 3)
    assert (pairs["anchor", "index"] == pairs["positive", "index"]).all()  # its own positive
    rb = filled(lengths=(10,), rewards=[1.0])
    pairs = PairSampler(WINDOW, reward_weight=1.0).sample(rb.storage, 8)
    assert not pairs["by_return"].any()  # no other episode: temporal positives


def test_running_episodes_are_left_out_unless_asked():
    rb = make_buffer(200, window=WINDOW)
    data = make_episodes([10, 10], reward=1.0)
    data["next", "done"][-1] = False  # the second episode is still running
    rb.extend(data)
    assert eligible_rows(rb.storage).tolist() == list(range(10))
    pairs = PairSampler(WINDOW).sample(rb.storage, 10)
    assert (pairs["anchor", "index"] < 10).all() and (pairs["positive", "index"] < 10).all()
    sampler = PairSampler(WINDOW, include_running=True)
    assert sampler.num_eligible(rb.storage) == 20
    assert (draw(sampler, rb.storage, 4, 20)["anchor", "index"] >= 10).any()


def test_index_follows_new_writes():
    rb = filled(lengths=(10,) * 3)
    sampler = PairSampler(WINDOW)
    assert sampler.num_eligible(rb.storage) == 30
    rb.extend(make_episodes([5, 5], reward=1.0, seed=3))
    assert sampler.num_eligible(rb.storage) == 40
    assert (draw(sampler, rb.storage, 4, 20)["anchor", "index"] >= 30).any()


def test_reproducible_with_a_generator():
    rb = filled()
    draws = [
        PairSampler(WINDOW, generator=torch.Generator().manual_seed(5)).sample(rb.storage, 16)
        for _ in range(2)
    ]
    for side in ("anchor", "positive"):
        assert torch.equal(draws[0][side, "index"], draws[1][side, "index"])


def test_errors():
    rb = make_buffer(100, window=WINDOW)
    sampler = PairSampler(WINDOW)
    with pytest.raises(RuntimeError, match="Cannot consolidate an empty memory"):
        sampler.sample(rb.storage, 4)
    data = make_episodes([6])
    data["next", "done"][-1] = False
    rb.extend(data)
    with pytest.raises(RuntimeError, match=r"no finished episode .*include_running=True"):
        sampler.sample(rb.storage, 4)
    rb = make_buffer(100, window=WINDOW)
    rb.extend(make_episodes([3]))
    with pytest.raises(ValueError, match=r"batch_size=8 is larger than the 3 row\(s\)"):
        sampler.sample(rb.storage, 8)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        sampler.sample(rb.storage, 0)
    with pytest.raises(TypeError, match="storage must be a HippoStorage"):
        eligible_rows(object())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"positive_radius": 0}, ValueError, "positive_radius must be a positive int"),
        ({"return_neighbours": 0}, ValueError, "return_neighbours must be a positive int"),
        ({"reward_weight": 2.0}, ValueError, r"reward_weight must be in \[0, 1\]"),
        ({"reward_weight": None}, TypeError, "reward_weight must be a float"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        PairSampler(WINDOW, **kwargs)
