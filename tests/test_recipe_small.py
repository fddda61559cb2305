"""The `small` recipe, end to end, at its full architecture sizes: tokenize, stats, one step of
train for each stage, and one second of generate, each through the command line.

The backbones are the small preset's checkpoints (CLAP `laion/larger_clap_music`, MERT-v0,
Encodec 24 kHz) rebuilt from their real configs at random weights (tests/pretrained.py); the
three stages are the preset's 6 x 1024 transformers. Only the vocabularies are reduced, as the
corpus requires: 80 s of synthesised music give 44 CLAP windows at the 1 s fit hop, so CLAP is
12 x 8 codes and semantic 64 codes at 4 points per code (the shipped preset: 12 x 1024 and
1024 at 50 points per code, about 17.6 h of audio; benchmarks/recipe_small.py runs it longer).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from musiclm.config import load_config
from musiclm.shards.tokenizer_folder import read_record
from musiclm.shards.format import list_shards
from tests.conftest import run_cli
from tests.test_tokenize import read_samples

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # tests/conftest.py: the recipe starts Ray (its tokenize run)

RECIPE = """\
# the small preset with its checkpoints replaced by local stand-ins, vocabularies reduced for 80 s of audio
base = "small"

[tokenize]
shard_size = 2

[tokenize.clap]
model = "{clap}"
codebook_size = 8

[tokenize.mert]
model = "{mert}"
codebook_size = 64

[tokenize.encodec]
model = "{encodec}"

[tokenize.fit]
min_points_per_code = 4
niter = 5

[train]
batch_size = 1
warmup_steps = 1
eval_every = 1
eval_batches = 1
save_every = 1
num_workers = 0
"""


@pytest.fixture(scope="module")
def recipe(pretrained_standins, tmp_path_factory) -> dict[str, Path]:
    """The corpus tokenized with the full-size small backbones: {"config", "data", "work"}."""
    from musiclm.pipeline.synth_corpus import make_corpus

    work = tmp_path_factory.mktemp("recipe")
    make_corpus(work / "music", 4, seconds=(20.0, 20.0), seed=3)
    config = work / "recipe.toml"
    config.write_text(RECIPE.format(**{name: pretrained_standins[name].as_posix() for name in ("clap", "mert", "encodec")}))
    data = work / "data"
    proc = run_cli("tokenize", work / "music", "--out", data, "--config", config, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return {"config": config, "data": data, "work": work, "log": proc.stderr}


def test_the_recipe_config_is_the_small_preset_with_reduced_vocabularies(recipe):
    small, mine = load_config("small"), load_config(path=recipe["config"])
    assert mine.model == small.model and mine.stages == small.stages
    assert (small.model.n_layers, small.model.d_model, small.model.n_heads) == (6, 1024, 8)
    assert mine.tokenize.audio == small.tokenize.audio


def test_small_tokenize_writes_full_size_streams(recipe):
    record = read_record(recipe["data"] / "tokenizer")
    streams = record["streams"]
    assert streams["semantic"]["frame_rate"] == 50 and streams["semantic"]["sample_rate"] == 16000
    assert streams["acoustic"]["frame_rate"] == 75 and streams["acoustic"]["levels"] == 8 and streams["acoustic"]["codebook_size"] == 1024
    assert streams["clap"]["sample_rate"] == 48000 and streams["clap"]["embed_dim"] == 512 and streams["clap"]["window_seconds"] == 10
    fit = record["fit"]
    assert fit["points"]["clap"] == {"points": 44, "codes": 8, "points_per_code": 5.5}  # 4 files x 11 windows of 10 s at a 1 s hop
    assert fit["points"]["semantic"]["points"] >= 64 * 4
    assert "the vocabularies need about" in recipe["log"]
    shards = list_shards(recipe["data"])
    assert len(shards) == 1  # the four files are one planned batch, and shards close only between batches
    samples = read_samples(recipe["data"])
    assert len(samples) == 4
    for s in samples:
        assert s.semantic.shape == (999,)  # 20 s at 50 Hz, less MERT's unpadded 25 ms receptive field
        assert s.acoustic.shape == (8, 1500)  # 20 s at 75 Hz
        assert s.clap.shape == (3, 12) and s.clap_emb.shape == (3, 512)  # 10 s windows every 5 s
        assert len(np.unique(s.acoustic[0])) > 1, "Encodec codes vary: its codebooks were fitted on audio"


def test_small_stats(recipe):
    proc = run_cli("stats", recipe["data"], "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["totals"]["clips"] == 4
    assert summary["streams"]["acoustic"]["levels"][0]["codebook_size"] == 1024
    assert summary["fit"]["points"]["clap"]["codes"] == 8


@pytest.fixture(scope="module")
def runs(recipe) -> Path:
    runs = recipe["work"] / "runs"
    for stage in ("semantic", "coarse", "fine"):
        proc = run_cli("train", stage, "--data", recipe["data"], "--out", runs / stage, "--config", recipe["config"], "--steps", "1", timeout=900)
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


def test_small_generates_one_second(runs, recipe):
    out = recipe["work"] / "one_second.wav"
    proc = run_cli("generate", "a calm piano over soft rain", "--model", runs, "--seconds", "1", "--out", out, timeout=900)
    assert proc.returncode == 0, proc.stderr
    audio, sr = sf.read(out)
    assert sr == 24000 and audio.shape == (24000,)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
