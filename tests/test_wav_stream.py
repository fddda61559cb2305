"""WavStream (musiclm/pipeline/audio.py): a WAV written to a pipe, header first, never seeking.

A pipe cannot seek (``lseek`` fails with ESPIPE), so every test here that writes into one
also shows the writer never seeks.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import soundfile as sf

from musiclm.pipeline.audio_out import WavStream
from tests.conftest import ROOT

HEADER = 44  # bytes of a canonical PCM WAV header


class PipeReader:
    """The read end of an ``os.pipe()`` drained by a thread into ``data``; :meth:`wait_for` blocks until n bytes came."""

    def __init__(self, fd: int):
        self.data = bytearray()
        self._arrived = threading.Condition()
        self._thread = threading.Thread(target=self._drain, args=(fd,), daemon=True)
        self._thread.start()

    def _drain(self, fd: int) -> None:
        with os.fdopen(fd, "rb", buffering=0) as f:
            while block := f.read(1 << 16):
                with self._arrived:
                    self.data += block
                    self._arrived.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> int:
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.data) >= n, timeout)
            return len(self.data)

    def join(self) -> bytes:
        self._thread.join(10.0)
        return bytes(self.data)


def music(n: int, seed: int = 0) -> np.ndarray:
    """float32 [n] that crosses full scale now and then, so that clipping is exercised."""
    rng = np.random.default_rng(seed)
    return (1.2 * np.sin(np.arange(n) / 7.0) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def test_pipe_gets_the_header_first_and_each_chunk_as_it_is_written():
    x = music(24000)
    r, w = os.pipe()
    reader = PipeReader(r)
    with os.fdopen(w, "wb") as pipe:
        stream = WavStream(pipe, 24000, len(x))
        assert reader.wait_for(HEADER) == HEADER  # a player can open the stream before any audio exists
        at = 0
        for n in (1, 4799, 0, 10000, 9200):  # uneven chunks, an empty one among them
            stream.write(x[at : at + n])
            at += n
            assert reader.wait_for(HEADER + 2 * at) == HEADER + 2 * at  # flushed, not held in a buffer
        stream.close()
    data = reader.join()
    # The sizes in the header are exact (libsndfile would read a header that overstates them without a word).
    fields = struct.unpack("<4sI4s4sIHHIIHH4sI", data[:HEADER])
    assert fields == (b"RIFF", 36 + 2 * len(x), b"WAVE", b"fmt ", 16, 1, 1, 24000, 48000, 2, 16, b"data", 2 * len(x))
    assert len(data) == HEADER + 2 * len(x)
    pcm, sr = sf.read(io.BytesIO(data), dtype="int16")
    assert sr == 24000
    assert np.array_equal(pcm, np.rint(np.clip(x, -1, 1) * 32767).astype(np.int16))
    back, _ = sf.read(io.BytesIO(data), dtype="float32")
    assert np.abs(back - np.clip(x, -1, 1)).max() < 1.5 / 32767


def test_more_or_fewer_samples_than_announced_are_refused():
    out = io.BytesIO()
    stream = WavStream(out, 24000, 100)
    stream.write(np.zeros(60, np.float32))
    with pytest.raises(ValueError, match="100 samples; 60 written, 41 more would overrun the header"):
        stream.write(np.zeros(41, np.float32))
    assert len(out.getvalue()) == HEADER + 2 * 60  # the refused chunk wrote nothing
    with pytest.raises(ValueError, match="announced 100 samples but 60 were written"):
        stream.close()
    with pytest.raises(ValueError, match=r"mono audio \[samples\]"):
        WavStream(io.BytesIO(), 24000, 10).write(np.zeros((5, 2), np.float32))
    with pytest.raises(ValueError, match="sample_rate > 0"):
        WavStream(io.BytesIO(), 24000, -1)


def test_with_block_checks_the_count_unless_it_raised():
    with pytest.raises(ValueError, match="announced 10 samples but 3 were written"), WavStream(io.BytesIO(), 24000, 10) as stream:
        stream.write(np.zeros(3, np.float32))
    # the block's own error is the one that comes out
    with pytest.raises(KeyError), WavStream(io.BytesIO(), 24000, 10):
        raise KeyError("boom")


WRITER = """
import sys, time
import numpy as np
from musiclm.pipeline.audio_out import WavStream
x = (1.2 * np.sin(np.arange(36000) / 7.0)).astype(np.float32)
stream = WavStream(sys.stdout.buffer, 24000, len(x))
for at in range(0, len(x), 9000):
    stream.write(x[at : at + 9000])
    time.sleep(0.05)  # audio arriving chunk by chunk, as generation streams it
stream.close()
"""

READER = """
import sys
import soundfile as sf
pcm, sr = sf.read(sys.stdin.fileno(), dtype="int16")  # libsndfile reading a pipe, as a player does
print(sr, len(pcm), int(abs(pcm.astype(int)).sum()))
"""


@pytest.mark.slow
def test_a_player_reads_the_stream_from_a_pipe():
    """``python -c WRITER | python -c READER``: stdout into a pipe, libsndfile reads it from stdin."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER], stdout=subprocess.PIPE, env=env)
    reader = subprocess.run([sys.executable, "-c", READER], check=False, stdin=writer.stdout, capture_output=True, text=True, timeout=120, env=env)
    writer.stdout.close()
    assert writer.wait(timeout=120) == 0 and reader.returncode == 0, reader.stderr
    x = (1.2 * np.sin(np.arange(36000) / 7.0)).astype(np.float32)
    x = np.rint(np.clip(x, -1, 1) * 32767).astype(int)
    assert reader.stdout.split() == ["24000", "36000", str(np.abs(x).sum())]
