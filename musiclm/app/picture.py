"""A picture of one generated sample: its waveform over its spectrogram, as a small PNG.

Layer: app.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WIDTH, HEIGHT, DPI = 6.4, 3.2, 80  # inches, inches, pixels per inch: 512 x 256 pixels


def render_picture(audio: np.ndarray, sample_rate: int, path: str | Path) -> Path:
    """Write ``audio`` (float32 [samples] at ``sample_rate``) as a PNG at ``path``: the waveform's
    envelope (min and max per pixel column, scaled to its peak) on top, the spectrogram (dB, 0 to Nyquist) below,
    both over seconds. Returns ``path``."""
    # a bare Figure renders through Agg: no pyplot state shared between the page's threads
    from matplotlib.figure import Figure

    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    seconds = len(audio) / sample_rate
    fig = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout="constrained")
    wave, spec = fig.subplots(2, 1, sharex=True, height_ratios=(1, 2))

    columns = max(1, min(len(audio), int(WIDTH * DPI)))
    bins = np.array_split(audio, columns)
    t = (np.arange(columns) + 0.5) * seconds / columns
    wave.fill_between(t, [b.min(initial=0.0) for b in bins], [b.max(initial=0.0) for b in bins], linewidth=0, color="tab:blue")
    peak = max(float(np.abs(audio).max(initial=0.0)), 1e-4)  # scaled to the peak, which the ticks name
    wave.set_ylim(-1.1 * peak, 1.1 * peak)
    wave.set_yticks([-peak, 0, peak], [f"{-peak:.2g}", "0", f"{peak:.2g}"])
    wave.set_ylabel("amplitude")

    nfft = 1024 if len(audio) >= 1024 else max(16, 2 ** int(np.log2(max(len(audio), 16))))
    with np.errstate(divide="ignore"):  # silence is -inf dB, drawn as the floor
        spec.specgram(np.pad(audio, (0, max(0, nfft - len(audio)))), NFFT=nfft, Fs=sample_rate, noverlap=nfft * 3 // 4, cmap="magma", scale="dB")
    spec.set_xlim(0, seconds)
    spec.set_ylabel("Hz")
    spec.set_xlabel("seconds")
    fig.savefig(path, format="png", dpi=DPI)
    return Path(path)
