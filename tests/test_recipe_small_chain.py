"""The `small` recipe at full architecture sizes, after tokenize (tests/test_recipe_small.py): one step of
train for each stage, and one second of generate, each through the command line. No Ray here: the
tokenized folder is made once per run (tests/conftest.py ``small_recipe``), so this module runs beside the
Ray group under xdist.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(small_recipe, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("recipe_runs")
    for stage in ("semantic", "coarse", "fine"):
        proc = run_cli("train", stage, "--data", small_recipe["data"], "--out", runs / stage, "--config", small_recipe["config"], "--steps", "1", timeout=900)
        assert proc.returncode == 0, f"{stage}: {proc.stderr}"
    return runs


@pytest.mark.parametrize("stage", ["semantic", "coarse", "fine"])
def test_small_trains_one_step_of_each_full_size_stage(runs, stage):
    from musiclm.training.run_folder import load_stage

    model, layout, cfg, _ = load_stage(runs / stage)
    assert (len(model.blocks), cfg.model.d_model, cfg.model.n_heads) == (6, 1024, 8)
    assert model.num_parameters() > 70_000_000
    metrics = [json.loads(line) for line in (runs / stage / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]
    assert np.isfinite(metrics[0]["train/loss"]) and np.isfinite(metrics[0]["val/loss"])


def test_small_generates_one_second(runs):
    out = runs / "one_second.wav"
    proc = run_cli("generate", "a calm piano over soft rain", "--model", runs, "--seconds", "1", "--out", out, timeout=900)
    assert proc.returncode == 0, proc.stderr
    audio, sr = sf.read(out)
    assert sr == 24000 and audio.shape == (24000,)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
