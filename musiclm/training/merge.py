"""``musiclm merge``: an adapter (LoRA) run folded into its base and written out as a full stage run.

Layer: training (imports the base layer, musiclm.shards, and training.checkpoint,
training.lora, training.run_folder).
"""

from __future__ import annotations

import time
from pathlib import Path

from musiclm.errors import UserError
from musiclm.shards.manifest import carry_manifest
from musiclm.training import checkpoint as ckpt
from musiclm.training import lora
from musiclm.training.run_folder import TOKENIZER_DIR, copy_tokenizer, load_stage, read_run, write_run


def merge_run(adapter_run: str | Path, out: str | Path) -> Path:
    """Write the adapter run ``adapter_run`` (or one of its checkpoints) merged into its base as a full
    stage run folder ``out``; returns ``out``.

    ``out`` loads with :func:`load_stage`, fine-tunes with ``init_from`` and no longer needs the
    base. It holds one checkpoint at the adapter's step, without optimizer state (so it cannot be
    resumed), a copy of the tokenizer, and a run.json that says what was merged (``merged_from``).
    """
    folder = ckpt.checkpoint_folder(adapter_run)
    run_path = ckpt.run_folder(folder)
    run = read_run(run_path)
    out = Path(out)
    if not run.get("lora"):
        raise UserError(f"{run_path} is not an adapter run (it was trained without --lora-rank): it is a full stage run already")
    if out.resolve() == run_path.resolve() or ckpt.latest_checkpoint(out) is not None:
        raise UserError(f"{out} already holds checkpoints; choose another --out")
    model, _, _, info = load_stage(folder, device="cpu")
    step = ckpt.checkpoint_step(folder)
    merged = {k: v for k, v in run.items() if k not in ("lora", "resumed_at_step", "trainable_parameters")}
    merged[ckpt.RECORDS_FROM] = 0
    merged["merged_from"] = {"run": str(run_path.resolve()), "checkpoint": folder.name, "step": step, "lora": run["lora"]}
    merged["parameters"] = model.num_parameters()
    merged["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    out.mkdir(parents=True, exist_ok=True)
    ckpt.clean_partial(out)
    copy_tokenizer(run_path / TOKENIZER_DIR, out / TOKENIZER_DIR, info)
    carry_manifest(run_path, out)
    write_run(out, merged)
    ckpt.save_checkpoint(out, step, model.state_dict(), {"step": step, "merged_from": str(folder.resolve())}, keep_last=0)
    spec = lora.LoraSpec.from_json(run["lora"])
    print(f"merged the rank-{spec.rank} adapter of {folder} into its base {run['init_from']['folder']}: wrote {out}")
    return out
