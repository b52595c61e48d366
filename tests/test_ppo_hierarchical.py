"""Smoke tests of examples/ppo_hierarchical.py and benchmarks/ppo_memory_study.py."""

import doctest
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torchrl.envs import TransformedEnv

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import ppo_memory_study  # noqa: E402
from examples import ppo_hierarchical  # noqa: E402
from examples.ppo_hierarchical import (  # noqa: E402
    MODELS,
    make_actor_critic,
    make_env,
    parse_args,
    run,
)

TINY = dict(env="corridor-cue", num_envs=2, env_kwargs={"length": 2}, epochs=1, width=8)


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    """The study in smoke mode: 3 models x 2 tasks x 1 seed, 256 frames per run."""
    out = tmp_path_factory.mktemp("study")
    payload = ppo_memory_study.main(
        ["--smoke", "--seeds", "3", "--output-dir", str(out), "--logdir", str(out / "runs")]
    )
    return out, payload


def test_study_smoke_writes_json_png_md(smoke_study):
    out, payload = smoke_study
    json_path = out / "ppo_memory_study_smoke.json"
    assert json.loads(json_path.read_text(), parse_constant=pytest.fail) == json.loads(
        json.dumps(ppo_memory_study._jsonable(payload))
    )
    png = (out / "ppo_memory_study_smoke.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    table = (out / "ppo_memory_study_smoke.md").read_text()
    assert "| corridor-cue | hmem |" in table and "| multiroom | mlp |" in table
    assert "python3 benchmarks/ppo_memory_study.py --smoke --seeds 3" in table
    assert (
        payload["complete"] and payload["command"] == json.loads(json_path.read_text())["command"]
    )


@pytest.mark.parametrize("env", ["corridor-cue", "multiroom"])
@pytest.mark.parametrize("model", MODELS)
def test_study_smoke_curves(smoke_study, env, model):
    _, payload = smoke_study
    # 4 envs x 16 steps (the tiny tasks' longest episode) per batch: 256 frames = 4 batches.
    assert payload["batches"][env] == 4
    run_ = payload["runs"][env][model]["3"]
    assert run_["frames"] == [64, 128, 192, 256]  # the same frames for every model
    for name in (*ppo_memory_study.CURVES, "success_smoothed"):
        curve = run_[name]
        assert len(curve) == payload["batches"][env], name
        assert all(math.isfinite(v) for v in curve), (name, curve)
    assert all(0.0 <= s <= 1.0 for s in run_["success"])
    # Every batch ends >= one episode per env (T = the longest episode), and ClipPPOLoss
    # replays the recurrent cores from their stored states: the first minibatch's KL is 0.
    assert all(abs(k) < 1e-5 for k in run_["kl_first_minibatch"])
    cell = payload["summary"][env][model]
    assert cell["seeds"] == 1 and cell["final_success_std"] == 0.0
    assert math.isfinite(cell["final_success_mean"]) and math.isfinite(cell["final_return_mean"])


def test_study_resume_keeps_finished_runs(smoke_study, capsys):
    out, payload = smoke_study
    common = ["--smoke", "--output-dir", str(out), "--logdir", str(out / "runs")]
    again = ppo_memory_study.main([*common, "--seeds", "3", "--resume"])
    printed = capsys.readouterr().out
    assert printed.count("kept from") == 6  # nothing trained again
    assert json.loads(json.dumps(ppo_memory_study._jsonable(again["runs"]))) == json.loads(
        json.dumps(ppo_memory_study._jsonable(payload["runs"]))
    )
    # A narrower selection would drop finished runs from the file: refused.
    with pytest.raises(SystemExit, match="--resume would drop the runs"):
        ppo_memory_study.main([*common, "--seeds", "3", "--models", "mlp", "--resume"])


def test_study_replot_redraws_from_json(smoke_study):
    out, _ = smoke_study
    json_path = out / "ppo_memory_study_smoke.json"
    before = json_path.read_text()
    for suffix in ("png", "md"):
        (out / f"ppo_memory_study_smoke.{suffix}").unlink()
    ppo_memory_study.main(["--smoke", "--replot", "--output-dir", str(out)])
    assert json_path.read_text() == before  # no run, no rewrite
    assert (out / "ppo_memory_study_smoke.png").stat().st_size > 10_000
    assert "| corridor-cue | gru |" in (out / "ppo_memory_study_smoke.md").read_text()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--threshold", "nowhere=0.5"], "--threshold takes ENV=SUCCESS"),
        (["--seeds", "1", "1"], "--seeds must be distinct"),
        (["--model", "gru"], "--model is set by the study"),
        (["--seed=4"], "--seed is set by the study"),
    ],
)
def test_study_rejects_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit):
        ppo_memory_study.parse_args(argv)
    assert match in capsys.readouterr().err


def test_moving_average_skips_nan():
    out = ppo_memory_study.moving_average([1.0, math.nan, 3.0, 5.0], 2)
    assert out == [1.0, 1.0, 3.0, 4.0]
    assert math.isnan(ppo_memory_study.moving_average([math.nan], 3)[0])


@pytest.mark.parametrize("model", MODELS)
def test_models_share_encoder_and_head_shapes(model):
    base, longest = make_env("corridor-cue", 3, env_kwargs={"length": 2})
    assert longest == 12  # Corridor's cap: 4 * (length + 1)
    modules = make_actor_critic(model, base, width=8)
    env = TransformedEnv(base, modules.transforms)
    data = env.rollout(4, modules.policy, break_when_any_done=False)
    assert data["logits"].shape == (3, 4, 4) and data["state_value"].shape == (3, 4, 1)
    assert len(modules.memories) == (2 if model == "hmem" else 0)
    if model == "gru":  # TorchRL's GRUModule, with its own primer per network
        for prefix in ("gru", "critic_gru"):
            assert data["next", prefix, "recurrent_state"].shape == (3, 4, 1, 8)
    # The same encoder and head around every core: first and last linear layers.
    linears = [m for m in modules.actor.modules() if isinstance(m, torch.nn.Linear)]
    assert linears[0].in_features == base.observation_spec["observation"].shape[-1]
    assert (linears[0].out_features, linears[-1].out_features) == (8, 4)


def test_same_seed_same_curves_and_agent_alias(tmp_path):
    first = run(model="mlp", frames=96, seed=5, logdir=str(tmp_path), no_progress=True, **TINY)
    second = run(model="mlp", frames=96, seed=5, logdir=str(tmp_path), no_progress=True, **TINY)
    for name in ("success", "return", "episode_length", "loss_objective"):
        assert [r[name] for r in first] == [r[name] for r in second]
    # learn_cue_recall.py still drives the script with --agent and --embed-dim.
    args = parse_args(["--agent", "mlp", "--embed-dim", "8"])
    assert (args.model, args.width, args.env) == ("mlp", 8, "cue-recall")


def test_main_runs_each_seed_and_writes_json(tmp_path):
    out = tmp_path / "records.json"
    argv = ["--model", "gru", "--env", "multiroom", "--seeds", "0", "1", "--frames", "32"]
    argv += ["--num-envs", "2", "--epochs", "1", "--width", "8", "--no-progress"]
    argv += ["--env-kwargs", '{"rooms": 2, "room_size": 2, "max_steps": 16}']
    results = ppo_hierarchical.main([*argv, "--logdir", str(tmp_path), "--output", str(out)])
    assert sorted(results) == [0, 1]
    saved = json.loads(out.read_text())
    assert saved["config"]["model"] == "gru" and saved["config"]["seeds"] == [0, 1]
    assert [len(saved["runs"][s]) for s in ("0", "1")] == [1, 1]  # 2 envs x 16 steps = 32 frames


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: make_env("nowhere", 2), ValueError, "env must be one of"),
        (lambda: make_env("corridor-cue", 0), ValueError, "num_envs must be an int >= 1"),
        (
            lambda: make_env("cue-recall", 2, env_kwargs={"length": 3}),
            ValueError,
            "may set num_cues and delay",
        ),
        (
            lambda: make_actor_critic("lstm", make_env("corridor-cue", 1)[0]),
            ValueError,
            "model must be one of",
        ),
        (
            lambda: make_actor_critic(
                "gru", make_env("corridor-cue", 1)[0], memory_kwargs={"immediate_slots": 4}
            ),
            ValueError,
            "memory_kwargs apply to model='hmem' only",
        ),
        (lambda: run(model="mlp", frames=10, colour="red"), TypeError, "unexpected option"),
        (lambda: run(model="mlp", frames=10, epochs=0), ValueError, "--epochs must be >= 1"),
        (lambda: run(model="mlp", frames=1.5), ValueError, "--frames must be an int"),
        (lambda: run(model="lstm"), ValueError, "--model must be one of"),
    ],
)
def test_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--frames", "0"], "--frames must be >= 1"),
        (["--num-envs", "0"], "--num-envs must be >= 1"),
        (["--env-kwargs", "[1, 2]"], "--env-kwargs must be a JSON object"),
        (["--model", "lstm"], "invalid choice"),
    ],
)
def test_example_rejects_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert match in capsys.readouterr().err


def test_example_docstrings():
    torch.manual_seed(0)
    result = doctest.testmod(ppo_hierarchical, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
