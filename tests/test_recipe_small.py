"""The `small` recipe, end to end, at its full architecture sizes: tokenize and stats here (Ray), one step of
train for each stage and one second of generate in tests/test_recipe_chain.py, each through the
command line.

The backbones are the small preset's checkpoints (CLAP `laion/larger_clap_music`, MERT-v0,
Encodec 24 kHz) rebuilt from their real configs at random weights (tests/pretrained.py); the
three stages are the preset's 6 x 1024 transformers. Only the vocabularies are reduced, as the
corpus requires: 40 s of synthesised music give 22 CLAP windows at the 1 s fit hop, so CLAP is
12 x 4 codes and semantic 64 codes at 4 points per code (the shipped preset: 12 x 1024 and
1024 at 50 points per code, about 17.6 h of audio; benchmarks/recipe_small.py runs it longer).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from musiclm.config import load_config
from musiclm.shards.tokenizer_folder import read_record
from musiclm.shards.format import list_shards
from tests.conftest import run_cli
from tests.test_tokenize import read_samples

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # tests/conftest.py: the recipe starts Ray (its tokenize run)


def test_the_recipe_config_is_the_small_preset_with_reduced_vocabularies(small_recipe):
    small, mine = load_config("small"), load_config(path=small_recipe["config"])
    assert mine.model == small.model and mine.stages == small.stages
    assert (small.model.n_layers, small.model.d_model, small.model.n_heads) == (6, 1024, 8)
    assert mine.tokenize.audio == small.tokenize.audio


def test_small_tokenize_writes_full_size_streams(small_recipe):
    record = read_record(small_recipe["data"] / "tokenizer")
    streams = record["streams"]
    assert streams["semantic"]["frame_rate"] == 50 and streams["semantic"]["sample_rate"] == 16000
    assert streams["acoustic"]["frame_rate"] == 75 and streams["acoustic"]["levels"] == 8 and streams["acoustic"]["codebook_size"] == 1024
    assert streams["clap"]["sample_rate"] == 48000 and streams["clap"]["embed_dim"] == 512 and streams["clap"]["window_seconds"] == 10
    fit = record["fit"]
    assert fit["points"]["clap"] == {"points": 22, "codes": 4, "points_per_code": 5.5}  # 2 files x 11 windows of 10 s at a 1 s hop
    assert fit["points"]["semantic"]["points"] >= 64 * 4
    assert "the vocabularies need about" in small_recipe["log"]
    shards = list_shards(small_recipe["data"])
    assert len(shards) == 1  # the two files are one planned batch, and shards close only between batches
    samples = read_samples(small_recipe["data"])
    assert len(samples) == 2
    for s in samples:
        assert s.semantic.shape == (999,)  # 20 s at 50 Hz, less MERT's unpadded 25 ms receptive field
        assert s.acoustic.shape == (8, 1500)  # 20 s at 75 Hz
        assert s.clap.shape == (3, 12) and s.clap_emb.shape == (3, 512)  # 10 s windows every 5 s
        assert len(np.unique(s.acoustic[0])) > 1, "Encodec codes vary: its codebooks were fitted on audio"


def test_small_stats(small_recipe):
    proc = run_cli("stats", small_recipe["data"], "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["totals"]["clips"] == 2
    assert summary["streams"]["acoustic"]["levels"][0]["codebook_size"] == 1024
    assert summary["fit"]["points"]["clap"]["codes"] == 4
