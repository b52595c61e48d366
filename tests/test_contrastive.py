"""ReturnAwareContrastiveLoss: values against a hand-written InfoNCE, gradients, keys, errors."""

import math

import pytest
import torch
from tensordict import TensorDict

from torchrl_hippo.modules import DualEncoder
from torchrl_hippo.objectives import ReturnAwareContrastiveLoss

OBS, ACT, EMBED, WINDOW = 3, 2, 8, 4


def make_encoder(**kwargs):
    return DualEncoder(OBS, ACT, EMBED, window=WINDOW, hidden_dim=16, **kwargs)


def windows(episode, step, ret):
    n = len(episode)
    return TensorDict(
        {
            "observation": torch.randn(n, WINDOW, OBS),
            "action": torch.randn(n, WINDOW, ACT),
            ("next", "reward"): torch.randn(n, WINDOW, 1),
            ("hippo", "window_mask"): torch.ones(n, WINDOW, dtype=torch.bool),
            ("hippo", "episode"): torch.tensor(episode),
            ("hippo", "step"): torch.tensor(step),
            ("hippo", "return"): torch.tensor(ret, dtype=torch.float32),
        },
        batch_size=[n],
    )


def tiny_batch():
    """Five anchors: temporal positives, a masked neighbour, a positive from another episode."""
    anchor = windows([0, 0, 1, 2, 3], [2, 6, 3, 1, 0], [1.0, 1.0, 4.0, 1.5, 4.2])
    positive = windows([0, 0, 1, 3, 2], [3, 4, 5, 0, 1], [1.0, 1.0, 4.0, 4.2, 1.5])
    return TensorDict(anchor=anchor, positive=positive, batch_size=[5])


def embed(encoder, td, *, target):
    return encoder.encode(
        td["observation"],
        td["action"],
        td["next", "reward"],
        td["hippo", "window_mask"],
        target=target,
    ).detach()


def hand_info_nce(q, k, qi, ki, *, tau, w, radius, mask_radius, bandwidth, queue=None):
    """The documented formula, element by element with Python floats."""
    losses = []
    for i in range(q.shape[0]):
        s, masked, temporal, by_return = [], [], [], []
        for j in range(k.shape[0]):
            same = qi["episode"][i] == ki["episode"][j]
            dt = abs(qi["step"][i] - ki["step"][j])
            s.append(float(q[i] @ k[j]) / tau)
            masked.append(same and radius < dt <= mask_radius)
            temporal.append(1.0 if same and dt <= radius else 0.0)
            gap = (qi["ret"][i] - ki["ret"][j]) / bandwidth
            by_return.append(0.0 if masked[j] or w == 0 else math.exp(-0.5 * gap * gap))
        t_sum, r_sum = sum(temporal), sum(by_return)
        if t_sum == 0 and r_sum == 0:
            continue  # no positive: left out of the mean
        w_i = 1.0 if t_sum == 0 else 0.0 if r_sum == 0 else w
        p = [
            (1 - w_i) * (t / t_sum if t_sum else 0.0) + w_i * (r / r_sum if r_sum else 0.0)
            for t, r in zip(temporal, by_return)
        ]
        terms = [sj for sj, m in zip(s, masked) if not m]
        if queue is not None:
            terms += [float(q[i] @ e) / tau for e in queue]
        lse = math.log(sum(math.exp(t) for t in terms))
        losses.append(lse - sum(pj * sj for pj, sj in zip(p, s)))
    return sum(losses) / len(losses)


def info(td):
    return {
        "episode": td["hippo", "episode"].tolist(),
        "step": td["hippo", "step"].tolist(),
        "ret": td["hippo", "return"].tolist(),
    }


@pytest.mark.parametrize(
    ("reward_weight", "mask_radius", "queue_size", "bandwidth", "temperature"),
    [
        (0.0, 0, 0, 1.0, 0.07),
        (1.0, 0, 0, 2.0, 0.07),
        (0.5, 3, 0, 1.0, 0.5),
        (0.3, 0, 0, None, 0.1),
        (0.5, 0, 6, 1.0, 0.07),
    ],
    ids=["time_only", "return_only", "blend_masked", "blend_auto_bandwidth", "blend_queue"],
)
def test_loss_equals_hand_computed_info_nce(
    reward_weight, mask_radius, queue_size, bandwidth, temperature
):
    encoder = make_encoder()
    loss_fn = ReturnAwareContrastiveLoss(
        encoder,
        temperature=temperature,
        reward_weight=reward_weight,
        positive_radius=1,
        mask_radius=mask_radius,
        return_bandwidth=bandwidth,
        queue_size=queue_size,
    )
    if queue_size:
        loss_fn(tiny_batch())  # training mode: fills the queue with 5 target keys
        assert int(loss_fn.queue_count) == 5
    batch = tiny_batch()
    loss_fn.eval()
    out = loss_fn(batch)
    q = embed(encoder, batch["anchor"], target=False)
    k = embed(encoder, batch["positive"], target=True)
    qi, ki = info(batch["anchor"]), info(batch["positive"])
    if bandwidth is None:
        bandwidth = 0.25 * torch.tensor(qi["ret"] + ki["ret"]).std(unbiased=False).item()
    queue = loss_fn.queue[:5] if queue_size else None
    common = dict(
        tau=temperature, radius=1, mask_radius=mask_radius, bandwidth=bandwidth, queue=queue
    )
    expected = hand_info_nce(q, k, qi, ki, w=reward_weight, **common)
    assert out["loss_contrastive"].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert out["temporal_nce"].item() == pytest.approx(
        hand_info_nce(q, k, qi, ki, w=0.0, **common), rel=1e-5, abs=1e-5
    )
    assert out["return_nce"].item() == pytest.approx(
        hand_info_nce(q, k, qi, ki, w=1.0, **common), rel=1e-5, abs=1e-5
    )
    assert out["pair_similarity"].item() == pytest.approx((q * k).sum(1).mean().item(), rel=1e-5)
    assert int(loss_fn.queue_count) == (5 if queue_size else 0)  # eval mode: no enqueue


def test_single_positive_case_is_cross_entropy():
    # One episode per row, the positive its own window's neighbour: the classic InfoNCE.
    encoder = make_encoder()
    anchor = windows([0, 1, 2, 3], [5, 5, 5, 5], [0.0, 1.0, 2.0, 3.0])
    positive = windows([0, 1, 2, 3], [6, 4, 6, 4], [0.0, 1.0, 2.0, 3.0])
    batch = TensorDict(anchor=anchor, positive=positive, batch_size=[4])
    loss_fn = ReturnAwareContrastiveLoss(encoder, reward_weight=0.0, positive_radius=1)
    logits = embed(encoder, anchor, target=False) @ embed(encoder, positive, target=True).T / 0.07
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    torch.testing.assert_close(loss_fn(batch)["loss_contrastive"].detach(), expected)


@pytest.mark.parametrize("reward_weight", [0.0, 0.25, 0.5, 1.0])
def test_loss_blends_its_parts_when_every_row_has_both_positives(reward_weight):
    anchor = windows([0, 0, 1, 2], [2, 6, 3, 1], [1.0, 1.0, 4.0, 1.5])
    positive = windows([0, 0, 1, 2], [3, 5, 2, 2], [1.0, 1.0, 4.0, 1.5])
    batch = TensorDict(anchor=anchor, positive=positive, batch_size=[4])
    out = ReturnAwareContrastiveLoss(make_encoder(), reward_weight=reward_weight)(batch)
    blend = (1 - reward_weight) * out["temporal_nce"] + reward_weight * out["return_nce"]
    torch.testing.assert_close(out["loss_contrastive"].detach(), blend)


def test_gradient_reaches_the_online_network_only():
    encoder = make_encoder()
    loss = ReturnAwareContrastiveLoss(encoder)(tiny_batch())["loss_contrastive"]
    loss.backward()
    assert all(p.grad is not None for p in encoder.online.parameters())
    assert all(p.grad is None for p in encoder.target.parameters())
    assert all(not p.requires_grad for p in encoder.target.parameters())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction):
    encoder = make_encoder()
    batch = tiny_batch().reshape(5, 1)  # any batch shape
    loss_fn = ReturnAwareContrastiveLoss(encoder, reduction=reduction, positive_radius=1)
    out = loss_fn(batch)
    per_row = ReturnAwareContrastiveLoss(encoder, reduction="none", positive_radius=1)(batch)
    assert per_row.shape == (5, 1)
    assert per_row["loss_contrastive"].shape == (5, 1)
    if reduction == "sum":
        torch.testing.assert_close(out["loss_contrastive"], per_row["loss_contrastive"].sum())
    elif reduction == "mean":
        assert out["loss_contrastive"].shape == ()


def test_queue_is_a_ring_of_the_latest_target_keys():
    encoder = make_encoder()
    loss_fn = ReturnAwareContrastiveLoss(encoder, queue_size=7)
    batches = [tiny_batch() for _ in range(3)]
    for batch in batches:
        loss_fn(batch)
    assert int(loss_fn.queue_count) == 15
    keys = torch.cat([embed(encoder, b["positive"], target=True) for b in batches])
    # 15 keys written in a ring of 7: slot s holds the last key written at a position = s mod 7.
    expected = torch.stack([keys[max(j for j in range(15) if j % 7 == s)] for s in range(7)])
    torch.testing.assert_close(loss_fn.queue, expected)


def test_set_keys_renames_the_inputs():
    encoder = make_encoder()
    loss_fn = ReturnAwareContrastiveLoss(encoder)
    loss_fn.set_keys(anchor=("pairs", "a"), positive=("pairs", "b"), episode_return="ret")
    batch = tiny_batch()
    renamed = TensorDict(batch_size=[5])
    for side, new in (("anchor", ("pairs", "a")), ("positive", ("pairs", "b"))):
        sub = batch[side]
        sub.rename_key_(("hippo", "return"), "ret")
        renamed.set(new, sub)
    assert ("pairs", "a", "observation") in loss_fn.in_keys
    assert ("pairs", "b", "ret") in loss_fn.in_keys
    assert loss_fn.out_keys[0] == "loss_contrastive"
    out = loss_fn(renamed)
    assert torch.isfinite(out["loss_contrastive"])
    with pytest.raises(ValueError, match="not an accepted tensordict key"):
        loss_fn.set_keys(anchors="x")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": 0.0}, ValueError, r"temperature must be a finite number > 0"),
        ({"temperature": -1.0}, ValueError, r"temperature must be a finite number > 0"),
        ({"temperature": "hot"}, TypeError, r"temperature must be a float"),
        ({"reward_weight": 1.5}, ValueError, r"reward_weight must be in \[0, 1\]"),
        ({"reward_weight": -0.1}, ValueError, r"reward_weight must be in \[0, 1\]"),
        ({"return_bandwidth": 0.0}, ValueError, r"return_bandwidth must be a finite number > 0"),
        ({"positive_radius": -1}, ValueError, r"positive_radius must be an int >= 0"),
        ({"mask_radius": 1.5}, ValueError, r"mask_radius must be an int >= 0"),
        ({"queue_size": -2}, ValueError, r"queue_size must be an int >= 0"),
        ({"reduction": "max"}, ValueError, r"reduction must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ReturnAwareContrastiveLoss(make_encoder(), **kwargs)


def test_encoder_must_be_a_dual_encoder():
    with pytest.raises(TypeError, match="encoder must be a DualEncoder"):
        ReturnAwareContrastiveLoss(torch.nn.Linear(2, 2))


def test_bad_batches():
    loss_fn = ReturnAwareContrastiveLoss(make_encoder())
    batch = tiny_batch()
    with pytest.raises(KeyError, match="no sub-TensorDict 'positive'"):
        loss_fn(batch.exclude("positive"))
    with pytest.raises(KeyError, match=r"no episode_return entry \('hippo', 'return'\)"):
        loss_fn(batch.exclude(("anchor", "hippo", "return")))
    nan_return = batch.clone()
    nan_return["positive", "hippo", "return"][1] = float("nan")
    with pytest.raises(ValueError, match=r"returns .* hold NaN or inf"):
        loss_fn(nan_return)
    nan_observation = batch.clone()
    nan_observation["anchor", "observation"][0, -1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="online encoder produced NaN"):
        loss_fn(nan_observation)
