"""The `open` recipe, the `small` recipe's twin with no non-commercial backbone: CLAP, w2v-BERT 2.0 and DAC
24 kHz at full size, tokenize and stats here (Ray); train and generate in tests/test_recipe_chain.py.

The backbones are the three checkpoints rebuilt from their real configs at random weights
(tests/pretrained.py, tests/fixtures/pretrained/SOURCES.md); vocabularies are reduced as in the `small`
recipe test (tests/test_recipe_small.py), over the same 40 s of synthesised music (CLAP 12 x 4 codes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from musiclm.config import load_config
from musiclm.hub.card import backbone_licence
from musiclm.shards.format import list_shards
from musiclm.shards.tokenizer_folder import read_record
from tests.conftest import run_cli
from tests.test_tokenize import read_samples

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # tests/conftest.py: the recipe starts Ray (its tokenize run)


def test_the_open_preset_has_no_non_commercial_backbone():
    t = load_config("open").tokenize
    for name in ("clap", "semantic", "codec"):
        lic = backbone_licence(getattr(t, name).model)
        assert lic.non_commercial is False and lic.spdx in ("apache-2.0", "mit") and lic.source.startswith("https://"), name
    small = load_config("small").tokenize
    assert backbone_licence(small.semantic.model).non_commercial  # MERT: what `open` replaces


def test_the_recipe_config_is_the_open_preset_with_reduced_vocabularies(open_recipe):
    preset, mine = load_config("open"), load_config(path=open_recipe["config"])
    assert mine.model == preset.model == load_config("small").model and mine.stages == preset.stages
    assert mine.tokenize.audio == preset.tokenize.audio == load_config("small").tokenize.audio  # one corpus, both ways
    assert (mine.tokenize.codec.num_quantizers, mine.tokenize.codec.coarse_quantizers) == (8, 3)


def test_open_tokenize_writes_full_size_streams_from_w2v_bert_and_dac(open_recipe):
    record = read_record(open_recipe["data"] / "tokenizer")
    assert {name: entry["class"] for name, entry in record["backbones"].items()} == {
        "clap": "ClapModel",
        "semantic": "Wav2Vec2BertModel",
        "codec": "DacModel",
    }
    streams = record["streams"]
    assert streams["semantic"]["frame_rate"] == 50 and streams["semantic"]["sample_rate"] == 16000 and streams["semantic"]["layer"] == 7
    acoustic = streams["acoustic"]
    assert (acoustic["frame_rate"], acoustic["levels"], acoustic["codebook_size"], acoustic["sample_rate"]) == (75, 8, 1024, 24000)
    assert acoustic["coarse_levels"] == 3 and acoustic["bandwidth"] == 6.0
    assert "codec" not in record["fit"]["points"], "DAC's codebooks are its own: only Encodec built offline learns them"
    samples = read_samples(open_recipe["data"])
    assert len(samples) == 2 and len(list_shards(open_recipe["data"])) == 1
    assert record["fit"]["points"]["clap"] == {"points": 22, "codes": 4, "points_per_code": 5.5}  # 2 files x 11 windows
    for s in samples:
        assert s.semantic.shape == (999,)  # 20 s: 1998 windows of 25 ms every 10 ms, stacked in pairs
        assert s.acoustic.shape == (8, 1500)  # 20 s at 75 Hz
        assert s.clap.shape == (3, 12) and s.clap_emb.shape == (3, 512)
        assert len(np.unique(s.acoustic[0])) > 1 and len(np.unique(s.semantic)) > 1


def test_open_stats(open_recipe):
    proc = run_cli("stats", open_recipe["data"], "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["totals"]["clips"] == 2
    assert summary["streams"]["acoustic"]["levels"][0]["codebook_size"] == 1024
