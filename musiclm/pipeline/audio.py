"""Audio in: find files, probe them, read mono float32 segments, resample (audio out: :mod:`musiclm.pipeline.audio_out`).

Decoding is libsndfile (through ``soundfile``): WAV, FLAC, AIFF, AU, OGG
(Vorbis, Opus) and MP3. Resampling is ``soxr``. Anything a file does wrong
raises :class:`AudioError` with a short reason, so that the tokenize job can
record the file in ``errors/`` and go on with its neighbours.

Facts about libsndfile 1.2 that shape this module (measured, see tests):

- ``soundfile.SoundFile.read`` seeks to the new position after every read.
  For MP3 that seek restarts the decoder and the next few thousand samples
  come out wrong, so a range is always read with *one* ``read`` call.
- MP3 seeks land on the right sample but the decoder needs a few frames of
  bit reservoir before its output is exact; lossy formats are therefore read
  from ``_PREROLL`` frames before the start and the preroll is dropped.
- libsndfile never decodes past the frame count it reports. For MP3 that count
  comes from the Xing header (or an estimate) and a cut file decodes fewer
  frames, so :func:`probe` counts MP3 frames by decoding.
- A WAV/AIFF/AU whose header promises more data than the file holds is opened
  without complaint, its frame count silently shortened; the header's
  ``(should be N)`` note in ``extra_info`` is how a truncated file is told
  apart from a short one.
- An Ogg file's frame count comes from the granule position of its last page,
  and it may promise more than decodes: three of the 17 tracks of Debian's
  ``hyperrogue-music`` promise 104 frames more, and sox decodes them whole.
  A seek past the frames that decode may still "succeed" and read a frame, so
  :func:`probe` counts Ogg frames by decoding, as it does for MP3. When fewer
  decode than promised, the file is used with the frames that decode if the
  decoder reached the end without an error *and* the file ends with an intact
  Ogg page (its CRC right) that marks the end of the stream: nothing was cut
  off. ``AudioInfo.header_frames`` keeps the promise.
- A FLAC cut mid-frame makes the decoder fail ("lost sync"); one cut at a frame
  boundary decodes without a word from libsndfile. FLAC has no end-of-stream
  mark and its header's count is exact, so fewer frames than it promises is
  always truncation.

Layer: pipeline.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from musiclm.errors import UserError

# Suffixes (lower case, with the dot) of files that libsndfile decodes.
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".snd", ".w64", ".rf64", ".caf"}
)

# Frames decoded and dropped before the start of a range in lossy formats: a
# 16-frame MP3 bit reservoir at the largest frame size (1152 samples).
_PREROLL = 16 * 1152
_LOSSY_FORMATS = frozenset({"MP3", "OGG"})
# Streamed WAVs write this placeholder as the data size; it is not truncation.
_STREAMING_SIZE = 0xFFFFFFFF
_DECLARED_SIZE = re.compile(r"^\s*(?:data|SSND|Data Size)\s*:\s*(\d+)\s+\(should be (\d+)\)", re.MULTILINE)


class AudioError(Exception):
    """A file that cannot be used as audio. ``reason`` is one short line for errors/."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AudioInfo:
    frames: int  # frames that decode (per channel)
    sample_rate: int
    channels: int
    duration: float  # seconds, frames / sample_rate
    format: str  # libsndfile's container name: "WAV", "FLAC", "OGG", "MP3", ...
    subtype: str = ""  # libsndfile's encoding: "PCM_16", "FLOAT", "VORBIS", "OPUS", ...
    header_frames: int | None = None  # what the header promised when more than decode (an Ogg whose stream ends whole)


def list_audio_files(root: Path) -> list[Path]:
    """Every audio file under ``root``, recursively, sorted by relative path.

    Files only (a folder named ``x.wav`` is not one), chosen by suffix,
    case-insensitive (:data:`AUDIO_EXTENSIONS`). Symlinks are followed (each
    real folder is visited once, so link cycles end); hidden files and folders
    (name starting with ".") below ``root`` are skipped. Raises
    :class:`UserError` when ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"corpus folder {root} does not exist or is not a folder")
    found: list[tuple[tuple[str, ...], Path]] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        # Sorted so that when two links reach one folder, the same path wins every run.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath, name)
            if name.startswith(".") or path.suffix.lower() not in AUDIO_EXTENSIONS or not path.is_file():
                continue
            found.append((path.relative_to(root).parts, path))
    return [path for _, path in sorted(found)]


def audio_files_in(folder: Path | str, what: str = "corpus") -> list[Path]:
    """The audio files of ``folder`` (:func:`list_audio_files`); a :class:`UserError` naming
    ``what`` ("corpus", "reference", ...) when it is missing, is a file, or holds no audio."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{what} folder not found: {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"{what} must be a folder of audio files, got a file: {folder}")
    files = list_audio_files(folder)
    if not files:
        raise UserError(f"the {what} folder {folder} holds no audio files (wav, flac, ogg, opus, mp3, ...): point at a folder of music")
    return files


def probe(path: Path | str) -> AudioInfo:
    """What the file holds, checked to decode: frames, rate, channels, duration, format.

    ``frames`` are the frames that decode. When an Ogg header promises more and the
    stream ends whole (module docstring), ``header_frames`` keeps the promise.
    Raises :class:`AudioError` for a missing path, a folder, an empty file, a
    file libsndfile cannot open, a truncated file, or one with no frames.
    """
    path = Path(path)
    _check_is_file(path)
    try:
        with sf.SoundFile(path) as f:
            _check_declared_size(f)
            frames = _count_frames(f) if f.format == "MP3" else f.frames
            if frames <= 0:
                raise AudioError("no audio frames")
            header = None
            if f.format == "OGG":
                frames, header = _ogg_frames(f, path, frames)
            elif f.format != "MP3" and not _last_frame_decodes(f, frames):
                raise AudioError(_why_short(path, frames))
            return AudioInfo(frames, f.samplerate, f.channels, frames / f.samplerate, f.format, f.subtype, header)
    except (sf.LibsndfileError, RuntimeError) as error:
        raise AudioError(_decode_reason(error)) from error


def plan_segments(duration: float, max_seconds: float) -> list[tuple[float, float]]:
    """Split ``duration`` seconds into segments of exactly ``max_seconds``, with a tail that is never tiny.

    Returns ``[(start, seconds), ...]`` covering ``[0, duration]`` without gaps. A tail of at
    least half of ``max_seconds`` is a segment of its own; a shorter one is split equally with
    the last full segment, so that every segment of a file longer than ``max_seconds`` is at
    least half of it long. Most segments of a corpus then share one length and go through the
    backbones in one batch. A file of at most ``max_seconds`` is one segment; ``duration <= 0``
    gives none.
    """
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    if duration <= 0:
        return []
    # The tolerance keeps 90 / 30 from leaving a tail of 1e-14 s.
    full = max(0, math.floor(duration / max_seconds + 1e-9))
    tail = duration - full * max_seconds
    if tail <= 1e-9 * max(1.0, duration):
        tail = 0.0
    if full == 0:
        return [(0.0, duration)]
    segments = [(i * max_seconds, max_seconds) for i in range(full)]
    if tail >= max_seconds / 2:
        segments.append((full * max_seconds, tail))
    elif tail > 0:
        start = (full - 1) * max_seconds
        half = (max_seconds + tail) / 2
        segments[-1:] = [(start, half), (start + half, half)]
    return segments


def read_mono(path: Path | str, start: float = 0.0, seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode ``seconds`` of audio from ``start`` (to the end when None) as mono.

    Returns ``(x, sample_rate)``: ``x`` float32 ``[round(seconds * sr)]`` in
    [-1, 1], the mean over channels, at the file's own rate. Frames are
    ``round(start * sr)`` onwards; a range running past the end is cut at the
    end. Raises :class:`AudioError` for an unreadable, truncated or corrupt
    file, a start past the end, or a result with no samples.
    """
    path = Path(path)
    if start < 0 or (seconds is not None and seconds < 0):
        raise ValueError(f"start and seconds must be >= 0, got {start}, {seconds}")
    _check_is_file(path)
    try:
        with sf.SoundFile(path) as f:
            _check_declared_size(f)
            sr, total = f.samplerate, f.frames
            if total <= 0:
                raise AudioError("no audio frames")
            first = round(start * sr)
            if first >= total:
                raise AudioError(f"start {start:.3f} s is past the end ({total / sr:.3f} s)")
            wanted = total - first if seconds is None else min(round(seconds * sr), total - first)
            preroll = min(first, _PREROLL) if f.format in _LOSSY_FORMATS else 0
            if first - preroll:
                f.seek(first - preroll)
            # One read call: soundfile seeks after each read, which garbles MP3 (module docstring).
            x = f.read(preroll + wanted, dtype="float32", always_2d=True)[preroll:]
            if len(x) < wanted and f.format not in _LOSSY_FORMATS:
                # Lossy headers may overstate the length; a PCM/FLAC header does not.
                raise AudioError(f"truncated: {wanted} frames expected from {start:.3f} s, {len(x)} decoded")
    except (sf.LibsndfileError, RuntimeError) as error:
        raise AudioError(_decode_reason(error)) from error
    if len(x) == 0:
        raise AudioError("no audio samples decoded")
    if not np.isfinite(x).all():
        raise AudioError("corrupt: non-finite samples")
    mono = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    # Float files may hold values beyond full scale; the models expect [-1, 1].
    return np.clip(mono, -1.0, 1.0), sr


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample ``x`` ([frames] or [frames, channels]) from ``sr_in`` to ``sr_out`` Hz.

    soxr at "HQ" quality; float32 out, ``round(len(x) * sr_out / sr_in)``
    frames (soxr's own count can be one off for very short inputs).
    """
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if sr_in == sr_out:
        return x
    n_out = round(len(x) * sr_out / sr_in)
    if len(x) == 0:
        return np.zeros((0,) + x.shape[1:], np.float32)
    y = soxr.resample(x, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)
    if len(y) > n_out:
        return np.ascontiguousarray(y[:n_out])
    if len(y) < n_out:
        return np.concatenate([y, np.zeros((n_out - len(y),) + y.shape[1:], np.float32)])
    return y


def load_for_rates(path: Path | str, start: float, seconds: float | None, rates: Iterable[int]) -> dict[int, np.ndarray]:
    """Decode one mono range once (see :func:`read_mono`) and resample it to each rate.

    Returns ``{rate: float32 [round(frames * rate / sr)]}``. Raises
    :class:`AudioError` like :func:`read_mono`.
    """
    x, sr = read_mono(path, start, seconds)
    return {rate: resample(x, sr, rate) for rate in dict.fromkeys(int(r) for r in rates)}


def _check_is_file(path: Path) -> None:
    if not path.exists():
        raise AudioError("no such file")
    if not path.is_file():
        raise AudioError("not a file")
    if path.stat().st_size == 0:
        raise AudioError("empty file")


def _check_declared_size(f: sf.SoundFile) -> None:
    """Refuse a WAV/AIFF/AU whose data chunk is shorter than its header says."""
    for declared, actual in _DECLARED_SIZE.findall(f.extra_info):
        declared, actual = int(declared), int(actual)
        if actual < declared != _STREAMING_SIZE:
            raise AudioError(f"truncated: header declares {declared} data bytes, file holds {actual}")


def _last_frame_decodes(f: sf.SoundFile, frames: int) -> bool:
    """Whether the last frame the header promises decodes: a FLAC or Ogg cut short opens fine and fails only here."""
    try:
        f.seek(frames - 1)
        return len(f.read(1, dtype="float32")) == 1
    except (sf.LibsndfileError, RuntimeError):
        return False


def _ogg_frames(f: sf.SoundFile, path: Path, promised: int) -> tuple[int, int | None]:
    """(frames that decode, what the header promised when more) of an Ogg file, counted by decoding
    it all; raises :class:`AudioError` unless the decoder ends without an error and, when it ends
    early, the file ends with a whole end-of-stream page (module docstring)."""
    frames, error = _decode_to_the_end(f)
    if error:
        raise AudioError(f"truncated or corrupt: decoding stops after {frames} of {promised} frames ({error})")
    if frames >= promised:
        return promised, None
    if frames == 0:
        raise AudioError(f"no audio frames decode (the header promises {promised})")
    if not _ogg_ends_whole(path):
        raise AudioError(f"truncated: the header promises {promised} frames, the stream ends after {frames} without its end-of-stream page")
    return frames, promised


def _why_short(path: Path, promised: int) -> str:
    """The reason for a file whose last promised frame does not decode: how far it decodes, and why it stops."""
    try:
        with sf.SoundFile(path) as f:  # a fresh handle: a failed seek can leave the first one unusable
            frames, error = _decode_to_the_end(f)
    except (sf.LibsndfileError, RuntimeError) as e:
        frames, error = 0, str(e)
    if error:
        return f"truncated or corrupt: decoding stops after {frames} of {promised} frames ({error})"
    return f"truncated: the header promises {promised} frames, the stream ends after {frames}"


def _decode_to_the_end(f: sf.SoundFile) -> tuple[int, str]:
    """(frames decoded from the start until the decoder stops, its error or "").

    libsndfile is called directly: ``SoundFile.read`` seeks after every read, and at an early
    end of a FLAC that seek fails whatever the decoder said, so its error would say nothing."""
    f.seek(0)
    block = np.empty((1 << 16, f.channels), np.float32)
    out = sf._ffi.cast("float *", block.ctypes.data)
    total = 0
    while True:
        n = sf._snd.sf_readf_float(f._file, out, len(block))
        total += n
        if sf._snd.sf_error(f._file):
            message = sf._ffi.string(sf._snd.sf_strerror(f._file)).decode("utf-8", "replace")
            return total, re.sub(r"^\s*Error\s*:\s*", "", message).strip()  # libsndfile's "Error : flac decoder lost sync."
        if n == 0:
            return total, ""


def _ogg_ends_whole(path: Path) -> bool:
    """Whether the file's bytes end exactly with an Ogg page whose CRC is right and that marks the
    end of its logical stream (header type flag 0x04): a file cut anywhere ends otherwise."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - _OGG_MAX_PAGE))
        tail = fh.read()
    at = len(tail)
    while (at := tail.rfind(b"OggS", 0, at)) >= 0:
        page = tail[at:]
        if len(page) >= 27 and len(page) >= 27 + page[26]:
            body = 27 + page[26] + sum(page[27 : 27 + page[26]])
            if body == len(page):  # the page that ends the file
                crc = struct.unpack_from("<I", page, 22)[0]
                return bool(page[5] & 0x04) and crc == _ogg_crc(page[:22] + b"\0\0\0\0" + page[26:])
    return False


def _ogg_crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else r << 1
        table.append(r & 0xFFFFFFFF)
    return tuple(table)


_OGG_CRC = _ogg_crc_table()
_OGG_MAX_PAGE = 27 + 255 + 255 * 255  # header, segment table, body


def _ogg_crc(data: bytes) -> int:
    """The CRC-32 of an Ogg page (polynomial 0x04c11db7, not reflected, initial value 0), computed with
    the page's own CRC field set to zero."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[(crc >> 24) ^ byte]
    return crc


def _count_frames(f: sf.SoundFile) -> int:
    """Frames that actually decode, read block by block (the data is garbled by
    soundfile's seek between reads, the count is not)."""
    block = np.empty((1 << 16, f.channels), np.float32)
    total = 0
    while True:
        n = len(f.read(out=block))
        total += n
        if n < len(block):
            return total


def _decode_reason(error: Exception) -> str:
    # Drop soundfile's "Error opening '<path>': " prefix: the path is recorded beside the reason.
    message = re.sub(r"^Error opening .*?: ", "", str(error)).strip()
    if message.startswith("File does not exist or is not a regular file"):
        # libsndfile's words when its MP3 reader finds no MP3 frame in a regular file.
        message = "format not recognised"
    return f"cannot decode: {message}"
