"""Fidelity to the `open` preset's two new checkpoints, without downloading them: w2v-BERT 2.0 (the
semantic model) and DAC 24 kHz (the codec).

Their real config and preprocessor files are in tests/fixtures/pretrained/ (SOURCES.md there says where
each comes from). Each is built at random weights from those files, saved, and loaded back through the
project's own loaders (``load_semantic`` / ``load_codec`` on a local folder, the call a hub id takes),
then checked against what the checkpoint itself says and does: sample rates, frames per second,
codebooks, our preprocessing against its own feature extractor, and DAC's encode → decode lengths to
the sample. Random weights change none of these.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from musiclm.config import load_config
from musiclm.errors import UserError
from musiclm.models.codec import load_codec
from musiclm.models.semantic import load_semantic
from musiclm.pipeline.synth import synth_clip
from tests.pretrained import fixture_dir, fixture_json

pytestmark = pytest.mark.slow  # w2v-BERT 2.0 at full size: 2.3 GB saved once per run

OPEN = load_config("open").tokenize
W2V_CONFIG = fixture_json("w2v-bert")
W2V_FEATURES = fixture_json("w2v-bert", "preprocessor_config.json")
DAC_CONFIG = fixture_json("dac")


def clip(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    return synth_clip("mix", seconds, sr, seed)


@pytest.fixture(scope="module")
def semantic(pretrained_standins):
    return load_semantic(replace(OPEN.semantic, model=str(pretrained_standins["w2v-bert"])))


@pytest.fixture(scope="module")
def codec(pretrained_standins):
    return load_codec(replace(OPEN.codec, model=str(pretrained_standins["dac"])))


def test_the_open_preset_names_the_two_checkpoints_and_clap():
    assert (OPEN.clap.model, OPEN.semantic.model, OPEN.codec.model) == ("laion/larger_clap_music", "facebook/w2v-bert-2.0", "descript/dac_24khz")
    small = load_config("small")
    assert OPEN.audio == small.tokenize.audio and load_config("open").stages == small.stages and load_config("open").model == small.model


# ---- w2v-BERT 2.0 ----------------------------------------------------------------------------------
def test_w2v_bert_config_pins_its_shape_and_its_input():
    assert W2V_CONFIG["model_type"] == "wav2vec2-bert" and W2V_CONFIG["architectures"] == ["Wav2Vec2BertModel"]
    assert (W2V_CONFIG["num_hidden_layers"], W2V_CONFIG["hidden_size"]) == (24, 1024)
    # 80 log-mel bins stacked in pairs: the feature projection takes 160
    assert W2V_FEATURES["feature_extractor_type"] == "SeamlessM4TFeatureExtractor"
    assert W2V_CONFIG["feature_projection_input_dim"] == W2V_FEATURES["num_mel_bins"] * W2V_FEATURES["stride"] == 160
    assert W2V_FEATURES["sampling_rate"] == 16000 and 0 <= OPEN.semantic.layer < W2V_CONFIG["num_hidden_layers"]


def test_w2v_bert_loads_through_our_loader_at_50_frames_per_second(semantic):
    assert type(semantic.model).__name__ == "Wav2Vec2BertModel" and type(semantic.features).__name__ == "SeamlessM4TFeatureExtractor"
    assert semantic.sample_rate == 16000 and semantic.frame_rate == 50
    assert len(semantic.model.encoder.layers) == OPEN.semantic.layer + 1  # layers 1..8 of 24 run; 9..24 are never read
    with torch.inference_mode():
        for seconds, frames in ((1.0, 49), (20.0, 999), (2.5, 124)):  # 25 ms windows every 10 ms, in pairs
            assert semantic.hidden(semantic.inputs(clip(seconds, 16000))).shape == (1, frames, 1024)


def test_w2v_bert_preprocessing_is_the_checkpoints_own_feature_extractor(semantic):
    from transformers import SeamlessM4TFeatureExtractor

    theirs = SeamlessM4TFeatureExtractor.from_pretrained(fixture_dir("w2v-bert"))
    assert semantic.features.to_dict() == theirs.to_dict()
    x = np.stack([clip(3.0, 16000, 0), clip(3.0, 16000, 1)])
    ours = semantic.inputs(x)
    ref = theirs(list(x), sampling_rate=16000, return_tensors="pt")
    torch.testing.assert_close(ours["input_features"], ref["input_features"], rtol=0, atol=0)
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    # per-bin normalisation: each clip's features have zero mean and unit variance per bin (before stacking)
    bins = ours["input_features"][0].reshape(-1, 80)
    torch.testing.assert_close(bins.mean(0), torch.zeros(80), atol=1e-4, rtol=0)


def test_w2v_bert_layer_7_of_the_cut_model_is_the_full_models(semantic, pretrained_standins):
    from transformers import Wav2Vec2BertModel

    full = Wav2Vec2BertModel.from_pretrained(pretrained_standins["w2v-bert"]).eval()
    x = clip(2.0, 16000)
    inputs = semantic.inputs(x)
    with torch.inference_mode():
        hidden = full(**inputs, output_hidden_states=True).hidden_states
        ours = semantic.hidden(inputs)
    assert len(hidden) == 25
    torch.testing.assert_close(ours, hidden[OPEN.semantic.layer], rtol=0, atol=0)
    assert not torch.allclose(ours, hidden[OPEN.semantic.layer + 1])  # the layer index matters


def test_a_w2v_bert_layer_beyond_24_is_refused(pretrained_standins):
    with pytest.raises(UserError, match="tokenize.semantic.layer = 25 but the semantic model has 24 layers"):
        load_semantic(replace(OPEN.semantic, model=str(pretrained_standins["w2v-bert"]), layer=25))


# ---- DAC 24 kHz ------------------------------------------------------------------------------------
def test_dac_config_pins_rate_hop_and_codebooks():
    assert DAC_CONFIG["model_type"] == "dac" and DAC_CONFIG["sampling_rate"] == 24000
    assert np.prod(DAC_CONFIG["downsampling_ratios"]) == 320  # 75 Hz
    assert DAC_CONFIG["hop_length"] == 512  # a leftover of the 44.1 kHz default that the loader must not read
    assert (DAC_CONFIG["n_codebooks"], DAC_CONFIG["codebook_size"]) == (32, 1024)


def test_dac_loads_at_75_hz_with_8_of_its_32_codebooks(codec):
    assert type(codec.model).__name__ == "DacModel"
    assert (codec.sample_rate, codec.hop, codec.frame_rate, codec.codebook_size) == (24000, 320, 75, 1024)
    assert codec.num_quantizers == OPEN.codec.num_quantizers == 8 and OPEN.codec.coarse_quantizers == 3
    assert codec.bandwidth == 6.0  # 8 codebooks x 10 bits x 75 Hz


@pytest.mark.parametrize("samples", [24000, 60000, 24000 * 2 + 100])
def test_dac_encode_decode_lengths_are_exact_to_the_sample(codec, samples):
    x = torch.from_numpy(clip(samples / 24000, 24000))[None]
    assert x.shape[-1] == samples
    with torch.inference_mode():
        codes = codec.encode(x)
        frames = samples // 320
        assert codes.shape == (1, 8, frames) and codes.dtype == torch.int64 and int(codes.max()) < 1024
        audio = codec.decode(codes)
        raw = codec.model.decode(audio_codes=codes).audio_values
    assert audio.shape == (1, frames * 320)
    assert raw.shape[-1] == frames * 320 - 8  # what DAC's transposed convolutions give
    torch.testing.assert_close(audio[:, : raw.shape[-1]], raw, rtol=0, atol=0)
    assert torch.equal(audio[:, raw.shape[-1] :], raw[:, -1:].expand(-1, 8))  # the tail repeats the last sample


def test_dacs_first_8_codebooks_are_the_first_8_of_all_32(codec):
    """Residual levels are chosen one after another, so the 8 kept are exactly the 8 that the 24 kbps code starts with."""
    x = torch.from_numpy(clip(1.0, 24000))[None, None]
    with torch.inference_mode():
        all_32 = codec.model.encode(x).audio_codes
        ours = codec.encode(x[:, 0])
    assert all_32.shape[1] == 32 and torch.equal(ours, all_32[:, :8])


def test_more_dac_codebooks_than_it_has_are_refused(pretrained_standins):
    with pytest.raises(UserError, match="DAC model .* has 32 codebooks: tokenize.codec.num_quantizers = 33 must be 1..32"):
        load_codec(replace(OPEN.codec, model=str(pretrained_standins["dac"]), num_quantizers=33))
