"""MixtureRatioScheduler: the linear and cosine ramps of a sampler's mixture_ratio."""

import itertools
import math

import pytest
from conftest import make_buffer, make_episodes
from torchrl.data import RandomSampler

from torchrl_hippo import HippoSampler
from torchrl_hippo.consolidation import MixtureRatioScheduler


def expected(t, start, end, warmup, num_steps, shape):
    if t <= warmup:
        return start
    x = min(1.0, (t - warmup) / num_steps)
    f = x if shape == "linear" else 0.5 - 0.5 * math.cos(math.pi * x)
    return start + (end - start) * f


@pytest.mark.parametrize("shape", ["linear", "cosine"])
@pytest.mark.parametrize(("start", "end"), [(0.2, 0.5), (0.8, 0.1)])
@pytest.mark.parametrize(("warmup", "num_steps"), [(0, 4), (3, 10)])
def test_ramp_follows_its_formula(shape, start, end, warmup, num_steps):
    sampler = HippoSampler()
    schedule = MixtureRatioScheduler(
        sampler, end, initial_value=start, warmup_steps=warmup, num_steps=num_steps, shape=shape
    )
    assert sampler.mixture_ratio == start
    seen = []
    for t in range(1, warmup + num_steps + 5):
        schedule.step()
        seen.append(sampler.mixture_ratio)
        assert sampler.mixture_ratio == pytest.approx(
            expected(t, start, end, warmup, num_steps, shape)
        )
        assert schedule.value_at(t) == pytest.approx(sampler.mixture_ratio)
    assert seen[-1] == pytest.approx(end)
    direction = 1 if end > start else -1
    assert all(direction * (b - a) >= -1e-12 for a, b in itertools.pairwise(seen))  # monotonic


def test_cosine_starts_and_ends_flat():
    schedule = MixtureRatioScheduler(HippoSampler(), 0.5, num_steps=100, shape="cosine")
    first = schedule.value_at(1) - schedule.value_at(0)
    middle = schedule.value_at(51) - schedule.value_at(50)
    last = schedule.value_at(100) - schedule.value_at(99)
    assert first < middle / 10 and last < middle / 10


def test_drives_the_sampler_of_a_replay_buffer_and_its_batches():
    rb = make_buffer(200, mixture_ratio=0.9, batch_size=20)
    schedule = MixtureRatioScheduler(rb, 0.5, num_steps=2, initial_value=None)
    assert schedule.initial_val == 0.9  # None keeps the sampler's value
    schedule.step()
    schedule.step()
    assert rb.sampler.mixture_ratio == pytest.approx(0.5)


def test_batches_follow_the_schedule():
    rb = make_buffer(200, batch_size=20)
    rb.extend(make_episodes([20] * 5))
    schedule = MixtureRatioScheduler(rb, 0.5, num_steps=3)  # 0.2 -> 0.5
    counts = []
    for _ in range(4):
        counts.append(int(rb.sample()["hippo", "semantic"].sum()))
        schedule.step()
    assert counts == [4, 6, 8, 10]


def test_state_dict_resumes_mid_ramp():
    sampler = HippoSampler()
    schedule = MixtureRatioScheduler(sampler, 0.6, num_steps=10, shape="cosine")
    for _ in range(4):
        schedule.step()
    state = schedule.state_dict()
    other_sampler = HippoSampler()
    resumed = MixtureRatioScheduler(other_sampler, 0.6, num_steps=10, shape="cosine")
    resumed.load_state_dict(state)
    schedule.step()
    resumed.step()
    assert other_sampler.mixture_ratio == sampler.mixture_ratio


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_steps": 0}, "num_steps must be an int >= 1"),
        ({"num_steps": 5, "warmup_steps": -1}, "warmup_steps must be an int >= 0"),
        ({"num_steps": 5, "shape": "step"}, "shape must be one of"),
        ({"num_steps": 5, "final_value": 1.5}, r"final_value must be in \[0, 1\]"),
        ({"num_steps": 5, "initial_value": -0.5}, r"initial_value must be in \[0, 1\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureRatioScheduler(HippoSampler(), **kwargs)


def test_sampler_without_mixture_ratio():
    with pytest.raises(ValueError, match="does not have an attribute mixture_ratio"):
        MixtureRatioScheduler(RandomSampler(), num_steps=3)
