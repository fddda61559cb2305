"""Checkpoints of a training run, written so that a kill at any moment leaves a usable run folder.

Layout under ``RUN/checkpoints/``::

    step-000000100/model.safetensors   the model's weights (safetensors, fp32)
    step-000000100/state.pt            optimizer, scheduler, RNG states, step, loader position, best val
    latest                             one line: the name of the newest complete checkpoint

A LoRA run (see lora.py) writes ``adapter.safetensors`` (the adapter's tensors
only) in place of ``model.safetensors``; its ``state.pt`` holds the optimizer
state of those tensors. Such a run names the checkpoint it adapts by a
:class:`CheckpointRef` (path and sha256 of the weight file).

A checkpoint is written into a temporary folder, its files fsync'ed, and the
folder renamed into place; ``latest`` is then replaced atomically. A run killed
mid-write leaves only a ``.tmp-*`` folder, removed at the next start. Only the
newest ``keep_last`` checkpoints are kept.

``state.pt`` holds tensors, numbers, strings, lists and dicts only, so it loads
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from musiclm import atomic
from musiclm.digest import sha256_file
from musiclm.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"
STATE = "state.pt"


def weights_file(folder: str | Path) -> Path | None:
    """The weight file of a checkpoint folder: model.safetensors, else adapter.safetensors; None without either."""
    for name in (WEIGHTS, ADAPTER):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, folder)``, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    out = []
    for p in folder.glob("step-*"):
        if p.is_dir() and weights_file(p) is not None and (p / STATE).is_file():
            try:
                out.append((int(p.name.split("-", 1)[1]), p))
            except ValueError:
                continue
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder named by ``checkpoints/latest``, else the highest complete step; None without checkpoints."""
    folder = Path(run_dir) / CHECKPOINTS
    pointer = folder / LATEST
    if pointer.is_file():
        target = folder / pointer.read_text().strip()
        if weights_file(target) is not None and (target / STATE).is_file():
            return target
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def run_folder(path: str | Path) -> Path:
    """The run folder of ``path``: a run folder itself, or one of its checkpoint folders."""
    path = Path(path)
    return path.parent.parent if weights_file(path) is not None else path


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
    final = folder / name
    if final.exists():  # a leftover of a killed run at the same step: replace it
        old = folder / f".tmp-old-{name}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    atomic.write_text(folder / LATEST, name + "\n")
    if keep_last >= 1:
        for s, p in list_checkpoints(run_dir)[:-keep_last]:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
    return final


def load_weights(folder: str | Path, device: str | torch.device = "cpu", file: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights (a state dict), or with ``file=ADAPTER`` its adapter's tensors."""
    path = Path(folder) / file
    if not path.is_file():
        raise UserError(f"checkpoint {folder} has no {file}")
    return load_file(str(path), device=str(device))


def load_state(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's training state (see :func:`save_checkpoint`)."""
    path = Path(folder) / STATE
    if not path.is_file():
        raise UserError(f"checkpoint {folder} has no {STATE}")
    return torch.load(path, map_location="cpu", weights_only=True)


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
        return cls(str(folder), str(run_folder(folder)), weights.name, sha256_file(weights), int(load_state(folder)["step"]))

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
