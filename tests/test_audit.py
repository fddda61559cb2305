"""The memorization audit: copies are found with their source and offset, new music is not flagged,
the index is built once per shard and reused, the report's shapes, and generate --audit.

The corpus is the session's tokenized corpus (tiny preset), copied so that its audit/ folder is this
module's own. Printing the calibration (``pytest -s tests/test_audit.py -k calibration``) shows the
scores of copied and novel excerpts that set the thresholds.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from musiclm.audit.calibration import COPIED_QUANTILE, threshold
from musiclm.audit.index import INDEX_DIR, INDEX_FORMAT, expected_files, load_index
from musiclm.audit.shard_files import IndexParams, clap_projection, shard_arrays, write_shard
from musiclm.audit.ngrams import ngram_hashes, winnow
from musiclm.audit.search import Query, search
from musiclm.cli import main
from musiclm.pipeline.audio import read_mono
from musiclm.pipeline.synth import synth_clip
from tests.conftest import run_cli
from tests.factories import fake_info, fake_sample, torch_threads

COPIED = "artist_0/album_0/027_mix.mp3"  # 10.8 s of chords, melody, bass and drums: two segments of the tiny preset
COPY_START = 1.37  # seconds: not a multiple of the 20 ms frame, and the copy straddles the segment boundary (5.42 s)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread for the whole module


@pytest.fixture(autouse=True)
def subprocesses_on_one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the musiclm processes the CLI tests start


def copy_corpus(tokenized_dir: Path, dest: Path, drop_last_shard: bool = False) -> Path:
    """The tokenized corpus without any audit/ folder (tokenizer, shards, stats, manifest); optionally without
    its last shard, which is returned beside it in dest/held-back."""
    shutil.copytree(tokenized_dir, dest, ignore=shutil.ignore_patterns(INDEX_DIR))
    if drop_last_shard:
        last = max((dest / "shards").glob("shard-*.tar"))
        held = dest.parent / "held-back"
        held.mkdir()
        shutil.move(last, held / last.name)
        shutil.move(dest / "stats" / f"{last.stem}.parquet", held / f"{last.stem}.parquet")
    return dest


@pytest.fixture(scope="module")
def corpus(tokenized, tmp_path_factory) -> Path:
    """A copy of the tokenized session corpus, its audit index built and calibrated once."""
    from musiclm.commands.audit import audit

    data = copy_corpus(tokenized[0], tmp_path_factory.mktemp("audit") / "data")
    with torch_threads(1):
        audit([write_novel(tmp_path_factory.mktemp("warm") / "warm.wav")], data)
    return data


def write_copy(source: Path, out: Path, start: float = COPY_START, seconds: float = 6.0) -> Path:
    """``seconds`` of ``source`` from ``start``, re-encoded to MP3 (libsndfile >= 1.1 writes it)."""
    assert "MP3" in sf.available_formats(), "this libsndfile does not write MP3"
    x, sr = read_mono(source, start, seconds)
    sf.write(out, x, sr, format="MP3")
    return out


def write_novel(out: Path, kind: str = "melody", seed: int = 5005, sr: int = 44100) -> Path:
    """Music the corpus never held: the synthesiser at seeds the corpus did not use (it used 0-39)."""
    sf.write(out, synth_clip(kind, 7.0, sr, seed=seed), sr)
    return out


# ---- the behaviour -------------------------------------------------------------------------------------------------


def test_a_shifted_mp3_copy_is_flagged_with_its_source_and_offset(corpus, audio_corpus, tmp_path):
    from musiclm.commands.audit import audit

    root, _ = audio_corpus
    copy = write_copy(root / COPIED, tmp_path / "copy.mp3")
    (f,) = audit([copy], corpus)["files"]
    assert f["flagged"] and "semantic" in f["flagged_by"]
    best = f["matches"][0]
    assert best["source"] == COPIED
    assert abs(best["offset"] - COPY_START) < 0.5, best
    g0, g1 = best["generated"]
    s0, s1 = best["source_span"]
    assert abs((s0 - g0) - best["offset"]) < 1e-2 and abs((s1 - g1) - best["offset"]) < 1e-2


def test_a_threshold_lies_halfway_from_the_highest_novel_score_to_the_copies_tenth_percentile():
    """Separated scores: the threshold is the midpoint, leaving a margin on both sides (at the copied 10th
    percentile itself, a copy scoring a little lower than those calibrated would be missed)."""
    copied, novel = [0.6, 0.7, 0.8, 0.9, 1.0], [0.1, 0.2, 0.3]
    p10 = float(np.quantile(copied, COPIED_QUANTILE))  # 0.64
    t = threshold(copied, novel)
    assert (t["how"], t["novel_max"], t["copied_p10"]) == ("separated", 0.3, round(p10, 4))
    assert t["threshold"] == pytest.approx((0.3 + p10) / 2) and t["recall"] == 1.0 and t["used"]


def test_overlapping_scores_put_the_threshold_just_above_the_highest_novel_score():
    t = threshold(copied=[0.5, 0.8, 0.9, 1.0], novel=[0.2, 0.7])
    assert t["how"] == "overlapping" and 0.7 < t["threshold"] < 0.71
    assert t["recall"] == 0.75 and t["used"]  # 0.5 is missed
    assert not threshold(copied=[0.5, 0.6, 0.9], novel=[0.7])["used"]  # only a third of the copies reach it


# Seeds whose musical choices (key, tempo, progression, pattern) are none of the corpus's. Not every seed is:
# ("arpeggio", 4243) draws the key, progression and pattern of the corpus's 009_arpeggio at 140 instead of 141
# bpm, and the audit flags it (semantic 0.82 against it): rightly, it is the same piece.
@pytest.mark.parametrize("kind,seed", [("melody", 5005), ("arpeggio", 5000), ("mix", 5006), ("chord", 5003), ("drums", 5004)])
def test_music_from_outside_the_corpus_is_not_flagged(corpus, tmp_path, kind, seed):
    from musiclm.commands.audit import audit

    (f,) = audit([write_novel(tmp_path / f"{kind}.wav", kind, seed)], corpus)["files"]
    assert not f["flagged"], f


def test_calibration_separates_copies_from_new_music_and_gets_offsets_right(corpus):
    cal = json.loads((corpus / INDEX_DIR / "index.json").read_text())["calibration"]
    sem = cal["semantic"]
    print(f"\ncalibration from {cal['from']} ({cal['excerpts']} excerpts of {cal['excerpt_seconds']} s, MP3 {cal['lossy']}); offsets right {cal['offsets_right']:.0%}")
    for s in ("semantic", "clap"):
        c = cal[s]
        print(f"{s:8s} threshold {c['threshold']:.4f} ({c['how']}, used {c['used']}, recall {c['recall']:.0%}); novel max {c['novel_max']:.4f}, copied p10 {c['copied_p10']:.4f}")
        print(f"  copied: {' '.join(f'{x:.2f}' for x in c['copied'])}")
        print(f"  novel:  {' '.join(f'{x:.2f}' for x in c['novel'])}")
    assert cal["from"] == "audio" and cal["excerpts"] >= 32
    assert sem["used"] and sem["novel_max"] < sem["threshold"] and sem["recall"] >= 0.75
    assert np.median(sem["copied"]) > 2 * np.median(sem["novel"])
    assert cal["offsets_right"] >= 0.8


def test_the_index_is_reused_and_a_new_shard_adds_its_files_only(tokenized, tmp_path):
    from musiclm.commands.audit import audit

    data = copy_corpus(tokenized[0], tmp_path / "data", drop_last_shard=True)
    novel = write_novel(tmp_path / "n.wav")
    shards = len(list((data / "shards").glob("*.tar")))

    first = audit([novel], data)["index"]
    assert (first["built"], first["reused"]) == (shards, 0)
    files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (data / INDEX_DIR).glob("shard-*")}
    assert len(files) == 3 * shards

    again = audit([novel], data)["index"]
    assert (again["built"], again["reused"]) == (0, shards)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (data / INDEX_DIR).glob("shard-*")} == files

    held = tmp_path / "held-back"  # the shard a resumed tokenize finishes: stats first, then the tar
    for p in held.glob("*.parquet"):
        shutil.move(p, data / "stats" / p.name)
    (tar,) = held.glob("*.tar")
    shutil.move(tar, data / "shards" / tar.name)
    grown = audit([novel], data)
    assert (grown["index"]["built"], grown["index"]["reused"]) == (1, shards)
    now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (data / INDEX_DIR).glob("shard-*")}
    assert {k: v for k, v in now.items() if k in files} == files
    assert sorted(set(now) - set(files)) == sorted(f"{tar.stem}.{s}" for s in ("clap.npy", "clips.parquet", "ngrams.npy"))
    record = json.loads((data / INDEX_DIR / "index.json").read_text())
    assert record["calibration"]["clips"] == grown["index"]["clips"]  # calibrated again on the grown corpus
    on_disk = {p.relative_to(data).as_posix() for p in (data / INDEX_DIR).iterdir() if not p.name.startswith(".")}
    assert set(expected_files(data)) == on_disk  # what musiclm verify is told to expect there

    # verify checks the index is whole; audit makes a damaged index file again
    from musiclm.commands.verify import verify_folder

    assert verify_folder(data)[2] == []
    cut = data / INDEX_DIR / f"{tar.stem}.ngrams.npy"
    cut.write_bytes(cut.read_bytes()[:-8])
    assert [(f.path, f.status) for f in verify_folder(data)[2]] == [(cut.relative_to(data).as_posix(), "damaged")]
    mended = audit([novel], data)
    assert (mended["index"]["built"], mended["index"]["reused"]) == (1, shards)
    assert verify_folder(data)[2] == []


def test_cli_json_report_and_exit_codes(corpus, audio_corpus, tmp_path):
    root, _ = audio_corpus
    copy = write_copy(root / COPIED, tmp_path / "copy.mp3")
    novel = write_novel(tmp_path / "novel.wav")
    proc = run_cli("audit", copy, novel, "--data", corpus, "--json", "--top", "2", "--device", "cpu")
    assert proc.returncode == 1, proc.stderr  # like grep: 1 when something is flagged
    report = json.loads(proc.stdout)
    assert [f["file"] for f in report["files"]] == [str(copy), str(novel)]
    assert [f["flagged"] for f in report["files"]] == [True, False]
    for f in report["files"]:
        assert isinstance(f["flagged"], bool) and 1 <= len(f["matches"]) <= 2
        for m in f["matches"]:
            assert set(m) >= {"source", "clip", "offset", "generated", "source_span", "semantic", "clap", "flagged", "flagged_by"}
            assert isinstance(m["flagged"], bool) and m["flagged"] == bool(m["flagged_by"])
    assert set(report["calibration"]["semantic"]) >= {"threshold", "used", "recall", "novel_max", "copied_p10"}
    assert report["index"]["reused"] == report["index"]["shards"]

    proc = run_cli("audit", novel, "--data", corpus)
    assert proc.returncode == 0, proc.stderr
    assert "not flagged" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "none of 1 files flagged"


def one_line_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(corpus, tokenized, tmp_path, capsys):
    novel = write_novel(tmp_path / "n.wav")
    assert "no such file" in one_line_error(capsys, "audit", tmp_path / "missing.wav", "--data", corpus)
    (tmp_path / "not-audio.wav").write_text("hello")
    assert "cannot audit" in one_line_error(capsys, "audit", tmp_path / "not-audio.wav", "--data", corpus)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert "not a tokenized corpus" in one_line_error(capsys, "audit", novel, "--data", plain)
    assert "does not exist" in one_line_error(capsys, "audit", novel, "--data", tmp_path / "nowhere")
    no_shards = tmp_path / "no-shards"
    shutil.copytree(tokenized[0] / "tokenizer", no_shards / "tokenizer")
    assert "no finished shards" in one_line_error(capsys, "audit", novel, "--data", no_shards)
    assert not (plain / INDEX_DIR).exists() and not (no_shards / INDEX_DIR).exists()


def test_generate_audit_reports_on_the_files_it_wrote(trained_runs, corpus, tmp_path):
    out = tmp_path / "gen.wav"
    proc = run_cli("generate", "a calm piano", "--model", trained_runs, "--seconds", "1.5", "--out", out, "--num-samples", "1", "--device", "cpu", "--audit", corpus)
    assert proc.returncode == 0, proc.stderr
    assert f"{out} (" in proc.stdout and "audit against" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert "real-time factor" in last and ("audit: nothing flagged" in last or "FLAGGED" in last)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert [f["file"] for f in sidecar["audit"]["files"]] == [str(out)]
    assert isinstance(sidecar["audit"]["files"][0]["flagged"], bool)

    proc = run_cli("generate", "x", "--model", trained_runs, "--seconds", "1.5", "--out", tmp_path / "no.wav", "--audit", tmp_path)
    assert proc.returncode == 2 and "--audit" in proc.stderr and not (tmp_path / "no.wav").exists()


# ---- the parts, on synthetic tokens (no backbone) ------------------------------------------------------------------


def test_run_ngrams_do_not_depend_on_how_long_each_run_is():
    a = np.array([5, 5, 5, 9, 9, 2, 7, 7, 7, 7, 1])
    b = np.array([5, 9, 9, 9, 2, 2, 7, 1, 1])
    ha, fa = ngram_hashes(a, 3)
    hb, _ = ngram_hashes(b, 3)
    assert np.array_equal(ha, hb) and len(ha) == 3
    assert fa.tolist() == [0, 3, 5]  # an n-gram sits at the frame where its first run starts
    h, _ = ngram_hashes(np.random.default_rng(0).integers(0, 50, 400), 3)
    _, kept = winnow(h, np.arange(len(h)), 4)
    assert kept[0] < 4 and np.all(np.diff(kept) <= 4) and len(h) - kept[-1] <= 4  # one in every 4 consecutive n-grams
    assert 0.3 < len(kept) / len(h) < 0.5  # about 2 / (4 + 1)


def synthetic_index(tmp_path: Path, clips: int = 30, seconds: float = 20.0):
    """An index of one shard of ``clips`` synthetic clips (no tar: tests read the clips from memory)."""
    info = fake_info(sem_k=256)
    rng = np.random.default_rng(1)
    samples = [fake_sample(info, seconds, rng, name=f"song{i}.wav") for i in range(clips)]
    for s in samples:  # run lengths that vary, like MERT's, instead of one per clip
        s.semantic = np.repeat(rng.integers(0, 256, len(s.semantic)), rng.integers(1, 5, len(s.semantic)))[: len(s.semantic)].astype(np.uint16)
    folder = tmp_path / INDEX_DIR
    folder.mkdir()
    params = IndexParams()
    proj = clap_projection(info.clap_embed_dim, params)
    entry = write_shard(folder, "shard-000000", shard_arrays(samples, params, proj))
    record = {"format": INDEX_FORMAT, "params": asdict(params), "tokenizer": info.fingerprint, "shards": {"shard-000000": entry}}
    return load_index(tmp_path, info, record, proj, {}), samples


def test_votes_find_the_source_and_offset_through_changed_tokens(tmp_path, monkeypatch):
    index, samples = synthetic_index(tmp_path)
    monkeypatch.setattr(index, "read_clips", lambda gids: {int(g): samples[int(g)] for g in gids})
    rng = np.random.default_rng(2)
    src = samples[7]
    q = src.semantic[150:550].astype(np.int64).copy()  # 8 s from 3 s in
    flip = rng.random(len(q)) < 0.15
    q[flip] = rng.integers(0, 256, flip.sum())
    (best, *_) = search(index, Query(q[None], np.zeros(1), np.asarray(src.clap_emb[:1], np.float32), 8.0))
    assert best.source == "song7.wav" and abs(best.offset - 3.0) < 0.021
    assert 0.8 <= best.semantic <= 0.9  # 85% of the tokens were kept
    other = rng.integers(0, 256, 400)
    found = search(index, Query(other[None], np.zeros(1), np.zeros((0, 32), np.float32), 8.0))
    assert all(m.semantic < 0.1 for m in found)
