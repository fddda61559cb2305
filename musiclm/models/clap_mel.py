"""CLAP's audio input features, computed with torch on the device the windows are on.

``transformers.ClapFeatureExtractor`` turns each window into a log-mel
spectrogram in numpy, one STFT frame at a time, on the CPU. :class:`ClapMel`
computes the same features with ``torch.stft`` wherever the windows live, for
the windows this project feeds CLAP: at most the extractor's ``nb_max_samples``
long (``Tokenizer.clap_windows`` cuts them to the CLAP window, which equals the
extractor's max length), shorter ones repeat-padded as ``padding="repeatpad"``
does. What it reproduces of the extractor (transformers 5.x,
``feature_extraction_clap.py`` and ``audio_utils.spectrogram``):

- a short window is tiled ``int(max / len)`` times, then zero-padded to ``max``;
- STFT: periodic Hann window of ``fft_window_size``, frames of that length (the
  FFT length too), hop ``hop_length``, centred with reflect padding of half a
  frame on each side, so ``max // hop + 1`` frames; computed in float64, as the
  extractor does (float32 would be off by up to 0.05 dB in quiet bins next to
  loud ones);
- power spectrum (``|X|^2``) through the mel bank, floored at 1e-10, then
  ``10 * log10``: silence is -100 dB. ``top_db`` is not applied (the extractor
  stores it but never passes it on);
- the mel bank depends on the truncation mode: ``"rand_trunc"`` (an unfused
  model) uses ``mel_filters_slaney`` (slaney scale and norm), ``"fusion"`` uses
  ``mel_filters`` (htk scale, no norm) and stacks the mel 4 times (global view +
  3 "crops", all the same for a window that is not longer than max);
- out: ``input_features`` [B, C, T, n_mels] float32 (C = 1 or 4), ``is_longer``
  [B, 1] bool.

One deliberate difference: in ``"fusion"`` mode, when no window of a batch is
longer than max (always, here), the extractor flags one window *at random* as
longer (a LAION-CLAP training habit), which sends that window through the
fusion branch and changes its embedding. Here ``is_longer`` is always False, so
a window's embedding depends neither on chance nor on its batch.

Each window is transformed on its own (a loop over the batch): its features are
bit-identical whatever else is in the batch, and on a CPU one window's frames
stay in cache, which is faster than one batched STFT.

Layer: models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

TRUNCATIONS = ("rand_trunc", "fusion")
FUSED_CHANNELS = 4  # the extractor's fused input: global mel + 3 crops
MEL_FLOOR = 1e-10  # audio_utils.spectrogram's mel_floor and power_to_db's min_value: -100 dB


class ClapMel:
    """``ClapFeatureExtractor(windows, truncation=..., padding="repeatpad")`` in torch.

    ``features`` is the model's ``ClapFeatureExtractor`` (its STFT settings and
    mel banks are read from it); ``truncation`` is ``"rand_trunc"`` for an
    unfused model, ``"fusion"`` for a fused one (``Clap.truncation``; the
    extractor's own default is not used, as it may not suit the model).
    """

    def __init__(self, features: Any, truncation: str):
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation {truncation!r} is not supported; one of {TRUNCATIONS}")
        self.truncation = truncation
        self.max_samples = int(features.nb_max_samples)
        self.n_fft = int(features.fft_window_size)
        self.hop = int(features.hop_length)
        bank = features.mel_filters if truncation == "fusion" else features.mel_filters_slaney
        self._bank = torch.from_numpy(np.asarray(bank, dtype=np.float64))  # [n_fft // 2 + 1, n_mels]
        self._window = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, windows: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Windows → ``{"input_features": [B, C, T, n_mels] float32, "is_longer": [B, 1] bool}``.

        ``windows``: a [B, samples] tensor, or a sequence of 1-D tensors (or arrays)
        of any lengths up to the extractor's max, all on one device; the outputs are
        on that device, ready for ``ClapModel.get_audio_features(**out)``.
        Raises ValueError for an empty window or one longer than the max.
        """
        if isinstance(windows, torch.Tensor) and windows.dim() != 2:
            raise ValueError(f"windows must be [B, samples]; got shape {tuple(windows.shape)}")
        if len(windows) == 0:
            raise ValueError("no windows to compute CLAP features for")
        mels = torch.stack([self.log_mel(torch.as_tensor(w)) for w in windows])  # [B, T, n_mels]
        channels = FUSED_CHANNELS if self.truncation == "fusion" else 1
        feats = mels[:, None].repeat(1, channels, 1, 1)  # [B, C, T, n_mels]
        return {"input_features": feats, "is_longer": torch.zeros(len(mels), 1, dtype=torch.bool, device=mels.device)}

    def log_mel(self, window: torch.Tensor) -> torch.Tensor:
        """One window [samples] (at most the max) → its log-mel spectrogram [T, n_mels] float32 in dB."""
        x = self.repeat_pad(window).to(torch.float64)
        hann, bank = self._constants(x.device)
        spec = torch.stft(x, self.n_fft, self.hop, window=hann, center=True, pad_mode="reflect", return_complex=True)  # [F, T]
        power = spec.real.square() + spec.imag.square()  # [F, T]; |X|^2 without abs()'s hypot
        mel = (power.T @ bank).clamp_(min=MEL_FLOOR)  # [T, n_mels]
        return (10.0 * torch.log10(mel)).float()

    def repeat_pad(self, window: torch.Tensor) -> torch.Tensor:
        """A window [n] → [max]: tiled ``int(max / n)`` times, then zero-padded, as "repeatpad" does."""
        if window.dim() != 1 or len(window) == 0:
            raise ValueError(f"a CLAP window must be 1-D and non-empty; got shape {tuple(window.shape)}")
        n = len(window)
        if n > self.max_samples:
            raise ValueError(
                f"a CLAP window of {n} samples is longer than the feature extractor's {self.max_samples}; cut windows to that length"
            )
        if n == self.max_samples:
            return window
        tiled = window.repeat(self.max_samples // n)
        return torch.nn.functional.pad(tiled, (0, self.max_samples - tiled.shape[0]))

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # the Hann window and mel bank, copied to each device once
        if device not in self._on:
            self._on[device] = (self._window.to(device), self._bank.to(device))
        return self._on[device]
