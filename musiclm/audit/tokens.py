"""Audio → :class:`~musiclm.audit.search.Query`, with the corpus's own tokenizer.

The semantic tokens are computed as ``musiclm tokenize`` computes them (the semantic model
features of the configured layer, the corpus's k-means; the audio cut into
segments of ``tokenize.audio.segment_seconds``), at ``phases`` sub-frame
phases: phase ``k`` drops the first ``k / phases`` of a frame. A copy that
starts at an arbitrary time (1.37 s, not a multiple of 20 ms) then has one
phase whose frames fall within ``1 / (2 phases)`` of a frame of the corpus's,
and that phase's tokens agree with the stored ones as well as the audio allows.

Layer: audit.
"""

from __future__ import annotations

import numpy as np

from musiclm.audit.search import Query
from musiclm.pipeline.audio import plan_segments

PHASES = 4


def semantic_phases(tokenizer, audio: np.ndarray, phases: int = PHASES) -> tuple[np.ndarray, np.ndarray]:
    """Semantic tokens of mono ``audio`` at the semantic model's rate, at ``phases`` sub-frame phases: ([P, T] int64, shifts [P] s).

    All phases are cut to one length, so each segment's phases go through the semantic model as one batch."""
    sr = tokenizer.semantic.sample_rate
    hop = sr / float(tokenizer.semantic.frame_rate)
    drops = [round(k * hop / phases) for k in range(phases)]
    n = len(audio) - drops[-1]
    rows: list[list[np.ndarray]] = [[] for _ in drops]
    for start, seconds in plan_segments(n / sr, tokenizer.cfg.audio.segment_seconds):
        a, b = round(start * sr), min(n, round((start + seconds) * sr))
        batch = np.stack([audio[d + a : d + b] for d in drops])
        codes = tokenizer.semantic_codes(tokenizer.semantic_features(batch)).cpu().numpy()  # [P, T_seg]
        for k in range(phases):
            rows[k].append(codes[k])
    semantic = np.stack([np.concatenate(r) for r in rows]).astype(np.int64)
    return semantic, np.asarray(drops, np.float64) / sr


def clap_windows(tokenizer, audio: np.ndarray, batch: int = 64) -> np.ndarray:
    """Normalised CLAP embeddings [W, D] float32 of ``audio`` at the CLAP rate, windows at the tokenize hop."""
    windows = tokenizer.clap_windows(audio)
    return np.concatenate([tokenizer.clap_audio_embed(list(windows[a : a + batch])).cpu().numpy() for a in range(0, len(windows), batch)]).astype(np.float32)


def query_from_audio(tokenizer, audio: dict[int, np.ndarray], phases: int = PHASES) -> Query:
    """A query from mono audio at each of the tokenizer's rates (``{rate: float32 samples}``)."""
    semantic, shifts = semantic_phases(tokenizer, audio[tokenizer.semantic.sample_rate], phases)
    x = audio[tokenizer.clap.sample_rate]
    return Query(semantic, shifts, clap_windows(tokenizer, x), len(x) / tokenizer.clap.sample_rate)
