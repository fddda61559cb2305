"""A run's logs: metrics.jsonl and TensorBoard scalars (rank 0), the progress shown on stderr, and the debug log of batch keys.

``RUN/metrics.jsonl`` holds one JSON object per logged step: "step",
"train/loss", "train/lr", "train/grad_norm", "tokens_per_s", "val/loss",
"val/best"; ``RUN/tb/`` the same scalars for TensorBoard. A resumed run drops
what a killed run logged after its last checkpoint (:func:`start_logs`), so
each step is logged once.

Layer: training (imports only the base layer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from musiclm import atomic

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
DEBUG_KEYS_ENV = "MUSICLM_DEBUG_KEYS"  # a folder: each rank appends the clip keys of every batch it trains on


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics logged after ``last_step`` (by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the kill
    atomic.write_text(path, "".join(line + "\n" for line in keep))


def start_logs(run_dir: Path, resumed_at: int | None) -> None:
    """Ready the run's logs: a fresh run (``resumed_at`` None) removes old ones, a run resumed at a
    step keeps those logged up to it."""
    if resumed_at is not None:
        truncate_metrics(run_dir / METRICS_FILE, resumed_at)
    else:
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)


def log_batch_keys(folder: str | Path, rank: int, step: int, keys: list[str]) -> None:
    """Append a batch's clip keys to ``FOLDER/keys-rankR.txt`` as ``step key`` lines (the :data:`DEBUG_KEYS_ENV` log)."""
    with open(Path(folder) / f"keys-rank{rank}.txt", "a") as f:
        f.write("".join(f"{step} {k}\n" for k in keys))


class Metrics:
    """metrics.jsonl (flushed per line) and TensorBoard scalars; written by rank 0 only."""

    def __init__(self, run_dir: Path, start_step: int):
        self.file = open(run_dir / METRICS_FILE, "a")  # noqa: SIM115 (open for the whole run, closed by close())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / TB_DIR), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard missing: metrics.jsonl still has everything
            self.tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A rich progress bar on a terminal; one plain line per log step otherwise. Rank 0 only."""

    def __init__(self, enabled: bool, total: int, start: int):
        from rich.console import Console

        self.enabled = enabled
        self.console = Console(stderr=True, soft_wrap=True)
        self.bar = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", tps="-")
            self.bar.start()

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def logged(self, step: int, total: int, values: dict[str, float]) -> None:
        if self.bar is not None:
            if "train/loss" in values:
                self.bar.update(self.task, loss=f"{values['train/loss']:.3f}", tps=f"{values['tokens_per_s']:.0f}")
            if "val/loss" in values:
                self.bar.console.print(f"step {step}: val/loss {values['val/loss']:.4f}", highlight=False)
        elif self.enabled:
            parts = [f"{k} {v:.4g}" for k, v in values.items()]
            self.print(f"step {step}/{total}  " + "  ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
