"""A model folder: the stage run folders of one model and the tokenizer they were trained with, found by fingerprint.

Layer: hub (imports the base layer, ``pipeline.tokenizer``'s folder reads and ``training.checkpoint``).

::

    MODEL/semantic/    a run folder written by musiclm train semantic, or a pushed stage (weights, no state.pt)
    MODEL/coarse/      the same, for coarse
    MODEL/fine/        the same, for fine; may be missing (coarse-only use)
    MODEL/tokenizer/   the tokenizer the stages were trained with; else a stage's own copy, STAGE/tokenizer/

A folder put together by hand from three training runs and a model pulled from the hub
(:func:`musiclm.hub.pull.resolve_model`) are both model folders; the hub pushes one
(:func:`musiclm.hub.push.push`) and describes it (:func:`musiclm.hub.card.model_card`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from musiclm.config import STAGES
from musiclm.errors import UserError

TOKENIZER = "tokenizer"  # MODEL/tokenizer/, and each stage's own copy STAGE/tokenizer/


def tokenizer_copies(folder: Path, stages: Iterable[str] = STAGES) -> list[Path]:
    """Where the model folder ``folder`` may keep its tokenizer, in the order they are looked at:
    ``folder/tokenizer``, then each stage's own copy ``folder/STAGE/tokenizer`` (they may not exist)."""
    return [folder / TOKENIZER, *(folder / s / TOKENIZER for s in stages)]


def stage_source(run: str | Path) -> Path:
    """What :func:`~musiclm.training.trainer.load_stage` should read for the stage folder ``run``: the folder
    itself when it has a complete checkpoint (a training run), else the checkpoint its ``checkpoints/latest``
    names when that holds the weights (a pushed or pulled model, which has no ``state.pt``)."""
    from musiclm.training.checkpoint import CHECKPOINTS, LATEST, WEIGHTS, list_checkpoints

    run = Path(run)
    if (run / WEIGHTS).is_file() or list_checkpoints(run):
        return run
    pointer = run / CHECKPOINTS / LATEST
    if pointer.is_file():
        target = run / CHECKPOINTS / pointer.read_text().strip()
        if (target / WEIGHTS).is_file():
            return target
    return run


@dataclass
class StageRun:
    """One stage folder of a model folder, as pushed."""

    name: str
    run: Path
    step: int
    weights: Path  # .../checkpoints/step-N/model.safetensors
    record: dict[str, Any]  # run.json


def stage_runs(runs: Path) -> dict[str, StageRun]:
    """The stages of the model folder ``runs`` (semantic and coarse required), each with its newest weights."""
    from musiclm.training.checkpoint import WEIGHTS, latest_checkpoint

    if not runs.is_dir():
        raise UserError(f"model folder {runs} does not exist: it should hold the semantic/, coarse/ and fine/ run folders")
    found: dict[str, StageRun] = {}
    for name in STAGES:
        run = runs / name
        if not run.exists():
            if name != "fine":
                raise UserError(f"no {name} stage: {runs} has no {name}/ run folder")
            continue
        ckpt = latest_checkpoint(run) or stage_source(run)  # a training run, else a pushed (weights-only) stage
        if ckpt == run:
            raise UserError(f"{run} holds no checkpoint: train it with musiclm train {name}")
        if not (ckpt / WEIGHTS).is_file():  # a LoRA run's checkpoints hold its adapter, which needs its base run
            raise UserError(f"{ckpt} holds no full weights ({WEIGHTS}; a LoRA adapter run?): merge it into a full run first, then push that")
        try:
            record = json.loads((run / "run.json").read_text())
        except (OSError, ValueError):
            raise UserError(f"{run} is not a musiclm run folder (no readable run.json)") from None
        if record.get("stage") != name:
            raise UserError(f"{run} is a {record.get('stage')} stage, found as the {name} stage")
        found[name] = StageRun(name, run, int(ckpt.name.split("-", 1)[1]), ckpt / WEIGHTS, record)
    fingerprints = {s.record.get("fingerprint") for s in found.values()}
    if len(fingerprints) > 1:
        raise UserError(f"the stages of {runs} were trained on tokens of different tokenizers: train all three on one tokenized corpus")
    return found


def model_tokenizer(runs: Path, stages: dict[str, StageRun]) -> Path:
    """``runs/tokenizer``, else a stage's own copy; checked to be the stages' tokenizer, with its quantizers."""
    from musiclm.pipeline.tokenizer import read_record

    fingerprint = next(iter(stages.values())).record.get("fingerprint")
    for folder in tokenizer_copies(runs, stages):
        if not (folder / "tokenizer.json").is_file():
            continue
        record = read_record(folder)
        if record["fingerprint"] != fingerprint:
            continue
        missing = [f for f in record["quantizers"] if not (folder / f).is_file()]
        if missing:
            raise UserError(f"the tokenizer {folder} lacks {', '.join(missing)}: copy the tokenized corpus's DIR/tokenizer folder there")
        return folder
    raise UserError(f"cannot find the tokenizer (fingerprint {fingerprint}) of {runs}: put the corpus's DIR/tokenizer folder at {runs / TOKENIZER}")
