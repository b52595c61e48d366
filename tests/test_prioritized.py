"""TorchPrioritizedSampler: distribution, weights, updates, TorchRL integration and state."""

import pickle

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, ReplayBuffer, TensorDictReplayBuffer
from torchrl.data.replay_buffers.samplers import PrioritizedSampler, Sampler
from torchrl.data.replay_buffers.scheduler import LinearScheduler

from torchrl_hippo.data.prioritized import TorchPrioritizedSampler


def _buffer(capacity=16, n=8, *, alpha=1.0, beta=1.0, batch_size=4096, ndim=1, **kwargs):
    rb = TensorDictReplayBuffer(
        storage=LazyTensorStorage(capacity, ndim=ndim),
        sampler=TorchPrioritizedSampler(capacity, alpha=alpha, beta=beta, **kwargs),
        priority_key="td_error",
        batch_size=batch_size,
    )
    if n:
        rb.extend(TensorDict({"obs": torch.arange(float(n))}, batch_size=[n]))
    return rb


def _expected_probs(priority, alpha, eps=1e-8):
    w = (priority.double() + eps) ** alpha
    return w / w.sum()


def test_is_a_torchrl_prioritized_sampler():
    sampler = TorchPrioritizedSampler(8, alpha=0.6, beta=0.4)
    assert isinstance(sampler, PrioritizedSampler)
    assert isinstance(sampler, Sampler)
    assert "alpha=0.6" in repr(sampler)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_capacity": 0}, "max_capacity"),
        ({"max_capacity": 2.5}, "max_capacity"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"beta": -1.0}, "beta"),
        ({"eps": -1e-3}, "eps"),
        ({"reduction": "sum"}, "reduction"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"max_capacity": 8, "alpha": 0.6, "beta": 0.4} | kwargs
    with pytest.raises(ValueError, match=match):
        TorchPrioritizedSampler(**args)


def test_alpha_beta_type_errors():
    with pytest.raises(TypeError, match="alpha"):
        TorchPrioritizedSampler(8, alpha="1", beta=0.4)
    sampler = TorchPrioritizedSampler(8, alpha=0.6, beta=0.4)
    with pytest.raises(ValueError, match="beta"):
        sampler.beta = -0.5


def test_new_rows_get_the_default_priority():
    rb = _buffer(n=4)
    index = rb.sample()["index"]
    counts = torch.bincount(index, minlength=4).double() / index.numel()
    assert torch.allclose(counts, torch.full((4,), 0.25, dtype=torch.float64), atol=0.04)
    assert (rb.sample()["priority_weight"] == 1).all()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_sampling_follows_priorities(alpha):
    rb = _buffer(n=8, alpha=alpha, batch_size=20_000)
    priority = torch.tensor([0.1, 1.0, 2.0, 4.0, 0.0, 3.0, 0.5, 8.0])
    rb.update_priority(torch.arange(8), priority)
    index = rb.sample()["index"]
    freq = torch.bincount(index, minlength=8).double() / index.numel()
    assert torch.allclose(freq, _expected_probs(priority, alpha), atol=0.015)


@pytest.mark.parametrize("capacity", [1000, 5000])
def test_many_blocks_and_a_partial_last_block(capacity):
    n = 700  # several blocks, the last one partly outside the storage
    rb = _buffer(capacity=capacity, n=n, alpha=0.8, batch_size=100_000)
    assert rb.sampler._num_blocks > 1
    priority = torch.rand(n, generator=torch.Generator().manual_seed(1)) ** 3
    priority[::7] = 0.0
    rb.update_priority(torch.arange(n), priority)
    rb.update_priority(torch.arange(n, n + 50), 1e6)  # beyond len(storage): never drawn
    index = rb.sample()["index"]
    assert int(index.max()) < n
    freq = torch.bincount(index, minlength=n).double() / index.numel()
    expected = _expected_probs(priority, 0.8)
    assert (freq - expected).abs().max() < 0.004
    assert (freq - expected).abs().sum() < 0.1  # total variation


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_importance_weights(beta):
    rb = _buffer(n=4, alpha=0.5, beta=beta, batch_size=64)
    priority = torch.tensor([1.0, 4.0, 9.0, 16.0])
    rb.update_priority(torch.arange(4), priority)
    batch = rb.sample()
    w = (priority.double() + 1e-8) ** 0.5
    expected = ((w / w.min()) ** -beta)[batch["index"]].float()
    assert torch.allclose(batch["priority_weight"], expected, rtol=1e-5)
    assert batch["priority_weight"].max() <= 1.0


def test_rows_without_priority_are_never_drawn():
    storage = LazyTensorStorage(8)
    storage.set(torch.arange(6), TensorDict({"obs": torch.arange(6.0)}, batch_size=[6]))
    sampler = TorchPrioritizedSampler(8, alpha=1.0, beta=1.0)
    with pytest.raises(RuntimeError, match="no row of the storage has a positive priority"):
        sampler.sample(storage, 4)
    sampler.update_priority(torch.tensor([1, 4]), 2.0)
    index, info = sampler.sample(storage, 2000)
    assert set(index.tolist()) == {1, 4}
    assert (info["priority_weight"] == 1).all()


def test_empty_storage_raises():
    rb = _buffer(n=0, batch_size=4)
    with pytest.raises(RuntimeError, match="empty storage"):
        rb.sample()


def test_default_priority_is_the_largest_seen():
    rb = _buffer(n=2)
    assert rb.sampler.default_priority == 1.0
    rb.update_priority(torch.tensor([0, 1]), torch.tensor([0.5, 7.0]))
    assert rb.sampler.default_priority == 7.0
    rb.update_priority(torch.tensor([1]), torch.tensor([0.1]))
    assert rb.sampler.default_priority == 7.0  # since construction
    rb.extend(TensorDict({"obs": torch.ones(1)}, batch_size=[1]))
    assert rb.sampler._priority[2] == 7.0


def test_default_priority_within_buffer():
    rb = _buffer(n=2, max_priority_within_buffer=True)
    rb.update_priority(torch.tensor([0, 1]), torch.tensor([0.5, 7.0]))
    rb.update_priority(torch.tensor([1]), torch.tensor([0.1]))
    assert rb.sampler.default_priority == 0.5


def test_update_tensordict_priority_with_dqn_td_error():
    rb = _buffer(n=8, batch_size=256)
    batch = rb.sample()
    batch["td_error"] = (batch["index"] == 5).float().unsqueeze(-1) * 100.0
    rb.update_tensordict_priority(batch)
    assert (rb.sample()["index"] == 5).float().mean() > 0.99


def test_update_priority_validation():
    sampler = _buffer(n=4).sampler
    with pytest.raises(ValueError, match="3 values for 2 indices"):
        sampler.update_priority(torch.tensor([0, 1]), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="finite and >= 0"):
        sampler.update_priority(torch.tensor([0]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="finite and >= 0"):
        sampler.update_priority(torch.tensor([0]), torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="out of range"):
        sampler.update_priority(torch.tensor([16]), 1.0)
    before = sampler._priority.clone()
    sampler.update_priority(torch.tensor([-1, 2]), torch.tensor([5.0, 3.0]))  # -1: not written
    assert sampler._priority[2] == 3.0
    assert torch.equal(sampler._priority[:2], before[:2])


def test_alpha_change_is_exact():
    rb = _buffer(n=4, alpha=1.0, batch_size=20_000)
    priority = torch.tensor([1.0, 2.0, 3.0, 10.0])
    rb.update_priority(torch.arange(4), priority)
    rb.sampler.alpha = 0.25
    index = rb.sample()["index"]
    freq = torch.bincount(index, minlength=4).double() / index.numel()
    assert torch.allclose(freq, _expected_probs(priority, 0.25), atol=0.015)


def test_beta_scheduler():
    rb = _buffer(n=4, beta=0.4)
    scheduler = LinearScheduler(rb, "beta", final_value=1.0, num_steps=3)
    for _ in range(3):
        scheduler.step()
    assert rb.sampler.beta == pytest.approx(1.0)


def test_multidimensional_storage():
    rb = _buffer(capacity=12, n=0, ndim=2, batch_size=2000)
    rb.extend(TensorDict({"obs": torch.arange(6.0).reshape(2, 3)}, batch_size=[2, 3]))
    storage = rb.storage
    assert len(storage) == 6
    batch = rb.sample()
    assert batch["index"].shape == (2000, 2)
    # all priority on the row whose obs is 4 (env 1, time 1)
    rows, cols = torch.nonzero(storage[:]["obs"] == 4, as_tuple=True)
    rb.update_priority((rows, cols), torch.tensor([50.0]))
    rb.update_priority(
        torch.stack([torch.arange(3).repeat_interleave(2), torch.arange(2).repeat(3)], -1)[
            (storage[:]["obs"] != 4).reshape(-1)
        ],
        torch.zeros(5),
    )
    assert (rb.sample()["obs"] == 4).float().mean() > 0.99


def _draws(rb, seed, n=5):
    rb.set_rng(torch.Generator().manual_seed(seed))
    return [rb.sample()["index"] for _ in range(n)]


def test_reproducible_with_the_buffer_generator():
    rb = _buffer(n=8, batch_size=16)
    rb.update_priority(torch.arange(8), torch.arange(1.0, 9.0))
    a, b = _draws(rb, 3), _draws(rb, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("roundtrip", ["state_dict", "dumps", "pickle"])
def test_roundtrip(roundtrip, tmp_path):
    rb = _buffer(n=8, alpha=0.7, beta=0.3, batch_size=16)
    rb.update_priority(torch.arange(8), torch.arange(8.0) ** 2)
    sampler = rb.sampler
    if roundtrip == "state_dict":
        other = TorchPrioritizedSampler(16, alpha=0.1, beta=0.9)
        other.load_state_dict(sampler.state_dict())
    elif roundtrip == "dumps":
        sampler.dumps(tmp_path / "sampler")
        other = TorchPrioritizedSampler(16, alpha=0.1, beta=0.9)
        other.loads(tmp_path / "sampler")
    else:
        other = pickle.loads(pickle.dumps(sampler))
    assert (other.alpha, other.beta, other.default_priority) == (0.7, 0.3, 49.0)
    assert torch.equal(other._priority, sampler._priority)
    for s in (sampler, other):
        s._rng = torch.Generator().manual_seed(0)
    a, b = sampler.sample(rb.storage, 32), other.sample(rb.storage, 32)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1]["priority_weight"], b[1]["priority_weight"])


def test_load_state_dict_rejects_another_capacity():
    state = TorchPrioritizedSampler(8, alpha=0.5, beta=0.5).state_dict()
    with pytest.raises(ValueError, match="max_capacity=8"):
        TorchPrioritizedSampler(4, alpha=0.5, beta=0.5).load_state_dict(state)


def test_empty_resets_priorities():
    rb = _buffer(n=4)
    rb.update_priority(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 9.0]))
    rb.empty()
    assert rb.sampler.default_priority == 1.0
    assert not rb.sampler._written.any()


def test_plain_replay_buffer():
    rb = ReplayBuffer(
        storage=LazyTensorStorage(8),
        sampler=TorchPrioritizedSampler(8, alpha=1.0, beta=0.5),
        batch_size=1000,
    )
    rb.extend(torch.arange(5.0))
    rb.update_priority(torch.arange(5), torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))
    data, info = rb.sample(return_info=True)
    assert (data == 2.0).all()
    assert (info["index"] == 2).all()
