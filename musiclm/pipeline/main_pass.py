"""The main pass of the tokenize job: every pending file, in planned batches, through the actors into shards.

Layer: pipeline (imports the base layer, shards and the lower pipeline modules).

::

    plan.parquet (:mod:`musiclm.pipeline.batch_plan`) → pending files into their planned batches
      → decode tasks → TokenizeActor pool → in plan order (:mod:`musiclm.pipeline.batch_runner`)
      → ShardWriter (a shard closes at the end of the batch that fills it)

Batches reach the writer in plan order, so which clips a shard holds is a function of the plan:
the same for any number of actors, any timing, and for a killed run resumed (a shard still filling
when the run stops is not written: the rerun fills it again from the same batches). A batch that
held only clips of a damaged shard is written back into that shard's index
(:func:`~musiclm.pipeline.repair.repair_routes`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from musiclm.config import tokenize_config_from_dict
from musiclm.errors import UserError
from musiclm.pipeline.actors import TokenizeActor, output_rows, unpack_sample
from musiclm.pipeline.batch_plan import plan_corpus
from musiclm.pipeline.batch_runner import ActorLost, InPlanOrder, Stalled
from musiclm.pipeline.decode_stage import in_plan_order
from musiclm.pipeline.progress import TokenizeProgress, TokenizeSummary, kept_shards, stalled_error
from musiclm.pipeline.ray_runtime import Resources
from musiclm.pipeline.repair import Repair, repair_routes
from musiclm.shards.format import file_key
from musiclm.shards.read import partial_keys
from musiclm.shards.writer import ShardWriter, next_shard_index


def tokenize_pending(ray, console, files: list[str], pending: list[str], corpus: Path, out: Path, opts: dict[str, Any], res: Resources,
                     summary: TokenizeSummary) -> None:
    """Every segment of ``pending`` not yet done → shards of ``out``; counts go into ``summary``. ``files``: the
    whole corpus (planned, so that plan.parquet covers it). ``opts``: shard_size, batch_seconds and stall_seconds
    (None: the tokenizer's config), settled (files done before), manifest (written once the plan is known),
    repair (:class:`~musiclm.pipeline.repair.Repair`)."""
    from musiclm.shards.tokenizer_folder import read_record
    from musiclm.shards.format import TokenInfo

    tcfg = tokenize_config_from_dict(read_record(out / "tokenizer")["config"])
    info = TokenInfo.load(out / "tokenizer")
    shard_size = opts.get("shard_size") or tcfg.shard_size
    if opts.get("batch_seconds"):
        tcfg = dataclasses.replace(tcfg, batch_seconds=opts["batch_seconds"])
    repair: Repair = opts.get("repair") or Repair()
    plan = plan_corpus(ray, files, corpus, out, tcfg, repair.pinned)
    if opts.get("manifest"):
        opts["manifest"]()
    rates = tuple(sorted({int(s["sample_rate"]) for s in info.raw["streams"].values()}))
    writer = ShardWriter(out, info, 1 << 62, next_shard_index(out))  # closed here, between batches
    batches = _pending_batches(pending, plan, repair, writer, summary)
    if not batches:
        writer.close()
        summary.shards = writer.shards_written
        return
    routes = repair_routes(out, batches, plan, repair.redo)  # batch -> the damaged shard it goes back into
    rewriters = {name: ShardWriter(out, info, 1 << 62, int(name.split("-")[1])) for name in set(routes.values())}
    done = frozenset(partial_keys(out, opts["settled"], repair.records))  # keys of partly finished files only
    t_run = time.time()
    kwargs = dict(tokenizer_dir=str(out / "tokenizer"), threads=res.threads)
    runner = in_plan_order(ray, TokenizeActor, kwargs, res, batches, corpus, tcfg, rates, done, opts.get("stall_seconds") or tcfg.stall_seconds)
    total = sum(seconds for members in batches.values() for _, seconds in members)
    _write_in_plan_order(console, out, runner, writer, routes, rewriters, shard_size, TokenizeProgress(console, total, res.workers), t_run, summary)


def _pending_batches(pending: list[str], plan: dict[str, tuple[float, str, int]], repair: Repair, writer: ShardWriter,
                     summary: TokenizeSummary) -> dict[int, list[tuple[str, float]]]:
    """{planned batch: [(rel, seconds)]} of the pending files; a file the plan could not tokenize goes to
    errors/ now. A file of a damaged shard keeps the batch that shard ran it in."""
    batches: dict[int, list[tuple[str, float]]] = {}
    recorded = {src: b for r in repair.redo.values() for src, b, _ in r.get("clips", []) if b >= 0}  # as the damaged shard ran them
    for rel in pending:
        seconds, error, number = plan[rel]
        number = recorded.get(rel, number)
        if error:
            writer.add_error(file_key(rel), rel, "decode", error)
            summary.failed += 1
        else:
            batches.setdefault(number, []).append((rel, seconds))
    return batches


def _write_in_plan_order(console, out: Path, runner: InPlanOrder, writer: ShardWriter, routes: dict[int, str], rewriters: dict[str, ShardWriter],
                         shard_size: int, bar: TokenizeProgress, t_run: float, summary: TokenizeSummary) -> None:
    """The runner's batches into ``writer`` (or, for a batch in ``routes``, into the rewriter of its damaged
    shard, written whole once all its batches are back); a shard closes between batches. A stall or a lost
    actor ends the run in one line; the shard still filling is then dropped."""
    waiting = {name: {b for b, n in routes.items() if n == name} for name in rewriters}  # batches still to come
    finished = False
    try:
        with bar:
            for item, output in runner:
                number = item["batch"]
                target = rewriters[routes[number]] if number in routes else writer
                for row in output_rows(output):
                    _take(console, row, number, writer, target, summary)
                    bar.update(row["seconds"], summary, time.time() - t_run, row["gpu"])
                if number in routes:
                    name = routes[number]
                    waiting[name].discard(number)
                    if not waiting[name]:  # every batch of the damaged shard is back: write it whole
                        rewriters[name].flush()
                if len(writer.samples) >= shard_size:
                    writer.flush()
        finished = True
    except Stalled as e:
        raise stalled_error(console, out, e, runner.stall_seconds) from None
    except ActorLost as e:
        raise UserError(f"tokenize stopped: {e}; {kept_shards(out)} kept: re-run the same command to resume") from None
    finally:
        summary.reorder_peak = runner.peak
        if finished:
            writer.close()
        # else the shard still filling is dropped: the rerun writes it whole, from the same batches (a shard
        # being repaired is written whole or not at all; its record keeps what is still to redo)
        summary.shards = writer.shards_written + sum(w.shards_written for w in rewriters.values())


def _take(console, row: dict[str, Any], number: int, writer: ShardWriter, target: ShardWriter, summary: TokenizeSummary) -> None:
    """One output row of batch ``number``: a sample into ``target``, or an error row into ``writer``'s errors."""
    if row["note"]:
        console.print(f"tokenize: {row['note']}; carrying on")
    if row["error"]:
        writer.add_error(row["key"], row["rel"], row["step"], row["error"])
        summary.failed += 1
    else:
        target.add(unpack_sample(row["sample"]), batch=number)
        summary.clips += 1
        summary.seconds += row["seconds"]
        summary.compute += row["compute"]
