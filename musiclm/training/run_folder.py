"""A run folder on disk: what ``musiclm train`` writes, which files it should hold, and how a trained stage is read back.

A run folder ``RUN`` (``--out``) holds::

    run.json            stage, full config, tokenizer info (with fingerprint), data paths, layout, world size
    tokenizer/          a copy of the data's tokenizer folder (tokenizer.json, quantizers, offline
                        backbones), so generation decodes with exactly the tokenizer trained on
    manifest.json       the corpus these weights learned from (carried from the data folder)
    checkpoints/        step-NNNNNNNNN/{model.safetensors,state.pt,records.json} and ``latest`` (see checkpoint.py)
    metrics.jsonl       one JSON object per logged step (see logs.py)
    tb/                 the same scalars for TensorBoard

A fine-tuned run's run.json names the checkpoint it started from (``init_from``,
a :class:`~musiclm.training.checkpoint.CheckpointRef`) and, for a LoRA run, the
adapter (``lora``); :func:`load_stage` returns such a run's base with the
adapter merged, so an adapter run stands wherever a stage run does.

Layer: training (imports the base layer, musiclm.shards, musiclm.models, and
training.checkpoint, training.logs, training.lora; the tokenizer copy's file list
from ``shards.tokenizer_folder``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from musiclm import atomic
from musiclm.config import Config, config_from_dict
from musiclm.device import pick_device
from musiclm.errors import UserError
from musiclm.integrity import DamagedFile, FileRecord, read_json
from musiclm.models.layout import StageLayout, layout_for
from musiclm.models.transformer import MusicTransformer
from musiclm.shards.format import TOKENIZER_FILE, TokenInfo
from musiclm.shards.manifest import MANIFEST_FILE
from musiclm.training import checkpoint as ckpt
from musiclm.training import lora
from musiclm.training.logs import METRICS_FILE, TB_DIR

RUN_FILE = "run.json"
TOKENIZER_DIR = "tokenizer"
RUN_ADVICE = "restore run.json from a copy; musiclm train --resume with the run's --preset/--config writes it again"


def read_run(run_path: Path) -> dict[str, Any]:
    """The parsed run.json of a run folder: UserError without one, DamagedFile when it does not parse."""
    path = run_path / RUN_FILE
    if not path.is_file():
        raise UserError(f"{run_path} is not a musiclm run folder ({RUN_FILE} is missing)")
    run = read_json(path, RUN_ADVICE)
    if not isinstance(run, dict):
        raise DamagedFile(path, "not a JSON object", RUN_ADVICE)
    return run


def write_run(run_path: Path, run: dict[str, Any]) -> None:
    """Write ``run`` as the run folder's run.json (atomically; values JSON cannot hold as their str)."""
    atomic.write_text(run_path / RUN_FILE, json.dumps(run, indent=2, default=str) + "\n")


def read_run_lenient(run_path: str | Path) -> dict[str, Any] | None:
    """The parsed run.json of a run folder, None when it is missing or damaged."""
    try:
        return read_run(Path(run_path))
    except UserError:
        return None


def run_files(run_dir: str | Path) -> dict[str, tuple[FileRecord | None, str]]:
    """The files of a run folder besides its checkpoints, for ``musiclm verify``: run.json, and when there
    metrics.jsonl, TensorBoard event files and manifest.json (logs and a copy: no records of their own,
    they are checked for being whole), and the tokenizer copy's files with their records."""
    run_dir = Path(run_dir)
    out: dict[str, tuple[FileRecord | None, str]] = {RUN_FILE: (None, RUN_ADVICE)}
    for name in (METRICS_FILE, MANIFEST_FILE):
        if (run_dir / name).exists():
            out[name] = (None, "musiclm train --resume writes it again")
    for p in sorted((run_dir / TB_DIR).rglob("*")):
        if p.is_file():
            out[p.relative_to(run_dir).as_posix()] = (None, "TensorBoard's log; metrics.jsonl holds the same values")
    if (run_dir / TOKENIZER_DIR).is_dir():
        from musiclm.shards.tokenizer_folder import expected_files as tokenizer_files  # verify only

        out.update({f"{TOKENIZER_DIR}/{rel}": v for rel, v in tokenizer_files(run_dir / TOKENIZER_DIR).items()})
    return out


def expected_files(run_dir: str | Path) -> dict[str, tuple[FileRecord | None, str]]:
    """Every file a run folder should hold, ``{path relative to run_dir: (record or None, advice)}``: the run's
    own files (:func:`run_files`, its tokenizer copy included), ``checkpoints/latest``
    and each checkpoint's files with their records. A checkpoint whose record file is damaged has its other
    files listed without records (the record file is what is reported)."""
    run_dir = Path(run_dir)
    out = run_files(run_dir)
    first = ckpt.records_from(read_run_lenient(run_dir), run_dir)
    folders = ckpt.step_folders(run_dir)
    if folders or (run_dir / ckpt.CHECKPOINTS / ckpt.LATEST).exists():
        out[f"{ckpt.CHECKPOINTS}/{ckpt.LATEST}"] = (None, "musiclm train --resume writes it again")
    for step, folder in folders:
        prefix = f"{ckpt.CHECKPOINTS}/{folder.name}"
        recorded = step >= first
        try:
            records = ckpt.checkpoint_records(folder, recorded)
        except UserError:  # damaged or missing record file: reported; the files it would list are checked for structure
            records = {p.name: None for p in folder.iterdir() if p.is_file() and p.name != ckpt.RECORDS}
            out[f"{prefix}/{ckpt.RECORDS}"] = (None, ckpt.ADVICE)
        else:
            if (folder / ckpt.RECORDS).exists():
                out[f"{prefix}/{ckpt.RECORDS}"] = (None, ckpt.ADVICE)
            elif not (folder / ckpt.STATE).exists():  # unrecorded and weights only: pushed before record files
                records.pop(ckpt.STATE)
        for name, record in records.items():
            out[f"{prefix}/{name}"] = (record, ckpt.ADVICE)
    return out


def copy_tokenizer(src: Path, dst: Path, info: TokenInfo) -> None:
    """Copy the tokenizer folder into the run (atomically; kept when it is already the same tokenizer,
    copied again when its tokenizer.json is another tokenizer's or unreadable)."""
    try:
        if json.loads((dst / TOKENIZER_FILE).read_bytes()).get("fingerprint") == info.fingerprint:
            return
    except (OSError, ValueError, AttributeError):
        pass
    if (src / TOKENIZER_FILE).is_file():
        atomic.copy_folder(src, dst)
    else:
        staging = atomic.fresh_staging(dst)
        (staging / TOKENIZER_FILE).write_text(json.dumps(info.raw, indent=2) + "\n")
        atomic.replace_folder(staging, dst)


def load_stage(run_dir: str | Path, device: str | torch.device | None = None) -> tuple[MusicTransformer, StageLayout, Config, TokenInfo]:
    """A trained stage from its run folder (latest checkpoint) or from one checkpoint folder.

    Returns ``(model, layout, cfg, info)``: the model in eval mode on ``device``
    (default: cuda if available, else cpu), the stage's sequence layout, the
    run's config and its tokenizer info. Reads no data folder. An adapter run
    (LoRA) gives its base with the adapter merged in: a plain fp32 model. Its
    base must be where run.json says and hold the same weights (else UserError).
    """
    path = Path(run_dir)
    folder = ckpt.checkpoint_folder(path)
    run_path = ckpt.run_folder(folder)
    run = read_run(run_path)
    ckpt.require_sound(folder, run, named=folder == path)
    cfg = config_from_dict(run["config"])
    info = TokenInfo.from_json(run["tokenizer"])
    layout = layout_for(run["stage"], info, cfg.stages.get(run["stage"]))
    model = MusicTransformer.for_layout(cfg.model, layout)
    if run.get("lora"):
        base = ckpt.CheckpointRef.from_json(run["init_from"]).verify(f"the adapter run {run_path}")
        model.load_state_dict(ckpt.load_weights(base))
        model = lora.merged(model, lora.LoraSpec.from_json(run["lora"]), ckpt.load_weights(folder, file=ckpt.ADAPTER), str(folder))
    else:
        model.load_state_dict(ckpt.load_weights(folder))
    return model.to(pick_device(device)).eval(), layout, cfg, info
