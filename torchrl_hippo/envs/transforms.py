"""TorchRL environment transforms that read the episodic memory while the agent acts."""

from __future__ import annotations

import math
from typing import Any

import torch
from tensordict import TensorDictBase, unravel_key
from tensordict.utils import NestedKey
from torch import Tensor, nn
from torchrl.data import Categorical, Composite, Unbounded
from torchrl.envs import EnvBase, Transform
from torchrl.envs.transforms.utils import _get_reset

from torchrl_hippo._checks import as_nested_key
from torchrl_hippo.query import _as_storage, _eval_mode, _search_memory

__all__ = ["MemoryRetrieval"]


class MemoryRetrieval(Transform):
    """Appends to each observation what a live episodic memory recalls about the recent past.

    After every step, the window of the last ``encoder.window`` transitions of each environment,
    ``(observation, action, next reward)``, the very layout the memory keys its rows with, is
    embedded by the memory's :class:`~torchrl_hippo.DualEncoder` (its **online** network, in
    eval mode and without gradient, as queries are) and the ``k`` most similar stored
    transitions are retrieved with :func:`torchrl_hippo.search.topk_similarity`. Their keys
    and similarities (and optionally their episodes' returns) are written next to the new
    observation, so a policy can condition on them. The retrieval is read-only, like
    :func:`~torchrl_hippo.query.memory_query`: no access is counted, no key refreshed.

    Why the window ends at the last *completed* transition: a stored key summarises a window
    whose last step holds the action taken and the reward received at that row. When the
    policy has to act on observation ``o_t``, its action ``a_t`` and reward ``r_{t+1}`` do not
    exist yet, so the freshest window with the same meaning as the stored keys is the one ending
    with ``(o_{t-1}, a_{t-1}, r_t)``. Right after a reset there is no completed transition: the
    outputs are zero and ``mask`` is ``False``. ``mask`` is also ``False`` for the slots that a
    memory holding fewer than ``k`` searchable rows cannot fill (an empty memory never raises
    here, so collection can start before the memory has data).

    The transform keeps one rolling window per environment (its state, like
    :class:`~torchrl.envs.CatFrames`): it works on environments of batch size ``[]`` or
    ``[B]`` (any batch shape), resets only the windows of the environments being reset
    (``"_reset"``), and reads the memory as it is at each step, so writes made between steps
    (``rb.extend`` in a collection loop) are seen at once. The memory must live in the same
    process: use it on the outer ``TransformedEnv`` of a batched environment
    (``TransformedEnv(SerialEnv(...) or ParallelEnv(...), MemoryRetrieval(rb))``) and with
    single-process collectors, not inside environments that are sent to worker processes.

    Entries written (``out_key`` is ``"retrieval"`` by default), for an env of batch size ``[*B]``:

    ==========================  ==================  ===========================================
    entry                       shape               meaning
    ==========================  ==================  ===========================================
    ``(out_key, "key")``        ``[*B, k, D]``      stored keys of the neighbours (fp32)
    ``(out_key, "score")``      ``[*B, k]``         cosine similarity to the query, decreasing
    ``(out_key, "mask")``       ``[*B, k]`` bool    ``True`` for a retrieved neighbour
    ``(out_key, "return")``     ``[*B, k]``         the neighbours' episode returns
                                                    (with ``include_returns=True``)
    ==========================  ==================  ===========================================

    Args:
        memory: the replay buffer of the memory (built on a
            :class:`~torchrl_hippo.HippoStorage`), or the storage itself.
        k (int, optional): neighbours per environment. Defaults to ``4``.

    Keyword Args:
        encoder (DualEncoder, optional): the query encoder. Defaults to ``None``: the encoder
            of the memory's writer.
        include_returns (bool, optional): also write the neighbours' episode returns (final
            for finished episodes, running sums otherwise). Defaults to ``False``.
        observation_key (NestedKey, optional): the observation read from the data at time
            ``t``. Defaults to ``"observation"``.
        action_key (NestedKey, optional): the action read from the data at time ``t``.
            Defaults to ``"action"``.
        reward_key (NestedKey, optional): the reward of the step, read from the step's
            output. Defaults to ``"reward"``.
        out_key (NestedKey, optional): the sub-TensorDict the entries go to. Keep it outside
            ``"hippo"``, which the memory reserves. Defaults to ``"retrieval"``.
        encode_pending (bool, optional): compute deferred keys before searching (see
            :func:`~torchrl_hippo.query.memory_query`); with ``False`` rows without a key are
            skipped. Defaults to ``True``.
        backend (str, optional): backend of the top-k search. Defaults to ``"auto"``.

    Examples:
        >>> import torch
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> from torchrl.envs import GymEnv, TransformedEnv
        >>> from torchrl.envs.utils import check_env_specs
        >>> from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
        >>> from torchrl_hippo.envs.transforms import MemoryRetrieval
        >>> encoder = DualEncoder(observation_dim=4, action_dim=2, embed_dim=16, window=4)
        >>> rb = TensorDictReplayBuffer(
        ...     storage=HippoStorage(1_000), writer=HippoWriter(encoder), sampler=HippoSampler()
        ... )
        >>> env = TransformedEnv(GymEnv("CartPole-v1"), MemoryRetrieval(rb, k=3))
        >>> check_env_specs(env)  # works on an empty memory too  # doctest: +ELLIPSIS
        >>> _ = rb.extend(env.rollout(50, break_when_any_done=False))
        >>> td = env.rollout(5)
        >>> td["next", "retrieval", "key"].shape
        torch.Size([5, 3, 16])
        >>> td["next", "retrieval", "mask"].all().item()  # after a step, 3 neighbours
        True
        >>> td["retrieval", "mask"][0].any().item()  # at reset: nothing to query with yet
        False
    """

    def __init__(
        self,
        memory: Any,
        k: int = 4,
        *,
        encoder: nn.Module | None = None,
        include_returns: bool = False,
        observation_key: NestedKey = "observation",
        action_key: NestedKey = "action",
        reward_key: NestedKey = "reward",
        out_key: NestedKey = "retrieval",
        encode_pending: bool = True,
        backend: str = "auto",
    ) -> None:
        storage = _as_storage(memory)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}.")
        if encoder is None:
            encoder = storage.encoder
            if encoder is None:
                raise ValueError(
                    "MemoryRetrieval needs the memory's encoder: build the replay buffer with a "
                    "HippoWriter first (it attaches its encoder), or pass encoder=..."
                )
        for attr in ("encode", "embed_dim", "window"):
            if not hasattr(encoder, attr):
                raise TypeError(
                    f"encoder must be a DualEncoder-like module with `{attr}`, got "
                    f"{type(encoder).__name__}."
                )
        if storage.embed_dim is not None and storage.embed_dim != encoder.embed_dim:
            raise ValueError(
                f"encoder.embed_dim={encoder.embed_dim} does not match the memory's keys of "
                f"size {storage.embed_dim}."
            )
        keys = {}
        for name, value in (
            ("observation_key", observation_key),
            ("action_key", action_key),
            ("reward_key", reward_key),
            ("out_key", out_key),
        ):
            keys[name] = as_nested_key(value, name)
        out = keys["out_key"]
        out = out if isinstance(out, tuple) else (out,)
        if out[0] == "hippo":
            raise ValueError(
                f"out_key={out_key!r} lies under 'hippo', which the memory reserves for its own "
                "entries (a HippoWriter would drop it): choose another key."
            )
        names = ["key", "score", "mask"] + (["return"] if include_returns else [])
        super().__init__(
            in_keys=[keys["observation_key"], keys["action_key"], keys["reward_key"]],
            out_keys=[unravel_key((*out, name)) for name in names],
        )
        self._storage = storage
        # Not a submodule: the encoder belongs to the memory (its writer trains and moves it).
        self.__dict__["_encoder"] = encoder
        self.k = k
        self.include_returns = bool(include_returns)
        self.observation_key = keys["observation_key"]
        self.action_key = keys["action_key"]
        self.reward_key = keys["reward_key"]
        self.out_key = keys["out_key"]
        self.encode_pending = bool(encode_pending)
        self.backend = backend
        self._clear_windows()

    # ------------------------------------------------------------------ state
    @property
    def encoder(self) -> nn.Module:
        """The query encoder (the memory's :class:`~torchrl_hippo.DualEncoder`)."""
        return self.__dict__["_encoder"]

    @property
    def embed_dim(self) -> int:
        """The size of the retrieved keys."""
        return self.encoder.embed_dim

    def _clear_windows(self) -> None:
        self._obs: Tensor | None = None
        self._action: Tensor | None = None
        self._reward: Tensor | None = None
        self._mask: Tensor | None = None

    def set_container(self, container: Transform | EnvBase) -> None:
        self._clear_windows()
        return super().set_container(container)

    def _entry(self, name: str) -> NestedKey:
        return self.out_keys[("key", "score", "mask", "return").index(name)]

    # ------------------------------------------------------------------ env hooks
    def _reset(
        self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase
    ) -> TensorDictBase:
        batch = tensordict_reset.batch_size
        if self._mask is not None:
            reset_keys = getattr(self.parent, "reset_keys", None) or ["_reset"]
            reset = _get_reset(reset_keys[0], tensordict).reshape(-1)
            reset = reset.to(self._mask.device)
            self._mask = self._mask & ~reset.unsqueeze(-1)
        n = math.prod(batch)
        device = tensordict_reset.device
        dev = device if device is not None else torch.device("cpu")
        scores = torch.zeros(n, 0, device=dev)
        self._write(tensordict_reset, batch, scores, scores.long(), device)
        return tensordict_reset

    def _reset_on_native_autoreset(
        self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase
    ) -> TensorDictBase:
        return self._reset(tensordict, tensordict_reset)

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        batch = next_tensordict.batch_size
        n = math.prod(batch)
        steps = []
        for name, key, source in (
            ("observation", self.observation_key, tensordict),
            ("action", self.action_key, tensordict),
            ("reward", self.reward_key, next_tensordict),
        ):
            value = source.get(key, None)
            if not isinstance(value, Tensor):
                where = "the step's output" if source is next_tensordict else "the step's input"
                raise KeyError(
                    f"MemoryRetrieval: {where} has no {name} entry {key!r} (set {name}_key=...)."
                )
            if value.shape[: len(batch)] != batch:
                raise ValueError(
                    f"MemoryRetrieval: {name} {key!r} has shape {list(value.shape)}, expected "
                    f"the env's batch size {list(batch)} first."
                )
            steps.append(value.reshape(n, 1, *value.shape[len(batch) :]))
        obs, action, reward = steps
        reward = reward.reshape(n, 1, 1).float()
        self._push(obs, action, reward)

        encoder = self.encoder
        param = next(encoder.parameters(), None)
        enc_dev = param.device if param is not None else self._obs.device
        with torch.no_grad(), _eval_mode(encoder):
            queries = encoder.encode(
                self._obs.to(enc_dev),
                self._action.to(enc_dev),
                self._reward.to(enc_dev),
                self._mask.to(enc_dev),
                target=False,
                batch_dims=1,
            )
        storage = self._storage
        queries = queries.to(device=storage.table_device, dtype=torch.float32)
        scores, rows = _search_memory(
            storage,
            queries,
            self.k,
            encode_pending=self.encode_pending,
            backend=self.backend,
            allow_fewer=True,
        )
        self._write(next_tensordict, batch, scores, rows, next_tensordict.device)
        return next_tensordict

    def _push(self, obs: Tensor, action: Tensor, reward: Tensor) -> None:
        """Shifts every environment's window by one step and appends this step."""
        window = self.encoder.window
        n = obs.shape[0]
        fresh = self._mask is None or any(
            buf.shape[0] != n or buf.shape[2:] != new.shape[2:] or buf.dtype != new.dtype
            for buf, new in ((self._obs, obs), (self._action, action), (self._reward, reward))
        )
        if fresh:  # first step (or the data changed shape): empty windows
            self._obs, self._action, self._reward = (
                new.new_zeros(n, window, *new.shape[2:]) for new in (obs, action, reward)
            )
            self._mask = torch.zeros(n, window, dtype=torch.bool, device=obs.device)
        device = self._mask.device
        self._obs = torch.cat([self._obs[:, 1:], obs.to(device)], 1)
        self._action = torch.cat([self._action[:, 1:], action.to(device)], 1)
        self._reward = torch.cat([self._reward[:, 1:], reward.to(device)], 1)
        self._mask = torch.cat(
            [self._mask[:, 1:], torch.ones(n, 1, dtype=torch.bool, device=device)], 1
        )

    def _write(
        self,
        data: TensorDictBase,
        batch: torch.Size,
        scores: Tensor,
        rows: Tensor,
        device: torch.device | None,
    ) -> None:
        """Writes ``[n, k']`` search results into ``data``, padded to ``k`` (mask ``False``)."""
        n, found = scores.shape
        k, dim = self.k, self.embed_dim
        storage = self._storage
        dev = scores.device
        key = torch.zeros(n, k, dim, device=dev)
        score = torch.zeros(n, k, device=dev)
        mask = torch.zeros(n, k, dtype=torch.bool, device=dev)
        if found:
            flat = rows.reshape(-1)
            key[:, :found] = storage.keys.index_select(0, flat).float().reshape(n, found, dim)
            score[:, :found] = scores
            mask[:, :found] = True
        out = {"key": key, "score": score, "mask": mask}
        if self.include_returns:
            ret = torch.zeros(n, k, device=dev)
            if found:
                slots = storage.row_slot.index_select(0, flat)
                ret[:, :found] = storage.episodes.get("return")[slots].reshape(n, found)
            out["return"] = ret
        for name, value in out.items():
            value = value.reshape(*batch, *value.shape[1:])
            data.set(self._entry(name), value if device is None else value.to(device))

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        raise NotImplementedError(
            "MemoryRetrieval keeps a rolling window per environment and only runs inside an "
            "environment (TransformedEnv). To query the memory with given windows or "
            "embeddings, use torchrl_hippo.query.memory_query."
        )

    # ------------------------------------------------------------------ specs
    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        batch = observation_spec.shape
        device = observation_spec.device
        k, dim = self.k, self.embed_dim
        specs = {
            "key": Unbounded(shape=(*batch, k, dim), dtype=torch.float32, device=device),
            "score": Unbounded(shape=(*batch, k), dtype=torch.float32, device=device),
            "mask": Categorical(2, shape=(*batch, k), dtype=torch.bool, device=device),
        }
        if self.include_returns:
            specs["return"] = Unbounded(shape=(*batch, k), dtype=torch.float32, device=device)
        for name, spec in specs.items():
            observation_spec[self._entry(name)] = spec
        return observation_spec

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(k={self.k}, window={self.encoder.window}, "
            f"embed_dim={self.embed_dim}, in_keys={self.in_keys}, out_keys={self.out_keys})"
        )
