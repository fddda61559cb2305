"""``musiclm train STAGE``: the training loop of one stage, from cached tokens only.

:func:`run_train` checks the options against the run folder (run_folder.py)
and against the run it resumes or fine-tunes from (resume.py), sets up the
processes (distributed.py), and hands one :class:`Trainer` per rank the rest:
the optimiser and schedule (optim.py), the loop of named steps, evaluations
and saves (checkpoint.py), and the logs (logs.py).

Layer: training (imports the base layer, musiclm.shards, musiclm.models and the
other training modules).
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

from musiclm.config import Config, TrainConfig, check_config, config_from_dict, load_config
from musiclm.errors import UserError
from musiclm.models.layout import StageLayout, layout_for
from musiclm.models.transformer import MusicTransformer
from musiclm.shards.format import TokenInfo
from musiclm.shards.manifest import carry_manifest
from musiclm.training import checkpoint as ckpt
from musiclm.training import lora
from musiclm.training.corpus_split import DataSplit, split_data
from musiclm.training.data import TrainStream, count_labels, make_loader, val_batches
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
        cfg = _run_config(previous, init_from)
    stage_cfg = cfg.stages.get(stage)  # UserError for an unknown stage
    overrides = {"steps": steps, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr, "seed": seed, "eval_every": eval_every, "save_every": save_every, "num_workers": num_workers}
    cfg = dataclasses.replace(cfg, train=_train_settings(cfg.train, overrides, compile))
    data, out = Path(data), Path(out)

    info = TokenInfo.load(data)
    check_config(cfg, info.frame_rates)  # the stage windows against the frame rates of these tokens
    layout = layout_for(stage, info, stage_cfg)
    split = split_data(data, info, val_data, cfg.train.val_fraction)

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
        Trainer(stage, data, out, cfg, layout, info, split, val_data, point, d, start).run()
    finally:
        teardown_distributed(d)
    if d.world_size > 1:
        end_worker_process()
    return out


def _run_config(previous: dict[str, Any] | None, init_from: str | Path | None) -> Config:
    """The config of a run given none: the resumed run's own, else the ``init_from`` run's, else the small preset."""
    if previous is not None:
        return config_from_dict(previous["config"])
    if init_from is not None:
        return config_from_dict(read_run(ckpt.run_folder(ckpt.checkpoint_folder(init_from)))["config"])
    return load_config("small")


def _train_settings(tc: TrainConfig, overrides: dict[str, Any], compile: bool) -> TrainConfig:
    """``tc`` with the options given (``overrides``' values that are not None), checked (UserError)."""
    tc = dataclasses.replace(tc, **{k: v for k, v in overrides.items() if v is not None})
    if compile:
        tc = dataclasses.replace(tc, compile=True)
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "log_every"):
        if getattr(tc, name) < 1:
            raise UserError(f"train.{name} must be at least 1, got {getattr(tc, name)}")
    if tc.lr <= 0 or tc.num_workers < 0:
        raise UserError(f"train.lr must be > 0 and train.num_workers >= 0 (got {tc.lr}, {tc.num_workers})")
    return tc


class Trainer:
    """One rank's training of one stage: the model, its optimizer and the loop's counters.

    Built from a fresh start, a resume point (``point``: weights, optimizer, scheduler, RNG
    and loader state) or a base run (``start``); :meth:`run` trains up to ``cfg.train.steps``,
    one :meth:`step` at a time, with an :meth:`evaluate` every ``eval_every`` steps and a
    :meth:`save` every ``save_every``. Only rank 0 (``d.main``) writes the run folder.
    """

    def __init__(self, stage: str, data: Path, out: Path, cfg: Config, layout: StageLayout, info: TokenInfo, split: DataSplit, val_data, point: ResumePoint | None, d: Dist, start: Start):
        self.stage, self.data, self.out, self.cfg, self.layout, self.info = stage, data, out, cfg, layout, info
        self.split, self.val_data, self.point, self.d, self.start = split, val_data, point, d, start
        self.tc = tc = cfg.train
        torch.manual_seed(tc.seed + d.rank)
        random.seed(tc.seed + d.rank)
        np.random.seed(tc.seed + d.rank)

        self.model = self._build_model()
        self.optimizer, self.scheduler = make_optimizer(self.model, tc, d.device)
        self.step, self.batches_done, self.best_val = 0, 0, None
        # the losses logged at the next log step: their sum (on the device, from run()) and how many steps it covers
        self.window_loss, self.window_steps = 0.0, 0
        if point is not None:
            self._restore(point.state)

        self.step_module: nn.Module = LossModule(self.model)
        if d.world_size > 1:
            self.step_module = nn.parallel.DistributedDataParallel(self.step_module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        if tc.compile:
            self.step_module = torch.compile(self.step_module)

    def _build_model(self) -> MusicTransformer:
        """The stage's model on this rank's device, with the weights it starts from (resume point, base run, adapter)."""
        point, start = self.point, self.start
        model = MusicTransformer.for_layout(self.cfg.model, self.layout)
        latest = point.folder if point is not None else None
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
        return model.to(self.d.device)

    def _restore(self, state: dict[str, Any]) -> None:
        """Optimizer, scheduler, counters and this rank's RNG states from a checkpoint's state.pt."""
        d, tc = self.d, self.tc
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.batches_done, self.best_val = int(state["step"]), int(state["loader"]["batches"]), state.get("best_val")
        self.window_loss, self.window_steps = state.get("log_window", [0.0, 0])
        rngs = state["rng"]
        set_rng_state(rngs[d.rank] if d.rank < len(rngs) else rngs[0])
        stream_now = {"batch_size": tc.batch_size, "seed": tc.seed, "world_size": d.world_size, "num_workers": tc.num_workers}
        for k, now in stream_now.items():
            if state["loader"].get(k) != now and d.main:
                print(f"note: {k} changed from {state['loader'].get(k)} to {now}; the resumed run sees other batches than the original would have", file=sys.stderr)

    def run(self) -> None:
        """Train from the current step up to ``train.steps``: log, evaluate and save on their schedules."""
        d, tc = self.d, self.tc
        if d.main:
            self._prepare_run_folder()
        progress = Progress(d.main, tc.steps, self.step)
        self._announce(progress)
        if self.step >= tc.steps:
            progress.print(f"nothing to do: the run is already at step {self.step} of {tc.steps}")
            progress.close()
            return

        stream = TrainStream(self.split.train, self.layout, tc.batch_size, tc.seed, self.cfg.stages.get(self.stage).cond_dropout, d.rank, d.world_size, start_batch=self.batches_done)
        batches = iter(make_loader(stream, tc.num_workers, pin_memory=d.device.type == "cuda"))
        self.val = val_batches(self.split.val, self.layout, tc.batch_size, tc.eval_batches)
        metrics = Metrics(self.out, self.step) if d.main else None
        train_batches = self._counted(batches, os.environ.get(DEBUG_KEYS_ENV))
        self.model.train()
        self.window_start, self.steps_in_window = time.perf_counter(), 0
        # the window's loss sum stays on the device so that a step never waits for the GPU
        self.window_sum = torch.tensor(self.window_loss, dtype=torch.float64, device=d.device)
        try:
            while self.step < tc.steps:
                grad_norm, lr_now = self.train_step(train_batches)
                progress.advance(self.step)
                values = self._train_values(grad_norm, lr_now) if self._due(tc.log_every) else {}
                if self._due(tc.eval_every):
                    values.update(self._val_values())
                if values and d.main:
                    metrics.log(self.step, values)
                    progress.logged(self.step, tc.steps, values)
                if self._due(tc.save_every):
                    self.save()
        finally:
            progress.close()
            if metrics is not None:
                metrics.close()

    def _due(self, every: int) -> bool:
        """Whether the step just taken is one of every ``every`` (or the last)."""
        return self.step % every == 0 or self.step == self.tc.steps

    def _counted(self, batches: Iterator[dict[str, Any]], debug_keys: str | None) -> Iterator[dict[str, Any]]:
        """``batches``, counted in ``batches_done`` as each is taken (and its keys logged with ``debug_keys``)."""
        while True:
            b = next(batches)
            self.batches_done += 1
            if debug_keys:
                log_batch_keys(debug_keys, self.d.rank, self.step, b["keys"])
            yield b

    def train_step(self, batches: Iterator[dict[str, Any]]) -> tuple[torch.Tensor | None, float]:
        """One optimizer step over ``grad_accum`` micro-batches of ``batches``: returns the gradient norm
        before clipping (None without clipping) and the learning rate the step used."""
        tc = self.tc
        grad_norm = None
        for loss in accumulate_gradients(self.step_module, batches, tc.grad_accum, self.d.device, distributed=self.d.world_size > 1):
            self.window_sum += loss.double() / tc.grad_accum
        if tc.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        lr_now = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.steps_in_window += 1
        self.window_steps += 1
        return grad_norm, lr_now

    def _train_values(self, grad_norm: torch.Tensor | None, lr_now: float) -> dict[str, float]:
        """The logged training scalars of the window since the last log step (averaged over ranks); starts the next window."""
        tc, d = self.tc, self.d
        mean_loss, gnorm = all_mean([float(self.window_sum) / max(self.window_steps, 1), float(grad_norm) if grad_norm is not None else 0.0], d)
        if not math.isfinite(mean_loss):
            raise UserError(f"the training loss is not finite at step {self.step}; lower --lr (now {tc.lr})")
        elapsed = time.perf_counter() - self.window_start
        # tokens_per_s: input positions (B x N, prefix and pads included) of all ranks per wall second
        tokens = self.steps_in_window * tc.grad_accum * tc.batch_size * self.layout.seq_len * d.world_size
        values = {"train/loss": mean_loss, "train/lr": lr_now, "train/grad_norm": gnorm, "tokens_per_s": tokens / max(elapsed, 1e-9)}
        self.window_steps = 0
        self.window_sum.zero_()
        self.window_start, self.steps_in_window = time.perf_counter(), 0
        return values

    def _val_values(self) -> dict[str, float]:
        """``val/loss`` and ``val/best`` after an evaluation; nothing without validation data."""
        v = self.evaluate()
        if v is None:
            return {}
        self.best_val = v if self.best_val is None else min(self.best_val, v)
        return {"val/loss": v, "val/best": self.best_val}

    def evaluate(self) -> float | None:
        """The mean held-out loss per label over the validation batches of all ranks; None without any."""
        if not self.val:
            return None
        d, model = self.d, self.model
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad(), autocast(d.device):
            for b in self.val[d.rank :: d.world_size]:
                n = count_labels(b)
                loss = model.loss(b["tokens"].to(d.device), b["labels"].to(d.device), b["label_levels"].to(d.device))
                total += float(loss) * n
                count += n
        model.train()
        total, count = all_sum([total, float(count)], d)
        return total / max(count, 1.0)

    def save(self) -> None:
        """A checkpoint at the current step (rank 0 writes it; every rank gives its RNG states)."""
        tc = self.tc
        rngs = all_gather(rng_state(), self.d)
        if not self.d.main:
            return
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs,
            "loader": {"batches": self.batches_done, "batch_size": tc.batch_size, "seed": tc.seed, "world_size": self.d.world_size, "num_workers": tc.num_workers},
            "best_val": self.best_val,
            "log_window": [float(self.window_sum), self.window_steps],
        }
        if self.start.lora is not None:  # the adapter only: the base is named in run.json
            ckpt.save_checkpoint(self.out, self.step, lora.adapter_weights(self.model), state, tc.keep_last, file=ckpt.ADAPTER)
        else:
            ckpt.save_checkpoint(self.out, self.step, self.model.state_dict(), state, tc.keep_last)

    def _announce(self, progress: Progress) -> None:
        """What this run trains, from what, and on what (rank 0 prints it)."""
        model, start, point = self.model, self.start, self.point
        progress.print(f"{self.layout.describe()}; {model.num_parameters():,} parameters on {self.d.device} x {self.d.world_size}")
        if start.base is not None:
            progress.print(f"fine-tuning {start.base.folder} (its step {start.base.step})")
        if start.lora is not None:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            progress.print(f"LoRA rank {start.lora.rank}, alpha {start.lora.alpha:g} on {', '.join(start.lora.targets)}: {trainable:,} trainable parameters, the base frozen")
        progress.print(f"training: {sum(e.used for e in self.split.train)} clips in {len(self.split.train)} shards; {self.split.how}")
        if point is not None:
            for folder, problem in point.passed:
                progress.print(f"checkpoint {folder.name} is damaged ({problem}); resuming from {point.folder.name} (the damaged one is moved to {ckpt.CHECKPOINTS}/{ckpt.DAMAGED_PREFIX}{folder.name})")
            progress.print(f"resuming from {point.folder} (step {self.step})")

    def _prepare_run_folder(self) -> None:
        """Write run.json, the tokenizer copy and the manifest into the run folder, and ready its logs (rank 0)."""
        out, point, step = self.out, self.point, self.step
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
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        run = self._run_record(created=(old or {}).get("created", now) if resumed else now, records_from=records_from)
        if resumed:
            run["resumed_at_step"] = step
        write_run(out, run)
        copy_tokenizer(self.data / TOKENIZER_DIR, out / TOKENIZER_DIR, self.info)
        carry_manifest(self.data, out)  # the corpus these weights learned from travels with them
        start_logs(out, step if resumed else None)

    def _run_record(self, created: str, records_from: int) -> dict[str, Any]:
        """The contents of run.json (see run_folder.py)."""
        layout, model, start = self.layout, self.model, self.start
        return {
            "format": 1,
            "stage": self.stage,
            "config": self.cfg.to_dict(),
            "tokenizer": self.info.raw,
            "fingerprint": self.info.fingerprint,
            "data": str(self.data.resolve()),
            "val_data": str(Path(self.val_data).resolve()) if self.val_data is not None else None,
            "validation": self.split.how,
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
            "world_size": self.d.world_size,
            "created": created,
            ckpt.RECORDS_FROM: records_from,
        }
