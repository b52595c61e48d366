"""Tests of HierarchicalMemory, MemoryELBOLoss and the PPO builder."""

import itertools

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictSequential
from torchrl.collectors import Collector
from torchrl.envs import GymEnv, InitTracker, SerialEnv, TensorDictPrimer, TransformedEnv
from torchrl.envs.utils import check_env_specs
from torchrl.modules import set_recurrent_mode
from torchrl.modules.utils import get_primers_from_module
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from torchrl_hippo.modules.builders import make_hierarchical_actor_critic
from torchrl_hippo.modules.compression import BufferVAE
from torchrl_hippo.modules.hierarchical import HierarchicalMemory, MemoryELBOLoss

EMBED = 6
SMALL = dict(immediate_slots=4, short_term_slots=2, long_term_slots=2, latent_dim=3)
STATE_NAMES = [
    "immediate",
    "steps",
    "short_term",
    "short_term_usage",
    "short_term_time",
    "long_term",
    "long_term_count",
]


def make_memory(**kwargs):
    return HierarchicalMemory(EMBED, **(SMALL | kwargs))


def trajectory(batch, steps, resets=(), *, seed=0):
    """``[batch, steps]`` embeddings with ``is_init`` at 0 and at the given steps."""
    g = torch.Generator().manual_seed(seed)
    is_init = torch.zeros(batch, steps, 1, dtype=torch.bool)
    is_init[:, 0] = True
    for t in resets:
        is_init[:, t] = True
    return TensorDict(
        {"embed": torch.randn(batch, steps, EMBED, generator=g), "is_init": is_init},
        [batch, steps],
    )


def run_sequential(memory, data):
    """Steps through ``data`` [B, T] one step at a time, carrying the state as a collector does."""
    outputs = []
    state = memory.state_spec.zero(data.shape[:1])  # what the primer writes at reset
    for t in range(data.shape[1]):
        step = data[:, t].select("embed", "is_init")
        step.set(memory._keys["state"], state.copy())
        out = memory(step)
        outputs.append(out)
        state = out["next", memory._keys["state"]]
    return torch.stack(outputs, 1)


def run_recurrent(memory, data):
    with set_recurrent_mode(True):
        return memory(data.clone())


# ---------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape", [(), (3,), (2, 3)])
def test_sequential_shapes(shape):
    memory = make_memory()
    td = TensorDict(
        {"embed": torch.randn(*shape, EMBED), "is_init": torch.ones(*shape, 1, dtype=torch.bool)},
        shape,
    )
    out = memory(td)
    assert out["hmem", "readout"].shape == (*shape, EMBED)
    for name, spec in memory.state_spec.items():
        assert out["next", "hmem", name].shape == (*shape, *spec.shape)
        assert out["next", "hmem", name].dtype == spec.dtype
    assert (out["next", "hmem", "steps"] == 1).all()


@pytest.mark.parametrize("shape", [(7,), (2, 7), (2, 3, 7)])
def test_recurrent_shapes(shape):
    memory = make_memory()
    td = TensorDict(
        {"embed": torch.randn(*shape, EMBED), "is_init": torch.zeros(*shape, 1, dtype=torch.bool)},
        shape,
    )
    out = run_recurrent(memory, td)
    assert out["hmem", "readout"].shape == (*shape, EMBED)
    assert out["next", "hmem", "short_term"].shape == (*shape, 2, 3)
    # No state given: the memory starts empty, so after t + 1 steps it has seen t + 1 embeddings.
    expected = torch.arange(1, 8).expand(*shape[:-1], 7).unsqueeze(-1)
    assert torch.equal(out["next", "hmem", "steps"], expected)


def test_slot_counts_are_attributes_and_defaults():
    memory = HierarchicalMemory(16)
    assert (memory.immediate_slots, memory.short_term_slots, memory.long_term_slots) == (32, 16, 8)
    assert memory.latent_dim == 32
    assert memory.in_keys[0] == "embed" and memory.out_keys[0] == ("hmem", "readout")
    assert memory.in_keys[-1] == "is_init"
    assert memory.out_keys[1:] == [("next", *key) for key in memory.in_keys[1:-1]]


# ---------------------------------------------------------------------------------- reset
def test_is_init_resets_every_level():
    memory = make_memory()
    data = trajectory(3, 13)
    full = run_recurrent(memory, data)
    # A step whose stored state is full of content, flagged is_init, reads an empty memory.
    step = TensorDict({"embed": data["embed"][:, 5], "is_init": torch.ones(3, 1, dtype=bool)}, [3])
    stale = step.clone().update(full["next"][:, 12].select("hmem"))
    assert (stale["hmem", "long_term_count"] > 0).all()
    fresh = memory(step.clone())
    reset = memory(stale)
    torch.testing.assert_close(reset["hmem", "readout"], fresh["hmem", "readout"])
    for name in STATE_NAMES:
        torch.testing.assert_close(reset["next", "hmem", name], fresh["next", "hmem", name])
    # Without the flag, the stored content changes the read-out.
    stale["is_init"] = torch.zeros(3, 1, dtype=bool)
    kept = memory(stale)
    assert not torch.allclose(kept["hmem", "readout"], fresh["hmem", "readout"])


# ---------------------------------------------------------------------------------- primer
def test_primer_matches_the_state():
    memory = make_memory(state_key=("agent", "memory"))
    primer = memory.make_tensordict_primer()
    assert isinstance(primer, TensorDictPrimer)
    keys = set(primer.primers.keys(True, True))
    assert keys == {("agent", "memory", name) for name in STATE_NAMES}
    assert primer.primers["agent", "memory", "immediate"].shape == (4, EMBED)


def test_primer_is_found_and_registered_automatically():
    memory = make_memory()
    policy = TensorDictSequential(
        TensorDictModule(torch.nn.Linear(4, EMBED), in_keys=["observation"], out_keys=["embed"]),
        memory,
        TensorDictModule(
            lambda readout: torch.nn.functional.one_hot(readout[..., :2].argmax(-1), 2),
            in_keys=[("hmem", "readout")],
            out_keys=["action"],
        ),
    )
    primer = get_primers_from_module(policy)
    assert isinstance(primer, TensorDictPrimer)
    assert set(primer.primers.keys(True, True)) == set(memory.in_keys[1:-1])

    env = TransformedEnv(GymEnv("CartPole-v1"), InitTracker())
    env.append_transform(primer)
    check_env_specs(env)
    assert env.reset()["hmem", "immediate"].abs().sum() == 0

    # A collector adds the primer (and InitTracker) by itself.
    collector = Collector(
        GymEnv("CartPole-v1"),
        policy,
        frames_per_batch=20,
        total_frames=20,
        auto_register_policy_transforms=True,
    )
    data = next(iter(collector))
    collector.shutdown()
    assert data["hmem", "steps"].shape == (20, 1)
    steps = data["next", "hmem", "steps"].squeeze(-1)
    starts = [*data["is_init"].squeeze(-1).nonzero().squeeze(-1).tolist(), 20]
    for begin, end in itertools.pairwise(starts):
        assert steps[begin:end].tolist() == list(range(1, end - begin + 1))


# ---------------------------------------------------------------------------------- modes
@pytest.mark.parametrize("replacement", ["usage", "oldest"])
@pytest.mark.parametrize("resets", [(), (9,), (5, 23)], ids=["no-reset", "reset", "two-resets"])
def test_sequential_and_recurrent_modes_agree(replacement, resets):
    memory = make_memory(replacement=replacement)
    data = trajectory(3, 30, resets)
    seq = run_sequential(memory, data)
    # Stored states past the first step are ignored in recurrent mode: fill them with garbage.
    noisy = data.clone()
    for name in STATE_NAMES:
        value = seq["next", "hmem", name]
        noisy["hmem", name] = torch.cat(
            [torch.zeros_like(value[:, :1]), torch.randint_like(value[:, 1:], 1, 9)], 1
        )
    rec = run_recurrent(memory, noisy)
    torch.testing.assert_close(rec["hmem", "readout"], seq["hmem", "readout"], atol=1e-5, rtol=0)
    for name in STATE_NAMES:
        torch.testing.assert_close(
            rec["next", "hmem", name], seq["next", "hmem", name], atol=1e-5, rtol=0
        )
    # Evictions and consolidation happened: 30 steps fill the 4-slot ring 7 times (less resets).
    assert (seq["next", "hmem", "long_term_count"][:, -1].sum(-1) >= 1).all()


@pytest.mark.parametrize("split", [1, 7, 16])
def test_chunks_replay_from_their_stored_state(split):
    memory = make_memory()
    data = trajectory(2, 24, (11,))
    seq = run_sequential(memory, data)
    stored = data.clone()
    stored["hmem"] = torch.cat(
        [torch.zeros_like(seq["next", "hmem"][:, :1]), seq["next", "hmem"][:, :-1]], 1
    )
    first = run_recurrent(memory, stored[:, :split])
    second = run_recurrent(memory, stored[:, split:])
    readout = torch.cat([first["hmem", "readout"], second["hmem", "readout"]], 1)
    torch.testing.assert_close(readout, seq["hmem", "readout"], atol=1e-5, rtol=0)


def test_default_recurrent_mode():
    memory = make_memory(default_recurrent_mode=True)
    assert memory.recurrent_mode
    with set_recurrent_mode(False):
        assert not memory.recurrent_mode
    with pytest.raises(RuntimeError, match="set_recurrent_mode"):
        memory.recurrent_mode = False


# ---------------------------------------------------------------------------------- levels
def test_ring_completion_writes_a_summary_and_a_template():
    memory = make_memory(long_term_slots=1)
    data = trajectory(1, 8)
    out = run_recurrent(memory, data)
    nxt = out["next", "hmem"]
    # Steps 1-3: nothing compressed yet.
    assert (nxt["short_term_time"][0, :3] == 0).all()
    assert (nxt["long_term_count"][0, :3] == 0).all()
    # Step 4 completes the ring: one summary, the VAE's posterior mean of the ring, oldest first.
    ring = data["embed"][0, :4]
    summary = memory.compression(ring.unsqueeze(0)).squeeze(0)
    torch.testing.assert_close(nxt["immediate"][0, 3], ring)
    torch.testing.assert_close(nxt["short_term"][0, 3, 0], summary)
    assert nxt["short_term_time"][0, 3].tolist() == [4, 0]
    # ... which seeds the (only) template.
    torch.testing.assert_close(nxt["long_term"][0, 3, 0], summary)
    assert nxt["long_term_count"][0, 3].tolist() == [1]
    # Step 8: a second summary goes to the empty slot; the template becomes the running mean.
    second = memory.compression(data["embed"][:, 4:8]).squeeze(0)
    torch.testing.assert_close(nxt["short_term"][0, 7, 1], second)
    assert nxt["short_term_time"][0, 7].tolist() == [4, 8]
    torch.testing.assert_close(nxt["long_term"][0, 7, 0], (summary + second) / 2)
    assert nxt["long_term_count"][0, 7].tolist() == [2]


@pytest.mark.parametrize("replacement", ["usage", "oldest"])
def test_full_short_term_replaces_lowest_use_or_oldest(replacement):
    memory = make_memory(replacement=replacement)
    data = trajectory(4, 12, seed=3)
    out = run_recurrent(memory, data)
    nxt = out["next", "hmem"]
    before = nxt[:, 10]  # both slots filled (steps 4 and 8); the ring completes at step 12
    after = nxt[:, 11]
    if replacement == "oldest":
        expected = torch.zeros(4, dtype=torch.long)
    else:
        expected = before["short_term_usage"].argmin(-1)
    changed = (after["short_term_time"] != before["short_term_time"]).long().argmax(-1)
    assert torch.equal(changed, expected)
    assert (after["short_term_time"].gather(-1, expected[:, None]) == 12).all()
    # Templates: the third summary moved the nearest template (both were seeded already).
    assert (after["long_term_count"].sum(-1) == 3).all()


def test_usage_tracks_attention():
    memory = make_memory()
    out = run_recurrent(memory, trajectory(2, 10))
    usage = out["next", "hmem", "short_term_usage"]
    assert (usage[:, :3] == 0).all()  # steps 1-3: no summary yet
    assert (usage[:, 3:, 0] > 0).all()
    total = usage[:, 3:7].sum(-1)  # steps 4-7: one summary, which gets all the attention
    expected = torch.tensor([(1 - 0.99 ** (k + 1)) / (1 - 0.99) for k in range(4)])
    torch.testing.assert_close(total, expected.expand(2, 4), rtol=1e-4, atol=1e-4)


def test_readout_matches_the_documented_formula():
    """One step, recomputed by hand: attention per level, gate over [e, r_i, r_s, r_l]."""
    memory = make_memory()
    data = trajectory(3, 10)
    with torch.no_grad():
        state = run_recurrent(memory, data)["next", "hmem"][:, 8]  # after 9 steps: 2 summaries
        step = TensorDict(
            {"embed": torch.randn(3, EMBED), "is_init": torch.zeros(3, 1, dtype=bool)}, [3]
        )
        out = memory(step.clone().set("hmem", state.clone()))
        nxt = out["next", "hmem"]
        e = step["embed"]
        q = memory.query(e)

        def read(level, items, mask, extra=None):
            logits = (items @ level.key.weight.T @ q.unsqueeze(-1)).squeeze(-1)
            if extra is not None:
                logits = logits + extra
            logits = logits / EMBED**0.5
            weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
            return level.value((weights.unsqueeze(-1) * items).sum(1))

        ring = nxt["immediate"]
        age = (9 - torch.arange(4)) % 4  # step 10 was written to slot 9 % 4 = 1
        positions = memory.immediate_attention.position[age]  # [4, A]
        r_i = read(memory.immediate_attention, ring, torch.ones(3, 4, dtype=bool), q @ positions.T)
        r_s = read(memory.short_term_attention, nxt["short_term"], nxt["short_term_time"] > 0)
        r_l = read(memory.long_term_attention, nxt["long_term"], nxt["long_term_count"] > 0)
        gate = torch.softmax(memory.gate(torch.cat([e, r_i, r_s, r_l], -1)), -1)
        expected = e + gate[:, :1] * r_i + gate[:, 1:2] * r_s + gate[:, 2:] * r_l
    assert (nxt["steps"] == 10).all()
    torch.testing.assert_close(out["hmem", "readout"], expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- gradients
def test_gradients_reach_every_level_and_the_vae():
    memory = make_memory()
    data = trajectory(2, 13)
    with set_recurrent_mode(True):
        out = memory(data)
    out["hmem", "readout"].pow(2).sum().backward()
    for name in [
        "query",
        "immediate_attention",
        "short_term_attention",
        "long_term_attention",
        "gate",
        "compression.encoder",
    ]:
        module = memory.get_submodule(name)
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    assert memory.compression.decoder[0].weight.grad is None  # only the ELBO trains the decoder
    elbo = MemoryELBOLoss(memory)(out.detach())
    elbo["loss_elbo"].backward()
    assert memory.compression.decoder[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- ELBO loss
def test_elbo_loss_uses_completed_rings_and_adapts_beta():
    memory = make_memory()
    data = trajectory(3, 10, (6,))
    with torch.no_grad():
        out = run_recurrent(memory, data)
    loss = MemoryELBOLoss(memory, elbo_coeff=2.0)
    beta = memory.compression.beta
    result = loss(out)
    # Rings completed at step 4 and, after the reset at 6, at the 4th step of the new episode.
    assert int(result["elbo_buffers"]) == 6
    rings = out["next", "hmem", "immediate"][:, [3, 9]].reshape(6, 4, EMBED)
    assert result["elbo_beta"] == pytest.approx(beta)
    assert memory.compression.beta != beta
    loss.eval()
    beta = memory.compression.beta
    torch.manual_seed(1)
    result = loss(out)
    torch.manual_seed(1)
    torch.testing.assert_close(result["loss_elbo"], 2.0 * memory.compression.elbo(rings).loss)
    assert memory.compression.beta == beta


def test_elbo_loss_without_completed_rings_and_missing_keys():
    memory = make_memory()
    out = run_recurrent(memory, trajectory(2, 3))
    result = MemoryELBOLoss(memory)(out)
    assert int(result["elbo_buffers"]) == 0 and float(result["loss_elbo"]) == 0.0
    with pytest.raises(KeyError, match="collected with the policy"):
        MemoryELBOLoss(make_memory(state_key="other"))(out)
    with pytest.raises(TypeError, match="HierarchicalMemory"):
        MemoryELBOLoss([])


# ---------------------------------------------------------------------------------- state_dict
def test_state_dict_round_trip():
    memory = make_memory(replacement="oldest")
    memory.compression.adapt_beta(0.5)
    other = make_memory(replacement="oldest")
    other.load_state_dict(memory.state_dict())
    assert other.compression.beta == pytest.approx(memory.compression.beta)
    data = trajectory(2, 9)
    a, b = run_recurrent(memory, data), run_recurrent(other, data)
    torch.testing.assert_close(a["hmem", "readout"], b["hmem", "readout"])
    with pytest.raises(RuntimeError, match="size mismatch"):
        make_memory(immediate_slots=5).load_state_dict(memory.state_dict())


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(embed_dim=0), ValueError, "embed_dim must be a positive int"),
        (dict(embed_dim=6.0), TypeError, "embed_dim must be an int"),
        (dict(embed_dim=True), TypeError, "embed_dim must be an int"),
        (dict(immediate_slots=0), ValueError, "immediate_slots must be a positive int"),
        (dict(short_term_slots=-2), ValueError, "short_term_slots must be a positive int"),
        (dict(long_term_slots=1.5), TypeError, "long_term_slots must be an int"),
        (dict(latent_dim=0), ValueError, "latent_dim"),
        (dict(replacement="lru"), ValueError, "replacement must be one of"),
        (dict(usage_decay=1.0), ValueError, r"usage_decay must lie in \[0, 1\)"),
        (dict(template_rate=0.0), ValueError, r"template_rate must lie in \(0, 1\]"),
        (dict(compression=torch.nn.Linear(2, 2)), TypeError, "compression must be a BufferVAE"),
        (dict(compression=BufferVAE(5, EMBED, 3)), ValueError, "immediate_slots=4"),
        (dict(compression=BufferVAE(4, EMBED, 2)), ValueError, "latent_dim=3 differs"),
        (dict(out_key=("hmem", "steps")), ValueError, "collides with the state"),
        (dict(in_key=7), TypeError, "NestedKey"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(embed_dim=EMBED, **SMALL) | kwargs
    embed_dim = args.pop("embed_dim")
    with pytest.raises(error, match=match):
        HierarchicalMemory(embed_dim, **args)


def test_bad_inputs():
    memory = make_memory()
    ok = TensorDict({"embed": torch.randn(3, EMBED), "is_init": torch.ones(3, 1, dtype=bool)}, [3])
    with pytest.raises(ValueError, match=r"embed_dim=6\], got \[5\]"):
        memory(ok.clone().set("embed", torch.randn(3, 5)))
    with pytest.raises(TypeError, match="floating-point"):
        memory(ok.clone().set("embed", torch.ones(3, EMBED, dtype=torch.long)))
    with pytest.raises(KeyError, match="InitTracker"):
        memory(ok.exclude("is_init"))
    with pytest.raises(KeyError, match="no embedding entry"):
        memory(ok.exclude("embed"))
    with pytest.raises(ValueError, match="primer from another memory"):
        memory(ok.clone().set(("hmem", "immediate"), torch.zeros(3, 8, EMBED)))
    with pytest.raises(ValueError, match="time dim"), set_recurrent_mode(True):
        memory(ok[0])
    with pytest.raises(ValueError, match="unknown key name"):
        memory.set_keys(hidden="h")


# ---------------------------------------------------------------------------------- PPO
@pytest.fixture(scope="module")
def collected():
    """Two CartPoles run by the builder's policy: [2, 40] with episode starts mid-chunk."""
    torch.manual_seed(0)
    base = SerialEnv(2, lambda: GymEnv("CartPole-v1"))
    modules = make_hierarchical_actor_critic(
        base, embed_dim=8, hidden_dim=8, memory_kwargs=dict(SMALL, latent_dim=4)
    )
    env = TransformedEnv(base, modules.transforms)
    collector = Collector(env, modules.policy, frames_per_batch=80, total_frames=160)
    batches = list(collector)
    collector.shutdown()
    return modules, batches[-1]


def test_builder_output(collected):
    modules, data = collected
    assert data.shape == (2, 40)
    assert (data["is_init"][:, 1:]).any(), "the test needs an episode start inside the chunk"
    assert data["next", "hmem", "steps"].max() > 4  # rings were completed during collection
    assert modules.memories[0] is modules.actor.module[0][1]
    assert modules.memories[1] is modules.critic[1]
    assert set(modules.memories[1].in_keys[1:-1]) <= set(data.keys(True, True))


def test_clip_ppo_loss_recomputes_the_collected_log_probs(collected):
    modules, data = collected
    loss = ClipPPOLoss(modules.actor, modules.critic, entropy_coeff=0.01, critic_coeff=0.5)
    with torch.no_grad():
        GAE(gamma=0.99, lmbda=0.95, value_network=modules.critic, shifted=True)(data)
    for batch in (data, data[1:]):
        out = loss(batch)
        assert abs(float(out["kl_approx"])) < 1e-6
    with set_recurrent_mode(True), torch.no_grad():
        replay = modules.actor.get_dist(data.clone()).log_prob(data["action"])
    torch.testing.assert_close(replay, data["action_log_prob"], atol=1e-5, rtol=0)


def test_gae_values_from_stored_states_match_a_replay(collected):
    modules, data = collected
    with torch.no_grad():
        sequential = modules.critic(data.clone())["state_value"]
        with set_recurrent_mode(True):
            recurrent = modules.critic(data.clone())["state_value"]
    torch.testing.assert_close(sequential, recurrent, atol=1e-5, rtol=0)


def test_builder_continuous_actions_and_errors():
    modules = make_hierarchical_actor_critic(
        GymEnv("Pendulum-v1"), embed_dim=8, hidden_dim=8, memory_kwargs=SMALL
    )
    env = TransformedEnv(GymEnv("Pendulum-v1"), modules.transforms)
    data = env.rollout(5, modules.policy)
    assert data["action"].shape == (5, 1) and data["action"].abs().max() <= 2.0
    with pytest.raises(ValueError, match="may not set"):
        make_hierarchical_actor_critic(GymEnv("Pendulum-v1"), memory_kwargs={"state_key": "x"})
    with pytest.raises(KeyError, match="no observation entry"):
        make_hierarchical_actor_critic(GymEnv("Pendulum-v1"), observation_key="pixels")
    with pytest.raises(TypeError, match="EnvBase"):
        make_hierarchical_actor_critic("Pendulum-v1")
