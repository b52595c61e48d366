"""torchrl_hippo.hub: whole-memory checkpoints, on disk and through the Hugging Face Hub cache."""

import hashlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import make_buffer, make_episodes
from tensordict import NonTensorData, NonTensorStack, TensorDict
from torch import nn
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs import Compose, RewardScaling

from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
from torchrl_hippo.hub import (
    FORMAT_VERSION,
    MemoryCheckpointError,
    _checksum,
    _writer_config,
    load_memory,
    load_memory_from_hub,
    push_memory_to_hub,
    save_memory,
)

pytest.importorskip("safetensors")
huggingface_hub = pytest.importorskip("huggingface_hub")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FILES = {"config.json", "memory.safetensors", "model.safetensors", "README.md"}


# ---------------------------------------------------------------------------- helpers
def assert_tree_equal(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_tree_equal(a[key], b[key], f"{where}/{key}")
        assert _metadata(a, where) == _metadata(b, where), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape}"
        assert a.device == b.device, f"{where}: {a.device} != {b.device}"
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _metadata(state, where):
    """A TensorDict state dict's metadata (batch sizes, devices), in a comparable form.

    HippoWriter.load_state_dict rebuilds its open-episode table without a device (TorchRL's
    ``TensorDict().load_state_dict`` does not restore it), so devices under the writer are not
    compared.
    """
    metadata = getattr(state, "_metadata", None)
    if metadata is None:
        return None
    return {
        name: (
            tuple(entry.get("batch_size", ())),
            None if "_writer" in where else entry.get("device"),
        )
        for name, entry in metadata.items()
    }


def memory_state(rb):
    """Everything a memory is: the buffer's state (written rows only), pool and encoder."""
    state = rb.state_dict()
    state.pop("_prefetch_state")
    rows = state["_storage"]
    if rows["initialized"]:  # rows past the high-water mark were never written
        columns = rows["_storage"]
        trimmed = OrderedDict((k, v[: rows["_len"]]) for k, v in columns.items())
        trimmed._metadata = columns._metadata
        rows["_storage"] = trimmed
    hippo = rows["hippo"]
    if hippo.get("free_rows") is not None:  # a stack: entries above its top are garbage
        hippo["free_rows"] = hippo["free_rows"][: hippo["num_free_rows"]]
    state["_sampler"] = rb.sampler.state_dict(storage=rb.storage)
    state["encoder"] = rb.writer.encoder.state_dict()
    state["configs"] = [
        rb.storage.config,
        _writer_config(rb.writer),
        rb.sampler.config,
        rb.writer.encoder.config,
        rb.writer.encoder.training,
    ]
    return state


def assert_same_memory(a, b):
    assert_tree_equal(memory_state(a), memory_state(b))


def assert_same_batch(a, b):
    assert_tree_equal(a.to_dict(), b.to_dict(), "batch")


def same_draw(a, b, seed):
    torch.manual_seed(seed)
    x = a.sample()
    torch.manual_seed(seed)
    y = b.sample()
    assert_same_batch(x, y)


def continue_both(a, b, more, *, seed=7):
    """The next draw, the next extend and the draw after: both memories do exactly the same."""
    if len(a):
        same_draw(a, b, seed)
    assert_tree_equal(a.extend(more.clone()), b.extend(more.clone()), "index")
    same_draw(a, b, seed + 1)
    assert_same_memory(a, b)


def env_time_batch(env, time, *, obs_dim=3, act_dim=2, done_at=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    done = torch.zeros(env, time, 1, dtype=torch.bool)
    for e, t in done_at:
        done[e, t] = True
    return TensorDict(
        {
            "observation": torch.randn(env, time, obs_dim, generator=g),
            "action": torch.randn(env, time, act_dim, generator=g),
            "next": {"reward": torch.rand(env, time, 1, generator=g), "done": done},
        },
        batch_size=[env, time],
    )


def with_extra_keys(td, seed=0):
    """Adds arbitrary nested entries of several dtypes to a flat batch."""
    g = torch.Generator().manual_seed(seed)
    n = td.shape[0]
    td["agent", "camera", "pixels"] = torch.randint(
        0, 255, (n, 2, 4, 4), dtype=torch.uint8, generator=g
    )
    td["agent", "half"] = torch.randn(n, 3, generator=g).to(torch.bfloat16)
    td["collector", "mask"] = torch.rand(n, generator=g) > 0.5
    td["info", "counts"] = torch.randint(0, 9, (n, 2), dtype=torch.int32, generator=g)
    return td


# Each scenario builds a memory, then returns it with a batch to extend after the load.
def _fifo(rb_kwargs):
    rb = make_buffer(60, **rb_kwargs)
    data = make_episodes([9, 14, 6, 21, 11], seed=1)
    rb.extend(data[:40])  # leaves the fourth episode open
    rb.sample()  # caches a retrieval pool of default anchors
    rb.extend(data[40:43])  # written since the last draw: merged into the pool next time
    return rb, data[43:]


def _importance():
    rb = make_buffer(50, forgetting="importance")
    rb.extend(make_episodes([12, 9, 15, 7], reward=[1.0, 5.0, 2.0, 0.5], seed=2))
    for _ in range(3):
        rb.sample()  # access counts
    rb.extend(make_episodes([18, 8], seed=3)[:20])  # evicts whole episodes, one left open
    assert rb.storage.num_free_rows > 0
    return rb, make_episodes([8, 5], seed=4)


def _deferred():
    rb = make_buffer(80, defer_keys=True, mixture_ratio=0.0)
    rb.extend(make_episodes([10, 13, 30], seed=5)[:40])
    rb.sample()  # uniform only: the keys stay pending
    assert rb.storage.has_pending_keys
    rb.sampler.mixture_ratio = 0.5
    return rb, make_episodes([7], seed=6)


def _env_time():
    rb = make_buffer(64)
    rb.extend(env_time_batch(3, 5, done_at=[(0, 2)], seed=7))
    rb.sample()
    rb.extend(env_time_batch(3, 4, done_at=[(1, 1)], seed=8))  # stitched; episodes left open
    return rb, env_time_batch(3, 4, done_at=[(2, 3)], seed=9)


def _queries_and_priorities():
    rb = make_buffer(100, top_k=4)
    rb.extend(make_episodes([20, 25, 15], seed=10))
    rb.sampler.set_query(torch.randn(3, 16))
    rb.update_priority(torch.arange(30), torch.rand(30) * 3)
    rb.sample()
    return rb, make_episodes([12], seed=11)


def _window_queries():
    rb = make_buffer(100, top_k=4)
    rb.extend(make_episodes([20, 25, 15], seed=12))
    rb.sampler.set_query(rb.storage.gather_windows(torch.tensor([3, 30]), 4))  # encoded online
    rb.sample()
    return rb, make_episodes([12], seed=13)


def _nested_keys():
    encoder = DualEncoder(observation_dim=3, action_dim=2, embed_dim=16, window=4, hidden_dim=32)
    rb = TensorDictReplayBuffer(
        storage=HippoStorage(70, key_dtype=torch.bfloat16),
        writer=HippoWriter(encoder, forgetting="importance", eviction_weights={"return": 2.0}),
        sampler=HippoSampler(mixture_ratio=0.25, top_k=3, temperature=0.2, score_uniform=True),
        batch_size=12,
    )
    rb.extend(with_extra_keys(make_episodes([15, 22, 9], seed=14)))
    rb.sample()
    return rb, with_extra_keys(make_episodes([10, 6], seed=15), seed=1)


def _own_generator():
    rb = make_buffer(60)
    rb.set_rng(torch.Generator().manual_seed(123))
    rb.extend(make_episodes([15, 20], seed=16))
    rb.sample()
    return rb, make_episodes([9], seed=17)


def _stale_pool():
    rb = make_buffer(60)
    rb.extend(make_episodes([15, 20], seed=18))
    rb.sample()
    with torch.no_grad():
        rb.writer.encoder.online.position.add_(0.5)
    rb.writer.encoder.update_target(momentum=0.0)
    rb.storage.refresh_keys()  # keys changed in place: the cached pool is stale, not saved
    return rb, make_episodes([9], seed=19)


def _approx():
    pytest.importorskip("faiss")
    rb = make_buffer(300, approx=True, top_k=3)
    rb.extend(make_episodes([40] * 5, seed=20))
    rb.sample()
    rb.extend(make_episodes([5], seed=21))
    return rb, make_episodes([6], seed=22)


def _empty():
    return make_buffer(40), make_episodes([10, 12], seed=23)


SCENARIOS = {
    "fifo": lambda: _fifo({}),
    "fifo_eval_encoder": lambda: _fifo({}),
    "importance": _importance,
    "deferred_keys": _deferred,
    "env_time_open_episodes": _env_time,
    "queries_and_priorities": _queries_and_priorities,
    "window_queries": _window_queries,
    "nested_keys": _nested_keys,
    "own_generator": _own_generator,
    "stale_pool": _stale_pool,
    "approx": _approx,
    "empty": _empty,
}


def build(name):
    rb, more = SCENARIOS[name]()
    if name == "fifo_eval_encoder":
        rb.writer.encoder.eval()
    return rb, more


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_load_continues_exactly(name, tmp_path):
    rb, more = build(name)
    path = save_memory(rb, tmp_path / "memory")
    loaded = load_memory(path)
    assert isinstance(loaded, TensorDictReplayBuffer)
    assert type(loaded.storage) is HippoStorage and type(loaded.writer) is HippoWriter
    assert type(loaded.sampler) is HippoSampler and type(loaded.writer.encoder) is DualEncoder
    assert loaded.writer.encoder is not rb.writer.encoder
    assert loaded.storage.encoder is loaded.writer.encoder
    assert_same_memory(rb, loaded)
    continue_both(rb, loaded, more)


def test_the_saved_buffer_is_not_modified(tmp_path):
    rb, _ = build("fifo")
    before = memory_state(rb)
    rng = torch.random.get_rng_state()
    save_memory(rb, tmp_path / "memory", metrics={"loss": 0.5})
    assert_tree_equal(before, memory_state(rb))
    assert torch.equal(rng, torch.random.get_rng_state())  # the card's metrics draw nothing


def test_loading_twice_gives_independent_memories(tmp_path):
    rb, more = build("fifo")
    path = save_memory(rb, tmp_path / "memory")
    a, b = load_memory(path), load_memory(path)
    a.extend(more)
    assert len(b) == len(rb) != len(a)


def test_save_replaces_a_previous_save(tmp_path):
    rb, more = build("fifo")
    path = save_memory(rb, tmp_path / "memory")
    rb.extend(more)
    assert save_memory(rb, path) == path
    assert_same_memory(rb, load_memory(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory"]  # no leftovers
    (path / "config.json").write_text("{")  # a damaged memory can be saved over
    save_memory(rb, path)
    assert_same_memory(rb, load_memory(path))


# ---------------------------------------------------------------------------- the format
def test_files_and_config(tmp_path):
    rb, _ = build("nested_keys")
    path = save_memory(rb, tmp_path / "memory", env="hippo/Corridor-v0", metrics={"loss": 1.5})
    assert {p.name for p in path.iterdir()} == FILES
    config = json.loads((path / "config.json").read_text())
    assert config["format"] == "torchrl_hippo.memory"
    assert config["format_version"] == FORMAT_VERSION == 1
    assert config["checksum"] == _checksum(config)
    assert config["storage"]["class"] == "HippoStorage"
    assert config["storage"]["config"]["items"]["max_size"] == 70
    assert config["storage"]["config"]["items"]["key_dtype"] == {
        "__type__": "dtype",
        "value": "bfloat16",
    }
    writer = config["writer"]["config"]["items"]
    assert writer["forgetting"] == "importance"
    assert writer["done_key"] == {"__type__": "tuple", "items": ["next", "done"]}
    assert config["sampler"]["config"]["items"]["score_uniform"] is True
    assert config["encoder"]["config"]["items"]["embed_dim"] == 16
    assert config["buffer"]["batch_size"] == 12
    meta = config["metadata"]
    assert (meta["env"], meta["embed_dim"], meta["capacity"]) == ("hippo/Corridor-v0", 16, 70)
    assert meta["metrics"] == {"loss": 1.5}
    assert meta["memory_metrics"]["transitions"] == rb.storage.num_valid
    # Every tensor has its entry, and the entry's checksum is that of the stored bytes.
    from safetensors import safe_open

    for filename in ("memory.safetensors", "model.safetensors"):
        manifest = config["tensors"][filename]
        with safe_open(str(path / filename), framework="pt") as handle:
            assert set(handle.keys()) == set(manifest)
            for name, entry in manifest.items():
                tensor = handle.get_tensor(name)
                assert entry["shape"] == list(tensor.shape)
                data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
                assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    weights = config["tensors"]["model.safetensors"]
    assert any(n.startswith("online.") for n in weights)
    assert any(n.startswith("target.") for n in weights) and "version" in weights
    assert "state/_storage/_storage/agent.camera.pixels" in config["tensors"]["memory.safetensors"]


def test_unwritten_rows_cost_nothing(tmp_path):
    small = make_buffer(100)
    large = make_buffer(200_000)
    for rb in (small, large):
        rb.extend(make_episodes([20, 30]))
    size = {}
    for name, rb in (("small", small), ("large", large)):
        path = save_memory(rb, tmp_path / name)
        size[name] = (path / "memory.safetensors").stat().st_size
    # The large memory's bookkeeping is per row (row slots, free-row stack), the rows are not.
    assert size["large"] < 25 * 200_000
    assert size["large"] < size["small"] + 17 * 200_000
    loaded = load_memory(tmp_path / "large")
    assert loaded.storage.max_size == 200_000 and len(loaded) == 50
    assert_same_memory(large, loaded)


def test_model_card(tmp_path):
    rb = make_buffer(500, embed_dim=16)
    rb.extend(make_episodes([10, 20, 30], reward=[1.0, 2.0, 4.0]))
    path = save_memory(rb, tmp_path / "cartpole", env="CartPole-v1", metrics={"loss": 0.25})
    card = huggingface_hub.ModelCard.load(path / "README.md")
    assert card.data.library_name == "torchrl_hippo"
    assert "reinforcement-learning" in card.data.tags
    assert (card.data.embed_dim, card.data.capacity, card.data.env) == (16, 500, "CartPole-v1")
    text = card.text
    assert "| environment | CartPole-v1 |" in text
    assert "| embedding size | 16 |" in text
    assert "| capacity | 500 transitions |" in text
    assert "| stored | 60 transitions in 3 episodes |" in text
    assert "| loss | 0.25 |" in text
    assert "| return max | 120 |" in text  # 30 steps of reward 4
    assert "key effective rank" in text and 'load_memory("cartpole")' in text


def test_the_config_of_each_part_covers_its_constructor():
    encoder = DualEncoder(4, 2, 16, window=3, hidden_dim=8, momentum=0.9, dropout=0.1)
    parts = {
        HippoStorage: HippoStorage(10, key_dtype=torch.float16),
        HippoSampler: HippoSampler(0.2, 4, 0.3, num_anchors=3, beta=0.7, search_backend="torch"),
        DualEncoder: encoder,
    }
    for cls, part in parts.items():
        arguments = set(inspect.signature(cls.__init__).parameters) - {
            "self",
            "observation_encoder",
        }
        assert set(part.config) == arguments, cls.__name__
        assert cls(**part.config).config == part.config
    writer = HippoWriter(encoder, forgetting="importance", max_open_episodes=7, defer_keys=True)
    config = _writer_config(writer)
    arguments = set(inspect.signature(HippoWriter.__init__).parameters)
    assert set(config) == arguments - {"self", "encoder", "segmenter"}
    assert _writer_config(HippoWriter(encoder, **config)) == config


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: TensorDictReplayBuffer(storage=LazyTensorStorage(10)),
            TypeError,
            "storage must be a HippoStorage",
        ),
        (lambda: make_buffer(10).storage, TypeError, "rb must be a TensorDictReplayBuffer"),
    ],
)
def test_refuses_what_it_cannot_rebuild(make, error, match, tmp_path):
    with pytest.raises(error, match=match):
        save_memory(make(), tmp_path / "memory")
    assert not any(tmp_path.iterdir())


def test_refuses_transforms_non_tensor_rows_and_bad_arguments(tmp_path):
    rb = make_buffer(30)
    rb.append_transform(Compose(RewardScaling(0.0, 2.0, in_keys=[("next", "reward")])))
    with pytest.raises(ValueError, match="not replay-buffer transforms"):
        save_memory(rb, tmp_path / "m")
    rb = make_buffer(30)
    data = make_episodes([5, 5])
    data["info"] = NonTensorStack(*[NonTensorData(f"step {i}") for i in range(10)])
    rb.extend(data)
    with pytest.raises(TypeError, match=r"non-tensor entries \['info'\]"):
        save_memory(rb, tmp_path / "m")
    rb = make_buffer(30)
    with pytest.raises(TypeError, match="env must be a str"):
        save_memory(rb, tmp_path / "m", env=3)
    with pytest.raises(TypeError, match=r"metrics\['loss'\] must be a number"):
        save_memory(rb, tmp_path / "m", metrics={"loss": "low"})
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a saved memory"):
        save_memory(rb, tmp_path / "m")
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing left behind


# ---------------------------------------------------------------------------- corruption
def _flip_tensor_byte(path):
    file = path / "memory.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF  # in the data section (the header comes first)
    file.write_bytes(bytes(data))


def _truncate(name, keep):
    def damage(path):
        file = path / name
        file.write_bytes(file.read_bytes()[: int(file.stat().st_size * keep)])

    return damage


def _edit_config(edit, *, fix_checksum):
    def damage(path):
        file = path / "config.json"
        config = json.loads(file.read_text())
        edit(config)
        if fix_checksum:
            config["checksum"] = _checksum(config)
        file.write_text(json.dumps(config))

    return damage


def _reshape_tensor(path):
    """Rewrites a tensor with another shape under its own name (checksums left as they were)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "memory.safetensors")
    name = "state/_storage/hippo/row_slot"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, path / "memory.safetensors")


def _drop_tensor(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors.pop("version")
    save_file(tensors, path / "model.safetensors")


def _capacity(config):
    config["storage"]["config"]["items"]["max_size"] = 5


def _newer(config):
    config["format_version"] = FORMAT_VERSION + 1


def _bad_reference(config):
    config["state"]["items"]["_writer"]["items"]["cursor"] = {"__type__": "tensor", "name": "nope"}


CORRUPTIONS = {
    "flipped tensor byte": (_flip_tensor_byte, "does not match its SHA-256 checksum"),
    "truncated memory file": (_truncate("memory.safetensors", 0.6), "truncated or corrupted"),
    "truncated weights file": (_truncate("model.safetensors", 0.5), "truncated or corrupted"),
    "empty weights file": (_truncate("model.safetensors", 0.0), "truncated or corrupted"),
    "missing weights file": (
        lambda p: (p / "model.safetensors").unlink(),
        "lacks model.safetensors",
    ),
    "missing config": (lambda p: (p / "config.json").unlink(), "holds no config.json"),
    "truncated config": (_truncate("config.json", 0.5), "not valid JSON"),
    "edited config": (_edit_config(_capacity, fix_checksum=False), "does not match its checksum"),
    "newer format": (_edit_config(_newer, fix_checksum=True), "written by a newer torchrl_hippo"),
    "unknown tensor": (_edit_config(_bad_reference, fix_checksum=True), "refers to tensor 'nope'"),
    "reshaped tensor": (_reshape_tensor, r"row_slot' is int64\[59\], config.json says int64\[60\]"),
    "missing tensor": (_drop_tensor, r"missing \['version'\]"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_damaged_checkpoint_is_a_clear_error(corruption, tmp_path):
    damage, match = CORRUPTIONS[corruption]
    rb, _ = build("fifo")
    path = save_memory(rb, tmp_path / "memory")
    damage(path)
    with pytest.raises(MemoryCheckpointError, match=match):
        load_memory(path)


def test_not_a_memory(tmp_path):
    with pytest.raises(FileNotFoundError, match="No saved memory"):
        load_memory(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(MemoryCheckpointError, match=r"does not describe a torchrl_hippo\.memory"):
        load_memory(tmp_path / "other")


# ---------------------------------------------------------------------------- atomic saves
def test_a_crash_between_the_two_renames_leaves_the_previous_memory_loadable(tmp_path):
    rb, more = build("fifo")
    path = save_memory(rb, tmp_path / "memory")
    reference = memory_state(load_memory(path))
    # The on-disk state a save leaves when killed after moving the old memory aside: the old
    # one renamed, the complete new one still under its temporary name.
    aside = tmp_path / ".memory.replaced-999999999-dead-0"
    os.replace(path, aside)
    rb.extend(more)
    shutil.copytree(
        save_memory(rb, tmp_path / "scratch"), tmp_path / ".memory.saving-999999999-dead-x"
    )
    shutil.rmtree(tmp_path / "scratch")
    with pytest.warns(UserWarning, match="interrupted"):
        recovered = load_memory(path)
    assert_tree_equal(reference, memory_state(recovered))
    save_memory(recovered, path)  # the next save cleans up after the dead process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory"]


def test_a_failed_save_leaves_the_previous_memory_and_no_leftovers(tmp_path, monkeypatch):
    rb, more = build("fifo")
    path = save_memory(rb, tmp_path / "memory")
    reference = memory_state(load_memory(path))
    rb.extend(more)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("torchrl_hippo.hub._write_checkpoint", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_memory(rb, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory"]
    assert_tree_equal(reference, memory_state(load_memory(path)))


_SAVER = r"""
import sys
import torch

torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from conftest import make_buffer, make_episodes
from torchrl_hippo.hub import save_memory

path, reference = sys.argv[1], sys.argv[2]
rb = make_buffer(300_000, obs_dim=64, defer_keys=True)
rb.extend(make_episodes([50] * 4, obs_dim=64))
save_memory(rb, path)
save_memory(rb, reference)  # tells the parent that the first save is complete
rb.extend(make_episodes([1000] * 250, obs_dim=64, seed=1))
save_memory(rb, path)  # killed while writing this one
"""


@pytest.mark.slow
def test_a_save_killed_midway_leaves_the_previous_memory_loadable(tmp_path):
    path, reference = tmp_path / "memory", tmp_path / "reference"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(path), str(reference), str(TESTS)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    try:
        while not (reference / "config.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the first saves did not finish"
            time.sleep(0.05)
        while not list(tmp_path.glob(".memory.saving-*")):  # the second save has begun
            assert proc.poll() is None, "the second save finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = list(tmp_path.glob(".memory.saving-*"))
    assert leftovers, "the save was not interrupted"
    assert not (leftovers[0] / "config.json").exists()  # killed before it was complete
    loaded = load_memory(path)
    assert len(loaded) == 200
    assert_same_memory(load_memory(reference), loaded)
    save_memory(loaded, path)  # the dead process's leftovers go with the next save
    assert not list(tmp_path.glob(".memory.*"))


# ---------------------------------------------------------------------------- devices and code
def _claim_device(path, device):
    """Rewrites a checkpoint as a machine with ``device`` writes it: only device names differ."""
    file = path / "config.json"
    text = file.read_text().replace('"device": "cpu"', f'"device": "{device}"')
    text = text.replace('"value": "cpu"', f'"value": "{device}"')
    config = json.loads(text)
    config["checksum"] = _checksum(config)
    file.write_text(json.dumps(config))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_a_cuda_memory_on_a_cpu_machine(tmp_path):
    rb, more = build("importance")
    path = save_memory(rb, tmp_path / "memory")
    _claim_device(path, "cuda:0")
    assert '"cuda:0"' in (path / "config.json").read_text()
    with pytest.raises(RuntimeError, match=r"CUDA is not available here.*map_location='cpu'"):
        load_memory(path)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        load_memory(path, map_location="cuda")
    with pytest.raises(ValueError, match="map_location must name a device"):
        load_memory(path, map_location="gpu please")
    loaded = load_memory(path, map_location="cpu")
    assert loaded.storage.device == torch.device("cpu")
    assert_same_memory(rb, loaded)
    continue_both(rb, loaded, more)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_to_cpu(tmp_path):
    encoder = DualEncoder(3, 2, 16, window=4, hidden_dim=32).cuda()
    rb = TensorDictReplayBuffer(
        storage=HippoStorage(100, device="cuda"),
        writer=HippoWriter(encoder),
        sampler=HippoSampler(top_k=3),
        batch_size=16,
    )
    rb.extend(make_episodes([20, 30, 25]).cuda())
    rb.sample()
    path = save_memory(rb, tmp_path / "memory")
    on_gpu = load_memory(path)
    assert on_gpu.storage.device.type == "cuda"
    assert_same_memory(rb, on_gpu)
    on_cpu = load_memory(path, map_location="cpu")
    assert on_cpu.storage.device == torch.device("cpu")
    assert next(on_cpu.writer.encoder.parameters()).device.type == "cpu"
    assert len(on_cpu) == 75
    torch.testing.assert_close(on_cpu.storage.keys, rb.storage.keys.cpu(), rtol=0, atol=0)
    assert on_cpu.sample()["index"].device.type == "cpu"
    on_cpu.extend(make_episodes([5]))


class _FlattenThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))

    def forward(self, x):
        return self.net(x)


class _EveryN:
    """A segmenter with state: cuts every ``n`` steps, counting rows seen."""

    def __init__(self, n=4):
        self.n, self.seen = n, 0

    def __call__(self, data, step, stream):
        self.seen += step.numel()
        return (step > 0) & (step % self.n == 0)

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = int(state["seen"])


def test_code_parts_are_passed_again(tmp_path):
    encoder = DualEncoder(
        3, 2, 16, window=4, hidden_dim=32, observation_encoder=_FlattenThenLinear()
    )
    rb = TensorDictReplayBuffer(
        storage=HippoStorage(80),
        writer=HippoWriter(encoder, segmenter=_EveryN(5)),
        sampler=HippoSampler(top_k=3),
        batch_size=8,
    )

    def data(seed):
        td = make_episodes([12, 9], seed=seed)
        td["observation"] = torch.randn(21, 2, 3, generator=torch.Generator().manual_seed(seed))
        return td

    rb.extend(data(0))
    rb.sample()
    path = save_memory(rb, tmp_path / "memory")
    config = json.loads((path / "config.json").read_text())
    assert config["encoder"]["observation_encoder"] == "test_hub._FlattenThenLinear"
    assert config["writer"]["segmenter"] == "test_hub._EveryN"
    with pytest.raises(
        ValueError, match=r"built with observation_encoder=test_hub\._FlattenThenLinear"
    ):
        load_memory(path, segmenter=_EveryN())
    with pytest.raises(ValueError, match=r"built with segmenter=test_hub\._EveryN"):
        load_memory(path, observation_encoder=_FlattenThenLinear())
    with pytest.raises(
        ValueError, match=r"observation_encoder is a torch\.nn\.modules\.linear\.Linear"
    ):
        load_memory(path, observation_encoder=nn.Linear(6, 3), segmenter=_EveryN())
    segmenter = _EveryN(5)  # built with the same arguments: only its state is saved
    loaded = load_memory(path, observation_encoder=_FlattenThenLinear(), segmenter=segmenter)
    assert loaded.writer.segmenter is segmenter and segmenter.seen == 21  # its state was loaded
    assert_same_memory(rb, loaded)
    continue_both(rb, loaded, data(1))
    plain = make_buffer(20)
    with pytest.raises(ValueError, match="the saved encoder had none"):
        load_memory(
            save_memory(plain, tmp_path / "plain"), observation_encoder=_FlattenThenLinear()
        )


# ---------------------------------------------------------------------------- the Hub
class RecordingApi(huggingface_hub.HfApi):
    """An HfApi whose network calls record what they would send (kept under ``sent``)."""

    def __init__(self, sent):
        super().__init__(token="hf_not_a_token")
        self.sent, self.calls = sent, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        shutil.copytree(folder_path, self.sent)
        return f"commit of {repo_id}"


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fill_hub_cache(cache, repo_id, commit, folder, refs=("main",)):
    """Installs ``folder`` as ``commit`` of ``repo_id`` in the documented Hub cache layout:
    ``models--owner--name/blobs/<etag>``, ``snapshots/<commit>/<file>`` (links to the blobs)
    and ``refs/<ref>`` holding the commit hash. Large (LFS) files are named by their SHA-256,
    the others by their git blob hash, as huggingface_hub names them.
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in Path(folder).iterdir():
        data = file.read_bytes()
        lfs = file.suffix == ".safetensors"
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        (repo / "blobs" / etag).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", etag))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert huggingface_hub.constants.is_offline_mode()


def test_push_sends_a_loadable_memory(tmp_path):
    rb, more = build("nested_keys")
    api = RecordingApi(tmp_path / "sent")
    result = push_memory_to_hub(
        rb,
        "me/corridor-memory",
        private=True,
        revision="v2",
        env="hippo/Corridor-v0",
        metrics={"loss": 0.125},
        api=api,
    )
    assert result == "commit of me/corridor-memory"
    (create, repo, kwargs), branch, upload = api.calls
    assert (create, repo) == ("create_repo", "me/corridor-memory")
    assert kwargs == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert branch[0] == "create_branch" and branch[2]["branch"] == "v2"
    assert upload[0] == "upload_folder" and upload[2]["revision"] == "v2"
    assert upload[2]["repo_type"] == "model" and not upload[2]["create_pr"]
    assert {p.name for p in (tmp_path / "sent").iterdir()} == FILES
    card = (tmp_path / "sent" / "README.md").read_text()
    assert 'load_memory_from_hub("me/corridor-memory")' in card and "| loss | 0.125 |" in card
    loaded = load_memory_from_hub(str(tmp_path / "sent"))  # a local directory as repo id
    assert_same_memory(rb, loaded)
    continue_both(rb, loaded, more)


def test_push_sends_nothing_when_saving_fails(tmp_path):
    api = RecordingApi(tmp_path / "sent")
    with pytest.raises(TypeError, match="metrics"):
        push_memory_to_hub(make_buffer(10), "me/memory", metrics={"x": None}, api=api)
    assert api.calls == [] and not (tmp_path / "sent").exists()


def test_load_from_the_hub_cache_offline(tmp_path, offline, monkeypatch):
    old_rb, _ = build("importance")
    new_rb, more = build("fifo")
    sent = {}
    for name, rb in (("old", old_rb), ("new", new_rb)):
        sent[name] = tmp_path / f"sent-{name}"
        push_memory_to_hub(rb, "owner/memory", api=RecordingApi(sent[name]))
    cache = tmp_path / "hub-cache"
    old_commit, new_commit = "1" * 40, "2" * 40
    fill_hub_cache(cache, "owner/memory", old_commit, sent["old"], refs=("v1",))
    fill_hub_cache(cache, "owner/memory", new_commit, sent["new"], refs=("main",))

    loaded = load_memory_from_hub("owner/memory", cache_dir=cache)
    assert_same_memory(new_rb, loaded)
    continue_both(new_rb, loaded, more)
    for revision in ("v1", old_commit):
        assert_same_memory(
            old_rb, load_memory_from_hub("owner/memory", revision=revision, cache_dir=cache)
        )
    # The default cache location is HF_HUB_CACHE.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert_same_memory(old_rb, load_memory_from_hub("owner/memory", revision="v1"))
    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):
        load_memory_from_hub("owner/memory", revision="v3", cache_dir=cache)
    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):
        load_memory_from_hub("owner/other", cache_dir=cache)


def test_a_corrupted_cached_blob_is_a_clear_error(tmp_path, offline):
    rb, _ = build("fifo")
    push_memory_to_hub(rb, "owner/memory", api=RecordingApi(tmp_path / "sent"))
    cache = tmp_path / "cache"
    fill_hub_cache(cache, "owner/memory", "3" * 40, tmp_path / "sent")
    _flip_tensor_byte(cache / "models--owner--memory" / "snapshots" / ("3" * 40))
    with pytest.raises(MemoryCheckpointError, match="SHA-256"):
        load_memory_from_hub("owner/memory", cache_dir=cache)


def test_local_repo_ids(tmp_path, monkeypatch):
    rb, _ = build("fifo")
    save_memory(rb, tmp_path / "memories" / "run")
    monkeypatch.chdir(tmp_path)
    assert_same_memory(rb, load_memory_from_hub("memories/run"))  # relative, like owner/name
    assert_same_memory(rb, load_memory_from_hub(str(tmp_path / "memories" / "run")))
    with pytest.raises(ValueError, match="is a local directory"):
        load_memory_from_hub("memories/run", revision="main")
    with pytest.raises(FileNotFoundError, match="looks like a path"):
        load_memory_from_hub("./memories/elsewhere")
