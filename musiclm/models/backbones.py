"""The frozen backbones' common ground, and CLAP.

CLAP is here; the semantic model is :mod:`musiclm.models.semantic` and the codec
:mod:`musiclm.models.codec`. Each backbone comes from one of three places, decided by its config's
``model``:

- a hub id or a local folder: ``from_pretrained`` (the same call for both);
- ``"random"``: built offline from the config's ``arch`` with a fixed seed (the
  ``tiny`` preset, and benchmarks at full size). Random backbones are saved with
  ``save_pretrained`` into the tokenizer folder, and from then on load from
  there like any local folder, so generation decodes with exactly the weights
  that tokenized the corpus.

Layer: models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from musiclm.config import ClapConfig
from musiclm.errors import UserError

RANDOM = "random"


def quiet_transformers() -> None:
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


def arch_config(arch: dict, default_type: str):
    """The transformers config a ``random`` backbone is built from: ``arch`` is a config.json as a table, its
    ``model_type`` picking the family (``default_type`` when it has none)."""
    from transformers import AutoConfig

    arch = dict(arch)
    return AutoConfig.for_model(arch.pop("model_type", default_type), **arch)


def load_pretrained(load, name: str, revision: str | None, what: str, **kw):
    """``load(name, revision=revision, **kw)``, a loading failure told in one line."""
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

    quiet_transformers()
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
        model = load_pretrained(ClapModel.from_pretrained, source, revision, "CLAP")
        processor = load_pretrained(ClapProcessor.from_pretrained, source, revision, "CLAP processor")
        clap = Clap(model, processor.feature_extractor, processor.tokenizer)
    clap.model.eval().requires_grad_(False)
    return clap
