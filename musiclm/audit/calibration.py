"""Thresholds for the audit verdict, calibrated on the corpus itself, automatically.

Up to :data:`EXCERPTS` files of the corpus are drawn (seeded, one excerpt
each, from different files). An excerpt is one CLAP window long (10 s in the
small preset), starts at a random time that is not a multiple of a frame, and
goes through the lossy round trip a copy in the wild goes through: it is read
from the corpus audio (the folder named in ``manifest.json``), encoded to MP3
and decoded (when libsndfile writes MP3), then tokenized like any query. Each
excerpt is searched twice:

- **copied**: against the whole index, its own file included. The score of its
  own file is what a copy of training audio scores (and whether the offset
  came out right within 0.5 s is counted too);
- **novel**: against the index without any clip of its own file. The best
  score of another file is what new music of the same kind scores.

For each signal (``semantic``, ``clap``) the threshold is

- halfway between the highest novel score and the 10th percentile of the
  copied scores when those are apart ("separated");
- otherwise just above the highest novel score ("overlapping"): nothing that
  calibrated as novel is flagged, and the share of copies still caught is
  reported as the recall.

A signal takes part in the verdict only when at least half of the copies
reach its threshold (``used``); on a corpus where one cannot tell copies
from new music (random backbones, CLAP in the ``tiny`` preset) it is reported
and not used. A file is flagged when a used signal's score reaches its
threshold.

Without the corpus audio (moved, or never named), excerpts are cut from the
stored tokens instead (phase 0; the CLAP window stored nearest the excerpt).
Those copies are exact, so the copied side is optimistic; ``calibration.from``
says which was used. Calibration runs when the index is built or extended and
is stored in ``audit/index.json``.

Layer: audit.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from musiclm.audit.index import AuditIndex
from musiclm.audit.search import Query, search

EXCERPTS = 64
MIN_FILES = 4
SEED = 0
COPIED_QUANTILE = 0.1
MIN_RECALL = 0.5
OFFSET_TOLERANCE = 0.5  # seconds
SIGNALS = ("semantic", "clap")


def corpus_root(data_dir: Path) -> Path | None:
    """The corpus folder named by ``DIR/manifest.json`` when it still exists."""
    try:
        root = Path(json.loads((Path(data_dir) / "manifest.json").read_text())["corpus"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return root if root.is_dir() else None


def _files(index: AuditIndex) -> dict[str, list[int]]:
    """source → its clips' global ids, in order."""
    out: dict[str, list[int]] = {}
    for s, sh in enumerate(index.shards):
        for pos, source in enumerate(sh.table["source"]):
            out.setdefault(str(source), []).append(int(index.clip_offsets[s]) + pos)
    return out


def threshold(copied: list[float], novel: list[float]) -> dict[str, Any]:
    """The threshold of one signal from its copied and novel scores (see the module docstring)."""
    c, n = np.asarray(copied, float), np.asarray(novel, float)
    novel_hi = float(n.max()) if len(n) else 0.0
    copied_lo = float(np.quantile(c, COPIED_QUANTILE)) if len(c) else 0.0
    if copied_lo > novel_hi:
        t, how = (novel_hi + copied_lo) / 2, "separated"
    else:
        t, how = novel_hi + 0.01 * (1.0 - novel_hi) + 1e-6, "overlapping"
    recall = float((c >= t).mean()) if len(c) else 0.0
    return {
        "threshold": round(t, 6),
        "how": how,
        "used": recall >= MIN_RECALL,
        "recall": round(recall, 4),
        "novel_max": round(novel_hi, 4),
        "copied_p10": round(copied_lo, 4),
        "copied": [round(x, 4) for x in sorted(c)],
        "novel": [round(x, 4) for x in sorted(n)],
    }


def _lossy(x: np.ndarray, sr: int) -> tuple[np.ndarray, int]:
    """An MP3 round trip of mono audio when libsndfile writes MP3 (else the audio as it is)."""
    import soundfile as sf

    from musiclm.pipeline.audio import resample

    if "MP3" not in sf.available_formats():
        return x, sr
    rate = sr if sr in (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000) else 44100
    buf = io.BytesIO()
    sf.write(buf, resample(x, sr, rate), rate, format="MP3")
    buf.seek(0)
    y, _ = sf.read(buf, dtype="float32")
    return y, rate


def _audio_query(tokenizer, path: Path, start: float, seconds: float) -> Query | None:
    from musiclm.audit.tokens import query_from_audio
    from musiclm.pipeline.audio import AudioError, read_mono, resample

    try:
        x, sr = read_mono(path, start, seconds)
    except AudioError:
        return None
    y, rate = _lossy(x, sr)
    return query_from_audio(tokenizer, {r: resample(y, rate, r) for r in tokenizer.sample_rates})


def _token_query(index: AuditIndex, gid: int, start: float, seconds: float) -> Query:
    clip = index.read_clips([gid])[gid]
    rate = index.rate
    a = round(start * rate)
    semantic = clip.semantic[a : a + round(seconds * rate)].astype(np.int64)[None]
    hop = index.info.clap_hop_seconds
    w = min(len(clip.clap_emb) - 1, max(0, round(start / hop))) if hop > 0 else 0
    return Query(semantic, np.zeros(1), np.asarray(clip.clap_emb[w : w + 1], np.float32), seconds)


def calibrate(index: AuditIndex, tokenizer=None, root: Path | None = None, excerpts: int = EXCERPTS, progress=None) -> dict[str, Any]:
    """Calibrate the thresholds of ``index`` (see the module docstring). ``tokenizer`` and ``root`` (the corpus
    folder) give the audio route; without either, excerpts come from the stored tokens. Returns the record
    stored under ``calibration`` in ``audit/index.json``."""
    files = _files(index)
    rng = np.random.default_rng(SEED)
    names = sorted(files)
    chosen = [names[i] for i in rng.permutation(len(names))[:excerpts]]
    window = index.info.clap_window_seconds
    use_audio = tokenizer is not None and root is not None
    scores: dict[str, dict[str, list[float]]] = {s: {"copied": [], "novel": []} for s in SIGNALS}
    offsets_right, cases = 0, []
    for i, source in enumerate(chosen):
        gids = files[source]
        clips = [index.clip(g) for g in gids]
        # the segment with the most room for a window (all segments of a file but its last are equal)
        pick = max(range(len(clips)), key=lambda j: clips[j]["duration"])
        clip = clips[pick]
        seconds = min(window, 0.8 * clip["duration"])
        start_in_clip = float(rng.uniform(0.0, clip["duration"] - seconds))
        q = None
        if use_audio:
            q = _audio_query(tokenizer, Path(root) / source, clip["start"] + start_in_clip, seconds)
        if q is None:
            q = _token_query(index, gids[pick], start_in_clip, seconds)
        truth = clip["start"] + start_in_clip  # source time of the excerpt's first second
        own = [m for m in search(index, q) if m.source == source]
        others = search(index, q, exclude=np.asarray(gids, np.int64))
        best_own = max(own, key=lambda m: m.semantic) if own else None
        right = best_own is not None and abs(best_own.offset - truth) <= OFFSET_TOLERANCE
        offsets_right += right
        for s in SIGNALS:
            scores[s]["copied"].append(max((getattr(m, s) for m in own), default=0.0))
            scores[s]["novel"].append(max((getattr(m, s) for m in others), default=0.0))
        cases.append(
            {
                "source": source,
                "start": round(truth, 3),
                "seconds": round(seconds, 3),
                "copied": {s: round(scores[s]["copied"][-1], 4) for s in SIGNALS},
                "novel": {s: round(scores[s]["novel"][-1], 4) for s in SIGNALS},
                "nearest_other": others[0].source if others else None,
                "offset_right": bool(right),
            }
        )
        if progress is not None:
            progress(i + 1, len(chosen))
    return {
        "from": "audio" if use_audio else "tokens",
        "lossy": use_audio and _mp3_writable(),
        "excerpts": len(chosen),
        "excerpt_seconds": window,
        "offsets_right": round(offsets_right / max(1, len(chosen)), 4),
        "clips": index.clips,
        **{s: threshold(scores[s]["copied"], scores[s]["novel"]) for s in SIGNALS},
        "cases": cases,
    }


def _mp3_writable() -> bool:
    import soundfile as sf

    return "MP3" in sf.available_formats()


def verdict(calibration: dict[str, Any], semantic: float, clap: float) -> list[str]:
    """The signals by which scores ``semantic`` and ``clap`` are flagged (empty: not flagged)."""
    values = {"semantic": semantic, "clap": clap}
    return [s for s in SIGNALS if calibration[s]["used"] and values[s] >= calibration[s]["threshold"]]
