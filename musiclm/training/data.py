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
:func:`~musiclm.training.corpus_split.index_shards`), before any shard is opened. Skipping ``b`` batches
(exact resume) therefore costs nothing for whole epochs, and within an epoch
it never decodes an array and never reads a clip that was already emitted.
Batching happens inside the worker, and PyTorch's DataLoader takes batches
from its workers in turn, so global batch ``g`` is local batch ``g // W`` of
worker ``g % W``; a loader resumed at batch ``b`` rotates the workers' parts
by ``b % W`` so that its first worker continues with batch ``b``.

The reader. Clips are read with :func:`musiclm.shards.tar.iter_tar_samples`, which seeks over the
clips a partition does not need, and decoded (:func:`~musiclm.shards.tar.decode_sample`) only when
their window is made: about 0.1 ms per clip.

Damaged inputs. The shards are checked at start-up (:mod:`musiclm.training.corpus_split`); each time a
tar is opened for reading, its end-of-archive blocks are checked. A tar or ``.npy`` member that does not
parse stops training with one line naming the file and how to repair it. (A byte changed inside a clip's
arrays passes these cheap checks; ``musiclm verify`` finds it.)

Layer: training (imports the base layer, shards and models; never the pipeline).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from musiclm.errors import UserError
from musiclm.models.layout import IGNORE, StageLayout
from musiclm.shards import tar as shard_tar
from musiclm.training.corpus_split import ShardEntry, key_hash

DEFAULT_SHUFFLE_BUFFER = 1000  # clips held (undecoded) for shuffling; ~45 KB each for 30 s clips of the small preset
_VAL_SEED = 0x7661_6C  # validation crops depend on the clip key only, never on the training seed

# ---- which clips each partition reads, in which order ---------------------------------------------------


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
