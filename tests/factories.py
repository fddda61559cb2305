"""Token data for tests that need shards but not backbones, and a torch thread-count guard.

``fake_info`` mirrors what ``musiclm tokenize`` writes into tokenizer.json;
``fake_sample`` makes a clip whose tokens have structure a model can learn
(runs of repeated codes, acoustic codes that follow semantic codes);
``fake_shards`` writes clips (and failed files) into a tokenized folder, as
``musiclm tokenize`` would, without backbones or Ray.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from musiclm.shards.format import TokenInfo, TokenSample, sample_key
from musiclm.shards.writer import ShardWriter


def fake_info_json(
    sem_k: int = 32,
    ac_k: int = 32,
    q: int = 8,
    coarse: int = 3,
    clap_levels: int = 4,
    clap_k: int = 16,
    sem_rate: int = 50,
    ac_rate: int = 75,
    window: float = 4.0,
    hop: float = 2.0,
    emb_dim: int = 32,
    fingerprint: str = "fake-0",
) -> dict:
    return {
        "format": 2,
        "fingerprint": fingerprint,
        "streams": {
            "semantic": {"levels": 1, "codebook_size": sem_k, "frame_rate": sem_rate, "sample_rate": 16000},
            "acoustic": {"levels": q, "codebook_size": ac_k, "frame_rate": ac_rate, "sample_rate": 24000, "coarse_levels": coarse},
            "clap": {"levels": clap_levels, "codebook_size": clap_k, "window_seconds": window, "hop_seconds": hop, "embed_dim": emb_dim, "frame_rate": None},
        },
    }


def fake_info(**kw) -> TokenInfo:
    return TokenInfo.from_json(fake_info_json(**kw))


def fake_sample(info: TokenInfo, seconds: float, rng: np.random.Generator, name: str = "clip.wav", segment: int = 0) -> TokenSample:
    """A clip of ``seconds`` whose codes come in runs (so context predicts them)."""
    t_s = int(seconds * info.semantic.frame_rate)
    t_a = int(seconds * info.acoustic.frame_rate)
    run = rng.integers(5, 15)
    base = rng.integers(0, info.semantic.codebook_size, size=t_s // run + 1)
    semantic = np.repeat(base, run)[:t_s].astype(np.uint16)
    idx = np.minimum((np.arange(t_a) * info.semantic.frame_rate / info.acoustic.frame_rate).astype(int), t_s - 1)
    acoustic = np.stack([(semantic[idx].astype(np.int64) * (lv + 1) + lv) % info.acoustic.codebook_size for lv in range(info.acoustic.levels)]).astype(np.uint16)
    w = max(1, int((seconds - info.clap_window_seconds) // info.clap_hop_seconds) + 1)
    clap = rng.integers(0, info.clap.codebook_size, size=(w, info.clap.levels)).astype(np.uint16)
    emb = rng.standard_normal((w, info.clap_embed_dim)).astype(np.float16)
    meta = {"source": name, "start": 0.0, "duration": float(seconds), "sample_rate": 24000, "channels": 1, "segment": segment}
    return TokenSample(sample_key(name, segment), semantic, acoustic, clap, emb, meta)


def write_tokenizer_json(data_dir: Path, info_json: dict) -> None:
    (data_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
    (data_dir / "tokenizer" / "tokenizer.json").write_text(json.dumps(info_json))


@dataclass(frozen=True)
class Failed:
    """A file (or one segment of it) that failed a step of tokenizing: what ``ShardWriter.add_error`` records."""

    key: str
    source: str
    step: str
    reason: str


def fake_shards(
    folder: Path,
    clips: Iterable[TokenSample | Failed] = (),
    *,
    info_json: dict | None = None,
    shard_size: int = 8,
    start_index: int = 0,
    batch_size: int | None = None,
) -> Path:
    """A tokenized folder at ``folder`` as ``musiclm tokenize`` writes one: ``clips`` written in order by
    ShardWriter into shards of ``shard_size`` clips from shard ``start_index`` on; a :class:`Failed` goes into
    the errors file of the shard being filled when it comes. Returns ``folder``.

    With ``info_json`` the tokenizer's tokenizer.json is written first, else ``folder/tokenizer`` must be there
    already. ``clips`` is read lazily, so it may be a generator that reads that tokenizer. With ``batch_size``,
    the i-th clip is recorded as planned in batch ``i // batch_size`` (else in none, -1).
    """
    if info_json is not None:
        write_tokenizer_json(folder, info_json)
    writer = ShardWriter(folder, TokenInfo.load(folder), shard_size=shard_size, start_index=start_index)
    i = 0
    for clip in clips:
        if isinstance(clip, Failed):
            writer.add_error(clip.key, clip.source, clip.step, clip.reason)
            continue
        writer.add(clip, batch=-1 if batch_size is None else i // batch_size)
        i += 1
    writer.close()
    return Path(folder)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's thread count set to ``n`` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def materialize(ops, folder: Path) -> Path:
    """The files a commit of ``ops`` (CommitOperationAdd) would hold, written under ``folder``."""
    for op in ops:
        dst = folder / op.path_in_repo
        dst.parent.mkdir(parents=True, exist_ok=True)
        src = op.path_or_fileobj
        dst.write_bytes(src if isinstance(src, bytes) else Path(src).read_bytes())
    return folder
