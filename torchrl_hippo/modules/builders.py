"""One call that builds a PPO actor and critic around :class:`HierarchicalMemory`, and their env transforms."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from tensordict.nn import TensorDictModule, TensorDictSequential
from tensordict.utils import NestedKey
from torch import nn
from torchrl.data import Bounded, Categorical, OneHot
from torchrl.envs import Compose, EnvBase, InitTracker, RewardSum, StepCounter
from torchrl.modules import MLP, NormalParamExtractor, ProbabilisticActor, TanhNormal

from torchrl_hippo.modules.hierarchical import HierarchicalMemory

__all__ = ["HierarchicalActorCritic", "make_encoder", "make_head", "make_hierarchical_actor_critic"]


class HierarchicalActorCritic(NamedTuple):
    """What :func:`make_hierarchical_actor_critic` builds.

    Attributes:
        actor (ProbabilisticActor): ``ProbabilisticActor(TensorDictSequential(observation
            encoder, HierarchicalMemory, head))``; give it to ``ClipPPOLoss``.
        critic (TensorDictSequential): ``TensorDictSequential(observation encoder,
            HierarchicalMemory, value head)`` writing ``"state_value"``; give it to ``ClipPPOLoss``
            and ``GAE``.
        policy (TensorDictSequential): the actor followed by the critic: the module to collect
            with, so that the critic's memory state is recorded along with the actor's.
        transforms (Compose): ``InitTracker``, ``StepCounter``, ``RewardSum`` and both
            memories' ``TensorDictPrimer``; append it to the environment.
        memories (tuple of HierarchicalMemory): the actor's and the critic's memories (e.g. for
            :class:`~torchrl_hippo.modules.hierarchical.MemoryELBOLoss`).
    """

    actor: ProbabilisticActor
    critic: TensorDictSequential
    policy: TensorDictSequential
    transforms: Compose
    memories: tuple[HierarchicalMemory, HierarchicalMemory]


def make_encoder(observation_dim: int, embed_dim: int, hidden_dim: int) -> MLP:
    """The observation encoder of :func:`make_hierarchical_actor_critic`: a one-hidden-layer
    ``Tanh`` MLP, activated at its output too.

    Baselines built with it and :func:`make_head` differ from the memory's actor-critic only in
    their core.

    Examples:
        >>> import torch
        >>> make_encoder(4, 8, 16)(torch.zeros(2, 4)).shape
        torch.Size([2, 8])
    """
    return MLP(
        in_features=observation_dim,
        out_features=embed_dim,
        num_cells=[hidden_dim],
        activation_class=nn.Tanh,
        activate_last_layer=True,
    )


def make_head(embed_dim: int, out_features: int, hidden_dim: int, last_scale: float = 1.0) -> MLP:
    """The output head of :func:`make_hierarchical_actor_critic`: a one-hidden-layer ``Tanh``
    MLP whose last layer has its weights scaled by ``last_scale`` and a zero bias (the actor's
    uses ``0.01``, for near-uniform first actions).

    Examples:
        >>> import torch
        >>> head = make_head(8, 3, 16, last_scale=0.01)
        >>> head(torch.zeros(2, 8)).shape, bool(head[-1].bias.eq(0).all())
        (torch.Size([2, 3]), True)
    """
    head = MLP(
        in_features=embed_dim,
        out_features=out_features,
        num_cells=[hidden_dim],
        activation_class=nn.Tanh,
    )
    with torch.no_grad():
        head[-1].weight.mul_(last_scale)
        head[-1].bias.zero_()
    return head


def make_hierarchical_actor_critic(
    env: EnvBase,
    *,
    embed_dim: int = 64,
    hidden_dim: int = 64,
    observation_key: NestedKey = "observation",
    max_steps: int | None = None,
    memory_kwargs: dict[str, Any] | None = None,
) -> HierarchicalActorCritic:
    """Builds a PPO actor and critic that each read a :class:`HierarchicalMemory`.

    Each of the two networks is ``observation -> MLP encoder (tanh, embed_dim) -> memory ->
    MLP head``; the actor's head gives the distribution's parameters (a categorical
    distribution for ``OneHot`` / ``Categorical`` action specs, a ``TanhNormal`` for ``Bounded``
    ones) and the critic's head ``"state_value"``. The actor's memory keeps its state under
    ``"hmem"`` and reads ``"embed"``; the critic's under ``"critic_hmem"`` and reads
    ``"critic_embed"``.

    Args:
        env (EnvBase): the (untransformed or transformed) environment, for its specs. It needs
            a flat observation ``[observation_dim]`` at ``observation_key``.

    Keyword Args:
        embed_dim (int, optional): size of the embeddings and of the memory read-out.
            Defaults to ``64``.
        hidden_dim (int, optional): width of the encoders' and heads' hidden layer.
            Defaults to ``64``.
        observation_key (NestedKey, optional): Defaults to ``"observation"``.
        max_steps (int, optional): episode cap of the ``StepCounter``. Defaults to ``None``.
        memory_kwargs (dict, optional): keyword arguments of both
            :class:`HierarchicalMemory` (slot counts, ``latent_dim``, ...). Defaults to ``None``.

    Returns:
        A :class:`HierarchicalActorCritic`.

    Examples:
        >>> import torch
        >>> from torchrl.collectors import Collector
        >>> from torchrl.envs import GymEnv, TransformedEnv
        >>> from torchrl.objectives import ClipPPOLoss
        >>> from torchrl_hippo.modules.builders import make_hierarchical_actor_critic
        >>> base = GymEnv("CartPole-v1")
        >>> modules = make_hierarchical_actor_critic(
        ...     base, embed_dim=16, hidden_dim=16,
        ...     memory_kwargs=dict(immediate_slots=4, short_term_slots=2, long_term_slots=2),
        ... )
        >>> env = TransformedEnv(base, modules.transforms)
        >>> collector = Collector(env, modules.policy, frames_per_batch=10, total_frames=10)
        >>> data = next(iter(collector))
        >>> collector.shutdown()
        >>> data["next", "critic_hmem", "steps"].shape
        torch.Size([10, 1])
        >>> loss = ClipPPOLoss(modules.actor, modules.critic)
        >>> data["advantage"] = torch.zeros(10, 1)
        >>> data["value_target"] = torch.zeros(10, 1)
        >>> abs(loss(data)["kl_approx"].item()) < 1e-5
        True
    """
    if not isinstance(env, EnvBase):
        raise TypeError(f"env must be a torchrl EnvBase, got {type(env).__name__}.")
    observation_spec = env.observation_spec_unbatched.get(observation_key, None)
    if observation_spec is None:
        raise KeyError(f"the env has no observation entry {observation_key!r}.")
    if len(observation_spec.shape) != 1:
        raise ValueError(
            f"the observation {observation_key!r} must be flat [observation_dim], got shape "
            f"{list(observation_spec.shape)}."
        )
    observation_dim = observation_spec.shape[-1]
    memory_kwargs = dict(memory_kwargs or {})
    reserved = {"in_key", "out_key", "state_key"} & set(memory_kwargs)
    if reserved:
        raise ValueError(
            f"memory_kwargs may not set {sorted(reserved)}: the builder names the keys."
        )

    action_spec = env.action_spec_unbatched
    if isinstance(action_spec, (OneHot, Categorical)):
        n_out = action_spec.space.n
        distribution_class = (
            torch.distributions.OneHotCategorical
            if isinstance(action_spec, OneHot)
            else torch.distributions.Categorical
        )
        distribution_kwargs: dict[str, Any] = {}
        head_keys = ["logits"]
        param_extractor = None
    elif isinstance(action_spec, Bounded) and action_spec.domain == "continuous":
        n_out = 2 * action_spec.shape[-1]
        distribution_class = TanhNormal
        distribution_kwargs = {"low": action_spec.space.low, "high": action_spec.space.high}
        head_keys = ["loc", "scale"]
        param_extractor = NormalParamExtractor()
    else:
        raise TypeError(
            "the action spec must be OneHot, Categorical or continuous Bounded, "
            f"got {type(action_spec).__name__}."
        )

    actor_memory = HierarchicalMemory(embed_dim, state_key="hmem", **memory_kwargs)
    critic_memory = HierarchicalMemory(
        embed_dim,
        in_key="critic_embed",
        out_key=("critic_hmem", "readout"),
        state_key="critic_hmem",
        **memory_kwargs,
    )
    head = make_head(embed_dim, n_out, hidden_dim, last_scale=0.01)
    if param_extractor is not None:
        head = nn.Sequential(head, param_extractor)
    actor_body = TensorDictSequential(
        TensorDictModule(
            make_encoder(observation_dim, embed_dim, hidden_dim),
            in_keys=[observation_key],
            out_keys=[actor_memory.in_keys[0]],
        ),
        actor_memory,
        TensorDictModule(head, in_keys=[actor_memory.out_keys[0]], out_keys=head_keys),
    )
    actor = ProbabilisticActor(
        actor_body,
        in_keys=head_keys,
        spec=action_spec,
        distribution_class=distribution_class,
        distribution_kwargs=distribution_kwargs,
        return_log_prob=True,
    )
    critic = TensorDictSequential(
        TensorDictModule(
            make_encoder(observation_dim, embed_dim, hidden_dim),
            in_keys=[observation_key],
            out_keys=[critic_memory.in_keys[0]],
        ),
        critic_memory,
        TensorDictModule(
            make_head(embed_dim, 1, hidden_dim, last_scale=1.0),
            in_keys=[critic_memory.out_keys[0]],
            out_keys=["state_value"],
        ),
    )
    transforms = Compose(
        InitTracker(),
        StepCounter(max_steps),
        RewardSum(),
        actor_memory.make_tensordict_primer(),
        critic_memory.make_tensordict_primer(),
    )
    return HierarchicalActorCritic(
        actor=actor,
        critic=critic,
        policy=TensorDictSequential(actor, critic),
        transforms=transforms,
        memories=(actor_memory, critic_memory),
    )
