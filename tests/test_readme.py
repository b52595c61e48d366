"""Every python block of the README runs as written, and prints what the text says it shows."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


# Each block is recognised by a name it uses; what it must print, and what must exist after it.
#: A block is known by the first of these markers it contains (in this order), then checked.
EXPECTATIONS = {
    "RayCollector": {"prints": ["transitions from workers [0, 1]"]},
    "HippoReplayBuffer": {"prints": ["drawn by retrieval", "consolidation loss"]},
    "save_memory(": {
        "prints": ["['README.md', 'config.json', 'memory.safetensors', 'model.safetensors']"]
    },
    "ChangePointSegmenter(": {"prints": ["episode lengths: [25, 40, 35, 20]"]},
    "MemoryRetrieval(": {"prints": ["retrieved keys (200, 4, 32)"]},
    "memory=rb": {"prints": ["stored keys at distance tensor([0., 0., 0.])"]},
    "make_pixel_dual_encoder(": {"prints": ["torch.uint8", "[5, 40]"]},
    "TorchPrioritizedSampler(": {
        "prints": ["of the draws (1.0% of the rows)", "after the update: 0.0%"]
    },
    "set_query": {"prints": ["transitions in", "items drawn by retrieval"]},
    "ConsolidationHook": {"prints": ["nn_return_consistency"], "files": ["png"]},
}


def _block_id(block: str) -> str:
    for name in EXPECTATIONS:
        if name in block:
            return name
    return block.strip().splitlines()[0][:40]


def test_readme_has_python_blocks():
    assert python_blocks(), "README.md has no python block"
    found = {_block_id(b) for b in python_blocks()}
    assert set(EXPECTATIONS) <= found, f"README blocks missing: {set(EXPECTATIONS) - found}"


@pytest.mark.slow
@pytest.mark.parametrize("block", python_blocks(), ids=_block_id)
def test_block_runs(block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # blocks may write logs or plots
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    logger = namespace.get("logger")
    if logger is not None and hasattr(logger, "experiment"):
        logger.experiment.close()
    out = capsys.readouterr().out
    expect = EXPECTATIONS.get(_block_id(block), {})
    for text in expect.get("prints", []):
        assert text in out
    for name in expect.get("files", []):
        assert Path(namespace[name]).exists()
