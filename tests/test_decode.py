"""Chunked decoding (musiclm/generation/decode.py) through the tiny preset's real Encodec.

The codes are Encodec's own codes of synthesised music, decoded by the session tokenizer's
decoder (random weights, fitted codebooks). At random weights its output depends on the codes
only at the 1e-5 level (measured: two different clips decode within 8e-6 of each other), over a
steady ~0.17 offset and a pattern repeating every few samples; what chunking changes is the
decoder's state (a decode that starts cold is off by up to 0.03 in its first frame), and that
is what these tests see. Tolerances sit between the two: chunked audio is within 1e-7 of the
whole decode, a decode shifted by one frame is 1e-5 away.
"""

from __future__ import annotations

import numpy as np
import pytest

from musiclm.generation.decode import (
    CHUNK_SECONDS,
    CONTEXT_SECONDS,
    OVERLAP_SECONDS,
    ChunkDecoder,
    crossfade_in,
    decode_chunked,
)
from musiclm.pipeline.synth import synth_clip
from musiclm.pipeline.tokenizer import Tokenizer
from musiclm.shards.tokenizer_folder import tokenizer_folder

# Max |chunked - whole decode|: measured 9e-8 at the default sizes, 1e-5 for a one-frame shift.
AGREE_ATOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread for the whole module


@pytest.fixture(scope="module")
def tokenizer(tokenized) -> Tokenizer:
    data, _ = tokenized
    return Tokenizer.load(tokenizer_folder(data))


@pytest.fixture(scope="module")
def hop(tokenizer) -> int:
    return round(tokenizer.codec.sample_rate / tokenizer.codec.frame_rate)


@pytest.fixture(scope="module")
def codes(tokenizer) -> np.ndarray:
    """Encodec codes int64 [2, Q, 600] of 8 s of two kinds of synthesised music."""
    sr = tokenizer.codec.sample_rate
    audio = np.stack([synth_clip("mix", 8.0, sr, seed=3), synth_clip("drums", 8.0, sr, seed=1)])
    return tokenizer.encode_acoustic(audio).numpy()


@pytest.fixture(scope="module")
def whole(tokenizer, codes) -> np.ndarray:
    """One decode of all the codes: float32 [2, 600 * hop]."""
    return tokenizer.decode_acoustic(codes)


def defaults(tokenizer, hop, start: int = 0) -> ChunkDecoder:
    return ChunkDecoder.from_seconds(tokenizer.decode_acoustic, hop, tokenizer.codec.frame_rate, start=start)


# ---- bookkeeping: chunks depend on frame indices only ----------------------------------------------------------------
def test_push_sizes_do_not_change_the_output(tokenizer, hop, codes):
    chunk, context, overlap, start = 20, 7, 5, 13
    windows: list[int] = []

    def decode(c):
        windows.append(c.shape[2])
        return tokenizer.decode_acoustic(c)

    def stream(pieces: list[int]) -> np.ndarray:
        dec = ChunkDecoder(decode, hop, chunk, context, overlap, start)
        out, at = [], 0
        for n in pieces:
            out.append(dec.push(codes[:, :, at : at + n]))
            at += n
            # chunk k comes out once the frame `overlap` past its end is in, not before
            emitted = sum(o.shape[1] for o in out)
            assert emitted == hop * chunk * max(0, (at - start - overlap) // chunk)
            assert dec.held_frames <= context + chunk + overlap - 1
        return np.concatenate([*out, dec.finish()], axis=1)

    T = codes.shape[2]
    one_by_one = stream([1] * T)
    assert max(windows) <= context + chunk + overlap  # what each decode call costs
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(0, T + 1), size=40))  # repeated cuts push empty pieces
    uneven = stream(np.diff(np.concatenate([[0], cuts, [T]])).tolist())
    at_once = stream([T])
    assert one_by_one.dtype == np.float32 and one_by_one.shape == (2, (T - start) * hop)
    assert np.array_equal(one_by_one, uneven) and np.array_equal(one_by_one, at_once)
    assert np.array_equal(at_once, decode_chunked(tokenizer.decode_acoustic, codes, hop, chunk, context, overlap, start))


@pytest.mark.parametrize(("frames", "start", "overlap"), [(600, 0, 8), (599, 0, 0), (83, 0, 8), (150, 150, 8), (230, 100, 75), (5, 0, 8)])
def test_one_hop_of_audio_per_frame_from_start(tokenizer, hop, codes, frames, start, overlap):
    out = decode_chunked(tokenizer.decode_acoustic, codes[:, :, :frames], hop, 75, 38, overlap, start)
    assert out.shape == (2, (frames - start) * hop)


def test_start_drops_exactly_the_frames_before_it(tokenizer, hop, codes, whole):
    start = 100  # a continued prompt: frames [0, 100) are context only
    out = decode_chunked(tokenizer.decode_acoustic, codes, hop, 75, 38, 8, start)
    assert np.abs(out - whole[:, start * hop :]).max() < AGREE_ATOL
    # one frame off would show: the whole decode against itself shifted by a frame
    assert np.abs(out[:, :-hop] - whole[:, (start + 1) * hop :]).max() > 5 * AGREE_ATOL


def test_default_sizes_in_frames_at_the_codec_rate(tokenizer, hop):
    assert (CHUNK_SECONDS, CONTEXT_SECONDS, OVERLAP_SECONDS) == (1.0, 0.5, 0.1)
    dec = defaults(tokenizer, hop)
    assert (dec.chunk, dec.context, dec.overlap) == (75, 38, 8)  # 75 Hz
    at_50_hz = ChunkDecoder.from_seconds(tokenizer.decode_acoustic, 640, 50.0)
    assert (at_50_hz.chunk, at_50_hz.context, at_50_hz.overlap) == (50, 25, 5)


# ---- agreement with one whole decode -------------------------------------------------------------------------------------
@pytest.mark.parametrize("start", [0, 100])
def test_default_chunked_decode_matches_one_whole_decode(tokenizer, hop, codes, whole, start):
    dec = defaults(tokenizer, hop, start)
    out = np.concatenate([dec.push(codes), dec.finish()], axis=1)
    # From the first sample: 0.5 s of context is far more than the ~8 frames the decoder takes to warm up.
    assert np.abs(out - whole[:, start * hop :]).max() < AGREE_ATOL


def test_without_context_a_chunk_starts_cold(tokenizer, hop, codes, whole):
    """The effect the context is for: decoded alone, chunk 2 is off by 1e-2 near its start, fine later."""
    out = decode_chunked(tokenizer.decode_acoustic, codes, hop, 75, 0, 0)
    err = np.abs(out - whole)[:, 150 * hop : 225 * hop]
    assert err[:, :hop].max() > 1e-2 and err[:, 20 * hop :].max() < AGREE_ATOL


# ---- the crossfade -----------------------------------------------------------------------------------------------------
def test_the_crossfade_rises_from_zero_to_one_and_its_fade_out_mirrors_it():
    """A raised cosine: the fade-out ``1 - w`` is the fade-in backwards, so neither signal leads at the middle."""
    w = crossfade_in(8 * 320).astype(np.float64)
    assert w[0] < 1e-5 and w[-1] > 1 - 1e-5 and np.all(np.diff(w) > 0)
    np.testing.assert_allclose(w[::-1], 1 - w, atol=1e-6)


@pytest.mark.parametrize(("context", "overlap"), [(3, 4), (0, 4), (0, 10)])
def test_the_level_holds_through_every_chunk_border_when_decodes_agree(context, overlap):
    """With a decoder whose frames decode alike in every window (each frame a level set by its code), the
    crossfaded audio equals the whole decode: the weights sum to one, so the level neither dips nor swells."""
    hop = 4
    codes = np.random.default_rng(0).integers(0, 100, (2, 3, 57))

    def levels(c: np.ndarray) -> np.ndarray:  # codes [B, Q, n] -> audio [B, n * hop]
        return np.repeat(0.5 + c[:, 0, :].astype(np.float32) / 100, hop, axis=1)

    out = decode_chunked(levels, codes, hop, chunk=10, context=context, overlap=overlap)
    np.testing.assert_allclose(out, levels(codes), atol=1e-6)


# ---- clicks at chunk borders -----------------------------------------------------------------------------------------
def click_ratios(audio: np.ndarray, borders: list[int], half: int = 64, order: int = 32) -> list[float]:
    """Per row of audio [B, samples]: how far a click at a border stands out, as a ratio.

    A click is what the signal's own recent past does not predict. The residual of a linear
    predictor (``order`` taps, least squares over the row) is flat over steady audio and spikes
    at a discontinuity (the classic click detector of audio restoration). The ratio is the
    largest |residual| within ``half`` samples of any border over the 99th percentile of the
    same statistic in windows of ``2 * half`` samples away from the borders: about 1 when the
    borders look like the rest of the signal.
    """
    ratios = []
    for x in audio.astype(np.float64):
        x = x - x.mean()
        lags = np.lib.stride_tricks.sliding_window_view(x, order + 1)  # [n - order, order + 1]
        taps, *_ = np.linalg.lstsq(lags[:, :order], lags[:, order], rcond=None)
        e = np.abs(lags[:, order] - lags[:, :order] @ taps)  # e[i] is the residual at sample i + order
        near = max(e[b - order - half : b - order + half].max() for b in borders)
        far = np.ones(len(e), bool)
        for b in borders:
            far[max(0, b - order - 2 * half) : b - order + 2 * half] = False
        starts = range(0, len(e) - 2 * half, 2 * half)
        elsewhere = [e[i : i + 2 * half].max() for i in starts if far[i : i + 2 * half].all()]
        ratios.append(near / np.percentile(elsewhere, 99))
    return ratios


CLICK_LIMIT = 2.0  # measured: 0.96 for the whole decode and for every chunked one below, 22.7 for naive concatenation


def borders(codes: np.ndarray, chunk: int, hop: int) -> list[int]:
    return [k * chunk * hop for k in range(1, codes.shape[2] // chunk)]


@pytest.mark.parametrize(("context", "overlap"), [(38, 8), (38, 0), (0, 8)], ids=["defaults", "context-only", "crossfade-only"])
def test_no_clicks_at_chunk_borders(tokenizer, hop, codes, context, overlap):
    out = decode_chunked(tokenizer.decode_acoustic, codes, hop, 75, context, overlap)
    assert max(click_ratios(out, borders(codes, 75, hop))) < CLICK_LIMIT


def test_click_check_fails_naive_concatenation_and_passes_the_whole_decode(tokenizer, hop, codes, whole):
    """The check above has the power to fail: each chunk decoded alone (no context, no crossfade) and
    concatenated clicks at every border, while the whole decode (no borders at all) passes."""
    naive = np.concatenate([tokenizer.decode_acoustic(codes[:, :, b : b + 75]) for b in range(0, codes.shape[2], 75)], axis=1)
    assert min(click_ratios(naive, borders(codes, 75, hop))) > 5 * CLICK_LIMIT
    assert max(click_ratios(whole, borders(codes, 75, hop))) < CLICK_LIMIT


# ---- argument checks ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"chunk": 0}, "chunk must be at least 1 frame"),
        ({"context": -1}, "context must be >= 0"),
        ({"overlap": 76}, r"overlap must be between 0 and chunk \(75\)"),
        ({"overlap": -1}, "overlap must be between 0 and chunk"),
        ({"start": -2}, "start must be >= 0"),
        ({"hop": 0}, "hop must be at least 1"),
    ],
)
def test_bad_sizes_are_refused(tokenizer, kw, message):
    args = {"hop": 320, "chunk": 75, "context": 38, "overlap": 8, **kw}
    with pytest.raises(ValueError, match=message):
        ChunkDecoder(tokenizer.decode_acoustic, **args)


def test_bad_pushes_and_calls_are_refused(tokenizer, hop, codes):
    dec = ChunkDecoder(tokenizer.decode_acoustic, hop, 75, 38, 8)
    with pytest.raises(ValueError, match=r"integers \[B, Q, frames\]"):
        dec.push(codes[0])
    with pytest.raises(ValueError, match=r"integers \[B, Q, frames\]"):
        dec.push(codes.astype(np.float32))
    with pytest.raises(ValueError, match="finish before any push"):
        ChunkDecoder(tokenizer.decode_acoustic, hop, 75, 38, 8).finish()
    dec.push(codes[:, :, :10])
    with pytest.raises(ValueError, match=r"do not match the frames pushed before"):
        dec.push(codes[:1, :, 10:20])
    dec.finish()
    with pytest.raises(ValueError, match="push after finish"):
        dec.push(codes[:, :, 10:20])
    with pytest.raises(ValueError, match="finish called twice"):
        dec.finish()
    short = ChunkDecoder(tokenizer.decode_acoustic, hop, 75, 38, 8, start=50)
    short.push(codes[:, :, :40])
    with pytest.raises(ValueError, match="40 frames were pushed, fewer than start = 50"):
        short.finish()
    wrong_hop = ChunkDecoder(tokenizer.decode_acoustic, hop + 1, 75, 38, 8)
    with pytest.raises(ValueError, match=r"not \[B, frames \* hop"):
        wrong_hop.push(codes)
