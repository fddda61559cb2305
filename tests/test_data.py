"""The training loader: reading shards, splitting, shuffling, cropping, exact resume."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from webdataset.tariterators import group_by_keys, tar_file_iterator

from musiclm.config import load_config
from musiclm.errors import UserError
from musiclm.models.layout import IGNORE, StageLayout, layout_for
from musiclm.shards.format import TokenInfo, TokenSample, list_shards, sample_key
from musiclm.shards import tar as tar_mod
from musiclm.shards.tar import decode_sample, iter_tar_samples, read_tar_samples
from musiclm.training.corpus_split import ShardEntry, index_shards, split_data
from musiclm.training.data import TrainStream, buffer_shuffle, local_batches, make_loader, partition_items, val_batches
from tests.factories import fake_info_json, fake_sample, fake_shards

CFG = load_config("tiny")
SHARD_SIZE = 8


def random_sample(info: TokenInfo, seconds: float, rng: np.random.Generator, name: str) -> TokenSample:
    """A clip of uniformly random codes: any window of it occurs once, so a crop can be located exactly."""
    t_s, t_a = int(seconds * info.semantic.frame_rate), int(seconds * info.acoustic.frame_rate)
    w = max(1, int((seconds - info.clap_window_seconds) // info.clap_hop_seconds) + 1)
    return TokenSample(
        sample_key(name, 0),
        rng.integers(0, info.semantic.codebook_size, t_s).astype(np.uint16),
        rng.integers(0, info.acoustic.codebook_size, (info.acoustic.levels, t_a)).astype(np.uint16),
        rng.integers(0, info.clap.codebook_size, (w, info.clap.levels)).astype(np.uint16),
        rng.standard_normal((w, info.clap_embed_dim)).astype(np.float16),
        {"source": name, "start": 0.0, "duration": seconds, "sample_rate": 24000, "channels": 1, "segment": 0},
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, TokenInfo, dict[str, TokenSample]]:
    """40 clips of 2-9 s (some shorter than the semantic window) in 5 shards of 8, random codes."""
    info_json = fake_info_json()
    info = TokenInfo.from_json(info_json)
    rng = np.random.default_rng(1)
    samples = [random_sample(info, float(rng.choice([2.0, 3.0, 5.0, 6.5, 9.0])), rng, f"song{i}.wav") for i in range(40)]
    folder = fake_shards(tmp_path_factory.mktemp("corpus"), samples, info_json=info_json, shard_size=SHARD_SIZE)
    return folder, info, {s.key: s for s in samples}


def layout_of(stage: str, info: TokenInfo) -> StageLayout:
    return layout_for(stage, info, CFG.stages.get(stage))


def stream_of(corpus, stage="semantic", batch_size=4, seed=0, **kw) -> TrainStream:
    folder, info, _ = corpus
    return TrainStream(index_shards(list_shards(folder)), layout_of(stage, info), batch_size, seed, CFG.stages.get(stage).cond_dropout, **kw)


def take(it, n: int) -> list[dict]:
    return list(itertools.islice(it, n))


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["keys"] == y["keys"] and all(torch.equal(x[k], y[k]) for k in ("tokens", "labels", "label_levels")) for x, y in zip(a, b)
    )


# ---- reading ------------------------------------------------------------------------------------------------------


def test_reader_reads_shards_exactly_as_webdataset_does(corpus):
    folder, _, _ = corpus
    path = list_shards(folder)[0]
    with open(path, "rb") as f:
        files = list(tar_file_iterator(f))
    expected = [TokenSample.from_wds(s) for s in group_by_keys([dict(x, __url__=str(path)) for x in files])]
    with open(path, "rb") as f:
        got = [decode_sample(key, members) for _, key, members in iter_tar_samples(f)]
    assert [s.key for s in got] == [s.key for s in expected]
    for a, b in zip(got, expected):
        assert a.meta == b.meta
        for name in ("semantic", "acoustic", "clap", "clap_emb"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def test_reader_skips_clips_it_does_not_want(corpus):
    folder, _, _ = corpus
    with open(list_shards(folder)[0], "rb") as f:
        got = list(iter_tar_samples(f, want=lambda p: p % 3 == 0))
    assert [p for p, _, _ in got] == list(range(SHARD_SIZE))
    assert all((m is None) == (p % 3 != 0) for p, _, m in got)
    assert all(m is None or set(m) == {"semantic.npy", "acoustic.npy", "clap.npy", "clap_emb.npy", "json"} for _, _, m in got)


def test_a_whole_read_checks_every_tar_header_against_its_checksum(corpus, tmp_path):
    """The repairs read a shard whole with its headers checked (as tarfile did for them): one byte of a member
    name changed, size and layout intact, is caught there; the loader's fast reads do not check headers."""
    folder, _, _ = corpus
    path = list_shards(folder)[0]
    data = bytearray(path.read_bytes())
    assert len(read_tar_samples(path)) == SHARD_SIZE
    damaged = tmp_path / path.name
    at = 1024 * 3  # some header past the first member: its name's first byte
    while data[at + 257 : at + 262] != b"ustar" or data[at + 156 : at + 157] not in (b"0", b"\0"):
        at += 512
    data[at] = ord("z") if data[at] != ord("z") else ord("y")
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its checksum"):
        read_tar_samples(damaged)
    with open(damaged, "rb") as f:
        assert len(list(iter_tar_samples(f))) >= SHARD_SIZE  # the renamed member starts a clip of its own


def test_a_truncated_shard_is_a_user_error(corpus, tmp_path):
    folder, _, _ = corpus
    bad = tmp_path / "shards" / "shard-000000.tar"
    bad.parent.mkdir()
    bad.write_bytes(list_shards(folder)[0].read_bytes()[:3000])
    with pytest.raises(UserError, match="truncated"):
        index_shards([bad])


# ---- splitting -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parts", [1, 2, 3, 5, 8, 13])
def test_partitions_are_disjoint_and_cover_each_epoch(corpus, parts):
    """With fewer shards (5) than partitions (8, 13) the split falls back to every k-th clip."""
    folder, _, _ = corpus
    entries = index_shards(list_shards(folder))
    everything = sorted((s, p) for s, e in enumerate(entries) for p in range(e.count))
    for epoch in (0, 1):
        seen = []
        for part in range(parts):
            shard, pos = partition_items(entries, seed=0, epoch=epoch, part=part, parts=parts)
            assert len(shard) > 0
            seen += list(zip(shard.tolist(), pos.tolist()))
        assert sorted(seen) == everything


def test_shards_are_dealt_to_partitions_while_there_are_enough(corpus):
    folder, _, _ = corpus
    entries = index_shards(list_shards(folder))
    for part in range(2):
        shard, _ = partition_items(entries, seed=0, epoch=0, part=part, parts=2)
        # whole shards: each shard a partition reads, it reads completely
        assert all(np.sum(shard == s) == entries[s].count for s in set(shard.tolist()))


def test_ranks_and_workers_stream_disjoint_clips(corpus):
    """Rank r, worker w is partition r * workers + w; one epoch of all partitions is the corpus once."""
    _, _, samples = corpus
    keys_by_part = []
    for rank in range(2):
        stream = stream_of(corpus, rank=rank, world_size=2)
        for worker in range(2):
            part = rank * 2 + worker
            n = len(partition_items(stream.entries, 0, 0, part, 4)[0])
            keys_by_part.append([k for k, _, _ in itertools.islice(stream.clips(part, 4), n)])
    flat = [k for keys in keys_by_part for k in keys]
    assert len(flat) == len(set(flat)) == len(samples)


def test_split_holds_out_whole_shards(corpus):
    folder, info, _ = corpus
    split = split_data(folder, info, None, val_fraction=0.2)
    assert len(split.val) == 1 and len(split.train) == 4
    assert {e.path for e in split.val}.isdisjoint(e.path for e in split.train)
    assert split_data(folder, info, None, val_fraction=0.2) == split  # stable


def test_split_of_a_single_shard_holds_out_clips_by_key(tmp_path):
    info_json = fake_info_json()
    info = TokenInfo.from_json(info_json)
    rng = np.random.default_rng(0)
    folder = fake_shards(tmp_path, [fake_sample(info, 3.0, rng, name=f"c{i}.wav") for i in range(10)], info_json=info_json, shard_size=10)
    split = split_data(folder, info, None, val_fraction=0.2)
    (train,), (val,) = split.train, split.val
    train_pos = set(range(10)) - train.exclude
    val_pos = set(range(10)) - val.exclude
    assert len(val_pos) == 2 and train_pos == set(range(10)) - val_pos
    batches = val_batches(split.val, layout_of("semantic", info), 8, 4)
    stream = TrainStream(split.train, layout_of("semantic", info), 1, 0, 0.0)
    train_keys = {k for k, _, _ in itertools.islice(stream.clips(0, 1), 8)}
    assert len(train_keys) == 8 and train_keys.isdisjoint(batches[0]["keys"])


def test_too_few_clips_for_the_partitions_is_a_user_error(corpus):
    stream = stream_of(corpus)
    with pytest.raises(UserError, match="fewer than ranks x loader workers"):
        next(stream.clips(0, 41))


# ---- order, determinism, resume ----------------------------------------------------------------------------------------


def test_buffer_shuffle_is_a_permutation_that_never_runs_ahead_of_its_buffer():
    rng = np.random.default_rng(0)
    for n, k in [(0, 4), (3, 10), (100, 1), (100, 10), (1000, 64)]:
        out = buffer_shuffle(n, k, rng)
        assert sorted(out.tolist()) == list(range(n))
        assert all(i <= o + k - 1 for o, i in enumerate(out.tolist()))
    assert buffer_shuffle(100, 1, rng).tolist() == list(range(100))


def test_stream_is_a_function_of_the_seed(corpus):
    a = take(iter(stream_of(corpus, seed=0)), 15)  # 15 batches of 4: past the 40-clip epoch
    b = take(iter(stream_of(corpus, seed=0)), 15)
    c = take(iter(stream_of(corpus, seed=1)), 15)
    assert same_batches(a, b)
    assert [x["keys"] for x in a] != [x["keys"] for x in c]
    # epochs differ in order and crops, but each epoch holds every clip once
    keys = [k for x in a for k in x["keys"]]
    assert sorted(keys[:40]) == sorted(set(keys[:40])) and keys[:20] != keys[40:60]


@pytest.mark.parametrize("start", [1, 7, 10, 13, 31])
def test_starting_at_batch_b_equals_iterating_b_batches(corpus, start):
    full = take(iter(stream_of(corpus)), start + 3)
    resumed = take(iter(stream_of(corpus, start_batch=start)), 3)
    assert same_batches(resumed, full[start:])


def test_skipped_batches_are_not_decoded(corpus, monkeypatch):
    calls = []
    real = tar_mod.decode_sample
    monkeypatch.setattr(tar_mod, "decode_sample", lambda key, members: calls.append(key) or real(key, members))
    take(iter(stream_of(corpus, start_batch=25)), 1)
    assert len(calls) == 4


@pytest.mark.slow
def test_loader_workers_resume_at_the_same_batch(corpus):
    """Two DataLoader workers alternate batches; starting at batch b continues the same sequence."""
    full = take(iter(make_loader(stream_of(corpus), num_workers=2)), 14)
    resumed = take(iter(make_loader(stream_of(corpus, start_batch=9), num_workers=2)), 5)
    assert same_batches(resumed, full[9:])
    assert local_batches(9, 0, 2) == 5 and local_batches(9, 1, 2) == 4


# ---- windows ---------------------------------------------------------------------------------------------------------


def locate(haystack: np.ndarray, needle: np.ndarray) -> list[int]:
    """Frame offsets at which ``needle`` [..., n] occurs in ``haystack`` [..., T]."""
    n = needle.shape[-1]
    return [a for a in range(haystack.shape[-1] - n + 1) if np.array_equal(haystack[..., a : a + n], needle)]


@pytest.mark.parametrize("stage", ["semantic", "coarse"])
def test_crops_lie_inside_clips_and_use_the_nearest_clap_window(corpus, stage):
    _, info, samples = corpus
    layout = layout_of(stage, info)
    rate = float(info.semantic.frame_rate)
    clap_offsets = np.array([layout.offsets[("clap", lv)] for lv in range(info.clap.levels)])
    sem_offset = layout.offsets[("semantic", 0)]
    for batch in take(iter(stream_of(corpus, stage, seed=3)), 10):
        for key, tokens in zip(batch["keys"], batch["tokens"].numpy()):
            clip = samples[key]
            sem_start = layout.clap_len  # semantic ids follow the CLAP prefix in both stages
            sem = tokens[sem_start : sem_start + layout.frames_of("semantic")]
            sem = sem[sem != layout.pad_id] if stage == "semantic" else sem
            starts = locate(clip.semantic, sem - sem_offset)
            assert len(starts) == 1, "the window is a piece of its clip"
            start = starts[0] / rate
            assert start + len(sem) / rate <= clip.duration + 1e-9
            prefix = tokens[: layout.clap_len]
            if not np.all(prefix == layout.null_id):
                w = info.clap_window_for(start, layout.window_seconds, len(clip.clap))
                assert np.array_equal(prefix - clap_offsets, clip.clap[w])


def test_short_clips_are_padded_and_pads_have_no_labels(corpus):
    _, info, samples = corpus
    layout = layout_of("semantic", info)  # a 4 s window; the corpus has 2 s and 3 s clips
    short = 0
    for batch in take(iter(stream_of(corpus, seed=0)), 10):
        for key, tokens, labels in zip(batch["keys"], batch["tokens"].numpy(), batch["labels"].numpy()):
            frames = min(len(samples[key].semantic), layout.frames_of("semantic"))
            end = layout.prefix_len + frames
            assert np.all(tokens[end:] == layout.pad_id)
            assert np.all(labels[end - 1 :] == IGNORE)
            assert np.sum(labels != IGNORE) == frames
            short += frames < layout.frames_of("semantic")
    assert short > 0


def test_conditioning_is_dropped_at_the_configured_rate(corpus):
    _, info, _ = corpus
    layout = layout_of("semantic", info)
    folder = corpus[0]
    entries = index_shards(list_shards(folder))

    def dropped(p: float) -> float:
        stream = TrainStream(entries, layout, 8, 0, cond_dropout=p)
        tokens = torch.cat([b["tokens"] for b in take(iter(stream), 25)])  # 200 windows
        return float((tokens[:, 0] == layout.null_id).float().mean())

    assert dropped(0.0) == 0.0
    assert 0.35 < dropped(0.5) < 0.65
    assert dropped(1.0) == 1.0


def test_validation_set_is_fixed_and_keeps_its_conditioning(corpus):
    folder, info, _ = corpus
    layout = layout_of("semantic", info)
    split = split_data(folder, info, None, val_fraction=0.4)
    a = val_batches(split.val, layout, 4, 3)
    b = val_batches(split.val, layout, 4, 3)
    assert len(a) == 3 and same_batches(a, b)
    assert not any(bool((x["tokens"][:, 0] == layout.null_id).any()) for x in a)
    assert len({k for x in a for k in x["keys"]}) == 12
    assert val_batches([], layout, 4, 3) == []


def test_shard_entries_skip_held_out_positions():
    entries = [ShardEntry("a", 4, frozenset({1, 2})), ShardEntry("b", 3)]
    shard, pos = partition_items(entries, seed=0, epoch=0, part=0, parts=1)
    assert sorted(zip(shard.tolist(), pos.tolist())) == [(0, 0), (0, 3), (1, 0), (1, 1), (1, 2)]


def timed_sample(info: TokenInfo, seconds: float, name: str) -> TokenSample:
    """A clip whose codes are their own time: semantic[t] = t, acoustic[q, t] = t (75 Hz frames), clap[w] = w.

    A window cut from it says where it was cut, in each stream separately.
    """
    t_s, t_a = int(seconds * info.semantic.frame_rate), int(seconds * info.acoustic.frame_rate)
    w = max(1, int((seconds - info.clap_window_seconds) // info.clap_hop_seconds) + 1)
    return TokenSample(
        sample_key(name, 0),
        np.arange(t_s, dtype=np.uint16),
        np.tile(np.arange(t_a, dtype=np.uint16), (info.acoustic.levels, 1)),
        np.repeat(np.arange(w, dtype=np.uint16)[:, None], info.clap.levels, axis=1),
        np.zeros((w, info.clap_embed_dim), np.float16),
        {"source": name, "start": 0.0, "duration": seconds, "sample_rate": 24000, "channels": 1, "segment": 0},
    )


def nearest_clap_windows(info: TokenInfo, n_windows: int, start: float, seconds: float) -> set[int]:
    """Every CLAP window whose centre is nearest the centre of [start, start + seconds) (two on a tie)."""
    centres = info.clap_window_seconds / 2 + info.clap_hop_seconds * np.arange(n_windows)
    distance = np.abs(centres - (start + seconds / 2))
    return set(np.flatnonzero(np.isclose(distance, distance.min())).tolist())


def test_coarse_crops_align_the_75hz_acoustic_window_with_the_50hz_semantic_window(tmp_path):
    """Decoded from the loader's token rows: each crop starts at semantic frame s and acoustic frame
    exactly 3s/2 (the same instant), both windows are whole and contiguous, and the CLAP window
    is the one nearest the crop."""
    info_json = fake_info_json(sem_k=2048, ac_k=2048, clap_k=64)  # codes up to 20 s of 75 Hz frames
    info = TokenInfo.from_json(info_json)
    samples = [timed_sample(info, seconds, f"timed{i}.wav") for i, seconds in enumerate([2.0, 7.3, 13.0, 20.0])]
    folder = fake_shards(tmp_path, samples, info_json=info_json, shard_size=2)
    layout = layout_of("coarse", info)
    n_sem, n_ac = layout.frames_of("semantic"), layout.frames_of("acoustic")
    assert n_ac * 2 == n_sem * 3
    sem_offset = layout.offsets[("semantic", 0)]
    clap_offsets = np.array([layout.offsets[("clap", lv)] for lv in range(info.clap.levels)])
    by_key = {s.key: s for s in samples}
    stream = TrainStream(index_shards(list_shards(folder)), layout, 4, seed=5, cond_dropout=0.0)

    starts = set()
    for batch in take(iter(stream), 60):  # 60 epochs of the 4 clips: a fresh crop of each clip per epoch
        for key, tokens in zip(batch["keys"], batch["tokens"].numpy()):
            clip = by_key[key]
            sem = tokens[layout.clap_len : layout.prefix_len] - sem_offset
            acoustic = layout.decode_target(tokens[layout.prefix_len :])  # [3, n_ac]
            s0, a0 = int(sem[0]), int(acoustic[0, 0])
            np.testing.assert_array_equal(sem, np.arange(s0, s0 + n_sem))
            np.testing.assert_array_equal(acoustic, np.tile(np.arange(a0, a0 + n_ac), (3, 1)))
            assert a0 * 50 == s0 * 75, f"acoustic starts at frame {a0}, semantic at {s0}: not the same instant"
            assert a0 + n_ac <= clip.acoustic.shape[1] and s0 + n_sem <= len(clip.semantic)
            start = s0 / 50
            w = tokens[: layout.clap_len] - clap_offsets
            assert len(set(w.tolist())) == 1 and int(w[0]) in nearest_clap_windows(info, len(clip.clap), start, layout.window_seconds)
            starts.add((key, s0))
    assert len(starts) > 80  # many different offsets were checked, not one crop over and over
