"""Finding and loading a model: the stage run folders, the stages read from them, and their tokenizer.

Every way a generation finds its model is here, so that one model-folder
module can replace it in one place: the stage folders of a model folder
(:func:`model_folder_runs`, for :meth:`MusicLM.from_pretrained
<musiclm.generation.model.MusicLM.from_pretrained>`), the stage folders of
``musiclm generate``'s options (:func:`command_runs`), the stages loaded from
them (:func:`load_stages`) and checked to belong together (:func:`check_stages`),
and the tokenizer they were trained with, found by fingerprint (:func:`find_tokenizer`).

Layer: generation (imports the training layer's run folders and the pipeline's tokenizer folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from musiclm.config import STAGES
from musiclm.errors import UserError
from musiclm.generation.stages import Stage


def model_folder_runs(folder: Path) -> tuple[dict[str, Path], Path | None]:
    """The stage run folders of a model folder (semantic/ and coarse/ required, fine/ optional) and
    its tokenizer/ folder (None without one)."""
    runs = {}
    for name in STAGES:
        if (folder / name).exists():
            runs[name] = folder / name
        elif name != "fine":
            raise UserError(f"no {name} stage: {folder} has no {name}/ run folder")
    return runs, (folder / "tokenizer" if (folder / "tokenizer").is_dir() else None)


def command_runs(
    model: Path | None, semantic: str | Path | None, coarse: str | Path | None, fine: str | Path | None, coarse_only: bool
) -> tuple[dict[str, Path | None], Path | None]:
    """``musiclm generate``'s stage run folders: each given one, else ``model``/<stage>; fine None with
    ``coarse_only``. With the model folder's tokenizer/ (None without one). A missing stage is a UserError."""
    runs: dict[str, Path | None] = {}
    for name, given in (("semantic", semantic), ("coarse", coarse), ("fine", fine)):
        path = Path(given) if given is not None else (Path(model) / name if model is not None else None)
        if name == "fine" and coarse_only:
            path = None
        elif path is None or not path.exists():
            where = f"{path} does not exist" if path is not None else f"pass --model DIR holding {name}/ or --{name} RUN"
            raise UserError(f"no {name} stage: {where}" + ("" if name != "fine" else " (or generate with --coarse-only)"))
        runs[name] = path
    tokenizer = Path(model) / "tokenizer" if model is not None and (Path(model) / "tokenizer").is_dir() else None
    return runs, tokenizer


def load_stages(paths: dict[str, str | Path | None], device: torch.device) -> dict[str, Stage]:
    """The stages of these run (or checkpoint) folders on ``device``, by name; None paths are left out
    (a missing semantic or coarse stage is refused by :func:`check_stages`)."""
    from musiclm.hub.model_folder import stage_source
    from musiclm.training.checkpoint import run_folder
    from musiclm.training.run_folder import load_stage

    stages: dict[str, Stage] = {}
    for name, path in paths.items():
        if path is None:
            continue
        path = Path(path)
        if not path.exists():
            raise UserError(f"the {name} stage {path} does not exist: pass a run folder written by musiclm train {name}")
        source = stage_source(path)  # a pushed or pulled stage has weights but no training state
        model, layout, cfg, _ = load_stage(source, device=device)
        stages[name] = Stage(model, layout, cfg, run_folder(source))
    return stages


def check_stages(stages: dict[str, Stage]) -> str:
    """Refuse a missing semantic or coarse stage, a stage in the wrong role, or stages trained on
    different tokenizers; returns the shared tokenizer fingerprint."""
    for name in ("semantic", "coarse"):
        if name not in stages:
            raise UserError(f"no {name} stage: pass --{name} RUN or --model DIR holding {name}/")
    for name, st in stages.items():
        if st.layout.stage != name:
            raise UserError(f"{st.run or 'the model'} is a {st.layout.stage} stage, given as the {name} stage")
    fingerprints = {name: st.layout.info.fingerprint for name, st in stages.items()}
    if len(set(fingerprints.values())) > 1:
        which = ", ".join(f"{name} ({fp})" for name, fp in fingerprints.items())
        raise UserError(f"the stages were trained on tokens of different tokenizers: {which}; train all three on one tokenized corpus")
    return next(iter(fingerprints.values()))


def find_tokenizer(runs: list[Path], fingerprint: str) -> Path:
    """The tokenizer folder of these runs: RUN/tokenizer/, else the data folder recorded in RUN/run.json.

    The first that holds the stages' tokenizer is taken, damaged or not (Tokenizer.load refuses a damaged
    one): a copy whose tokenizer.json is gone but whose record file says it had one is refused here, not
    passed over for the next candidate."""
    from musiclm.shards.tokenizer_folder import ADVICE, RECORDS_FILE, read_checked_record, tokenizer_folder
    from musiclm.shards.format import TOKENIZER_FILE
    from musiclm.training.run_folder import RUN_FILE

    candidates = [run / "tokenizer" for run in runs]
    for run in runs:
        try:
            data = json.loads((run / RUN_FILE).read_text()).get("data")
        except (OSError, ValueError):
            data = None
        if data:
            candidates.append(tokenizer_folder(data))
    for folder in candidates:
        if not (folder / TOKENIZER_FILE).is_file() and (folder / RECORDS_FILE).is_file():
            raise UserError(f"{folder / TOKENIZER_FILE} is missing: {ADVICE}")
        if (folder / TOKENIZER_FILE).is_file() and read_checked_record(folder)["fingerprint"] == fingerprint:
            return folder
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise UserError(f"cannot find the tokenizer (fingerprint {fingerprint}) these stages were trained with; looked in {tried}")
