"""Audio out: a finished waveform written as a WAV or FLAC file, or streamed as a WAV to a pipe as it is made.

Layer: pipeline.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO, Self

import numpy as np
import soundfile as sf


def write_audio(path: Path | str, audio: np.ndarray, sr: int, fmt: str | None = None) -> None:
    """Write ``audio`` ([frames] or [frames, channels]) as 16-bit PCM WAV or FLAC.

    The format is ``fmt`` ("wav" or "flac") or else the path's suffix. Float
    input is clipped to [-1, 1] first (libsndfile would wrap it). Parent
    folders are created.
    """
    path = Path(path)
    kind = (fmt or path.suffix.lstrip(".")).lower()
    formats = {"wav": "WAV", "wave": "WAV", "flac": "FLAC"}
    if kind not in formats:
        raise ValueError(f"write_audio writes wav or flac, not {kind!r} ({path})")
    audio = np.asarray(audio)
    if audio.dtype.kind == "f":
        audio = np.clip(audio, -1.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, sr, format=formats[kind], subtype="PCM_16")


class WavStream:
    """16-bit PCM mono WAV written front to back to a binary stream that cannot seek (a pipe, stdout).

    The header goes out in the constructor with the data size of ``total_samples``, so a
    player can start at once and nothing is ever patched; :meth:`write` sends float audio
    [s] (clipped to [-1, 1], scaled by 32767) and flushes, so each chunk reaches the pipe as
    it is written. Writing more samples than announced raises ValueError before anything
    is written; :meth:`close` raises ValueError if fewer were. ``fileobj`` (e.g.
    ``sys.stdout.buffer``) is flushed, never closed. The stdlib ``wave`` writer is not used
    because it seeks to patch its header whenever the count is off, even from its
    destructor, which on a pipe raises.
    """

    def __init__(self, fileobj: BinaryIO, sample_rate: int, total_samples: int):
        data_bytes = 2 * total_samples
        if sample_rate <= 0 or total_samples < 0 or 36 + data_bytes > 0xFFFFFFFF:
            raise ValueError(f"a WAV stream needs sample_rate > 0 and 0 <= total_samples < 2**31 - 18, got {sample_rate}, {total_samples}")
        self.fileobj, self.sample_rate, self.total_samples = fileobj, sample_rate, total_samples
        self.written = 0
        # RIFF size, "fmt " chunk (PCM = 1, 1 channel, rate, bytes/s, block align 2, 16 bits), "data" size.
        fileobj.write(struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16, b"data", data_bytes))
        fileobj.flush()

    def write(self, chunk: np.ndarray) -> None:
        """Append mono float audio [s] and flush it."""
        chunk = np.asarray(chunk)
        if chunk.ndim != 1:
            raise ValueError(f"WavStream writes mono audio [samples], got shape {list(chunk.shape)}")
        if self.written + len(chunk) > self.total_samples:
            raise ValueError(f"WAV stream announced {self.total_samples} samples; {self.written} written, {len(chunk)} more would overrun the header")
        pcm = np.rint(np.clip(chunk, -1.0, 1.0) * 32767).astype("<i2")
        self.fileobj.write(pcm.tobytes())
        self.fileobj.flush()
        self.written += len(chunk)

    def close(self) -> None:
        """Flush; raises ValueError when fewer samples were written than the header announced."""
        self.fileobj.flush()
        if self.written != self.total_samples:
            raise ValueError(f"WAV stream announced {self.total_samples} samples but {self.written} were written: the file is truncated")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:  # after an error the count is wrong anyway; let that error speak
            self.close()
