"""Synthetic corpora for tests and the demo: folders of :mod:`musiclm.pipeline.synth` clips in several
containers, encodings, rates and channel counts, and files that must fail to decode.

:func:`make_corpus` writes a corpus; :func:`corpus_plan` says what it writes, file by file (so tests can
re-render a file's source); :func:`make_bad_files` writes files that must not decode.

Layer: pipeline.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from musiclm.pipeline.synth import KINDS, synth_clip

# suffix -> (libsndfile container, encodings cycled through, sample rates the codec accepts or None for any)
FORMATS: dict[str, tuple[str, tuple[str, ...], tuple[int, ...] | None]] = {
    "wav": ("WAV", ("PCM_16", "PCM_24", "FLOAT"), None),
    "flac": ("FLAC", ("PCM_16", "PCM_24"), None),
    "aiff": ("AIFF", ("PCM_16", "PCM_24"), None),
    "au": ("AU", ("PCM_16", "FLOAT"), None),
    "ogg": ("OGG", ("VORBIS",), None),
    "opus": ("OGG", ("OPUS",), (8000, 12000, 16000, 24000, 48000)),
    "mp3": ("MP3", ("MPEG_LAYER_III",), (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)),
}
LOSSLESS = frozenset({"wav", "flac", "aiff", "au"})


@dataclass(frozen=True)
class ClipSpec:
    """One file of a synthetic corpus: where it goes, what it holds, how it is encoded."""

    relpath: str  # POSIX path relative to the corpus root
    kind: str
    seconds: float
    sample_rate: int
    channels: int
    seed: int
    format: str  # libsndfile container: "WAV", "FLAC", "OGG", "MP3", ...
    subtype: str  # libsndfile encoding: "PCM_16", "FLOAT", "VORBIS", "OPUS", ...

    @property
    def lossless(self) -> bool:
        return Path(self.relpath).suffix.lstrip(".") in LOSSLESS

    def render(self) -> np.ndarray:
        """The clip as synthesised, before encoding: float32 [frames] or [frames, channels]."""
        return synth_clip(self.kind, self.seconds, self.sample_rate, self.seed, self.channels)


def available_formats(formats=tuple(FORMATS)) -> tuple[str, ...]:
    """The suffixes among ``formats`` that this libsndfile build can write (others are skipped)."""
    containers = sf.available_formats()
    usable = []
    for suffix in formats:
        if suffix not in FORMATS:
            raise ValueError(f"unknown format {suffix!r}; choose from {', '.join(FORMATS)}")
        container, subtypes, _ = FORMATS[suffix]
        if container in containers and all(s in sf.available_subtypes(container) for s in subtypes):
            usable.append(suffix)
    return tuple(usable)


def corpus_plan(
    n_files: int,
    seconds: tuple[float, float] = (4.0, 12.0),
    seed: int = 0,
    formats=("wav", "flac", "ogg", "mp3"),
    rates=(16000, 22050, 44100, 48000),
    stereo_every: int = 3,
    subfolders: bool = True,
) -> list[ClipSpec]:
    """What :func:`make_corpus` writes, file by file, without writing anything.

    Kinds cycle through :data:`KINDS`; formats take turns; within a format,
    encodings cycle and rates advance once per encoding cycle, so every
    (encoding, rate) pair appears (a codec with fixed rates takes the nearest);
    every ``stereo_every``-th file is stereo (0: none); lengths are drawn
    uniformly from ``seconds``. Formats this build cannot write are skipped.
    """
    usable = available_formats(formats)
    if not usable:
        raise ValueError(f"this libsndfile build writes none of {formats}")
    rng = np.random.default_rng(seed)
    per_format = {suffix: 0 for suffix in usable}
    specs = []
    for i in range(n_files):
        suffix = usable[i % len(usable)]
        container, subtypes, allowed = FORMATS[suffix]
        j = per_format[suffix]
        per_format[suffix] += 1
        # Encodings cycle fastest, rates once per encoding cycle: every pair turns up.
        rate = rates[(j // len(subtypes) + usable.index(suffix)) % len(rates)]
        if allowed is not None:
            rate = min(allowed, key=lambda r: (abs(r - rate), r))
        kind = KINDS[i % len(KINDS)]
        name = f"{i:03d}_{kind}.{suffix}"
        # Depth varies (root, one and two folders down) so listing is tested on nesting.
        if subfolders and i % 4:
            folder = f"artist_{i % 3}" if i % 4 == 1 else f"artist_{i % 3}/album_{(i // 4) % 2}"
            name = f"{folder}/{name}"
        specs.append(
            ClipSpec(
                relpath=name,
                kind=kind,
                seconds=round(float(rng.uniform(*seconds)), 3),
                sample_rate=int(rate),
                channels=2 if stereo_every and i % stereo_every == stereo_every - 1 else 1,
                seed=seed * 100_003 + i,
                format=container,
                subtype=subtypes[j % len(subtypes)],
            )
        )
    return specs


def make_corpus(
    root: Path,
    n_files: int,
    seconds: tuple[float, float] = (4.0, 12.0),
    seed: int = 0,
    formats=("wav", "flac", "ogg", "mp3"),
    rates=(16000, 22050, 44100, 48000),
    stereo_every: int = 3,
    subfolders: bool = True,
) -> list[Path]:
    """Write the corpus of :func:`corpus_plan` under ``root``; returns the paths written, in plan order."""
    root = Path(root)
    paths = []
    for spec in corpus_plan(n_files, seconds, seed, formats, rates, stereo_every, subfolders):
        path = root / spec.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, spec.render(), spec.sample_rate, format=spec.format, subtype=spec.subtype)
        paths.append(path)
    return paths


def make_bad_files(root: Path) -> dict[str, Path]:
    """Write files that must not decode, under ``root``; returns ``{name: path}``.

    empty (0 bytes), truncated_data (WAV header promises 1 s, half is there),
    truncated_header (WAV cut inside its header), truncated_flac (FLAC cut in
    half), no_frames (valid WAV header, no samples), random_bytes (.flac),
    text (.mp3), directory (a folder named x.wav).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sr = 16000
    clip = synth_clip("tone", 1.0, sr, seed=0)
    bad = {name: root / file for name, file in _BAD_NAMES.items()}

    bad["empty"].write_bytes(b"")
    sf.write(bad["truncated_data"], clip, sr, subtype="PCM_16")
    whole = bad["truncated_data"].read_bytes()
    bad["truncated_data"].write_bytes(whole[: len(whole) // 2])
    bad["truncated_header"].write_bytes(whole[:20])
    sf.write(bad["truncated_flac"], clip, sr, subtype="PCM_16")
    whole = bad["truncated_flac"].read_bytes()
    bad["truncated_flac"].write_bytes(whole[: len(whole) // 2])
    bad["no_frames"].write_bytes(_wav_header(sr, data_bytes=0))
    bad["random_bytes"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    bad["text"].write_text("This is not an MP3 file, it is a note about one.\n" * 20)
    bad["directory"].mkdir(exist_ok=True)
    return bad


_BAD_NAMES = {
    "empty": "empty.wav",
    "truncated_data": "truncated_data.wav",
    "truncated_header": "truncated_header.wav",
    "truncated_flac": "truncated.flac",
    "no_frames": "no_frames.wav",
    "random_bytes": "random_bytes.flac",
    "text": "text.mp3",
    "directory": "x.wav",
}


def _wav_header(sr: int, data_bytes: int) -> bytes:
    """A canonical 44-byte mono 16-bit PCM WAV header."""
    return (
        b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sr, sr * 2, 2, 16)
        + b"data" + struct.pack("<I", data_bytes)
    )
