"""Synthetic test audio: deterministic, in range, audible, varied; the corpus it writes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import soundfile as sf

from musiclm.pipeline import synth_corpus
from musiclm.pipeline.synth import KINDS, synth_clip
from musiclm.pipeline.synth_corpus import FORMATS, available_formats, corpus_plan, make_bad_files, make_corpus

SR = 16000


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_the_same_samples(kind):
    np.testing.assert_array_equal(synth_clip(kind, 1.5, SR, seed=7), synth_clip(kind, 1.5, SR, seed=7))


@pytest.mark.parametrize("kind", KINDS)
def test_another_seed_gives_other_samples(kind):
    a, b = synth_clip(kind, 1.5, SR, seed=7), synth_clip(kind, 1.5, SR, seed=8)
    assert np.sqrt(np.mean((a - b) ** 2)) > 0.01


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_clip_is_float32_in_range_and_not_silent(kind, channels):
    x = synth_clip(kind, 1.25, 22050, seed=1, channels=channels)
    assert x.dtype == np.float32
    assert x.shape == ((round(1.25 * 22050),) if channels == 1 else (round(1.25 * 22050), channels))
    assert np.isfinite(x).all() and np.abs(x).max() <= 1.0
    assert np.abs(x).max() == pytest.approx(0.9, abs=1e-6)
    assert np.sqrt(np.mean(x**2)) > 0.02
    # Not silent anywhere for long: every quarter second holds sound.
    quarters = x[: len(x) // 5512 * 5512].reshape(-1, 5512, *x.shape[1:])
    assert (np.abs(quarters).reshape(len(quarters), -1).max(axis=1) > 0.01).all()


def test_stereo_clip_pans_voices_apart():
    x = synth_clip("mix", 1.0, SR, seed=2, channels=2)
    assert np.sqrt(np.mean((x[:, 0] - x[:, 1]) ** 2)) > 0.01


def test_different_kinds_differ():
    clips = {kind: synth_clip(kind, 2.0, SR, seed=3) for kind in KINDS}
    spectra = {kind: np.abs(np.fft.rfft(x)) for kind, x in clips.items()}
    for a, b in itertools.combinations(KINDS, 2):
        sa, sb = spectra[a] / np.linalg.norm(spectra[a]), spectra[b] / np.linalg.norm(spectra[b])
        # Cosine similarity of magnitude spectra: same kind of sound would be close to 1.
        assert float(sa @ sb) < 0.9, (a, b)


def test_rain_is_noise_and_tone_is_pitched():
    flatness = {}
    for kind in ("rain", "tone"):
        power = np.abs(np.fft.rfft(synth_clip(kind, 2.0, SR, seed=4))) ** 2 + 1e-12
        flatness[kind] = np.exp(np.mean(np.log(power))) / np.mean(power)
    assert flatness["rain"] > 10 * flatness["tone"]


def test_unknown_kind_and_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="unknown kind"):
        synth_clip("jazz", 1.0, SR, seed=0)
    with pytest.raises(ValueError):
        synth_clip("tone", 0.0, SR, seed=0)


def test_corpus_plan_covers_every_format_rate_encoding_and_channel_count():
    formats = available_formats()
    rates = (16000, 22050, 44100, 48000)
    plan = corpus_plan(12 * len(formats), seconds=(0.4, 1.2), seed=3, formats=formats, rates=rates)
    for suffix in formats:
        container, subtypes, allowed = FORMATS[suffix]
        specs = [s for s in plan if s.relpath.endswith("." + suffix)]
        assert {s.format for s in specs} == {container}
        assert {s.channels for s in specs} == {1, 2}
        expected_rates = set(rates) if allowed is None else {min(allowed, key=lambda a: (abs(a - r), a)) for r in rates}
        assert {s.sample_rate for s in specs} == expected_rates
        assert {(s.subtype, s.sample_rate) for s in specs} == set(itertools.product(subtypes, expected_rates))
    assert {s.relpath.count("/") for s in plan} == {0, 1, 2}
    assert all(0.4 <= s.seconds <= 1.2 for s in plan)


def test_corpus_plan_skips_formats_this_build_cannot_write(monkeypatch):
    without_mp3 = {k: v for k, v in sf.available_formats().items() if k != "MP3"}
    monkeypatch.setattr(synth_corpus.sf, "available_formats", lambda: without_mp3)
    plan = corpus_plan(8, formats=("wav", "mp3", "flac"))
    assert [s.relpath.rsplit(".", 1)[1] for s in plan] == ["wav", "flac"] * 4
    with pytest.raises(ValueError, match="writes none"):
        corpus_plan(2, formats=("mp3",))


def test_make_corpus_writes_the_plan(tmp_path):
    args = dict(n_files=8, seconds=(0.5, 1.0), seed=5, formats=available_formats(("wav", "flac", "ogg", "mp3")))
    paths = make_corpus(tmp_path, **args)
    plan = corpus_plan(**args)
    assert paths == [tmp_path / s.relpath for s in plan]
    for path, spec in zip(paths, plan):
        info = sf.info(path)
        assert (info.format, info.subtype, info.samplerate, info.channels) == (spec.format, spec.subtype, spec.sample_rate, spec.channels)
        assert info.frames == round(spec.seconds * spec.sample_rate)


def test_make_corpus_is_deterministic_by_seed(tmp_path):
    args = dict(n_files=4, seconds=(0.3, 0.6), formats=("wav", "flac"))
    first = make_corpus(tmp_path / "a", seed=1, **args)
    again = make_corpus(tmp_path / "b", seed=1, **args)
    other = make_corpus(tmp_path / "c", seed=2, **args)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]


def test_make_corpus_flat_when_asked(tmp_path):
    paths = make_corpus(tmp_path, 5, seconds=(0.2, 0.3), formats=("wav",), subfolders=False, stereo_every=0)
    assert all(p.parent == tmp_path for p in paths)
    assert all(sf.info(p).channels == 1 for p in paths)


def test_make_bad_files_writes_each_kind_of_bad_file(tmp_path):
    bad = make_bad_files(tmp_path)
    assert set(bad) == {"empty", "truncated_data", "truncated_header", "truncated_flac", "no_frames", "random_bytes", "text", "directory"}
    assert bad["directory"].is_dir() and bad["directory"].name == "x.wav"
    assert bad["empty"].stat().st_size == 0
    assert bad["text"].suffix == ".mp3" and bad["random_bytes"].suffix == ".flac"
    assert all(p.parent == tmp_path for p in bad.values())
