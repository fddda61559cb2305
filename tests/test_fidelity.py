"""The small preset feeds each pretrained backbone what its checkpoint expects, and the README's
rate table holds for those checkpoints.

The checkpoints are rebuilt offline from their real configs (tests/fixtures/pretrained, sources in
SOURCES.md there) at random weights, saved, and loaded through the project's own path
(``load_clap``/``load_semantic``/``load_codec`` on a local folder, then ``Tokenizer``). Random weights
change what the features mean, not their shapes, rates or preprocessing, which is what is tested.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from musiclm.config import load_config
from musiclm.errors import UserError
from musiclm.models.semantic import load_semantic
from musiclm.pipeline.synth import synth_clip
from musiclm.pipeline.tokenizer import Tokenizer
from tests.pretrained import fixture_json, standin_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = load_config("small").tokenize

CLAP_CONFIG = fixture_json("clap")
CLAP_FEATURES = fixture_json("clap", "preprocessor_config.json")
CLAP_TEXT = fixture_json("clap", "tokenizer_config.json")
MERT_CONFIG = fixture_json("mert")
MERT_FEATURES = fixture_json("mert", "preprocessor_config.json")
ENCODEC_CONFIG = fixture_json("encodec")
ENCODEC_FEATURES = fixture_json("encodec", "preprocessor_config.json")


def readme_table() -> dict[str, list[str]]:
    """The rate table near the top of README.md: stream name → its cells."""
    rows: dict[str, list[str]] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in ("clap", "semantic", "acoustic") and cells[0] not in rows:
            rows[cells[0]] = cells
    assert set(rows) == {"clap", "semantic", "acoustic"}, "README.md lost its rate table"
    return rows


def readme_number(stream: str, pattern: str) -> float:
    """The number that ``pattern`` (one group) finds in the README row of ``stream``."""
    row = " | ".join(readme_table()[stream])
    m = re.search(pattern, row)
    assert m, f"README row '{stream}' has no match for {pattern!r}: {row}"
    return float(m.group(1))


def clip(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    return synth_clip("mix", seconds, sr, seed)


@pytest.fixture(scope="module")
def tok(pretrained_standins) -> Tokenizer:
    """The small preset's tokenizer backbones, loaded from the stand-in folders as from hub ids."""
    return Tokenizer.from_config(standin_config(pretrained_standins).tokenize)


# ---- what the checkpoints' own files say ---------------------------------------------------------
def test_small_preset_names_the_checkpoints_the_fixtures_hold():
    assert (SMALL.clap.model, SMALL.semantic.model, SMALL.codec.model) == (
        "laion/larger_clap_music",
        "m-a-p/MERT-v0",
        "facebook/encodec_24khz",
    )


def test_checkpoints_take_48_16_and_24_khz():
    assert CLAP_FEATURES["sampling_rate"] == 48000
    assert MERT_FEATURES["sampling_rate"] == MERT_CONFIG["sample_rate"] == 16000
    assert ENCODEC_CONFIG["sampling_rate"] == ENCODEC_FEATURES["sampling_rate"] == 24000


def test_clap_window_of_small_is_the_feature_extractors_max_length():
    sr = CLAP_FEATURES["sampling_rate"]
    assert SMALL.clap.window_seconds == CLAP_FEATURES["max_length_s"]
    assert SMALL.clap.window_seconds * sr == CLAP_FEATURES["nb_max_samples"]


def test_larger_clap_music_is_unfused_and_truncates_at_random_padding_by_repetition():
    assert not CLAP_CONFIG["audio_config"].get("enable_fusion", False)
    assert CLAP_FEATURES["truncation"] == "rand_trunc"
    assert CLAP_FEATURES["padding"] == "repeatpad"


def test_mert_v0_normalises_its_input_and_has_12_layers_so_layer_7_exists():
    assert MERT_FEATURES["do_normalize"] is True
    assert MERT_CONFIG["num_hidden_layers"] == 12
    assert 0 <= SMALL.semantic.layer <= MERT_CONFIG["num_hidden_layers"]


def test_encodec_24khz_keeps_8_codebooks_at_6_kbps():
    c = ENCODEC_CONFIG
    frame_rate = c["sampling_rate"] / np.prod(c["upsampling_ratios"])  # 24000 / 320 = 75 Hz
    kbps_per_codebook = frame_rate * np.log2(c["codebook_size"]) / 1000
    assert SMALL.codec.num_quantizers * kbps_per_codebook in c["target_bandwidths"]
    assert not c["normalize"] and c["chunk_length_s"] is None  # what load_codec accepts


# ---- the project's own loading path on the rebuilt checkpoints ---------------------------------------
@pytest.mark.slow
def test_project_takes_audio_at_each_checkpoints_sample_rate(tok):
    assert tok.clap.sample_rate == CLAP_FEATURES["sampling_rate"]
    assert tok.semantic.sample_rate == MERT_FEATURES["sampling_rate"]
    assert tok.codec.sample_rate == ENCODEC_CONFIG["sampling_rate"]
    assert tok.sample_rates == (16000, 24000, 48000)


@pytest.mark.slow
def test_clap_truncation_and_padding_are_the_checkpoints_own(tok):
    assert tok.clap.truncation == CLAP_FEATURES["truncation"] == tok.clap.features.truncation
    assert tok.clap.features.padding == "repeatpad"  # what clap_audio_embed passes
    assert tok.clap.features.nb_max_samples == SMALL.clap.window_seconds * tok.clap.sample_rate


@pytest.mark.slow
def test_clap_embeds_a_short_clip_as_the_checkpoints_own_preprocessing_does(tok):
    x = clip(3.0, 48000)
    ours = tok.clap_audio_embed([x])
    feats = tok.clap.features([x], sampling_rate=48000, return_tensors="pt")  # the preprocessor's defaults
    with torch.inference_mode():
        theirs = tok.clap.model.get_audio_features(**feats).pooler_output
    torch.testing.assert_close(ours, torch.nn.functional.normalize(theirs, dim=-1))


@pytest.mark.slow
def test_clap_gives_one_embedding_per_window_of_the_readme_window_and_hop(tok):
    window = readme_number("clap", r"(\d+(?:\.\d+)?) s windows")
    hop = readme_number("clap", r"(\d+(?:\.\d+)?) s hop")
    dim = readme_number("clap", r"\[W, (\d+)\]`? embedding")
    assert (SMALL.clap.window_seconds, SMALL.clap.hop_seconds) == (window, hop)
    windows = tok.clap_windows(clip(window + hop, 48000))  # 15 s: windows at 0 s and 5 s
    emb = tok.clap_audio_embed(windows)
    assert emb.shape == (2, dim) == (2, tok.clap.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


@pytest.mark.slow
def test_clap_text_stand_in_keeps_robertas_special_ids_and_length(tok):
    text, cfg = tok.clap.text_tokenizer, tok.clap.model.config.text_config
    assert text.pad_token_id == cfg.pad_token_id == 1  # RoBERTa positions count from the pad id
    assert (text.bos_token_id, text.eos_token_id) == (0, 2)
    assert text.model_max_length == CLAP_TEXT["model_max_length"] == cfg.max_position_embeddings - 2
    ids = text(["a calm piano over soft rain", "Déjà vu — 東京"], padding=True)["input_ids"]
    assert max(max(row) for row in ids) < cfg.vocab_size
    assert tok.clap_text_embed(["a calm piano over soft rain"]).shape == (1, tok.clap.embed_dim)


@pytest.mark.slow
def test_mert_features_follow_the_checkpoints_normalisation_flag(tok):
    x = clip(1.0, 16000)
    fe = tok.semantic.features
    for do_normalize in (True, False):
        fe.do_normalize = do_normalize
        try:
            ours = tok.semantic_features(x)
            inputs = fe(x, sampling_rate=16000, return_tensors="pt")
            with torch.inference_mode():
                theirs = tok.semantic.model(inputs["input_values"], output_hidden_states=True).hidden_states[SMALL.semantic.layer]
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
            quieter = tok.semantic_features(0.1 * x)
            assert torch.allclose(ours, quieter, atol=1e-3) == do_normalize  # gain drops out only when normalised
        finally:
            fe.do_normalize = MERT_FEATURES["do_normalize"]


@pytest.mark.slow
def test_mert_v0_gives_the_readme_rate_of_frames_per_second_from_layer_7_of_13_hidden_states(tok, pretrained_standins):
    from transformers import HubertModel

    rate = readme_number("semantic", r"(\d+) Hz")
    x = clip(3.0, 16000)
    full = HubertModel.from_pretrained(pretrained_standins["mert"]).eval()
    with torch.inference_mode():
        hidden = full(**tok.semantic.inputs(x), output_hidden_states=True).hidden_states
    assert len(hidden) == MERT_CONFIG["num_hidden_layers"] + 1  # the encoder input, then one per transformer layer
    feats = hidden[SMALL.semantic.layer]
    # the tokenizer runs layers 1..8 of 12 only (models/semantic.py), and reads the same layer 7
    assert len(tok.semantic.model.encoder.layers) == SMALL.semantic.layer + 1
    torch.testing.assert_close(tok.semantic_features(x), feats, rtol=0, atol=0)
    assert feats.shape[-1] == MERT_CONFIG["hidden_size"]
    assert abs(feats.shape[1] - 3 * rate) <= 1  # 149 frames: a 400-sample receptive field at a 320-sample hop
    assert tok.semantic.frame_rate == rate == tok.streams()["semantic"]["frame_rate"]


@pytest.mark.slow
def test_a_mert_layer_beyond_the_checkpoints_12_is_refused(pretrained_standins):
    folder = str(pretrained_standins["mert"])
    assert load_semantic(replace(SMALL.semantic, model=folder, layer=12)).layer == 12
    with pytest.raises(UserError, match="has 12 layers"):
        load_semantic(replace(SMALL.semantic, model=folder, layer=13))


@pytest.mark.slow
def test_mert_v0_as_its_hub_config_now_reads_still_loads_as_a_hubert_model(pretrained_standins, tok, tmp_path):
    """The hub's MERT-v0 config later became remote code (commit 7a16d1f: model_type "mert_model",
    an auto_map to modeling_MERT.py); HubertModel reads it all the same, without trust_remote_code."""
    saved = Path(pretrained_standins["mert"])
    for f in saved.iterdir():
        (tmp_path / f.name).symlink_to(f)
    cfg = json.loads((saved / "config.json").read_text())
    cfg.update(
        _name_or_path="m-a-p/MERT-v0",
        architectures=["MERTModel"],
        model_type="mert_model",
        auto_map={"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
    )
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    mert = load_semantic(replace(SMALL.semantic, model=str(tmp_path)))
    assert type(mert.model).__name__ == "HubertModel" and mert.sample_rate == 16000
    x = torch.from_numpy(clip(1.0, 16000))[None]
    with torch.inference_mode():
        torch.testing.assert_close(mert.model(x).last_hidden_state, tok.semantic.model(x).last_hidden_state)


@pytest.mark.slow
def test_encodec_keeps_the_readme_codebooks_at_the_readme_bandwidth_and_frame_rate(tok):
    kbps = readme_number("acoustic", r"(\d+(?:\.\d+)?) kbps")
    q = readme_number("acoustic", r"\[(\d+), T_a\]")
    rate = readme_number("acoustic", r"(\d+) Hz")
    assert tok.codec.bandwidth == kbps and SMALL.codec.num_quantizers == q
    x = torch.from_numpy(clip(1.0, 24000))[None]
    with torch.inference_mode():
        codes = tok.codec.model.encode(tok.codec.model_input(x), bandwidth=tok.codec.bandwidth).audio_codes[0]
    assert codes.shape == (1, q, rate)  # the model itself keeps exactly Q codebooks at that bandwidth
    two = tok.encode_acoustic(clip(2.0, 24000))
    assert two.shape == (1, q, 2 * rate)
    assert tok.codec.frame_rate == rate == tok.streams()["acoustic"]["frame_rate"]


@pytest.mark.slow
def test_encodec_gets_mono_input_as_its_feature_extractor_gives_it(tok):
    x = torch.from_numpy(clip(0.5, 24000))[None]  # [B, samples]
    assert tok.codec.model_input(x).shape == (1, ENCODEC_FEATURES["feature_size"], 12000)
    assert ENCODEC_FEATURES["feature_size"] == ENCODEC_CONFIG["audio_channels"] == 1


@pytest.mark.slow
def test_encodec_codes_vary_at_every_level_and_decode_to_the_input_length(tok):
    codes = tok.encode_acoustic(clip(2.0, 24000, seed=5))[0]  # [Q, T_a]
    vocab = readme_number("acoustic", r"(\d+) per level")
    assert int(codes.max()) < vocab == tok.codec.codebook_size
    assert all(len(torch.unique(level)) > 1 for level in codes), "stand-in codebooks were not fitted"
    assert tok.decode_acoustic(codes).shape == (1, 2 * 24000)
