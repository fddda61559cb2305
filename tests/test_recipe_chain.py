"""The `small` recipe and its `open` twin at full architecture sizes, after tokenize (tests/test_recipe_small.py,
tests/test_recipe_open.py): one step of train for each stage and one second of generate, each through the
command line, on one torch thread each (the Ray group's tokenize runs hold the other core). No Ray here:
each tokenized folder is made once per run (tests/conftest.py ``small_recipe``, ``open_recipe``), so this
module runs beside the Ray group under xdist.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

STAGES = ("semantic", "coarse", "fine")


def train_one_step_each(recipe: dict, runs: Path) -> Path:
    """Train every stage for one step on the recipe's tokens into ``runs/<stage>``; returns ``runs``."""
    for stage in STAGES:
        proc = run_cli("train", stage, "--data", recipe["data"], "--out", runs / stage, "--config", recipe["config"], "--steps", "1", timeout=900, threads=1)
        assert proc.returncode == 0, f"{stage}: {proc.stderr}"
    return runs


def check_one_full_size_step(runs: Path, stage: str) -> None:
    """The stage is the preset's 6 x 1024 transformer and logged one finite step of train and held-out loss."""
    from musiclm.training.run_folder import load_stage

    model, layout, cfg, _ = load_stage(runs / stage)
    assert (len(model.blocks), cfg.model.d_model, cfg.model.n_heads) == (6, 1024, 8)
    assert model.num_parameters() > 70_000_000
    metrics = [json.loads(line) for line in (runs / stage / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]
    assert np.isfinite(metrics[0]["train/loss"]) and np.isfinite(metrics[0]["val/loss"])


def check_one_second_of_generate(runs: Path) -> None:
    """``musiclm generate --seconds 1`` writes exactly one second at the codec's 24 kHz, finite and not silent."""
    out = runs / "one_second.wav"
    proc = run_cli("generate", "a calm piano over soft rain", "--model", runs, "--seconds", "1", "--out", out, timeout=900, threads=1)
    assert proc.returncode == 0, proc.stderr
    audio, sr = sf.read(out)
    assert sr == 24000 and audio.shape == (24000,)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0


@pytest.fixture(scope="module", params=["small", "open"])
def runs(request, tmp_path_factory) -> Path:
    """Each stage of the preset's recipe trained one step: ``runs/<stage>``."""
    recipe = request.getfixturevalue(f"{request.param}_recipe")
    return train_one_step_each(recipe, tmp_path_factory.mktemp(f"{request.param}_runs"))


@pytest.mark.parametrize("stage", STAGES)
def test_the_recipe_trains_one_step_of_each_full_size_stage(runs, stage):
    check_one_full_size_step(runs, stage)


def test_the_recipe_generates_one_second(runs):
    check_one_second_of_generate(runs)
