"""Checkpoints of a training run, written so that a kill at any moment leaves a usable run folder.

Layout under ``RUN/checkpoints/``::

    step-000000100/model.safetensors   the model's weights (safetensors, fp32)
    step-000000100/state.pt            optimizer, scheduler, RNG states, step, loader position, best val
    latest                             one line: the name of the newest complete checkpoint

A checkpoint is written into a temporary folder, its files fsync'ed, and the
folder renamed into place; ``latest`` is then replaced atomically. A run killed
mid-write leaves only a ``.tmp-*`` folder, removed at the next start. Only the
newest ``keep_last`` checkpoints are kept.

``state.pt`` holds tensors, numbers, strings, lists and dicts only, so it loads
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from musiclm import atomic
from musiclm.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
STATE = "state.pt"


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, folder)``, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    out = []
    for p in folder.glob("step-*"):
        if p.is_dir() and (p / WEIGHTS).is_file() and (p / STATE).is_file():
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
        if (target / WEIGHTS).is_file() and (target / STATE).is_file():
            return target
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def run_folder(path: str | Path) -> Path:
    """The run folder of ``path``: a run folder itself, or one of its checkpoint folders."""
    path = Path(path)
    return path.parent.parent if (path / WEIGHTS).is_file() else path


def clean_partial(run_dir: str | Path) -> None:
    """Remove temporary folders left by a run killed while it wrote a checkpoint."""
    for p in (Path(run_dir) / CHECKPOINTS).glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, and prune old ones.

    ``weights``: a model's ``state_dict()``; ``state``: anything ``torch.save``
    stores under ``weights_only`` rules. ``keep_last < 1`` keeps every checkpoint.
    """
    folder = Path(run_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = folder / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)
    for f in (WEIGHTS, STATE):
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


def load_weights(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint's model weights (a state dict)."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise UserError(f"checkpoint {folder} has no {WEIGHTS}")
    return load_file(str(path), device=str(device))


def load_state(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's training state (see :func:`save_checkpoint`)."""
    path = Path(folder) / STATE
    if not path.is_file():
        raise UserError(f"checkpoint {folder} has no {STATE}")
    return torch.load(path, map_location="cpu", weights_only=True)
