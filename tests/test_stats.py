"""Parquet statistics of a tokenized corpus and ``musiclm stats``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from musiclm.cli import main
from musiclm.commands.stats import run_stats, summarize
from musiclm.errors import UserError
from musiclm.shards.format import TokenInfo, TokenSample
from musiclm.shards.read import done_keys
from musiclm.shards.stats import (
    CLIP_SCHEMA,
    CODES_SCHEMA,
    unigram_entropy,
    write_shard_stats,
)
from musiclm.shards.read import done_keys
from tests.factories import Failed, fake_info_json, fake_sample, fake_shards, write_tokenizer_json

SECONDS = [4.0, 5.5, 6.0, 4.5, 8.0, 7.0, 5.0]  # 7 clips, shards of 3: the last shard holds one clip
SHARD_SIZE = 3


def level_codes(samples: list[TokenSample], stream: str) -> list[np.ndarray]:
    """All codes of one stream over ``samples``, one flat array per level."""
    if stream == "semantic":
        return [np.concatenate([s.semantic for s in samples])]
    if stream == "acoustic":
        return [np.concatenate([s.acoustic[lv] for s in samples]) for lv in range(samples[0].acoustic.shape[0])]
    return [np.concatenate([s.clap[:, lv] for s in samples]) for lv in range(samples[0].clap.shape[1])]


def entropy_nats(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, TokenInfo, list[TokenSample]]:
    """A corpus of 7 clips in 3 shards, plus two failed files (one of them with two failed segments)."""
    data = tmp_path_factory.mktemp("corpus")
    info_json = fake_info_json()
    info = TokenInfo.from_json(info_json)
    rng = np.random.default_rng(0)
    samples = [fake_sample(info, sec, rng, name=f"music/clip{i}.wav") for i, sec in enumerate(SECONDS)]
    failed = [Failed("bad0", "music/broken.mp3", "decode", "not an audio file")]
    failed += [Failed(f"bad1_000{j}", "music/long.flac", "tokenize", "too short") for j in range(2)]
    fake_shards(data, [failed[0], *samples, *failed[1:]], info_json=info_json, shard_size=SHARD_SIZE)
    return data, info, samples


def test_stats_folder_reads_as_one_clip_table_without_code_counts(corpus):
    data, _, samples = corpus
    keys = sorted(s.key for s in samples)

    table = pads.dataset(data / "stats", format="parquet").to_table()
    assert table.num_rows == len(samples)
    assert table.schema.names == CLIP_SCHEMA.names  # no stream/level/code columns from _codes/
    assert sorted(table["key"].to_pylist()) == keys

    frame = pd.read_parquet(data / "stats")
    assert len(frame) == len(samples)
    assert frame["key"].is_unique
    assert "code" not in frame.columns
    assert sorted(frame["key"]) == keys
    assert done_keys(data) >= set(keys)


def test_every_stats_file_has_the_same_schema_even_for_one_clip(corpus):
    data, _, _ = corpus
    clip_files = sorted((data / "stats").glob("shard-*.parquet"))
    code_files = sorted((data / "stats" / "_codes").glob("shard-*.parquet"))
    assert [p.name for p in clip_files] == [p.name for p in code_files] == ["shard-000000.parquet", "shard-000001.parquet", "shard-000002.parquet"]
    assert pq.read_metadata(clip_files[-1]).num_rows == 1
    for p in clip_files:
        assert pq.read_schema(p).equals(CLIP_SCHEMA)
    for p in code_files:
        assert pq.read_schema(p).equals(CODES_SCHEMA)


def test_writing_leaves_no_temporary_files(corpus):
    data, _, _ = corpus
    assert not list((data / "stats").rglob(".*"))


def test_clip_rows_describe_each_sample(corpus):
    data, info, samples = corpus
    rows = {r["key"]: r for r in pq.read_table(data / "stats").to_pylist()}
    for s in samples:
        row = rows[s.key]
        assert row["source"] == s.meta["source"]
        assert row["duration"] == s.duration
        assert row["shard"] == f"shard-{samples.index(s) // SHARD_SIZE:06d}"
        assert (row["semantic_frames"], row["acoustic_frames"], row["clap_windows"]) == (len(s.semantic), s.acoustic.shape[1], s.clap.shape[0])
        for stream in ("semantic", "acoustic", "clap"):
            per_level = level_codes([s], stream)
            bits = np.mean([entropy_nats(c) for c in per_level]) / math.log(2)
            unique = np.mean([len(np.unique(c)) for c in per_level])
            assert row[f"{stream}_entropy_bits"] == pytest.approx(bits)
            assert row[f"{stream}_unique"] == pytest.approx(unique)


def test_code_counts_are_the_nonzero_counts_of_the_samples(corpus):
    data, _, samples = corpus
    codes = pads.dataset(data / "stats" / "_codes", format="parquet").to_table().to_pandas()
    assert (codes["count"] > 0).all()
    summed = codes.groupby(["stream", "level", "code"])["count"].sum()
    for stream in ("semantic", "acoustic", "clap"):
        for lv, values in enumerate(level_codes(samples, stream)):
            code, count = np.unique(values, return_counts=True)
            got = summed.loc[(stream, lv)]
            assert got.index.tolist() == code.tolist()
            assert got.tolist() == count.tolist()


def test_summarize_matches_hand_computation(corpus):
    data, info, samples = corpus
    summary = summarize(data)

    totals = summary["totals"]
    assert totals["clips"] == len(samples)
    assert totals["files"] == len(samples)
    assert totals["shards"] == 3
    assert totals["hours"] == pytest.approx(sum(SECONDS) / 3600)

    d = summary["durations"]
    assert (d["min"], d["max"]) == (min(SECONDS), max(SECONDS))
    assert d["mean"] == pytest.approx(np.mean(SECONDS))
    assert d["median"] == pytest.approx(np.median(SECONDS))
    assert sum(d["histogram"]["counts"]) == len(samples)
    assert len(d["histogram"]["edges"]) == len(d["histogram"]["counts"]) + 1

    for stream in ("semantic", "acoustic", "clap"):
        k = info.stream(stream).codebook_size
        levels = summary["streams"][stream]["levels"]
        assert len(levels) == info.stream(stream).levels
        for lv, values in enumerate(level_codes(samples, stream)):
            code, count = np.unique(values, return_counts=True)
            h = entropy_nats(values)
            got = levels[lv]
            assert got["level"] == lv
            assert got["codebook_size"] == k
            assert got["tokens"] == len(values)
            assert got["codes_used"] == len(code)
            assert got["utilisation_pct"] == pytest.approx(100 * len(code) / k)
            assert got["entropy_nats"] == pytest.approx(h)
            assert got["entropy_bits"] == pytest.approx(h / math.log(2))
            assert got["perplexity"] == pytest.approx(math.exp(h))
            top = got["top"]
            assert len(top) == min(5, len(code))
            assert top[0]["count"] == count.max()
            assert top[0]["share"] == pytest.approx(count.max() / len(values))
            assert [t["count"] for t in top] == sorted(count, reverse=True)[: len(top)]


def test_summarize_counts_failed_files_and_says_where_they_are_listed(corpus):
    data, _, _ = corpus
    totals = summarize(data)["totals"]
    assert totals["failed_files"] == 2  # broken.mp3, and long.flac with two failed segments
    assert totals["failed_by_step"] == {"decode": 1, "tokenize": 2}
    assert totals["errors_dir"] == str(data / "errors")


def test_summarize_a_corpus_where_every_file_failed(tmp_path):
    fake_shards(tmp_path, [Failed("k", "a.wav", "decode", "unreadable")], info_json=fake_info_json(), shard_size=4)
    summary = summarize(tmp_path)
    assert summary["totals"]["clips"] == 0
    assert summary["totals"]["failed_files"] == 1
    assert summary["streams"]["semantic"]["levels"][0]["codes_used"] == 0
    assert summary["streams"]["semantic"]["levels"][0]["perplexity"] is None
    json.dumps(summary)


def test_unigram_entropy_is_the_mean_entropy_of_the_chosen_levels(corpus):
    data, info, samples = corpus
    acoustic = level_codes(samples, "acoustic")
    fine = range(info.coarse_levels, info.acoustic.levels)
    assert unigram_entropy(data, "acoustic", list(fine)) == pytest.approx(np.mean([entropy_nats(acoustic[lv]) for lv in fine]))
    assert unigram_entropy(data, "semantic", [0]) == pytest.approx(entropy_nats(level_codes(samples, "semantic")[0]))


def test_unigram_entropy_rejects_unknown_streams_and_levels(corpus):
    data, info, _ = corpus
    with pytest.raises(UserError, match="stream"):
        unigram_entropy(data, "lyrics", [0])
    with pytest.raises(UserError, match="level 8"):
        unigram_entropy(data, "acoustic", [info.acoustic.levels])


def test_run_stats_json_is_exactly_the_summary(corpus, capsys):
    data, _, _ = corpus
    run_stats(data, as_json=True)
    assert json.loads(capsys.readouterr().out) == summarize(data)


def test_stats_command_prints_json_through_the_cli(corpus, capsys):
    data, _, _ = corpus
    main(["stats", str(data), "--json"])
    assert json.loads(capsys.readouterr().out)["totals"]["clips"] == len(SECONDS)


def test_run_stats_prints_a_table_per_stream_and_level(corpus, capsys):
    data, _, _ = corpus
    run_stats(data)
    out = capsys.readouterr().out
    assert "codebook usage" in out
    assert out.count("acoustic") >= 8  # one row per acoustic level
    assert "failed files" in out and "listed in" in out


def test_plot_is_a_png(corpus, tmp_path, capsys):
    data, _, _ = corpus
    png = tmp_path / "usage.png"
    run_stats(data, plot=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (800, 1200)


def test_unwritable_plot_path_is_a_user_error(corpus, tmp_path):
    data, _, _ = corpus
    with pytest.raises(UserError, match="plot"):
        run_stats(data, plot=tmp_path / "missing" / "usage.png")
    with pytest.raises(UserError, match="plot"):
        run_stats(data, plot=tmp_path)  # a folder


def test_a_folder_that_is_not_a_corpus_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        summarize(tmp_path / "nowhere")
    with pytest.raises(UserError, match="not a tokenized corpus"):
        summarize(tmp_path)
    (tmp_path / "stats").mkdir()
    with pytest.raises(UserError, match="tokenizer.json"):
        summarize(tmp_path)  # stats but no tokenizer
    with pytest.raises(UserError):
        unigram_entropy(tmp_path, "semantic", [0])


def test_stats_command_on_a_non_corpus_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["stats", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_leftover_temporaries_are_not_read(corpus, tmp_path):
    data, _, _ = corpus
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    (copy / "stats" / ".shard-000009.parquet.tmp").write_bytes(b"half a file")
    (copy / "stats" / "_codes" / ".shard-000009.parquet.tmp").write_bytes(b"half a file")
    assert pd.read_parquet(copy / "stats").shape[0] == len(SECONDS)
    assert summarize(copy)["totals"] == {**summarize(data)["totals"], "errors_dir": str(copy / "errors")}


def test_summarize_totals_at_scale(tmp_path):
    """20k clips: one shard from write_shard_stats, ten written directly with the same schemas.

    summarize aggregates columns instead of looping over rows, so this stays a few seconds.
    """
    info_json = fake_info_json()
    write_tokenizer_json(tmp_path, info_json)
    info = TokenInfo.from_json(info_json)
    rng = np.random.default_rng(1)
    written = [fake_sample(info, 1.0, rng, name=f"w{i}.wav") for i in range(200)]
    write_shard_stats(tmp_path / "stats", "shard-000000", written, info)
    semantic_counts = np.bincount(np.concatenate([s.semantic for s in written]), minlength=info.semantic.codebook_size)
    all_durations = [np.ones(len(written))]
    n_shards, per_shard = 10, 2000
    for i in range(1, n_shards + 1):
        name = f"shard-{i:06d}"
        durations = rng.uniform(1.0, 8.0, per_shard)
        all_durations.append(durations)
        columns = {f.name: np.zeros(per_shard, f.type.to_pandas_dtype()) for f in CLIP_SCHEMA if f.type != pa.string()}
        columns.update(key=[f"{i}_{j}" for j in range(per_shard)], shard=[name] * per_shard, source=[f"f{i}_{j // 2}.wav" for j in range(per_shard)], duration=durations)
        pq.write_table(pa.table(columns, schema=CLIP_SCHEMA), tmp_path / "stats" / f"{name}.parquet")
        counts = rng.integers(0, 100, info.semantic.codebook_size)
        counts[-1] = 0  # the last code never occurs in these shards
        semantic_counts += counts
        nz = np.flatnonzero(counts)
        codes = pa.table({"stream": ["semantic"] * len(nz), "level": np.zeros(len(nz), np.int32), "code": nz.astype(np.int32), "count": counts[nz]}, schema=CODES_SCHEMA)
        pq.write_table(codes, tmp_path / "stats" / "_codes" / f"{name}.parquet")
    (tmp_path / "shards").mkdir(exist_ok=True)
    for i in range(n_shards + 1):
        (tmp_path / "shards" / f"shard-{i:06d}.tar").write_bytes(b"")  # stats count only for finished shards

    summary = summarize(tmp_path)
    durations = np.concatenate(all_durations)
    totals = summary["totals"]
    assert totals["clips"] == len(written) + n_shards * per_shard == len(pd.read_parquet(tmp_path / "stats"))
    assert totals["files"] == len(written) + n_shards * per_shard // 2
    assert totals["shards"] == n_shards + 1
    assert totals["hours"] == pytest.approx(durations.sum() / 3600)
    assert summary["durations"]["median"] == pytest.approx(np.median(durations))
    semantic = summary["streams"]["semantic"]["levels"][0]
    assert semantic["tokens"] == semantic_counts.sum()
    assert semantic["codes_used"] == np.count_nonzero(semantic_counts)
    p = semantic_counts[semantic_counts > 0] / semantic_counts.sum()
    assert semantic["entropy_nats"] == pytest.approx(-(p * np.log(p)).sum())
    acoustic_tokens = sum(s.acoustic.shape[1] for s in written)  # only the written shard has acoustic codes
    assert [lv["tokens"] for lv in summary["streams"]["acoustic"]["levels"]] == [acoustic_tokens] * info.acoustic.levels


def test_stats_of_a_shard_that_never_finished_are_not_counted(tmp_path):
    """A run killed between writing stats and renaming the tar leaves stats without a shard."""
    info_json = fake_info_json()
    info = TokenInfo.from_json(info_json)
    rng = np.random.default_rng(3)
    fake_shards(tmp_path, [fake_sample(info, 3.0, rng, name=f"c{i}.wav") for i in range(4)], info_json=info_json, shard_size=2)
    assert summarize(tmp_path)["totals"]["clips"] == 4
    (tmp_path / "shards" / "shard-000001.tar").unlink()
    totals = summarize(tmp_path)["totals"]
    assert totals["clips"] == 2 and totals["shards"] == 1
