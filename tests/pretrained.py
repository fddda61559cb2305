"""Offline stand-ins for the pretrained checkpoints of the ``small`` preset.

``tests/fixtures/pretrained/<org>--<name>/`` holds the real ``config.json`` and
preprocessor settings of each checkpoint the ``small`` preset names (where each
file comes from, and what in it is verbatim or rebuilt: ``SOURCES.md`` there).
From them this module builds the very same architecture at random weights and
saves a folder that this project loads through its own path: ``load_clap`` /
``load_semantic`` / ``load_codec`` with ``model = "<folder>"``, i.e. the same
``from_pretrained`` calls a hub id takes. No network is needed.

What differs from the real checkpoints:

- the weights are random (seeded);
- CLAP's text tokenizer: RoBERTa's vocabulary is not available offline, so the
  folder holds the project's byte-level tokenizer (``byte_text_tokenizer``), which
  keeps RoBERTa's special-token ids and whose ids fit in RoBERTa's vocabulary;
- Encodec's codebooks: a random ``EncodecModel`` has all-zero codebooks (every code
  0), so the first ``num_quantizers`` levels are fitted (``fit_encodec_codebooks``,
  installed by ``set_encodec_codebooks``) on the encoder outputs of 20 s of
  synthesised music and jittered copies of them; the levels above stay zero.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pretrained"
CHECKPOINTS = {
    "clap": "laion/larger_clap_music",
    "mert": "m-a-p/MERT-v0",
    "encodec": "facebook/encodec_24khz",
    "w2v-bert": "facebook/w2v-bert-2.0",  # the `open` preset's semantic model
    "dac": "descript/dac_24khz",  # the `open` preset's codec
}

# synthesised music the Encodec codebooks are fitted on: 5 x 4 s = 1500 frames at 75 Hz, enough for 1024 codes
_CODEBOOK_CLIPS = (("mix", 0), ("chord", 1), ("drums", 2), ("melody", 3), ("arpeggio", 4))
_CODEBOOK_CLIP_SECONDS = 4.0


def hub_id(name: str) -> str:
    """A key of :data:`CHECKPOINTS` (``"clap"``, ``"mert"``, ...) or a hub id of :data:`CHECKPOINTS` → the hub id."""
    if name in CHECKPOINTS:
        return CHECKPOINTS[name]
    if name in CHECKPOINTS.values():
        return name
    raise ValueError(f"no fixture for {name!r}; one of {sorted(CHECKPOINTS)} or {sorted(CHECKPOINTS.values())}")


def fixture_dir(name: str) -> Path:
    """The fixture folder of a checkpoint: ``fixtures/pretrained/<org>--<name>``."""
    return FIXTURES / hub_id(name).replace("/", "--")


def fixture_json(name: str, filename: str = "config.json") -> dict:
    """One fixture file of a checkpoint, parsed."""
    return json.loads((fixture_dir(name) / filename).read_text())


def save_random_pretrained(name: str, folder: str | Path, seed: int = 0, num_quantizers: int = 8) -> Path:
    """Save checkpoint ``name`` (a key of :data:`CHECKPOINTS` or its hub id) at random weights.

    The folder gets what ``from_pretrained`` reads from the hub: the model (config.json +
    weights) and its preprocessor (CLAP: feature extractor + a stand-in text tokenizer;
    MERT: feature extractor). ``num_quantizers`` is how many Encodec levels get fitted
    codebooks. Deterministic in ``seed``; the global torch RNG is left as it was.
    Returns ``folder``.
    """
    key = next(k for k, v in CHECKPOINTS.items() if v == hub_id(name))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        {"clap": _save_clap, "mert": _save_mert, "encodec": _save_encodec, "w2v-bert": _save_w2v_bert, "dac": _save_dac}[key](folder, seed, num_quantizers)
    return folder


def _save_clap(folder: Path, seed: int, num_quantizers: int) -> None:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    from musiclm.models.backbones import Clap, byte_text_tokenizer

    src = fixture_dir("clap")
    model = ClapModel(ClapConfig.from_pretrained(src))
    features = ClapFeatureExtractor.from_pretrained(src)
    # the real tokenizer is RoBERTa's BPE (vocab.json, merges.txt): not available offline
    text = byte_text_tokenizer(fixture_json("clap", "tokenizer_config.json")["model_max_length"])
    Clap(model, features, text).save(folder)


def _save_mert(folder: Path, seed: int, num_quantizers: int) -> None:
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    from musiclm.models.semantic import SemanticModel

    src = fixture_dir("mert")
    model = HubertModel(HubertConfig.from_pretrained(src))
    SemanticModel(model, Wav2Vec2FeatureExtractor.from_pretrained(src), layer=0).save(folder)


def _save_w2v_bert(folder: Path, seed: int, num_quantizers: int) -> None:
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

    from musiclm.models.semantic import SemanticModel

    src = fixture_dir("w2v-bert")
    model = Wav2Vec2BertModel(Wav2Vec2BertConfig.from_pretrained(src))
    SemanticModel(model, SeamlessM4TFeatureExtractor.from_pretrained(src), layer=0).save(folder)


def _save_dac(folder: Path, seed: int, num_quantizers: int) -> None:
    from transformers import DacConfig, DacFeatureExtractor, DacModel

    src = fixture_dir("dac")
    DacModel(DacConfig.from_pretrained(src)).save_pretrained(folder)
    DacFeatureExtractor.from_pretrained(src).save_pretrained(folder)


def _save_encodec(folder: Path, seed: int, num_quantizers: int) -> None:
    from transformers import EncodecConfig, EncodecModel

    from musiclm.models.codec import Codec, set_encodec_codebooks
    from musiclm.pipeline.quantizers import fit_encodec_codebooks
    from musiclm.pipeline.synth import synth_clip

    model = EncodecModel(EncodecConfig.from_pretrained(fixture_dir("encodec"))).eval()
    enc = Codec(model, num_quantizers)
    sr = enc.sample_rate
    clips = [synth_clip(kind, _CODEBOOK_CLIP_SECONDS, sr, seed + s) for kind, s in _CODEBOOK_CLIPS]
    latents = np.concatenate([enc.latents(torch.from_numpy(c)[None])[0].numpy() for c in clips])  # [1500, 128]
    # 1500 frames for 1024 codes: level 0 would all but memorise them and leave the later levels
    # nothing to split (one code each). Jittered copies give every level a residual to carve.
    rng = np.random.default_rng(seed)
    jitter = [latents + 0.5 * latents.std(0) * rng.standard_normal(latents.shape).astype(np.float32) for _ in range(4)]
    set_encodec_codebooks(enc, fit_encodec_codebooks(enc, np.concatenate([latents, *jitter]), niter=5, seed=seed))
    enc.save(folder)


_SEMANTIC = {"small": "mert", "open": "w2v-bert"}  # the stand-in each preset's semantic model and codec need
_CODEC = {"small": "encodec", "open": "dac"}


def standin_config(folders, preset: str = "small"):
    """Preset ``preset`` (a :class:`musiclm.config.Config`) with each backbone's ``model`` set to
    the saved stand-in folder ``folders[name]`` (``name`` in :data:`CHECKPOINTS`)."""
    from dataclasses import replace

    from musiclm.config import load_config

    cfg = load_config(preset)
    t = cfg.tokenize
    t = replace(
        t,
        clap=replace(t.clap, model=str(folders["clap"]), revision=None),
        semantic=replace(t.semantic, model=str(folders["mert"]), revision=None),
        codec=replace(t.codec, model=str(folders["encodec"]), revision=None),
    )
    return replace(cfg, tokenize=t)


class StandinFolders:
    """Stand-in checkpoint folders, each saved on first use: ``folders["clap"]`` → Path.

    Each goes to ``place(key, save)``, which calls ``save(folder)`` and returns the folder; by default
    ``root/<key>``. (tests/conftest.py places them once per test run, shared by the xdist workers:
    w2v-BERT 2.0 alone is 2.3 GB.)"""

    def __init__(self, root: Path, seed: int = 0, place: Callable[[str, Callable[[Path], object]], Path] | None = None):
        self.root, self.seed = Path(root), seed
        self.place = place or (lambda key, save: save(self.root / key) and self.root / key)
        self._saved: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        key = next(k for k, v in CHECKPOINTS.items() if v == hub_id(name))
        if key not in self._saved:
            self._saved[key] = self.place(key, lambda folder: save_random_pretrained(key, folder, seed=self.seed))
        return self._saved[key]
