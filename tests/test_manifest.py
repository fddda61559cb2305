"""The corpus manifest: every file ``musiclm tokenize`` read, with its size, content hash and duration, the
licence files of the corpus, the command, and a hash of it all that names the corpus wherever it travels."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from musiclm.errors import UserError
from musiclm.pipeline.audio import probe
from musiclm.shards.manifest import (
    FileFacts,
    carry_manifest,
    check_manifest,
    check_paths_mode,
    find_licences,
    read_file_table,
    read_manifest,
    write_manifest,
)
from musiclm.version import __version__
from tests.conftest import make_test_corpus


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def quiet():
    from rich.console import Console

    return Console(file=io.StringIO())


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Three "audio" files (bytes only: the manifest does not decode) and licence files in several places."""
    root = tmp_path / "corpus"
    (root / "album" / "disc 1").mkdir(parents=True)
    (root / "a.wav").write_bytes(b"RIFF" + bytes(range(200)))
    (root / "album" / "disc 1" / "b.flac").write_bytes(b"fLaC" * 1000)
    (root / "album" / "c.mp3").write_bytes(b"ID3" * 7)
    (root / "LICENSE").write_text("\n\n  Creative Commons Attribution 4.0 International  \nfull text\n")
    (root / "album" / "COPYING.txt").write_text("GNU GENERAL PUBLIC LICENSE\n")
    (root / "album" / "c.mp3.license").write_text("SPDX-License-Identifier: CC0-1.0\n")
    (root / "album" / "notes.txt").write_text("not a licence")
    (root / ".git").mkdir()
    (root / ".git" / "LICENSE").write_text("hidden folders are skipped, as the audio listing skips them")
    return root


def facts_of(corpus: Path) -> dict[str, FileFacts]:
    return {
        "a.wav": FileFacts(None, None, 3.5, ""),  # digests unknown: the manifest computes them
        "album/disc 1/b.flac": FileFacts(4000, sha(corpus / "album" / "disc 1" / "b.flac"), 12.0, ""),
        "album/c.mp3": FileFacts(None, None, 0.5, "too short: 0.50 s (minimum 1 s)"),
    }


# ---- the manifest itself (no Ray) --------------------------------------------------------------------------------------


def test_manifest_lists_files_with_sizes_hashes_durations_and_licence_files(corpus, tmp_path):
    out = tmp_path / "tokens"
    out.mkdir()
    summary = write_manifest(out, corpus, facts_of(corpus), command=["musiclm", "tokenize", str(corpus), "--out", str(out)], console=quiet())
    table = read_file_table(out).to_pylist()
    assert [r["path"] for r in table] == ["a.wav", "album/c.mp3", "album/disc 1/b.flac"]
    for r in table:
        assert r["sha256"] == sha(corpus / r["path"]) and r["bytes"] == (corpus / r["path"]).stat().st_size
    assert {r["path"]: (r["seconds"], r["error"]) for r in table}["album/c.mp3"] == (0.5, "too short: 0.50 s (minimum 1 s)")
    assert [(lic["path"], lic["first_line"]) for lic in summary["licences"]] == [
        ("LICENSE", "Creative Commons Attribution 4.0 International"),
        ("album/COPYING.txt", "GNU GENERAL PUBLIC LICENSE"),
        ("album/c.mp3.license", "SPDX-License-Identifier: CC0-1.0"),
    ]
    assert all(lic["sha256"] == sha(corpus / lic["path"]) for lic in summary["licences"])
    assert summary == read_manifest(out)
    assert summary["musiclm_version"] == __version__ and summary["command"][:2] == ["musiclm", "tokenize"]
    assert (summary["files"], summary["failed"], summary["seconds"]) == (3, 1, 15.5)  # a refused file's seconds do not count
    assert summary["bytes"] == sum(r["bytes"] for r in table) and summary["corpus"] == str(corpus.resolve())
    assert summary["formats"] == {".flac": 1, ".mp3": 1, ".wav": 1}
    assert check_manifest(out) == summary["manifest_sha256"]


def test_hashed_paths_name_no_file_and_no_folder(corpus, tmp_path):
    out = tmp_path / "private-out"
    out.mkdir()
    facts = facts_of(corpus)
    facts["album/c.mp3"] = facts["album/c.mp3"]._replace(error=f"cannot decode: {corpus.resolve()}/album/c.mp3 is odd")
    summary = write_manifest(out, corpus, facts, paths="hashed", command=["musiclm", "tokenize", str(corpus), f"--out={out}", "--preset", "tiny"], console=quiet())
    written = (out / "manifest.json").read_bytes() + (out / "manifest.parquet").read_bytes()
    for secret in (b"disc 1", b"b.flac", b"c.mp3", b"album", b"COPYING", b"private-out", str(tmp_path).encode()):
        assert secret not in written, secret
    keys = read_file_table(out).column("path").to_pylist()
    assert sorted(keys) == keys == sorted(hashlib.sha256(r.encode()).hexdigest() for r in facts)
    assert summary["command"] == ["musiclm", "tokenize", "<path>", "--out=<path>", "--preset", "tiny"]
    assert summary["corpus"] is None and summary["paths"] == "hashed"
    # whoever holds the corpus can still check a file against it
    assert hashlib.sha256(b"album/c.mp3").hexdigest() in keys
    assert check_manifest(out) == summary["manifest_sha256"]


def test_manifest_hash_covers_the_corpus_not_the_run(corpus, tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    facts = facts_of(corpus)
    h1 = write_manifest(a, corpus, facts, command=["x"], console=quiet())["manifest_sha256"]
    shuffled = dict(reversed(list(facts.items())))
    h2 = write_manifest(b, corpus, shuffled, command=["another", "command"], console=quiet())["manifest_sha256"]
    assert h1 == h2, "order, command and time are not content"
    (corpus / "album" / "c.mp3").write_bytes(b"ID3 changed")
    assert write_manifest(c, corpus, facts, command=["x"], console=quiet())["manifest_sha256"] != h1
    (corpus / "album" / "c.mp3").write_bytes(b"ID3" * 7)
    assert write_manifest(c, corpus, facts, command=["x"], console=quiet())["manifest_sha256"] == h1
    licence = (corpus / "LICENSE").read_text()
    (corpus / "LICENSE").write_text("All rights reserved\n")
    assert write_manifest(c, corpus, facts, command=["x"], console=quiet())["manifest_sha256"] != h1, "a licence is content"
    (corpus / "LICENSE").write_text(licence)
    assert write_manifest(c, corpus, facts, paths="hashed", console=quiet())["manifest_sha256"] != h1


def test_a_changed_table_fails_the_check(corpus, tmp_path):
    write_manifest(tmp_path, corpus, facts_of(corpus), console=quiet())
    t = pq.read_table(tmp_path / "manifest.parquet")
    shas = t.column("sha256").to_pylist()
    shas[0] = "0" * 64
    pq.write_table(t.set_column(t.schema.get_field_index("sha256"), "sha256", pa.array(shas)), tmp_path / "manifest.parquet")
    with pytest.raises(UserError, match="does not match its table"):
        check_manifest(tmp_path)


def test_a_file_whose_header_promised_more_than_decodes_says_so_without_changing_the_hash(corpus, tmp_path):
    """header_seconds: what the header promised, for a file tokenized with fewer seconds (pipeline.audio.probe)."""
    plain, marked = tmp_path / "plain", tmp_path / "marked"
    plain.mkdir(), marked.mkdir()
    facts = facts_of(corpus)
    before = write_manifest(plain, corpus, facts, console=quiet())
    facts["album/disc 1/b.flac"] = facts["album/disc 1/b.flac"]._replace(header_seconds=12.5)
    after = write_manifest(marked, corpus, facts, console=quiet())
    rows = {r["path"]: r for r in read_file_table(marked).to_pylist()}
    assert (rows["album/disc 1/b.flac"]["seconds"], rows["album/disc 1/b.flac"]["header_seconds"]) == (12.0, 12.5)
    assert rows["a.wav"]["header_seconds"] is None and rows["album/c.mp3"]["header_seconds"] is None
    assert (before["header_overstated"], after["header_overstated"]) == (0, 1)
    assert after["manifest_sha256"] == before["manifest_sha256"] == check_manifest(marked), "the hash covers what the corpus is"


def test_a_table_written_before_header_seconds_reads_with_it_empty(corpus, tmp_path):
    summary = write_manifest(tmp_path, corpus, facts_of(corpus), console=quiet())
    pq.write_table(pq.read_table(tmp_path / "manifest.parquet").drop_columns(["header_seconds"]), tmp_path / "manifest.parquet")
    table = read_file_table(tmp_path)
    assert table.column_names == ["path", "bytes", "sha256", "seconds", "error", "header_seconds"]
    assert table.column("header_seconds").to_pylist() == [None] * 3
    assert check_manifest(tmp_path) == summary["manifest_sha256"]


def test_licence_files_are_found_by_name_only(corpus):
    names = [lic["path"] for lic in find_licences(corpus)]
    assert names == ["LICENSE", "album/COPYING.txt", "album/c.mp3.license"]


def test_carry_manifest_copies_the_summary_and_drops_a_stale_one(corpus, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir(), run.mkdir()
    summary = write_manifest(data, corpus, facts_of(corpus), console=quiet())
    carry_manifest(data, run)
    assert read_manifest(run) == summary
    assert not (run / "manifest.parquet").exists(), "the summary travels; the file table stays with the data"
    carry_manifest(tmp_path / "old-data-without-manifest", run)
    assert read_manifest(run) is None


def test_paths_setting_is_checked_in_one_line(tmp_path):
    assert check_paths_mode("hashed") == "hashed"
    with pytest.raises(UserError, match="--manifest-paths must be 'names' or 'hashed'"):
        check_paths_mode("secret")
    from musiclm.pipeline.tokenize_job import run_tokenize

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.wav").write_bytes(b"")
    with pytest.raises(UserError, match="--manifest-paths"):
        run_tokenize(tmp_path / "c", tmp_path / "out", None, tokenizer_dir=tmp_path, manifest_paths="secret")
    assert not (tmp_path / "out").exists(), "refused before anything is written"


def test_the_command_passes_the_paths_setting_on(tmp_path, capsys):
    from musiclm.cli import main

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.wav").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        main(["tokenize", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "--tokenizer", str(tmp_path), "--manifest-paths", "secret"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and "--manifest-paths must be 'names' or 'hashed'" in err[0]


# ---- through musiclm tokenize (Ray) --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tokenize_writes_the_manifest_of_the_corpus(tokenized, audio_corpus):
    out, proc = tokenized
    root, files = audio_corpus
    summary = read_manifest(out)
    rows = {r["path"]: r for r in read_file_table(out).to_pylist()}
    assert sorted(rows) == sorted(files["good"] + files["bad"])
    for rel in files["good"]:
        assert rows[rel]["sha256"] == sha(root / rel) and rows[rel]["bytes"] == (root / rel).stat().st_size
        assert rows[rel]["seconds"] == pytest.approx(probe(root / rel).duration) and rows[rel]["error"] == ""
    assert all(rows[rel]["error"] for rel in files["bad"])
    assert summary["failed"] == len(files["bad"]) and summary["licences"] == []
    assert summary["command"][:3] == ["musiclm", "tokenize", str(root)] and summary["musiclm_version"] == __version__
    assert check_manifest(out) == summary["manifest_sha256"]
    assert f"sha256 {summary['manifest_sha256'][:12]}" in proc.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_a_resumed_tokenize_keeps_the_manifest_right(tokenized, tmp_path, monkeypatch):
    """Files added since are included, files done before are kept (even once gone from the corpus), and the
    driver reads no file again: the probe tasks hashed each file once, and the plan kept it."""
    from musiclm.shards import manifest
    from musiclm.pipeline.tokenize_job import run_tokenize

    hashed_by_driver: list[str] = []
    real_digest = manifest.file_digest
    monkeypatch.setattr(manifest, "file_digest", lambda path: hashed_by_driver.append(Path(path).name) or real_digest(path))

    tok, _ = tokenized
    root = tmp_path / "corpus"
    first = make_test_corpus(root, n_files=3, seed=11, bad=False)["good"]
    (root / "LICENSE.md").write_text("# CC-BY-4.0\n")
    out = tmp_path / "out"
    run_tokenize(root, out, None, tokenizer_dir=tok / "tokenizer", console=quiet())
    assert sorted(r["path"] for r in read_file_table(out).to_pylist()) == first

    extra = tmp_path / "extra"
    made = make_test_corpus(extra, n_files=2, seed=12, bad=False)["good"]
    added = [f"new/{rel}" for rel in made]
    for rel in made:
        (root / "new" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "new" / rel).write_bytes((extra / rel).read_bytes())
    gone = first[0]
    gone_sha = sha(root / gone)
    (root / gone).unlink()
    summary = run_tokenize(root, out, None, tokenizer_dir=tok / "tokenizer", manifest_paths="names", console=quiet())
    assert summary.clips > 0, "the added files were tokenized"
    rows = {r["path"]: r for r in read_file_table(out).to_pylist()}
    assert sorted(rows) == sorted(first + added)
    assert rows[gone]["sha256"] == gone_sha, "a file done before keeps its record after it left the corpus"
    for rel in added + first[1:]:
        assert rows[rel]["sha256"] == sha(root / rel)
    assert [lic["path"] for lic in read_manifest(out)["licences"]] == ["LICENSE.md"]
    assert hashed_by_driver == ["LICENSE.md", "LICENSE.md"], "only licence files are hashed on the driver"

    # a folder tokenized before plans kept digests: the manifest hashes what the plan lacks
    plan = pq.read_table(out / "plan.parquet").drop_columns(["bytes", "sha256"])
    pq.write_table(plan, out / "plan.parquet")
    (out / "manifest.json").unlink()
    run_tokenize(root, out, None, tokenizer_dir=tok / "tokenizer", manifest_paths="hashed", console=quiet())
    assert len(hashed_by_driver) == 2 + 1 + len(first) - 1 + len(added), "the files the plan lacks digests of (but the gone one)"
    hashed = {r["path"]: r for r in read_file_table(out).to_pylist()}
    key = hashlib.sha256(added[0].encode()).hexdigest()
    assert hashed[key]["sha256"] == sha(root / added[0]) and hashed[key]["seconds"] == rows[added[0]]["seconds"]
    gone_key = hashlib.sha256(gone.encode()).hexdigest()
    assert hashed[gone_key]["sha256"] is None and read_manifest(out)["unhashed"] == 1
    assert json.loads((out / "manifest.json").read_text())["paths"] == "hashed"


@pytest.mark.slow
@pytest.mark.ray
def test_an_ogg_whose_header_promises_more_than_decodes_is_tokenized_with_what_decodes(tokenized, tmp_path):
    """An overstated last granule position (as in three of Debian's hyperrogue-music tracks): the file is
    tokenized, not refused, and its clips cover the audio that decodes."""
    import numpy as np
    import soundfile as sf
    import webdataset as wds

    from musiclm.pipeline.tokenize_job import run_tokenize
    from musiclm.shards.format import TokenSample, list_shards
    from tests.test_audio import rewrite_last_ogg_page

    tok, _ = tokenized
    root = tmp_path / "corpus"
    root.mkdir()
    whole = root / "whole.ogg"
    sf.write(whole, 0.3 * np.sin(np.arange(20 * 22050) * 2 * np.pi * 440 / 22050), 22050, format="OGG", subtype="VORBIS")
    (root / "overstated.ogg").write_bytes(rewrite_last_ogg_page(whole.read_bytes(), 30_000))
    decodable = len(sf.read(root / "overstated.ogg")[0]) / 22050
    assert decodable < sf.info(root / "overstated.ogg").duration

    out = tmp_path / "out"
    run_tokenize(root, out, None, tokenizer_dir=tok / "tokenizer", console=quiet())
    assert not list((out / "errors").glob("*.parquet")) or pq.read_table(out / "errors").num_rows == 0
    samples = [TokenSample.from_wds(s) for s in wds.WebDataset([str(p) for p in list_shards(out)], shardshuffle=False, empty_check=False)]
    clips = sorted((s.meta["start"], s.duration) for s in samples if s.meta["source"] == "overstated.ogg")
    assert clips and clips[-1][0] + clips[-1][1] == pytest.approx(decodable), "the clips end where the audio does"
    rows = {r["path"]: r for r in read_file_table(out).to_pylist()}
    assert rows["overstated.ogg"]["error"] == "" and rows["overstated.ogg"]["seconds"] == pytest.approx(decodable)
    assert rows["overstated.ogg"]["header_seconds"] == pytest.approx(sf.info(root / "overstated.ogg").duration), "the manifest keeps the header's promise"
    assert rows["whole.ogg"]["header_seconds"] is None and read_manifest(out)["header_overstated"] == 1


def test_a_rerun_over_the_same_corpus_keeps_the_manifest_and_a_changed_corpus_replaces_it(corpus, tmp_path):
    """A model trained between two runs carries the manifest of the folder: a rerun that read the same
    corpus leaves it as it was (its first run's time and command); a changed corpus writes a new one."""
    facts = facts_of(corpus)
    first = write_manifest(tmp_path, corpus, facts, command=["first"], console=quiet())
    summary = json.loads((tmp_path / "manifest.json").read_text())
    summary["created"] = "2000-01-01T00:00:00Z"  # as if written long ago
    (tmp_path / "manifest.json").write_text(json.dumps(summary))
    again = write_manifest(tmp_path, corpus, dict(reversed(list(facts.items()))), command=["again"], console=quiet())
    assert again == summary and json.loads((tmp_path / "manifest.json").read_text()) == summary
    assert again["command"] == ["first"] and again["manifest_sha256"] == first["manifest_sha256"]

    (corpus / "album" / "c.mp3").write_bytes(b"ID3 changed")
    changed = write_manifest(tmp_path, corpus, facts_of(corpus), command=["changed"], console=quiet())
    assert changed["command"] == ["changed"] and changed["created"] != "2000-01-01T00:00:00Z"
    assert changed["manifest_sha256"] != first["manifest_sha256"]
    assert json.loads((tmp_path / "manifest.json").read_text()) == changed
