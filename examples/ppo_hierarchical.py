"""PPO whose actor and critic read a HierarchicalMemory, on a cue-recall task.

Run it from the repository root: ``python examples/ppo_hierarchical.py`` (``--help`` lists the
options). The task (``benchmarks/cue_recall_env.py``) shows one of ``--num-cues`` cues at the
first step of an episode and rewards, ``--delay`` steps later, the action that names it, so the
policy has to remember the cue over a long blank stretch. With the default delay of 60 the cue
has left the memory's 32-step immediate ring long before the query: it survives only in the
short-term summaries (and long-term templates) that the VAE wrote when the ring was complete.

The pipeline is plain TorchRL::

    Collector(env + [InitTracker, StepCounter, RewardSum, primers], actor -> critic)
        --td[num_envs, T]--> GAE(shifted=True) --> epochs x minibatches of [envs, T] chunks
        --> ClipPPOLoss (recurrent mode: each chunk replayed from its stored state)
            + MemoryELBOLoss (the VAE, on the rings compressed during collection)
        --> one Adam step over both

- ``make_hierarchical_actor_critic`` builds the actor
  (``ProbabilisticActor(TensorDictSequential(encoder, HierarchicalMemory, head))``), the critic
  (the same shape, with its own memory) and the env transforms in one call.
- The collector runs the actor *and* the critic (``modules.policy``), so the data holds both
  memories' states; GAE then reads each step's stored critic state (sequential mode, exact and
  cheap) and ``ClipPPOLoss`` replays ``[envs, T]`` chunks from the stored state at their first
  step (recurrent mode, entered by the loss itself), so its first-minibatch ``kl_approx`` is 0.
- Minibatches are whole rows of the ``[num_envs, T]`` batch: chunks of consecutive steps, never
  shuffled steps. With the default ``T = delay + 1`` every row is one whole episode.
- The learning rate decays linearly to 0 over ``--frames`` (``--no-anneal-lr`` keeps it).

``--agent mlp`` trains the same PPO with memory-less MLP actor and critic, for comparison.
Logs go to TensorBoard under ``--logdir`` (``tensorboard --logdir runs/ppo_hierarchical``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.collectors import Collector
from torchrl.envs import Compose, InitTracker, RewardSum, StepCounter, TransformedEnv
from torchrl.modules import MLP, ProbabilisticActor
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE
from torchrl.record.loggers import TensorboardLogger
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cue_recall_env import make_cue_recall_env  # noqa: E402
from torchrl_hippo.modules.builders import make_hierarchical_actor_critic  # noqa: E402
from torchrl_hippo.modules.hierarchical import MemoryELBOLoss  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agent", choices=["hmem", "mlp"], default="hmem")
    parser.add_argument("--frames", type=int, default=300_000, help="environment steps in total")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument(
        "--steps-per-batch",
        type=int,
        default=None,
        help="steps per env per batch (default: one episode, delay + 1)",
    )
    parser.add_argument("--num-cues", type=int, default=4)
    parser.add_argument("--delay", type=int, default=60, help="steps between cue and query")
    parser.add_argument("--epochs", type=int, default=8, help="PPO epochs per batch")
    parser.add_argument("--minibatches", type=int, default=2, help="minibatches per epoch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--no-anneal-lr",
        dest="anneal_lr",
        action="store_false",
        help="keep the learning rate constant (default: linear decay to 0 over --frames)",
    )
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--lmbda", type=float, default=0.95)
    parser.add_argument("--clip-epsilon", type=float, default=0.2)
    parser.add_argument("--entropy-coeff", type=float, default=0.01)
    parser.add_argument("--critic-coeff", type=float, default=0.5)
    parser.add_argument("--elbo-coeff", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--logdir", default="runs/ppo_hierarchical", help="TensorBoard root")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    return parser.parse_args(argv)


def make_mlp_actor_critic(env: TransformedEnv, hidden: int) -> dict[str, Any]:
    """Memory-less actor and critic of the same width, for comparison."""
    obs_dim = env.observation_spec_unbatched["observation"].shape[-1]
    n_actions = env.action_spec_unbatched.space.n

    def mlp(out: int) -> MLP:
        return MLP(
            in_features=obs_dim,
            out_features=out,
            num_cells=[hidden, hidden],
            activation_class=nn.Tanh,
        )

    actor = ProbabilisticActor(
        TensorDictModule(mlp(n_actions), in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"],
        spec=env.action_spec_unbatched,
        distribution_class=torch.distributions.OneHotCategorical,
        return_log_prob=True,
    )
    critic = TensorDictModule(mlp(1), in_keys=["observation"], out_keys=["state_value"])
    return {
        "actor": actor,
        "critic": critic,
        "policy": TensorDictSequential(actor, critic),
        "transforms": Compose(InitTracker(), StepCounter(), RewardSum()),
        "memories": (),
    }


def train(args: argparse.Namespace) -> list[dict[str, float]]:
    """Trains one agent; returns one record per collected batch (frames, success, losses)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = make_cue_recall_env(
        args.num_envs, num_cues=args.num_cues, delay=args.delay, seed=args.seed
    )
    if args.agent == "hmem":
        modules = make_hierarchical_actor_critic(
            base, embed_dim=args.embed_dim, hidden_dim=args.embed_dim
        )._asdict()
    else:
        modules = make_mlp_actor_critic(base, args.embed_dim)
    env = TransformedEnv(base, modules["transforms"])
    steps_per_batch = args.steps_per_batch or args.delay + 1
    frames_per_batch = args.num_envs * steps_per_batch
    total_frames = -(-args.frames // frames_per_batch) * frames_per_batch  # whole batches
    collector = Collector(
        env,
        modules["policy"],
        frames_per_batch=frames_per_batch,
        total_frames=total_frames,
    )
    loss_module = ClipPPOLoss(
        modules["actor"],
        modules["critic"],
        clip_epsilon=args.clip_epsilon,
        entropy_coeff=args.entropy_coeff,
        critic_coeff=args.critic_coeff,
        normalize_advantage=True,
    )
    advantage = GAE(
        gamma=args.gamma, lmbda=args.lmbda, value_network=modules["critic"], shifted=True
    )
    elbo_loss = (
        MemoryELBOLoss(modules["memories"], elbo_coeff=args.elbo_coeff)
        if modules["memories"]
        else None
    )
    params = {id(p): p for p in loss_module.parameters()}
    if elbo_loss is not None:
        params.update({id(p): p for p in elbo_loss.parameters()})
    params = list(params.values())
    optimizer = torch.optim.Adam(params, lr=args.lr)
    run_name = f"{args.agent}_cues{args.num_cues}_delay{args.delay}_seed{args.seed}"
    logger = TensorboardLogger(exp_name=run_name, log_dir=args.logdir)

    records: list[dict[str, float]] = []
    frames = 0
    start = time.perf_counter()
    bar = tqdm(total=total_frames, disable=args.no_progress, desc=args.agent)
    for data in collector:  # [num_envs, steps_per_batch]
        if args.anneal_lr:
            for group in optimizer.param_groups:
                group["lr"] = args.lr * (1.0 - frames / args.frames)
        frames += data.numel()
        with torch.no_grad():
            advantage(data)
        logs: dict[str, list[float]] = {}
        for _ in range(args.epochs):
            for rows in torch.randperm(data.shape[0]).chunk(args.minibatches):
                batch = data[rows]
                out = loss_module(batch)
                total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
                if elbo_loss is not None:
                    elbo = elbo_loss(batch)
                    total = total + elbo["loss_elbo"]
                    out.update(elbo)
                optimizer.zero_grad()
                total.backward()
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                for key, value in out.items():
                    if value.numel() == 1:
                        logs.setdefault(key, []).append(float(value.detach()))
        collector.update_policy_weights_()

        done = data["next", "done"].squeeze(-1)
        returns = data["next", "episode_reward"].squeeze(-1)[done]
        record = {
            "frames": frames,
            "time_s": time.perf_counter() - start,
            "success": float(returns.mean()) if returns.numel() else float("nan"),
            "episodes": int(done.sum()),
            "lr": optimizer.param_groups[0]["lr"],
            "kl_first_minibatch": logs["kl_approx"][0],
            **{key: sum(values) / len(values) for key, values in logs.items()},
        }
        records.append(record)
        for key, value in record.items():
            if key != "frames":
                logger.log_scalar(key, value, step=frames)
        bar.update(data.numel())
        bar.set_postfix(
            success=f"{record['success']:.2f}", kl0=f"{record['kl_first_minibatch']:.1e}"
        )
    bar.close()
    collector.shutdown()
    return records


def main() -> None:
    args = parse_args()
    records = train(args)
    last = records[-5:]
    success = sum(r["success"] for r in last) / len(last)
    print(
        f"{args.agent}: {records[-1]['frames']} frames in {records[-1]['time_s']:.0f} s; "
        f"success over the last {len(last)} batches {success:.3f} "
        f"(chance {1 / args.num_cues:.3f}); first-minibatch kl_approx of the last batch "
        f"{records[-1]['kl_first_minibatch']:.2e}"
    )


if __name__ == "__main__":
    main()
