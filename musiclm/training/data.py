"""The training data loader: token shards in, batches of model input out.

A batch is a dict of LongTensors ``tokens``, ``labels``, ``label_levels``
``[B, N]`` (``N`` = the layout's ``seq_len``) plus ``keys`` (the clip keys, a
list of ``B`` strings). Each clip read from ``DIR/shards/*.tar`` becomes one
window: :meth:`StageLayout.crop` picks a random start (a fixed one in
validation), :meth:`StageLayout.encode` turns it into ids and labels. A clip
shorter than the window is taken whole and padded with ``pad_id``; padded
positions carry no label (``IGNORE``), so they add nothing to the loss.

Determinism. The training stream of one *partition* (one DataLoader worker of
one DDP rank) is a pure function of ``(seed, epoch, rank, worker)`` and the
corpus:

- per epoch, the shards are put in an order drawn from ``(seed, epoch)``;
- the shards are split between the ``P = world_size x num_workers``
  partitions: partition ``p`` reads shards ``p, p + P, ...`` of that order.
  When there are fewer shards than partitions (a tiny corpus), every
  partition reads all shards and keeps every ``P``-th clip instead, so the
  partitions stay disjoint at the cost of each reading the whole corpus;
- a bounded shuffle buffer (``shuffle_buffer`` clips) mixes the partition's
  clips, its draws coming from ``(seed, epoch, partition)``;
- the crop start and the conditioning drop (Bernoulli(``cond_dropout``)) of
  a clip come from ``(seed, epoch, clip key)``, so they do not depend on how
  the corpus was split.

The emission order of an epoch is computed from per-shard clip counts alone
(read at start-up from the Parquet footers in ``stats/``, see
:func:`index_shards`), before any shard is opened. Skipping ``b`` batches
(exact resume) therefore costs nothing for whole epochs, and within an epoch
it never decodes an array and never reads a clip that was already emitted.
Batching happens inside the worker, and PyTorch's DataLoader takes batches
from its workers in turn, so global batch ``g`` is local batch ``g // W`` of
worker ``g % W``; a loader resumed at batch ``b`` rotates the workers' parts
by ``b % W`` so that its first worker continues with batch ``b``.

The reader. Clips are read with :func:`musiclm.shards.tar.iter_tar_samples`, which seeks over the
clips a partition does not need, and decoded (:func:`~musiclm.shards.tar.decode_sample`) only when
their window is made: about 0.1 ms per clip.

Damaged inputs. At start-up each shard's record (:mod:`musiclm.shards.records`)
is read, the tar's size is compared with it (a ``stat``, no tar is opened) and
the stats file the counts come from gets a quick check (size and Parquet end
markers); each time a tar is opened for reading, its end-of-archive blocks are
checked. A damaged file, or a tar or ``.npy`` member that does not parse, stops
training with one line naming the file and how to repair it. (A byte changed
inside a clip's arrays passes these cheap checks; ``musiclm verify`` finds it.)

Layer: training (imports the base layer, shards and models; never the pipeline).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musiclm.errors import UserError
from musiclm.integrity import DamagedFile, require
from musiclm.models.layout import IGNORE, StageLayout
from musiclm.shards import tar as shard_tar
from musiclm.shards.format import TokenInfo, list_shards
from musiclm.shards.stats import shard_clip_count, shard_keys
from musiclm.shards.records import RECORDS_DIR, ShardRecord, record_path, repair_advice, shard_files

DEFAULT_SHUFFLE_BUFFER = 1000  # clips held (undecoded) for shuffling; ~45 KB each for 30 s clips of the small preset
_VAL_SEED = 0x7661_6C  # validation crops depend on the clip key only, never on the training seed

# ---- which clips: shard index, train/validation split, partitions ---------------------------------------------------


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


def partition_items(entries: Sequence[ShardEntry], seed: int, epoch: int, part: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """The clips partition ``part`` of ``parts`` reads in ``epoch``, in reading order.

    Returns ``(shard, position)``, two int64 arrays [n]: an index into ``entries``
    and a clip position within that shard. Over all partitions the clips of an
    epoch are each read exactly once.
    """
    order = np.random.default_rng([seed, epoch, 0x5348]).permutation(len(entries))
    if len(entries) >= parts:
        mine, stride = order[part::parts], None
    else:  # fewer shards than partitions: split clips instead (every `parts`-th clip)
        mine, stride = order, parts
    shard_ids, positions = [], []
    for s in mine:
        e = entries[s]
        pos = np.arange(e.count, dtype=np.int64)
        if e.exclude:
            pos = pos[~np.isin(pos, np.fromiter(e.exclude, dtype=np.int64))]
        shard_ids.append(np.full(len(pos), s, dtype=np.int64))
        positions.append(pos)
    shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int64)
    position = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    if stride is not None:
        shard, position = shard[part::stride], position[part::stride]
    return shard, position


def buffer_shuffle(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order [n] of a shuffle buffer of ``buffer`` items fed items ``0..n-1`` in order.

    Item ``i`` is never emitted before item ``i - buffer`` was read, so a reader
    following this order holds at most ``buffer`` items.
    """
    k = min(buffer, n)
    out = np.empty(n, dtype=np.int64)
    buf = list(range(k))
    picks = rng.integers(0, k, size=n - k).tolist() if n > k else []
    for o, (i, j) in enumerate(zip(range(k, n), picks)):
        out[o] = buf[j]
        buf[j] = i
    out[n - k :] = rng.permutation(np.asarray(buf, dtype=np.int64))
    return out


def epoch_order(entries: Sequence[ShardEntry], seed: int, epoch: int, part: int, parts: int, buffer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partition ``part``'s clips in ``epoch``: ``(shard, position, emit)``.

    ``shard``/``position`` [n] are in reading order (see :func:`partition_items`);
    ``emit`` [n] is the order in which the shuffle buffer emits them (indices into those).
    """
    shard, position = partition_items(entries, seed, epoch, part, parts)
    emit = buffer_shuffle(len(shard), buffer, np.random.default_rng([seed, epoch, part, parts, 0x5346]))
    return shard, position, emit


def local_batches(start_batch: int, worker: int, workers: int) -> int:
    """How many of the first ``start_batch`` batches of a DataLoader came from ``worker`` (round robin)."""
    return max(0, (start_batch - worker + workers - 1) // workers)


# ---- reading clips in a planned order -------------------------------------------------------------------------------


def read_planned(entries: Sequence[ShardEntry], shard: np.ndarray, position: np.ndarray, emit: np.ndarray) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Raw clips ``(key, members)`` number ``emit[0], emit[1], ...`` of the reading order ``shard``/``position`` [n].

    The reading order lists each shard's clips together, by ascending position.
    Shards are read front to back in that order; a clip read before its turn
    waits in memory (at most the buffer size when ``emit`` comes from
    :func:`buffer_shuffle`); shards and clips that ``emit`` does not name are
    not read, and nothing is decoded here.
    """
    needed = np.zeros(len(shard), dtype=bool)
    needed[emit] = True
    index_of: dict[tuple[int, int], int] = {}
    shard_order: list[int] = []
    for i in np.flatnonzero(needed).tolist():
        s = int(shard[i])
        if not shard_order or shard_order[-1] != s:
            shard_order.append(s)
        index_of[(s, int(position[i]))] = i

    def reader() -> Iterator[tuple[int, str, dict[str, bytes]]]:
        for s in shard_order:
            path = entries[s].path
            try:
                with shard_tar.open_shard(path) as f:
                    for pos, key, members in shard_tar.iter_tar_samples(f, lambda p, s=s: (s, p) in index_of, where=path):
                        if members is not None:
                            yield index_of[(s, pos)], key, members
            except (ValueError, OSError) as e:
                raise shard_tar.unreadable_shard(path, e) from None

    it = reader()
    pending: dict[int, tuple[str, dict[str, bytes]]] = {}
    for i in emit.tolist():
        while i not in pending:
            try:
                got, key, members = next(it)
            except StopIteration:
                raise UserError(f"shard {entries[int(shard[i])].path} has fewer clips than when the run started; was it rewritten?") from None
            pending[got] = (key, members)
        yield pending.pop(i)


# ---- the training stream ----------------------------------------------------------------------------------------------


def collate(encoded: list, keys: list[str]) -> dict[str, Any]:
    """Stack encoded windows into a batch: LongTensors [B, N] and the clip keys."""
    return {
        "tokens": torch.from_numpy(np.stack([e.tokens for e in encoded])),
        "labels": torch.from_numpy(np.stack([e.labels for e in encoded])),
        "label_levels": torch.from_numpy(np.stack([e.label_levels for e in encoded])),
        "keys": keys,
    }


class TrainStream(torch.utils.data.IterableDataset):
    """An endless stream of training batches for one DDP rank (see the module docstring).

    Use it directly (no workers) or through :func:`make_loader`; ``start_batch``
    is the number of batches this rank already consumed (exact resume).
    """

    def __init__(
        self,
        entries: Sequence[ShardEntry],
        layout: StageLayout,
        batch_size: int,
        seed: int,
        cond_dropout: float,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ):
        super().__init__()
        self.entries = list(entries)
        self.layout = layout
        self.batch_size = batch_size
        self.seed = seed
        self.cond_dropout = cond_dropout if layout.has_clap else 0.0
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.shuffle_buffer = shuffle_buffer

    def clips(self, part: int, parts: int, skip: int = 0) -> Iterator[tuple[str, dict[str, bytes], int]]:
        """Raw clips ``(key, members, epoch)`` of partition ``part`` forever, after skipping ``skip`` clips."""
        total = sum(e.used for e in self.entries)
        if total < parts:
            raise UserError(f"the training data holds {total} clips, fewer than ranks x loader workers = {parts}; use fewer --workers")
        epoch = 0
        while True:
            if skip:  # skipping a whole epoch needs only its length
                n = len(partition_items(self.entries, self.seed, epoch, part, parts)[0])
                if skip >= n:
                    skip -= n
                    epoch += 1
                    continue
            shard, position, emit = epoch_order(self.entries, self.seed, epoch, part, parts, self.shuffle_buffer)
            if len(shard) == 0:
                raise UserError(f"loader partition {part} of {parts} got no clips in epoch {epoch}; use fewer --workers")
            for key, members in read_planned(self.entries, shard, position, emit[skip:]):
                yield key, members, epoch
            skip = 0
            epoch += 1

    def window(self, key: str, members: dict[str, bytes], epoch: int):
        """The encoded training window of one clip: random crop, conditioning dropped with ``cond_dropout``."""
        sample = shard_tar.decode_sample(key, members)
        rng = np.random.default_rng([self.seed, epoch, key_hash(key)])
        window = self.layout.crop(sample, rng)
        drop = bool(rng.random() < self.cond_dropout)
        return self.layout.encode(window, drop)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # a fresh DataLoader asks worker 0 first, but batch `start_batch` belongs to worker start_batch % W
        # of the original run: DataLoader worker i plays the part of original worker (i + start_batch) % W
        worker = (worker + self.start_batch) % workers
        part, parts = self.rank * workers + worker, self.world_size * workers
        skip = local_batches(self.start_batch, worker, workers) * self.batch_size
        encoded, keys = [], []
        for key, members, epoch in self.clips(part, parts, skip):
            encoded.append(self.window(key, members, epoch))
            keys.append(key)
            if len(encoded) == self.batch_size:
                yield collate(encoded, keys)
                encoded, keys = [], []


def make_loader(stream: TrainStream, num_workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``stream`` (batches are made in the workers, so ``batch_size=None``)."""
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


# ---- validation -------------------------------------------------------------------------------------------------------


def val_batches(entries: Sequence[ShardEntry], layout: StageLayout, batch_size: int, max_batches: int) -> list[dict[str, Any]]:
    """A fixed validation set: at most ``max_batches`` batches (the last may be short).

    Clips are spread evenly over ``entries`` (in shard order); each gets the
    crop drawn from its key alone and keeps its conditioning, so the set is the
    same in every run and at every evaluation.
    """
    items = [(s, p) for s, e in enumerate(entries) for p in range(e.count) if p not in e.exclude]
    if not items:
        return []
    m = min(len(items), batch_size * max_batches)
    chosen = [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, m).round().astype(int).tolist()))]
    shard = np.array([s for s, _ in chosen], dtype=np.int64)
    position = np.array([p for _, p in chosen], dtype=np.int64)
    encoded, keys = [], []
    for key, members in read_planned(entries, shard, position, np.arange(len(shard))):
        sample = shard_tar.decode_sample(key, members)
        window = layout.crop(sample, np.random.default_rng([_VAL_SEED, key_hash(key)]))
        encoded.append(layout.encode(window, drop_cond=False))
        keys.append(key)
    return [collate(encoded[i : i + batch_size], keys[i : i + batch_size]) for i in range(0, len(encoded), batch_size)]


def count_labels(batch: dict[str, Any]) -> int:
    """Target positions (labels that are not IGNORE) in a batch."""
    return int((batch["labels"] != IGNORE).sum())
