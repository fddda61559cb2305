"""Checkpoints of a training run, written so that a kill at any moment leaves a usable run folder.

Layout under ``RUN/checkpoints/``::

    step-000000100/model.safetensors   the model's weights (safetensors, fp32)
    step-000000100/state.pt            optimizer, scheduler, RNG states, step, loader position, best val
    step-000000100/records.json        bytes and sha256 of the two files above (musiclm.integrity)
    latest                             one line: the name of the newest complete checkpoint

A LoRA run (see lora.py) writes ``adapter.safetensors`` (the adapter's tensors
only) in place of ``model.safetensors``; its ``state.pt`` holds the optimizer
state of those tensors. Such a run names the checkpoint it adapts by a
:class:`CheckpointRef` (path and sha256 of the weight file).

A checkpoint is written into a temporary folder, its files fsync'ed, their
record file written, and the folder renamed into place; ``latest`` is then
replaced atomically. A run killed mid-write leaves only a ``.tmp-*`` folder,
removed at the next start. Only the newest ``keep_last`` checkpoints are kept.

Which checkpoint is read: the newest is the highest step (``latest`` says the
same for people and older readers). Before it is used it is checked against its
record file (:func:`checkpoint_problem`): a resumed run hashes every file of
each candidate, newest first, and continues from the first that matches
(:func:`sound_checkpoint`); loading a stage for generation hashes its weight
file and refuses a damaged one. Hashing costs about 0.5 s per GB (sha256 on
this project's CPU); both read every byte of those files right after anyway,
and a flipped byte in the middle is invisible to a size check, loads without
complaint (safetensors and torch.load do not checksum) and turns into wrong
weights or NaN losses. A run's ``run.json`` says from which step its
checkpoints carry a record file (``RECORDS_FROM``): older ones (written before
record files existed) are checked for their structure only.

``state.pt`` holds tensors, numbers, strings, lists and dicts only, so it loads
with ``torch.load(weights_only=True)``. The files of the whole run folder, for
``musiclm verify``, are listed by run_folder.py.

Layer: training (imports only the base layer).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from musiclm import atomic
from musiclm.digest import sha256_file
from musiclm.errors import UserError
from musiclm.integrity import UNRECORDED, DamagedFile, FileRecord, full_check, quick_check, read_records, write_records

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"
STATE = "state.pt"
RECORDS = "records.json"  # the checkpoint's record file: {file: bytes and sha256}
RECORDS_FROM = "checkpoint_records_from_step"  # run.json: checkpoints at this step and later have RECORDS
DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint a resumed run moved aside: damaged-step-000000200
ADVICE = "restore the checkpoint from a copy; musiclm train --resume goes back to the newest sound checkpoint"


def weights_file(folder: str | Path) -> Path | None:
    """The weight file of a checkpoint folder: model.safetensors, else adapter.safetensors; None without either."""
    for name in (WEIGHTS, ADAPTER):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def checkpoint_step(folder: str | Path) -> int | None:
    """The step of a checkpoint folder by its name (``step-000000100`` -> 100); None for another name."""
    name = Path(folder).name
    if not name.startswith("step-"):
        return None
    try:
        return int(name.split("-", 1)[1])
    except ValueError:
        return None


def step_folders(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every checkpoint folder of a run as ``(step, folder)``, oldest first, whole or not."""
    found = ((checkpoint_step(p), p) for p in (Path(run_dir) / CHECKPOINTS).glob("step-*") if p.is_dir())
    return sorted((step, p) for step, p in found if step is not None)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run (a weight file and state.pt) as ``(step, folder)``, oldest first."""
    return [(step, p) for step, p in step_folders(run_dir) if weights_file(p) is not None and (p / STATE).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint folder of a run: its highest step, whole or not (a reader checks it with
    :func:`checkpoint_problem`); None without checkpoints."""
    found = step_folders(run_dir)
    return found[-1][1] if found else None


def run_folder(path: str | Path) -> Path:
    """The run folder of ``path``: a run folder itself, or one of its checkpoint folders."""
    path = Path(path)
    is_checkpoint = weights_file(path) is not None or (checkpoint_step(path) is not None and path.parent.name == CHECKPOINTS)
    return path.parent.parent if is_checkpoint else path


def checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint a user's path names: the path itself when it is a checkpoint folder, else the
    run's latest. UserError when there is none."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: pass a run folder written by musiclm train, or one of its checkpoints")
    folder = latest_checkpoint(path) if run_folder(path) == path else path
    if folder is None:
        raise UserError(f"{path} holds no checkpoint: train it with musiclm train, or point at a run folder")
    return folder


def clean_partial(run_dir: str | Path) -> None:
    """Remove temporary folders left by a run killed while it wrote a checkpoint."""
    for p in (Path(run_dir) / CHECKPOINTS).glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], keep_last: int, file: str = WEIGHTS) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, and prune old ones.

    ``weights``: a model's ``state_dict()`` (or an adapter's tensors, with ``file=ADAPTER``);
    ``state``: anything ``torch.save`` stores under ``weights_only`` rules.
    ``keep_last < 1`` keeps every checkpoint.
    """
    folder = Path(run_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = folder / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(tmp / file))
    torch.save(state, tmp / STATE)
    for f in (file, STATE):
        atomic.fsync(tmp / f)
    write_records(tmp / RECORDS, {f: FileRecord.of(tmp / f) for f in (file, STATE)})
    final = folder / name
    if final.exists():  # a leftover of a killed run at the same step: replace it
        old = folder / f".tmp-old-{name}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    atomic.write_text(folder / LATEST, name + "\n")
    if keep_last >= 1:
        for s, p in step_folders(run_dir)[:-keep_last]:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
    return final


# ---- checking -----------------------------------------------------------------------------------------------------


def records_from(run: dict[str, Any] | None, run_dir: str | Path) -> float:
    """The first step whose checkpoint must hold a record file, from the run's parsed run.json.

    A run.json without the key was written before record files: no checkpoint needs one (inf).
    ``run`` None (run.json unreadable): the oldest checkpoint that has one says where they began.
    """
    if run is not None:
        return float(run.get(RECORDS_FROM, math.inf))
    return float(min((step for step, p in step_folders(run_dir) if (p / RECORDS).exists()), default=math.inf))


def checkpoint_records(folder: str | Path, recorded: bool) -> dict[str, FileRecord]:
    """What a checkpoint folder should hold: ``{file name: record}``.

    From its record file when there is one; else (``recorded`` False: written before record files) the
    weight file it has (model.safetensors when neither) and state.pt, as :data:`UNRECORDED` (checked for
    their structure only; verify reports them as unrecorded). DamagedFile when the record file is damaged,
    UserError when it is missing although ``recorded``.
    """
    folder = Path(folder)
    try:
        return dict(read_records(folder / RECORDS))
    except FileNotFoundError:
        if recorded:
            raise UserError(f"{folder / RECORDS} is missing: {ADVICE}") from None
    weights = weights_file(folder)
    return {(weights.name if weights is not None else WEIGHTS): UNRECORDED, STATE: UNRECORDED}


def checkpoint_problem(folder: str | Path, recorded: bool, state: bool = True) -> tuple[str, str] | None:
    """``(file name, what is wrong)`` for the first damaged or missing file of a checkpoint folder; None when sound.

    Every recorded file is hashed (see the module docstring for why). ``recorded``: the checkpoint must
    hold a record file (see :func:`records_from`); ``state`` False: leave state.pt out (loading a stage
    reads the weights only). A checkpoint without records is checked for its structure only.
    """
    folder = Path(folder)
    try:
        records = checkpoint_records(folder, recorded)
    except DamagedFile as e:
        return RECORDS, e.problem
    except UserError:
        return RECORDS, "missing"
    for name, record in sorted(records.items()):
        if name == STATE and not state:
            continue
        problem = full_check(folder / name, record)  # UNRECORDED: the structural check only
        if problem is not None:
            return name, problem
    return None


def sound_checkpoint(
    run_dir: str | Path, records_from_step: float, state: bool = True, load: Callable[[Path], Any] | None = None
) -> tuple[Path | None, Any, list[tuple[Path, str]]]:
    """The newest checkpoint of a run whose files all match their records (hashed), newest first.

    Returns ``(folder, load(folder), passed)``: ``passed`` lists the newer checkpoints passed over as
    ``(folder, "file: problem")``. ``load``, when given, reads the checkpoint that matched; one it
    cannot read (DamagedFile: an unrecorded checkpoint, checked for structure only) is passed over
    too. ``(None, None, passed)`` when none is sound.
    """
    passed: list[tuple[Path, str]] = []
    for step, folder in reversed(step_folders(run_dir)):
        found = checkpoint_problem(folder, recorded=step >= records_from_step, state=state)
        if found is None:
            try:
                return folder, (load(folder) if load is not None else None), passed
            except DamagedFile as e:
                found = (e.path.name, e.problem)
        passed.append((folder, f"{found[0]}: {found[1]}"))
    return None, None, passed


def require_sound(folder: str | Path, run: dict[str, Any] | None, named: bool = True, advice: str | None = None) -> Path:
    """``folder`` when its weight file and record file are sound (the weights hashed), else a one-line
    DamagedFile / UserError; state.pt is not looked at (loading a stage does not read it).

    ``run``: the run's parsed run.json (see :func:`records_from`). Hashing costs little here: the weight
    file is read whole right after, and a flipped byte in it would load without complaint. An older
    checkpoint is never taken silently in place of the one asked for: the message names the newest sound
    one (``named`` False: the user named the run, not this checkpoint). ``advice`` replaces that hint."""
    folder = Path(folder)
    run_path = run_folder(folder)
    first = records_from(run, run_path)
    step = checkpoint_step(folder)
    found = checkpoint_problem(folder, recorded=step is not None and step >= first, state=False)
    if found is None:
        return folder
    name, problem = found
    if advice is None and named:
        advice = "restore it from a copy, or pass another checkpoint of the run"
    elif advice is None:
        sound, _, _ = sound_checkpoint(run_path, first, state=False)
        advice = (
            f"pass {sound} to use the newest sound checkpoint, or restore this one from a copy"
            if sound is not None
            else "no checkpoint of this run is sound: restore one from a copy, or train the stage again"
        )
    if problem == "missing":
        raise UserError(f"{folder / name} is missing: {advice}")
    raise DamagedFile(folder / name, problem, advice)


def move_aside(folder: str | Path) -> Path:
    """Rename a damaged checkpoint folder out of the run's checkpoints (``damaged-step-…``); returns its new path.

    Not deleted: it is the user's to inspect; the run no longer reads it, and ``musiclm verify`` lists it."""
    folder = Path(folder)
    target = folder.with_name(DAMAGED_PREFIX + folder.name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(folder, target)
    return target


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_weights(folder: str | Path, device: str | torch.device = "cpu", file: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights (a state dict), or with ``file=ADAPTER`` its adapter's tensors.

    Unchecked (see :func:`checkpoint_problem`); a file safetensors cannot read is a DamagedFile."""
    from safetensors import SafetensorError

    path = Path(folder) / file
    if not path.is_file():
        raise UserError(f"checkpoint {folder} has no {file}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DamagedFile(path, f"unreadable: {_first_line(e)}", ADVICE) from None


def load_state(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's training state (see :func:`save_checkpoint`); a file torch cannot read is a DamagedFile."""
    import pickle

    path = Path(folder) / STATE
    if not path.is_file():
        raise UserError(f"checkpoint {folder} has no {STATE}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise DamagedFile(path, f"unreadable: {_first_line(e)}", ADVICE) from None


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint another run starts from, named by where it was and what its weight file held.

    ``folder``: the checkpoint folder (absolute); ``run``: its run folder; ``file``: the weight
    file's name in it; ``sha256``: of that file; ``step``: its training step.
    """

    folder: str
    run: str
    file: str
    sha256: str
    step: int

    @classmethod
    def of(cls, folder: str | Path) -> CheckpointRef:
        """The reference of a complete checkpoint folder (hashes its weight file)."""
        folder = Path(folder).resolve()
        weights = weights_file(folder)
        if weights is None or not (folder / STATE).is_file():
            raise UserError(f"{folder} is not a complete checkpoint (no weight file or no {STATE})")
        step = checkpoint_step(folder)  # by its name: state.pt (optimizer state, large) is not read for it
        step = int(load_state(folder)["step"]) if step is None else step
        return cls(str(folder), str(run_folder(folder)), weights.name, sha256_file(weights), step)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CheckpointRef:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def verify(self, whose: str) -> Path:
        """The checkpoint folder, after checking that its weight file is still the one referenced.

        ``whose`` names the run that needs it, for the message. UserError when the checkpoint is
        missing or its weights changed (e.g. the base run was retrained into the same folder).
        """
        path = Path(self.folder) / self.file
        if not path.is_file():
            raise UserError(f"{whose} needs its base checkpoint {path}, which is missing: put the base run back at {self.run}, or merge the adapter (musiclm merge) while the base exists")
        if sha256_file(path) != self.sha256:
            raise UserError(f"{whose} was trained on another {path} (sha256 {self.sha256[:12]}..., now {sha256_file(path)[:12]}...): the base run changed; restore it or train a new adapter")
        return Path(self.folder)
