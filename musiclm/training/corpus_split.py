"""Which clips train and which validate: the corpus's shards checked and counted at start-up, without
opening a tar, and the train/validation split.

Damaged inputs. At start-up each shard's record (:mod:`musiclm.shards.records`)
is read, the tar's size is compared with it (a ``stat``, no tar is opened) and
the stats file the counts come from gets a quick check (size and Parquet end
markers). A damaged file stops training with one line naming the file and how
to repair it.

Layer: training (imports the base layer and shards).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musiclm.errors import UserError
from musiclm.integrity import DamagedFile, require
from musiclm.shards import tar as shard_tar
from musiclm.shards.format import TokenInfo, list_shards
from musiclm.shards.records import RECORDS_DIR, ShardRecord, record_path, repair_advice, shard_files
from musiclm.shards.stats import shard_clip_count, shard_keys


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the loader sees it: its clip count and the clip positions it must not use."""

    path: str
    count: int
    exclude: frozenset[int] = field(default_factory=frozenset)  # positions held out for validation

    @property
    def used(self) -> int:
        return self.count - len(self.exclude)


def key_hash(key: str) -> int:
    """A stable 64-bit hash of a clip key (seeds crops, picks held-out clips)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def check_shard(shard: str | Path) -> None:
    """The cheap start-up checks of one shard (see the module docstring), without opening its tar;
    :class:`~musiclm.integrity.DamagedFile` (or a UserError for a missing file) when one fails."""
    shard = Path(shard)
    out, name = shard.parent.parent, shard.stem
    record = ShardRecord.read(out, name)  # DamagedFile when the record itself is damaged
    files = record.files if record is not None else {}
    rels = shard_files(name)
    advice = repair_advice(out)
    if record is None and (out / RECORDS_DIR).is_dir():
        raise DamagedFile(shard, f"it has no record ({record_path(out, name)} is missing)", advice)
    if not shard.is_file():
        raise UserError(f"{shard} is missing: {advice}")
    tar = files.get(rels["tar"])
    size = shard.stat().st_size
    if tar is not None and size != tar.bytes:
        raise DamagedFile(shard, f"{size} bytes, recorded {tar.bytes}", advice)
    if (out / rels["stats"]).is_file():  # without it the clips are counted by a header scan
        require(out / rels["stats"], files.get(rels["stats"]), advice)


def index_shards(paths: Sequence[str | Path]) -> list[ShardEntry]:
    """Count the clips of each shard; empty shards are left out.

    A shard's count comes from the footer of its stats file, so start-up reads
    one small Parquet footer per shard and opens no tar; a shard without a
    stats file (copied without ``stats/``) is counted by a header scan. Each
    shard is checked first (:func:`check_shard`).
    """
    entries = []
    for p in paths:
        check_shard(p)
        count = shard_clip_count(p)
        entries.append(ShardEntry(str(p), len(shard_tar.scan_keys(p)) if count is None else count))
    return [e for e in entries if e.count > 0]


def _keys_of(shard: Path) -> list[str]:
    """Clip keys of one shard in tar order: from its stats file, or a header scan without one."""
    keys = shard_keys(shard)
    return shard_tar.scan_keys(shard) if keys is None else keys


def _shards_or_error(data_dir: Path, what: str) -> list[Path]:
    """The finished shards of ``data_dir``; UserError when there is none, or when a record names a shard that is gone."""
    data_dir = Path(data_dir)
    shards = list_shards(data_dir)
    listed = {p.stem for p in shards}
    for path in sorted((data_dir / RECORDS_DIR).glob("shard-*.json")):
        if path.stem not in listed:
            record = ShardRecord.read(data_dir, path.stem)
            tar = shard_files(path.stem)["tar"]
            if record is not None and (tar in record.files or (record.redo or {}).get("clips")):
                raise UserError(f"{data_dir / tar} is missing: {repair_advice(data_dir)}")
    if not shards:
        raise UserError(f"{what} {data_dir} has no shards (expected {Path(data_dir) / 'shards' / 'shard-000000.tar'}); run musiclm tokenize first")
    return shards


@dataclass(frozen=True)
class DataSplit:
    """Training and validation shards; ``val`` is empty when nothing is held out."""

    train: list[ShardEntry]
    val: list[ShardEntry]  # for validation, ``exclude`` lists the positions NOT in the validation set
    how: str  # one line for the log: where validation comes from


def split_data(data_dir: str | Path, info: TokenInfo, val_data: str | Path | None, val_fraction: float) -> DataSplit:
    """Choose training and validation clips.

    With ``val_data`` (tokenized with the same tokenizer), all of ``data_dir``
    trains and all of ``val_data`` validates. Otherwise ``val_fraction`` of the
    shards is held out (at least one, never all; chosen by a hash of the shard
    name so the choice is stable), or, with a single shard, that fraction of its
    clips (chosen by a hash of the clip key).
    """
    data_dir = Path(data_dir)
    shards = _shards_or_error(data_dir, "data folder")
    if val_data is not None:
        val_info = TokenInfo.load(val_data)
        if val_info.fingerprint != info.fingerprint:
            raise UserError(
                f"--val-data {val_data} was tokenized with another tokenizer (fingerprint {val_info.fingerprint}, "
                f"training data has {info.fingerprint}); tokenize it with --tokenizer {data_dir / 'tokenizer'}"
            )
        val = index_shards(_shards_or_error(Path(val_data), "--val-data folder"))
        return DataSplit(index_shards(shards), val, f"validation: {sum(e.used for e in val)} clips of {val_data}")
    if val_fraction <= 0:
        return DataSplit(index_shards(shards), [], "validation: none (val_fraction = 0)")
    if len(shards) >= 2:
        k = min(max(1, round(val_fraction * len(shards))), len(shards) - 1)
        by_hash = sorted(shards, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())
        held = set(by_hash[:k])
        val = index_shards([p for p in shards if p in held])
        train = index_shards([p for p in shards if p not in held])
        return DataSplit(train, val, f"validation: {k} of {len(shards)} shards held out ({sum(e.used for e in val)} clips)")
    check_shard(shards[0])
    keys = _keys_of(shards[0])
    n_val = min(int(np.ceil(val_fraction * len(keys))), len(keys) - 1)
    ranked = sorted(range(len(keys)), key=lambda i: key_hash(keys[i]))
    val_pos = frozenset(ranked[:n_val])
    train = [ShardEntry(str(shards[0]), len(keys), val_pos)]
    val = [ShardEntry(str(shards[0]), len(keys), frozenset(range(len(keys))) - val_pos)] if n_val else []
    return DataSplit(train, val, f"validation: {n_val} of {len(keys)} clips of the only shard held out")
