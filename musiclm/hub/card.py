"""The model card of a pushed model (its README.md on the hub): what the stages are, what they learnt from,
the backbones' licences as their authors state them, intended use and limits.

Layer: hub (imports the base layer, ``shards.manifest`` and :mod:`musiclm.hub.model_folder`).

:func:`model_card` writes the card from what the run folders know, one named section after another:
the hub metadata, the stages, the tokenizer, the licences, the training data, intended use and limits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from musiclm.hub.model_folder import StageRun, model_tokenizer, stage_runs
from musiclm.version import __version__

README = "README.md"  # the model card's file name in a hub repo (and in a pulled model folder)
MUSICLM_LICENCE = "Apache-2.0"


@dataclass(frozen=True)
class Licence:
    """A backbone's licence as its authors state it; ``spdx`` None where it could not be verified."""

    spdx: str | None
    non_commercial: bool | None  # None: not known
    source: str  # where it is stated
    note: str = ""


# Looked up in the authors' model cards and repositories; a backbone missing here is "not verified".
BACKBONE_LICENCES: dict[str, Licence] = {
    "laion/larger_clap_music": Licence("apache-2.0", False, "https://huggingface.co/laion/larger_clap_music"),
    "m-a-p/MERT-v0": Licence("cc-by-nc-4.0", True, "https://huggingface.co/m-a-p/MERT-v0"),
    "m-a-p/MERT-v0-public": Licence(
        "cc-by-nc-4.0", True, "https://huggingface.co/m-a-p/MERT-v0-public", "the card's metadata; copies of an earlier card said MIT"
    ),
    "m-a-p/MERT-v1-95M": Licence("cc-by-nc-4.0", True, "https://huggingface.co/m-a-p/MERT-v1-95M"),
    "m-a-p/MERT-v1-330M": Licence("cc-by-nc-4.0", True, "https://huggingface.co/m-a-p/MERT-v1-330M"),
    "facebook/encodec_24khz": Licence(
        None,
        None,
        "https://huggingface.co/facebook/encodec_24khz",
        "its model card states no licence (https://huggingface.co/facebook/encodec_24khz/discussions/4); "
        "the authors' repository releases its code under MIT and says nothing of the weights (https://github.com/facebookresearch/encodec#license)",
    ),
    "facebook/encodec_48khz": Licence("mit", False, "https://huggingface.co/facebook/encodec_48khz"),
    "facebook/encodec_32khz": Licence(
        "cc-by-nc-4.0",
        True,
        "https://github.com/facebookresearch/audiocraft#license",
        "its model card states none; it is MusicGen's codec, and audiocraft releases its model weights under CC-BY-NC 4.0",
    ),
}
_DAC = (
    "its model page states no licence; the Descript Audio Codec repository, which released these weights, "
    "licenses them under MIT (https://github.com/descriptinc/descript-audio-codec#license)"
)
BACKBONE_LICENCES.update(
    {
        "facebook/w2v-bert-2.0": Licence("mit", False, "https://huggingface.co/facebook/w2v-bert-2.0"),
        "descript/dac_24khz": Licence("mit", False, "https://huggingface.co/descript/dac_24khz", _DAC),
        "descript/dac_44khz": Licence("mit", False, "https://huggingface.co/descript/dac_44khz", _DAC),
        "descript/dac_16khz": Licence("mit", False, "https://huggingface.co/descript/dac_16khz", _DAC),
    }
)
ROLES = {"clap": "CLAP (text and audio conditioning)", "semantic": "semantic tokens", "codec": "acoustic tokens, decoding"}
OLD_KEYS = {"semantic": "mert", "codec": "encodec"}  # the config keys of tokenizers written before the backbones were pluggable


def _role(tok: dict[str, Any], b: str) -> str:
    """A backbone's role, with its transformers class where the tokenizer record names it."""
    entry = tok.get("backbones", {}).get(b) or tok.get("backbones", {}).get(OLD_KEYS.get(b, b)) or {}
    if b == "clap":
        return ROLES[b]
    default = {"semantic": "MERT", "codec": "Encodec"}[b]  # what every tokenizer used before the class was recorded
    return f"{entry.get('class', default)} ({ROLES[b]})"


def backbone_licence(model: str) -> Licence:
    """The licence of a backbone named in a tokenizer config: looked up for the hub ids above; ``"random"``
    (built offline, no pretrained weights) inherits nothing; anything else is not verified."""
    if model == "random":
        return Licence("none inherited", False, "", "built by musiclm from a config with random weights: no pretrained weights")
    if model in BACKBONE_LICENCES:
        return BACKBONE_LICENCES[model]
    return Licence(None, None, "", "not a backbone whose licence musiclm has looked up (a local folder or another hub id)")


def _metrics(run: Path) -> dict[str, Any]:
    """The last held-out loss (and its step), the best one, and the last training loss of ``run/metrics.jsonl``."""
    out: dict[str, Any] = {}
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "val/loss" in row:
            out["val_loss"], out["val_step"] = row["val/loss"], row.get("step")
        if "val/best" in row:
            out["val_best"] = row["val/best"]
        if "train/loss" in row:
            out["train_loss"], out["train_step"] = row["train/loss"], row.get("step")
    return out


def _provenance(record: dict[str, Any]) -> str:
    """Where a fine-tuned or merged stage came from, as its run.json names it (run folder names only: paths stay private)."""
    text = ""
    base = record.get("init_from")
    if isinstance(base, dict):
        text += f" Fine-tuned from step {base.get('step')} of run `{Path(str(base.get('run', '?'))).name}` (weights sha256 `{str(base.get('sha256', ''))[:16]}`)."
    lora = record.get("lora")
    if isinstance(lora, dict):
        text += f" LoRA: {', '.join(f'{k} {v}' for k, v in lora.items() if not isinstance(v, (dict, list)))}."
    merged = record.get("merged_from")
    if isinstance(merged, dict):
        text += f" Merged from step {merged.get('step')} of run `{Path(str(merged.get('run', '?'))).name}`."
    return text


def _count(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else "?"


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "—"


def model_card(runs: str | Path, repo_id: str | None = None) -> str:
    """A model card (README.md with hub metadata) for the model folder ``runs``, written from what the run
    folders know: stages, sizes, steps, held-out losses, the tokenizer and its backbones with their licences as
    their authors state them, the training corpus (its manifest) and its licence files, intended use and limits."""
    runs = Path(runs)
    stages = stage_runs(runs)
    tok = json.loads((model_tokenizer(runs, stages) / "tokenizer.json").read_text())
    config = tok.get("config", {})
    backbones = {b: (config.get(b) or config.get(OLD_KEYS.get(b, b)) or {}).get("model", "?") for b in ROLES}
    licences = {b: backbone_licence(m) for b, m in backbones.items()}
    roles = {b: _role(tok, b) for b in ROLES}
    sections = (
        _front_matter(repo_id or runs.resolve().name, licences, roles["codec"].split(" (")[0]),
        _stages_section(stages),
        _tokenizer_section(tok, backbones, licences, roles),
        _licences_section(backbones, licences, roles),
        _training_data_section(stages),
        _use_section(),
    )
    return "\n".join(line for section in sections for line in section)


def _front_matter(name: str, licences: dict[str, Licence], codec: str) -> list[str]:
    """The hub metadata, the title, what the model is and how to load it."""
    restricted = any(lic.non_commercial for lic in licences.values())
    return [
        "---",
        "license: other",
        f"license_name: {'non-commercial' if restricted else 'see-model-card'}",
        "library_name: musiclm",
        "pipeline_tag: text-to-audio",
        "tags:\n- music\n- text-to-music\n- musiclm",
        "---",
        "",
        f"# {name}",
        "",
        f"A MusicLM-style text-to-music model trained with musiclm {__version__}: "
        f"CLAP text tokens → semantic stage → coarse acoustic stage → fine acoustic stage → {codec} decoding.",
        "",
        "```python",
        "from musiclm import MusicLM",
        "",
        f'lm = MusicLM.from_pretrained("{name}")  # revision="<commit sha>" pins this version',
        'audio = lm.generate("a calm piano over soft rain", seconds=10)',
        "```",
        "",
    ]


def _stages_section(stages: dict[str, StageRun]) -> list[str]:
    """A table of the stages (size, steps, batch, losses), then each stage's layout, held-out data and provenance."""
    lines = [
        "## Stages",
        "",
        "| stage | parameters | layers | width | heads | steps trained | batch (windows) | held-out loss | best held-out loss | last training loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stages.values():
        cfg = s.record.get("config", {})
        model, train = cfg.get("model", {}), cfg.get("train", {})
        m = _metrics(s.run)
        batch = train.get("batch_size", 0) * train.get("grad_accum", 1) * s.record.get("world_size", 1)
        held = f"{_fmt(m.get('val_loss'))} (step {m.get('val_step')})" if "val_loss" in m else "not measured"
        lines.append(
            f"| {s.name} | {_count(s.record.get('parameters'))} | {model.get('n_layers', '?')} | {model.get('d_model', '?')} | {model.get('n_heads', '?')} "
            f"| {_count(s.step)} of {_count(train.get('steps'))} | {batch} | {held} | {_fmt(m.get('val_best'))} | {_fmt(m.get('train_loss'))} |"
        )
    lines.append("")
    for s in stages.values():
        layout = s.record.get("layout", {})
        lines.append(f"- **{s.name}**: {layout.get('description', '')}; held-out data: {s.record.get('validation', 'not recorded')}.{_provenance(s.record)}")
    return [*lines, "", "Losses are mean cross-entropy (nats) per predicted token, from each run's `metrics.jsonl`.", ""]


def _tokenizer_section(tok: dict[str, Any], backbones: dict[str, str], licences: dict[str, Licence], roles: dict[str, str]) -> list[str]:
    """The tokenizer's fingerprint and streams, and a table of its backbones with their revisions and licences."""
    config = tok.get("config", {})
    lines = ["## Tokenizer", "", f"Tokenizer fingerprint `{tok.get('fingerprint')}` (format {tok.get('format')}), in `tokenizer/`.", ""]
    for stream, st in tok.get("streams", {}).items():
        rate = f"{st['frame_rate']:g} Hz" if st.get("frame_rate") else f"one row per {st.get('window_seconds', '?')} s window"
        lines.append(f"- {stream}: {st.get('levels')} level(s) of {st.get('codebook_size')} codes, {rate}")
    lines += ["", "| backbone | model | revision | licence (as stated by its authors) | source |", "|---|---|---|---|---|"]
    for b, model in backbones.items():
        lic = licences[b]
        revision = "—" if model == "random" else ((config.get(b) or config.get(OLD_KEYS.get(b, b)) or {}).get("revision") or "not pinned (main)")
        stated = lic.spdx or "not verified"
        if lic.note:
            stated += f" ({lic.note})"
        lines.append(f"| {roles[b]} | `{model}` | {revision} | {stated} | {lic.source or '—'} |")
    return [*lines, ""]


def _licences_section(backbones: dict[str, str], licences: dict[str, Licence], roles: dict[str, str]) -> list[str]:
    """What the licences of the code, the backbones and the training audio mean for these weights."""
    restricted = [b for b, lic in licences.items() if lic.non_commercial]
    unknown = [b for b, lic in licences.items() if lic.non_commercial is None]
    lines = ["## Licences", "", f"- The musiclm code is licensed under {MUSICLM_LICENCE}; that licence does not cover these weights."]
    for b in restricted:
        lines.append(
            f"- The weights of `{backbones[b]}` ({roles[b]}) are licensed {licences[b].spdx} by their authors: for non-commercial use only. "
            "That restriction carries over to the tokens computed with them, to the models trained on those tokens "
            "(this one), and to what they generate: this model may be used for non-commercial purposes only."
        )
    for b in unknown:
        lines.append(f"- The licence of `{backbones[b]}` ({roles[b]}) is not verified: check it before any use beyond research.")
    if not restricted and not unknown:
        lines.append("- No backbone carries a non-commercial licence:")
        for b, lic in licences.items():
            source = f", as stated at {lic.source}" if lic.source else ""
            lines.append(f"  - `{backbones[b]}` ({roles[b]}): {lic.spdx}{source}.")
    return [*lines, "- The training audio keeps its own licences (below): a model trained on it may be bound by them.", ""]


def _training_data_section(stages: dict[str, StageRun]) -> list[str]:
    """The corpus each stage learnt from (stages that share a manifest share a line), with its licence files."""
    from musiclm.shards.manifest import read_manifest

    lines = ["## Training data", ""]
    manifests = {s.name: read_manifest(s.run) for s in stages.values()}
    by_hash: dict[str | None, list[str]] = {}
    for stage, m in manifests.items():
        by_hash.setdefault(m["manifest_sha256"] if m else None, []).append(stage)
    for digest, which in by_hash.items():
        m = manifests[which[0]]
        label = ", ".join(which)
        if m is None:
            lines.append(f"- **{label}**: no corpus manifest was carried into the run (tokenized before musiclm wrote manifests): the training data is not described.")
            continue
        hours = m.get("seconds", 0) / 3600
        lines.append(
            f"- **{label}**: {m['files'] - m.get('failed', 0):,} audio files ({hours:.2f} h; {m.get('failed', 0)} refused, {m.get('bytes', 0) / 1e6:,.1f} MB), "
            f"corpus manifest sha256 `{digest}` (paths: {m['paths']}), written by musiclm {m.get('musiclm_version')} on {m.get('created')}."
        )
        if m.get("licences"):
            lines.append("  Licence files found in the corpus:")
            lines += [f"  - `{lic['path']}` (sha256 `{lic['sha256'][:16]}`): \"{lic.get('first_line', '')}\"" for lic in m["licences"]]
        else:
            lines.append("  No licence file was found in the corpus tree: the licence of the training audio is not recorded.")
    return [
        *lines,
        "",
        "The manifest hash names the exact files (path, size, sha256) the stages learnt from; each stage folder holds its manifest summary.",
        "",
    ]


def _use_section() -> list[str]:
    """Intended use and limits: the same for every model."""
    return [
        "## Intended use and limits",
        "",
        "- Intended for research on and experiments with text-to-music generation, within the licences above.",
        "- It generates music like its training corpus and no other: styles, instruments and recording conditions absent "
        "from that corpus will not come out, and a small corpus can be reproduced closely. Check outputs before publishing them.",
        "- Text reaches the model only through CLAP's text embedding quantized with codebooks fitted on audio: prompts far "
        "from the corpus's audio are followed loosely. No captions were used in training.",
        "- Not evaluated for fairness, for memorisation of the training audio, or on any benchmark beyond the held-out losses above.",
        "- Not for generating audio that imitates a specific artist or passes off as a real recording.",
        "",
    ]
