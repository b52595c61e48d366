"""Save, load and share a whole episodic memory, on disk and on the Hugging Face Hub.

A memory is a :class:`~torchrl.data.TensorDictReplayBuffer` made of a
:class:`~torchrl_hippo.HippoStorage`, a :class:`~torchrl_hippo.HippoWriter` with its
:class:`~torchrl_hippo.DualEncoder`, and a :class:`~torchrl_hippo.HippoSampler`.
:func:`save_memory` writes all of it to a directory and :func:`load_memory` builds a working
buffer from that directory, without any user code: the rows (any nested keys), the episode
table, the writer's open episodes, the sampler's queries, priorities and cached retrieval pool,
the buffer's generator, and the encoder's online and target networks. After a load, ``extend``
and ``sample`` continue exactly as they would have in the saved buffer.
:func:`push_memory_to_hub` uploads that directory to a Hugging Face Hub model repository and
:func:`load_memory_from_hub` loads it from there (or from the local cache, or from a local
directory).

A saved memory is a directory of four files, which is also the Hub repository's content:

- ``config.json``: the format name and version; each part's constructor arguments (its
  ``config``); the skeleton of ``rb.state_dict()`` (TorchRL's contract, which ``rb.dumps`` /
  ``rb.loads`` also follow), whose tensors are references into the safetensors files; one
  entry per tensor with its dtype, shape, device and the SHA-256 of its bytes; metadata (env,
  metrics, sizes, versions); and the SHA-256 of all of the above;
- ``memory.safetensors``: every tensor of the replay buffer's state. Storage columns are saved
  up to the memory's high-water mark only (the unwritten tail of a large memory costs nothing);
- ``model.safetensors``: the encoder's ``state_dict`` (online and target networks, version);
- ``README.md``: a model card (embedding size, capacity, environment, metrics).

Nothing is unpickled at load, so a memory from an untrusted source runs no code. Loading
checks everything (format version, the configuration's checksum, files, tensor names, dtypes,
shapes and checksums) before it builds anything, and raises :class:`MemoryCheckpointError`
on a corrupted, truncated or incomplete checkpoint, never returning a half-loaded memory.

A save is atomic: the files are written to a temporary directory beside the target, flushed
to disk, and renamed into place, so an interrupted save leaves the previous checkpoint as it
was. Should a save be interrupted between moving the previous checkpoint aside and moving the
new one in, :func:`load_memory` finds the previous one (``.<name>.replaced-*``) and loads it,
with a warning. Leftovers of interrupted saves are removed by the next save to the same path.

What is not saved: a custom ``observation_encoder`` of the encoder and a writer's
``segmenter`` are code, not data: pass them again to :func:`load_memory` (their weights and
state come from the checkpoint). Replay-buffer transforms are refused, and a prefetch queue is
not saved. The approximate (FAISS) search index of ``HippoSampler(approx=True)`` is rebuilt
from the keys at the first draw.

Examples:
    >>> import tempfile
    >>> import torch
    >>> from tensordict import TensorDict
    >>> from torchrl.data import TensorDictReplayBuffer
    >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
    >>> from torchrl_hippo.hub import load_memory, save_memory
    >>> encoder = DualEncoder(observation_dim=3, action_dim=2, embed_dim=16, window=4)
    >>> rb = TensorDictReplayBuffer(
    ...     storage=HippoStorage(100),
    ...     writer=HippoWriter(encoder),
    ...     sampler=HippoSampler(top_k=3),
    ...     batch_size=8,
    ... )
    >>> done = torch.zeros(30, 1, dtype=torch.bool)
    >>> done[9::10] = True
    >>> data = TensorDict(
    ...     {
    ...         "observation": torch.randn(30, 3),
    ...         "action": torch.randn(30, 2),
    ...         "next": {"reward": torch.rand(30, 1), "done": done},
    ...     },
    ...     batch_size=[30],
    ... )
    >>> _ = rb.extend(data)
    >>> _ = rb.sample()
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_memory(rb, f"{tmp}/memory", env="my-env")
    ...     loaded = load_memory(path)
    >>> len(loaded), loaded.storage.num_episodes, loaded.writer.encoder.embed_dim
    (30, 3, 16)
    >>> _ = torch.manual_seed(1)
    >>> a = rb.sample()
    >>> _ = torch.manual_seed(1)
    >>> b = loaded.sample()
    >>> torch.equal(a["index"], b["index"])  # sampling continues exactly
    True
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import inspect
import json
import math
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tensordict import is_leaf_nontensor
from torch import nn
from torchrl.data import TensorDictReplayBuffer

from torchrl_hippo import metrics as key_metrics
from torchrl_hippo.data.sampler import HippoSampler
from torchrl_hippo.data.storage import HIPPO_KEYS, HippoStorage
from torchrl_hippo.data.writer import HippoWriter
from torchrl_hippo.modules.encoder import DualEncoder

__all__ = [
    "FORMAT_VERSION",
    "MemoryCheckpointError",
    "load_memory",
    "load_memory_from_hub",
    "push_memory_to_hub",
    "save_memory",
]

#: The name written in every ``config.json``, so that other directories are refused.
FORMAT_NAME = "torchrl_hippo.memory"
#: The version of the on-disk format that this module writes (and the newest it reads).
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MEMORY_FILE = "memory.safetensors"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
_FILES = (CONFIG_FILE, MEMORY_FILE, WEIGHTS_FILE, CARD_FILE)
_TENSOR_FILES = (MEMORY_FILE, WEIGHTS_FILE)
_SECTIONS = ("buffer", "storage", "writer", "sampler", "encoder", "state", "tensors", "metadata")

#: The dtypes safetensors stores, by the name used in ``config.json``.
_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_KEY_SAMPLE = 2048  # keys scored for the model card's key-health metrics
_INSTALL_HINT = "pip install 'torchrl-hippo[hub]' (huggingface_hub and safetensors)"


class MemoryCheckpointError(ValueError):
    """A saved memory cannot be loaded: missing, truncated, corrupted or of an unknown format."""


# ---------------------------------------------------------------------------- optional deps
def _require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"torchrl_hippo.hub needs {name}: {_INSTALL_HINT}.") from err


# ---------------------------------------------------------------------------- encoding
class _Rows:
    """A storage column saved up to the high-water mark, padded back to ``rows`` when loaded."""

    __slots__ = ("rows", "tensor")

    def __init__(self, tensor: torch.Tensor, rows: int) -> None:
        self.tensor = tensor
        self.rows = rows


def _sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's bytes (native, i.e. little-endian, order)."""
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def _float_json(value: float) -> Any:
    return value if math.isfinite(value) else {"__type__": "float", "value": repr(value)}


class _Packer:
    """Turns a state (nested dicts, lists, tuples, tensors, sizes, devices, dtypes, scalars)
    into JSON plus a flat ``{name: tensor}`` dict for safetensors.

    Tensors become ``{"__type__": "tensor", "name": ...}`` references, named after their path
    in the state; their dtype, shape, original device and checksum go to :attr:`manifest`.
    Every other non-JSON value becomes a ``{"__type__": ...}`` object, so that
    :func:`_unpack` rebuilds the state exactly (tuples stay tuples, OrderedDicts keep their
    ``_metadata``, as TensorDict and module state dicts need).
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.manifest: dict[str, dict[str, Any]] = {}
        self._storages: set[int] = set()

    def pack(self, value: Any, path: tuple[str, ...]) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return _float_json(value)
        if isinstance(value, _Rows):
            ref = self._tensor(value.tensor, path)
            ref["rows"] = value.rows
            return ref
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        if isinstance(value, torch.Size):
            return {"__type__": "size", "items": list(value)}
        if isinstance(value, torch.device):
            return {"__type__": "device", "value": str(value)}
        if isinstance(value, torch.dtype):
            return {"__type__": "dtype", "value": _dtype_name(value, path)}
        if isinstance(value, tuple):
            items = [self.pack(v, (*path, str(i))) for i, v in enumerate(value)]
            return {"__type__": "tuple", "items": items}
        if isinstance(value, list):
            return [self.pack(v, (*path, str(i))) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise TypeError(
                    f"save_memory stores mappings with str keys only; {_where(path)} has keys "
                    f"{bad[:3]!r}."
                )
            out: dict[str, Any] = {
                "__type__": "odict" if isinstance(value, OrderedDict) else "dict",
                "items": {k: self.pack(v, (*path, k)) for k, v in value.items()},
            }
            metadata = getattr(value, "_metadata", None)
            if metadata is not None:
                out["metadata"] = self.pack(metadata, (*path, "_metadata"))
            return out
        raise TypeError(
            f"save_memory cannot store a {type(value).__name__} ({_where(path)}): the state "
            "may hold tensors, numbers, strings, None, and dicts, lists and tuples of them."
        )

    def _tensor(self, tensor: torch.Tensor, path: tuple[str, ...]) -> dict[str, Any]:
        tensor = tensor.detach()
        if type(tensor) is not torch.Tensor:  # e.g. a MemoryMappedTensor
            tensor = tensor.as_subclass(torch.Tensor)
        if tensor.layout != torch.strided:
            raise TypeError(f"save_memory stores dense tensors, {_where(path)} is {tensor.layout}.")
        dtype = _dtype_name(tensor.dtype, path)
        device = str(tensor.device)
        tensor = tensor.cpu().contiguous()
        if tensor.numel():  # safetensors refuses two tensors on one storage
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in self._storages:
                tensor = tensor.clone()
                ptr = tensor.untyped_storage().data_ptr()
            self._storages.add(ptr)
        name = "/".join(path)
        while name in self.tensors:
            name += "'"
        self.tensors[name] = tensor
        self.manifest[name] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "device": device,
            "sha256": _sha256(tensor),
        }
        return {"__type__": "tensor", "name": name}


def _where(path: tuple[str, ...]) -> str:
    return "the entry " + "/".join(path) if path else "the state"


def _dtype_name(dtype: torch.dtype, path: tuple[str, ...]) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise TypeError(
            f"save_memory cannot store dtype {dtype} ({_where(path)}); safetensors holds "
            f"{sorted(_DTYPES)}."
        )
    return name


class _Unpacker:
    """The inverse of :class:`_Packer`, moving tensors and devices where ``device_of`` says."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        manifest: Mapping[str, Mapping[str, Any]],
        device_of: Callable[[str], torch.device],
    ) -> None:
        self.tensors = tensors
        self.manifest = manifest
        self.device_of = device_of

    def unpack(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.unpack(v) for v in value]
        if not isinstance(value, dict):
            return value
        kind = value["__type__"]
        if kind == "tensor":
            name = value["name"]
            tensor = self.tensors[name]
            rows = value.get("rows")
            if rows is not None and rows != tensor.shape[0]:
                full = tensor.new_zeros((rows, *tensor.shape[1:]))
                full[: tensor.shape[0]] = tensor
                tensor = full
            return tensor.to(self.device_of(self.manifest[name]["device"]))
        if kind == "float":
            return float(value["value"])
        if kind == "size":
            return torch.Size(value["items"])
        if kind == "device":
            return self.device_of(value["value"])
        if kind == "dtype":
            return _DTYPES[value["value"]]
        if kind == "tuple":
            return tuple(self.unpack(v) for v in value["items"])
        items = {k: self.unpack(v) for k, v in value["items"].items()}
        if kind == "dict":
            return items
        out = OrderedDict(items)
        if "metadata" in value:
            out._metadata = self.unpack(value["metadata"])
        return out


def _check_skeleton(value: Any, manifest: Mapping[str, Mapping[str, Any]], where: str) -> None:
    """Checks a packed value before unpacking: known tags, tensor references that exist."""
    if isinstance(value, list):
        for v in value:
            _check_skeleton(v, manifest, where)
        return
    if not isinstance(value, dict):
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise MemoryCheckpointError(f"{where}: unexpected JSON value {value!r}.")
        return
    kind = value.get("__type__")
    if kind == "tensor":
        entry = manifest.get(value.get("name"))
        if entry is None:
            raise MemoryCheckpointError(
                f"{where}: refers to tensor {value.get('name')!r}, which {MEMORY_FILE} lacks."
            )
        rows = value.get("rows")
        if rows is not None and not (
            isinstance(rows, int) and entry["shape"] and rows >= entry["shape"][0]
        ):
            raise MemoryCheckpointError(f"{where}: tensor {value['name']!r} has a bad row count.")
    elif kind in ("odict", "dict"):
        if not isinstance(value.get("items"), dict):
            raise MemoryCheckpointError(f"{where}: a {kind} without items.")
        for v in value["items"].values():
            _check_skeleton(v, manifest, where)
        if "metadata" in value:
            _check_skeleton(value["metadata"], manifest, where)
    elif kind == "tuple":
        _check_skeleton(value.get("items"), manifest, where)
    elif kind == "dtype":
        if value.get("value") not in _DTYPES:
            raise MemoryCheckpointError(f"{where}: unknown dtype {value.get('value')!r}.")
    elif kind not in ("float", "size", "device"):
        raise MemoryCheckpointError(f"{where}: unknown entry type {kind!r}.")


def _checksum(config: Mapping[str, Any]) -> str:
    """SHA-256 of the configuration, ``checksum`` entry excluded, in a canonical JSON form."""
    payload = {k: v for k, v in config.items() if k != "checksum"}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------- the parts
#: Constructor arguments that are code (modules, callables), passed again to load_memory.
_CODE_ARGS = ("segmenter", "observation_encoder")


def _check_buffer(rb: Any) -> tuple[HippoStorage, HippoWriter, HippoSampler, DualEncoder]:
    if not isinstance(rb, TensorDictReplayBuffer):
        raise TypeError(
            f"rb must be a TensorDictReplayBuffer of the memory's parts, got {type(rb).__name__}."
        )
    parts = {"storage": rb.storage, "writer": rb.writer, "sampler": rb.sampler}
    expected = {"storage": HippoStorage, "writer": HippoWriter, "sampler": HippoSampler}
    for name, part in parts.items():
        if type(part) is not expected[name]:
            raise TypeError(
                f"rb's {name} must be a {expected[name].__name__} (subclasses carry code the "
                f"checkpoint cannot rebuild), got {type(part).__name__}."
            )
    encoder = rb.writer.encoder
    if type(encoder) is not DualEncoder:
        raise TypeError(f"rb's writer must hold a DualEncoder, got {type(encoder).__name__}.")
    transform = getattr(rb, "_transform", None)
    if transform is not None and len(transform):
        raise ValueError(
            "save_memory saves the memory, not replay-buffer transforms (code): save a buffer "
            f"without transforms and append them again after loading; rb has {transform}."
        )
    return rb.storage, rb.writer, rb.sampler, encoder


def _writer_config(writer: HippoWriter) -> dict[str, Any]:
    """The writer's constructor arguments, ``encoder`` and ``segmenter`` (code) excepted."""
    config = {k: v for k, v in writer.config.items() if k not in _CODE_ARGS}
    # A constructor argument missing here would silently get its default when loading.
    known = set(inspect.signature(HippoWriter.__init__).parameters) - {
        "self",
        "encoder",
        *_CODE_ARGS,
    }
    missing = sorted(known - set(config))
    if missing:
        raise RuntimeError(
            f"HippoWriter takes {missing}, which save_memory does not know how to save; "
            "HippoWriter needs a `config` property reporting all its constructor arguments."
        )
    return config


def _code_part(module: Any) -> str | None:
    return None if module is None else f"{type(module).__module__}.{type(module).__qualname__}"


def _module_device(module: nn.Module) -> str:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return "cpu" if tensor is None else str(tensor.device)


# ---------------------------------------------------------------------------- metrics & card
@torch.no_grad()
def _memory_metrics(storage: HippoStorage, encoder: DualEncoder) -> dict[str, float]:
    """What the model card reports, computed without touching the memory or any RNG."""
    out: dict[str, float] = {"transitions": 0, "episodes": 0}
    if not storage.initialized or storage.episodes is None:
        return out
    table = storage.episodes
    alive = table["rows"] > 0
    finished = alive & table["done"]
    out["transitions"] = int(storage.num_valid)
    out["episodes"] = int(alive.sum())
    out["finished_episodes"] = int(finished.sum())
    if out["finished_episodes"]:
        returns = table["return"][finished].double()
        out["return_mean"] = float(returns.mean())
        out["return_min"] = float(returns.min())
        out["return_max"] = float(returns.max())
        out["episode_length_mean"] = float(table["length"][finished].double().mean())
    rows = storage.valid_mask().nonzero().squeeze(1)
    version = storage._storage.get(HIPPO_KEYS["key_version"]).index_select(0, rows)
    encoded = rows[version >= 0]
    out["pending_keys"] = int(rows.numel() - encoded.numel())
    if encoded.numel():
        out["key_staleness"] = float(
            key_metrics.key_staleness(version[version >= 0], encoder.version)
        )
    if encoded.numel() >= 2:
        # Evenly spaced rows: deterministic, and no draw from any generator.
        pick = torch.linspace(0, encoded.numel() - 1, min(_KEY_SAMPLE, encoded.numel()))
        keys = storage.keys[encoded[pick.long().unique()]].float()
        out["key_effective_rank"] = float(key_metrics.effective_rank(keys))
        out["key_collapse_score"] = float(key_metrics.collapse_score(keys))
        out["key_mean_cosine"] = float(key_metrics.mean_pairwise_cosine(keys))
    return out


def _user_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}."
        )
    out = {}
    for name, value in metrics.items():
        try:
            out[str(name)] = float(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"metrics[{name!r}] must be a number (or a one-element tensor), got {value!r}."
            ) from err
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _model_card(
    metadata: Mapping[str, Any],
    parts: Mapping[str, Mapping[str, Any]],
    title: str,
    load_call: str,
) -> str:
    """The README.md of a saved memory: Hub metadata (YAML) and a summary in markdown."""
    hub = _require("huggingface_hub")
    env = metadata["env"]
    memory = metadata["memory_metrics"]
    encoder, writer, sampler = parts["encoder"], parts["writer"], parts["sampler"]
    card_data = hub.ModelCardData(
        library_name="torchrl_hippo",
        pipeline_tag="reinforcement-learning",
        tags=["reinforcement-learning", "torchrl", "episodic-memory", "torchrl_hippo"],
        embed_dim=metadata["embed_dim"],
        capacity=metadata["capacity"],
        env=env,
    )
    summary = [
        ("environment", env or "not given"),
        ("embedding size", metadata["embed_dim"]),
        ("capacity", f"{_fmt(metadata['capacity'])} transitions"),
        (
            "stored",
            f"{_fmt(memory['transitions'])} transitions in {_fmt(memory['episodes'])} episodes",
        ),
        ("forgetting", writer["forgetting"]),
        (
            "encoder",
            f"DualEncoder(observation_dim={encoder['observation_dim']}, "
            f"action_dim={encoder['action_dim']}, window={encoder['window']}, "
            f"hidden_dim={encoder['hidden_dim']}, momentum={encoder['momentum']}), "
            f"{metadata['encoder_version']} target updates",
        ),
        (
            "sampler",
            f"mixture_ratio={sampler['mixture_ratio']}, top_k={sampler['top_k']}, "
            f"temperature={sampler['temperature']}",
        ),
        ("format", f"{FORMAT_NAME} v{FORMAT_VERSION}"),
    ]
    scores = [
        (k.replace("_", " "), v) for k, v in memory.items() if k not in ("transitions", "episodes")
    ]
    scores += list(metadata["metrics"].items())
    summary_md = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in summary)
    scores_md = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in scores) or "| (none) | |"
    body = f"""
# {title}

An episodic memory for [TorchRL](https://github.com/pytorch/rl) replay buffers, saved by
`torchrl_hippo` {metadata["torchrl_hippo_version"]}: the stored transitions with their
embedding keys and episode table, the writer's open episodes, the sampler's state, and the dual
(online + momentum target) encoder that makes the keys.

| | |
|---|---|
{summary_md}

## Metrics

| metric | value |
|---|---|
{scores_md}

Returns are over finished episodes. Key metrics are over up to {_KEY_SAMPLE} stored keys: an
effective rank near the embedding size and a mean cosine near 0 mean healthy, uncollapsed keys.

## Usage

```python
{load_call}
batch = rb.sample()  # "index", "priority_weight", ("hippo", "semantic"), ...
rb.extend(new_data)  # carries on exactly where the saved memory stopped
```

`{CONFIG_FILE}` holds the configuration, the state's skeleton and a SHA-256 checksum per
tensor; `{MEMORY_FILE}` the replay buffer's tensors; `{WEIGHTS_FILE}` the encoder. Loading
unpickles nothing.
"""
    return str(hub.ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}"))


# ---------------------------------------------------------------------------- saving
def _snapshot(
    rb: TensorDictReplayBuffer,
    env: str | None,
    metrics: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """Everything a checkpoint holds, gathered before anything is written.

    Returns the configuration (JSON), the tensors of each safetensors file, and each part's
    raw configuration (for the model card).
    """
    storage, writer, sampler, encoder = _check_buffer(rb)
    if env is not None and not isinstance(env, str):
        raise TypeError(f"env must be a str naming the environment, got {type(env).__name__}.")
    user_metrics = _user_metrics(metrics)
    _check_tensor_rows(storage)
    raw = {
        "storage": storage.config,
        "writer": _writer_config(writer),
        "sampler": sampler.config,
        "encoder": encoder.config,
    }

    state = dict(rb.state_dict())
    state.pop("_prefetch_state", None)  # a prefetch queue holds batches already drawn
    # With its storage, the sampler also saves its retrieval pool (when current).
    state["_sampler"] = sampler.state_dict(storage=storage)
    rng = state.pop("_rng", None)
    rows_state = state["_storage"]
    length = rows_state.get("_len", 0)
    if rows_state.get("initialized") and length < storage.max_size:
        # Rows past the high-water mark were never written: the columns are saved without them.
        columns = rows_state["_storage"]
        trimmed = OrderedDict(
            (k, _Rows(v[:length], v.shape[0]) if isinstance(v, torch.Tensor) else v)
            for k, v in columns.items()
        )
        if hasattr(columns, "_metadata"):
            trimmed._metadata = columns._metadata
        state["_storage"] = dict(rows_state, _storage=trimmed)

    packer, weights = _Packer(), _Packer()
    skeleton = packer.pack(state, ("state",))
    rng_json = None
    if rng is not None:
        rng_json = {"state": packer.pack(rng[0], ("rng",)), "device": str(rng[1])}
    weights_json = weights.pack(encoder.state_dict(), ())

    def part(name: str, obj: Any, **extra: Any) -> dict[str, Any]:
        return {"class": type(obj).__name__, "config": packer.pack(raw[name], ()), **extra}

    metadata = {
        "env": env,
        "metrics": user_metrics,
        "memory_metrics": _memory_metrics(storage, encoder),
        "embed_dim": encoder.embed_dim,
        "capacity": storage.max_size,
        "encoder_version": int(encoder.version),
        "torchrl_hippo_version": _library_version(),
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "buffer": {
            "class": type(rb).__name__,
            "batch_size": rb._batch_size,
            "priority_key": packer.pack(rb.priority_key, ()),
        },
        "storage": part("storage", storage),
        "writer": part("writer", writer, segmenter=_code_part(getattr(writer, "segmenter", None))),
        "sampler": part("sampler", sampler),
        "encoder": part(
            "encoder",
            encoder,
            observation_encoder=_code_part(encoder.online.observation_encoder),
            device=_module_device(encoder),
            training=encoder.training,
            weights=weights_json,
        ),
        "state": skeleton,
        "rng": rng_json,
        "tensors": {MEMORY_FILE: packer.manifest, WEIGHTS_FILE: weights.manifest},
        "metadata": _json_metadata(metadata),
    }
    config["checksum"] = _checksum(config)
    return config, {MEMORY_FILE: packer.tensors, WEIGHTS_FILE: weights.tensors}, raw


def _json_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata with non-finite floats made JSON-safe (they are reported, never read back)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return repr(value)
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        return value

    return clean(metadata)


def _check_tensor_rows(storage: HippoStorage) -> None:
    """Refuses rows with non-tensor entries, which TensorDict state dicts silently drop."""
    if not storage.initialized:
        return
    lost = [
        key
        for key, value in storage._storage.items(True, True, is_leaf=is_leaf_nontensor)
        if not isinstance(value, torch.Tensor)
    ]
    if lost:
        raise TypeError(
            f"save_memory stores tensors only, and the memory's rows hold non-tensor entries "
            f"{lost}: exclude them from the data before extending the buffer."
        )


def _library_version() -> str:
    import torchrl_hippo

    return torchrl_hippo.__version__


def _fsync(path: Path) -> None:
    """Flushes a file (or, where the OS allows, a directory) to disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # directories cannot be opened on some systems
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_checkpoint(
    folder: Path,
    config: Mapping[str, Any],
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    card: str,
) -> None:
    save_file = _require("safetensors.torch").save_file
    for name in _TENSOR_FILES:
        save_file(dict(tensors[name]), str(folder / name), metadata={"format": "pt"})
    (folder / CARD_FILE).write_text(card, encoding="utf-8")
    text = json.dumps(config, indent=1, allow_nan=False)
    (folder / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")
    for name in _FILES:
        _fsync(folder / name)
    _fsync(folder)


def _is_checkpoint(folder: Path) -> bool:
    try:
        with open(folder / CONFIG_FILE, encoding="utf-8") as file:
            return json.load(file).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _replaceable(path: Path) -> bool:
    """Whether a save may replace ``path``: an empty directory, or one holding a memory's files
    only (a damaged memory can be overwritten, a directory holding anything else cannot)."""
    if not path.is_dir() or path.is_symlink():
        return False
    return {p.name for p in path.iterdir()} <= set(_FILES)


def _leftovers(path: Path, kind: str) -> list[Path]:
    """Directories that saves to ``path`` leave beside it: ``saving`` or ``replaced``."""
    return sorted(path.parent.glob(f".{path.name}.{kind}-*"))


def _owner_alive(leftover: Path, path: Path) -> bool:
    """Whether the process that made a leftover directory (its pid is in the name) still runs."""
    if os.name != "posix":
        return True  # no cheap liveness test there: never remove another process's work
    try:  # .<name>.<kind>-<pid>-<token>...
        pid = int(leftover.name[len(path.name) + 2 :].split("-")[1])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def save_memory(
    rb: TensorDictReplayBuffer,
    path: str | os.PathLike,
    *,
    env: str | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Saves a whole memory to the directory ``path``, atomically.

    Writes ``config.json``, ``memory.safetensors``, ``model.safetensors`` and a model card
    ``README.md`` (see :mod:`torchrl_hippo.hub`) to a temporary directory beside ``path``, then
    renames it into place. An existing memory at ``path`` is replaced only once the new one is
    complete; an interrupted save leaves it loadable. The buffer is not modified.

    Args:
        rb (TensorDictReplayBuffer): a buffer of a :class:`~torchrl_hippo.HippoStorage`, a
            :class:`~torchrl_hippo.HippoWriter` (with its :class:`~torchrl_hippo.DualEncoder`)
            and a :class:`~torchrl_hippo.HippoSampler`, without transforms.
        path (str or PathLike): the directory to write. It must not exist, be empty, or hold
            a memory saved earlier (which is replaced).

    Keyword Args:
        env (str, optional): the environment the memory was collected in, for the model
            card. Defaults to ``None``.
        metrics (Mapping[str, float], optional): numbers to report in the model card and in
            ``config.json`` (e.g. the metrics of a consolidation run). Defaults to ``None``.
            Sizes, returns and key-health metrics of the memory are reported anyway.

    Returns:
        The path of the saved memory.

    Examples:
        >>> import json, tempfile
        >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> from torchrl_hippo.hub import save_memory
        >>> rb = TensorDictReplayBuffer(
        ...     storage=HippoStorage(1000),
        ...     writer=HippoWriter(DualEncoder(observation_dim=4, action_dim=2, embed_dim=8)),
        ...     sampler=HippoSampler(),
        ... )
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = save_memory(rb, f"{tmp}/empty-memory", env="CartPole-v1")
        ...     config = json.loads((path / "config.json").read_text())
        ...     files = sorted(p.name for p in path.iterdir())
        >>> files
        ['README.md', 'config.json', 'memory.safetensors', 'model.safetensors']
        >>> config["format_version"], config["metadata"]["capacity"], config["metadata"]["env"]
        (1, 1000, 'CartPole-v1')
    """
    return _save(rb, path, env=env, metrics=metrics, repo_id=None)


def _save(
    rb: TensorDictReplayBuffer,
    path: str | os.PathLike,
    *,
    env: str | None,
    metrics: Mapping[str, Any] | None,
    repo_id: str | None,
) -> Path:
    _require("safetensors.torch")
    path = Path(path).expanduser().absolute()
    if path.exists() and not _replaceable(path):
        raise FileExistsError(
            f"path {str(path)!r} exists and is not a saved memory: save_memory replaces only "
            "a memory saved earlier (or an empty directory)."
        )
    config, tensors, raw = _snapshot(rb, env, metrics)
    if repo_id is None:
        title, call = (
            path.name,
            (
                "from torchrl_hippo.hub import load_memory\n\n"
                f'rb = load_memory("{path.name}")  # the directory holding this file'
            ),
        )
    else:
        title, call = (
            repo_id,
            (
                "from torchrl_hippo.hub import load_memory_from_hub\n\n"
                f'rb = load_memory_from_hub("{repo_id}")'
            ),
        )
    card = _model_card(config["metadata"], raw, title, call)

    path.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{os.urandom(4).hex()}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-{token}-", dir=path.parent))
    try:
        _write_checkpoint(tmp, config, tensors, card)
        if path.exists():
            # Two renames: the new memory is complete before the old one moves aside, and
            # load_memory falls back on the old one if a crash comes between them.
            old = path.parent / f".{path.name}.replaced-{token}-0"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(path.parent)
    for kind in ("saving", "replaced"):
        for leftover in _leftovers(path, kind):
            if not _owner_alive(leftover, path):
                shutil.rmtree(leftover, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------- loading
def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise MemoryCheckpointError(f"{folder} holds no {CONFIG_FILE}: it is not a saved memory.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MemoryCheckpointError(
            f"{file} is not valid JSON (truncated or corrupted): {err}"
        ) from err
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise MemoryCheckpointError(f"{file} does not describe a {FORMAT_NAME} checkpoint.")
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MemoryCheckpointError(f"{file} has an invalid format_version {version!r}.")
    if version > FORMAT_VERSION:
        raise MemoryCheckpointError(
            f"{file} has format_version {version}, written by a newer torchrl_hippo; this one "
            f"({_library_version()}) reads versions up to {FORMAT_VERSION}: upgrade torchrl_hippo."
        )
    if config.get("checksum") != _checksum(config):
        raise MemoryCheckpointError(
            f"{file} does not match its checksum: it was corrupted or edited after saving."
        )
    missing = [name for name in _SECTIONS if name not in config]
    if missing:
        raise MemoryCheckpointError(f"{file} lacks the sections {missing}.")
    return config


def _read_tensors(folder: Path, config: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Loads every tensor on CPU, checking names, dtypes, shapes and checksums."""
    safe_open = _require("safetensors").safe_open
    out = {}
    for filename in _TENSOR_FILES:
        manifest = config["tensors"].get(filename)
        file = folder / filename
        if not isinstance(manifest, dict):
            raise MemoryCheckpointError(f"{CONFIG_FILE} lists no tensors for {filename}.")
        if not file.is_file():
            raise MemoryCheckpointError(f"{folder} lacks {filename}: the checkpoint is incomplete.")
        tensors = {}
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                names = set(handle.keys())
                missing, extra = sorted(set(manifest) - names), sorted(names - set(manifest))
                if missing or extra:
                    raise MemoryCheckpointError(
                        f"{file} does not hold the tensors {CONFIG_FILE} lists: missing "
                        f"{missing[:5]}, unexpected {extra[:5]}."
                    )
                for name in manifest:
                    # A copy: get_tensor maps the file, which a later save may replace.
                    tensors[name] = handle.get_tensor(name).clone()
        except MemoryCheckpointError:
            raise
        except Exception as err:  # safetensors' own errors (truncated header or data, ...)
            raise MemoryCheckpointError(
                f"{file} cannot be read as safetensors (truncated or corrupted): {err}"
            ) from err
        for name, entry in manifest.items():
            tensor = tensors[name]
            dtype = _DTYPE_NAMES.get(tensor.dtype)
            if dtype != entry.get("dtype") or list(tensor.shape) != entry.get("shape"):
                raise MemoryCheckpointError(
                    f"{file}: tensor {name!r} is {dtype}{list(tensor.shape)}, "
                    f"{CONFIG_FILE} says {entry.get('dtype')}{entry.get('shape')}."
                )
            if _sha256(tensor) != entry.get("sha256"):
                raise MemoryCheckpointError(
                    f"{file}: tensor {name!r} does not match its SHA-256 checksum: the file is "
                    "corrupted."
                )
        out[filename] = tensors
    return out


def _device_policy(
    config: Mapping[str, Any], map_location: str | torch.device | None
) -> Callable[[str], torch.device]:
    """Where saved devices go, checked before anything is built."""
    if map_location is not None:
        try:
            target = torch.device(map_location)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"map_location must name a device, got {map_location!r}.") from err
        _check_device_usable(target, "map_location")
        return lambda saved: target
    saved = {
        entry["device"] for manifest in config["tensors"].values() for entry in manifest.values()
    }
    saved.add(config["encoder"].get("device", "cpu"))
    storage_device = config["storage"]["config"]["items"].get("device")
    if isinstance(storage_device, dict):  # a packed torch.device ("auto" stays a str)
        saved.add(storage_device.get("value", "cpu"))
    for device in sorted(saved):
        _check_device_usable(torch.device(device), "the saved device")
    return torch.device


def _check_device_usable(device: torch.device, what: str) -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"{what} is {device}, but CUDA is not available here: load the memory with "
                "map_location='cpu'."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"{what} is {device}, but this machine has {torch.cuda.device_count()} CUDA "
                "device(s): pass map_location."
            )


def _check_code_part(saved: str | None, given: Any, argument: str, owner: str) -> None:
    if saved is None and given is not None:
        raise ValueError(
            f"{argument} was given, but the saved {owner} had none: load without {argument}."
        )
    if saved is not None and given is None:
        raise ValueError(
            f"the saved {owner} was built with {argument}={saved}, which is code, not data: "
            f"pass an instance built with the same arguments, load_memory(..., {argument}=...); "
            "its weights or state come from the checkpoint."
        )
    if saved is not None and _code_part(given) != saved:
        raise ValueError(f"{argument} is a {_code_part(given)}, the saved one was a {saved}.")


def _find_memory(path: Path) -> Path:
    if path.exists():
        return path
    previous = [p for p in _leftovers(path, "replaced") if _is_checkpoint(p)]
    if not previous:
        raise FileNotFoundError(f"No saved memory at {str(path)!r}.")
    latest = max(previous, key=lambda p: p.stat().st_mtime)
    warnings.warn(
        f"{path} is missing: a save_memory was interrupted while replacing it. Loading the "
        f"memory it was replacing, {latest.name}.",
        stacklevel=3,
    )
    return latest


def load_memory(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device | None = None,
    observation_encoder: nn.Module | None = None,
    segmenter: Callable | None = None,
) -> TensorDictReplayBuffer:
    """Builds a working memory from a directory written by :func:`save_memory`.

    The buffer is made of a new :class:`~torchrl_hippo.HippoStorage`,
    :class:`~torchrl_hippo.HippoWriter`, :class:`~torchrl_hippo.HippoSampler` and
    :class:`~torchrl_hippo.DualEncoder` built from the saved configuration, then given the
    saved state: ``extend`` and ``sample`` continue exactly as in the saved buffer (same
    global seed, or the buffer's own generator, which is restored). Everything is checked first
    (format version, checksums of the configuration and of every tensor, dtypes, shapes,
    missing files, devices); on failure :class:`MemoryCheckpointError` is raised and nothing
    is built.

    Args:
        path (str or PathLike): the directory of the saved memory.

    Keyword Args:
        map_location (str or torch.device, optional): the device of the loaded storage,
            encoder and states, e.g. ``"cpu"`` for a memory saved on CUDA. Defaults to
            ``None``: the devices it was saved on.
        observation_encoder (nn.Module, optional): required when the saved encoder had one
            (an instance of the same class; its weights are loaded). Defaults to ``None``.
        segmenter (callable, optional): required when the saved writer had one (an instance
            of the same class; its state is loaded). Defaults to ``None``.

    Returns:
        A :class:`~torchrl.data.TensorDictReplayBuffer`.

    Examples:
        >>> import tempfile
        >>> import torch
        >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> from torchrl_hippo.hub import MemoryCheckpointError, load_memory, save_memory
        >>> rb = TensorDictReplayBuffer(
        ...     storage=HippoStorage(500, key_dtype=torch.float16),
        ...     writer=HippoWriter(DualEncoder(4, 2, 8), forgetting="importance"),
        ...     sampler=HippoSampler(mixture_ratio=0.3),
        ...     batch_size=32,
        ... )
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     loaded = load_memory(save_memory(rb, f"{tmp}/memory"), map_location="cpu")
        ...     try:
        ...         load_memory(f"{tmp}/elsewhere")
        ...     except FileNotFoundError as err:
        ...         print("FileNotFoundError")
        FileNotFoundError
        >>> loaded.storage.max_size, loaded.storage.key_dtype, loaded.writer.forgetting
        (500, torch.float16, 'importance')
        >>> loaded.sampler.mixture_ratio, loaded._batch_size
        (0.3, 32)
    """
    folder = _find_memory(Path(path).expanduser())
    # ---- validation: nothing is built before all of it has passed
    config = _read_config(folder)
    tensors = _read_tensors(folder, config)
    manifest = config["tensors"][MEMORY_FILE]
    weights_manifest = config["tensors"][WEIGHTS_FILE]
    for section in ("buffer", "storage", "writer", "sampler", "encoder"):
        if not isinstance(config[section], dict) or (
            section != "buffer" and not isinstance(config[section].get("config"), dict)
        ):
            raise MemoryCheckpointError(f"{CONFIG_FILE}: section {section!r} is malformed.")
        if section != "buffer":
            _check_skeleton(config[section]["config"], {}, f"{CONFIG_FILE} {section}")
    _check_skeleton(config["state"], manifest, f"{CONFIG_FILE} state")
    _check_skeleton(config["encoder"].get("weights"), weights_manifest, f"{CONFIG_FILE} encoder")
    rng = config.get("rng")
    if rng is not None:
        _check_skeleton(rng.get("state"), manifest, f"{CONFIG_FILE} rng")
    device_of = _device_policy(config, map_location)
    _check_code_part(
        config["encoder"].get("observation_encoder"),
        observation_encoder,
        "observation_encoder",
        "encoder",
    )
    _check_code_part(config["writer"].get("segmenter"), segmenter, "segmenter", "writer")

    # ---- building
    unpack = _Unpacker(tensors[MEMORY_FILE], manifest, device_of).unpack
    cfg = {s: unpack(config[s]["config"]) for s in ("storage", "writer", "sampler", "encoder")}
    if map_location is not None:
        cfg["storage"]["device"] = device_of("cpu")
    encoder = DualEncoder(**cfg["encoder"], observation_encoder=observation_encoder)
    weights = _Unpacker(tensors[WEIGHTS_FILE], weights_manifest, lambda saved: torch.device("cpu"))
    try:
        encoder.load_state_dict(weights.unpack(config["encoder"]["weights"]))
    except RuntimeError as err:
        raise ValueError(
            "The saved encoder's weights do not fit the rebuilt encoder (is observation_encoder "
            f"the same architecture as the saved one?): {err}"
        ) from err
    encoder.to(device_of(config["encoder"].get("device", "cpu")))
    encoder.train(bool(config["encoder"].get("training", True)))
    writer_kwargs = dict(cfg["writer"])
    if segmenter is not None:
        writer_kwargs["segmenter"] = segmenter
    storage = HippoStorage(**cfg["storage"])
    sampler = HippoSampler(**cfg["sampler"])
    rb = TensorDictReplayBuffer(
        storage=storage,
        writer=HippoWriter(encoder, **writer_kwargs),
        sampler=sampler,
        batch_size=config["buffer"].get("batch_size"),
        priority_key=unpack(config["buffer"].get("priority_key", "td_error")),
    )
    state = unpack(config["state"])
    state["_rng"] = None
    if rng is not None:
        rng_state = _Unpacker(tensors[MEMORY_FILE], manifest, lambda saved: torch.device("cpu"))
        rng_device = torch.device(rng["device"])
        if map_location is not None and rng_device.type != torch.device(map_location).type:
            warnings.warn(
                f"The buffer's {rng_device.type} generator cannot move to {map_location}: the "
                "loaded buffer samples with the global generator instead.",
                stacklevel=2,
            )
        else:
            state["_rng"] = (rng_state.unpack(rng["state"]), rng["device"])
    rb.load_state_dict(state)
    # Again with its storage, so that the sampler's retrieval pool is restored.
    sampler.load_state_dict(state["_sampler"], storage=storage)
    return rb


# ---------------------------------------------------------------------------- the Hub
def push_memory_to_hub(
    rb: TensorDictReplayBuffer,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    env: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    api: Any = None,
) -> Any:
    """Uploads a whole memory to a Hugging Face Hub model repository.

    The memory is saved with :func:`save_memory` to a temporary directory (safetensors tensors,
    a JSON configuration and a generated model card), the repository is created if needed
    (``HfApi.create_repo(..., exist_ok=True)``), and the directory is uploaded in one commit
    with ``HfApi.upload_folder``. Nothing is sent if saving fails.

    Args:
        rb (TensorDictReplayBuffer): the memory (see :func:`save_memory`).
        repo_id (str): ``"owner/name"`` of the model repository.

    Keyword Args:
        private (bool, optional): whether a new repository is private. An existing one keeps
            its visibility. Defaults to ``None`` (the Hub's default, public).
        token (str or bool, optional): the Hub token. Defaults to ``None`` (the logged-in one).
        revision (str, optional): the branch to commit to, created if missing.
            Defaults to ``None`` (``main``).
        commit_message (str, optional): Defaults to ``"Upload torchrl_hippo memory"``.
        create_pr (bool, optional): open a pull request instead of committing.
            Defaults to ``False``.
        env (str, optional): the environment's name, for the model card. Defaults to ``None``.
        metrics (Mapping[str, float], optional): numbers for the model card.
            Defaults to ``None``.
        api (huggingface_hub.HfApi, optional): the client to use (another endpoint, ...).
            Defaults to ``None``: ``HfApi(token=token)``.

    Returns:
        The ``CommitInfo`` of the upload.

    Examples:
        >>> from torchrl_hippo.hub import load_memory_from_hub, push_memory_to_hub
        >>> push_memory_to_hub(rb, "me/cartpole-memory", private=True, env="CartPole-v1")  # doctest: +SKIP
        >>> rb = load_memory_from_hub("me/cartpole-memory")  # doctest: +SKIP
    """
    hub = _require("huggingface_hub")
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a non-empty 'owner/name' string, got {repo_id!r}.")
    if api is None:
        api = hub.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hippo-push-") as tmp:
        folder = _save(rb, Path(tmp) / "memory", env=env, metrics=metrics, repo_id=repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or "Upload torchrl_hippo memory",
            create_pr=create_pr,
        )


def load_memory_from_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    map_location: str | torch.device | None = None,
    observation_encoder: nn.Module | None = None,
    segmenter: Callable | None = None,
) -> TensorDictReplayBuffer:
    """Loads a memory from a Hugging Face Hub repository, its local cache, or a local directory.

    ``repo_id`` naming an existing directory loads it directly (:func:`load_memory`). Otherwise
    the repository's files are fetched with ``huggingface_hub.snapshot_download``, which reads
    the local cache (``models--owner--name/refs``, ``snapshots/<commit>/``, ``blobs/``) and, with
    ``HF_HUB_OFFLINE=1`` or ``local_files_only=True``, only the cache.

    Args:
        repo_id (str): ``"owner/name"``, or the path of a directory holding a saved memory.

    Keyword Args:
        revision (str, optional): a branch, tag or commit hash. Defaults to ``None`` (``main``).
        cache_dir (str or PathLike, optional): the Hub cache. Defaults to ``None`` (``HF_HUB_CACHE``).
        token (str or bool, optional): the Hub token. Defaults to ``None``.
        local_files_only (bool, optional): never reach the network. Defaults to ``False``.
        map_location, observation_encoder, segmenter: as in :func:`load_memory`.

    Returns:
        A :class:`~torchrl.data.TensorDictReplayBuffer`.

    Examples:
        >>> import tempfile
        >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> from torchrl_hippo.hub import load_memory_from_hub, save_memory
        >>> rb = TensorDictReplayBuffer(
        ...     storage=HippoStorage(100),
        ...     writer=HippoWriter(DualEncoder(4, 2, 8)),
        ...     sampler=HippoSampler(),
        ... )
        >>> with tempfile.TemporaryDirectory() as tmp:  # a local directory as repo id
        ...     loaded = load_memory_from_hub(str(save_memory(rb, f"{tmp}/memory")))
        >>> loaded.storage.max_size
        100
    """
    local = Path(repo_id).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} was given, but repo_id {repo_id!r} is a local directory."
            )
        folder = local
    elif repo_id.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        raise FileNotFoundError(
            f"repo_id {repo_id!r} looks like a path, and no directory is there."
        )
    else:
        hub = _require("huggingface_hub")
        folder = Path(
            hub.snapshot_download(
                repo_id,
                repo_type="model",
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                allow_patterns=list(_FILES),
                library_name="torchrl_hippo",
                library_version=_library_version(),
            )
        )
    return load_memory(
        folder,
        map_location=map_location,
        observation_encoder=observation_encoder,
        segmenter=segmenter,
    )
