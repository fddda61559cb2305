"""Audio in: listing, probing, reading mono segments, resampling, writing."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import soundfile as sf

from musiclm.errors import UserError
from musiclm.pipeline.audio import (
    AudioError,
    AudioInfo,
    list_audio_files,
    load_for_rates,
    plan_segments,
    probe,
    read_mono,
    resample,
)
from musiclm.pipeline.audio_out import write_audio
from musiclm.pipeline.synth_corpus import available_formats, corpus_plan, make_bad_files, make_corpus

# Every format this libsndfile build writes, 12 files each: each WAV encoding meets each rate,
# and every format gets mono and stereo files (see test_synth for the coverage itself).
FORMATS = available_formats()
CORPUS = dict(n_files=12 * len(FORMATS), seconds=(0.4, 1.2), seed=3, formats=FORMATS,
              rates=(16000, 22050, 44100, 48000), stereo_every=3)
PLAN = corpus_plan(**CORPUS)
# Largest decode error of a lossless file against its float source, per encoding: one LSB
# (libsndfile writes with scale 2**(b-1) - 1 and reads with 2**(b-1)).
LOSSLESS_ATOL = {"PCM_16": 2 / 2**15, "PCM_24": 2 / 2**23, "FLOAT": 1e-7}
MODEL_RATES = (16000, 24000, 44100)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, **CORPUS)
    return root


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return make_bad_files(tmp_path_factory.mktemp("bad"))


def _mono_source(spec) -> np.ndarray:
    x = spec.render()
    return x if x.ndim == 1 else x.mean(axis=1)


@pytest.mark.parametrize("spec", PLAN, ids=[s.relpath for s in PLAN])
def test_probe_reports_what_was_written(corpus, spec):
    info = probe(corpus / spec.relpath)
    frames = round(spec.seconds * spec.sample_rate)
    assert info == AudioInfo(frames, spec.sample_rate, spec.channels, frames / spec.sample_rate, spec.format, spec.subtype)


@pytest.mark.parametrize("spec", PLAN, ids=[s.relpath for s in PLAN])
def test_read_mono_gives_the_downmixed_source(corpus, spec):
    x, sr = read_mono(corpus / spec.relpath)
    source = _mono_source(spec)
    assert sr == spec.sample_rate
    assert x.dtype == np.float32 and x.ndim == 1 and len(x) == len(source)
    assert np.abs(x).max() <= 1.0
    if spec.lossless:
        np.testing.assert_allclose(x, source, rtol=0, atol=LOSSLESS_ATOL[spec.subtype])
    else:
        # Lossy codecs change samples but not timing: the decode matches the source best unshifted.
        lags = range(-8, 9)
        corr = [np.corrcoef(x[8 + lag : len(x) - 8 + lag], source[8:-8])[0, 1] for lag in lags]
        assert corr[lags.index(0)] == max(corr) > 0.5


@pytest.mark.parametrize("spec", PLAN, ids=[s.relpath for s in PLAN])
def test_load_for_rates_resamples_one_decode_to_each_rate(corpus, spec):
    path = corpus / spec.relpath
    x, sr = read_mono(path)
    out = load_for_rates(path, 0.0, None, MODEL_RATES + (MODEL_RATES[0],))
    assert list(out) == list(MODEL_RATES)
    for rate, y in out.items():
        assert y.dtype == np.float32 and len(y) == round(len(x) * rate / sr)
        np.testing.assert_array_equal(y, resample(x, sr, rate))


@pytest.mark.parametrize("spec", PLAN, ids=[s.relpath for s in PLAN])
def test_reading_a_segment_returns_exactly_those_samples(corpus, spec):
    """Also for MP3/OGG, whose seeks need a decoder preroll to give the same samples as a full decode."""
    path = corpus / spec.relpath
    full, sr = read_mono(path)
    start, seconds = spec.seconds * 0.37, spec.seconds * 0.41
    part, part_sr = read_mono(path, start, seconds)
    first = round(start * sr)
    assert part_sr == sr and len(part) == round(seconds * sr)
    np.testing.assert_allclose(part, full[first : first + len(part)], rtol=0, atol=1e-6)
    if spec.lossless:
        np.testing.assert_allclose(part, _mono_source(spec)[first : first + len(part)], rtol=0, atol=LOSSLESS_ATOL[spec.subtype])


@pytest.mark.parametrize("spec", [s for s in PLAN if s.channels == 2][: len(FORMATS)], ids=lambda s: s.relpath)
def test_planned_segments_read_back_cover_the_file(corpus, spec):
    """Segment bounds are rounded to samples on their own, so neighbours may overlap or miss one sample."""
    path = corpus / spec.relpath
    full, sr = read_mono(path)
    info = probe(path)
    end = 0
    for start, seconds in plan_segments(info.duration, info.duration / 3.5):
        part, _ = read_mono(path, start, seconds)
        first = round(start * sr)
        assert abs(first - end) <= 1 and abs(len(part) - seconds * sr) <= 1
        np.testing.assert_allclose(part, full[first : first + len(part)], rtol=0, atol=1e-6)
        end = first + len(part)
    assert abs(end - len(full)) <= 1


BAD_REASONS = {
    "empty": ("empty file", "empty file"),
    "truncated_data": ("truncated", "truncated"),
    "truncated_header": ("cannot decode", "cannot decode"),
    "truncated_flac": ("truncated", "cannot decode"),
    "no_frames": ("no audio frames", "no audio frames"),
    "random_bytes": ("cannot decode", "cannot decode"),
    "text": ("format not recognised", "format not recognised"),
    "directory": ("not a file", "not a file"),
}


def test_bad_files_cover_every_failure_named(bad):
    assert set(bad) == set(BAD_REASONS)


@pytest.mark.parametrize("name", sorted(BAD_REASONS))
def test_bad_file_raises_audio_error_with_its_reason(bad, name):
    probe_reason, read_reason = BAD_REASONS[name]
    with pytest.raises(AudioError, match=probe_reason) as probed:
        probe(bad[name])
    with pytest.raises(AudioError, match=read_reason) as read:
        read_mono(bad[name])
    for error in (probed.value, read.value):
        assert error.reason == str(error) and "\n" not in error.reason and str(bad[name]) not in error.reason


# ---- headers that promise more than decodes ----------------------------------------------------------------------------


def ogg_crc(data: bytes) -> int:
    """Ogg's page CRC-32: polynomial 0x04c11db7, not reflected, initial value 0, no final xor."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


def rewrite_last_ogg_page(data: bytes, granule_delta: int, flags: int | None = None) -> bytes:
    """``data`` (an Ogg file) with its last page's granule position moved by ``granule_delta`` and
    its header type flags set to ``flags``, the page's CRC computed again."""
    at, pages = 0, []
    while (at := data.find(b"OggS", at)) >= 0:
        size = 27 + data[at + 26] + sum(data[at + 27 : at + 27 + data[at + 26]])
        pages.append((at, size))
        at += size
    at, size = pages[-1]
    assert at + size == len(data)
    page = bytearray(data[at:])
    assert ogg_crc(bytes(page[:22]) + bytes(4) + bytes(page[26:])) == int.from_bytes(page[22:26], "little")
    page[6:14] = (int.from_bytes(page[6:14], "little") + granule_delta).to_bytes(8, "little")
    if flags is not None:
        page[5] = flags
    page[22:26] = ogg_crc(bytes(page[:22]) + bytes(4) + bytes(page[26:])).to_bytes(4, "little")
    return data[:at] + bytes(page)


@pytest.fixture(scope="module")
def vorbis(tmp_path_factory) -> bytes:
    """A 20 s Vorbis file of several pages (22.05 kHz mono)."""
    path = tmp_path_factory.mktemp("vorbis") / "whole.ogg"
    sf.write(path, 0.3 * np.sin(np.arange(20 * 22050) * 2 * np.pi * 440 / 22050), 22050, format="OGG", subtype="VORBIS")
    return path.read_bytes()


def test_an_ogg_whose_last_granule_promises_more_than_decodes_is_used_with_what_decodes(tmp_path, vorbis):
    """Debian's hyperrogue-music has three such tracks (104 frames more in the header); sox plays them whole."""
    path = tmp_path / "overstated.ogg"
    path.write_bytes(rewrite_last_ogg_page(vorbis, 30_000))
    promised = sf.info(path).frames
    decodable = len(sf.read(path, dtype="float32")[0])  # libsndfile reads to the end of the stream and stops cleanly
    assert promised == 20 * 22050 + 30_000 and decodable < promised

    info = probe(path)
    assert (info.frames, info.header_frames, info.duration) == (decodable, promised, decodable / 22050)
    whole, sr = read_mono(path)
    assert len(whole) == decodable
    end = 0
    for start, seconds in plan_segments(info.duration, 8.0):
        part, _ = read_mono(path, start, seconds)
        first = round(start * sr)
        assert abs(len(part) - seconds * sr) <= 1, "every planned segment decodes whole"
        np.testing.assert_allclose(part, whole[first : first + len(part)], atol=1e-4)
        end = first + len(part)
    assert abs(end - decodable) <= 1


def test_an_ogg_whose_header_agrees_has_no_header_frames(tmp_path, vorbis):
    path = tmp_path / "whole.ogg"
    path.write_bytes(vorbis)
    info = probe(path)
    assert info.frames == sf.info(path).frames == 20 * 22050 and info.header_frames is None


def test_an_ogg_that_decodes_short_without_its_end_of_stream_page_is_refused(tmp_path, vorbis):
    """The decoder ends cleanly, but the stream does not say it ended: something was cut off."""
    path = tmp_path / "no-eos.ogg"
    path.write_bytes(rewrite_last_ogg_page(vorbis, 30_000, flags=0))
    with pytest.raises(AudioError, match="truncated: the header promises 471000 frames, the stream ends after .* without its end-of-stream page"):
        probe(path)


def test_a_flac_cut_at_a_frame_boundary_is_refused_though_it_decodes_cleanly(tmp_path):
    """libsndfile says nothing when a FLAC ends between frames; its header's count is exact, so it is truncated."""
    path = tmp_path / "a.flac"
    sf.write(path, 0.3 * np.sin(np.arange(3 * 16000) / 7), 16000, subtype="PCM_16")
    data = path.read_bytes()
    syncs = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xF8, 0xF9)]
    path.write_bytes(data[: syncs[len(syncs) // 2]])
    with pytest.raises(AudioError, match="truncated: the header promises 48000 frames, the stream ends after"):
        probe(path)


def test_missing_file_raises_audio_error(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        probe(tmp_path / "gone.wav")


def test_streamed_wav_with_placeholder_size_is_not_truncated(tmp_path):
    """Recorders that stream write 0xFFFFFFFF as the data size; libsndfile reads to the end."""
    path = tmp_path / "streamed.wav"
    sf.write(path, np.full(800, 0.25, np.float32), 8000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    at = data.find(b"data") + 4
    data[at : at + 4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    assert probe(path).frames == 800
    assert len(read_mono(path)[0]) == 800


@pytest.mark.parametrize("duration", [0.5, 29.9, 30.0, 30.000001, 44.9, 45.0, 61.0, 90.0, 95.3, 3600.0, 3614.0])
def test_plan_segments_cuts_full_segments_and_a_tail_of_at_least_half(duration):
    segments = plan_segments(duration, 30.0)
    lengths = [seconds for _, seconds in segments]
    assert segments[0][0] == 0.0
    for (start, seconds), (next_start, _) in zip(segments, segments[1:]):
        assert next_start == pytest.approx(start + seconds)
    assert segments[-1][0] + segments[-1][1] == pytest.approx(duration)
    assert max(lengths) <= 30.0
    if duration > 30.0:
        assert min(lengths) >= 15.0 - 1e-9
    # every segment but the last two is exactly full length: segments of a corpus batch together
    assert all(x == 30.0 for x in lengths[:-2])
    assert len(segments) == math.ceil(duration / 30.0 - 1e-9)


def test_plan_segments_splits_a_short_tail_with_the_last_full_segment():
    starts, lengths = zip(*plan_segments(61.0, 30.0))
    assert starts == pytest.approx((0.0, 30.0, 45.5)) and lengths == pytest.approx((30.0, 15.5, 15.5))
    starts, lengths = zip(*plan_segments(80.0, 30.0))
    assert starts == pytest.approx((0.0, 30.0, 60.0)) and lengths == pytest.approx((30.0, 30.0, 20.0))
    assert plan_segments(90.0, 30.0) == [(0.0, 30.0), (30.0, 30.0), (60.0, 30.0)]


def test_plan_segments_of_nothing_is_empty_and_max_must_be_positive():
    assert plan_segments(0.0, 30.0) == []
    with pytest.raises(ValueError):
        plan_segments(10.0, 0.0)


def _write(tmp_path, name, data, sr=8000, subtype="PCM_16"):
    path = tmp_path / name
    sf.write(path, data, sr, subtype=subtype)
    return path


def test_read_mono_downmixes_by_the_mean_of_channels(tmp_path):
    stereo = np.stack([np.full(400, 0.5), np.full(400, -0.1)], axis=1)
    x, _ = read_mono(_write(tmp_path, "s.wav", stereo, subtype="PCM_32"))
    np.testing.assert_allclose(x, 0.2, atol=1e-6)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_read_mono_scales_every_encoding_to_full_scale_one(tmp_path, subtype):
    ramp = np.linspace(-0.999, 0.999, 1000)
    x, _ = read_mono(_write(tmp_path, f"r_{subtype}.wav", ramp, subtype=subtype))
    np.testing.assert_allclose(x, ramp, atol=2 / 2**15)


def test_read_mono_clips_float_files_beyond_full_scale(tmp_path):
    x, _ = read_mono(_write(tmp_path, "loud.wav", np.array([0.5, 1.5, -2.0, 0.25]), subtype="FLOAT"))
    np.testing.assert_array_equal(x, np.array([0.5, 1.0, -1.0, 0.25], np.float32))


def test_read_mono_refuses_non_finite_samples(tmp_path):
    with pytest.raises(AudioError, match="non-finite"):
        read_mono(_write(tmp_path, "nan.wav", np.array([0.5, np.nan, 0.1]), subtype="FLOAT"))


def test_read_mono_cuts_a_range_at_the_end_and_refuses_a_start_past_it(tmp_path):
    path = _write(tmp_path, "one_second.wav", np.zeros(8000))
    assert len(read_mono(path, 0.75, 10.0)[0]) == 2000
    with pytest.raises(AudioError, match="past the end"):
        read_mono(path, 1.0, 0.5)


@pytest.mark.parametrize("n", [0, 1, 3, 7, 1000, 44101])
@pytest.mark.parametrize("rates", [(44100, 16000), (16000, 24000), (22050, 48000), (48000, 44100), (24000, 24000)])
def test_resample_length_is_round_of_the_rate_ratio(n, rates):
    sr_in, sr_out = rates
    x = np.random.default_rng(n).uniform(-0.5, 0.5, n)
    y = resample(x, sr_in, sr_out)
    assert y.dtype == np.float32 and y.shape == (round(n * sr_out / sr_in),)


def test_resample_keeps_channels_and_is_identity_at_equal_rates():
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (1000, 2)).astype(np.float32)
    assert resample(x, 44100, 16000).shape == (363, 2)
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)


def test_resample_keeps_a_tone_below_the_new_nyquist():
    t_in, t_out = np.arange(44100) / 44100, np.arange(16000) / 16000
    y = resample(np.sin(2 * np.pi * 1000 * t_in), 44100, 16000)
    # Away from the edges, where the filter has no input on one side.
    np.testing.assert_allclose(y[500:-500], np.sin(2 * np.pi * 1000 * t_out)[500:-500], atol=1e-3)


@pytest.mark.parametrize("name, fmt, container", [("a.wav", None, "WAV"), ("b.flac", None, "FLAC"), ("c.out", "flac", "FLAC")])
def test_write_audio_writes_16_bit_pcm_and_clips(tmp_path, name, fmt, container):
    audio = np.stack([np.linspace(-1.5, 1.5, 300), np.zeros(300)], axis=1)
    write_audio(tmp_path / "sub" / name, audio, 22050, fmt)
    info = sf.info(tmp_path / "sub" / name)
    assert (info.format, info.subtype, info.samplerate, info.channels, info.frames) == (container, "PCM_16", 22050, 2, 300)
    back, _ = sf.read(tmp_path / "sub" / name)
    np.testing.assert_allclose(back[:, 0], np.clip(audio[:, 0], -1, 1), atol=2 / 2**15)


def test_write_audio_refuses_other_formats(tmp_path):
    with pytest.raises(ValueError, match="wav or flac"):
        write_audio(tmp_path / "a.mp3", np.zeros(10), 8000)


def test_list_audio_files_finds_the_corpus_in_sorted_order(corpus):
    assert list_audio_files(corpus) == sorted((corpus / s.relpath for s in PLAN), key=lambda p: p.relative_to(corpus).parts)


def test_list_audio_files_skips_folders_hidden_and_non_audio_and_follows_links(tmp_path, bad):
    root = tmp_path / "root"
    (root / "b" / "deeper").mkdir(parents=True)
    for rel in ["a.wav", "b/deeper/c.FLAC", "b/song.Mp3", "notes.txt", "b/cover.jpg", ".hidden.wav", "b/wav"]:
        (root / rel).write_bytes(b"x")
    (root / ".cache").mkdir()
    (root / ".cache" / "d.wav").write_bytes(b"x")
    (root / "x.wav").mkdir()  # a folder with an audio suffix: not a file, but searched
    (root / "x.wav" / "inside.ogg").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "linked.opus").write_bytes(b"x")
    os.symlink(outside, root / "link_dir")
    os.symlink(root / "a.wav", root / "link_file.wav")
    os.symlink(root / "missing.wav", root / "broken.wav")
    os.symlink(root, root / "b" / "loop")  # a cycle must not hang the walk

    found = [p.relative_to(root).as_posix() for p in list_audio_files(root)]

    assert found == ["a.wav", "b/deeper/c.FLAC", "b/song.Mp3", "link_dir/linked.opus", "link_file.wav", "x.wav/inside.ogg"]
    assert [p.name for p in list_audio_files(bad["directory"].parent)] == sorted(
        p.name for name, p in bad.items() if name != "directory")


def test_list_audio_files_of_a_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list_audio_files(tmp_path / "nowhere")
