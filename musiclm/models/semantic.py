"""The semantic model: a MERT/HuBERT-family or a w2v-BERT 2.0 checkpoint, one interface.

``tokenize.semantic.model`` names it (a hub id, a local folder or ``"random"``); its family is the
``model_type`` of its config, so the input rate, the feature extractor, the layer count and the frame
rate are all read from the checkpoint:

- ``hubert`` (MERT-v0 and the HuBERT family; MERT-v1 through remote code): the waveform goes in,
  normalised per clip when the feature extractor says ``do_normalize`` (done here in torch, on the
  tokenizer's device); frames at ``sample_rate / prod(conv_stride)`` (50 Hz for MERT at 16 kHz).
- ``wav2vec2-bert`` (w2v-BERT 2.0): 80 log-mel bins every 10 ms, normalised per bin, stacked in
  pairs (``SeamlessM4TFeatureExtractor``, the checkpoint's own preprocessor, called as is): frames
  at ``1 / (10 ms x stride)`` (50 Hz).

Only the layers up to the one that is read are run: the model is cut to ``layer + 1`` layers when it
loads (all of them when the last is read), so the hidden state taken is exactly the full model's,
whatever the family does after its last layer, at a fraction of its cost (8 of w2v-BERT's 24).

Layer: models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musiclm.config import SemanticConfig
from musiclm.errors import UserError
from musiclm.models.backbones import RANDOM, arch_config, load_pretrained, quiet_transformers

FAMILIES = {"hubert": "HubertModel", "wav2vec2-bert": "Wav2Vec2BertModel"}  # model_type -> transformers class
FBANK_HOP_SECONDS = 0.01  # SeamlessM4TFeatureExtractor's hop (160 samples at 16 kHz, fixed in its code)


def family(config: Any) -> str:
    """The family of a transformers config: ``"wav2vec2-bert"``, or ``"hubert"`` for the waveform
    models (HuBERT, MERT's remote code)."""
    return "wav2vec2-bert" if config.model_type == "wav2vec2-bert" else "hubert"


def frame_rate(config: Any, features: Any) -> float:
    """Frames per second of a semantic model's hidden states, from its config and feature extractor."""
    if family(config) == "wav2vec2-bert":
        return 1.0 / (FBANK_HOP_SECONDS * features.stride)
    return features.sampling_rate / math.prod(config.conv_stride)


def layers_kept(layer: int, n_layers: int) -> int:
    """Layers to run to read hidden state ``layer`` exactly: one past it (so that it is never the last,
    which some families normalise), or all of them when it is the last."""
    return min(layer + 1, n_layers)


@dataclass
class SemanticModel:
    model: Any  # transformers.HubertModel, Wav2Vec2BertModel or a remote-code MERT model
    features: Any  # its feature extractor: Wav2Vec2FeatureExtractor or SeamlessM4TFeatureExtractor
    layer: int

    @property
    def family(self) -> str:
        return family(self.model.config)

    @property
    def sample_rate(self) -> int:
        return int(self.features.sampling_rate)

    @property
    def frame_rate(self) -> float:
        return frame_rate(self.model.config, self.features)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def inputs(self, audio: np.ndarray, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The model's inputs for mono clips of equal length [B, samples] at :attr:`sample_rate`."""
        audio = np.ascontiguousarray(np.atleast_2d(audio), dtype=np.float32)
        if self.family == "wav2vec2-bert":
            out = self.features(list(audio), sampling_rate=self.sample_rate, return_tensors="pt", return_attention_mask=True)
            return {"input_features": out["input_features"].to(device), "attention_mask": out["attention_mask"].to(device)}
        x = torch.from_numpy(audio).to(device)
        if getattr(self.features, "do_normalize", False):
            x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-7)
        return {"input_values": x}

    def hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states of the configured layer [B, T, D] for :meth:`inputs`; frames the feature
        extractor padded (w2v-BERT pads an odd count of 10 ms frames to pairs) are dropped."""
        out = self.model(**inputs, output_hidden_states=True).hidden_states[self.layer]
        mask = inputs.get("attention_mask")
        if mask is not None:
            out = out[:, : int(mask.sum(1).min())]
        return out

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        self.features.save_pretrained(folder)


def _waveform_features(sample_rate: int):
    """MERT's feature extractor: mono input, normalised per clip."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=sample_rate, padding_value=0.0, do_normalize=True)


def model_class(config: Any):
    """The transformers class of a (non-remote) semantic config."""
    import transformers

    return getattr(transformers, FAMILIES[family(config)])


def random_config(spec: SemanticConfig) -> Any:
    """The transformers config of a ``random`` semantic model (HuBERT unless ``arch`` says otherwise)."""
    return arch_config(spec.arch, "hubert")


def _random(spec: SemanticConfig, seed: int) -> tuple[Any, Any]:
    from transformers import SeamlessM4TFeatureExtractor

    config = random_config(spec)
    torch.manual_seed(seed)
    model = model_class(config)(config)
    if family(config) == "wav2vec2-bert":
        return model, SeamlessM4TFeatureExtractor(**spec.features)
    filterbank_feature_encoder(model, spec.sample_rate, seed)
    return model, _waveform_features(spec.sample_rate)


def read_config(spec: SemanticConfig, source: str, revision: str | None, **kw) -> Any:
    """The transformers config of a pretrained semantic model. A config that transformers does not know
    without remote code (MERT's hub config after it moved to remote code) is read as HuBERT's, whose
    weights it holds (tests/fixtures/pretrained/SOURCES.md)."""
    from transformers import AutoConfig, HubertConfig

    if spec.trust_remote_code:
        return load_pretrained(AutoConfig.from_pretrained, source, revision, "semantic", trust_remote_code=True, **kw)
    try:
        return AutoConfig.from_pretrained(source, revision=revision, **kw)
    except ValueError:  # an unknown model_type
        return load_pretrained(HubertConfig.from_pretrained, source, revision, "semantic", **kw)
    except OSError:
        return load_pretrained(AutoConfig.from_pretrained, source, revision, "semantic", **kw)  # its one-line error


def _pretrained(spec: SemanticConfig, source: str, revision: str | None) -> tuple[Any, Any]:
    from transformers import AutoFeatureExtractor, AutoModel

    remote = spec.trust_remote_code
    config = read_config(spec, source, revision)
    check_layer(spec.layer, config.num_hidden_layers)
    config.num_hidden_layers = layers_kept(spec.layer, config.num_hidden_layers)
    load = AutoModel.from_pretrained if remote else model_class(config).from_pretrained
    model = load_pretrained(load, source, revision, "semantic", config=config, **({"trust_remote_code": True} if remote else {}))
    try:
        features = AutoFeatureExtractor.from_pretrained(source, revision=revision, trust_remote_code=remote)
    except (OSError, ValueError):  # a model folder without preprocessor_config.json
        if family(config) == "wav2vec2-bert":
            raise UserError(f"the semantic model '{source}' has no preprocessor_config.json (w2v-BERT needs its feature extractor)") from None
        features = _waveform_features(spec.sample_rate)
    return model, features


def check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer <= n_layers:
        raise UserError(f"tokenize.semantic.layer = {layer} but the semantic model has {n_layers} layers (use 0..{n_layers})")


def load_semantic(spec: SemanticConfig, folder: Path | None = None, seed: int = 0) -> SemanticModel:
    """The semantic model from ``folder`` (a saved copy) if given, else from ``spec.model``, cut to the
    layers it needs (:func:`layers_kept`)."""
    quiet_transformers()
    source = str(folder) if folder is not None else spec.model
    if source == RANDOM:
        model, features = _random(spec, seed)
        check_layer(spec.layer, model.config.num_hidden_layers)
        keep = layers_kept(spec.layer, model.config.num_hidden_layers)
        model.encoder.layers = model.encoder.layers[:keep]
        model.config.num_hidden_layers = keep
    else:
        model, features = _pretrained(spec, source, None if folder is not None else spec.revision)
    model.eval().requires_grad_(False)
    return SemanticModel(model, features, spec.layer)


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
