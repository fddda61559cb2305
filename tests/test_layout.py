"""StageLayout.encode: ids per (stream, level), frame-major order, labels shifted by one, conditioning frames.

The windows are written by hand and so are the expected id arrays: each number
below is worked out from the offsets table, not computed by the code under test.
Codebooks of the fake tokenizer: clap 4 levels x 16, semantic 32, acoustic 8
levels x 32 (coarse = levels 0-2, fine = levels 3-7).
"""

from __future__ import annotations

import numpy as np
import pytest

from musiclm.models.layout import IGNORE, StageLayout
from tests.factories import fake_info

X = IGNORE  # reads as "no label" in the tables below
INFO = fake_info(sem_k=32, ac_k=32, q=8, coarse=3, clap_levels=4, clap_k=16)


def acoustic(frames: int) -> np.ndarray:
    """[8, frames] with code 3 * level + frame: every (level, frame) has its own code, all below 32."""
    return np.array([[3 * level + t for t in range(frames)] for level in range(8)], dtype=np.uint16)


# ---- coarse: clap (4) + semantic -> acoustic levels 0-2 -------------------------------------------------------------


@pytest.fixture(scope="module")
def coarse() -> StageLayout:
    return StageLayout("coarse", INFO, 0.08)  # 4 semantic frames, 6 acoustic frames


def test_coarse_gives_each_stream_and_level_its_own_slice_of_ids(coarse):
    assert coarse.offsets == {
        ("clap", 0): 0, ("clap", 1): 16, ("clap", 2): 32, ("clap", 3): 48,
        ("semantic", 0): 64,
        ("acoustic", 0): 96, ("acoustic", 1): 128, ("acoustic", 2): 160,
    }  # fmt: skip
    assert (coarse.null_id, coarse.pad_id, coarse.vocab_size) == (192, 193, 194)
    assert (coarse.prefix_len, coarse.seq_len, coarse.clap_len) == (8, 26, 4)


def test_coarse_encodes_the_prefix_then_the_acoustic_target_frame_major_with_next_token_labels(coarse):
    window = {"clap": np.array([1, 2, 3, 4], np.uint16), "semantic": np.array([5, 6, 7, 8], np.uint16), "acoustic": acoustic(6)}
    e = coarse.encode(window)
    # clap 1+0, 2+16, 3+32, 4+48 | semantic 64 + code | then per frame t: 96 + t, 128 + 3 + t, 160 + 6 + t
    assert e.tokens.tolist() == [
        1, 18, 35, 52, 69, 70, 71, 72,
        96, 131, 166, 97, 132, 167, 98, 133, 168, 99, 134, 169, 100, 135, 170, 101, 136, 171,
    ]  # fmt: skip
    # position i holds the code (within its codebook) of token i + 1; the last semantic token predicts the first target
    assert e.labels.tolist() == [
        X, X, X, X, X, X, X,
        0, 3, 6, 1, 4, 7, 2, 5, 8, 3, 6, 9, 4, 7, 10, 5, 8, 11,
        X,
    ]  # fmt: skip
    assert e.label_levels.tolist() == [0] * 7 + [0, 1, 2] * 6 + [0]
    assert all(a.dtype == np.int64 for a in (e.tokens, e.labels, e.label_levels))


def test_coarse_dropped_conditioning_replaces_only_the_clap_prefix_with_null(coarse):
    window = {"clap": np.array([1, 2, 3, 4], np.uint16), "semantic": np.array([5, 6, 7, 8], np.uint16), "acoustic": acoustic(6)}
    kept, dropped = coarse.encode(window), coarse.encode(window, drop_cond=True)
    assert dropped.tokens[:8].tolist() == [192, 192, 192, 192, 69, 70, 71, 72]
    assert np.array_equal(dropped.tokens[8:], kept.tokens[8:])
    assert np.array_equal(dropped.labels, kept.labels) and np.array_equal(dropped.label_levels, kept.label_levels)


def test_coarse_target_stops_where_the_semantic_conditioning_ends(coarse):
    """Two semantic frames (40 ms) cover three acoustic frames: the other three are not targets, even if present."""
    window = {"clap": np.array([1, 2, 3, 4], np.uint16), "semantic": np.array([5, 6], np.uint16), "acoustic": acoustic(6)}
    e = coarse.encode(window)
    P = 193  # pad
    assert e.tokens.tolist() == [
        1, 18, 35, 52, 69, 70, P, P,
        96, 131, 166, 97, 132, 167, 98, 133, 168,
        P, P, P, P, P, P, P, P, P,
    ]  # fmt: skip
    assert e.labels.tolist() == [X] * 7 + [0, 3, 6, 1, 4, 7, 2, 5, 8] + [X] * 10
    assert e.label_levels.tolist() == [0] * 7 + [0, 1, 2] * 3 + [0] * 10


def test_coarse_keeps_whole_frames_of_a_short_acoustic_stream(coarse):
    """Four semantic frames cover six acoustic frames, but the clip has four: four whole frames, then pads."""
    window = {"clap": np.array([0, 0, 0, 0], np.uint16), "semantic": np.array([5, 6, 7, 8], np.uint16), "acoustic": acoustic(4)}
    e = coarse.encode(window)
    assert e.tokens[8:].tolist() == [96, 131, 166, 97, 132, 167, 98, 133, 168, 99, 134, 169] + [193] * 6
    assert e.labels[7:].tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8, 3, 6, 9] + [X] * 7


# ---- fine: acoustic levels 0-2 -> acoustic levels 3-7 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fine() -> StageLayout:
    return StageLayout("fine", INFO, 0.04)  # 3 acoustic frames


def test_fine_gives_coarse_and_fine_levels_their_own_slices_of_ids(fine):
    assert fine.offsets == {
        ("acoustic", 0): 0, ("acoustic", 1): 32, ("acoustic", 2): 64,
        ("acoustic", 3): 96, ("acoustic", 4): 128, ("acoustic", 5): 160, ("acoustic", 6): 192, ("acoustic", 7): 224,
    }  # fmt: skip
    assert (fine.null_id, fine.pad_id, fine.vocab_size) == (256, 257, 258)
    assert (fine.prefix_len, fine.seq_len, fine.clap_len, fine.has_clap) == (9, 24, 0, False)


def test_fine_encodes_coarse_levels_then_fine_levels_both_frame_major(fine):
    e = fine.encode({"acoustic": acoustic(3)})
    # prefix per frame t: t, 32 + 3 + t, 64 + 6 + t; target per frame t: 96 + 9 + t, 128 + 12 + t, 160 + 15 + t, 192 + 18 + t, 224 + 21 + t
    assert e.tokens.tolist() == [
        0, 35, 70, 1, 36, 71, 2, 37, 72,
        105, 140, 175, 210, 245, 106, 141, 176, 211, 246, 107, 142, 177, 212, 247,
    ]  # fmt: skip
    assert e.labels.tolist() == [X] * 8 + [9, 12, 15, 18, 21, 10, 13, 16, 19, 22, 11, 14, 17, 20, 23] + [X]
    # label levels index the target's own codebooks (0-4), not the stream's levels (3-7)
    assert e.label_levels.tolist() == [0] * 8 + [0, 1, 2, 3, 4] * 3 + [0]
    # fine has no CLAP prefix: dropping conditioning changes nothing
    dropped = fine.encode({"acoustic": acoustic(3)}, drop_cond=True)
    assert np.array_equal(dropped.tokens, e.tokens)


def test_fine_pads_a_short_window_after_its_prefix_and_after_its_target(fine):
    e = fine.encode({"acoustic": acoustic(2)})
    P = 257
    assert e.tokens.tolist() == [0, 35, 70, 1, 36, 71, P, P, P, 105, 140, 175, 210, 245, 106, 141, 176, 211, 246, P, P, P, P, P]
    assert e.labels.tolist() == [X] * 8 + [9, 12, 15, 18, 21, 10, 13, 16, 19, 22] + [X] * 6


def test_decode_target_inverts_the_target_ids(coarse, fine):
    assert coarse.decode_target(np.array([96, 131, 166, 97, 132, 167])).tolist() == [[0, 1], [3, 4], [6, 7]]
    assert fine.decode_target(np.array([105, 140, 175, 210, 245, 106])).tolist() == [[9], [12], [15], [18], [21]]  # whole frames only
    with pytest.raises(ValueError, match="outside the target codebooks"):
        coarse.decode_target(np.array([96, 131, 69]))
