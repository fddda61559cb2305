"""Where a run starts: resuming its own newest sound checkpoint, or fine-tuning from another run's, and the checks that refuse a mismatch.

Exact resume: a checkpoint stores the optimizer, scheduler and RNG states
(:func:`rng_state`) and how many batches each rank consumed; the loader
restarts at that batch (see data.py), so a resumed run computes the same steps
as an uninterrupted one. A resumed run continues from the newest *sound*
checkpoint (every file hashed against its record, see checkpoint.py); newer
damaged ones are named on stderr and moved aside
(``checkpoints/damaged-step-…``), and their steps are trained again. With none
sound left it refuses in one line. A damaged run.json is written again when
the run's config is given (``--preset``/``--config``).

Fine-tuning (``init_from``): the run starts from another run's weights (same
stage, model and stage config, same tokenizer) with a fresh optimizer at step
0; run.json names that checkpoint by path and sha256 (``init_from``). With a
LoRA rank (lora.py) the base stays frozen and only the adapter trains;
checkpoints then hold ``adapter.safetensors`` (the adapter's tensors) and the
optimizer state of those tensors.

Layer: training (imports the base layer, musiclm.shards, and training.checkpoint,
training.lora, training.run_folder).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musiclm import atomic
from musiclm.config import Config, recorded_model, to_dict
from musiclm.errors import UserError
from musiclm.integrity import DamagedFile
from musiclm.shards.format import TOKENIZER_FILE, TokenInfo
from musiclm.training import checkpoint as ckpt
from musiclm.training import lora
from musiclm.training.run_folder import RUN_FILE, TOKENIZER_DIR, read_run


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run's weights come from besides its own checkpoints: the checkpoint it was
    initialised from (None: random weights) and the adapter it trains (None: every weight)."""

    base: ckpt.CheckpointRef | None = None
    lora: lora.LoraSpec | None = None


def read_previous(out: Path, resume: bool) -> tuple[dict[str, Any] | None, str | None]:
    """The run.json of the run ``--resume`` continues, and what is wrong with it: ``(run, None)``,
    ``(None, "is damaged (…)")``, ``(None, "is missing")`` (a run with checkpoints but no run.json),
    or ``(None, None)`` when nothing is resumed (no ``resume``, or a fresh ``out``)."""
    run_file = out / RUN_FILE
    if resume and run_file.is_file():
        try:
            return read_run(out), None
        except DamagedFile as e:
            return None, f"is damaged ({e.problem})"
    if resume and ckpt.latest_checkpoint(out) is not None:
        return None, "is missing"
    return None, None


def set_aside_passed(out: Path, point: ResumePoint) -> None:
    """Move the damaged checkpoints ``point`` passed over out of the run (see checkpoint.move_aside)
    and point ``latest`` at the checkpoint the run continues from."""
    for folder, _ in point.passed:
        ckpt.move_aside(folder)
    atomic.write_text(out / ckpt.CHECKPOINTS / ckpt.LATEST, point.folder.name + "\n")


@dataclasses.dataclass
class ResumePoint:
    """The checkpoint a resumed run continues from, loaded, and the newer ones passed over as ``(folder, "file: problem")``."""

    folder: Path
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    passed: list[tuple[Path, str]]


def resume_point(out: Path, run: dict[str, Any] | None) -> ResumePoint:
    """The newest sound checkpoint of the run folder ``out``, loaded (``run``: its parsed run.json, None when damaged).

    Every file of each candidate is hashed against its record, newest first: resuming reads all of them
    right after, and a flipped byte in state.pt loads without complaint. UserError when none is sound.
    """

    def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        weights = ckpt.weights_file(folder)
        return ckpt.load_weights(folder, file=weights.name), ckpt.load_state(folder)

    folder, loaded, passed = ckpt.sound_checkpoint(out, ckpt.records_from(run, out), load=load)
    if folder is None:
        found = "; ".join(f"{f.name}: {problem}" for f, problem in passed)
        raise UserError(
            f"no sound checkpoint left in {out} ({found}): restore one from a copy, "
            f"or train from step 0 again (into another --out, or after removing {out / ckpt.CHECKPOINTS})"
        )
    return ResumePoint(folder, loaded[0], loaded[1], passed)


def check_without_run_file(out: Path, info: TokenInfo, point: ResumePoint, problem: str) -> None:
    """Resuming with a damaged run.json (the config given instead): what run.json would have checked
    that can still be, from the run's tokenizer copy and its checkpoint. UserError where it cannot."""
    try:
        fingerprint = json.loads((out / TOKENIZER_DIR / TOKENIZER_FILE).read_bytes()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        fingerprint = None
    if fingerprint is not None and fingerprint != info.fingerprint:
        raise UserError(f"{out} was trained on tokens of another tokenizer (fingerprint {fingerprint}, data has {info.fingerprint}); resume it on its own data")
    if ckpt.weights_file(point.folder).name == ckpt.ADAPTER:
        raise UserError(f"{problem}, and this run trains a LoRA adapter, whose base only run.json names: restore run.json from a copy")


def resolve_start(
    stage: str,
    cfg: Config,
    info: TokenInfo,
    out: Path,
    init_from: str | Path | None,
    lora_rank: int | None,
    lora_alpha: float | None,
    previous: dict[str, Any] | None,
    latest: Path | None,
) -> Start:
    """Check ``--init-from``/``--lora-*`` against the base run and against the run being resumed
    (``previous``: its run.json; ``latest``: its checkpoint, if any). UserError on any mismatch."""
    if lora_alpha is not None and lora_rank is None and not (previous or {}).get("lora"):
        raise UserError("--lora-alpha needs --lora-rank")
    spec = None if lora_rank is None else lora.LoraSpec.make(lora_rank, lora_alpha, cfg.model.d_model)
    if previous is not None:  # a resumed run keeps its own start; options given again must agree
        old_spec = lora.LoraSpec.from_json(previous["lora"]) if previous.get("lora") else None
        if spec is None and lora_alpha is not None and old_spec is not None:
            spec = lora.LoraSpec.make(old_spec.rank, lora_alpha, cfg.model.d_model)
        if spec is not None and spec != old_spec:
            had = f"an adapter of rank {old_spec.rank}, alpha {old_spec.alpha:g}" if old_spec else "every weight (no --lora-rank)"
            raise UserError(f"{out} trains {had}; resume it with the options it started with, or choose another --out")
        old_base = ckpt.CheckpointRef.from_json(previous["init_from"]) if previous.get("init_from") else None
        if init_from is not None:
            given = ckpt.checkpoint_folder(init_from).resolve()
            if old_base is None or given != Path(old_base.folder):
                raise UserError(f"{out} was started from {old_base.folder if old_base else 'random weights'}, not {given}; resume it without --init-from, or choose another --out")
        start = Start(old_base, old_spec)
        if start.base is not None and (start.lora is not None or latest is None):
            start.base.verify(f"the run {out}")  # the base's weights are still needed
        return start
    if init_from is None:
        if spec is not None:
            raise UserError("--lora-rank trains an adapter on a trained stage: pass --init-from RUN (a run of musiclm train of the same stage)")
        return Start()
    folder = ckpt.checkpoint_folder(init_from)
    base_run = ckpt.run_folder(folder)
    base = read_run(base_run)
    check_base(base, stage, cfg, info, Path(init_from))
    ckpt.require_sound(folder, base, named=folder == Path(init_from))  # before its sha256 names it in run.json
    if spec is not None and ckpt.weights_file(folder).name == ckpt.ADAPTER:
        raise UserError(f"--init-from {init_from} is an adapter run; merge it first (musiclm merge {base_run} --out DIR) and train the adapter on DIR")
    return Start(ckpt.CheckpointRef.of(folder), spec)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _first_difference(old: Any, new: Any, where: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                return _first_difference(old.get(k), new.get(k), f"{where}.{k}" if where else k)
    return f"{where}: {old!r} in the run, {new!r} now"


def check_resumable(run: dict[str, Any], stage: str, cfg: Config, info: TokenInfo, out: Path) -> None:
    """Refuse to continue a run of another stage, model, stage config or tokenizer (UserError)."""
    _check_same_stage(run, stage, cfg, info, str(out), "choose another --out")


def check_base(run: dict[str, Any], stage: str, cfg: Config, info: TokenInfo, base: Path) -> None:
    """Refuse to fine-tune from a run of another stage, model, stage config or tokenizer (UserError)."""
    _check_same_stage(run, stage, cfg, info, f"--init-from {base}", "choose another --init-from")


def _check_same_stage(run: dict[str, Any], stage: str, cfg: Config, info: TokenInfo, what_run: str, other: str) -> None:
    if run.get("stage") != stage:
        raise UserError(f"{what_run} is a run of stage '{run.get('stage')}', not '{stage}'; {other}")
    if run.get("fingerprint") != info.fingerprint:
        raise UserError(
            f"{what_run} was trained on tokens of another tokenizer (fingerprint {run.get('fingerprint')}, data has {info.fingerprint}); "
            f"tokenize the data with that run's tokenizer (musiclm tokenize --tokenizer) or {other}"
        )
    old_cfg = run.get("config", {})
    for what, new in (("model", to_dict(cfg.model)), (f"stages.{stage}", to_dict(cfg.stages.get(stage)))):
        old = recorded_model(old_cfg.get("model") or {}) if what == "model" else old_cfg.get("stages", {}).get(stage)
        if old != _jsonable(new):
            diff = _first_difference(old, _jsonable(new), what)
            raise UserError(f"{what_run} was trained with another config ({diff}); pass the run's --preset/--config or {other}")


def rng_state() -> dict[str, Any]:
    """The Python, numpy, torch (and CUDA) RNG states of this process, as plain data for state.pt."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states :func:`rng_state` took."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
