"""Repairs of a damaged tokenize output folder: what the check at the start of a run found, and what it redoes.

Layer: pipeline (imports the base layer, shards, pipeline.batch_plan and pipeline.progress).

Every file a run writes gets a checksum record (:mod:`musiclm.shards.writer`). A run first checks
the folder against its records (:func:`check_folder`): a damaged shard's files are removed after
its clips were put on record as to be redone, so the resume tokenizes them again, in their planned
batches, and writes them back into the damaged shard's index (:func:`repair_routes`); clips whose
audio is gone are listed in ``errors/``. A damaged plan is probed again (files keep the batches
their shards' records name); a damaged manifest is written again, as every run does. After the run,
:func:`finish_repairs` tells what was redone and lists in ``errors/`` what could not be.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from musiclm.errors import UserError
from musiclm.pipeline.batch_plan import PLAN_FILE, read_plan
from musiclm.pipeline.progress import TokenizeSummary
from musiclm.shards.format import file_key
from musiclm.shards.manifest import MANIFEST_FILE, TABLE_FILE
from musiclm.shards.read import done_files
from musiclm.shards.records import MANIFEST_RECORD, PLAN_RECORD, record_folder_files, record_path, recorded_files
from musiclm.shards.repair import FolderState, check_shards, folder_problems, list_unrepairable, settle
from musiclm.shards.writer import ShardWriter, clean_unfinished, next_shard_index


@dataclass
class Repair:
    """What the check at the start of a run found, and what its repair has to do (see :func:`check_folder`)."""

    state: FolderState | None = None
    records: dict[str, Any] | None = None  # path -> FileRecord of every sound file: resume's reads are checked against them
    redo: dict[str, dict] = dataclasses.field(default_factory=dict)  # shard name -> its clips and failed files to redo
    pinned: dict[str, int] | None = None  # a lost plan: {rel: batch} as the shard records name them; None when the plan is sound
    notes: list[str] = dataclasses.field(default_factory=list)  # what was done before tokenizing, for the summary
    gone: set[str] = dataclasses.field(default_factory=set)  # keys that cannot be redone (their audio is gone), listed in errors/


def check_folder(console, out: Path, files: list[str], full: bool = False) -> Repair:
    """Check ``out`` against its records and prepare the repair of what is damaged (see the module docstring
    of :mod:`musiclm.shards.writer`); print what was found. Files that ``files`` (the corpus) no longer holds
    cannot be redone: their clips are listed in errors/ now. ``full``: hash every shard file (``--verify``)."""
    if not (out / "shards").is_dir() and not (out / "errors").is_dir():
        clean_unfinished(out)
        return Repair()
    repair = Repair()
    plan_bad = folder_problems(out, PLAN_RECORD, [PLAN_FILE])
    plan = _plan_if_whole(out) if plan_bad else read_plan(out)
    state = check_shards(out, {rel: v[2] for rel, v in (plan or {}).items()}, full=full)
    clean_unfinished(out)
    _tell_shards(console, state, repair)
    plan = _settle_plan(console, out, plan_bad, plan, state, repair)
    manifest_bad = folder_problems(out, MANIFEST_RECORD, [TABLE_FILE, MANIFEST_FILE])
    if manifest_bad:
        console.print("damaged: " + "; ".join(f"{rel}: {problem}" for rel, problem in manifest_bad.items()))
        repair.notes.append(f"wrote the corpus manifest again ({', '.join(manifest_bad)} {'was' if len(manifest_bad) == 1 else 'were'} damaged)")
    repair.state = state
    if state.redo():
        _prepare_redo(out, files, plan, state, repair)
    # what resume reads is checked against these (an errors file written just above has its record on disk only)
    repair.records = recorded_files(out, ("stats", "errors")) if repair.gone else state.file_records()
    return repair


def _plan_if_whole(out: Path) -> dict | None:
    """A plan that changed since it was recorded, if it still reads whole (then it is kept: the batches of the
    clips to redo come from their records); None when it is gone or unreadable."""
    try:
        return read_plan(out) if (out / PLAN_FILE).is_file() else None
    except UserError:
        return None


def _tell_shards(console, state: FolderState, repair: Repair) -> None:
    """Print each damaged shard, and note for the summary what the check itself put right."""
    for f in state.found:
        what = "; ".join(f"{rel}: {problem}" for rel, problem in f.problems.items())
        console.print(f"damaged: {what}")
        if "rebuilt" in f.actions:
            repair.notes.append(f"rebuilt the statistics of {f.name} from its tar, which is sound")
        if "recorded" in f.actions and any(rel.startswith("checksums/") for rel in f.problems):
            repair.notes.append(f"recorded {f.name} again after reading its files whole (its record was damaged)")
    if state.recorded:
        repair.notes.append(f"recorded the checksums of {len(state.recorded)} shard{'s' if len(state.recorded) != 1 else ''} that had none")


def _settle_plan(console, out: Path, plan_bad: dict, plan: dict | None, state: FolderState, repair: Repair) -> dict | None:
    """The plan the run goes on with: a changed plan that reads whole is recorded again; a damaged one is removed
    and the run plans the corpus again, its files pinned to the batches their shards' records name ({})."""
    if plan_bad:
        what = "; ".join(f"{rel}: {problem}" for rel, problem in plan_bad.items())
        if plan is not None:  # it reads whole, with its columns: kept, and recorded as it is now
            console.print(f"{PLAN_FILE} does not match its record ({what}) but reads whole: kept, and recorded again")
            record_folder_files(out, PLAN_RECORD, [PLAN_FILE])
        else:
            console.print(f"damaged: {what}")
            (out / PLAN_FILE).unlink(missing_ok=True)
            record_path(out, PLAN_RECORD).unlink(missing_ok=True)
            repair.pinned = state.batches()
            repair.notes.append(f"planned the corpus again ({PLAN_FILE} was damaged); files kept the batches their shards' records name")
            plan = {}
    elif (out / PLAN_FILE).is_file() and not record_path(out, PLAN_RECORD).is_file():
        record_folder_files(out, PLAN_RECORD, [PLAN_FILE])  # written before records were kept; it reads whole
    return plan


def _prepare_redo(out: Path, files: list[str], plan: dict, state: FolderState, repair: Repair) -> None:
    """What the damaged shards of ``state`` need redone goes into ``repair``; what cannot be redone (its audio
    is gone from the corpus) is listed in errors/ now."""
    from musiclm.shards.format import TokenInfo
    from musiclm.shards.records import ShardRecord

    settle(out, state)  # a repair left by a killed run may be finished already
    repair.redo = {name: json.loads(json.dumps(r)) for name, r in state.redo().items()}
    info = TokenInfo.load(out)
    listed = list_unrepairable(out, state, info, keep=set(files), reason="its source audio is gone, so this clip of damaged {shard} cannot be tokenized again")
    repair.gone = {key for key, _, _ in listed}
    unknown = [name for name, r in state.redo().items() if r.get("unknown")]
    if not unknown:
        return
    done = done_files(out)
    corpus = set(files)
    lost = [rel for rel, v in plan.items() if v[2] >= 0 and rel not in done and rel not in corpus]
    if lost:
        writer = ShardWriter(out, info, 1 << 62, next_shard_index(out))
        for rel in lost:
            reason = f"its source audio is gone and no sound shard holds its tokens ({', '.join(unknown)} could not be read to tell which clips it held)"
            writer.add_error(file_key(rel), rel, "repair", reason)
        writer.close()
        repair.gone.update(file_key(rel) for rel in lost)
    for name in unknown:  # told as far as it can be: what is left to redo are the clips it knows
        rec = ShardRecord.read(out, name)
        rec.redo["unknown"] = False
        rec.drop_settled(frozenset())
        rec.write(out)
        state.records[name] = rec


def finish_repairs(out: Path, repair: Repair, summary: TokenizeSummary) -> None:
    """After a run that went to its end: what the repair redid (for the summary); anything of a damaged shard
    that the run did not produce again is listed in errors/ with the reason, so nothing is silently dropped."""
    from musiclm.shards.format import TokenInfo

    summary.repairs[:0] = repair.notes
    if not repair.redo or repair.state is None:
        return
    settle(out, repair.state)
    if repair.state.redo():
        reason = "it was not produced again from its source audio (did the file change since it was tokenized?); it was in damaged {shard}"
        left = list_unrepairable(out, repair.state, TokenInfo.load(out), keep=set(), reason=reason)
        summary.repairs.append(f"{_count(len(left), 'clip or file', 'clips or files')} of damaged shards were not produced again (listed in {out / 'errors'})")
    shards = {name: r for name, r in repair.redo.items() if r["clips"] or r.get("problems", {}).keys() & {f"shards/{name}.tar"}}
    if shards:
        parts = []
        for name, r in sorted(shards.items()):
            redone = [(src, [k for k in keys if k not in repair.gone]) for src, _, keys in r["clips"]]
            redone = [(src, keys) for src, keys in redone if keys]
            what = f"{_count(sum(len(k) for _, k in redone), 'clip', 'clips')} from {_count(len(redone), 'file', 'files')}" if r["clips"] else "its clips could not be read, so every file in no sound shard was tokenized"
            parts.append(f"{name}: {what}")
        summary.repairs.append(f"repaired {len(shards)} damaged shard{'s' if len(shards) != 1 else ''} ({'; '.join(parts)})")
    failed = {name: r for name, r in repair.redo.items() if r["errors"]}
    if failed:
        n = len({src for r in failed.values() for _, src in r["errors"]})
        summary.repairs.append(f"decoded again the {n} failed files listed in damaged {', '.join(f'errors/{name}.parquet' for name in sorted(failed))}")
    if repair.gone:
        summary.repairs.append(f"{_count(len(repair.gone), 'clip or file', 'clips or files')} of damaged shards could not be redone: their source audio is gone (listed in {out / 'errors'})")


def repair_routes(out: Path, batches: dict[int, list[tuple[str, float]]], plan: dict[str, tuple[float, str, int]], redo: dict[str, dict]) -> dict[int, str]:
    """{planned batch: damaged shard name} for the batches that held only clips of one damaged shard,
    whose tar is gone: they are written back into that shard's index. Other batches go to new shards."""
    owner: dict[str, str] = {}
    for name, r in redo.items():
        if r.get("clips") and not (out / "shards" / f"{name}.tar").exists():
            owner.update({src: name for src, _, _ in r["clips"]})
    routes = {}
    for number, members in batches.items():
        names = {owner.get(rel) for rel, _ in members}
        if len(names) == 1 and None not in names:
            routes[number] = names.pop()
    return routes


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"
