"""ClapMel computes, in torch, the features transformers' ClapFeatureExtractor computes in numpy.

Tolerances: the log-mels agree within TOL_DB = 2e-5 dB (measured: at most 7.6e-6 dB,
one float32 step at 64-128 dB; both sides compute in float64 and round to float32
at the end); the CLAP embeddings of a tiny model within 1e-5 (measured: 1.4e-7).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import ClapFeatureExtractor

from musiclm.config import load_config
from musiclm.models.backbones import load_clap
from musiclm.models.clap_mel import MEL_FLOOR, ClapMel
from musiclm.pipeline.synth import synth_clip
from tests.factories import torch_threads
from tests.pretrained import fixture_dir

TINY = load_config("tiny").tokenize.clap
TOL_DB = 2e-5
TOL_EMBED = 1e-5

EXTRACTORS = {
    "tiny": lambda: ClapFeatureExtractor(**TINY.features),
    "small": lambda: ClapFeatureExtractor.from_pretrained(fixture_dir("clap")),  # laion/larger_clap_music's settings
    "default": lambda: ClapFeatureExtractor(),
}


@pytest.fixture(scope="module", params=sorted(EXTRACTORS))
def features(request) -> ClapFeatureExtractor:
    return EXTRACTORS[request.param]()


def signals(features: ClapFeatureExtractor) -> dict[str, np.ndarray]:
    """Windows at the extractor's rate: full-length ones and short ones that get repeat-padded."""
    n, sr = features.nb_max_samples, features.sampling_rate
    t = np.arange(n) / sr
    noise = 0.1 * np.random.default_rng(0).standard_normal(n)
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    full = {
        "tone": tone,
        "noise": noise,
        "silence": np.zeros(n),
        "quiet tone over loud bass": 1e-3 * np.sin(2 * np.pi * 3000 * t) + 0.9 * np.sin(2 * np.pi * 100 * t),
        "clipped": np.clip(3 * np.sin(2 * np.pi * 55 * t), -1, 1),
        "dc": np.full(n, 0.3),
    }
    short = {
        "noise, a third (tiles exactly)": noise[: n // 3],
        "tone, 0.37 (tiles, then zeros)": tone[: int(0.37 * n)],
        "1000 samples": noise[:1000] + tone[:1000],
    }
    return {k: v.astype(np.float32) for k, v in {**full, **short}.items()}


def hf(features: ClapFeatureExtractor, windows: list[np.ndarray], truncation: str):
    return features(windows, sampling_rate=features.sampling_rate, return_tensors="pt", truncation=truncation, padding="repeatpad")


@pytest.mark.parametrize("truncation", ["rand_trunc", "fusion"])
def test_features_match_the_extractor(features, truncation):
    windows = signals(features)
    ref = hf(features, list(windows.values()), truncation)["input_features"]
    ours = ClapMel(features, truncation)([torch.from_numpy(w) for w in windows.values()])["input_features"]
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == torch.float32
    for i, name in enumerate(windows):
        diff = (ours[i] - ref[i]).abs().max().item()
        assert diff <= TOL_DB, f"{name}: {diff:.2e} dB"


def test_silence_is_clamped_to_minus_100_db(features):
    out = ClapMel(features, "rand_trunc")(torch.zeros(2, features.nb_max_samples))["input_features"]
    assert torch.all(out == 10 * np.log10(MEL_FLOOR))


def test_a_batch_tensor_and_a_list_of_windows_give_the_same_features(features):
    x = torch.from_numpy(np.stack([w for w in signals(features).values() if len(w) == features.nb_max_samples]))
    mel = ClapMel(features, "rand_trunc")
    assert torch.equal(mel(x)["input_features"], mel(list(x))["input_features"])


def test_features_of_a_window_do_not_depend_on_its_batch(features):
    windows = [torch.from_numpy(w) for w in signals(features).values()]
    mel = ClapMel(features, "fusion")
    together = mel(windows)["input_features"]
    reversed_ = mel(windows[::-1])["input_features"].flip(0)
    alone = torch.cat([mel([w])["input_features"] for w in windows])
    assert torch.equal(together, alone) and torch.equal(together, reversed_)


def test_is_longer_is_false_as_the_extractor_says_unless_fusion_flags_one_at_random(features):
    """With "fusion" the extractor flags one window at random as longer when none is (a LAION-CLAP
    habit); ClapMel does not, so an embedding depends neither on chance nor on its batch."""
    windows = list(signals(features).values())[:3]
    torch_windows = [torch.from_numpy(w) for w in windows]
    assert torch.equal(ClapMel(features, "rand_trunc")(torch_windows)["is_longer"], hf(features, windows, "rand_trunc")["is_longer"])
    fused = ClapMel(features, "fusion")(torch_windows)["is_longer"]
    assert fused.shape == (len(windows), 1) and fused.dtype == torch.bool and not fused.any()
    assert hf(features, windows, "fusion")["is_longer"].sum() == 1


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_embeddings_match_those_of_the_extractor_features(fused):
    """A tiny random ClapModel as load_clap builds it for the tiny preset (and a fused variant)."""
    spec = replace(TINY, arch={**TINY.arch, "audio": {**TINY.arch["audio"], "enable_fusion": True}}) if fused else TINY
    clap = load_clap(spec)
    sr, n = clap.sample_rate, clap.features.nb_max_samples
    kinds = ["mix", "chord", "drums", "melody"]
    windows = [synth_clip(k, n / sr, sr, seed)[:n] for seed, k in enumerate(kinds)] + [np.zeros(n), synth_clip("mix", 1.3, sr, 9)]
    windows = [w.astype(np.float32) for w in windows]
    ref = hf(clap.features, windows, clap.truncation)
    ours = ClapMel(clap.features, clap.truncation)([torch.from_numpy(w) for w in windows])
    with torch.no_grad(), torch_threads(2):
        want = clap.model.get_audio_features(input_features=ref["input_features"], is_longer=torch.zeros_like(ref["is_longer"]))
        got = clap.model.get_audio_features(**ours)
        flagged = clap.model.get_audio_features(**ref)  # with the extractor's random "longer" window
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=TOL_EMBED, rtol=0)
    if fused:  # the random flag is not harmless: it moves that window's embedding
        i = int(ref["is_longer"].flatten().nonzero()[0, 0])
        assert (flagged.pooler_output[i] - got.pooler_output[i]).abs().max() > 100 * TOL_EMBED


def test_windows_longer_than_the_extractor_max_are_refused(features):
    mel = ClapMel(features, "rand_trunc")
    with pytest.raises(ValueError, match="longer than"):
        mel(torch.zeros(1, features.nb_max_samples + 1))
    with pytest.raises(ValueError, match="non-empty"):
        mel([torch.zeros(0)])


def test_unknown_truncation_is_refused(features):
    with pytest.raises(ValueError, match="rand_trunc"):
        ClapMel(features, "random_crop")
