"""Loading a model's stages: the stages read from their run folders and checked to belong together.

Where the stage folders and their tokenizer are (a model folder, ``musiclm generate``'s options, the
tokenizer found by fingerprint) is :mod:`musiclm.hub.model_folder`'s to say; this module loads what it finds.

Layer: generation (imports the training layer's run folders and the hub's model folder).
"""

from __future__ import annotations

from pathlib import Path

import torch

from musiclm.errors import UserError
from musiclm.generation.stages import Stage


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

