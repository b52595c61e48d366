"""Episodic novelty: an intrinsic reward from k-nearest-neighbour distances, in the manner of NGU.

:class:`EpisodicNovelty` is a TorchRL environment :class:`~torchrl.envs.transforms.Transform`. At
every step it embeds what the agent just saw, finds the ``k`` nearest embeddings in a per-env
episodic buffer (emptied when that env is reset) and/or in the keys of a live
:class:`~torchrl_hippo.HippoStorage`, and pays a bonus that is large when those neighbours are far
away (Badia et al., 2020, "Never Give Up", the episodic part).

Neighbours are found with :func:`torchrl_hippo.search.topk_similarity`, so the search runs on the
fused Triton kernel for CUDA tensors. That function ranks by inner product; see
:class:`EpisodicNovelty` for how the buffers are laid out so that its ranking is the Euclidean one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import Tensor, nn
from torchrl.data.tensor_specs import Composite, Unbounded
from torchrl.envs.transforms import RunningMeanStd, Transform

from torchrl_hippo._checks import as_nested_key
from torchrl_hippo.data.storage import HIPPO_KEYS, HippoStorage
from torchrl_hippo.envs._utils import check_choice, check_float, check_int
from torchrl_hippo.modules.encoder import DualEncoder
from torchrl_hippo.search import topk_similarity

__all__ = ["EpisodicNovelty"]

# Envs searched together in one topk_similarity call: each carries a one-hot env column (below),
# so a call costs (group size) x (group's rows); groups bound that at 32 x rows.
_ENV_GROUP = 32
_KERNELS = ("inverse", "gaussian")


class EpisodicNovelty(Transform):
    """Adds an NGU-style episodic novelty bonus to the reward, or writes it to its own key.

    At each step the transform embeds the new observation ``x`` (see *Embeddings*), gathers its
    ``k`` nearest neighbours among the embeddings stored so far (see *Where neighbours come
    from*), and computes, with their squared Euclidean distances ``d²``:

    1. ``d_n = max(d² / mean(d²) - cluster_distance, 0)``, where ``mean(d²)`` is a running mean of
       all neighbour distances seen (frozen by :meth:`freeze`), so the bonus does not depend on
       the scale of the embedding;
    2. similarities ``K = kernel_epsilon / (d_n + kernel_epsilon)`` (the ``"inverse"`` kernel) or
       ``K = exp(-d_n)`` (``"gaussian"``), or ``kernel(d_n)`` for a callable;
    3. ``r = 1 / sqrt(sum K + c)``, and ``r = 0`` where ``sqrt(sum K + c) > max_similarity``;
    4. with ``normalize=True``, ``r / std(r)`` (``(r - mean(r)) / std(r)`` with ``center=True``)
       under running statistics (:class:`~torchrl.envs.transforms.RunningMeanStd`, frozen by
       :meth:`freeze`, as :class:`~torchrl.envs.transforms.VecNorm`'s are), clipped to
       ``[-reward_clip, reward_clip]``;
    5. ``beta * r`` is added to ``reward_key``, or written to ``out_key`` (the reward is then left
       alone, and ``out_key`` is declared in the env's reward spec, as TorchRL's
       :class:`~torchrl.envs.transforms.RNDTransform` does).

    A state close to many stored ones (``sum K`` near ``k``) earns little; a state far from all
    of them earns up to ``1 / sqrt(c)`` before normalisation. A step with no neighbour at all
    (nothing stored yet) counts as maximally novel (``sum K = 0``).

    **Where neighbours come from.** With ``episodic=True`` (the default), each env of the batch
    has its own ring buffer of the last ``capacity`` embeddings of its current episode. A reset
    (read from the ``"_reset"`` mask the TorchRL way: the envs it marks, all of them when there
    is none) empties the buffers of the envs being reset. After a step's bonus is computed, the
    step's embedding is stored. With ``memory=`` (a :class:`~torchrl_hippo.HippoStorage`, or a
    replay buffer holding one), the stored keys of that live memory are searched too (rows
    with a pending key, ``key_version == -1``, and free rows are skipped), and the ``k`` nearest
    of both sources are kept.

    **Search.** :func:`~torchrl_hippo.search.topk_similarity` ranks keys by inner product. An
    episodic buffer therefore stores, per embedding ``e`` of env ``j``, the row
    ``[e, |e|², onehot(j)]`` and queries it with ``[2q, -1, -M (1 - onehot(i))]`` for env ``i``:
    the score ``2 q·e - |e|² - M [i != j] = |q|² - |q - e|² - M [i != j]`` ranks the env's own
    embeddings by Euclidean distance, all above any other env's (``M`` exceeds every distance), so
    up to 32 envs share one search call. The memory's keys are L2-normalised by its encoder, for
    which inner-product and Euclidean rankings agree. The distances ``d²`` used in the bonus are
    recomputed exactly from the neighbours found.

    **Embeddings.** ``embedding`` decides what "the same state" means:

    - ``None``: the identity on ``in_keys[0]`` (the observation, flattened to a float vector).
      Sound for small, informative observations such as the corridor's.
    - an ``nn.Module``: applied to ``in_keys[0]``, under ``no_grad`` (e.g. a fixed random
      projection, ``nn.Linear(obs_dim, 32).requires_grad_(False)``, or NGU's inverse-dynamics
      embedding trained elsewhere); it must return ``[*batch, D]``.
    - a :class:`~tensordict.nn.TensorDictModuleBase`: run on the next observation's entries
      (``embedding.in_keys``); its first out key is the embedding.
    - a :class:`~torchrl_hippo.DualEncoder`: the key a :class:`~torchrl_hippo.HippoWriter` would
      store for the current transition, i.e. the target network's encoding of the trailing
      ``encoder.window`` steps of ``(observation, action, reward)`` of the episode, which the
      transform keeps per env. This is the embedding to use with ``memory=``: a transition
      already in the memory is at distance 0 from its stored key. The reward in the window is
      the env's own, so use ``out_key`` (not adding the bonus to the reward the writer encodes).
      A single observation is not embedded by the encoder alone: its keys are of windows.
      The encoder is not a submodule of the transform (it belongs to the memory), so the
      transform's ``state_dict`` and ``TransformedEnv``'s switch to eval mode leave it alone;
      the other embedding modules are submodules.

    The bonus of a step is about its new observation (with a ``DualEncoder``, its transition),
    compared with those of the episode so far.

    Args:
        embedding (nn.Module, TensorDictModuleBase or DualEncoder, optional): see *Embeddings*.
            Defaults to ``None`` (identity).

    Keyword Args:
        in_keys (sequence of NestedKey, optional): the observation entry read by the identity or
            an ``nn.Module`` embedding (its first item). Defaults to ``["observation"]``. Not
            accepted with a TensorDict module (its own ``in_keys`` are used).
        k (int, optional): neighbours per query, ``>= 1``. Defaults to ``10``.
        capacity (int, optional): embeddings kept per env and episode (the oldest are
            overwritten), ``>= 1``. Defaults to ``1024``.
        episodic (bool, optional): search the per-env episodic buffers. Defaults to ``True``.
        memory (HippoStorage or ReplayBuffer, optional): a memory whose keys are searched as
            well. The embedding's size must match its keys. Defaults to ``None``.
        kernel (str or callable, optional): ``"inverse"``, ``"gaussian"``, or a function mapping
            normalised distances ``d_n`` (a tensor) to similarities in ``[0, 1]``.
            Defaults to ``"inverse"``.
        kernel_epsilon (float, optional): ``ε`` of the inverse kernel, ``> 0``. Defaults to
            ``1e-3``.
        cluster_distance (float, optional): ``ξ``, subtracted from the normalised distances,
            ``>= 0``. Defaults to ``0.008``.
        c (float, optional): pseudo-count ``c`` in ``1 / sqrt(sum K + c)``, ``> 0``. Defaults to
            ``1e-3``.
        max_similarity (float, optional): ``sqrt(sum K + c)`` above which the bonus is ``0``.
            Defaults to ``None`` (no cap).
        beta (float, optional): the bonus's weight. Defaults to ``1.0``.
        normalize (bool, optional): divide by the running std of ``r``. Defaults to ``True``.
        center (bool, optional): also subtract its running mean. Defaults to ``False``.
        reward_clip (float, optional): clip of the normalised bonus, ``> 0``, or ``None``.
            Defaults to ``5.0``.
        reward_key (NestedKey, optional): the env's reward entry. Defaults to ``"reward"``.
        out_key (NestedKey, optional): where to write ``beta * r`` instead of adding it to the
            reward (e.g. ``"intrinsic_reward"``, read as ``("next", "intrinsic_reward")``).
            Defaults to ``None`` (add to the reward).
        backend (str, optional): the ``backend`` of
            :func:`~torchrl_hippo.search.topk_similarity`. Defaults to ``"auto"``.

    Raises:
        TypeError / ValueError: on a bad argument, naming it and what was expected; at run time,
            if the embedding is not ``[*batch, D]``, its size changes, or does not match the
            memory's keys, or the env's batch size changes.

    Examples:
        >>> import torch
        >>> import torchrl_hippo.envs
        >>> from torchrl.envs import GymEnv, TransformedEnv
        >>> from torchrl.envs.utils import check_env_specs
        >>> from torchrl_hippo.envs.novelty import EpisodicNovelty
        >>> env = TransformedEnv(
        ...     GymEnv("hippo/Corridor-ZeroNoise-v0", length=10),
        ...     EpisodicNovelty(k=4, out_key="intrinsic_reward"),
        ... )
        >>> check_env_specs(env, seed=0)
        >>> td = env.rollout(6, break_when_any_done=False)
        >>> td["next", "intrinsic_reward"].shape
        torch.Size([6, 1])
        >>> env.transform.episodic_counts  # the reset observation and 6 steps
        tensor(7)
        >>> _ = env.reset()
        >>> env.transform.episodic_counts
        tensor(1)
    """

    invertible = False

    def __init__(
        self,
        embedding: nn.Module | None = None,
        *,
        in_keys: Sequence[NestedKey] | None = None,
        k: int = 10,
        capacity: int = 1024,
        episodic: bool = True,
        memory: object | None = None,
        kernel: str | Callable[[Tensor], Tensor] = "inverse",
        kernel_epsilon: float = 1e-3,
        cluster_distance: float = 0.008,
        c: float = 1e-3,
        max_similarity: float | None = None,
        beta: float = 1.0,
        normalize: bool = True,
        center: bool = False,
        reward_clip: float | None = 5.0,
        reward_key: NestedKey = "reward",
        out_key: NestedKey | None = None,
        backend: str = "auto",
    ) -> None:
        if embedding is not None and not isinstance(embedding, nn.Module):
            raise TypeError(
                "embedding must be None (identity), an nn.Module, a TensorDictModuleBase or a "
                f"DualEncoder, got {type(embedding).__name__}."
            )
        self._mode = (
            "identity"
            if embedding is None
            else "window"
            if isinstance(embedding, DualEncoder)
            else "tensordict"
            if isinstance(embedding, TensorDictModuleBase)
            else "module"
        )
        if self._mode in ("tensordict", "window"):
            if in_keys is not None:
                raise ValueError(
                    f"in_keys is read from the embedding ({type(embedding).__name__}); do not "
                    "pass it as well."
                )
            in_keys = list(embedding.in_keys)
        elif in_keys is None:
            in_keys = ["observation"]
        elif isinstance(in_keys, (str, tuple)) or len(in_keys) != 1:
            raise ValueError(f"in_keys must be a list of one NestedKey, got {in_keys!r}.")
        in_keys = [as_nested_key(key, "in_keys[i]") for key in in_keys]
        self.reward_key = as_nested_key(reward_key, "reward_key")
        self.out_key = None if out_key is None else as_nested_key(out_key, "out_key")
        if self.out_key is not None and self.out_key == self.reward_key:
            raise ValueError(
                f"out_key must differ from reward_key {self.reward_key!r}; pass out_key=None to "
                "add the bonus to the reward."
            )
        super().__init__(
            in_keys=in_keys, out_keys=[self.reward_key if self.out_key is None else self.out_key]
        )
        if self._mode == "window":
            # Not a submodule: the encoder belongs to the memory (its writer and consolidation);
            # the transform must neither carry its weights nor switch its train/eval mode.
            self.__dict__["embedding"] = embedding
        else:
            self.embedding = embedding

        self.k = check_int("k", k)
        self.capacity = check_int("capacity", capacity)
        for name, flag in (("episodic", episodic), ("normalize", normalize), ("center", center)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}.")
        self.episodic = episodic
        self.normalize = normalize
        self.center = center
        if center and not normalize:
            raise ValueError("center=True needs normalize=True.")
        self.memory = self._check_memory(memory)
        if not episodic and self.memory is None:
            raise ValueError(
                "Nothing to search: episodic=False needs a memory= (HippoStorage or replay buffer)."
            )
        if callable(kernel) and not isinstance(kernel, str):
            self.kernel: str | Callable[[Tensor], Tensor] = kernel
        else:
            self.kernel = check_choice("kernel", kernel, _KERNELS)
        self.kernel_epsilon = self._positive("kernel_epsilon", kernel_epsilon)
        self.cluster_distance = check_float("cluster_distance", cluster_distance, low=0.0)
        self.c = self._positive("c", c)
        self.max_similarity = (
            None if max_similarity is None else self._positive("max_similarity", max_similarity)
        )
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta):
            raise TypeError(f"beta must be a finite number, got {beta!r}.")
        self.beta = float(beta)
        self.reward_clip = (
            None if reward_clip is None else self._positive("reward_clip", reward_clip)
        )
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}.")
        self.backend = backend

        # Statistics update unless frozen. (Not tied to train()/eval(): TransformedEnv puts every
        # transform in eval mode.)
        self._frozen = False
        self.distance_stats = RunningMeanStd(shape=())
        self.reward_stats = RunningMeanStd(shape=())
        # Episodic state, built at the first reset or step (non-persistent: it lives for one
        # episode). `_rows`: [n * capacity, D + 1 + G] rows [e, |e|^2, onehot(env % G)].
        for name in ("_rows", "_valid", "_ptr", "_count"):
            self.register_buffer(name, None, persistent=False)
        self._dim: int | None = None
        self._batch_shape: torch.Size | None = None
        # DualEncoder windows, per env: observation, action, reward, mask.
        self._window: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ argument checks
    @staticmethod
    def _positive(name: str, value: object) -> float:
        value = check_float(name, value, low=0.0)
        if value == 0.0:
            raise ValueError(f"{name} must be a number > 0, got 0.0.")
        return value

    @staticmethod
    def _check_memory(memory: object | None) -> HippoStorage | None:
        if memory is None or isinstance(memory, HippoStorage):
            return memory
        storage = getattr(memory, "storage", None)
        if isinstance(storage, HippoStorage):
            return storage
        raise TypeError(
            "memory must be a HippoStorage or a replay buffer whose storage is one, got "
            f"{type(memory).__name__}."
        )

    # ------------------------------------------------------------------ public state
    @property
    def episodic_counts(self) -> Tensor:
        """Embeddings held per env, shaped like the env's batch (``0`` before the first reset)."""
        if self._count is None:
            return torch.zeros((), dtype=torch.long)
        return self._count.reshape(self._batch_shape).clone()

    def episodic_embeddings(self, env_index: int = 0) -> Tensor:
        """The embeddings held for env ``env_index`` (flat index into the batch), oldest first.

        Examples:
            >>> import torchrl_hippo.envs
            >>> from torchrl.envs import GymEnv, TransformedEnv
            >>> from torchrl_hippo.envs.novelty import EpisodicNovelty
            >>> env = TransformedEnv(GymEnv("hippo/Corridor-ZeroNoise-v0", length=4), EpisodicNovelty())
            >>> _ = env.rollout(2, policy=lambda td: td.set("action", env.action_spec.encode(1)))
            >>> env.transform.episodic_embeddings()[:, 0]  # the positions 0, 1/4, 2/4
            tensor([0.0000, 0.2500, 0.5000])
        """
        if self._count is None:
            raise RuntimeError("No episode has started yet: reset the env first.")
        n = self._count.numel()
        env_index = check_int("env_index", env_index, minimum=0, maximum=n - 1)
        count, ptr, cap = int(self._count[env_index]), int(self._ptr[env_index]), self.capacity
        order = (torch.arange(count, device=self._ptr.device) + ptr - count) % cap
        return self._rows[env_index * cap + order, : self._dim].clone()

    @property
    def frozen(self) -> bool:
        """Whether the running statistics are frozen (see :meth:`freeze`)."""
        return self._frozen

    def freeze(self) -> EpisodicNovelty:
        """Stops updating the running statistics (distance mean, bonus mean/std), e.g. to evaluate."""
        self._frozen = True
        return self

    def unfreeze(self) -> EpisodicNovelty:
        """Resumes updating the running statistics."""
        self._frozen = False
        return self

    def clear(self) -> None:
        """Empties every env's episodic buffer (and DualEncoder window)."""
        if self._count is not None:
            self._count.zero_()
            self._ptr.zero_()
            self._valid.zero_()
        if self._window:
            self._window["mask"].zero_()

    # ------------------------------------------------------------------ embeddings
    def _embed_observation(self, data: TensorDictBase) -> Tensor:
        """Embeds the observation entries of ``data`` (batch ``[*B]``) into ``[n, D]``."""
        n = max(math.prod(data.batch_size), 1)
        with torch.no_grad():
            if self._mode == "tensordict":
                out = self.embedding(data.select(*self.in_keys, strict=True))
                value = out.get(self.embedding.out_keys[0])
            else:
                value = data.get(self.in_keys[0])
                if self._mode == "module":
                    value = self.embedding(value)
        if not value.is_floating_point():
            value = value.float()
        if self._mode != "identity" and value.shape[: data.batch_dims] != data.batch_size:
            raise ValueError(
                f"the embedding must return [*batch, D] = [{', '.join(map(str, data.batch_size))}"
                f", D], got shape {tuple(value.shape)}."
            )
        return value.reshape(n, -1).detach()

    def _embed_transition(self, tensordict: TensorDictBase, next_td: TensorDictBase) -> Tensor:
        """Slides each env's window by the step ``tensordict -> next_td``, encodes it: ``[n, D]``."""
        encoder: DualEncoder = self.embedding  # type: ignore[assignment]
        obs_key, act_key, rew_key = (
            encoder._keys[name] for name in ("observation", "action", "reward")
        )
        if not (isinstance(rew_key, tuple) and rew_key[0] == "next"):
            raise ValueError(
                f"the DualEncoder's reward key must be under 'next' (a step's output), got {rew_key!r}."
            )
        n = self._count.numel()
        step = {
            "observation": tensordict.get(obs_key),
            "action": tensordict.get(act_key),
            "reward": next_td.get(rew_key[1:] if len(rew_key) > 2 else rew_key[1]),
        }
        step = {
            name: value.reshape(n, *value.shape[tensordict.batch_dims :])
            for name, value in step.items()
        }
        if not self._window:
            w = encoder.window
            self._window = {
                name: value.new_zeros(n, w, *value.shape[1:]) for name, value in step.items()
            }
            self._window["mask"] = torch.zeros(n, w, dtype=torch.bool, device=self._count.device)
        for name, value in step.items():
            buf = self._window[name]
            buf.copy_(torch.cat((buf[:, 1:], value.unsqueeze(1).to(buf.dtype)), dim=1))
        mask = self._window["mask"]
        mask.copy_(torch.cat((mask[:, 1:], mask.new_ones(n, 1)), dim=1))
        win = self._window
        return encoder.encode(
            win["observation"], win["action"], win["reward"], win["mask"], target=True, batch_dims=1
        )

    # ------------------------------------------------------------------ buffers
    def _init_buffers(self, batch_shape: torch.Size, device: torch.device) -> None:
        n = max(math.prod(batch_shape), 1)
        self._batch_shape = batch_shape
        self._count = torch.zeros(n, dtype=torch.long, device=device)
        self._ptr = torch.zeros(n, dtype=torch.long, device=device)
        self._valid = torch.zeros(n * self.capacity, dtype=torch.bool, device=device)
        self._rows = None
        self._window = {}

    def _ensure(self, batch_shape: torch.Size, device: torch.device) -> None:
        if self._count is None:
            self._init_buffers(batch_shape, device)
        elif batch_shape != self._batch_shape:
            raise ValueError(
                f"EpisodicNovelty was set up for an env batch of {tuple(self._batch_shape)}, got "
                f"{tuple(batch_shape)}; use one transform per env (or clone() it)."
            )

    def _ensure_rows(self, dim: int, device: torch.device) -> None:
        if self._rows is None:
            n, cap = self._count.numel(), self.capacity
            group = min(n, _ENV_GROUP)
            rows = torch.zeros(n * cap, dim + 1 + group, device=device)
            env = torch.arange(n, device=device).repeat_interleave(cap)
            rows[torch.arange(n * cap, device=device), dim + 1 + env % group] = 1.0
            self._rows, self._dim = rows, dim
        elif dim != self._dim:
            raise ValueError(f"the embedding size changed from {self._dim} to {dim}.")

    def _store(self, emb: Tensor, envs: Tensor) -> None:
        """Appends ``emb[i]`` to the buffer of env ``envs[i]`` (ring, oldest overwritten)."""
        rows = envs * self.capacity + self._ptr[envs]
        self._rows[rows, : self._dim + 1] = torch.cat((emb, emb.pow(2).sum(-1, keepdim=True)), 1)
        self._valid[rows] = True
        self._ptr[envs] = (self._ptr[envs] + 1) % self.capacity
        self._count[envs] = (self._count[envs] + 1).clamp_max(self.capacity)

    # ------------------------------------------------------------------ search
    def _episodic_neighbours(self, query: Tensor) -> Tensor:
        """Squared distances ``[n, k]`` to each env's nearest stored embeddings (``inf`` pads)."""
        n, cap, dim = query.shape[0], self.capacity, self._dim
        group = self._rows.shape[1] - dim - 1
        out = query.new_full((n, self.k), math.inf)
        norms = query.pow(2).sum(-1)
        for start in range(0, n, group):
            stop = min(start + group, n)
            lo, hi = start * cap, stop * cap
            valid = self._valid[lo:hi]
            num_valid = int(self._count[start:stop].sum())
            if num_valid == 0:
                continue
            k = min(self.k, num_valid)
            keys = self._rows[lo:hi]
            # Any M above every |q - e|^2 puts the other envs' rows below this env's.
            big = 4.0 * (norms[start:stop].max() + keys[:, dim].max()) + 1.0
            m = stop - start  # start is a multiple of group: env start + i has column i
            penalty = (torch.eye(m, group, device=query.device) - 1.0) * big
            q = torch.cat((2.0 * query[start:stop], query.new_full((m, 1), -1.0), penalty), dim=1)
            _, idx = topk_similarity(q, keys, k, valid=valid, backend=self.backend)
            rows = idx + lo
            env = torch.arange(start, stop, device=query.device).unsqueeze(1)
            hit = (rows // cap == env) & self._valid[rows]
            d2 = (self._rows[rows, :dim] - query[start:stop, None]).pow(2).sum(-1)
            out[start:stop, :k] = torch.where(hit, d2, math.inf)
        return out

    def _memory_neighbours(self, query: Tensor) -> Tensor | None:
        storage = self.memory
        if storage is None or not storage.initialized or len(storage) == 0:
            return None
        keys = storage.keys
        if keys.shape[-1] != query.shape[-1]:
            raise ValueError(
                f"the embedding has size {query.shape[-1]}, but the memory's keys have "
                f"{keys.shape[-1]}: embed into the memory's key space (e.g. with its DualEncoder)."
            )
        version = storage._storage.get(HIPPO_KEYS["key_version"])[: len(storage)]
        valid = storage.valid_mask() & (version >= 0)
        num_valid = int(valid.sum())
        if num_valid == 0:
            return None
        query = query.to(keys.device, torch.float32)
        k = min(self.k, num_valid)
        _, idx = topk_similarity(query, keys, k, valid=valid, backend=self.backend)
        d2 = (keys[idx].float() - query[:, None]).pow(2).sum(-1)
        if k < self.k:
            d2 = torch.cat((d2, d2.new_full((d2.shape[0], self.k - k), math.inf)), dim=1)
        return d2

    def neighbour_distances(self, query: Tensor) -> Tensor:
        """Squared distances ``[n, k]`` from ``query [n, D]`` to the nearest stored embeddings.

        The episodic buffer of env ``i`` serves row ``i`` (with ``episodic=True``), the memory
        serves every row (with ``memory=``); the ``k`` nearest of both are returned in increasing
        order, padded with ``inf`` where fewer than ``k`` exist.
        """
        parts = []
        if self.episodic and self._rows is not None:
            parts.append(self._episodic_neighbours(query))
        if self.memory is not None:
            mem = self._memory_neighbours(query)
            if mem is not None:
                parts.append(mem.to(query.device))
        if not parts:
            return query.new_full((query.shape[0], self.k), math.inf)
        d2 = torch.cat(parts, dim=1)
        return torch.topk(d2, self.k, dim=1, largest=False, sorted=True).values

    # ------------------------------------------------------------------ the bonus
    def _bonus(self, d2: Tensor) -> Tensor:
        """The intrinsic reward ``[n]`` from neighbour distances ``[n, k]`` (see the class doc)."""
        found = torch.isfinite(d2)
        if not self._frozen and bool(found.any()):
            self.distance_stats.update(d2[found])
        mean = self.distance_stats.mean.clamp_min(torch.finfo(torch.float32).tiny)
        dn = (torch.where(found, d2, 0.0) / mean - self.cluster_distance).clamp_min(0.0)
        if self.kernel == "inverse":
            sim = self.kernel_epsilon / (dn + self.kernel_epsilon)
        elif self.kernel == "gaussian":
            sim = torch.exp(-dn)
        else:
            sim = self.kernel(dn)
        s = torch.sqrt(torch.where(found, sim, 0.0).sum(-1) + self.c)
        r = 1.0 / s
        if self.max_similarity is not None:
            r = torch.where(s > self.max_similarity, 0.0, r)
        if self.normalize:
            if not self._frozen:
                self.reward_stats.update(r)
            std = self.reward_stats.var.clamp_min(1e-8).sqrt()
            r = (r - self.reward_stats.mean if self.center else r) / std
            if self.reward_clip is not None:
                r = r.clamp(-self.reward_clip, self.reward_clip)
        return self.beta * r

    # ------------------------------------------------------------------ Transform hooks
    def _reset(
        self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase
    ) -> TensorDictBase:
        self._ensure(tensordict_reset.batch_size, tensordict_reset.device or torch.device("cpu"))
        n = self._count.numel()
        reset = None if tensordict is None else tensordict.get("_reset", None)
        if reset is None:
            envs = torch.arange(n, device=self._count.device)
        else:
            envs = reset.reshape(n, -1).any(-1).nonzero().squeeze(1).to(self._count.device)
        if envs.numel() == 0:
            return tensordict_reset
        cap = self.capacity
        rows = (envs[:, None] * cap + torch.arange(cap, device=envs.device)).reshape(-1)
        self._valid[rows] = False
        self._count[envs] = 0
        self._ptr[envs] = 0
        if self._mode == "window":
            if self._window:
                self._window["mask"][envs] = False
        elif self.episodic:
            emb = self._embed_observation(tensordict_reset)
            emb = emb.to(self._count.device)
            self._ensure_rows(emb.shape[1], emb.device)
            self._store(emb[envs], envs)
        return tensordict_reset

    def _reset_on_native_autoreset(
        self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase
    ) -> TensorDictBase:
        return self._reset(tensordict, tensordict_reset)

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        self._ensure(next_tensordict.batch_size, next_tensordict.device or torch.device("cpu"))
        if self._mode == "window":
            emb = self._embed_transition(tensordict, next_tensordict)
        else:
            emb = self._embed_observation(next_tensordict)
        emb = emb.to(self._count.device, torch.float32)
        if self.episodic:
            self._ensure_rows(emb.shape[1], emb.device)
        bonus = self._bonus(self.neighbour_distances(emb))
        if self.episodic:
            self._store(emb, torch.arange(emb.shape[0], device=emb.device))

        reward = next_tensordict.get(self.reward_key)
        bonus = bonus.to(
            reward.device, reward.dtype if reward.is_floating_point() else torch.float32
        )
        bonus = bonus.reshape(
            *next_tensordict.batch_size, *([1] * (reward.ndim - next_tensordict.batch_dims))
        )
        bonus = bonus.expand_as(reward)
        if self.out_key is None:
            next_tensordict.set(self.reward_key, reward + bonus)
        else:
            next_tensordict.set(self.out_key, bonus.clone())
        return next_tensordict

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        raise RuntimeError(
            "EpisodicNovelty needs the step's input as well as its output: it runs inside a "
            "TransformedEnv's step (_step), not on a lone tensordict."
        )

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Not supported: the bonus depends on each env's episode so far (use a TransformedEnv)."""
        raise RuntimeError(
            "EpisodicNovelty is an environment transform: its bonus depends on the episode so "
            "far, so it cannot be applied to stored data (e.g. in a replay buffer). Append it to "
            "a TransformedEnv."
        )

    def transform_reward_spec(self, reward_spec: Composite) -> Composite:
        if self.reward_key not in reward_spec.keys(True, True):
            raise KeyError(
                f"EpisodicNovelty: reward_key {self.reward_key!r} is not in the env's reward spec "
                f"(keys: {list(reward_spec.keys(True, True))})."
            )
        ref = reward_spec[self.reward_key]
        if self.out_key is None:
            if not isinstance(ref, Unbounded) or not ref.dtype.is_floating_point:
                reward_spec[self.reward_key] = Unbounded(
                    shape=ref.shape, device=ref.device, dtype=torch.float32
                )
        else:
            dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
            reward_spec[self.out_key] = Unbounded(shape=ref.shape, device=ref.device, dtype=dtype)
        return reward_spec

    def __repr__(self) -> str:
        target = f"out_key={self.out_key!r}" if self.out_key else f"reward_key={self.reward_key!r}"
        return (
            f"{type(self).__name__}(embedding={self._mode}, k={self.k}, capacity={self.capacity}, "
            f"episodic={self.episodic}, memory={self.memory is not None}, kernel="
            f"{self.kernel if isinstance(self.kernel, str) else 'callable'}, beta={self.beta}, "
            f"{target})"
        )
