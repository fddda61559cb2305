"""The three frozen backbones, all through transformers.

Each backbone comes from one of three places, decided by its config's ``model``:

- a hub id or a local folder: ``from_pretrained`` (the same call for both);
- ``"random"``: built offline from the config's ``arch`` with a fixed seed (the
  ``tiny`` preset, and benchmarks at full size). Random backbones are saved with
  ``save_pretrained`` into the tokenizer folder, and from then on load from
  there like any local folder, so generation decodes with exactly the weights
  that tokenized the corpus.

A randomly initialised ``EncodecModel`` has all-zero codebooks (every code would
be 0); the pipeline's tokenizer fit learns them on encoder outputs, as Encodec
itself initialises them from data (``fit_encodec_codebooks`` in the pipeline's
quantizers module), and :func:`set_encodec_codebooks` installs them here. Models
never import the pipeline.

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

from musiclm.config import ClapConfig, EncodecConfig, MertConfig
from musiclm.errors import UserError

RANDOM = "random"


def _quiet_transformers() -> None:
    # loading bars and "some weights were not used" notices drown the tokenize progress bar
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@dataclass
class Clap:
    model: Any  # transformers.ClapModel
    features: Any  # transformers.ClapFeatureExtractor
    text_tokenizer: Any  # a transformers tokenizer

    @property
    def sample_rate(self) -> int:
        return int(self.features.sampling_rate)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def truncation(self) -> str:
        # an unfused model takes one channel; "fusion" would build four (DESIGN.md)
        return "fusion" if self.model.config.audio_config.enable_fusion else "rand_trunc"

    def save(self, folder: Path) -> None:
        from transformers import ClapProcessor

        self.model.save_pretrained(folder)
        ClapProcessor(feature_extractor=self.features, tokenizer=self.text_tokenizer).save_pretrained(folder)


@dataclass
class Mert:
    model: Any  # transformers.HubertModel, or a remote-code MERT model
    features: Any  # transformers.Wav2Vec2FeatureExtractor
    layer: int

    @property
    def sample_rate(self) -> int:
        return int(self.features.sampling_rate)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / math.prod(self.model.config.conv_stride)

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        self.features.save_pretrained(folder)


@dataclass
class Encodec:
    model: Any  # transformers.EncodecModel
    num_quantizers: int

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def frame_rate(self) -> float:
        return self.model.config.sampling_rate / self.model.config.hop_length

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.codebook_size)

    @property
    def bandwidth(self) -> float:
        """The bandwidth (kbps) at which the model keeps exactly ``num_quantizers`` codebooks."""
        return _bandwidth(self.model.config, self.num_quantizers)

    def model_input(self, audio: torch.Tensor) -> torch.Tensor:
        """Mono audio [B, samples] as the model takes it: [B, channels, samples]."""
        x = audio[:, None, :]
        return x.expand(-1, 2, -1) if self.model.config.audio_channels == 2 else x

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder)


def _bandwidth(config: Any, num_quantizers: int) -> float:
    """kbps of ``num_quantizers`` codebooks of an Encodec config."""
    return num_quantizers * config.frame_rate * config.codebook_nbits / 1000


def _pretrained(load, name: str, revision: str | None, what: str, **kw):
    try:
        return load(name, revision=revision, **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load the {what} backbone '{name}': {first} "
            "(without network access, pass a local folder saved with save_pretrained)"
        ) from None


def byte_text_tokenizer(max_length: int = 64):
    """A byte-level text tokenizer built in code (no download): one token per UTF-8 byte.

    Ids follow RoBERTa's special-token convention (<s>=0, <pad>=1, </s>=2, <unk>=3),
    which is what CLAP's text tower expects; bytes take ids 4..259.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def load_clap(spec: ClapConfig, folder: Path | None = None, seed: int = 0) -> Clap:
    """CLAP from ``folder`` (a saved copy) if given, else from ``spec.model`` (hub id, folder or "random")."""
    from transformers import ClapConfig as HfClapConfig
    from transformers import ClapFeatureExtractor, ClapModel, ClapProcessor

    _quiet_transformers()
    source = str(folder) if folder is not None else spec.model
    if source == RANDOM:
        arch = dict(spec.arch)
        torch.manual_seed(seed)
        cfg = HfClapConfig(text_config=arch.pop("text", {}), audio_config=arch.pop("audio", {}), **arch)
        model = ClapModel(cfg)
        features = ClapFeatureExtractor(**spec.features)
        max_len = cfg.text_config.max_position_embeddings - 3  # RoBERTa positions start after the pad id
        clap = Clap(model, features, byte_text_tokenizer(max_len))
    else:
        revision = None if folder is not None else spec.revision
        model = _pretrained(ClapModel.from_pretrained, source, revision, "CLAP")
        processor = _pretrained(ClapProcessor.from_pretrained, source, revision, "CLAP processor")
        clap = Clap(model, processor.feature_extractor, processor.tokenizer)
    clap.model.eval().requires_grad_(False)
    return clap


def load_mert(spec: MertConfig, folder: Path | None = None, seed: int = 0) -> Mert:
    """MERT (a HubertModel for v0; remote code for v1) from ``folder`` or ``spec.model``."""
    from transformers import AutoModel, HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    _quiet_transformers()
    source = str(folder) if folder is not None else spec.model
    if source == RANDOM:
        torch.manual_seed(seed)
        model = HubertModel(HubertConfig(**spec.arch))
        filterbank_feature_encoder(model, spec.sample_rate, seed)
        features = _mert_features(spec.sample_rate)
    else:
        revision = None if folder is not None else spec.revision
        if spec.trust_remote_code:
            model = _pretrained(AutoModel.from_pretrained, source, revision, "MERT", trust_remote_code=True)
        else:
            model = _pretrained(HubertModel.from_pretrained, source, revision, "MERT")
        try:
            features = Wav2Vec2FeatureExtractor.from_pretrained(source, revision=revision, trust_remote_code=spec.trust_remote_code)
        except (OSError, ValueError):  # a model folder without preprocessor_config.json
            features = _mert_features(spec.sample_rate)
    n_layers = model.config.num_hidden_layers
    if not 0 <= spec.layer <= n_layers:
        raise UserError(f"tokenize.mert.layer = {spec.layer} but the MERT model has {n_layers} layers (use 0..{n_layers})")
    model.eval().requires_grad_(False)
    return Mert(model, features, spec.layer)


def _mert_features(sample_rate: int):
    """MERT's feature extractor: mono input, normalised per clip."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=sample_rate, padding_value=0.0, do_normalize=True)


def load_encodec(spec: EncodecConfig, folder: Path | None = None, seed: int = 0) -> Encodec:
    """Encodec from ``folder`` or ``spec.model``; a random one gets a bandwidth of exactly Q codebooks."""
    from transformers import EncodecConfig as HfEncodecConfig
    from transformers import EncodecModel

    _quiet_transformers()
    source = str(folder) if folder is not None else spec.model
    if source == RANDOM:
        cfg = HfEncodecConfig(**spec.arch)
        cfg.target_bandwidths = [_bandwidth(cfg, spec.num_quantizers)]
        torch.manual_seed(seed)
        model = EncodecModel(cfg)
    else:
        revision = None if folder is not None else spec.revision
        model = _pretrained(EncodecModel.from_pretrained, source, revision, "Encodec")
    enc = Encodec(model.eval().requires_grad_(False), spec.num_quantizers)
    c = model.config
    if c.normalize or c.chunk_length_s:
        raise UserError(f"Encodec model '{source}' normalises or chunks its input; use a 24 kHz or 32 kHz model")
    if not any(abs(enc.bandwidth - bw) < 1e-6 for bw in c.target_bandwidths):
        raise UserError(
            f"Encodec model '{source}' cannot keep {spec.num_quantizers} codebooks "
            f"({enc.bandwidth:g} kbps is not one of {list(c.target_bandwidths)}): change tokenize.encodec.num_quantizers"
        )
    if not 0 < spec.coarse_quantizers < spec.num_quantizers:
        raise UserError("tokenize.encodec.coarse_quantizers must be between 1 and num_quantizers - 1")
    return enc


@torch.no_grad()
def filterbank_feature_encoder(model, sample_rate: int, seed: int = 0) -> None:
    """Start a random Hubert's convolutional front end as a band-pass filterbank with pooling.

    A front end of random convolutions is not invariant to the phase of the
    waveform against the frame grid, so the tokens of a held note change every
    frame and carry no information a model could learn from. Trained MERT
    features are steady over a note. This initialisation gives offline
    backbones that property: the first layer becomes log-spaced, Hann-windowed
    sinusoids (GELU then half-wave rectifies them), later layers become mostly
    per-channel averaging with a little positive mixing, i.e. smoothed band
    energies. The transformer layers stay random.
    """
    convs = model.feature_extractor.conv_layers
    first = convs[0].conv.weight  # [C, 1, K]
    channels, _, kernel = first.shape
    freqs = torch.logspace(math.log10(60.0), math.log10(0.45 * sample_rate), channels)
    t = torch.arange(kernel) / sample_rate
    bank = torch.sin(2 * math.pi * freqs[:, None] * t[None]) * torch.hann_window(kernel, periodic=False)[None]
    first.copy_((bank / bank.norm(dim=1, keepdim=True).clamp_min(1e-8))[:, None, :])
    g = torch.Generator().manual_seed(seed)
    for layer in convs[1:]:
        w = layer.conv.weight  # [C_out, C_in, k]
        mix = torch.rand(w.shape, generator=g) / w.shape[1]
        eye = torch.eye(w.shape[0], w.shape[1])[:, :, None].expand_as(w)
        w.copy_((0.7 * eye + 0.3 * mix) / w.shape[2])


@torch.inference_mode()
def encodec_latents(enc: Encodec, audio: torch.Tensor) -> torch.Tensor:
    """Encoder outputs before quantisation: audio [B, samples] → [B, frames, dim]."""
    return enc.model.encoder(enc.model_input(audio)).transpose(1, 2)


@torch.no_grad()
def set_encodec_codebooks(enc: Encodec, books: Sequence[np.ndarray] | np.ndarray) -> None:
    """Install codebooks ``books`` (one [codebook_size, dim] array per level, levels 0..L-1 with
    L <= ``num_quantizers``) into ``enc``'s quantizer, marking them initialised."""
    layers = enc.model.quantizer.layers
    if len(books) > enc.num_quantizers:
        raise ValueError(f"{len(books)} Encodec codebooks given but the model keeps only num_quantizers = {enc.num_quantizers}")
    want = (enc.codebook_size, int(enc.model.config.codebook_dim))
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
