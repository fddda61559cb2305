"""A model folder: the stage run folders of one model and the tokenizer they were trained with, found by fingerprint.

Layer: hub (imports the base layer, ``shards.format``, ``shards.tokenizer_folder``'s folder reads, and
``training``'s checkpoint names and run file).

::

    MODEL/semantic/    a run folder written by musiclm train semantic, or a pushed stage (weights, no state.pt)
    MODEL/coarse/      the same, for coarse
    MODEL/fine/        the same, for fine; may be missing (coarse-only use)
    MODEL/tokenizer/   the tokenizer the stages were trained with; else a stage's own copy, STAGE/tokenizer/,
                       else the data folder a stage's run.json records (a training run on this machine)

A folder put together by hand from three training runs and a model pulled from the hub
(:func:`musiclm.hub.pull.resolve_model`) are both model folders; the hub pushes one
(:func:`musiclm.hub.push.push`) and describes it (:func:`musiclm.hub.card.model_card`); generation loads one.
The stages and their tokenizer share one tokenizer fingerprint: a tokenizer searched for is found by it
(:func:`tokenizer_with`); one given (:func:`own_tokenizer`) is checked against it when it is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
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


def stage_folders(folder: Path) -> dict[str, Path]:
    """The stage run folders of the model folder ``folder``: ``semantic`` and ``coarse`` (a UserError names the
    first one missing) and ``fine`` when it is there (without it, coarse-only use)."""
    found = {}
    for name in STAGES:
        if (folder / name).exists():
            found[name] = folder / name
        elif name != "fine":
            raise UserError(f"no {name} stage: {folder} has no {name}/ run folder")
    return found


def chosen_stages(model: Path | None, given: Mapping[str, str | Path | None], coarse_only: bool = False) -> dict[str, Path | None]:
    """Each stage's run folder for ``musiclm generate``: the one ``given`` for it (``--semantic``, ``--coarse``,
    ``--fine``), else ``model/STAGE``. Every stage must exist, but fine with ``coarse_only`` (then None);
    else a one-line UserError says how to give it."""
    runs: dict[str, Path | None] = {}
    for name in STAGES:
        path = Path(given[name]) if given.get(name) is not None else (Path(model) / name if model is not None else None)
        if name == "fine" and coarse_only:
            path = None
        elif path is None or not path.exists():
            where = f"{path} does not exist" if path is not None else f"pass --model DIR holding {name}/ or --{name} RUN"
            raise UserError(f"no {name} stage: {where}" + ("" if name != "fine" else " (or generate with --coarse-only)"))
        runs[name] = path
    return runs


def own_tokenizer(folder: Path) -> Path | None:
    """``folder/tokenizer`` when the model folder has one, else None (then the stages' copies are searched)."""
    return folder / TOKENIZER if (folder / TOKENIZER).is_dir() else None


def stage_source(run: str | Path) -> Path:
    """What :func:`~musiclm.training.run_folder.load_stage` should read for the stage folder ``run``: the folder
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
    for name, run in stage_folders(runs).items():
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


def tokenizer_with(candidates: Iterable[Path], fingerprint: str, checked: bool = True) -> Path | None:
    """The first of the tokenizer folders ``candidates`` that holds the tokenizer ``fingerprint`` names, else None.

    ``checked`` (loading a model): a tokenizer.json is checked against its record before it is read, and a
    copy whose tokenizer.json is gone while its record file says it had one is refused (UserError), not
    passed over for the next candidate. Unchecked (the hub): tokenizer.json is read as it is, and a
    candidate without one passed over; a push checks the folder it found, every file, afterwards."""
    from musiclm.shards.tokenizer_folder import ADVICE, RECORDS_FILE, read_checked_record, read_record
    from musiclm.shards.format import TOKENIZER_FILE

    read = read_checked_record if checked else read_record
    for folder in candidates:
        if checked and not (folder / TOKENIZER_FILE).is_file() and (folder / RECORDS_FILE).is_file():
            raise UserError(f"{folder / TOKENIZER_FILE} is missing: {ADVICE}")
        if (folder / TOKENIZER_FILE).is_file() and read(folder)["fingerprint"] == fingerprint:
            return folder
    return None


def find_tokenizer(runs: list[Path], fingerprint: str) -> Path:
    """The tokenizer folder of the stage runs ``runs``: RUN/tokenizer/, else the data folder recorded in
    RUN/run.json; the first that holds the tokenizer ``fingerprint`` names (:func:`tokenizer_with`)."""
    from musiclm.shards.tokenizer_folder import tokenizer_folder
    from musiclm.training.run_folder import RUN_FILE

    candidates = [run / TOKENIZER for run in runs]
    for run in runs:
        try:
            data = json.loads((run / RUN_FILE).read_text()).get("data")
        except (OSError, ValueError):
            data = None
        if data:
            candidates.append(tokenizer_folder(data))
    found = tokenizer_with(candidates, fingerprint)
    if found is None:
        tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
        raise UserError(f"cannot find the tokenizer (fingerprint {fingerprint}) these stages were trained with; looked in {tried}")
    return found


def model_tokenizer(runs: Path, stages: dict[str, StageRun]) -> Path:
    """The tokenizer of the model folder ``runs`` as pushed: ``runs/tokenizer``, else a stage's own copy
    (:func:`tokenizer_with`, unchecked), with every quantizer its record names."""
    from musiclm.shards.tokenizer_folder import read_record

    fingerprint = next(iter(stages.values())).record.get("fingerprint")
    folder = tokenizer_with(tokenizer_copies(runs, stages), fingerprint, checked=False)
    if folder is None:
        raise UserError(f"cannot find the tokenizer (fingerprint {fingerprint}) of {runs}: put the corpus's DIR/tokenizer folder at {runs / TOKENIZER}")
    missing = [f for f in read_record(folder)["quantizers"] if not (folder / f).is_file()]
    if missing:
        raise UserError(f"the tokenizer {folder} lacks {', '.join(missing)}: copy the tokenized corpus's DIR/tokenizer folder there")
    return folder
