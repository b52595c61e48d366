"""examples/curriculum_retention.py in smoke mode, and its retention table."""

import doctest
import json
import math
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(ROOT / "examples"))

import curriculum_retention  # noqa: E402
from curriculum_retention import (  # noqa: E402
    CURRICULUM_ID,
    corridor_states,
    make_curriculum_corridor,
    retention_table,
)

from torchrl_hippo.envs import Corridor, CorridorCurriculum  # noqa: E402


def test_smoke_run_writes_json_and_png(tmp_path):
    argv = ["--frames", "512", "--frames-per-batch", "128", "--num-envs", "4"]
    argv += ["--eval-every", "128", "--lengths", "2", "4", "--window", "4"]
    argv += ["--buffer-size", "300", "--init-frames", "128", "--updates-per-batch", "2"]
    argv += ["--batch-size", "32", "--consolidate-every", "1", "--seeds", "0"]
    argv += ["--out", str(tmp_path), "--name", "retention", "--logdir", "none"]
    study = curriculum_retention.main(argv)
    assert (tmp_path / "retention.png").read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((tmp_path / "retention.json").read_text())
    assert on_disk["lengths"] == [2, 4]
    for kind in ("hippo", "uniform"):
        (run,) = on_disk["runs"][kind]
        curve = run["curve"]
        for key in ("frames", "success_len2", "success_len4", "value_error_len4", "stage"):
            assert len(curve[key]) == 4, key
            assert all(math.isfinite(v) for v in curve[key]), key
        assert all(math.isnan(v) for v in curve["eval_success"])  # probes replace it
        assert 0 <= run["final_stage"] <= 1
        for length in ("2", "4"):
            cell = on_disk["summary"][kind][length]
            assert 0 <= cell["final"] <= cell["peak"] <= 1
            assert 0 <= cell["best_value_error"] <= cell["value_error"]
    assert study["config"]["forgetting"] == "importance"
    assert study["command"].startswith("python examples/curriculum_retention.py --frames 512")


def test_curriculum_env_is_registered():
    env = gym.make(CURRICULUM_ID, lengths=[3, 6], mode="schedule", episodes_per_stage=1)
    env.reset(seed=0)
    assert env.get_wrapper_attr("length") == 3
    for _ in range(3):
        _, reward, terminated, _, _ = env.step(1)
    assert (reward, terminated) == (1.0, True)
    env.reset()
    assert env.get_wrapper_attr("length") == 6  # one episode per stage
    inner = make_curriculum_corridor((3, 6), mode="schedule", episodes_per_stage=1)
    assert isinstance(inner, CorridorCurriculum)
    assert inner.lengths == (3, 6)


def test_corridor_states_match_the_environment():
    env = Corridor(4, noise=0.0)
    observations = [env.reset(seed=0)[0]]
    for _ in range(3):
        observations.append(env.step(1)[0])
    expected = torch.as_tensor(np.stack(observations))
    assert torch.equal(corridor_states(4), expected)


def _run(values_by_length):
    n = len(next(iter(values_by_length.values())))
    curve = {"frames": list(range(n))}
    curve.update({f"success_len{k}": v for k, v in values_by_length.items()})
    return {"curve": curve}


@pytest.mark.parametrize(
    ("values", "final", "peak"),
    [
        ([0, 1, 1, 1, 1, 1, 0, 0], 0.0, 1.0),  # learnt, then forgotten in the last quarter
        ([0, 0, 0, 0, 0, 0, 1, 1], 1.0, 1.0),  # learnt late: no forgetting
        ([0, 0, 0, 0, 0, 0, 1, 0], 0.5, 0.5),
    ],
)
def test_retention_table(values, final, peak):
    table = retention_table(_run({5: values}), [5])
    assert table["5"] == {"final": final, "peak": peak, "forgetting": peak - final}


def test_retention_table_value_error():
    run = _run({5: [1] * 8})
    run["curve"]["value_error_len5"] = [0.5, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.6]
    cell = retention_table(run, [5])["5"]
    assert cell["value_error"] == pytest.approx(0.5)
    assert cell["best_value_error"] == pytest.approx(0.1)


def test_doctests():
    result = doctest.testmod(curriculum_retention)
    assert result.failed == 0 and result.attempted > 0
