"""A three-level working memory for recurrent policies and critics: immediate, short-term, long-term.

:class:`HierarchicalMemory` is a recurrent TensorDict module in the manner of TorchRL's
:class:`~torchrl.modules.GRUModule`: its state travels with the data (``in_keys`` hold the
state, ``out_keys`` the ``("next", ...)`` state), ``is_init`` resets it, and
:meth:`~HierarchicalMemory.make_tensordict_primer` registers it with the environment. It runs
one step at a time inside collectors and replays ``[B, T]`` chunks in recurrent mode, which
TorchRL's losses switch on by themselves.

:class:`MemoryELBOLoss` trains the memories' compression VAEs on the buffers they compressed
during collection; add its ``loss_elbo`` to the PPO loss in the same optimiser step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDict, TensorDictBase, unravel_key
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import Tensor, nn
from torchrl.data import Composite, Unbounded
from torchrl.envs import TensorDictPrimer
from torchrl.modules import recurrent_mode as _global_recurrent_mode
from torchrl.objectives import LossModule

from torchrl_hippo._checks import as_nested_key, check_positive_int
from torchrl_hippo.modules.compression import BufferVAE

__all__ = ["HierarchicalMemory", "MemoryELBOLoss"]

# Names accepted by HierarchicalMemory.set_keys.
_KEY_NAMES = ("embed", "readout", "state", "is_init")
# The entries of the state, in the order of in_keys (between the embedding and is_init).
_STATE_NAMES = (
    "immediate",
    "steps",
    "short_term",
    "short_term_usage",
    "short_term_time",
    "long_term",
    "long_term_count",
)
_REPLACEMENTS = ("usage", "oldest")
_LEVELS = ("immediate", "short_term", "long_term")


def _check_fraction(value: float, name: str, *, closed: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}.")
    value = float(value)
    if not (0.0 < value <= 1.0 if closed else 0.0 <= value < 1.0):
        interval = "(0, 1]" if closed else "[0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value}.")
    return value


def _tuple(key: NestedKey) -> tuple[str, ...]:
    return key if isinstance(key, tuple) else (key,)


def _join(*parts: NestedKey) -> NestedKey:
    """Concatenates nested keys: ``_join("next", ("a", "b")) == ("next", "a", "b")``."""
    return unravel_key(tuple(parts))


class _LevelAttention(nn.Module):
    """Single-head attention of a query over one level's items, with an optional position code.

    ``logit_j = (W_k x_j + p_{pos_j}) . q / sqrt(attention_dim)`` and the read-out is
    ``W_v sum_j a_j x_j + b_v``. ``W_k`` is applied to the query (``W_k^T q``) instead of to
    every item, and ``W_v`` to the pooled items, which gives the same result for less work; the
    memory computes those projections for a whole chunk at once and only the pooling per step.
    """

    def __init__(self, item_dim: int, attention_dim: int, out_dim: int, positions: int) -> None:
        super().__init__()
        self.key = nn.Linear(item_dim, attention_dim, bias=False)
        self.value = nn.Linear(item_dim, out_dim)
        self.position = (
            nn.Parameter(torch.randn(positions, attention_dim) * 0.02) if positions else None
        )
        self.scale = attention_dim**-0.5

    def query_terms(self, query: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(W_k^T q, q . p)`` scaled: ``[*, item_dim]`` and ``[*, positions]`` (or None)."""
        item_query = (query @ self.key.weight) * self.scale
        if self.position is None:
            return item_query, None
        return item_query, (query @ self.position.T) * self.scale

    @staticmethod
    def pool(
        item_query: Tensor,
        items: Tensor,
        mask: Tensor,
        position_logits: Tensor | None = None,
        position: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Attention weights ``[B, N]`` and the weighted sum of the items ``[B, item_dim]``."""
        # item_query [B, F], items [B, N, F], mask [B, N] bool, position [B, N] long
        logits = torch.bmm(items, item_query.unsqueeze(-1)).squeeze(-1)
        if position_logits is not None:
            logits = logits + position_logits.gather(-1, position)
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        # An empty level gets all-zero weights (and a finite gradient): softmax, then the mask.
        weights = torch.softmax(logits, dim=-1) * mask
        return torch.bmm(weights.unsqueeze(1), items).squeeze(1), weights


class HierarchicalMemory(TensorDictModuleBase):
    """A recurrent memory with immediate, short-term and long-term levels, read by attention.

    Per environment, the state holds three levels (all of them reset at ``is_init``):

    - **immediate**: a ring of the last ``immediate_slots`` step embeddings;
    - **short-term**: ``short_term_slots`` summaries of size ``latent_dim``. Each time the ring
      has been filled anew (every ``immediate_slots`` steps), the compression VAE
      (:class:`~torchrl_hippo.modules.compression.BufferVAE`) turns it, oldest step first, into
      one summary (its posterior mean). The summary goes to an empty slot, or else replaces the
      slot with the lowest attention use (``replacement="usage"``: an exponential moving
      average, factor ``usage_decay``, of the attention weight each slot received; the oldest
      wins ties) or the oldest slot (``replacement="oldest"``). A new slot's use starts at the
      mean use of the slots already filled;
    - **long-term**: ``long_term_slots`` templates, consolidated from the summaries by online
      k-means: a new summary seeds an empty template, else moves its nearest template
      (Euclidean) towards itself by ``max(1 / (count + 1), template_rate)``: a running mean
      that turns into an EMA once ``count`` is large.

    The compression adapts to the reconstruction error through the VAE's ``beta`` (see
    :class:`~torchrl_hippo.modules.compression.BufferVAE` and :class:`MemoryELBOLoss`).

    Each step writes the embedding into the ring first, compresses if the ring is complete,
    then reads: the embedding is projected to a query that attends over each level (the ring
    with a learned code of each slot's age), and a learned gate, a softmax over the three
    levels computed from ``[embedding, three level read-outs]`` (empty levels masked out),
    mixes them. The output is ``readout = embedding + mix``, of size ``embed_dim``.

    State and modes follow :class:`~torchrl.modules.GRUModule`:

    - ``in_keys`` are ``[in_key, *state keys, is_init_key]`` and ``out_keys`` are
      ``[out_key, *("next", state key)]``. The state keys are ``(state_key, name)`` for the
      names in :attr:`state_spec`. Missing state entries are read as zeros (an empty memory).
    - Sequential mode (the default, as in collectors): every element of the TensorDict is one
      step, computed from its own stored state.
    - Recurrent mode (:class:`~torchrl.modules.set_recurrent_mode`, which TorchRL's losses
      enter by themselves): the last batch dim is time. Each ``[T]`` row is replayed from the
      state stored at its first step, and the state is reset wherever ``is_init`` is set, so
      the outputs equal those of sequential mode on the same trajectory.

    Args:
        embed_dim (int): size of the input embedding (and of the read-out).

    Keyword Args:
        immediate_slots (int, optional): length of the ring. Defaults to ``32``.
        short_term_slots (int, optional): number of summaries. Defaults to ``16``.
        long_term_slots (int, optional): number of templates. Defaults to ``8``.
        latent_dim (int, optional): size of a summary and of a template. Defaults to ``32``,
            or to ``compression.latent_dim`` when ``compression`` is given.
        attention_dim (int, optional): size of queries and keys. Defaults to ``embed_dim``.
        compression (BufferVAE, optional): the VAE to use. Defaults to
            ``BufferVAE(immediate_slots, embed_dim, latent_dim)``.
        replacement (str, optional): ``"usage"`` or ``"oldest"``. Defaults to ``"usage"``.
        usage_decay (float, optional): EMA factor of the short-term use, in ``[0, 1)``.
            Defaults to ``0.99``.
        template_rate (float, optional): the smallest step of a template towards a new
            summary, in ``(0, 1]``. Defaults to ``0.05``.
        in_key (NestedKey, optional): the embedding entry. Defaults to ``"embed"``.
        out_key (NestedKey, optional): the read-out entry. Defaults to ``("hmem", "readout")``.
        state_key (NestedKey, optional): the sub-TensorDict of the state. Give each memory of a
            policy (e.g. the actor's and the critic's) its own. Defaults to ``"hmem"``.
        is_init_key (NestedKey, optional): the episode-start flag written by
            :class:`~torchrl.envs.InitTracker`. Defaults to ``"is_init"``.
        default_recurrent_mode (bool, optional): the mode used outside any
            :class:`~torchrl.modules.set_recurrent_mode` context. Defaults to ``False``.

    Attributes:
        recurrent_mode (bool): whether the module replays ``[B, T]`` chunks.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.modules import set_recurrent_mode
        >>> from torchrl_hippo.modules.hierarchical import HierarchicalMemory
        >>> memory = HierarchicalMemory(
        ...     8, immediate_slots=4, short_term_slots=2, long_term_slots=2, latent_dim=3
        ... )
        >>> is_init = torch.zeros(2, 10, 1, dtype=torch.bool)
        >>> is_init[:, 0] = True
        >>> td = TensorDict({"embed": torch.randn(2, 10, 8), "is_init": is_init}, [2, 10])
        >>> with set_recurrent_mode(True):
        ...     td = memory(td)
        >>> td["hmem", "readout"].shape
        torch.Size([2, 10, 8])
        >>> td["next", "hmem", "steps"][:, -1]  # embeddings seen since the reset
        tensor([[10],
                [10]])
        >>> (td["next", "hmem", "short_term_time"][:, -1] > 0).sum(-1)  # summaries at 4 and 8
        tensor([2, 2])
        >>> # Sequential mode (collectors): each element is one step, from its stored state.
        >>> expected = td["hmem", "readout"][:, 3]
        >>> step = td[:, 3].exclude("next").update(td["next"][:, 2].select("hmem"))
        >>> torch.allclose(memory(step)["hmem", "readout"], expected, atol=1e-6)
        True
        >>> memory.make_tensordict_primer().primers["hmem", "immediate"].shape
        torch.Size([4, 8])
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        immediate_slots: int = 32,
        short_term_slots: int = 16,
        long_term_slots: int = 8,
        latent_dim: int | None = None,
        attention_dim: int | None = None,
        compression: BufferVAE | None = None,
        replacement: str = "usage",
        usage_decay: float = 0.99,
        template_rate: float = 0.05,
        in_key: NestedKey = "embed",
        out_key: NestedKey = ("hmem", "readout"),
        state_key: NestedKey = "hmem",
        is_init_key: NestedKey = "is_init",
        default_recurrent_mode: bool | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        self.immediate_slots = check_positive_int(immediate_slots, "immediate_slots")
        self.short_term_slots = check_positive_int(short_term_slots, "short_term_slots")
        self.long_term_slots = check_positive_int(long_term_slots, "long_term_slots")
        if compression is None:
            latent_dim = 32 if latent_dim is None else check_positive_int(latent_dim, "latent_dim")
            compression = BufferVAE(self.immediate_slots, self.embed_dim, latent_dim)
        elif not isinstance(compression, BufferVAE):
            raise TypeError(
                f"compression must be a BufferVAE or None, got {type(compression).__name__}."
            )
        else:
            if (compression.slots, compression.embed_dim) != (immediate_slots, embed_dim):
                raise ValueError(
                    f"compression compresses [{compression.slots}, {compression.embed_dim}] "
                    f"buffers, but the ring is [immediate_slots={immediate_slots}, "
                    f"embed_dim={embed_dim}]."
                )
            if latent_dim is not None and latent_dim != compression.latent_dim:
                raise ValueError(
                    f"latent_dim={latent_dim} differs from compression.latent_dim="
                    f"{compression.latent_dim}; leave latent_dim out to use the VAE's."
                )
        self.latent_dim = compression.latent_dim
        self.attention_dim = (
            self.embed_dim
            if attention_dim is None
            else check_positive_int(attention_dim, "attention_dim")
        )
        if replacement not in _REPLACEMENTS:
            raise ValueError(f"replacement must be one of {_REPLACEMENTS}, got {replacement!r}.")
        self.replacement = replacement
        self.usage_decay = _check_fraction(usage_decay, "usage_decay", closed=False)
        self.template_rate = _check_fraction(template_rate, "template_rate", closed=True)
        if default_recurrent_mode is not None and not isinstance(default_recurrent_mode, bool):
            raise TypeError(
                f"default_recurrent_mode must be a bool or None, got {default_recurrent_mode!r}."
            )
        self._recurrent_mode = default_recurrent_mode

        i, s, lt = self.immediate_slots, self.short_term_slots, self.long_term_slots
        # name -> (shape per element, floating point?)
        self._state_shapes: dict[str, tuple[tuple[int, ...], bool]] = {
            "immediate": ((i, self.embed_dim), True),
            "steps": ((1,), False),
            "short_term": ((s, self.latent_dim), True),
            "short_term_usage": ((s,), True),
            "short_term_time": ((s,), False),
            "long_term": ((lt, self.latent_dim), True),
            "long_term_count": ((lt,), False),
        }
        self._keys: dict[str, NestedKey] = {}
        self.set_keys(embed=in_key, readout=out_key, state=state_key, is_init=is_init_key)

        a, d, z = self.attention_dim, self.embed_dim, self.latent_dim
        self.compression = compression
        self.query = nn.Linear(d, a)
        self.immediate_attention = _LevelAttention(d, a, d, positions=self.immediate_slots)
        self.short_term_attention = _LevelAttention(z, a, d, positions=0)
        self.long_term_attention = _LevelAttention(z, a, d, positions=0)
        self.gate = nn.Linear(4 * d, len(_LEVELS))

    # ------------------------------------------------------------------ keys and specs
    def set_keys(self, **kwargs: NestedKey) -> HierarchicalMemory:
        """Changes the TensorDict entries that the module reads and writes.

        Keyword Args:
            embed (NestedKey): the embedding entry.
            readout (NestedKey): the read-out entry.
            state (NestedKey): the sub-TensorDict of the state entries.
            is_init (NestedKey): the episode-start flag.

        Returns:
            This module, with updated ``in_keys`` and ``out_keys``.

        Examples:
            >>> from torchrl_hippo.modules.hierarchical import HierarchicalMemory
            >>> memory = HierarchicalMemory(8, immediate_slots=4, short_term_slots=2,
            ...                             long_term_slots=2, latent_dim=3)
            >>> memory = memory.set_keys(embed="critic_embed", state="critic_memory")
            >>> memory.in_keys[:2], memory.out_keys[1]
            (['critic_embed', ('critic_memory', 'immediate')], ('next', 'critic_memory', 'immediate'))
        """
        unknown = sorted(set(kwargs) - set(_KEY_NAMES))
        if unknown:
            raise ValueError(
                f"set_keys got unknown key name(s) {unknown}; expected some of {list(_KEY_NAMES)}."
            )
        keys = dict(self._keys)
        for name, value in kwargs.items():
            keys[name] = as_nested_key(value, f"set_keys: {name}")
        state = _tuple(keys["state"])
        taken = {state, *((*state, entry) for entry in _STATE_NAMES)}
        for name in ("embed", "readout", "is_init"):
            if _tuple(keys[name]) in taken:
                raise ValueError(
                    f"the {name} key {keys[name]!r} collides with the state entries under "
                    f"{keys['state']!r}."
                )
        self._keys = keys
        self._state_keys = {name: _join(*state, name) for name in _STATE_NAMES}
        self._next_state_keys = {name: _join("next", *state, name) for name in _STATE_NAMES}
        self.in_keys = [keys["embed"], *self._state_keys.values(), keys["is_init"]]
        self.out_keys = [keys["readout"], *self._next_state_keys.values()]
        return self

    @property
    def state_keys(self) -> dict[str, NestedKey]:
        """The state entries, by name (prefix them with ``"next"`` for the updated state)."""
        return dict(self._state_keys)

    @property
    def state_spec(self) -> Composite:
        """The spec of one environment's state (the entries under ``state_key``).

        Examples:
            >>> from torchrl_hippo.modules.hierarchical import HierarchicalMemory
            >>> spec = HierarchicalMemory(8, immediate_slots=4, latent_dim=3).state_spec
            >>> {name: tuple(leaf.shape) for name, leaf in spec.items()}  # doctest: +NORMALIZE_WHITESPACE
            {'immediate': (4, 8), 'steps': (1,), 'short_term': (16, 3), 'short_term_usage': (16,),
             'short_term_time': (16,), 'long_term': (8, 3), 'long_term_count': (8,)}
        """
        param = self.query.weight
        return Composite(
            {
                name: Unbounded(
                    shape=shape, dtype=param.dtype if floating else torch.long, device=param.device
                )
                for name, (shape, floating) in self._state_shapes.items()
            }
        )

    def make_tensordict_primer(self) -> TensorDictPrimer:
        """A :class:`~torchrl.envs.TensorDictPrimer` that adds the (zero) state to the env.

        :func:`torchrl.modules.utils.get_primers_from_module` and the collectors'
        ``auto_register_policy_transforms`` find it by themselves.

        Examples:
            >>> from torchrl.envs import GymEnv, InitTracker, TransformedEnv
            >>> from torchrl.envs.utils import check_env_specs
            >>> from torchrl_hippo.modules.hierarchical import HierarchicalMemory
            >>> memory = HierarchicalMemory(8, immediate_slots=4, latent_dim=3)
            >>> env = TransformedEnv(GymEnv("CartPole-v1"), InitTracker())
            >>> env = env.append_transform(memory.make_tensordict_primer())
            >>> check_env_specs(env)
            >>> env.reset()["hmem", "short_term"].shape
            torch.Size([16, 3])
        """
        primers = Composite()
        for name, spec in self.state_spec.items():
            primers[self.state_keys[name]] = spec
        return TensorDictPrimer(primers, expand_specs=True)

    # ------------------------------------------------------------------ modes
    @property
    def recurrent_mode(self) -> bool:
        mode = _global_recurrent_mode()
        if mode is None:
            return bool(self._recurrent_mode)
        return mode

    @recurrent_mode.setter
    def recurrent_mode(self, value: bool) -> None:
        raise RuntimeError(
            "recurrent_mode cannot be changed in place; use the torchrl.modules."
            "set_recurrent_mode context manager or default_recurrent_mode."
        )

    # ------------------------------------------------------------------ forward
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Reads the embedding and the state, writes the read-out and the next state.

        Args:
            tensordict (TensorDictBase): in sequential mode, any batch of single steps; in
                recurrent mode, ``[*B, T]`` with time last.

        Returns:
            ``tensordict``, with the read-out ``[*batch, embed_dim]`` at ``out_keys[0]`` and
            the state after each step at the ``("next", ...)`` state keys.
        """
        if not isinstance(tensordict, TensorDictBase):
            raise TypeError(
                f"tensordict must be a TensorDictBase, got {type(tensordict).__name__}."
            )
        shape = tensordict.shape
        if self.recurrent_mode:
            if tensordict.ndim == 0:
                raise ValueError(
                    "HierarchicalMemory in recurrent mode needs a TensorDict with a time dim "
                    "(its last batch dim); got a 0-dim TensorDict."
                )
            if tensordict.ndim == 1:
                shaped = tensordict.unsqueeze(0)
            elif tensordict.ndim == 2:
                shaped = tensordict
            else:
                shaped = tensordict.flatten(0, -2)
        else:
            shaped = tensordict.reshape(-1).unsqueeze(-1)
        batch, steps = shaped.shape

        embed = shaped.get(self._keys["embed"], None)
        if embed is None:
            raise KeyError(f"HierarchicalMemory: no embedding entry {self._keys['embed']!r}.")
        if not isinstance(embed, Tensor) or not embed.is_floating_point():
            raise TypeError("the embedding must be a floating-point tensor.")
        if embed.shape != (batch, steps, self.embed_dim):
            raise ValueError(
                f"the embedding {self._keys['embed']!r} must have shape [*batch, embed_dim="
                f"{self.embed_dim}], got {list(embed.shape[2:])} per element."
            )
        is_init = shaped.get(self._keys["is_init"], None)
        if is_init is None:
            raise KeyError(
                f"HierarchicalMemory: no {self._keys['is_init']!r} entry. Add "
                "torchrl.envs.InitTracker() to the environment's transforms."
            )
        is_init = is_init.reshape(batch, steps).bool()
        state = self._initial_state(shaped, embed)

        # Everything that does not depend on the memory's contents is computed for the whole
        # chunk at once; the loop only writes, compresses, consolidates and pools.
        query = self.query(embed)
        immediate_query, age_logits = self.immediate_attention.query_terms(query)
        short_query, _ = self.short_term_attention.query_terms(query)
        long_query, _ = self.long_term_attention.query_terms(query)
        gate_embed, pooled_to_gate = self._gate_terms(embed)

        pooled = {level: [] for level in _LEVELS}
        gates = []
        next_states = {name: [] for name in _STATE_NAMES}
        for t in range(steps):
            step_pooled, gate, state = self._step(
                embed[:, t],
                is_init[:, t],
                state,
                (immediate_query[:, t], short_query[:, t], long_query[:, t]),
                age_logits[:, t],
                gate_embed[:, t],
                pooled_to_gate,
            )
            for level, value in zip(_LEVELS, step_pooled):
                pooled[level].append(value)
            gates.append(gate)
            for name in _STATE_NAMES:
                next_states[name].append(state[name])
        gate = torch.stack(gates, 1)  # [B, T, 3]
        reads = torch.stack(
            [
                level.value(torch.stack(pooled[name], 1))
                for name, level in zip(_LEVELS, self._levels())
            ],
            dim=-2,
        )  # [B, T, 3, D]
        readout = embed + (gate.unsqueeze(-1) * reads).sum(-2)
        tensordict.set(self._keys["readout"], readout.reshape(*shape, -1))
        for name, values in next_states.items():
            value = torch.stack(values, 1)
            tensordict.set(self._next_state_keys[name], value.reshape(*shape, *value.shape[2:]))
        return tensordict

    def _levels(self) -> tuple[_LevelAttention, _LevelAttention, _LevelAttention]:
        return self.immediate_attention, self.short_term_attention, self.long_term_attention

    def _gate_terms(self, embed: Tensor) -> tuple[Tensor, Tensor]:
        """Splits ``gate(cat[e, r_i, r_s, r_l])``, with each ``r = W_v pooled + b_v``.

        Returns the embedding's part (bias included) ``[B, T, 3]`` and the ``[3, D + 2 Z]``
        matrix that maps the concatenated pooled items of the three levels.
        """
        d = self.embed_dim
        weight = self.gate.weight
        parts = [
            (weight[:, d * (i + 1) : d * (i + 2)], level) for i, level in enumerate(self._levels())
        ]
        pooled_to_gate = torch.cat([w @ level.value.weight for w, level in parts], dim=-1)
        bias = self.gate.bias + sum(w @ level.value.bias for w, level in parts)
        return embed @ weight[:, :d].T + bias, pooled_to_gate

    def _initial_state(self, shaped: TensorDictBase, embed: Tensor) -> dict[str, Tensor]:
        """The state at the first step of each row (zeros where the entry is missing)."""
        batch = shaped.shape[0]
        state = {}
        for name, (shape, floating) in self._state_shapes.items():
            key = self._state_keys[name]
            dtype = embed.dtype if floating else torch.long
            value = shaped.get(key, None)
            if value is None:
                state[name] = torch.zeros(batch, *shape, dtype=dtype, device=embed.device)
                continue
            if tuple(value.shape[2:]) != shape:
                raise ValueError(
                    f"state entry {key!r}: expected {list(shape)} per element, got "
                    f"{list(value.shape[2:])} (is the env's primer from another memory "
                    "configuration?)."
                )
            state[name] = value[:, 0].to(dtype)
        return state

    def _step(
        self,
        embed: Tensor,
        is_init: Tensor,
        state: dict[str, Tensor],
        queries: tuple[Tensor, Tensor, Tensor],
        age_logits: Tensor,
        gate_embed: Tensor,
        pooled_to_gate: Tensor,
    ) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, dict[str, Tensor]]:
        """One step for ``B`` rows: reset, write, compress + consolidate, pool, gate."""
        if is_init.any():
            state = {
                name: value.masked_fill(is_init.view(-1, *([1] * (value.ndim - 1))), 0)
                for name, value in state.items()
            }
        slots = self.immediate_slots
        position = state["steps"] % slots  # [B, 1]: the ring slot this step is written to
        arange = torch.arange(slots, device=embed.device)
        immediate = torch.where(
            (arange == position).unsqueeze(-1), embed.unsqueeze(1), state["immediate"]
        )
        steps = state["steps"] + 1
        short_term, usage, written = (
            state["short_term"],
            state["short_term_usage"],
            state["short_term_time"],
        )
        long_term, count = state["long_term"], state["long_term_count"]

        complete = (steps.squeeze(-1) % slots) == 0
        if complete.any():
            # The ring is oldest-first exactly when it has just been completed.
            rows = complete.nonzero().squeeze(-1)
            summary = self.compression(immediate.index_select(0, rows))
            short_term, usage, written = self._write_short_term(
                rows, summary, steps, short_term, usage, written
            )
            long_term, count = self._consolidate(rows, summary, long_term, count)

        filled = arange < steps.clamp(max=slots)  # [B, I]
        age = (position - arange) % slots  # 0 for the slot written at this step
        immediate_query, short_query, long_query = queries
        pooled_i, _ = _LevelAttention.pool(immediate_query, immediate, filled, age_logits, age)
        short_mask = written > 0
        pooled_s, short_weights = _LevelAttention.pool(short_query, short_term, short_mask)
        long_mask = count > 0
        pooled_l, _ = _LevelAttention.pool(long_query, long_term, long_mask)
        usage = usage * self.usage_decay + short_weights.detach()

        present = torch.stack([filled.any(-1), short_mask.any(-1), long_mask.any(-1)], dim=-1)
        gate = gate_embed + torch.cat([pooled_i, pooled_s, pooled_l], dim=-1) @ pooled_to_gate.T
        gate = torch.softmax(gate.masked_fill(~present, torch.finfo(gate.dtype).min), dim=-1)
        state = {
            "immediate": immediate,
            "steps": steps,
            "short_term": short_term,
            "short_term_usage": usage,
            "short_term_time": written,
            "long_term": long_term,
            "long_term_count": count,
        }
        return (pooled_i, pooled_s, pooled_l), gate, state

    def _write_short_term(
        self,
        rows: Tensor,
        summary: Tensor,
        steps: Tensor,
        short_term: Tensor,
        usage: Tensor,
        written: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Writes one summary per row in ``rows``: an empty slot, else the lowest use/oldest."""
        time = written.index_select(0, rows)  # [R, S], 0 = empty
        use = usage.index_select(0, rows)
        filled = time > 0
        score = use if self.replacement == "usage" else time.to(use.dtype)
        score = score.masked_fill(~filled, float("-inf"))
        # The lowest score; among equal scores the oldest (empty slots: the first).
        order = time.argsort(dim=-1, stable=True)
        slot = order.gather(-1, score.gather(-1, order).argmin(-1, keepdim=True)).squeeze(-1)
        start_use = (use * filled).sum(-1) / filled.sum(-1).clamp_min(1)
        short_term = short_term.index_put((rows, slot), summary)
        usage = usage.index_put((rows, slot), start_use)
        written = written.index_put((rows, slot), steps.index_select(0, rows).squeeze(-1))
        return short_term, usage, written

    def _consolidate(
        self, rows: Tensor, summary: Tensor, long_term: Tensor, count: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Online k-means: seed an empty template, else move the nearest one to the summary."""
        templates = long_term.index_select(0, rows)  # [R, L, Z]
        n = count.index_select(0, rows)  # [R, L]
        empty = n == 0
        nearest = (templates - summary.unsqueeze(1)).pow(2).sum(-1).argmin(-1)
        target = torch.where(empty.any(-1), empty.long().argmax(-1), nearest)
        n_target = n.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        rate = (1.0 / (n_target + 1).to(summary.dtype)).clamp_min(self.template_rate)
        old = templates[torch.arange(rows.numel(), device=rows.device), target]
        new = old + rate.unsqueeze(-1) * (summary - old)
        long_term = long_term.index_put((rows, target), new)
        count = count.index_put((rows, target), n_target + 1)
        return long_term, count

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, immediate_slots={self.immediate_slots}, "
            f"short_term_slots={self.short_term_slots}, long_term_slots={self.long_term_slots}, "
            f"latent_dim={self.latent_dim}, replacement={self.replacement!r}, "
            f"in_keys={self.in_keys}, out_keys={self.out_keys}"
        )


class MemoryELBOLoss(LossModule):
    """The ELBO of :class:`HierarchicalMemory` compression VAEs, as a TorchRL loss.

    It reads the buffers that the memories compressed while the data was collected: the
    ``("next", state_key, "immediate")`` rings of the steps where ``("next", state_key,
    "steps")`` is a positive multiple of ``immediate_slots`` (the ring was just completed, so it
    is oldest-first). It needs no extra pass of the memory. Sum its ``loss_elbo`` with the PPO
    loss's ``loss_*`` entries and step one optimiser over both modules' parameters.

    When training, each call also adapts every VAE's ``beta`` to the relative reconstruction
    error of the batch (:meth:`BufferVAE.adapt_beta`), the way
    :class:`~torchrl.objectives.KLPENPPOLoss` adapts its KL coefficient.

    Args:
        memories (HierarchicalMemory or sequence of them): e.g. the actor's and the critic's.

    Keyword Args:
        elbo_coeff (float, optional): the weight of the ELBO. Defaults to ``1.0``.
        adapt_beta (bool, optional): adapt the VAEs' ``beta``. Defaults to ``True``.

    Returns (forward):
        A TensorDict with ``loss_elbo`` (``elbo_coeff`` times the sum over memories of the mean
        negative ELBO per element), and the logs ``elbo_reconstruction``, ``elbo_kl``,
        ``elbo_relative_error``, ``elbo_beta`` (means over memories) and ``elbo_buffers`` (the
        number of buffers). All are ``0`` when the batch holds no completed ring.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.modules import set_recurrent_mode
        >>> from torchrl_hippo.modules.hierarchical import HierarchicalMemory, MemoryELBOLoss
        >>> memory = HierarchicalMemory(8, immediate_slots=4, short_term_slots=2,
        ...                             long_term_slots=2, latent_dim=3)
        >>> is_init = torch.zeros(3, 9, 1, dtype=torch.bool)
        >>> is_init[:, 0] = True
        >>> data = TensorDict({"embed": torch.randn(3, 9, 8), "is_init": is_init}, [3, 9])
        >>> with torch.no_grad(), set_recurrent_mode(True):
        ...     data = memory(data)  # as a collector would store it
        >>> loss = MemoryELBOLoss(memory)
        >>> out = loss(data)
        >>> int(out["elbo_buffers"])  # rings completed at steps 4 and 8 of each row
        6
        >>> out["loss_elbo"].backward()
        >>> memory.compression.decoder[0].weight.grad is not None
        True
    """

    def __init__(
        self,
        memories: HierarchicalMemory | Sequence[HierarchicalMemory],
        *,
        elbo_coeff: float = 1.0,
        adapt_beta: bool = True,
    ) -> None:
        if isinstance(memories, HierarchicalMemory):
            memories = [memories]
        memories = list(memories)
        if not memories or not all(isinstance(m, HierarchicalMemory) for m in memories):
            raise TypeError(
                "memories must be a HierarchicalMemory or a non-empty sequence of them."
            )
        if isinstance(elbo_coeff, bool) or not isinstance(elbo_coeff, (int, float)):
            raise TypeError(f"elbo_coeff must be a float, got {type(elbo_coeff).__name__}.")
        if not elbo_coeff >= 0:
            raise ValueError(f"elbo_coeff must be >= 0, got {elbo_coeff}.")
        if not isinstance(adapt_beta, bool):
            raise TypeError(f"adapt_beta must be a bool, got {type(adapt_beta).__name__}.")
        super().__init__()
        self.memories = nn.ModuleList(memories)
        self.elbo_coeff = float(elbo_coeff)
        self.adapt_beta = adapt_beta

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        """No value estimator: nothing to forward."""

    @property
    def in_keys(self) -> list[NestedKey]:
        """The entries read: each memory's next ring and step count."""
        return [
            _join("next", memory.state_keys[name])
            for memory in self.memories
            for name in ("immediate", "steps")
        ]

    @property
    def out_keys(self) -> list[NestedKey]:
        """The entries written."""
        return [
            "loss_elbo",
            "elbo_reconstruction",
            "elbo_kl",
            "elbo_relative_error",
            "elbo_beta",
            "elbo_buffers",
        ]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Computes the loss on a batch of collected steps (any batch shape)."""
        loss = torch.zeros(())
        logs = {name: [] for name in self.out_keys[1:-1]}
        buffers = 0
        for memory in self.memories:
            keys = memory.state_keys
            ring = tensordict.get(_join("next", keys["immediate"]), None)
            steps = tensordict.get(_join("next", keys["steps"]), None)
            if ring is None or steps is None:
                raise KeyError(
                    f"MemoryELBOLoss: the batch has no {_join('next', keys['immediate'])!r} / "
                    f"{_join('next', keys['steps'])!r} entries: was it collected with the policy "
                    "that holds this memory?"
                )
            steps = steps.reshape(-1)
            complete = (steps > 0) & (steps % memory.immediate_slots == 0)
            if not complete.any():
                continue
            rings = ring.reshape(-1, *ring.shape[-2:])[complete]
            terms = memory.compression.elbo(rings)
            loss = loss.to(terms.loss.device) + terms.loss
            logs["elbo_reconstruction"].append(terms.reconstruction.detach())
            logs["elbo_kl"].append(terms.kl.detach())
            logs["elbo_relative_error"].append(terms.relative_error)
            logs["elbo_beta"].append(memory.compression.log_beta.exp())  # the beta used here
            if self.adapt_beta and self.training:
                memory.compression.adapt_beta(terms.relative_error)
            buffers += rings.shape[0]
        out = TensorDict({"loss_elbo": loss * self.elbo_coeff})
        for name, values in logs.items():
            out.set(name, torch.stack(values).mean() if values else torch.zeros(()))
        out.set("elbo_buffers", torch.tensor(buffers))
        return out
