"""``musiclm tokenize``: a folder of audio → integer-token shards, as a Ray job.

::

    list files, probe durations (Ray Data tasks), plan batches   driver; the plan is kept in plan.parquet
      → decode, segment, resample a planned batch        CPU tasks (one per batch)
      → tokenize the batch                               actor pool holding the Tokenizer (1 GPU each if any)
      → in plan order (a bounded reorder window)         driver (:mod:`musiclm.pipeline.batch_runner`)
      → ShardWriter (driver)                             shards/, stats/, errors/
    corpus manifest (driver, once the plan is known)   manifest.json, manifest.parquet

The batch plan is the driver's: whole files, in listing order, up to
``tokenize.batch_seconds`` of audio per batch (a longer file is a batch of its
own). Each planned batch goes through the backbones whole, and batches reach
the writer in plan order, so tokens and shard membership do not depend on
scheduling, on the number of actors or on timing.

Resources (:func:`plan_resources`, printed at start-up): what each actor reserves
always leaves CPU to the decode tasks that feed the actors, or the arrangement is
refused in one line. A watchdog names what is pending when no batch finishes for
``tokenize.stall_seconds``; SIGINT and SIGTERM stop the run cleanly (finished
shards kept, lock released, one line).

Without ``--tokenizer`` the quantizers are fitted first, on a sample of the
corpus, by the same decode stage feeding a feature-extracting actor pool.

Resume: finished shards and errors files name the files that are done
(:func:`~musiclm.shards.writer.done_files`); shards close only between batches,
so a batch is either all done or not started, and a rerun of the same command
runs the same batches that are left, which give the same tokens. A lock file
keeps a second run out of the same folder.

Repair: every file written gets a checksum record (:mod:`musiclm.shards.writer`).
A run first checks the folder against its records
(:func:`~musiclm.shards.writer.check_shards`): a damaged shard's files are
removed after its clips were put on record as to be redone, so the resume above
tokenizes them again, in their planned batches, and writes them back into the
damaged shard's index; clips whose audio is gone are listed in ``errors/``. A
damaged plan is probed again (files keep the batches their shards' records
name); the manifest is rewritten by every run anyway.

Manifest: the probe tasks also hash each file they probe (size and sha256 go
into plan.parquet with the duration), and the driver writes the corpus manifest
(:mod:`musiclm.shards.manifest`) as soon as the plan is known: every file of
the corpus, and every file an earlier run finished even if it has left the
corpus since, since its tokens are still in the shards.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from musiclm import atomic
from musiclm.config import Config, TokenizeConfig, to_dict, tokenize_config_from_dict
from musiclm.errors import UserError
from musiclm.pipeline.batch_runner import ActorLost, Stalled
from musiclm.pipeline.actors import TokenizeActor, output_rows, unpack_sample
from musiclm.pipeline.audio import audio_files_in
from musiclm.pipeline.batch_plan import plan_corpus, read_plan
from musiclm.pipeline.decode_stage import in_plan_order
from musiclm.pipeline.fit_job import fit_tokenizer, plan_fit_sample
from musiclm.pipeline.progress import TokenizeProgress, TokenizeSummary, kept_shards, print_summary, stalled_error
from musiclm.pipeline.ray_runtime import Resources, check_reachable, plan_cluster_resources, ray_session, stop_on_signals
from musiclm.pipeline.repair import Repair, check_folder, finish_repairs, repair_routes
from musiclm.shards.manifest import MANIFEST_FILE, TABLE_FILE, FileFacts, check_paths_mode, write_manifest
from musiclm.shards.format import file_key
from musiclm.shards.writer import MANIFEST_RECORD, ShardWriter, done_files, next_shard_index, partial_keys, record_folder_files

LOCK_FILE = ".musiclm.lock"
# tokenizer config keys that change what tokens mean or which clips exist
MEANING_KEYS = ("audio", "clap", "mert", "encodec", "precision")


# ---- input checks ---------------------------------------------------------------------------
def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out must be a folder, but {out} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_file = out / f".write-test-{os.getpid()}"
        probe_file.write_bytes(b"")
        probe_file.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {out} ({e.strerror or e}): choose a writable --out folder") from None


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(str(out / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"another musiclm tokenize is writing to {out}: wait for it to finish, or use another --out") from None
    try:
        yield
    finally:
        lock.release()


# ---- decode stage (Ray tasks) ------------------------------------------------------------
# ---- actor stage -----------------------------------------------------------------------------
# ---- driver ----------------------------------------------------------------------------------
def _same_meaning(a: TokenizeConfig, b: TokenizeConfig) -> bool:
    da, db = to_dict(a), to_dict(b)
    return all(da[k] == db[k] for k in MEANING_KEYS)


def _check_tokenizer(out: Path, cfg: Config | None, tokenizer_dir: Path | None) -> dict | None:
    """Refuse a tokenizer or config that disagrees with the tokens already in ``out``.

    Returns the tokenizer record to use when one exists (in ``out`` or given), None when one must be fitted.
    """
    from musiclm.pipeline.tokenizer import read_record, tokenizer_folder

    existing = out / "tokenizer"
    given = read_record(tokenizer_folder(tokenizer_dir)) if tokenizer_dir is not None else None
    if (existing / "tokenizer.json").is_file():
        have = read_record(existing)
        if given is not None and given["fingerprint"] != have["fingerprint"]:
            raise UserError(
                f"{out} holds tokens of tokenizer {have['fingerprint']}, but --tokenizer {tokenizer_dir} is "
                f"tokenizer {given['fingerprint']}: use a new --out for another tokenizer"
            )
        if cfg is not None and given is None and not _same_meaning(cfg.tokenize, tokenize_config_from_dict(have["config"])):
            raise UserError(
                f"{out} was tokenized with another tokenize config than '{cfg.name}': "
                "rerun with the same --preset/--config, or use a new --out"
            )
        return have
    if any((out / "shards").glob("shard-*.tar")):
        raise UserError(f"{out} has shards but no tokenizer/tokenizer.json: it was not written by musiclm tokenize; use a new --out")
    if given is not None and cfg is not None and not _same_meaning(cfg.tokenize, tokenize_config_from_dict(given["config"])):
        raise UserError(f"--tokenizer {tokenizer_dir} was fitted with another tokenize config than '{cfg.name}': drop --preset/--config")
    return given


def run_tokenize(
    corpus: Path,
    out: Path,
    cfg: Config | None,
    *,
    tokenizer_dir: Path | None = None,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    shard_size: int | None = None,
    batch_seconds: float | None = None,
    manifest_paths: str = "names",
    verify: bool = False,
    console=None,
) -> TokenizeSummary:
    """Tokenize every audio file under ``corpus`` into ``out`` (see the module docstring).

    ``manifest_paths``: how the corpus manifest names files, "names" (relative paths) or "hashed"
    (sha256 of each relative path; see :mod:`musiclm.shards.manifest`). ``verify``: hash every file of
    ``out`` against its record before resuming, not only those whose size or times changed."""
    from rich.console import Console

    from musiclm.pipeline.tokenizer import tokenizer_folder

    console = console or Console(stderr=True)
    corpus, out = Path(corpus), Path(out)
    if cfg is None and tokenizer_dir is None:
        raise UserError("give --preset/--config to fit a tokenizer, or --tokenizer to reuse one")
    if tokenizer_dir is not None and not Path(tokenizer_dir).exists():
        raise UserError(f"--tokenizer folder not found: {tokenizer_dir}")
    check_paths_mode(manifest_paths)
    abs_files = audio_files_in(corpus, "corpus")
    _check_out(out)
    if address:
        check_reachable(address)  # a bad --address is told before the corpus is probed for the fit
    files = [p.relative_to(corpus).as_posix() for p in abs_files]
    t0 = time.time()
    with _lock(out), stop_on_signals(lambda: f"stopped: {kept_shards(out)} kept; re-run the same command to resume"):
        record = _check_tokenizer(out, cfg, tokenizer_dir)
        if record is not None and not (out / "tokenizer" / "tokenizer.json").is_file():
            atomic.copy_folder(tokenizer_folder(tokenizer_dir), out / "tokenizer")
        repair = check_folder(console, out, files, full=verify)
        settled = done_files(out, repair.records)
        finished = settled.intersection(files)
        pending = [f for f in files if f not in finished]
        summary = TokenizeSummary(len(files), len(finished), 0, 0.0, 0, 0, 0.0, out)

        def manifest() -> None:  # after the plan: a killed run leaves a manifest of every file it may have tokenized
            _write_manifest(console, corpus, out, set(files) | settled, manifest_paths)

        plan = None
        if pending and record is None:
            from musiclm.pipeline.fit_plan import backbone_facts, check_backbones

            facts = backbone_facts(cfg.tokenize)
            check_backbones(cfg.tokenize, facts)
            plan = plan_fit_sample(console, files, corpus, cfg.tokenize, facts.mert_frame_rate)
        if pending or repair.pinned is not None:
            with ray_session(address) as ray:
                res = plan_cluster_resources(ray, workers, gpus_per_worker)
                console.print(res.line())
                stall = cfg.tokenize.stall_seconds if cfg is not None else None  # else the tokenizer's recorded config's
                if plan is not None:
                    fit_tokenizer(ray, console, plan, corpus, out, cfg.tokenize, res, stall)
                opts = dict(shard_size=shard_size, batch_seconds=batch_seconds, settled=settled, manifest=manifest, repair=repair, stall_seconds=stall)
                _tokenize_all(ray, console, files, pending, corpus, out, opts, res, summary)
        else:
            manifest()
        finish_repairs(out, repair, summary)
    summary.elapsed = time.time() - t0
    print_summary(console, summary)
    return summary


def _write_manifest(console, corpus: Path, out: Path, names: set[str], paths: str) -> None:
    """The corpus manifest of the files ``names``, from what the plan knows of them (digests the plan lacks are
    computed by :func:`~musiclm.shards.manifest.write_manifest`)."""
    planned = read_plan(out)
    facts = {}
    for rel in names:
        p = planned.get(rel)
        facts[rel] = FileFacts(p[3], p[4], p[0], p[1] or "", p[5]) if p is not None else FileFacts(None, None, None, "")
    summary = write_manifest(out, corpus, facts, paths=paths, console=console)
    record_folder_files(out, MANIFEST_RECORD, [TABLE_FILE, MANIFEST_FILE])
    lic = len(summary["licences"])
    console.print(f"manifest: {summary['files']} files, {lic} licence file{'s' if lic != 1 else ''}, sha256 {summary['manifest_sha256'][:12]} ({out / 'manifest.json'})")


def _tokenize_all(ray, console, files: list[str], pending: list[str], corpus: Path, out: Path, opts: dict[str, Any], res: Resources, summary: TokenizeSummary) -> None:
    """The main pass: every segment of ``pending`` not yet done → shards; counts go into ``summary``.

    Batches reach the writer in plan order (:mod:`musiclm.pipeline.batch_runner`) and a shard closes at the
    end of the batch that fills it, so which clips a shard holds is a function of the plan: the same for
    any number of actors, any timing, and for a killed run resumed (a shard still filling when the run
    stops is not written: the rerun fills it again from the same batches)."""
    from musiclm.pipeline.tokenizer import read_record
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
    if not batches:
        writer.close()
        summary.shards = writer.shards_written
        return
    routes = repair_routes(out, batches, plan, repair.redo)  # batch -> the damaged shard it goes back into
    rewriters = {name: ShardWriter(out, info, 1 << 62, int(name.split("-")[1])) for name in set(routes.values())}
    waiting = {name: {b for b, n in routes.items() if n == name} for name in rewriters}  # batches still to come
    done = frozenset(partial_keys(out, opts["settled"], repair.records))  # keys of partly finished files only
    t_run = time.time()
    kwargs = dict(tokenizer_dir=str(out / "tokenizer"), threads=res.threads)
    runner = in_plan_order(ray, TokenizeActor, kwargs, res, batches, corpus, tcfg, rates, done, opts.get("stall_seconds") or tcfg.stall_seconds)
    total = sum(seconds for members in batches.values() for _, seconds in members)
    finished = False
    try:
        with TokenizeProgress(console, total, res.workers) as bar:
            for item, output in runner:
                number = item["batch"]
                for row in output_rows(output):
                    if row["note"]:
                        console.print(f"tokenize: {row['note']}; carrying on")
                    if row["error"]:
                        writer.add_error(row["key"], row["rel"], row["step"], row["error"])
                        summary.failed += 1
                    else:
                        (rewriters[routes[number]] if number in routes else writer).add(unpack_sample(row["sample"]), batch=number)
                        summary.clips += 1
                        summary.seconds += row["seconds"]
                        summary.compute += row["compute"]
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

