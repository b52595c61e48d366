"""Tests of torchrl_hippo.modules.encoder.DualEncoder."""

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from torchrl_hippo.metrics import effective_rank, mean_pairwise_cosine
from torchrl_hippo.modules.encoder import DualEncoder

OBS_DIM, ACT_DIM, EMBED, WINDOW = 5, 3, 16, 6


def make_windows(n, observation_dim, action_dim, window, *, discrete=True, batch=None):
    """Standard-normal observations and rewards, random actions, full masks."""
    lead = (n,) if batch is None else tuple(batch)
    obs = torch.randn(*lead, window, observation_dim)
    if discrete:
        action = torch.randint(action_dim, (*lead, window))
    else:
        action = torch.randn(*lead, window, action_dim)
    reward = torch.randn(*lead, window, 1)
    mask = torch.ones(*lead, window, dtype=torch.bool)
    return obs, action, reward, mask


def make_td(n=7, batch=None, **kwargs):
    obs, action, reward, mask = make_windows(n, OBS_DIM, ACT_DIM, WINDOW, batch=batch, **kwargs)
    batch_size = [n] if batch is None else list(batch)
    return TensorDict(
        {
            "observation": obs,
            "action": action,
            ("next", "reward"): reward,
            ("hippo", "window_mask"): mask,
        },
        batch_size=batch_size,
    )


@pytest.fixture
def encoder():
    return DualEncoder(OBS_DIM, ACT_DIM, EMBED, window=WINDOW, hidden_dim=32)


def perturb_(module, scale):
    """Adds noise of ``scale`` times each parameter's RMS (or ``scale`` where the RMS is 0)."""
    with torch.no_grad():
        for p in module.parameters():
            rms = p.pow(2).mean().sqrt()
            p.add_(torch.randn_like(p), alpha=scale * (rms.item() or 1.0))


# ---------------------------------------------------------------------------- key health
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("discrete", [True, False], ids=["discrete", "continuous"])
@pytest.mark.parametrize("embed_dim", [32, 128])
@pytest.mark.parametrize("observation_dim", [4, 64])
def test_key_health_on_random_windows(observation_dim, embed_dim, discrete, seed):
    torch.manual_seed(seed)
    action_dim = 3 if discrete else 2
    enc = DualEncoder(observation_dim, action_dim, embed_dim)
    obs, action, reward, mask = make_windows(512, observation_dim, action_dim, 8, discrete=discrete)
    with torch.no_grad():
        for target in (False, True):
            keys = enc.encode(obs, action, reward, mask, target=target)
            assert mean_pairwise_cosine(keys) < 0.3
            assert effective_rank(keys) > embed_dim / 2


def test_key_health_with_padded_short_windows():
    # Windows near an episode start: 1 to 8 real steps, the rest padding.
    enc = DualEncoder(4, 2, 64)
    obs, action, reward, _ = make_windows(512, 4, 2, 8)
    lengths = torch.randint(1, 9, (512,))
    mask = torch.arange(8).flip(0) < lengths[:, None]
    with torch.no_grad():
        keys = enc.encode(obs, action, reward, mask, target=True)
    assert mean_pairwise_cosine(keys) < 0.3
    assert effective_rank(keys) > 32


# ---------------------------------------------------------------------------- determinism, modes
def test_target_keys_deterministic_with_dropout_in_train_mode():
    enc = DualEncoder(OBS_DIM, ACT_DIM, EMBED, window=WINDOW, hidden_dim=32, dropout=0.3)
    enc.train()
    obs, action, reward, mask = make_windows(64, OBS_DIM, ACT_DIM, WINDOW)
    first = enc.encode(obs, action, reward, mask, target=True)
    second = enc.encode(obs, action, reward, mask, target=True)
    assert torch.equal(first, second)
    online_a = enc.encode(obs, action, reward, mask)
    online_b = enc.encode(obs, action, reward, mask)
    assert not torch.allclose(online_a, online_b)
    enc.eval()
    assert torch.equal(enc.encode(obs, action, reward, mask), enc.encode(obs, action, reward, mask))


@pytest.mark.parametrize("mode", [True, False])
def test_target_stays_in_eval_mode(encoder, mode):
    encoder.train(mode)
    assert encoder.training is mode
    assert encoder.online.training is mode
    assert all(m.training is mode for m in encoder.online.modules())
    assert not any(m.training for m in encoder.target.modules())
    encoder.train()
    assert not any(m.training for m in encoder.target.modules())


# ---------------------------------------------------------------------------- one space
@pytest.mark.parametrize("updates", [0, 5])
def test_queries_retrieve_their_own_stored_key(updates):
    enc = DualEncoder(8, 4, 64, momentum=0.995)
    for _ in range(updates):
        perturb_(enc.online, 1e-2)
        enc.update_target()
    obs, action, reward, mask = make_windows(512, 8, 4, 8)
    with torch.no_grad():
        keys = enc.encode(obs, action, reward, mask, target=True)
        queries = enc.encode(obs, action, reward, mask)
    if updates:
        assert not torch.equal(keys, queries)
    nearest = (queries @ keys.T).argmax(dim=1)
    assert torch.equal(nearest, torch.arange(512))


# ---------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("target", [False, True])
@pytest.mark.parametrize("batch", [(), (4,), (2, 3)], ids=["unbatched", "flat", "2d"])
def test_forward_shapes_and_unit_norm(encoder, batch, target):
    td = make_td(batch=batch)
    out = encoder(td, target=target)
    assert out is td
    keys = td["hippo", "key"]
    assert keys.shape == (*batch, EMBED)
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(batch))
    flat = encoder.encode(
        td["observation"].reshape(-1, WINDOW, OBS_DIM),
        td["action"].reshape(-1, WINDOW),
        td["next", "reward"].reshape(-1, WINDOW, 1),
        target=target,
    )
    torch.testing.assert_close(keys.reshape(-1, EMBED), flat)


def test_empty_batch(encoder):
    obs, action, reward, mask = make_windows(0, OBS_DIM, ACT_DIM, WINDOW)
    assert encoder.encode(obs, action, reward, mask, target=True).shape == (0, EMBED)


def test_forward_without_mask_entry_means_all_real(encoder):
    td = make_td()
    with_mask = encoder(td.clone())["hippo", "key"]
    del td["hippo", "window_mask"]
    torch.testing.assert_close(encoder(td)["hippo", "key"], with_mask)


def test_batch_dims_and_integer_action_layouts(encoder):
    obs, action, reward, mask = make_windows(4, OBS_DIM, ACT_DIM, WINDOW)
    ref = encoder.encode(obs, action, reward, mask)
    torch.testing.assert_close(encoder.encode(obs, action, reward), ref)
    torch.testing.assert_close(encoder.encode(obs, action.unsqueeze(-1), reward), ref)
    torch.testing.assert_close(
        encoder.encode(obs, action.unsqueeze(-1), reward.squeeze(-1), batch_dims=1), ref
    )
    with pytest.raises(ValueError, match="batch_dims"):
        encoder.encode(obs, action, reward, batch_dims=-1)


def test_double_precision_module(encoder):
    encoder.double()
    obs, action, reward, mask = make_windows(4, OBS_DIM, ACT_DIM, WINDOW)
    for target in (False, True):
        keys = encoder.encode(obs, action, reward, mask, target=target)
        assert keys.dtype == torch.float64
        torch.testing.assert_close(keys.norm(dim=-1), torch.ones(4, dtype=torch.float64))


def test_reward_and_observation_layouts(encoder):
    obs, action, reward, mask = make_windows(9, OBS_DIM, ACT_DIM, WINDOW)
    ref = encoder.encode(obs, action, reward, mask)
    torch.testing.assert_close(encoder.encode(obs, action, reward.squeeze(-1), mask), ref)
    enc4 = DualEncoder(4, ACT_DIM, EMBED, window=WINDOW, hidden_dim=32)
    obs4 = torch.randn(9, WINDOW, 2, 2)
    torch.testing.assert_close(
        enc4.encode(obs4, action, reward, mask),
        enc4.encode(obs4.flatten(-2), action, reward, mask),
    )


@pytest.mark.parametrize("target", [False, True])
def test_masked_positions_are_ignored(encoder, target):
    obs, action, reward, _ = make_windows(10, OBS_DIM, ACT_DIM, WINDOW)
    mask = torch.ones(10, WINDOW, dtype=torch.bool)
    mask[:, :3] = False
    mask[0, :-1] = False  # only the current step is real
    clean = [obs.clone(), action.clone(), reward.clone()]
    for tensor in clean:
        tensor[~mask] = 0
    garbage_obs = obs.clone()
    garbage_obs[~mask] = float("nan")
    garbage_action = action.clone()
    garbage_action[~mask] = 99  # out of range, but masked
    garbage_reward = reward.clone()
    garbage_reward[~mask] = 1e6
    expected = encoder.encode(*clean, mask, target=target)
    got = encoder.encode(garbage_obs, garbage_action, garbage_reward, mask, target=target)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("length", [1, 3, WINDOW])
def test_short_windows_align_on_the_last_step(encoder, length):
    obs, action, reward, _ = make_windows(6, OBS_DIM, ACT_DIM, WINDOW)
    mask = torch.zeros(6, WINDOW, dtype=torch.bool)
    mask[:, WINDOW - length :] = True
    padded = encoder.encode(obs, action, reward, mask, target=True)
    short = encoder.encode(obs[:, -length:], action[:, -length:], reward[:, -length:], target=True)
    torch.testing.assert_close(short, padded)


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no_mask"])
@pytest.mark.parametrize(
    "layout",
    ["index", "index_1", "int32", "bool", "int_one_hot", "bool_one_hot"],
    ids=lambda s: f"action_{s}",
)
def test_integer_actions_equal_their_one_hot(layout, with_mask):
    action_dim = 2 if layout == "bool" else ACT_DIM
    enc = DualEncoder(OBS_DIM, action_dim, EMBED, window=WINDOW, hidden_dim=32)
    obs, index, reward, mask = make_windows(8, OBS_DIM, action_dim, WINDOW)
    one_hot = nn.functional.one_hot(index, action_dim)
    action = {
        "index": index,
        "index_1": index.unsqueeze(-1),
        "int32": index.int(),
        "bool": index.bool(),
        "int_one_hot": one_hot,  # what TorchRL's OneHot action specs produce
        "bool_one_hot": one_hot.bool(),
    }[layout]
    mask = mask if with_mask else None
    for target in (False, True):
        torch.testing.assert_close(
            enc.encode(obs, action, reward, mask, target=target),
            enc.encode(obs, one_hot.float(), reward, mask, target=target),
        )


def test_forward_with_integer_one_hot_actions(encoder):
    td = make_td(batch=(2, 3))
    ref = encoder(td.clone())["hippo", "key"]
    td["action"] = nn.functional.one_hot(td["action"], ACT_DIM)
    torch.testing.assert_close(encoder(td)["hippo", "key"], ref)


def test_observation_encoder_is_used_and_copied():
    obs_encoder = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.BatchNorm1d(4))
    enc = DualEncoder(4, 2, EMBED, window=4, hidden_dim=32, observation_encoder=obs_encoder)
    assert enc.online.observation_encoder is obs_encoder
    assert enc.target.observation_encoder is not obs_encoder
    obs = torch.randn(5, 4, 2, 3)
    action = torch.randint(2, (5, 4))
    reward = torch.randn(5, 4)
    enc.train()
    keys = enc.encode(obs, action, reward)  # updates the online BatchNorm statistics
    assert keys.shape == (5, EMBED)
    online_stats = enc.online.observation_encoder[2].running_mean
    target_stats = enc.target.observation_encoder[2].running_mean
    assert not torch.equal(online_stats, target_stats)
    enc.update_target()
    assert torch.equal(online_stats, target_stats)
    assert enc.encode(obs, action, reward, target=True).shape == (5, EMBED)


# ---------------------------------------------------------------------------- target updates
@pytest.mark.parametrize("momentum", [None, 0.0, 0.9, 1.0])
def test_update_target_is_the_ema_formula(encoder, momentum):
    perturb_(encoder.online, 0.1)
    before = {k: v.clone() for k, v in encoder.target.state_dict().items()}
    online = {k: v.clone() for k, v in encoder.online.state_dict().items()}
    assert not all(torch.equal(before[k], online[k]) for k in before)
    encoder.update_target(momentum)
    m = encoder.momentum if momentum is None else momentum
    for name, value in encoder.target.state_dict().items():
        torch.testing.assert_close(value, m * before[name] + (1 - m) * online[name])
    assert not any(p.requires_grad for p in encoder.target.parameters())


def test_update_target_bumps_version(encoder):
    assert encoder.version.dtype == torch.int64
    assert encoder.version.shape == ()
    assert int(encoder.version) == 0
    for expected in (1, 2, 3):
        encoder.update_target()
        assert int(encoder.version) == expected


# ---------------------------------------------------------------------------- keys of the TD
def test_default_keys(encoder):
    assert encoder.in_keys == [
        "observation",
        "action",
        ("next", "reward"),
        ("hippo", "window_mask"),
    ]
    assert encoder.out_keys == [("hippo", "key")]


def test_constructor_keys():
    enc = DualEncoder(
        OBS_DIM,
        ACT_DIM,
        EMBED,
        observation_key="obs",
        action_key=("agent", "action"),
        reward_key="reward",
        mask_key="mask",
        out_key=("memory", "query"),
    )
    assert enc.in_keys == ["obs", ("agent", "action"), "reward", "mask"]
    assert enc.out_keys == [("memory", "query")]


def test_set_keys_changes_what_forward_reads_and_writes(encoder):
    td = make_td()
    ref = encoder(td.clone())["hippo", "key"]
    renamed = TensorDict(
        {
            "obs": td["observation"],
            ("agent", "act"): td["action"],
            "r": td["next", "reward"],
            "m": td["hippo", "window_mask"],
        },
        batch_size=td.batch_size,
    )
    returned = encoder.set_keys(
        observation="obs", action=("agent", "act"), reward="r", mask="m", key=("out", "k")
    )
    assert returned is encoder
    assert encoder.in_keys == ["obs", ("agent", "act"), "r", "m"]
    assert encoder.out_keys == [("out", "k")]
    encoder(renamed)
    torch.testing.assert_close(renamed["out", "k"], ref)
    assert ("hippo", "key") not in renamed.keys(include_nested=True)


def test_set_keys_partial(encoder):
    encoder.set_keys(key="q")
    assert encoder.out_keys == ["q"]
    assert encoder.in_keys[0] == "observation"


# ---------------------------------------------------------------------------- gradients, state
def test_gradients_reach_online_parameters_only(encoder):
    obs, action, reward, mask = make_windows(16, OBS_DIM, ACT_DIM, WINDOW)
    stored = encoder.encode(obs, action, reward, mask, target=True)
    assert not stored.requires_grad
    queries = encoder.encode(obs, action, reward, mask)
    loss = -(queries * stored).sum(-1).mean() + queries.pow(3).sum()
    loss.backward()
    for name, p in encoder.online.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in encoder.online.parameters())
    assert all(p.grad is None for p in encoder.target.parameters())


def test_state_dict_round_trip(encoder):
    perturb_(encoder.online, 0.05)
    encoder.update_target(0.5)
    encoder.update_target()
    state = encoder.state_dict()
    assert "version" in state
    clone = DualEncoder(OBS_DIM, ACT_DIM, EMBED, window=WINDOW, hidden_dim=32)
    clone.load_state_dict(state)
    assert int(clone.version) == 2
    obs, action, reward, mask = make_windows(8, OBS_DIM, ACT_DIM, WINDOW)
    for target in (False, True):
        torch.testing.assert_close(
            clone.encode(obs, action, reward, mask, target=target),
            encoder.encode(obs, action, reward, mask, target=target),
        )


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"observation_dim": 0}, ValueError, "observation_dim"),
        ({"observation_dim": 4.0}, TypeError, "observation_dim"),
        ({"action_dim": -1}, ValueError, "action_dim"),
        ({"embed_dim": 0}, ValueError, "embed_dim"),
        ({"window": 0}, ValueError, "window"),
        ({"hidden_dim": 0}, ValueError, "hidden_dim"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"momentum": "high"}, TypeError, "momentum"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"observation_encoder": "cnn"}, TypeError, "observation_encoder"),
        ({"out_key": 3}, TypeError, "key"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    args = {"observation_dim": OBS_DIM, "action_dim": ACT_DIM, "embed_dim": EMBED, **kwargs}
    with pytest.raises(error, match=match):
        DualEncoder(
            args.pop("observation_dim"), args.pop("action_dim"), args.pop("embed_dim"), **args
        )


def _bad_inputs():
    n, w = 4, WINDOW
    obs, action, reward, mask = make_windows(n, OBS_DIM, ACT_DIM, w)
    cases = {
        "obs_features": (
            (torch.randn(n, w, OBS_DIM + 1), action, reward, mask),
            ValueError,
            "observation",
        ),
        "obs_dtype": ((obs.long(), action, reward, mask), TypeError, "observation"),
        "obs_batch": (
            (torch.randn(n + 1, w, OBS_DIM), action, reward, mask),
            ValueError,
            "observation",
        ),
        "window_too_long": (
            make_windows(n, OBS_DIM, ACT_DIM, w + 1),
            ValueError,
            f"exceeds window={w}",
        ),
        "action_batch": ((obs, action[:-1], reward, mask), ValueError, "action"),
        "action_dim": (
            (obs, torch.randn(n, w, ACT_DIM + 1), reward, mask),
            ValueError,
            "action_dim",
        ),
        "int_action_width": (
            (obs, torch.zeros(n, w, ACT_DIM + 1, dtype=torch.long), reward, mask),
            ValueError,
            "integer one-hot",
        ),
        "action_range": ((obs, torch.full((n, w), ACT_DIM), reward, mask), ValueError, "action"),
        "action_negative": ((obs, torch.full((n, w), -1), reward, mask), ValueError, "action"),
        "reward_shape": ((obs, action, torch.randn(n, w, 2), mask), ValueError, "reward"),
        "reward_batch": ((obs, action, torch.randn(n, w - 1), mask), ValueError, "reward"),
        "mask_dtype": ((obs, action, reward, mask.float()), TypeError, "mask"),
        "mask_shape": ((obs, action, reward, mask[:, 1:]), ValueError, "observation|mask"),
        "not_a_tensor": ((obs.tolist(), action, reward, mask), TypeError, "observation"),
    }
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize(("inputs", "error", "match"), _bad_inputs())
def test_encode_rejects_bad_inputs(encoder, inputs, error, match):
    with pytest.raises(error, match=match):
        encoder.encode(*inputs)


@pytest.mark.parametrize("missing", ["observation", "action", ("next", "reward")])
def test_forward_names_a_missing_entry(encoder, missing):
    td = make_td()
    del td[missing]
    name = missing if isinstance(missing, str) else missing[-1]
    with pytest.raises(KeyError, match=name):
        encoder(td)


def test_forward_rejects_non_tensordict(encoder):
    with pytest.raises(TypeError, match="tensordict"):
        encoder(torch.randn(3, WINDOW, OBS_DIM))


@pytest.mark.parametrize(
    ("momentum", "error"), [(1.01, ValueError), (-1.0, ValueError), ("x", TypeError)]
)
def test_update_target_rejects_bad_momentum(encoder, momentum, error):
    with pytest.raises(error, match="momentum"):
        encoder.update_target(momentum)
    assert int(encoder.version) == 0


def test_set_keys_rejects_unknown_names(encoder):
    with pytest.raises(ValueError, match=r"unknown key name\(s\) \['obs', 'output'\]"):
        encoder.set_keys(obs="x", output="y")


def test_observation_encoder_with_wrong_output_size():
    enc = DualEncoder(4, 2, EMBED, window=4, hidden_dim=32, observation_encoder=nn.Linear(3, 5))
    with pytest.raises(ValueError, match="observation_encoder"):
        enc.encode(torch.randn(2, 4, 3), torch.randint(2, (2, 4)), torch.randn(2, 4))
