"""Synthetic music-like audio for tests and the demo, made with numpy only.

A clip is a sum of *voices* (a mono signal and a stereo position): notes with
harmonics and envelopes, triad chords, arpeggios and melodies at a tempo,
percussive noise bursts, filtered noise ("rain"). Everything is drawn from a
seeded generator, so the same ``(kind, seconds, sr, seed)`` gives the same
samples every time; the musical choices (key, tempo, notes) are drawn before any
noise, so they do not depend on the sample rate.

Folders of such clips, and files that must fail to decode, are written by
:mod:`musiclm.pipeline.synth_corpus`.

Layer: pipeline.
"""

from __future__ import annotations

import math

import numpy as np

KINDS = ("tone", "chord", "arpeggio", "melody", "drums", "rain", "mix")


_PEAK = 0.9  # every clip is normalised to this peak: loud, never clipped
_MAJOR = (0, 2, 4, 5, 7, 9, 11)
_MINOR = (0, 2, 3, 5, 7, 8, 10)
_PROGRESSIONS = ((0, 3, 4, 0), (0, 5, 3, 4), (0, 4, 5, 3), (5, 3, 0, 4))  # scale degrees of chord roots


def synth_clip(kind: str, seconds: float, sr: int, seed: int, channels: int = 1) -> np.ndarray:
    """Render ``seconds`` of one kind of music-like audio (one of :data:`KINDS`).

    Returns float32 ``[frames]`` when ``channels == 1``, else ``[frames, channels]``,
    ``frames = round(seconds * sr)``, peak 0.9. Deterministic in all arguments.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if seconds <= 0 or sr <= 0 or channels < 1:
        raise ValueError(f"need seconds > 0, sr > 0, channels >= 1; got {seconds}, {sr}, {channels}")
    n = round(seconds * sr)
    music = np.random.default_rng([seed, KINDS.index(kind)])
    noise = np.random.default_rng([seed, KINDS.index(kind), 1])
    voices = _KIND_VOICES[kind](_Canvas(n, sr, music, noise))
    return _mix(voices, n, channels)


# --- rendering ---------------------------------------------------------------------------------

Voice = tuple[np.ndarray, float]  # (mono float32 [n], stereo position in [-1, 1])


class _Canvas:
    """The length, rate and random generators one clip is drawn with."""

    def __init__(self, n: int, sr: int, music: np.random.Generator, noise: np.random.Generator):
        self.n, self.sr, self.music, self.noise = n, sr, music, noise
        self.seconds = n / sr

    def silence(self) -> np.ndarray:
        return np.zeros(self.n, np.float32)

    def key(self) -> tuple[int, tuple[int, ...]]:
        """A tonic (MIDI note) and a scale."""
        return int(self.music.integers(45, 57)), _MAJOR if self.music.random() < 0.6 else _MINOR

    def tempo(self) -> float:
        """Seconds per beat."""
        return 60.0 / float(self.music.uniform(80, 150))

    def note(self, out: np.ndarray, start: float, dur: float, midi: float, amp: float, harmonics: int,
             rolloff: float = 1.0, attack: float = 0.01, decay: float = 1.0, vibrato: float = 0.0) -> None:
        """Add a harmonic note to ``out`` in place: ``harmonics`` partials at 1/k**rolloff, an
        attack ramp, an exponential decay (time constant ``decay`` s) and a short release."""
        a = max(0, round(start * self.sr))
        b = min(self.n, round((start + dur) * self.sr))
        if b - a < 2:
            return
        t = np.arange(b - a) / self.sr
        hz = 440.0 * 2.0 ** ((midi - 69) / 12)
        inst = hz * (1 + vibrato * np.sin(2 * np.pi * 5.5 * t)) if vibrato else hz
        # Phase in cycles, wrapped in float64 so long notes keep their pitch in float32.
        cycles = (np.cumsum(np.broadcast_to(inst, t.shape)) / self.sr) % 1.0 if vibrato else (hz * t) % 1.0
        phase = (2 * np.pi * cycles).astype(np.float32)
        wave = np.zeros(b - a, np.float32)
        for k in range(1, harmonics + 1):
            if k * hz >= 0.45 * self.sr:  # keep partials below Nyquist: no aliasing
                break
            wave += np.sin(k * phase) / np.float32(k**rolloff)
        env = np.exp(-t / decay) * np.minimum(1.0, t / attack)
        release = min(len(t), round(0.01 * self.sr))
        env[len(t) - release:] *= np.linspace(1.0, 0.0, release)
        out[a:b] += (amp * env).astype(np.float32) * wave

    def burst(self, out: np.ndarray, start: float, dur: float, amp: float, color: float, decay: float) -> None:
        """Add a decaying noise burst; ``color`` in (0, 1): 0 dark, 1 bright (one-pole filter)."""
        a = max(0, round(start * self.sr))
        b = min(self.n, round((start + dur) * self.sr))
        if b <= a:
            return
        t = np.arange(b - a) / self.sr
        out[a:b] += (amp * np.exp(-t / decay)).astype(np.float32) * _colored(self.noise.standard_normal(b - a), color)


def _colored(white: np.ndarray, color: float) -> np.ndarray:
    """Noise with a spectral tilt: ``color`` 0 dark (1/f^2), 0.5 about pink, 1 bright (rising)."""
    spectrum = np.fft.rfft(white)
    f = np.arange(1, len(spectrum) + 1) / len(spectrum)
    spectrum *= f ** (2 * color - 1)
    y = np.fft.irfft(spectrum, len(white))
    return (y / (np.abs(y).max() + 1e-12)).astype(np.float32)


def _tone(c: _Canvas) -> list[Voice]:
    out = c.silence()
    tonic, scale = c.key()
    count = int(c.music.integers(2, 5))
    edges = np.sort(c.music.uniform(0, c.seconds, count - 1))
    starts = np.concatenate([[0.0], edges])
    ends = np.concatenate([edges, [c.seconds]])
    harmonics = int(c.music.integers(3, 9))
    for s, e in zip(starts, ends):
        midi = tonic + 12 + scale[int(c.music.integers(len(scale)))]
        c.note(out, s, e - s, midi, 0.8, harmonics, rolloff=float(c.music.uniform(0.8, 2.0)),
               attack=0.05, decay=float(c.music.uniform(1.0, 4.0)), vibrato=0.004)
    return [(out, float(c.music.uniform(-0.3, 0.3)))]


def _chords(c: _Canvas, beat: float, tonic: int, scale: tuple[int, ...], amp: float = 0.5) -> list[Voice]:
    """A triad progression, two beats per chord, one voice per chord tone."""
    voices = [c.silence() for _ in range(3)]
    progression = _PROGRESSIONS[int(c.music.integers(len(_PROGRESSIONS)))]
    for i, start in enumerate(np.arange(0.0, c.seconds, 2 * beat)):
        for v, midi in enumerate(_triad(tonic, scale, progression[i % len(progression)])):
            c.note(voices[v], start, 2 * beat, midi, amp, 6, rolloff=1.5, attack=0.03, decay=2.0)
    return [(voice, pan) for voice, pan in zip(voices, (-0.5, 0.0, 0.5))]


def _chord(c: _Canvas) -> list[Voice]:
    tonic, scale = c.key()
    return _chords(c, c.tempo(), tonic, scale)


def _arpeggio(c: _Canvas) -> list[Voice]:
    tonic, scale = c.key()
    beat = c.tempo()
    step = beat / (2 if c.music.random() < 0.5 else 4)
    progression = _PROGRESSIONS[int(c.music.integers(len(_PROGRESSIONS)))]
    pattern = (0, 1, 2, 1) if c.music.random() < 0.5 else (0, 1, 2, 3)
    out = c.silence()
    for i, start in enumerate(np.arange(0.0, c.seconds, step)):
        triad = _triad(tonic + 12, scale, progression[int(start // (4 * beat)) % len(progression)])
        note = pattern[i % len(pattern)]
        midi = triad[note] if note < 3 else triad[0] + 12
        c.note(out, start, step * 1.5, midi, 0.6, 5, rolloff=1.2, attack=0.003, decay=step)
    return [(out, float(c.music.uniform(-0.5, 0.5)))] + _bass(c, beat, tonic, scale, progression)


def _bass(c: _Canvas, beat: float, tonic: int, scale, progression) -> list[Voice]:
    out = c.silence()
    for i, start in enumerate(np.arange(0.0, c.seconds, 2 * beat)):
        midi = _triad(tonic - 12, scale, progression[i % len(progression)])[0]
        c.note(out, start, 2 * beat, midi, 0.6, 4, rolloff=2.0, attack=0.01, decay=0.8)
    return [(out, 0.0)]


def _melody_voice(c: _Canvas, beat: float, tonic: int, scale: tuple[int, ...]) -> np.ndarray:
    """A random walk over the scale, note lengths of half, one or two beats."""
    out = c.silence()
    degree = int(c.music.integers(0, 7))
    start = 0.0
    while start < c.seconds:
        length = beat * float(c.music.choice([0.5, 1.0, 1.0, 2.0]))
        degree = int(np.clip(degree + c.music.integers(-2, 3), -3, 10))
        midi = tonic + 12 + 12 * (degree // 7) + scale[degree % 7]
        c.note(out, start, length, midi, 0.7, 7, rolloff=1.0, attack=0.02, decay=0.6, vibrato=0.003)
        start += length
    return out


def _melody(c: _Canvas) -> list[Voice]:
    tonic, scale = c.key()
    beat = c.tempo()
    progression = _PROGRESSIONS[int(c.music.integers(len(_PROGRESSIONS)))]
    return [(_melody_voice(c, beat, tonic, scale), 0.2)] + _bass(c, beat, tonic, scale, progression)


def _drum_voices(c: _Canvas, beat: float) -> list[Voice]:
    """Kick on beats 1 and 3, snare on 2 and 4, hats on eighths (a few skipped at random)."""
    kick, snare, hats = c.silence(), c.silence(), c.silence()
    for i, start in enumerate(np.arange(0.0, c.seconds, beat)):
        if i % 2 == 0:
            _kick(c, kick, start)
        else:
            c.burst(snare, start, 0.25, 0.6, color=0.6, decay=0.06)
            c.note(snare, start, 0.12, 54, 0.4, 2, attack=0.001, decay=0.04)
    for start in np.arange(0.0, c.seconds, beat / 2):
        if c.music.random() < 0.85:
            c.burst(hats, start, 0.08, 0.3, color=0.95, decay=0.015)
    return [(kick, 0.0), (snare, -0.1), (hats, 0.4)]


def _kick(c: _Canvas, out: np.ndarray, start: float) -> None:
    """A sine whose pitch falls from 150 to 50 Hz, decaying in 0.15 s."""
    a = round(start * c.sr)
    b = min(c.n, a + round(0.3 * c.sr))
    t = np.arange(b - a) / c.sr
    hz = 50 + 100 * np.exp(-t / 0.04)
    out[a:b] += (0.9 * np.exp(-t / 0.15) * np.sin(2 * np.pi * np.cumsum(hz) / c.sr)).astype(np.float32)


def _drums(c: _Canvas) -> list[Voice]:
    return _drum_voices(c, c.tempo())


def _rain(c: _Canvas) -> list[Voice]:
    """Two decorrelated beds of darkened noise with a slow swell, plus bright droplets."""
    color = float(c.music.uniform(0.2, 0.45))
    swell = 0.7 + 0.3 * np.sin(2 * np.pi * np.arange(c.n) / c.sr / float(c.music.uniform(2, 6)))
    beds = [(0.5 * swell * _colored(c.noise.standard_normal(c.n), color)).astype(np.float32) for _ in range(2)]
    drops = c.silence()
    for start in np.sort(c.music.uniform(0, c.seconds, int(c.seconds * 6))):
        c.burst(drops, float(start), 0.03, float(c.music.uniform(0.1, 0.4)), color=0.9, decay=0.004)
    return [(beds[0], -0.7), (beds[1], 0.7), (drops, float(c.music.uniform(-0.5, 0.5)))]


def _mixture(c: _Canvas) -> list[Voice]:
    tonic, scale = c.key()
    beat = c.tempo()
    progression = _PROGRESSIONS[int(c.music.integers(len(_PROGRESSIONS)))]
    voices = _chords(c, beat, tonic, scale, amp=0.25)
    voices.append((_melody_voice(c, beat, tonic, scale), 0.1))
    voices += _bass(c, beat, tonic, scale, progression)
    voices += [(0.6 * v, p) for v, p in _drum_voices(c, beat)]
    return voices


_KIND_VOICES = {
    "tone": _tone, "chord": _chord, "arpeggio": _arpeggio, "melody": _melody,
    "drums": _drums, "rain": _rain, "mix": _mixture,
}


def _triad(tonic: int, scale: tuple[int, ...], degree: int) -> tuple[int, int, int]:
    """MIDI notes of the triad on a scale degree (root, third, fifth within the scale)."""
    def pitch(d: int) -> int:
        return tonic + 12 * (d // 7) + scale[d % 7]
    return pitch(degree), pitch(degree + 2), pitch(degree + 4)


def _mix(voices: list[Voice], n: int, channels: int) -> np.ndarray:
    """Pan voices over ``channels`` (equal power) and normalise the peak to 0.9."""
    if channels == 1:
        out = np.sum([v for v, _ in voices], axis=0, dtype=np.float32)[:, None]
    else:
        positions = np.linspace(-1.0, 1.0, channels)
        out = np.zeros((n, channels), np.float32)
        for voice, pan in voices:
            # Triangular weights between neighbouring channels, then equal-power normalisation.
            weights = np.maximum(0.0, 1.0 - np.abs(pan - positions) * (channels - 1) / 2)
            weights = weights / math.sqrt(float(np.sum(weights**2)))
            out += voice[:, None] * weights.astype(np.float32)
    peak = float(np.abs(out).max())
    out *= _PEAK / peak if peak > 0 else 1.0
    return out[:, 0] if channels == 1 else out
