"""The episode-window encoder of the memory: an online network and its momentum (EMA) target.

A key summarises the trailing window of ``(observation, action, reward)`` steps that ends at a
transition. Stored keys come from the slowly moving *target* network, so they stay valid while
the *online* network trains; queries come from the online network. Both live in one space.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import Tensor, nn

from torchrl_hippo._checks import as_nested_key, check_positive_int

__all__ = ["DualEncoder"]

# Names accepted by DualEncoder.set_keys, in the order of in_keys (then the output key).
_KEY_NAMES = ("observation", "action", "reward", "mask", "key")


def _symlog(x: Tensor) -> Tensor:
    """``sign(x) * log(1 + |x|)``: compresses large rewards, keeps small ones almost unchanged."""
    return torch.sign(x) * torch.log1p(x.abs())


def _check_momentum(value: float, name: str = "momentum") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}.")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}.")
    return value


class _WindowNet(nn.Module):
    """The network that the online and the target encoder each hold a copy of.

    Per step, ``concat(observation features, action, symlog(reward))`` goes through two
    (Linear, LayerNorm, tanh) blocks, then gets a learned embedding of its window position
    (the last position is the current step). Masked steps are then zeroed and the window is
    pooled position-wise: a Linear over the flattened ``[window, hidden_dim]`` block, i.e. each
    position has its own projection and the projections are summed. A (LayerNorm, tanh, Linear)
    head maps the pooled vector to ``embed_dim``. The caller L2-normalises the result.
    """

    # LayerNorm gains start here, so the tanh units work in their non-linear range.
    _LAYER_NORM_GAIN = 2.0

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        embed_dim: int,
        window: int,
        hidden_dim: int,
        dropout: float,
        observation_encoder: nn.Module | None,
    ) -> None:
        super().__init__()
        self.observation_encoder = observation_encoder
        self.window = window
        step_in = observation_dim + action_dim + 1
        self.step = nn.Sequential(
            nn.Linear(step_in, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.Tanh(),
            nn.Dropout(dropout),
        )
        self.position = nn.Parameter(torch.empty(window, hidden_dim))
        self.pool = nn.Linear(window * hidden_dim, hidden_dim)
        self.head = nn.Sequential(
            nn.LayerNorm(hidden_dim),
            nn.Tanh(),
            nn.Linear(hidden_dim, embed_dim),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises the network so that random windows get well-spread keys.

        Orthogonal weights keep the spread of the inputs, zero biases add no offset shared by
        every key, position embeddings are small, and tanh is odd: a window and its negation
        get opposite pre-normalisation outputs, up to the position embeddings.
        """
        nn.init.normal_(self.position, std=0.02)
        for module in (*self.step, self.pool, *self.head):
            if isinstance(module, nn.Linear):
                nn.init.orthogonal_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.constant_(module.weight, self._LAYER_NORM_GAIN)
                nn.init.zeros_(module.bias)

    def forward(self, observation: Tensor, action: Tensor, reward: Tensor, mask: Tensor) -> Tensor:
        # observation [N, W, *obs_shape], action [N, W, A], reward [N, W, 1], mask [N, W] (bool)
        n, w = mask.shape
        if self.observation_encoder is not None:
            features = self.observation_encoder(observation.flatten(0, 1))
            expected = self.step[0].in_features - action.shape[-1] - 1
            if features.shape != (n * w, expected):
                raise ValueError(
                    f"observation_encoder must map [N, *obs_shape] to [N, observation_dim="
                    f"{expected}], got {list(features.shape)} from {list(observation.shape[1:])}."
                )
            features = features.reshape(n, w, expected)
        else:
            features = observation.flatten(2)
        h = self.step(torch.cat([features, action, reward], dim=-1))
        h = (h + self.position[self.window - w :]) * mask.unsqueeze(-1).to(h.dtype)
        if w < self.window:  # a short window fills the last positions; the first are empty
            h = F.pad(h, (0, 0, self.window - w, 0))
        return self.head(self.pool(h.flatten(1)))


class DualEncoder(TensorDictModuleBase):
    """Online and momentum-target encoders of trailing ``(observation, action, reward)`` windows.

    Each key is the L2-normalised embedding (size ``embed_dim``) of the window of up to
    ``window`` steps that ends at a transition. The *online* network is the one an optimiser
    trains; the *target* network is an exponential moving average of it, updated by
    :meth:`update_target`, frozen (``requires_grad=False``) and always in eval mode, so its keys
    are deterministic. Stored keys use the target (``target=True``), queries the online network
    (the default). :attr:`version` counts target updates: the writer stores it next to each key
    as ``("hippo", "key_version")`` to measure staleness.

    Per step the network sees ``concat(observation features, action, symlog(reward))``, with
    ``symlog(r) = sign(r) * log(1 + |r|)``. Two (Linear, LayerNorm, tanh) blocks embed each
    step and a learned position embedding is added (the last position is the current step).
    Masked steps are zeroed, the window is pooled position-wise (each position has its own
    projection, and the projections are summed), and a (LayerNorm, tanh, Linear) head maps the
    result to ``embed_dim`` before the L2 normalisation. At initialisation, windows of random
    data get keys with a mean pairwise cosine near ``0`` and an effective rank well above
    ``embed_dim / 2`` (see :mod:`torchrl_hippo.metrics`).

    Input layout. The TensorDict has batch size ``[*B]``; the window is the first feature dim:

    - observation: ``[*B, W, observation_dim]``, or ``[*B, W, *obs_shape]`` that is flattened to
      ``observation_dim`` features (or mapped there by ``observation_encoder``), floating point
      (or integer, such as ``uint8`` frames, when an ``observation_encoder`` takes them);
    - action: ``[*B, W, action_dim]`` (one-hot or continuous; integer one-hot vectors, as
      TorchRL's ``OneHot`` specs produce, are used as floats), or an integer or bool category
      index of shape ``[*B, W]`` or ``[*B, W, 1]``, turned into a one-hot vector (with
      ``action_dim=1``, ``[*B, W, 1]`` is an index);
    - reward: ``[*B, W, 1]`` or ``[*B, W]``;
    - mask: ``[*B, W]`` bool, ``True`` for real steps. Positions before the episode start are
      ``False``; whatever they hold is ignored. Without a mask entry every step is real. The
      last step (the current one) should be real: a window without any real step has no
      content, and gets the key of an empty window (the zero vector at initialisation).

    ``W`` may be smaller than ``window`` (the positions are aligned on the last step), never
    larger.

    Args:
        observation_dim (int): number of observation features per step (after
            ``observation_encoder`` if one is given).
        action_dim (int): size of a continuous action, or number of discrete actions.
        embed_dim (int, optional): size of the keys. Defaults to ``128``.

    Keyword Args:
        window (int, optional): the longest window, in steps. Defaults to ``8``.
        hidden_dim (int, optional): width of the hidden layers. Defaults to ``256``.
        momentum (float, optional): EMA factor ``m`` of :meth:`update_target`, in ``[0, 1]``.
            Defaults to ``0.995``.
        dropout (float, optional): dropout probability in the online network's step embedding,
            in ``[0, 1)``. The target never drops anything. Defaults to ``0.0``.
        observation_encoder (nn.Module, optional): maps observations ``[*, *obs_shape]`` to
            ``[*, observation_dim]`` per step (e.g. a pixel encoder). It is trained with the
            online network and copied into the target. With one, observations may also be
            integer (e.g. ``uint8`` frames): they reach it uncast, so it can scale them itself
            (see :class:`~torchrl_hippo.modules.pixels.PixelEncoder`). Defaults to ``None``
            (flatten).
        observation_key (NestedKey, optional): Defaults to ``"observation"``.
        action_key (NestedKey, optional): Defaults to ``"action"``.
        reward_key (NestedKey, optional): Defaults to ``("next", "reward")``.
        mask_key (NestedKey, optional): Defaults to ``("hippo", "window_mask")``.
        out_key (NestedKey, optional): where :meth:`forward` writes the keys.
            Defaults to ``("hippo", "key")``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_hippo.modules import DualEncoder
        >>> encoder = DualEncoder(observation_dim=4, action_dim=2, embed_dim=32, window=8)
        >>> td = TensorDict(
        ...     {
        ...         "observation": torch.randn(10, 8, 4),
        ...         "action": torch.randint(2, (10, 8)),
        ...         ("next", "reward"): torch.randn(10, 8, 1),
        ...         ("hippo", "window_mask"): torch.ones(10, 8, dtype=torch.bool),
        ...     },
        ...     batch_size=[10],
        ... )
        >>> td = encoder(td, target=True)
        >>> td["hippo", "key"].shape
        torch.Size([10, 32])
        >>> torch.allclose(td["hippo", "key"].norm(dim=-1), torch.ones(10))
        True
        >>> queries = encoder.encode(td["observation"], td["action"], td["next", "reward"])
        >>> queries.shape
        torch.Size([10, 32])
        >>> encoder.update_target()
        >>> int(encoder.version)
        1
    """

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        embed_dim: int = 128,
        *,
        window: int = 8,
        hidden_dim: int = 256,
        momentum: float = 0.995,
        dropout: float = 0.0,
        observation_encoder: nn.Module | None = None,
        observation_key: NestedKey = "observation",
        action_key: NestedKey = "action",
        reward_key: NestedKey = ("next", "reward"),
        mask_key: NestedKey = ("hippo", "window_mask"),
        out_key: NestedKey = ("hippo", "key"),
    ) -> None:
        super().__init__()
        self.observation_dim = check_positive_int(observation_dim, "observation_dim")
        self.action_dim = check_positive_int(action_dim, "action_dim")
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        self.window = check_positive_int(window, "window")
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim")
        self.momentum = _check_momentum(momentum)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a float in [0, 1), got {type(dropout).__name__}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")
        self.dropout = float(dropout)
        if observation_encoder is not None and not isinstance(observation_encoder, nn.Module):
            raise TypeError(
                "observation_encoder must be an nn.Module or None, "
                f"got {type(observation_encoder).__name__}."
            )

        self._keys: dict[str, NestedKey] = {}
        self.set_keys(
            observation=observation_key,
            action=action_key,
            reward=reward_key,
            mask=mask_key,
            key=out_key,
        )

        self.online = _WindowNet(
            self.observation_dim,
            self.action_dim,
            self.embed_dim,
            self.window,
            self.hidden_dim,
            self.dropout,
            observation_encoder,
        )
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)
        self.target.train(False)
        self.register_buffer("version", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ keys
    def set_keys(self, **kwargs: NestedKey) -> DualEncoder:
        """Changes the TensorDict entries that :meth:`forward` reads and writes.

        Keyword Args:
            observation (NestedKey): the observation window entry.
            action (NestedKey): the action window entry.
            reward (NestedKey): the reward window entry.
            mask (NestedKey): the window mask entry (``True`` for real steps).
            key (NestedKey): the output entry.

        Returns:
            This module, with updated ``in_keys`` and ``out_keys``.

        Examples:
            >>> from torchrl_hippo.modules import DualEncoder
            >>> encoder = DualEncoder(4, 2, 16)
            >>> encoder = encoder.set_keys(observation="pixels_embedding", key=("memory", "q"))
            >>> encoder.in_keys[0], encoder.out_keys
            ('pixels_embedding', [('memory', 'q')])
        """
        unknown = sorted(set(kwargs) - set(_KEY_NAMES))
        if unknown:
            raise ValueError(
                f"set_keys got unknown key name(s) {unknown}; expected some of {list(_KEY_NAMES)}."
            )
        for name, value in kwargs.items():
            self._keys[name] = as_nested_key(value, f"set_keys: {name}")
        if all(name in self._keys for name in _KEY_NAMES):
            self.in_keys = [self._keys[name] for name in _KEY_NAMES[:-1]]
            self.out_keys = [self._keys["key"]]
        return self

    @property
    def observation_encoder(self) -> nn.Module | None:
        """The online network's per-step observation encoder (``None``: observations are flattened)."""
        return self.online.observation_encoder

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this encoder, ``observation_encoder`` excepted.

        ``DualEncoder(**encoder.config)`` builds an encoder of the same architecture, keys and
        hyper-parameters (with fresh weights: load them with ``load_state_dict``). The
        ``observation_encoder`` is a module, i.e. code rather than configuration: pass it again
        (a new instance of the same architecture) when the original had one.

        Examples:
            >>> from torchrl_hippo.modules import DualEncoder
            >>> encoder = DualEncoder(4, 2, 16, window=3, out_key=("memory", "key"))
            >>> config = encoder.config
            >>> config["embed_dim"], config["window"], config["out_key"]
            (16, 3, ('memory', 'key'))
            >>> DualEncoder(**config).config == config
            True
        """
        return {
            "observation_dim": self.observation_dim,
            "action_dim": self.action_dim,
            "embed_dim": self.embed_dim,
            "window": self.window,
            "hidden_dim": self.hidden_dim,
            "momentum": self.momentum,
            "dropout": self.dropout,
            **{f"{name}_key": self._keys[name] for name in _KEY_NAMES[:4]},
            "out_key": self._keys["key"],
        }

    # ------------------------------------------------------------------ modes and updates
    def train(self, mode: bool = True) -> DualEncoder:
        """Sets the online network's mode; the target network always stays in eval mode."""
        super().train(mode)
        self.target.train(False)
        return self

    @torch.no_grad()
    def update_target(self, momentum: float | None = None) -> None:
        """One momentum step: ``target = m * target + (1 - m) * online``, then ``version += 1``.

        Parameters follow the formula; buffers (if any) are copied from the online network.

        Args:
            momentum (float, optional): the factor ``m`` in ``[0, 1]`` for this update
                (``1`` keeps the target, ``0`` copies the online network).
                Defaults to ``None`` (the module's ``momentum``).

        Examples:
            >>> import torch
            >>> from torchrl_hippo.modules import DualEncoder
            >>> encoder = DualEncoder(4, 2, 16)
            >>> with torch.no_grad():
            ...     _ = encoder.online.position.add_(1.0)
            >>> encoder.update_target(momentum=0.0)
            >>> torch.equal(encoder.target.position, encoder.online.position)
            True
        """
        m = self.momentum if momentum is None else _check_momentum(momentum)
        for p_target, p_online in zip(self.target.parameters(), self.online.parameters()):
            p_target.mul_(m).add_(p_online.detach(), alpha=1.0 - m)
        for b_target, b_online in zip(self.target.buffers(), self.online.buffers()):
            b_target.copy_(b_online)
        self.version.add_(1)

    # ------------------------------------------------------------------ encoding
    def encode(
        self,
        observation: Tensor,
        action: Tensor,
        reward: Tensor,
        mask: Tensor | None = None,
        *,
        target: bool = False,
        batch_dims: int | None = None,
    ) -> Tensor:
        """Encodes windows given as tensors (see the class docstring for their layout).

        Args:
            observation (Tensor): ``[*B, W, observation_dim]`` or ``[*B, W, *obs_shape]``.
            action (Tensor): ``[*B, W, action_dim]`` (floating point, or an integer one-hot),
                or an integer or bool category index of shape ``[*B, W]`` or ``[*B, W, 1]``.
            reward (Tensor): ``[*B, W, 1]`` or ``[*B, W]``.
            mask (Tensor, optional): ``[*B, W]`` bool, ``True`` for real steps.
                Defaults to ``None`` (all steps are real).

        Keyword Args:
            target (bool, optional): use the target network (stored keys, computed without
                gradient) instead of the online one (queries). Defaults to ``False``.
            batch_dims (int, optional): the number of batch dims ``len(B)``. When ``None`` it is
                read from ``mask`` (``mask.ndim - 1``), else from a floating-point ``action``
                (``action.ndim - 2``), else from an integer ``action``, whose trailing dim of
                size 1 (or ``action_dim``) is read as the index (or one-hot) dim unless the
                reward and observation shapes only fit ``[*B, W]``. :meth:`forward` passes the
                TensorDict's batch dims.
                Defaults to ``None``.

        Returns:
            The L2-normalised keys, of shape ``[*B, embed_dim]``.

        Examples:
            >>> import torch
            >>> from torchrl_hippo.modules import DualEncoder
            >>> encoder = DualEncoder(observation_dim=6, action_dim=3, embed_dim=16, window=4)
            >>> obs = torch.randn(5, 2, 4, 2, 3)  # B=[5, 2], W=4, obs_shape=[2, 3]
            >>> action = torch.randint(3, (5, 2, 4))
            >>> reward = torch.rand(5, 2, 4)
            >>> mask = torch.tensor([False, True, True, True]).expand(5, 2, 4)
            >>> encoder.encode(obs, action, reward, mask, target=True).shape
            torch.Size([5, 2, 16])
        """
        if not isinstance(target, bool):
            raise TypeError(f"target must be a bool, got {type(target).__name__}.")
        lead = self._lead_shape(observation, action, reward, mask, batch_dims)
        batch_shape, w = lead[:-1], lead[-1]
        if w > self.window:
            raise ValueError(
                f"the window length W={w} (dim {len(lead) - 1} of the inputs) exceeds "
                f"window={self.window}."
            )
        n = math.prod(batch_shape)
        net = self.target if target else self.online
        dtype = net.position.dtype

        # mask -> [N, W] bool
        if mask is None:
            mask_flat = torch.ones(n, w, dtype=torch.bool, device=observation.device)
        else:
            mask_flat = mask.reshape(n, w)

        # observation -> [N, W, *obs_shape]; masked steps zeroed so garbage there is ignored.
        obs = observation.reshape(n, w, *observation.shape[len(lead) :])
        if self.online.observation_encoder is None or obs.is_floating_point():
            obs = obs.to(dtype)  # integer frames (e.g. uint8 pixels) reach the encoder as they are
        per_step = math.prod(observation.shape[len(lead) :])
        if self.online.observation_encoder is None and per_step != self.observation_dim:
            raise ValueError(
                f"observation: expected {self.observation_dim} features per step "
                f"(observation_dim), got shape {tuple(observation.shape)} whose per-step part "
                f"{tuple(observation.shape[len(lead) :])} holds {per_step}."
            )
        step_mask = mask_flat.reshape(n, w, *([1] * (obs.ndim - 2)))
        obs = torch.where(step_mask, obs, torch.zeros((), dtype=obs.dtype, device=obs.device))

        act = self._action_features(action, lead, mask_flat, dtype)
        rew = reward.reshape(n, w, 1).to(dtype)
        rew = torch.where(
            mask_flat.unsqueeze(-1), rew, torch.zeros((), dtype=dtype, device=rew.device)
        )
        rew = _symlog(rew)

        if target:
            with torch.no_grad():
                out = self._run(net, obs, act, rew, mask_flat)
        else:
            out = self._run(net, obs, act, rew, mask_flat)
        return out.reshape(*batch_shape, self.embed_dim)

    @staticmethod
    def _run(net: _WindowNet, obs: Tensor, act: Tensor, rew: Tensor, mask: Tensor) -> Tensor:
        return F.normalize(net(obs, act, rew, mask), dim=-1)

    def forward(self, tensordict: TensorDictBase, *, target: bool = False) -> TensorDictBase:
        """Reads the window entries of ``tensordict``, writes the keys to the output entry.

        Args:
            tensordict (TensorDictBase): batch size ``[*B]``, holding the in_keys (the mask entry
                is optional) with the window as the first feature dim.

        Keyword Args:
            target (bool, optional): use the target network. Defaults to ``False``.

        Returns:
            ``tensordict``, with the ``[*B, embed_dim]`` keys at ``out_keys[0]``.
        """
        if not isinstance(tensordict, TensorDictBase):
            raise TypeError(
                f"tensordict must be a TensorDictBase, got {type(tensordict).__name__}."
            )
        values = []
        for name in _KEY_NAMES[:3]:
            key = self._keys[name]
            value = tensordict.get(key, None)
            if value is None:
                raise KeyError(
                    f"DualEncoder: the tensordict has no {name} entry {key!r} "
                    f"(set another with set_keys({name}=...))."
                )
            values.append(value)
        mask = tensordict.get(self._keys["mask"], None)
        keys = self.encode(*values, mask, target=target, batch_dims=tensordict.batch_dims)
        tensordict.set(self._keys["key"], keys)
        return tensordict

    # ------------------------------------------------------------------ input checks
    def _lead_shape(
        self,
        observation: Tensor,
        action: Tensor,
        reward: Tensor,
        mask: Tensor | None,
        batch_dims: int | None,
    ) -> torch.Size:
        """Checks the inputs and returns ``[*B, W]``."""
        for name, value in (("observation", observation), ("action", action), ("reward", reward)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}.")
        if mask is not None and not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a bool Tensor or None, got {type(mask).__name__}.")
        if observation.is_complex() or not (
            observation.is_floating_point() or self.online.observation_encoder is not None
        ):
            raise TypeError(
                "observation must be a floating-point tensor (integer frames need an "
                f"observation_encoder), got dtype {observation.dtype}."
            )
        if reward.is_complex():
            raise TypeError(f"reward must be a real tensor, got dtype {reward.dtype}.")
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}.")

        if batch_dims is not None:
            if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or batch_dims < 0:
                raise ValueError(f"batch_dims must be a non-negative int, got {batch_dims!r}.")
            if observation.ndim < batch_dims + 1:
                raise ValueError(
                    f"observation: expected at least {batch_dims + 1} dims ([*B, W, ...] with "
                    f"batch_dims={batch_dims}), got shape {tuple(observation.shape)}."
                )
            lead = observation.shape[: batch_dims + 1]
        elif mask is not None:
            if mask.ndim < 1:
                raise ValueError("mask: expected shape [*B, W], got a 0-dim tensor.")
            lead = mask.shape
        elif action.is_floating_point():
            if action.ndim < 2:
                raise ValueError(
                    f"action: expected shape [*B, W, action_dim={self.action_dim}], "
                    f"got {tuple(action.shape)}."
                )
            lead = action.shape[:-1]
        else:
            if action.ndim < 1:
                raise ValueError(
                    "action: expected shape [*B, W] or [*B, W, 1], got a 0-dim tensor."
                )
            # An integer action reads as an index [*B, W, 1] or [*B, W], or as a one-hot vector
            # [*B, W, action_dim]: take the first reading that fits the reward and observation.
            candidates = [action.shape]
            if action.shape[-1] == 1 or (
                self.action_dim > 1 and action.shape[-1] == self.action_dim
            ):
                candidates.insert(0, action.shape[:-1])
            fitting = [c for c in candidates if len(c) and self._fits(c, observation, reward)]
            lead = fitting[0] if fitting else action.shape
        lead = torch.Size(lead)
        if len(lead) < 1 or lead[-1] < 1:
            raise ValueError(f"expected a window dim W >= 1, got leading shape {tuple(lead)}.")

        def shape_error(name: str, expected: str, value: Tensor) -> ValueError:
            return ValueError(
                f"{name}: expected shape {expected} with [*B, W]={list(lead)} (batch shapes must "
                f"match across inputs), got {list(value.shape)}."
            )

        if observation.shape[: len(lead)] != lead:
            raise shape_error("observation", "[*B, W, *obs_shape]", observation)
        if self.online.observation_encoder is None and observation.ndim == len(lead):
            raise shape_error("observation", "[*B, W, observation_dim]", observation)
        if mask is not None and mask.shape != lead:
            raise shape_error("mask", "[*B, W]", mask)
        if reward.shape != lead and reward.shape != (*lead, 1):
            raise shape_error("reward", "[*B, W, 1] or [*B, W]", reward)
        if action.is_floating_point():
            if action.shape != (*lead, self.action_dim) and not (
                self.action_dim == 1 and action.shape == lead
            ):
                raise shape_error("action", f"[*B, W, action_dim={self.action_dim}]", action)
        elif action.is_complex():
            raise TypeError(f"action must be a real tensor, got dtype {action.dtype}.")
        elif action.shape not in (lead, (*lead, 1)) and not (
            self.action_dim > 1 and action.shape == (*lead, self.action_dim)
        ):
            raise shape_error(
                "action",
                f"[*B, W] or [*B, W, 1] (integer index) or [*B, W, action_dim={self.action_dim}] "
                "(integer one-hot)",
                action,
            )
        return lead

    def _fits(self, lead: torch.Size, observation: Tensor, reward: Tensor) -> bool:
        """Whether ``lead`` can be ``[*B, W]`` for these observation and reward shapes."""
        if reward.shape != lead and reward.shape != (*lead, 1):
            return False
        if observation.shape[: len(lead)] != lead or observation.ndim == len(lead):
            return False
        per_step = math.prod(observation.shape[len(lead) :])
        return self.online.observation_encoder is not None or per_step == self.observation_dim

    def _action_features(
        self, action: Tensor, lead: torch.Size, mask: Tensor, dtype: torch.dtype
    ) -> Tensor:
        """Returns ``[N, W, action_dim]`` features, zero at masked steps."""
        n, w = mask.shape
        one_hot = self.action_dim > 1 and action.shape == (*lead, self.action_dim)
        if action.is_floating_point() or one_hot:
            act = action.reshape(n, w, self.action_dim).to(dtype)
            return torch.where(
                mask.unsqueeze(-1), act, torch.zeros((), dtype=dtype, device=act.device)
            )
        index = action.reshape(n, w).long()
        index = torch.where(mask, index, torch.zeros((), dtype=torch.long, device=index.device))
        if index.numel() and (index.min() < 0 or index.max() >= self.action_dim):
            raise ValueError(
                f"action: integer actions must lie in [0, action_dim={self.action_dim}), got "
                f"values in [{int(index.min())}, {int(index.max())}]."
            )
        act = F.one_hot(index, self.action_dim).to(dtype)
        return act * mask.unsqueeze(-1).to(dtype)

    def extra_repr(self) -> str:
        return (
            f"observation_dim={self.observation_dim}, action_dim={self.action_dim}, "
            f"embed_dim={self.embed_dim}, window={self.window}, momentum={self.momentum}, "
            f"in_keys={self.in_keys}, out_keys={self.out_keys}"
        )
