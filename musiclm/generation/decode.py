"""Chunked codec decoding: acoustic codes -> waveform, a chunk at a time, for streaming.

Encodec's decoder (causal convolutions, an LSTM, transposed convolutions) has state, so a
piece of codes decoded alone differs from the same frames inside a whole decode: at its
start the LSTM and the convolutions begin from nothing, and, in a non-causal codec, at its
end the convolutions miss the frames that follow. :class:`ChunkDecoder` therefore decodes each
chunk of ``chunk`` frames together with

- ``context`` frames before it, decoded to warm the decoder up and then dropped, and
- ``overlap`` frames after it, whose audio is crossfaded into the next chunk's first
  ``overlap`` frames, so that whatever difference remains between two neighbouring
  decodes is spread over ``overlap`` frames instead of landing as a step (a click) on
  one sample.

Frame indices alone fix the chunks: chunk ``k`` holds frames
``[start + k * chunk, start + (k + 1) * chunk)``, whatever sizes the frames were pushed
in, so a stream and a one-shot decode of the same codes give the same bytes. Chunk ``k``
is decoded (window ``[chunk_start - context, chunk_end + overlap)``) once its last
overlap frame exists; :meth:`ChunkDecoder.finish` decodes everything not yet emitted as
one last piece (fewer than ``chunk + overlap`` frames). Decode streamed and non-streamed output alike with it: the audio of the
same codes is then the same.

Cost: each chunk decodes ``context + chunk + overlap`` frames, ``(context + chunk + overlap) / chunk``
times the frames of one whole decode (1.6x at the defaults). Time grows less than that: on one CPU
thread, 10 s of codes through Encodec 24 kHz's architecture (random weights) took 0.93 s whole and
1.02 s chunked at the defaults (1.42 s with a 1 s context), as short decodes run faster per frame.

Layer: generation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Defaults, in seconds so that they hold at any codec frame rate (ChunkDecoder.from_seconds).
# CHUNK_SECONDS is a stream's latency and granularity; shorter chunks cost more (ratio above).
# CONTEXT_SECONDS: the error of a decode that starts cold, against the whole decode, fell below
# 1e-6 (signal std 0.011) within 8 frames (0.11 s) on the tiny preset's Encodec and within 16
# frames (0.21 s) on Encodec 24 kHz's architecture, both at random weights; a trained LSTM may
# remember longer, so 0.5 s leaves more than twice that margin. The crossfade adds ``overlap``
# frames of warm-up before a chunk's own audio is at full weight.
# OVERLAP_SECONDS: Encodec 24 kHz is causal (a frame's samples depend on no later frame), so only
# warm-up differs between neighbouring decodes; a non-causal codec also gets the last few frames
# of a decode wrong, and the crossfade weights those down to nothing.
CHUNK_SECONDS = 1.0
CONTEXT_SECONDS = 0.5
OVERLAP_SECONDS = 0.1


def crossfade_in(n: int) -> np.ndarray:
    """Fade-in weights float32 [n]: raised cosine from ~0 to ~1; the fade-out is ``1 - w``.

    The two signals faded are decodes of the *same* frames, nearly equal (correlated), so
    weights that sum to one keep the level constant; equal-power weights (summing squares
    to one) would lift it by up to 3 dB in the middle. The raised cosine, rather than a
    line, has no corner at either end of the fade.
    """
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)


class ChunkDecoder:
    """Decode codes pushed in any pieces into audio emitted chunk by chunk (module docstring).

    ``decode`` maps codes int64 [B, Q, n] to audio float32 [B, n * hop]. ``chunk`` frames
    (>= 1) are emitted per decode call, each decoded after ``context`` frames (>= 0) and
    with ``overlap`` frames (0 <= overlap <= chunk) past its end. Frames before ``start``
    (a continued prompt's) are context only: the output begins at frame ``start``.
    """

    def __init__(self, decode: Callable[[np.ndarray], np.ndarray], hop: int, chunk: int, context: int, overlap: int, start: int = 0):
        if hop < 1:
            raise ValueError(f"hop must be at least 1 sample per frame, got {hop}")
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 frame, got {chunk}")
        if context < 0:
            raise ValueError(f"context must be >= 0 frames, got {context}")
        if not 0 <= overlap <= chunk:
            raise ValueError(f"overlap must be between 0 and chunk ({chunk}) frames, got {overlap}")
        if start < 0:
            raise ValueError(f"start must be >= 0 frames, got {start}")
        self.decode, self.hop, self.chunk, self.context, self.overlap, self.start = decode, hop, chunk, context, overlap, start
        self._fade = crossfade_in(overlap * hop)
        self._codes: np.ndarray | None = None  # int64 [B, Q, m]: frames [self._first, self._first + m)
        self._first = 0  # global index of self._codes' first frame
        self._next = start  # first frame not yet emitted: the start of the next chunk
        self._tail: np.ndarray | None = None  # float32 [B, overlap * hop]: the last decode's audio of [_next, _next + overlap)
        self._finished = False

    @classmethod
    def from_seconds(
        cls,
        decode: Callable[[np.ndarray], np.ndarray],
        hop: int,
        frame_rate: float,
        start: int = 0,
        chunk_seconds: float = CHUNK_SECONDS,
        context_seconds: float = CONTEXT_SECONDS,
        overlap_seconds: float = OVERLAP_SECONDS,
    ) -> ChunkDecoder:
        """A decoder whose sizes are given in seconds at ``frame_rate`` frames per second (rounded to frames)."""
        chunk = max(1, round(chunk_seconds * frame_rate))
        return cls(decode, hop, chunk, round(context_seconds * frame_rate), min(chunk, round(overlap_seconds * frame_rate)), start)

    @property
    def frames(self) -> int:
        """Frames pushed so far."""
        return self._first + (0 if self._codes is None else self._codes.shape[2])

    @property
    def held_frames(self) -> int:
        """Frames kept for decodes to come: at most ``context + chunk + overlap - 1`` after a push."""
        return 0 if self._codes is None else self._codes.shape[2]

    def push(self, codes: np.ndarray) -> np.ndarray:
        """Append final frames codes [B, Q, n_new]; returns the audio that became final, float32 [B, s].

        ``s`` is a multiple of ``chunk * hop``, often 0: chunk ``k`` comes out once the
        frame ``overlap`` past its end has been pushed.
        """
        if self._finished:
            raise ValueError("push after finish: this ChunkDecoder is done")
        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.dtype.kind not in "iu":
            raise ValueError(f"codes must be integers [B, Q, frames], got {codes.dtype} {list(codes.shape)}")
        if self._codes is None:
            self._codes = codes.astype(np.int64)
        else:
            if codes.shape[:2] != self._codes.shape[:2]:
                raise ValueError(f"codes [B, Q] = {list(codes.shape[:2])} do not match the frames pushed before, {list(self._codes.shape[:2])}")
            self._codes = np.concatenate([self._codes, codes.astype(np.int64)], axis=2)
        out = []
        while self._next + self.chunk + self.overlap <= self.frames:
            out.append(self._emit(self._next + self.chunk))
        # Drop the frames no later decode reaches back to (a long prompt's, emitted chunks').
        drop = min(self.frames, max(0, self._next - self.context)) - self._first
        if drop > 0:
            self._codes = self._codes[:, :, drop:]
            self._first += drop
        return self._join(out)

    def finish(self) -> np.ndarray:
        """The rest: audio float32 [B, s] of every frame not yet emitted, decoded as one last piece.

        Over the whole stream, ``(frames pushed - start) * hop`` samples come out. Raises
        ValueError when fewer than ``start`` frames were pushed.
        """
        if self._finished:
            raise ValueError("finish called twice: this ChunkDecoder is done")
        self._finished = True
        if self._codes is None:
            raise ValueError("finish before any push: no frames to decode")
        if self.frames < self.start:
            raise ValueError(f"{self.frames} frames were pushed, fewer than start = {self.start}: nothing to emit")
        out = self._join([self._emit(self.frames)] if self.frames > self._next else [])
        self._codes = self._tail = None
        return out

    def _emit(self, end: int) -> np.ndarray:
        """Decode frames [_next, end) with context and overlap; returns their audio [B, (end - _next) * hop]."""
        begin = self._next
        lo, hi = max(0, begin - self.context), min(self.frames, end + self.overlap)
        window = self._codes[:, :, lo - self._first : hi - self._first]
        audio = np.asarray(self.decode(window), dtype=np.float32)
        if audio.shape != (window.shape[0], (hi - lo) * self.hop):
            raise ValueError(f"decode turned codes {list(window.shape)} into audio {list(audio.shape)}, not [B, frames * hop = {(hi - lo) * self.hop}]")
        a = (begin - lo) * self.hop
        b = (end - lo) * self.hop
        piece = audio[:, a:b].copy()
        if self._tail is not None:  # fade the previous decode of [begin, begin + overlap) out, this one in
            n = self._tail.shape[1]
            piece[:, :n] = self._tail + self._fade[:n] * (piece[:, :n] - self._tail)
        self._tail = audio[:, b : b + self.overlap * self.hop].copy() if self.overlap else None
        self._next = end
        return piece

    def _join(self, pieces: list[np.ndarray]) -> np.ndarray:
        if pieces:
            return np.concatenate(pieces, axis=1)
        return np.zeros((0 if self._codes is None else self._codes.shape[0], 0), np.float32)


def decode_chunked(decode: Callable[[np.ndarray], np.ndarray], codes: np.ndarray, hop: int, chunk: int, context: int, overlap: int, start: int = 0) -> np.ndarray:
    """Codes int64 [B, Q, T] -> audio float32 [B, (T - start) * hop] exactly as a :class:`ChunkDecoder`
    streams it (one push of every frame, then finish)."""
    dec = ChunkDecoder(decode, hop, chunk, context, overlap, start)
    return np.concatenate([dec.push(codes), dec.finish()], axis=1)
