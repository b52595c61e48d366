"""PixelEncoder: uint8 frames scaled inside, end to end through writer, storage and queries."""

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.data import TensorDictReplayBuffer
from torchrl.envs import GymWrapper, TransformedEnv
from torchrl.envs.utils import check_env_specs

from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
from torchrl_hippo.consolidation import Consolidator
from torchrl_hippo.envs.transforms import MemoryRetrieval
from torchrl_hippo.modules.pixels import PixelEncoder, make_pixel_dual_encoder
from torchrl_hippo.query import memory_query

FRAME = (1, 36, 36)  # the smallest frames the default (Nature-DQN) stack accepts
EMBED, WINDOW = 16, 4


@pytest.mark.parametrize("batch", [(), (5,), (2, 3)], ids=["[]", "[5]", "[2,3]"])
def test_uint8_frames_are_scaled_inside(batch):
    encoder = PixelEncoder((3, 40, 44), out_features=24)
    frames = torch.randint(0, 256, (*batch, 3, 40, 44), dtype=torch.uint8)
    out = encoder(frames)
    assert out.shape == (*batch, 24) and out.dtype == torch.float32
    assert (out.abs() <= 1).all()  # tanh head
    torch.testing.assert_close(encoder(frames.float() / 255), out, atol=1e-5, rtol=1e-5)
    # Not the same as feeding the raw 0..255 values as floats.
    assert not torch.allclose(encoder(frames.float()), out, atol=1e-3)
    flat = encoder.convnet(frames.reshape(-1, 3, 40, 44).float() / 255)
    assert flat.shape[-1] == encoder.conv_features


def test_channels_last_matches_channels_first():
    first = PixelEncoder((3, 40, 40), 8)
    last = PixelEncoder((40, 40, 3), 8, channels_last=True)
    last.load_state_dict(first.state_dict())
    frames = torch.randint(0, 256, (4, 40, 40, 3), dtype=torch.uint8)
    torch.testing.assert_close(last(frames), first(frames.permute(0, 3, 1, 2)))


def test_gradients_reach_the_convolutions_from_uint8_frames():
    encoder = PixelEncoder(FRAME, 8)
    encoder(torch.randint(0, 256, (6, *FRAME), dtype=torch.uint8)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (((3, 40),), {}, ValueError, "frame_shape"),
        (((3, 20, 20),), {}, ValueError, "too small"),
        (("abc",), {}, TypeError, "frame_shape"),
        (((3, 40, 40), 0), {}, ValueError, "out_features"),
        (((3, 40, 40),), {"num_cells": (32, 64), "kernel_sizes": 3}, ValueError, "strides"),
        (((3, 40, 40),), {"scale": 0}, ValueError, "scale"),
        (((3, 40, 40),), {"channels_last": 1}, TypeError, "channels_last"),
    ],
    ids=["rank", "small", "str", "out_features", "strides", "scale", "channels_last"],
)
def test_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        PixelEncoder(*args, **kwargs)


def test_bad_frames():
    encoder = PixelEncoder(FRAME, 8)
    with pytest.raises(ValueError, match=r"\[..., C, H, W\] with frame_shape=\(1, 36, 36\)"):
        encoder(torch.zeros(2, 3, 36, 36, dtype=torch.uint8))
    with pytest.raises(TypeError, match="frames must be a Tensor"):
        encoder(np.zeros(FRAME, dtype=np.uint8))


def test_dual_encoder_takes_integer_frames_only_with_an_observation_encoder():
    encoder = make_pixel_dual_encoder(FRAME, 3, EMBED, window=WINDOW, features=32, hidden_dim=32)
    assert encoder.observation_encoder is encoder.online.observation_encoder
    assert encoder.observation_dim == encoder.observation_encoder.out_features == 32
    frames = torch.randint(0, 256, (5, WINDOW, *FRAME), dtype=torch.uint8)
    action, reward = torch.randint(3, (5, WINDOW)), torch.rand(5, WINDOW)
    keys = encoder.encode(frames, action, reward, target=True)
    torch.testing.assert_close(keys, encoder.encode(frames / 255.0, action, reward, target=True))
    plain = DualEncoder(4, 3, EMBED, window=WINDOW)
    with pytest.raises(TypeError, match="need an observation_encoder"):
        plain.encode(torch.zeros(5, WINDOW, 4, dtype=torch.uint8), action, reward)


def pixel_episodes(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    done = torch.zeros(n, 1, dtype=torch.bool)
    done[torch.tensor(lengths).cumsum(0) - 1] = True
    return TensorDict(
        {
            "observation": torch.randint(0, 256, (n, *FRAME), dtype=torch.uint8, generator=g),
            "action": torch.randint(3, (n,), generator=g),
            "next": {"reward": torch.rand(n, 1, generator=g), "done": done},
        },
        batch_size=[n],
    )


def pixel_memory(defer_keys=False):
    encoder = make_pixel_dual_encoder(FRAME, 3, EMBED, window=WINDOW, features=32, hidden_dim=32)
    return TensorDictReplayBuffer(
        storage=HippoStorage(500),
        writer=HippoWriter(encoder, defer_keys=defer_keys, encode_chunk=64),
        sampler=HippoSampler(top_k=3),
        batch_size=16,
    )


@pytest.mark.parametrize("defer_keys", [False, True], ids=["eager", "deferred"])
def test_end_to_end_writer_storage_query(defer_keys):
    rb = pixel_memory(defer_keys)
    data = pixel_episodes([12] * 10)
    rb.extend(data)
    storage, encoder = rb.storage, rb.writer.encoder
    stored = storage.get(torch.arange(len(storage)))
    assert stored["observation"].dtype == torch.uint8  # frames are kept as bytes
    assert torch.equal(stored["observation"], data["observation"])

    # Windows of uint8 frames from the storage: the query path encodes them (online network).
    rows = torch.tensor([0, 5, 37, 119])
    windows = storage.gather_windows(rows, WINDOW)
    assert windows["observation"].dtype == torch.uint8
    out = memory_query(rb, windows, 6)
    assert not storage.has_pending_keys
    # Stored keys are the target network's keys of the same windows.
    target = encoder.encode(
        windows["observation"],
        windows["action"],
        windows["next", "reward"],
        windows["hippo", "window_mask"],
        target=True,
    )
    torch.testing.assert_close(storage.keys[rows], target)
    # Exactly the brute-force top-k over the stored keys.
    with torch.no_grad():
        online = encoder.encode(
            windows["observation"],
            windows["action"],
            windows["next", "reward"],
            windows["hippo", "window_mask"],
        )
    scores, reference = torch.topk(F.normalize(online, dim=-1) @ storage.keys.T, 6, dim=-1)
    assert out["index"].tolist() == reference.tolist()
    torch.testing.assert_close(out["hippo", "similarity"], scores)
    assert out["index"][:, 0].tolist() == rows.tolist()  # online == target at start
    assert out["observation"].shape == (4, 6, *FRAME) and out["observation"].dtype == torch.uint8


def test_refresh_and_consolidation_with_pixels():
    rb = pixel_memory()
    rb.extend(pixel_episodes([12] * 10))
    consolidator = Consolidator(rb.writer.encoder, temperature=0.1)
    conv = rb.writer.encoder.online.observation_encoder.convnet[0].weight.clone()
    metrics = consolidator.consolidate(rb, steps=2, batch_size=16)
    assert torch.isfinite(metrics["loss_contrastive"]).all()
    assert not torch.equal(rb.writer.encoder.online.observation_encoder.convnet[0].weight, conv)
    assert rb.storage.refresh_keys() == 120
    assert rb.sample()["observation"].dtype == torch.uint8


class DotEnv(gym.Env):
    """A dot moving on a 36x36 grey frame: uint8 pixel observations, 3 actions."""

    observation_space = gym.spaces.Box(0, 255, FRAME, dtype=np.uint8)
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.t = int(self.np_random.integers(36)), 0
        return self._frame(), {}

    def step(self, action):
        self.pos = (self.pos + int(action) - 1) % 36
        self.t += 1
        reward = float(self.pos > 18)
        return self._frame(), reward, self.t >= 9, False, {}

    def _frame(self):
        frame = np.zeros(FRAME, dtype=np.uint8)
        frame[0, self.t * 3 % 36, self.pos] = 255
        return frame


def test_pixel_env_collector_and_retrieval():
    rb = pixel_memory()
    env = TransformedEnv(GymWrapper(DotEnv()), MemoryRetrieval(rb, k=3))
    env.set_seed(0)
    check_env_specs(env)
    assert env.observation_spec["observation"].dtype == torch.uint8
    collector = Collector(env, policy=None, frames_per_batch=30, total_frames=90)
    masks = []
    for batch in collector:
        assert batch["observation"].dtype == torch.uint8
        masks.append(bool(batch["next", "retrieval", "mask"].all()))
        rb.extend(batch)
    collector.shutdown()
    assert masks == [False, True, True]
    assert rb.storage.num_episodes == 10
    out = memory_query(rb, rb.storage.gather_windows(torch.arange(3), WINDOW), 3)
    assert out["observation"].dtype == torch.uint8 and out.batch_size == (3, 3)
