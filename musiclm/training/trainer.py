"""``musiclm train STAGE``: the training loop of one stage, from cached tokens only.

The run folder it writes (run.json, the tokenizer copy, checkpoints, logs) is described in
run_folder.py, which also reads a trained stage back (:func:`~musiclm.training.run_folder.load_stage`).

Fine-tuning (``init_from``, LoRA) and exact resume: see resume.py; merge.py writes an adapter run
out as a full stage run.

Optimisation (AdamW groups, the schedule, bf16 autocast on CUDA): see optim.py.

Several processes: see distributed.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from musiclm.config import Config, config_from_dict, load_config
from musiclm.errors import UserError
from musiclm.models.layout import StageLayout, layout_for
from musiclm.models.transformer import MusicTransformer
from musiclm.shards.format import TokenInfo
from musiclm.shards.manifest import carry_manifest
from musiclm.training import checkpoint as ckpt
from musiclm.training import lora
from musiclm.training.data import DataSplit, TrainStream, count_labels, make_loader, split_data, val_batches
from musiclm.training.distributed import Dist, all_gather, all_mean, all_sum, end_worker_process, env_rank, setup_distributed, teardown_distributed
from musiclm.training.logs import DEBUG_KEYS_ENV, Metrics, Progress, log_batch_keys, start_logs
from musiclm.training.optim import LossModule, accumulate_gradients, autocast, make_optimizer
from musiclm.training.resume import (
    ResumePoint,
    Start,
    check_resumable,
    check_without_run_file,
    read_previous,
    resolve_start,
    resume_point,
    rng_state,
    set_aside_passed,
    set_rng_state,
)
from musiclm.training.run_folder import RUN_FILE, TOKENIZER_DIR, copy_tokenizer, load_stage, read_run, read_run_lenient, write_run



# ---- the run ------------------------------------------------------------------------------------------------------------


def run_train(
    stage: str,
    data: str | Path,
    out: str | Path,
    cfg: Config | None,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    val_data: str | Path | None = None,
    eval_every: int | None = None,
    save_every: int | None = None,
    num_workers: int | None = None,
    resume: bool = False,
    compile: bool = False,
    device: str | None = None,
    init_from: str | Path | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
) -> Path:
    """Train ``stage`` on the tokenized folder ``data`` into the run folder ``out``; returns ``out``.

    Keyword arguments left ``None`` come from ``cfg.train``. With ``resume`` the
    run continues from its latest checkpoint (or starts, when it has none);
    without it, a run folder that already has checkpoints is refused. ``cfg``
    None means the run's own config when resuming, else the config of the
    ``init_from`` run, else the ``small`` preset.

    ``init_from`` (a run or checkpoint folder of the same stage, model and tokenizer) starts
    from its weights with a fresh optimizer at step 0; with ``lora_rank`` only a LoRA adapter
    of that rank trains (``lora_alpha`` default: the rank), and the base stays frozen. A
    resumed run keeps the base and adapter it started with (passing them again is allowed).
    Under torchrun (``WORLD_SIZE > 1``) a finished run ends the process instead of returning.
    """
    run_file = Path(out) / RUN_FILE
    previous, run_problem = read_previous(Path(out), resume)  # run.json of the run resumed; what is wrong with it
    if run_problem is not None and cfg is None:  # written again from the config given, if one is
        raise UserError(f"{run_file} {run_problem}: pass the run's --preset/--config to resume it (run.json is written again), or restore run.json from a copy")
    if cfg is None:
        if previous is not None:
            cfg = config_from_dict(previous["config"])
        elif init_from is not None:
            cfg = config_from_dict(read_run(ckpt.run_folder(ckpt.checkpoint_folder(init_from)))["config"])
        else:
            cfg = load_config("small")
    stage_cfg = cfg.stages.get(stage)  # UserError for an unknown stage
    overrides = {"steps": steps, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr, "seed": seed, "eval_every": eval_every, "save_every": save_every, "num_workers": num_workers}
    tc = dataclasses.replace(cfg.train, **{k: v for k, v in overrides.items() if v is not None})
    if compile:
        tc = dataclasses.replace(tc, compile=True)
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "log_every"):
        if getattr(tc, name) < 1:
            raise UserError(f"train.{name} must be at least 1, got {getattr(tc, name)}")
    if tc.lr <= 0 or tc.num_workers < 0:
        raise UserError(f"train.lr must be > 0 and train.num_workers >= 0 (got {tc.lr}, {tc.num_workers})")
    cfg = dataclasses.replace(cfg, train=tc)
    data, out = Path(data), Path(out)

    info = TokenInfo.load(data)
    layout = layout_for(stage, info, stage_cfg)
    split = split_data(data, info, val_data, tc.val_fraction)

    latest = ckpt.latest_checkpoint(out)
    if latest is not None and not resume:
        raise UserError(f"{out} already holds checkpoints (latest: {latest.name}); pass --resume to continue that run, or choose another --out")
    if previous is not None:
        check_resumable(previous, stage, cfg, info, out)
        if latest is not None and previous.get("merged_from"):
            raise UserError(f"{out} was written by musiclm merge and holds no optimizer state to resume; fine-tune it with --init-from {out} and another --out")
    point = resume_point(out, previous) if resume and latest is not None else None
    if run_problem is not None and point is not None:
        check_without_run_file(out, info, point, f"{run_file} {run_problem}")
        if env_rank() == 0:
            print(f"note: {run_file} {run_problem}; resuming with the config given, and writing it again", file=sys.stderr)
    start = resolve_start(stage, cfg, info, out, init_from, lora_rank, lora_alpha, previous, point.folder if point is not None else None)

    d = setup_distributed(device)
    try:
        _train(stage, data, out, cfg, layout, info, split, val_data, point, d, start)
    finally:
        teardown_distributed(d)
    if d.world_size > 1:
        end_worker_process()
    return out


def _train(stage: str, data: Path, out: Path, cfg: Config, layout: StageLayout, info: TokenInfo, split: DataSplit, val_data, point: ResumePoint | None, d: Dist, start: Start) -> Path:
    tc = cfg.train
    stage_cfg = cfg.stages.get(stage)
    torch.manual_seed(tc.seed + d.rank)
    random.seed(tc.seed + d.rank)
    np.random.seed(tc.seed + d.rank)

    model = MusicTransformer.for_layout(cfg.model, layout)
    latest = point.folder if point is not None else None
    state = point.state if point is not None else None
    if start.lora is not None:
        model.load_state_dict(ckpt.load_weights(start.base.folder))
        lora.add_adapters(model, start.lora)
        if point is not None:
            lora.load_adapter_weights(model, point.weights, str(latest))
    elif point is not None:
        try:
            model.load_state_dict(point.weights)
        except RuntimeError as e:  # reached only when run.json was damaged: the config was not checked against the run's
            raise UserError(f"{latest} does not fit the model of this config ({str(e).strip().splitlines()[0]}): pass the run's --preset/--config") from None
    elif start.base is not None:
        model.load_state_dict(load_stage(start.base.folder, device="cpu")[0].state_dict())
    if point is not None:
        point.weights.clear()  # copied into the model: not kept for the whole run
    model.to(d.device)
    optimizer, scheduler = make_optimizer(model, tc, d.device)

    # the losses logged at the next log step: their sum (on the device) and how many steps it covers
    step, batches_done, best_val, window_loss, window_steps = 0, 0, None, 0.0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, batches_done, best_val = int(state["step"]), int(state["loader"]["batches"]), state.get("best_val")
        window_loss, window_steps = state.get("log_window", [0.0, 0])
        rngs = state["rng"]
        set_rng_state(rngs[d.rank] if d.rank < len(rngs) else rngs[0])
        stream_now = {"batch_size": tc.batch_size, "seed": tc.seed, "world_size": d.world_size, "num_workers": tc.num_workers}
        for k, now in stream_now.items():
            if state["loader"].get(k) != now and d.main:
                print(f"note: {k} changed from {state['loader'].get(k)} to {now}; the resumed run sees other batches than the original would have", file=sys.stderr)

    step_module: nn.Module = LossModule(model)
    if d.world_size > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if tc.compile:
        step_module = torch.compile(step_module)

    if d.main:
        _prepare_run_folder(out, stage, data, val_data, cfg, layout, info, split, model, d, step, point=point, start=start)
    progress = Progress(d.main, tc.steps, step)
    progress.print(f"{layout.describe()}; {model.num_parameters():,} parameters on {d.device} x {d.world_size}")
    if start.base is not None:
        progress.print(f"fine-tuning {start.base.folder} (its step {start.base.step})")
    if start.lora is not None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        progress.print(f"LoRA rank {start.lora.rank}, alpha {start.lora.alpha:g} on {', '.join(start.lora.targets)}: {trainable:,} trainable parameters, the base frozen")
    progress.print(f"training: {sum(e.used for e in split.train)} clips in {len(split.train)} shards; {split.how}")
    if point is not None:
        for folder, problem in point.passed:
            progress.print(f"checkpoint {folder.name} is damaged ({problem}); resuming from {latest.name} (the damaged one is moved to {ckpt.CHECKPOINTS}/{ckpt.DAMAGED_PREFIX}{folder.name})")
        progress.print(f"resuming from {latest} (step {step})")
    if step >= tc.steps:
        progress.print(f"nothing to do: the run is already at step {step} of {tc.steps}")
        progress.close()
        return out

    stream = TrainStream(split.train, layout, tc.batch_size, tc.seed, stage_cfg.cond_dropout, d.rank, d.world_size, start_batch=batches_done)
    batches = iter(make_loader(stream, tc.num_workers, pin_memory=d.device.type == "cuda"))
    val = val_batches(split.val, layout, tc.batch_size, tc.eval_batches)
    my_val = val[d.rank :: d.world_size]
    metrics = Metrics(out, step) if d.main else None
    debug_keys = os.environ.get(DEBUG_KEYS_ENV)

    def evaluate() -> float | None:
        if not val:
            return None
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad(), autocast(d.device):
            for b in my_val:
                n = count_labels(b)
                loss = model.loss(b["tokens"].to(d.device), b["labels"].to(d.device), b["label_levels"].to(d.device))
                total += float(loss) * n
                count += n
        model.train()
        total, count = all_sum([total, float(count)], d)
        return total / max(count, 1.0)

    def save() -> None:
        rngs = all_gather(rng_state(), d)
        if d.main:
            state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rngs,
                "loader": {"batches": batches_done, "batch_size": tc.batch_size, "seed": tc.seed, "world_size": d.world_size, "num_workers": tc.num_workers},
                "best_val": best_val,
                "log_window": [float(window_sum), window_steps],
            }
            if start.lora is not None:  # the adapter only: the base is named in run.json
                ckpt.save_checkpoint(out, step, lora.adapter_weights(model), state, tc.keep_last, file=ckpt.ADAPTER)
            else:
                ckpt.save_checkpoint(out, step, model.state_dict(), state, tc.keep_last)

    def micro_batches() -> Iterator[dict[str, Any]]:
        nonlocal batches_done
        while True:
            b = next(batches)
            batches_done += 1
            if debug_keys:
                log_batch_keys(debug_keys, d.rank, step, b["keys"])
            yield b

    train_batches = micro_batches()  # counts batches_done and logs debug keys as each batch is taken
    tokens_per_batch = tc.batch_size * layout.seq_len
    model.train()
    t_window, steps_in_window = time.perf_counter(), 0
    # the window's loss sum stays on the device so that a step never waits for the GPU
    window_sum = torch.tensor(window_loss, dtype=torch.float64, device=d.device)
    try:
        while step < tc.steps:
            grad_norm = None
            for loss in accumulate_gradients(step_module, train_batches, tc.grad_accum, d.device, distributed=d.world_size > 1):
                window_sum += loss.double() / tc.grad_accum
            if tc.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_in_window += 1
            window_steps += 1
            progress.advance(step)

            values: dict[str, float] = {}
            if step % tc.log_every == 0 or step == tc.steps:
                mean_loss, gnorm = all_mean([float(window_sum) / max(window_steps, 1), float(grad_norm) if grad_norm is not None else 0.0], d)
                if not math.isfinite(mean_loss):
                    raise UserError(f"the training loss is not finite at step {step}; lower --lr (now {tc.lr})")
                elapsed = time.perf_counter() - t_window
                # tokens_per_s: input positions (B x N, prefix and pads included) of all ranks per wall second
                values.update({"train/loss": mean_loss, "train/lr": lr_now, "train/grad_norm": gnorm, "tokens_per_s": steps_in_window * tc.grad_accum * tokens_per_batch * d.world_size / max(elapsed, 1e-9)})
                window_steps = 0
                window_sum.zero_()
                t_window, steps_in_window = time.perf_counter(), 0
            if step % tc.eval_every == 0 or step == tc.steps:
                v = evaluate()
                if v is not None:
                    values["val/loss"] = v
                    best_val = v if best_val is None else min(best_val, v)
                    values["val/best"] = best_val
            if values and d.main:
                metrics.log(step, values)
                progress.logged(step, tc.steps, values)
            if step % tc.save_every == 0 or step == tc.steps:
                save()
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    return out


def _prepare_run_folder(
    out: Path, stage: str, data: Path, val_data, cfg: Config, layout: StageLayout, info: TokenInfo, split: DataSplit, model: MusicTransformer, d: Dist, step: int, point: ResumePoint | None, start: Start
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ckpt.clean_partial(out)
    resumed = point is not None
    old = read_run_lenient(out)
    if resumed:
        set_aside_passed(out, point)
        # checkpoints from here on carry a record file; older ones of a run begun before record files do not
        records_from = ckpt.records_from(old, out)
        records_from = int(records_from) if math.isfinite(records_from) else step + 1
    else:
        records_from = 0
    old = old or {}
    run = {
        "format": 1,
        "stage": stage,
        "config": cfg.to_dict(),
        "tokenizer": info.raw,
        "fingerprint": info.fingerprint,
        "data": str(data.resolve()),
        "val_data": str(Path(val_data).resolve()) if val_data is not None else None,
        "validation": split.how,
        "layout": {
            "description": layout.describe(),
            "seq_len": layout.seq_len,
            "prefix_len": layout.prefix_len,
            "vocab_size": layout.vocab_size,
            "target_levels": layout.target_levels,
            "target_codebook": layout.target_codebook,
            "null_id": layout.null_id,
            "pad_id": layout.pad_id,
        },
        "parameters": model.num_parameters(),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "init_from": start.base.to_json() if start.base is not None else None,
        "lora": start.lora.to_json() if start.lora is not None else None,
        "world_size": d.world_size,
        "created": old.get("created", time.strftime("%Y-%m-%dT%H:%M:%S")) if resumed else time.strftime("%Y-%m-%dT%H:%M:%S"),
        ckpt.RECORDS_FROM: records_from,
    }
    if resumed:
        run["resumed_at_step"] = step
    write_run(out, run)
    copy_tokenizer(data / TOKENIZER_DIR, out / TOKENIZER_DIR, info)
    carry_manifest(data, out)  # the corpus these weights learned from travels with them
    start_logs(out, step if resumed else None)
