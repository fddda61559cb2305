"""The codec: Encodec or DAC, one interface for encoding audio to codes and decoding them back.

``tokenize.codec.model`` names it (a hub id, a local folder or ``"random"``); its family is the
``model_type`` of its config, and its sample rate, frame rate, codebooks and codebook size are read
from that config:

- ``encodec`` (``facebook/encodec_24khz``): ``num_quantizers`` must be one of its target bandwidths;
  a randomly initialised one has all-zero codebooks (every code would be 0), so the pipeline's
  tokenizer fit learns them on encoder outputs, as Encodec itself initialises them from data
  (``fit_encodec_codebooks`` in the pipeline's quantizers module; :func:`set_encodec_codebooks`
  installs them here).
- ``dac`` (``descript/dac_24khz``): a residual quantizer of ``n_codebooks`` trained with quantizer
  dropout, so its first ``num_quantizers`` codebooks decode alone (8 of 32 at 24 kHz: 6 kbps). Its hop
  is the product of ``downsampling_ratios`` (320 at 24 kHz): the checkpoint's ``hop_length`` field
  is a leftover of the 44 kHz default (512) and is not read. Its decoder's transposed convolutions
  give ``hop x frames - 8`` samples; :meth:`Codec.decode` pads the end to exactly ``hop x frames``
  by repeating the last sample, so every codec decodes ``frames`` to the same length.

Layer: models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musiclm.config import CodecConfig
from musiclm.errors import UserError
from musiclm.models.backbones import RANDOM, arch_config, load_pretrained, quiet_transformers

FAMILIES = {"encodec": "EncodecModel", "dac": "DacModel"}  # model_type -> transformers class


def hop_length(config: Any) -> int:
    """Samples per frame of a codec config."""
    if config.model_type == "dac":
        return math.prod(config.downsampling_ratios)
    return int(config.hop_length)


def codec_frame_rate(config: Any) -> float:
    return config.sampling_rate / hop_length(config)


def encodec_bandwidth(config: Any, num_quantizers: int) -> float:
    """kbps of ``num_quantizers`` codebooks of an Encodec config."""
    return num_quantizers * config.frame_rate * config.codebook_nbits / 1000


@dataclass
class Codec:
    model: Any  # transformers.EncodecModel or DacModel
    num_quantizers: int  # Q: the codebooks kept per frame

    @property
    def family(self) -> str:
        return str(self.model.config.model_type)

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def hop(self) -> int:
        return hop_length(self.model.config)

    @property
    def frame_rate(self) -> float:
        return codec_frame_rate(self.model.config)

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.codebook_size)

    @property
    def bandwidth(self) -> float:
        """kbps of the ``num_quantizers`` codebooks kept."""
        if self.family == "encodec":
            return encodec_bandwidth(self.model.config, self.num_quantizers)
        return self.num_quantizers * self.frame_rate * math.log2(self.codebook_size) / 1000

    def model_input(self, audio: torch.Tensor) -> torch.Tensor:
        """Mono audio [B, samples] as the model takes it: [B, channels, samples]."""
        x = audio[:, None, :]
        return x.expand(-1, 2, -1) if getattr(self.model.config, "audio_channels", 1) == 2 else x

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """Codes [B, Q, T] int64 of mono audio [B, samples] at :attr:`sample_rate`."""
        x = self.model_input(audio)
        if self.family == "dac":
            return self.model.encode(x, n_quantizers=self.num_quantizers).audio_codes[:, : self.num_quantizers]
        return self.model.encode(x, bandwidth=self.bandwidth).audio_codes[0][:, : self.num_quantizers]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Mono audio [B, hop x T] float of codes [B, Q, T]."""
        if self.family == "dac":
            audio = self.model.decode(audio_codes=codes).audio_values  # [B, hop x T - 8]
            short = self.hop * codes.shape[-1] - audio.shape[-1]
            return torch.nn.functional.pad(audio[:, None], (0, short), mode="replicate")[:, 0] if short > 0 else audio[..., : self.hop * codes.shape[-1]]
        return self.model.decode(codes[None], [None]).audio_values.mean(1)  # [B, C, samples] -> [B, samples]

    @torch.inference_mode()
    def latents(self, audio: torch.Tensor) -> torch.Tensor:
        """Encoder outputs before quantisation: audio [B, samples] → [B, frames, dim]."""
        return self.model.encoder(self.model_input(audio)).transpose(1, 2)

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder)


def model_class(config: Any):
    import transformers

    if config.model_type not in FAMILIES:
        raise UserError(f"tokenize.codec: a '{config.model_type}' model is not a codec this project reads (Encodec or DAC)")
    return getattr(transformers, FAMILIES[config.model_type])


def random_config(spec: CodecConfig) -> Any:
    """The transformers config of a ``random`` codec (Encodec unless ``arch`` says otherwise)."""
    return arch_config(spec.arch, "encodec")


def load_codec(spec: CodecConfig, folder: Path | None = None, seed: int = 0) -> Codec:
    """The codec from ``folder`` (a saved copy) or ``spec.model``; a random Encodec gets a bandwidth of
    exactly Q codebooks."""
    from transformers import AutoConfig

    quiet_transformers()
    source = str(folder) if folder is not None else spec.model
    if source == RANDOM:
        cfg = random_config(spec)
        if cfg.model_type == "encodec":
            cfg.target_bandwidths = [encodec_bandwidth(cfg, spec.num_quantizers)]
        torch.manual_seed(seed)
        model = model_class(cfg)(cfg)
    else:
        revision = None if folder is not None else spec.revision
        cfg = load_pretrained(AutoConfig.from_pretrained, source, revision, "codec")
        model = load_pretrained(model_class(cfg).from_pretrained, source, revision, "codec", config=cfg)
    codec = Codec(model.eval().requires_grad_(False), spec.num_quantizers)
    check_codec(spec, model.config, source)
    return codec


def check_codec(spec: CodecConfig, config: Any, source: str) -> None:
    """One-line errors for codebook counts the codec cannot keep."""
    if config.model_type == "encodec":
        if config.normalize or config.chunk_length_s:
            raise UserError(f"Encodec model '{source}' normalises or chunks its input; use a 24 kHz or 32 kHz model")
        bandwidth = encodec_bandwidth(config, spec.num_quantizers)
        if not any(abs(bandwidth - bw) < 1e-6 for bw in config.target_bandwidths):
            raise UserError(
                f"Encodec model '{source}' cannot keep {spec.num_quantizers} codebooks "
                f"({bandwidth:g} kbps is not one of {list(config.target_bandwidths)}): change tokenize.codec.num_quantizers"
            )
    elif not 1 <= spec.num_quantizers <= config.n_codebooks:
        raise UserError(f"DAC model '{source}' has {config.n_codebooks} codebooks: tokenize.codec.num_quantizers = {spec.num_quantizers} must be 1..{config.n_codebooks}")
    if not 0 < spec.coarse_quantizers < spec.num_quantizers:
        raise UserError("tokenize.codec.coarse_quantizers must be between 1 and num_quantizers - 1")


@torch.no_grad()
def set_encodec_codebooks(codec: Codec, books: Sequence[np.ndarray] | np.ndarray) -> None:
    """Install codebooks ``books`` (one [codebook_size, dim] array per level, levels 0..L-1 with
    L <= ``num_quantizers``) into an Encodec's quantizer, marking them initialised."""
    if codec.family != "encodec":
        raise ValueError(f"only Encodec codebooks are fitted, not {codec.family}'s")
    layers = codec.model.quantizer.layers
    if len(books) > codec.num_quantizers:
        raise ValueError(f"{len(books)} Encodec codebooks given but the model keeps only num_quantizers = {codec.num_quantizers}")
    want = (codec.codebook_size, int(codec.model.config.codebook_dim))
    for level, centroids in enumerate(books):  # check them all before changing any
        if tuple(np.shape(centroids)) != want:
            raise ValueError(f"Encodec codebook {level} has shape {list(np.shape(centroids))}, not [codebook_size, dim] = {list(want)}")
    for level, centroids in enumerate(books):
        cb = layers[level].codebook
        t = torch.as_tensor(np.asarray(centroids)).to(cb.embed)
        cb.embed.copy_(t)
        cb.embed_avg.copy_(t)
        cb.cluster_size.fill_(1.0)
        cb.inited.fill_(1.0)
