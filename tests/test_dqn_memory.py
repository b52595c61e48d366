"""examples/dqn_memory.py, examples/demo.py and benchmarks/sparse_study.py in smoke mode."""

import doctest
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "examples", ROOT / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import demo  # noqa: E402
import dqn_memory  # noqa: E402
import sparse_study  # noqa: E402
from dqn_memory import (  # noqa: E402
    DQNConfig,
    DrawStats,
    evaluate,
    late_stats,
    make_env,
    make_replay,
    summarize,
)

from torchrl_hippo import HippoSampler  # noqa: E402
from torchrl_hippo.data.prioritized import TorchPrioritizedSampler  # noqa: E402

# A few hundred frames: 4 batches of 128 (4 envs x 32 steps), 2 checkpoints.
TINY = [
    "--frames",
    "512",
    "--frames-per-batch",
    "128",
    "--num-envs",
    "4",
    "--eval-every",
    "256",
    "--eval-episodes",
    "2",
    "--init-frames",
    "128",
    "--updates-per-batch",
    "2",
    "--batch-size",
    "32",
    "--buffer-size",
    "2000",
    "--consolidate-every",
    "1",
    "--consolidate-steps",
    "2",
    "--consolidate-batch",
    "16",
    "--no-progress",
]
CURVE_KEYS = ("frames", "eval_success", "eval_return", "train_episodes")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("dqn")
    argv = [*TINY, "--env-kwargs", "length=4", "--seeds", "0", "1"]
    argv += ["--out", str(out), "--name", "smoke", "--logdir", str(out / "runs")]
    return dqn_memory.main(argv), out


def _check_study(study, path_json, path_png, replays, seeds, points):
    assert path_json.exists() and path_png.exists()
    assert path_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads(path_json.read_text())
    assert on_disk["replays"] == list(replays)
    for kind in replays:
        runs = on_disk["runs"][kind]
        assert [r["seed"] for r in runs] == list(seeds)
        for run in runs:
            for key in CURVE_KEYS:
                values = run["curve"][key]
                assert len(values) == points, key
                assert all(math.isfinite(v) for v in values), (kind, key, values)
        assert set(on_disk["summary"][kind]) >= {"success_rate", "median_first_success_frame"}
    return on_disk


def test_main_writes_json_png_and_logs(smoke):
    study, out = smoke
    on_disk = _check_study(
        study, out / "smoke.json", out / "smoke.png", dqn_memory.REPLAYS, [0, 1], points=2
    )
    assert on_disk["runs"]["hippo"][0]["curve"]["frames"] == [256, 512]
    assert on_disk["command"].startswith("python examples/dqn_memory.py --frames 512")
    assert on_disk["success_threshold"] == 1.0
    # the memory statistics are there and are shares
    mem = on_disk["runs"]["hippo"][0]["memory"]
    assert 0.0 <= mem["success_share_rows"] <= 1.0
    # one TensorBoard run per (replay, seed)
    logdirs = [p for p in (out / "runs").iterdir() if any(p.glob("events.out.tfevents*"))]
    assert len(logdirs) == 6


def test_every_replay_learned_something(smoke):
    study, _ = smoke
    for kind in dqn_memory.REPLAYS:
        for run in study["runs"][kind]:
            assert run["updates"] == 4 * 2  # from the first batch on: 128 frames stored
            assert run["episodes"] > 0


def test_same_seed_same_behaviour_before_learning(tmp_path):
    """Runs of one seed act identically until the first update (here: no update at all)."""
    argv = [*TINY, "--init-frames", "100000", "--env-kwargs", "length=6", "--logdir", "none"]
    study = dqn_memory.main([*argv, "--out", str(tmp_path), "--name", "same"])
    curves = [study["runs"][k][0]["curve"]["train_return"] for k in dqn_memory.REPLAYS]
    firsts = {study["runs"][k][0]["first_success_frame"] for k in dqn_memory.REPLAYS}
    assert curves[0] == curves[1] == curves[2]
    assert len(firsts) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"replay": "fifo"}, "replay must be one of"),
        ({"frames": 0}, "frames must be an int >= 1"),
        ({"frames_per_batch": 100, "num_envs": 16}, "multiple of num_envs"),
        ({"eval_every": 1000}, "eval_every"),
        ({"frames": 4096 * 3 + 256}, "eval_every"),
        ({"mixture_ratio": 1.5}, "mixture_ratio must be in"),
        ({"gamma": 1.2}, "gamma must be in"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"forgetting": "lru"}, "forgetting must be"),
        ({"eval_episodes": -1}, "eval_episodes must be an int >= 0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DQNConfig(**kwargs)


@pytest.mark.parametrize(
    ("kind", "sampler_type", "n_schedulers", "consolidates"),
    [
        ("hippo", HippoSampler, 1, True),
        ("uniform", None, 0, False),
        ("prioritized", TorchPrioritizedSampler, 1, False),
    ],
)
def test_make_replay(kind, sampler_type, n_schedulers, consolidates):
    cfg = DQNConfig(replay=kind, buffer_size=500, retrieval_gate=False)
    replay = make_replay(cfg, observation_dim=8, action_dim=2, total_batches=10)
    if sampler_type is not None:
        assert isinstance(replay.buffer.sampler, sampler_type)
    assert len(replay.schedulers) == n_schedulers
    assert (replay.consolidation is not None) == consolidates
    if kind == "hippo":
        assert replay.buffer.sampler.mixture_ratio == pytest.approx(cfg.mixture_init)
        for _ in range(10):
            replay.schedulers[0].step()
        assert replay.buffer.sampler.mixture_ratio == pytest.approx(cfg.mixture_ratio)


def _episodes(returns, length=5):
    """Consecutive episodes of ``length`` steps; the last step pays the episode's return."""
    n = len(returns) * length
    reward = torch.zeros(n, 1)
    reward[length - 1 :: length, 0] = torch.tensor(returns, dtype=torch.float32)
    done = torch.zeros(n, 1, dtype=torch.bool)
    done[length - 1 :: length] = True
    action = torch.nn.functional.one_hot(torch.randint(2, (n,)), 2)
    return TensorDict(
        {
            "observation": torch.randn(n, 8),
            "action": action,
            "next": {"observation": torch.randn(n, 8), "reward": reward, "done": done},
        },
        batch_size=[n],
    )


def test_retrieval_gate_opens_when_returns_differ():
    cfg = DQNConfig(replay="hippo", buffer_size=500, consolidate_every=1, consolidate_batch=4)
    replay = make_replay(cfg, observation_dim=8, action_dim=2, total_batches=10)
    sampler = replay.buffer.sampler
    assert sampler.mixture_ratio == 0.0 and not replay.retrieving
    assert replay.after_batch(frames=10) is None  # empty memory: closed
    replay.buffer.extend(_episodes([0.0, 0.0, 0.0]))
    assert replay.after_batch(frames=20) is None
    assert sampler.mixture_ratio == 0.0 and not replay.retrieving
    assert not replay.buffer.sample()["hippo", "semantic"].any()
    replay.buffer.extend(_episodes([1.0]))  # a first success
    logs = replay.after_batch(frames=30)
    assert replay.retrieving and replay.gate_opened_at == 30
    assert sampler.mixture_ratio > 0.0
    assert logs is not None and logs["consolidation/steps"] == cfg.consolidate_steps
    assert replay.buffer.sample()["hippo", "semantic"].any()


class _Constant(torch.nn.Module):
    def __init__(self, action):
        super().__init__()
        self.action = action

    def forward(self, obs):
        out = torch.zeros(*obs.shape[:-1], 2, dtype=torch.int64)
        out[..., self.action] = 1
        return out


@pytest.mark.parametrize(("action", "expected"), [(1, 1.0), (0, 0.0)])
def test_evaluate(action, expected):
    env = make_env("hippo/Corridor-ZeroNoise-v0", num_envs=3, seed=0, length=5)
    policy = TensorDictModule(_Constant(action), ["observation"], ["action"])
    success, ret = evaluate(env, policy, max_steps=24, threshold=1.0)
    assert (success, ret) == (expected, expected)
    _, ret = evaluate(env, policy, max_steps=24, threshold=None)
    assert ret == expected


def test_cartpole_env_and_threshold():
    env = make_env("CartPole-v1", num_envs=2, seed=0)
    td = env.rollout(3)
    assert td.batch_size == (2, 3)
    assert dqn_memory.success_threshold("CartPole-v1") == 475.0
    assert dqn_memory.episode_step_limit("CartPole-v1", {}) == 500
    assert dqn_memory.episode_step_limit("hippo/Corridor-ZeroNoise-v0", {"length": 50}) == 204


def _run(success, episodes, eval_success, first):
    n = len(success)
    return {
        "seed": 0,
        "curve": {
            "frames": list(range(1, n + 1)),
            "train_success": success,
            "train_return": success,
            "train_episodes": episodes,
            "eval_success": eval_success,
            "eval_return": eval_success,
        },
        "first_success_frame": first,
        "final_eval_success": eval_success[-1],
        "final_eval_return": eval_success[-1],
        "train_success_rate": 0.5,
        "wall_time_s": 1.0,
        "cpu_time_s": 1.0,
    }


def test_late_stats_pools_episodes():
    # last quarter of 8 checkpoints = the last 2: (0.5 * 2 + 1.0 * 6) / 8 episodes
    run = _run([0.0] * 6 + [0.5, 1.0], [1] * 6 + [2, 6], [0.0] * 6 + [1.0, 0.0], 100)
    stats = late_stats(run)
    assert stats["late_train_success"] == pytest.approx(7 / 8)
    assert stats["late_eval_success"] == pytest.approx(0.5)


def test_summarize():
    a = _run([0.0, 1.0], [1, 1], [0.0, 1.0], 300)
    b = _run([0.0, 0.0], [1, 1], [0.0, 0.0], None)
    s = summarize([a, b])
    assert s["success_rate"] == pytest.approx(0.5)
    assert s["success_rate_std"] == pytest.approx(0.5)
    assert s["seeds_with_success"] == 1
    assert s["median_first_success_frame"] == 300
    assert s["first_success_frames"] == [300, None]
    assert "| hippo | 0.50 ± 0.50 |" in dqn_memory.format_table(
        {"summary": {"hippo": s}, "success_threshold": 1.0}
    )


def test_draw_stats():
    stats = DrawStats(1.0)
    sample = TensorDict(
        {
            "hippo": {
                "return": torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0]),
                "semantic": torch.tensor([True, True, True, False, False]),
            }
        },
        batch_size=[5],
    )
    stats.update(sample)
    assert stats.total == {"semantic": [2, 3], "uniform": [1, 2]}


def test_examples_doctests():
    for module in (dqn_memory,):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0


def test_demo_quick(tmp_path, capsys):
    argv = ["--quick", "--length", "4", "--seeds", "3", "--out", str(tmp_path)]
    study = demo.main([*argv, "--logdir", str(tmp_path / "runs")])
    _check_study(
        study,
        tmp_path / "demo_corridor4.json",
        tmp_path / "demo_corridor4.png",
        dqn_memory.REPLAYS,
        [3],
        points=2,
    )
    printed = capsys.readouterr().out
    assert "| replay | success rate" in printed
    assert "The memory at work" in printed
    assert f"tensorboard --logdir {tmp_path / 'runs'}" in printed


def test_sparse_study_quick(tmp_path):
    argv = ["--quick", "--only", "control10", "--seeds", "0", "--out", str(tmp_path)]
    argv += ["--logdir", "none", "--replay", "hippo", "uniform"]
    report = sparse_study.main(argv)
    assert report["complete"]
    for suffix in (".json", ".png", ".md"):
        assert (tmp_path / f"sparse_study{suffix}").exists()
    verdict = report["verdicts"]["control10_hippo_within_5pct"]
    assert verdict["metric"] == "success_rate"
    assert isinstance(verdict["passed"], bool)
    # --resume keeps the finished runs
    again = sparse_study.main([*argv, "--resume"])
    runs = [r["studies"]["control10"]["runs"] for r in (report, again)]
    assert json.dumps(runs[0]) == json.dumps(runs[1])  # (nan != nan, hence JSON)
