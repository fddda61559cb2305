"""``musiclm tokenize``: a folder of audio → integer-token shards, as a Ray job. This module tells the story.

Layer: pipeline, its top (imports the base layer, shards and the pipeline modules named below).

::

    check the inputs, lock the output folder, check it against its records    repair.check_folder
    without --tokenizer: choose the fit sample (refuse a corpus too small)     fit_job.plan_fit_sample
    start or join Ray, plan what each actor reserves                         ray_runtime
    without --tokenizer: fit the quantizers (a FitActor pool)                fit_job.fit_tokenizer
    plan the batches (probe tasks; kept in plan.parquet)                     batch_plan
      → corpus manifest (manifest.json, manifest.parquet)                    _write_manifest
      → decode a planned batch (CPU task) → TokenizeActor → in plan order    decode_stage, actors, batch_runner
      → ShardWriter: shards/, stats/, errors/                                main_pass
    say what the repair redid, print the summary                             repair.finish_repairs, progress

Tokens and shard membership are a function of the audio and the batch plan, not of scheduling,
the number of actors or timing (:mod:`musiclm.pipeline.batch_plan`). SIGINT and SIGTERM stop the
run cleanly (finished shards kept, lock released, one line); so does a stall, naming what is
pending (:mod:`musiclm.pipeline.batch_runner`).

Resume: finished shards and errors files name the files that are done
(:func:`~musiclm.shards.read.done_files`); shards close only between batches, so a batch is
either all done or not started, and a rerun of the same command runs the same batches that are
left, which give the same tokens. A lock file keeps a second run out of the same folder. Damaged
files are repaired first (:mod:`musiclm.pipeline.repair`).

Manifest: the probe tasks also hash each file they probe (size and sha256 go into plan.parquet
with the duration), and the driver writes the corpus manifest (:mod:`musiclm.shards.manifest`)
as soon as the plan is known: every file of the corpus, and every file an earlier run finished
even if it has left the corpus since, since its tokens are still in the shards.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from musiclm import atomic
from musiclm.config import Config, TokenizeConfig, to_dict, tokenize_config_from_dict
from musiclm.errors import UserError
from musiclm.pipeline.audio import audio_files_in
from musiclm.pipeline.batch_plan import read_plan
from musiclm.pipeline.fit_job import fit_tokenizer, plan_fit_sample
from musiclm.pipeline.main_pass import tokenize_pending
from musiclm.pipeline.progress import TokenizeSummary, kept_shards, print_summary
from musiclm.pipeline.ray_runtime import check_reachable, plan_cluster_resources, ray_session, stop_on_signals
from musiclm.pipeline.repair import check_folder, finish_repairs
from musiclm.shards.manifest import MANIFEST_FILE, TABLE_FILE, FileFacts, check_paths_mode, write_manifest
from musiclm.shards.read import done_files
from musiclm.shards.records import MANIFEST_RECORD, record_folder_files

LOCK_FILE = ".musiclm.lock"
# tokenizer config keys that change what tokens mean or which clips exist
MEANING_KEYS = ("audio", "clap", "semantic", "codec", "precision")


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

    from musiclm.shards.tokenizer_folder import tokenizer_folder

    console = console or Console(stderr=True)
    corpus, out = Path(corpus), Path(out)
    files = _check_inputs(corpus, out, cfg, tokenizer_dir, address, manifest_paths)
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

        plan = plan_fit_sample(console, files, corpus, cfg.tokenize) if pending and record is None else None
        if pending or repair.pinned is not None:
            with ray_session(address) as ray:
                res = plan_cluster_resources(ray, workers, gpus_per_worker)
                console.print(res.line())
                stall = cfg.tokenize.stall_seconds if cfg is not None else None  # else the tokenizer's recorded config's
                if plan is not None:
                    fit_tokenizer(ray, console, plan, corpus, out, cfg.tokenize, res, stall)
                opts = dict(shard_size=shard_size, batch_seconds=batch_seconds, settled=settled, manifest=manifest, repair=repair, stall_seconds=stall)
                tokenize_pending(ray, console, files, pending, corpus, out, opts, res, summary)
        else:
            manifest()
        finish_repairs(out, repair, summary)
    summary.elapsed = time.time() - t0
    print_summary(console, summary)
    return summary


def _check_inputs(corpus: Path, out: Path, cfg: Config | None, tokenizer_dir: Path | None, address: str | None, manifest_paths: str) -> list[str]:
    """The audio files of ``corpus`` (paths relative to it), once every check that needs no lock has passed:
    a config or a tokenizer given, the corpus and ``out`` usable, ``--address`` reachable (told before the
    corpus is probed for the fit)."""
    if cfg is None and tokenizer_dir is None:
        raise UserError("give --preset/--config to fit a tokenizer, or --tokenizer to reuse one")
    if tokenizer_dir is not None and not Path(tokenizer_dir).exists():
        raise UserError(f"--tokenizer folder not found: {tokenizer_dir}")
    check_paths_mode(manifest_paths)
    abs_files = audio_files_in(corpus, "corpus")
    _check_out(out)
    if address:
        check_reachable(address)
    return [p.relative_to(corpus).as_posix() for p in abs_files]


def _check_out(out: Path) -> None:
    """Refuse an ``out`` that is a file or cannot be written to, in one line; create it."""
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
    """Hold the lock file of ``out`` for the run; a second run on the same folder is refused in one line."""
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


def _same_meaning(a: TokenizeConfig, b: TokenizeConfig) -> bool:
    """Whether two tokenize configs give the same tokens (they agree on :data:`MEANING_KEYS`)."""
    da, db = to_dict(a), to_dict(b)
    return all(da[k] == db[k] for k in MEANING_KEYS)


def _check_tokenizer(out: Path, cfg: Config | None, tokenizer_dir: Path | None) -> dict | None:
    """Refuse a tokenizer or config that disagrees with the tokens already in ``out``.

    Returns the tokenizer record to use when one exists (in ``out`` or given), None when one must be fitted.
    """
    from musiclm.shards.tokenizer_folder import read_record, tokenizer_folder

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

