"""A stage's *sequence layout*: which token streams form one transformer sequence.

Every stage is the same decoder-only transformer reading one flat sequence of
integer ids. What differs between stages is only this layout:

=========  ===============================  ===================================
stage      conditioning prefix              predicted (target)
=========  ===============================  ===================================
semantic   clap (L levels of one window)    semantic, one code per frame
coarse     clap (L) + semantic              acoustic levels [0, C), frame-major
fine       acoustic levels [0, C)           acoustic levels [C, Q), frame-major
=========  ===============================  ===================================

*Frame-major* means the codes of one frame are consecutive:
``f0q0 f0q1 f0q2 f1q0 f1q1 ...``.

Ids: each (stream, level) owns its own slice of one embedding table, so code 5
of semantic and code 5 of acoustic level 2 are different ids. Two special ids
follow the slices: ``null_id`` replaces the CLAP prefix when conditioning is
dropped (classifier-free guidance) and ``pad_id`` fills windows longer than a
clip.

Positions: every slot of the sequence has a rotary position (:meth:`StageLayout.positions`).
With ``"time"`` (the default) a token's position is the time of its frame on one
grid for every stream, ticks of ``1 / lcm(frame rates)`` seconds (1/150 s at 50 and
75 Hz), counted from the window's start: a conditioning frame and the target frame
of the same instant share one, the levels of a frame share their frame's, and the
CLAP tokens, which hold for the whole window, sit at 0, before the timeline that
starts at 1. Attention then finds "the same instant" at a fixed relative distance
whatever the frame. With ``"index"`` the position is the slot's index in the flat
sequence (runs made before positions were a setting); there the distance between
an acoustic frame and its semantic frame grows along the window.

Labels: position ``i`` predicts the token at ``i + 1``. ``labels[i]`` is that
token's code within its codebook (``IGNORE`` where it is not a target token)
and ``label_levels[i]`` says which of the target's codebooks it belongs to, so
the output head predicts only the target stream, one codebook at a time.

A window is a dict of arrays cut from a :class:`~musiclm.shards.format.TokenSample`:
``{"clap": [L], "semantic": [T_s], "acoustic": [Q, T_a]}`` with only the
streams the layout uses.

Layer: models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from musiclm.config import StageConfig
from musiclm.errors import UserError
from musiclm.shards.format import TokenInfo, TokenSample

IGNORE = -100


@dataclass(frozen=True)
class Part:
    """Some levels of one stream, flattened frame-major into the sequence."""

    stream: str  # "clap" | "semantic" | "acoustic"
    levels: tuple[int, ...]  # levels of the stream as stored (acoustic: row of [Q, T_a])
    codebook_size: int
    frames: int  # frames in one window (clap: 1 window)

    @property
    def length(self) -> int:
        return self.frames * len(self.levels)


@dataclass(frozen=True)
class Encoded:
    """A window as model input: all arrays are [N] int64."""

    tokens: np.ndarray
    labels: np.ndarray  # code of tokens[i + 1] if it is a target token, else IGNORE
    label_levels: np.ndarray  # target codebook index of tokens[i + 1] (0 where IGNORE)


class StageLayout:
    """The sequence layout of one stage (see the module docstring)."""

    def __init__(self, stage: str, info: TokenInfo, window_seconds: float):
        self.stage = stage
        self.info = info
        self.window_seconds = float(window_seconds)
        sem, ac, clap = info.semantic, info.acoustic, info.clap
        c = info.coarse_levels
        n_sem = self.frames_of("semantic")
        n_ac = self.frames_of("acoustic")
        clap_part = Part("clap", tuple(range(clap.levels)), clap.codebook_size, 1)
        sem_part = Part("semantic", (0,), sem.codebook_size, n_sem)
        coarse = Part("acoustic", tuple(range(c)), ac.codebook_size, n_ac)
        fine = Part("acoustic", tuple(range(c, ac.levels)), ac.codebook_size, n_ac)
        if stage == "semantic":
            self.cond, self.target = (clap_part,), sem_part
        elif stage == "coarse":
            self.cond, self.target = (clap_part, sem_part), coarse
        elif stage == "fine":
            self.cond, self.target = (coarse,), fine
        else:
            raise UserError(f"unknown stage '{stage}': choose one of semantic, coarse, fine")
        if not self.target.levels:
            raise UserError(f"stage '{stage}' has no target levels: check tokenize.codec.coarse_quantizers")

        # one slice of the embedding table per (stream, level) this layout uses
        self.offsets: dict[tuple[str, int], int] = {}
        nxt = 0
        for part in (*self.cond, self.target):
            for level in part.levels:
                self.offsets[(part.stream, level)] = nxt
                nxt += part.codebook_size
        self.null_id = nxt
        self.pad_id = nxt + 1
        self.vocab_size = nxt + 2
        self.prefix_len = sum(p.length for p in self.cond)
        self.seq_len = self.prefix_len + self.target.length
        self.has_clap = any(p.stream == "clap" for p in self.cond)
        self.clap_len = clap_part.length if self.has_clap else 0  # the CLAP prefix is always first
        # the loader crops every sample: keep Fraction arithmetic out of that path
        self.tick = self._tick()
        self._window_frames = {s: self.frames_of(s) for s in self.streams}

    # ---- time ----------------------------------------------------------------
    def frames_of(self, stream: str, seconds: float | None = None) -> int:
        """Frames of ``stream`` in ``seconds`` (default: one window)."""
        seconds = self.window_seconds if seconds is None else seconds
        return int(round(Fraction(seconds).limit_denominator(10_000) * self.info.stream(stream).frame_rate))

    @property
    def streams(self) -> tuple[str, ...]:
        """Time streams (not clap) this layout reads."""
        return tuple(dict.fromkeys(p.stream for p in (*self.cond, self.target) if p.stream != "clap"))

    def _tick(self) -> Fraction:
        """The time grid (seconds) on which every used stream has a whole frame boundary."""
        rates = [self.info.stream(s).frame_rate for s in self.streams]
        g = rates[0]
        for r in rates[1:]:
            g = Fraction(math.gcd(g.numerator * r.denominator, r.numerator * g.denominator), g.denominator * r.denominator)
        return 1 / g

    @property
    def target_levels(self) -> int:
        return len(self.target.levels)

    @property
    def target_codebook(self) -> int:
        return self.target.codebook_size

    # ---- positions ---------------------------------------------------------------
    @property
    def ticks_per_second(self) -> Fraction:
        """The position grid: the least rate of which every time stream's frame rate divides a whole
        number of ticks per frame (150 at 50 and 75 Hz)."""
        rates = [s.frame_rate for s in (self.info.semantic, self.info.acoustic) if s.frame_rate]
        num, den = rates[0].numerator, rates[0].denominator
        for r in rates[1:]:
            num, den = math.lcm(num, r.numerator), math.gcd(den, r.denominator)
        return Fraction(num, den)

    def ticks_per_frame(self, stream: str) -> int:
        """Position ticks between consecutive frames of ``stream``."""
        return int(self.ticks_per_second / self.info.stream(stream).frame_rate)

    def positions(self, kind: str = "time") -> np.ndarray:
        """The rotary position of every slot of the sequence, [seq_len] int64 (see the module docstring).

        ``"index"``: the slot's index. ``"time"``: 0 for the CLAP tokens, ``1 + frame * ticks_per_frame``
        for a frame's tokens, so slots of the same instant in different streams share a position.
        Pad slots keep the position of the slot they fill."""
        if kind == "index":
            return np.arange(self.seq_len, dtype=np.int64)
        if kind != "time":
            raise ValueError(f"positions must be 'time' or 'index', got {kind!r}")
        pieces = []
        for part in (*self.cond, self.target):
            if part.stream == "clap":
                pieces.append(np.zeros(part.length, dtype=np.int64))
            else:
                frames = np.arange(part.frames, dtype=np.int64) * self.ticks_per_frame(part.stream)
                pieces.append(1 + np.repeat(frames, len(part.levels)))  # frame-major: a frame's levels share it
        return np.concatenate(pieces)

    # ---- training windows -----------------------------------------------------
    def crop(self, sample: TokenSample, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Cut one window from ``sample``: a random start on the frame grid, or the start when ``rng`` is None.

        Clips shorter than the window are taken whole; :meth:`encode` pads them.
        """
        tick = self.tick
        lengths = []
        for s in self.streams:
            n = sample.semantic.shape[-1] if s == "semantic" else sample.acoustic.shape[-1]
            lengths.append(Fraction(n) / self.info.stream(s).frame_rate)
        spare = min(lengths) - Fraction(self.window_seconds).limit_denominator(10_000)
        max_tick = max(int(spare / tick), 0)
        start_tick = int(rng.integers(0, max_tick + 1)) if rng is not None else 0
        return self.window_at(sample, float(start_tick * tick))

    def window_at(self, sample: TokenSample, start: float) -> dict[str, np.ndarray]:
        """The window of ``sample`` beginning at ``start`` seconds (must lie on :attr:`tick`)."""
        out: dict[str, np.ndarray] = {}
        if "semantic" in self.streams:
            a = self.frames_of("semantic", start)
            out["semantic"] = sample.semantic[a : a + self._window_frames["semantic"]]
        if "acoustic" in self.streams:
            a = self.frames_of("acoustic", start)
            out["acoustic"] = sample.acoustic[:, a : a + self._window_frames["acoustic"]]
        if self.has_clap:
            w = self.info.clap_window_for(start, self.window_seconds, len(sample.clap))
            out["clap"] = sample.clap[w]
        return out

    # ---- ids ---------------------------------------------------------------------
    def part_ids(self, part: Part, window: dict[str, np.ndarray], frames: int | None = None) -> np.ndarray:
        """Ids of ``part`` from ``window``, frame-major, for at most ``frames`` frames."""
        arr = window[part.stream]
        if part.stream == "clap":
            codes = np.asarray(arr, dtype=np.int64).reshape(1, -1)[:, list(part.levels)]  # [1, L]
        elif part.stream == "semantic":
            codes = np.asarray(arr, dtype=np.int64).reshape(-1, 1)  # [T, 1]
        else:
            codes = np.asarray(arr, dtype=np.int64)[list(part.levels)].T  # [T, levels]
        if frames is not None:
            codes = codes[:frames]
        offs = np.array([self.offsets[(part.stream, lv)] for lv in part.levels], dtype=np.int64)
        return (codes + offs).reshape(-1)

    def prefix(self, window: dict[str, np.ndarray], drop_cond: bool = False) -> np.ndarray:
        """The conditioning prefix, [prefix_len] int64 (shorter if the window is short).

        ``drop_cond`` replaces the CLAP tokens with ``null_id`` (the unconditional branch of guidance).
        """
        pieces = []
        for part in self.cond:
            ids = self.part_ids(part, window)
            if part.stream == "clap" and drop_cond:
                ids = np.full_like(ids, self.null_id)
            pieces.append(ids)
        return np.concatenate(pieces)

    def target_ids(self, window: dict[str, np.ndarray], frames: int | None = None) -> np.ndarray:
        return self.part_ids(self.target, window, frames)

    def target_level(self, j: int | np.ndarray) -> int | np.ndarray:
        """Target codebook index (0-based within the target part) of the ``j``-th target token."""
        return j % self.target_levels

    def target_offset(self, level_index: int) -> int:
        """First id of the ``level_index``-th target codebook."""
        return self.offsets[(self.target.stream, self.target.levels[level_index])]

    def encode(self, window: dict[str, np.ndarray], drop_cond: bool = False) -> Encoded:
        """Tokens and labels for one window, padded to :attr:`seq_len` with ``pad_id``."""
        prefix = self.prefix(window, drop_cond)
        target = self.target_ids(window)
        # a short clip may have fewer frames in one stream than another; keep whole frames only
        n_frames = min(len(target) // self.target_levels, self._cond_frames(window))
        target = target[: n_frames * self.target_levels]
        tokens = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        tokens[: len(prefix)] = prefix
        start = self.prefix_len
        tokens[start : start + len(target)] = target
        labels = np.full(self.seq_len, IGNORE, dtype=np.int64)
        levels = np.zeros(self.seq_len, dtype=np.int64)
        j = np.arange(len(target))
        lv = self.target_level(j)
        offs = np.array([self.target_offset(i) for i in range(self.target_levels)], dtype=np.int64)
        labels[start - 1 + j] = target - offs[lv]
        levels[start - 1 + j] = lv
        return Encoded(tokens, labels, levels)

    def _cond_frames(self, window: dict[str, np.ndarray]) -> int:
        """Target frames that the time-aligned conditioning covers (coarse: semantic is 2:3 of acoustic)."""
        limit = self.target.frames
        for part in self.cond:
            if part.stream == "clap":
                continue
            have = window[part.stream].shape[-1]
            if part.stream == self.target.stream:
                limit = min(limit, have)
            else:
                ratio = self.info.stream(self.target.stream).frame_rate / self.info.stream(part.stream).frame_rate
                limit = min(limit, int(have * ratio))
        return limit

    def decode_target(self, ids: np.ndarray) -> np.ndarray:
        """Target ids (frame-major, whole frames) back to codes: [levels, frames] (semantic: [frames])."""
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids) // self.target_levels
        frames = ids[: n * self.target_levels].reshape(n, self.target_levels)
        offs = np.array([self.target_offset(i) for i in range(self.target_levels)], dtype=np.int64)
        codes = (frames - offs).T
        if np.any(codes < 0) or np.any(codes >= self.target_codebook):
            raise ValueError("ids outside the target codebooks")
        return codes[0] if self.target.stream == "semantic" else codes

    def describe(self) -> str:
        parts = " + ".join(f"{p.stream}{list(p.levels)}x{p.frames}" for p in self.cond)
        t = self.target
        return f"{self.stage}: [{parts}] -> {t.stream}{list(t.levels)}x{t.frames} ({self.seq_len} tokens)"


def layout_for(stage: str, info: TokenInfo, stage_cfg: StageConfig) -> StageLayout:
    return StageLayout(stage, info, stage_cfg.window_seconds)
