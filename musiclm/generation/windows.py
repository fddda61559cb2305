"""Window planning: which sampling calls fill a stage's timeline, and what each one sees.

A stage never sees a sequence longer than it was trained on (its
:class:`~musiclm.models.layout.StageLayout`), so any duration is sampled in
windows of the stage's length:

- the first window is sampled whole; each next one starts half a window later
  and is primed with the frames it shares with the one before (they are fed as
  ``target_prompt``, not sampled again), so the music runs on without a seam;
- window starts lie on the time grid where semantic and acoustic frames both
  begin (:attr:`StageLayout.tick`, 40 ms at 50/75 Hz), so the coarse window over
  [t0, t1) is conditioned on exactly the semantic frames of [t0, t1), and the
  fine window on the coarse frames of the same span;
- every window is as long as the layout's: the last one starts at most half a
  window after the one before, so that it ends with the timeline, and is primed
  with all it shares with what exists. Only a timeline shorter than a stage's
  window gets a short one, whose conditioning prefix is padded with ``pad_id``
  up to the target, as training does for clips shorter than a window.

**Story mode.** With prompts p_0 .. p_{n-1} and ``every = E`` seconds, a window
whose start lies in [i*E, (i+1)*E) seconds of the output is conditioned on p_i
(the last prompt holds to the end; a window that starts inside a continued
prompt audio uses p_0). Windows overlap, so the music stays continuous where the
prompt changes.

Layer: generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from musiclm.models.layout import StageLayout
from musiclm.shards.format import TokenInfo


@dataclass(frozen=True)
class Window:
    """One sampling call of ``stage``: target frames [start, end) of its stream, of which [start, known)
    already existed and were fed as ``target_prompt``. ``prompt`` indexes the text prompt whose CLAP
    tokens conditioned it (None for the fine stage, which has no CLAP prefix). The last window's
    ``end`` may pass the output's last frame by less than a tick. ``index`` counts the stage's
    windows from 0 (it seeds the window's random numbers)."""

    stage: str
    start: int
    known: int
    end: int
    prompt: int | None
    index: int = 0


def plan_windows(total: int, known: int, window: int, hop: int, align: int) -> list[tuple[int, int, int]]:
    """Sampling calls that fill frames [known, total) of one stream: ``(start, known, end)`` per window.

    Windows start ``hop`` frames apart on multiples of ``align`` and are primed with [start, known),
    the frames they share with what exists; the first starts as late as leaves it ``window - hop``
    frames of context (0 when nothing exists yet). When ``total >= window`` every window spans
    exactly ``window`` frames: the last one starts further back (still on the grid) so that it ends
    at ``total`` rounded up to a multiple of ``align``, and the caller must hold the frames up to
    there. Only a stream shorter than one window gets a shorter one, ``(0, known, total)``.
    """
    if not 0 < align <= hop <= window:
        raise ValueError(f"need 0 < align <= hop <= window, got align={align}, hop={hop}, window={window}")
    out = []
    start = max(0, known - (window - hop)) // align * align
    while known < total:
        if start + window >= total:
            # the last window: cut short at the stream's end, its conditioning would fill only part
            # of the prefix and leave pad ids before the target, which training shows only for clips
            # shorter than a window; moved back on the grid, it stays whole, primed with more context
            start = max(0, -(-(total - window) // align) * align)
        end = start + window if total >= window else total
        out.append((start, known, end))
        known, start = end, start + hop
    return out


def plan_stage(
    layout: StageLayout, tick: Fraction, total: int, known: int, n_prompts: int, every: float | None, prompt_seconds: Fraction
) -> list[Window]:
    """The windows of one stage over frames [known, total) of its target stream, with their text prompt.

    ``tick``: the grid in seconds; ``prompt_seconds``: the continued prompt audio's length (the output
    starts there, and story mode counts from it)."""
    rate = layout.info.stream(layout.target.stream).frame_rate
    align = int(rate * tick)
    window = layout.target.frames
    hop = max(align, window // 2 // align * align)
    every_f = None if every is None else Fraction(every).limit_denominator(10_000)
    out = []
    for i, (start, k, end) in enumerate(plan_windows(total, known, window, hop, align)):
        prompt = None
        if layout.has_clap:
            prompt = 0
            if every_f is not None:
                t = Fraction(start) / rate - prompt_seconds  # seconds into the output
                prompt = min(max(math.floor(t / every_f), 0), n_prompts - 1)
        out.append(Window(layout.stage, start, k, end, prompt, i))
    return out


def span(info: TokenInfo, layout: StageLayout, w: Window, stream: str) -> tuple[int, int]:
    """Frames [a, e) of ``stream`` that window ``w`` reads (its target span in that stream's frames;
    starts lie on the grid, so ``a`` is exact)."""
    ratio = info.stream(stream).frame_rate / info.stream(layout.target.stream).frame_rate
    return int(w.start * ratio), math.ceil(w.end * ratio)


def window_arrays(info: TokenInfo, layout: StageLayout, streams: dict[str, np.ndarray], b: int, w: Window, clap_codes: np.ndarray) -> dict[str, np.ndarray]:
    """Row ``b``'s arrays for window ``w`` (the layout's window dict): every time stream cut to the
    window's span, the text prompt's CLAP tokens."""
    win: dict[str, np.ndarray] = {}
    for stream in layout.streams:
        a, e = span(info, layout, w, stream)
        win[stream] = streams[stream][b][..., a:e]
    if layout.has_clap:
        win["clap"] = clap_codes[w.prompt]
    return win


def padded_prefix(layout: StageLayout, window: dict[str, np.ndarray], drop_cond: bool = False) -> np.ndarray:
    """The conditioning prefix [prefix_len]: a short window's prefix is followed by pad ids, as in training."""
    prefix = layout.prefix(window, drop_cond)
    out = np.full(layout.prefix_len, layout.pad_id, dtype=np.int64)
    out[: len(prefix)] = prefix
    return out
