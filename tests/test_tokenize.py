"""``musiclm tokenize``: a folder of audio becomes integer-token shards, once, without losing anything."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import webdataset as wds

from musiclm.pipeline.audio import load_for_rates, plan_segments, probe
from musiclm.shards.format import TokenInfo, TokenSample, list_shards, sample_key
from tests.conftest import ROOT, make_test_corpus, run_cli
from tests.factories import torch_threads
from tests.ray_head import ray_head

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # tests/conftest.py: each starts Ray (tokenize runs), one at a time

# Batching changes float reductions and now and then a code: the share of codes of a clip that
# agree between batched and batch-1 calls, at least (README; measured by benchmarks/bench_agreement.py)
BATCH1_AGREEMENT = 0.99


def read_samples(out: Path) -> list[TokenSample]:
    """Every sample of every finished shard, read with plain webdataset."""
    urls = [str(p) for p in list_shards(out)]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return [TokenSample.from_wds(s) for s in ds]


def expected_keys(root: Path, good: list[str], segment_seconds: float) -> set[str]:
    keys = set()
    for rel in good:
        n = len(plan_segments(probe(root / rel).duration, segment_seconds))
        keys.update(sample_key(rel, i) for i in range(n))
    return keys


def test_every_good_file_is_tokenized_exactly_once(tokenized, audio_corpus):
    out, proc = tokenized
    root, files = audio_corpus
    info = TokenInfo.load(out)
    samples = read_samples(out)
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys)), "a clip was written twice"
    seg = json.loads((out / "tokenizer" / "tokenizer.json").read_text())["config"]["audio"]["segment_seconds"]
    assert set(keys) == expected_keys(root, files["good"], seg)
    for s in samples:
        assert s.semantic.dtype == np.uint16 and s.acoustic.dtype == np.uint16 and s.clap.dtype == np.uint16
        assert s.acoustic.shape[0] == info.acoustic.levels
        assert s.clap.shape[1] == info.clap.levels and s.clap_emb.shape == (len(s.clap), info.clap_embed_dim)
        # every stream covers the clip's duration at its frame rate (to a frame or two)
        assert abs(len(s.semantic) - s.duration * info.semantic.frame_rate) <= 2
        assert abs(s.acoustic.shape[1] - s.duration * info.acoustic.frame_rate) <= 2
        assert s.semantic.max() < info.semantic.codebook_size and s.acoustic.max() < info.acoustic.codebook_size
        assert s.meta["source"] in files["good"]
    # tokens vary: the tiny backbones and fitted quantizers are not degenerate
    assert len(np.unique(np.concatenate([s.semantic for s in samples]))) > info.semantic.codebook_size // 2
    for level in range(info.acoustic.levels):
        assert len(np.unique(np.concatenate([s.acoustic[level] for s in samples]))) > 4


def test_bad_files_are_listed_with_reasons_and_the_run_succeeds(tokenized, audio_corpus):
    out, proc = tokenized
    root, files = audio_corpus
    errors = pd.read_parquet(out / "errors")
    assert sorted(errors["source"]) == files["bad"]
    reasons = dict(zip(errors["source"], errors["reason"]))
    assert "empty" in reasons["bad/empty.wav"]
    assert "truncated" in reasons["bad/truncated_data.wav"]
    assert "too short" in reasons["bad/too_short.wav"]
    assert all(r for r in errors["reason"])
    assert f"{len(files['bad'])} files or segments failed" in proc.stderr
    assert str(out / "errors") in proc.stderr


def planned_batches(out: Path) -> dict[int, list[str]]:
    """The files of each planned batch, in order, as plan.parquet keeps them."""
    plan = pd.read_parquet(out / "plan.parquet")
    plan = plan[plan["batch"] >= 0]
    return {int(b): list(group["rel"]) for b, group in plan.groupby("batch", sort=True)}


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.mean(a == b))


def test_shard_tokens_equal_tokenizing_the_planned_batch_directly(tokenized, audio_corpus):
    """Token values round-trip: what the shard holds is what the saved tokenizer computes for the
    same batch plan, exactly; clip by clip (batch 1) at least at the measured agreement.

    Float reductions depend on the thread count, so the check runs with the actor's threads.
    """
    from musiclm.pipeline.ray_runtime import actor_threads
    from musiclm.pipeline.tokenizer import Tokenizer

    out, _ = tokenized
    root, _ = audio_corpus
    tok = Tokenizer.load(out / "tokenizer")
    samples = {s.key: s for s in read_samples(out)}
    seg = tok.cfg.audio.segment_seconds
    batches = planned_batches(out)
    assert len(batches) >= 3 and max(len(files) for files in batches.values()) >= 3, "the tiny plan batches several files"
    same = {"semantic": [], "acoustic": [], "clap": []}
    with torch_threads(actor_threads(os.cpu_count(), 1, gpu=False)):
        for number in list(batches)[:2]:
            keys, clips = [], []
            for rel in batches[number]:
                for i, (start, seconds) in enumerate(plan_segments(probe(root / rel).duration, seg)):
                    keys.append(sample_key(rel, i))
                    clips.append(load_for_rates(root / rel, start, seconds, tok.sample_rates))
            for key, clip, got in zip(keys, clips, tok.tokenize_batch(clips)):
                s = samples[key]
                np.testing.assert_array_equal(got["semantic"], s.semantic)
                np.testing.assert_array_equal(got["acoustic"], s.acoustic)
                np.testing.assert_array_equal(got["clap"], s.clap)
                alone = tok.tokenize(clip)
                for name in same:
                    same[name].append(agreement(alone[name], getattr(s, name)))
    for name, values in same.items():
        assert np.mean(values) >= BATCH1_AGREEMENT, f"{name}: batch-1 tokens agree {np.mean(values):.4f} with batched ones"


def test_tokenizer_folder_holds_backbones_and_checksummed_quantizers(tokenized):
    from musiclm.digest import sha256_file
    from musiclm.integrity import FileRecord, read_records
    from musiclm.shards.tokenizer_folder import QUANTIZER_FILES, RECORDS_FILE

    out, _ = tokenized
    record = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    records = read_records(out / "tokenizer" / RECORDS_FILE)
    for fname in QUANTIZER_FILES.values():
        assert record["quantizers"][fname] == sha256_file(out / "tokenizer" / fname)
        assert records[fname] == FileRecord.of(out / "tokenizer" / fname)
    for name, cls in (("clap", "ClapModel"), ("semantic", "HubertModel"), ("codec", "EncodecModel")):
        assert record["backbones"][name]["path"] == name and record["backbones"][name]["class"] == cls
        assert (out / "tokenizer" / name / "config.json").is_file()
    assert record["streams"]["acoustic"]["levels"] == 8
    assert record["config"]["clap"]["model"] == "random"


def test_rerun_skips_everything_done(tokenized, audio_corpus, tmp_path):
    out, _ = tokenized
    root, files = audio_corpus
    before = {p.name: p.stat().st_mtime_ns for p in list_shards(out)}
    proc = run_cli("tokenize", root, "--out", out, "--preset", "tiny", "--shard-size", "6")
    assert proc.returncode == 0, proc.stderr
    assert f"{len(files['good']) + len(files['bad'])} of" in proc.stderr and "already done" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in list_shards(out)} == before


def test_shards_read_back_with_ray_data(tokenized):
    import ray

    out, _ = tokenized
    # "local": a fresh instance even when another test (or the user) left a cluster on this machine
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows = ray.data.read_webdataset([str(p) for p in list_shards(out)], decoder=None).take_all()
    finally:
        ray.shutdown()
    assert len(rows) == len(read_samples(out))
    row = rows[0]
    sem = row["semantic.npy"]
    sem = sem if isinstance(sem, np.ndarray) else np.load(__import__("io").BytesIO(sem))
    assert sem.dtype == np.uint16 and sem.ndim == 1


def test_stats_read_as_one_table_with_pyarrow_and_pandas(tokenized):
    out, _ = tokenized
    n = len(read_samples(out))
    table = pads.dataset(out / "stats", format="parquet").to_table()
    frame = pd.read_parquet(out / "stats")
    assert table.num_rows == n == len(frame)
    assert frame["key"].is_unique
    assert {"duration", "semantic_frames", "semantic_entropy_bits"} <= set(frame.columns)


def test_stats_command_summarises_the_corpus(tokenized, audio_corpus):
    out, _ = tokenized
    root, files = audio_corpus
    proc = run_cli("stats", out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["totals"]["failed_files"] == len(files["bad"])
    assert summary["totals"]["files"] == len(files["good"])
    assert summary["streams"]["semantic"]["levels"][0]["codes_used"] > 1


def test_a_second_corpus_reuses_the_tokenizer_and_tokens_mean_the_same(tokenized, audio_corpus, tmp_path):
    """A validation corpus tokenized with --tokenizer gets the tokens the first corpus would give it."""
    out, _ = tokenized
    root, _ = audio_corpus
    val = tmp_path / "val"
    val.mkdir()
    names = [p.name for p in sorted(root.glob("*.wav"))[:3]]
    for name in names:
        (val / name).write_bytes((root / name).read_bytes())
    out2 = tmp_path / "valtok"
    proc = run_cli("tokenize", val, "--out", out2, "--tokenizer", out / "tokenizer")
    assert proc.returncode == 0, proc.stderr
    assert TokenInfo.load(out2).fingerprint == TokenInfo.load(out).fingerprint
    # the same files at the same relative paths: the same clips (keys and segments) as in the first corpus
    expected = {s.key: s for s in read_samples(out) if s.meta["source"] in names}
    got = read_samples(out2)
    assert len(expected) >= len(names) == 3
    assert sorted(s.key for s in got) == sorted(expected), "the second corpus yields every segment of its files, once"
    # batched with other files than in the first corpus: equal at the measured batch agreement
    for name in ("semantic", "acoustic", "clap"):
        same = np.mean([agreement(getattr(expected[s.key], name), getattr(s, name)) for s in got])
        assert same >= BATCH1_AGREEMENT, f"{name}: {same:.4f}"


def test_tokenizer_of_another_config_is_refused(tokenized, audio_corpus, tmp_path):
    out, _ = tokenized
    root, _ = audio_corpus
    other = tmp_path / "other" / "tokenizer"
    other.mkdir(parents=True)
    record = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    record["fingerprint"] = "0123456789abcdef"
    (other / "tokenizer.json").write_text(json.dumps(record))
    proc = run_cli("tokenize", root, "--out", out, "--tokenizer", other)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "use a new --out" in proc.stderr
    proc = run_cli("tokenize", root, "--out", out, "--preset", "small")
    assert proc.returncode == 2 and "another tokenize config" in proc.stderr
    # precision changes what tokens mean: another one into the same folder is refused too
    bf16 = tmp_path / "bf16.toml"
    bf16.write_text('base = "tiny"\n[tokenize]\nprecision = "bf16"\n')
    proc = run_cli("tokenize", root, "--out", out, "--config", bf16)
    assert proc.returncode == 2 and "another tokenize config" in proc.stderr


def _shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in list_shards(out)}


def _start(args: list, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "musiclm", *map(str, args)], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, "the run ended before the moment the test waits for"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.2)


def test_killed_run_resumes_without_loss_or_duplication(tokenized, tmp_path):
    out0, _ = tokenized
    root = tmp_path / "corpus"
    files = make_test_corpus(root, n_files=24, seed=7)
    out = tmp_path / "tokens"
    # a batch per file: many small batches keep the first run going while the test acts on it
    args = ["tokenize", root, "--out", out, "--tokenizer", out0 / "tokenizer", "--shard-size", "2", "--batch-seconds", "1"]

    # 1. kill -9 once a few shards are finished
    first = _start(args, tmp_path / "run1.log")
    _wait_for(lambda: len(list_shards(out)) >= 2, first)
    # while it runs, a second run on the same folder is refused
    second = run_cli(*args)
    assert second.returncode == 2 and "another musiclm tokenize is writing to" in second.stderr
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    finished = _shard_digests(out)
    assert finished

    # 2. kill -9 the resumed run at another moment: right after it starts
    again = _start(args, tmp_path / "run2.log")
    time.sleep(4)
    os.kill(again.pid, signal.SIGKILL)
    again.wait()

    # 3. a last run completes the job
    last = run_cli(*args)
    assert last.returncode == 0, last.stderr

    for p in list_shards(out):
        with tarfile.open(p) as tf:  # every shard is a whole, valid tar
            assert tf.getmembers()
    now = _shard_digests(out)
    assert all(now[name] == digest for name, digest in finished.items()), "a finished shard was redone"
    samples = read_samples(out)
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys)), "duplicated clips after resume"
    seg = json.loads((out / "tokenizer" / "tokenizer.json").read_text())["config"]["audio"]["segment_seconds"]
    assert set(keys) == expected_keys(root, files["good"], seg), "clips lost after resume"
    errors = pd.read_parquet(out / "errors")
    assert sorted(errors["source"]) == files["bad"], "failed files lost or listed twice"
    assert not list(out.glob("**/.*.tmp"))

    # the resumed runs ran the batches of the first run's plan: tokens equal an uninterrupted run's, exactly
    whole = tmp_path / "whole"
    proc = run_cli(*args[:3], whole, *args[4:])
    assert proc.returncode == 0, proc.stderr
    uninterrupted = {s.key: s for s in read_samples(whole)}
    for s in samples:
        for name in ("semantic", "acoustic", "clap", "clap_emb"):
            np.testing.assert_array_equal(getattr(s, name), getattr(uninterrupted[s.key], name))


def test_joins_an_existing_ray_cluster_with_address(tokenized, tmp_path):
    """--address joins a cluster started with `ray start --head` (the output folder is shared: one machine)."""
    out0, _ = tokenized
    root = tmp_path / "corpus"
    files = make_test_corpus(root, n_files=3, seed=11, bad=False)
    out = tmp_path / "tokens"
    with ray_head(num_cpus=2) as address:
        proc = run_cli("tokenize", root, "--out", out, "--tokenizer", out0 / "tokenizer", "--address", address)
        assert proc.returncode == 0, proc.stderr
    seg = json.loads((out / "tokenizer" / "tokenizer.json").read_text())["config"]["audio"]["segment_seconds"]
    assert {s.key for s in read_samples(out)} == expected_keys(root, files["good"], seg)

