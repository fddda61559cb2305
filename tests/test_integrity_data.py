"""A tokenized folder keeps checksums (issue 12): every file ``musiclm tokenize`` writes is recorded when it
is written and checked when it is read (one line, exit 2), ``musiclm verify`` checks every byte, and
rerunning the same ``musiclm tokenize`` repairs what is damaged: damaged shards are tokenized again from
their audio into the same tokens, sound ones are left alone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from musiclm.cli import main
from musiclm.commands.stats import summarize
from musiclm.errors import UserError
from musiclm.integrity import DamagedFile, FileRecord
from musiclm.shards.format import TokenInfo, list_shards
from musiclm.shards.read import done_files
from musiclm.shards.records import ShardRecord, record_path, shard_files
from musiclm.shards.repair import check_shards
from musiclm.shards.stats import shard_keys
from musiclm.shards.writer import ShardWriter
from musiclm.training.corpus_split import split_data
from tests.conftest import ROOT, run_cli
from tests.factories import Failed, fake_info_json, fake_sample, fake_shards

DAMAGES = ("truncate", "flip", "delete")
KINDS = ("tar", "stats", "codes", "errors", "record")


def damage(path: Path, how: str) -> None:
    """Cut ``path`` to a third, invert four bytes in its middle, or delete it."""
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    elif how == "flip":
        data = bytearray(path.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 4] = bytes(b ^ 0xFF for b in data[mid : mid + 4])
        path.write_bytes(bytes(data))
    else:
        path.unlink()


def target(folder: Path, name: str, kind: str) -> Path:
    return record_path(folder, name) if kind == "record" else folder / shard_files(name)[kind]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in list_shards(folder)}


def cli(capsys, *args) -> tuple[int, str, str]:
    """``musiclm ARGS`` in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def verify_json(capsys, folder: Path) -> tuple[int, dict]:
    code, out, _ = cli(capsys, "verify", folder, "--json")
    return code, json.loads(out)


# ---- a folder of fake tokens written by ShardWriter (no backbone, no Ray) ------------------------------------------


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    """Three shards of 3 clips (the last of 2), and one failed file listed with shard 0; clips in planned batches of 2."""
    folder = tmp_path_factory.mktemp("fake") / "tokens"
    info_json = fake_info_json()
    info = TokenInfo.from_json(info_json)
    rng = np.random.default_rng(0)
    clips = [fake_sample(info, 5.0, rng, name=f"music/clip{i}.wav") for i in range(8)]
    fake_shards(folder, [Failed("broken0", "broken.mp3", "decode", "not an audio file"), *clips], info_json=info_json, shard_size=3, batch_size=2)
    record_tokenizer(folder / "tokenizer")
    return folder


def record_tokenizer(folder: Path) -> None:
    """A record of the stand-in tokenizer.json, as the tokenizer folder keeps one (its own business: shards/tokenizer_folder.py)."""
    from musiclm.integrity import write_records
    from musiclm.shards.tokenizer_folder import RECORDS_FILE

    write_records(folder / RECORDS_FILE, {"tokenizer.json": FileRecord.of(folder / "tokenizer.json")})


@pytest.fixture
def copy(fake, tmp_path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(fake, folder)
    return folder


def test_every_file_of_a_shard_is_recorded_with_the_clips_it_holds(fake):
    names = [p.stem for p in list_shards(fake)]
    assert names == ["shard-000000", "shard-000001", "shard-000002"]
    for name in names:
        rec = ShardRecord.read(fake, name)
        rels = shard_files(name)
        kinds = ("tar", "stats", "codes", "errors") if name == "shard-000000" else ("tar", "stats", "codes")
        assert set(rec.files) == {rels[k] for k in kinds}
        for rel, record in rec.files.items():
            assert record == FileRecord.of(fake / rel)
        # the clips by source, with their planned batch: the shard's membership survives the loss of every other file
        assert [k for _, _, keys in rec.clips for k in keys] == shard_keys(fake / rels["tar"])
        assert all(batch == int(src.removeprefix("music/clip").removesuffix(".wav")) // 2 for src, batch, _ in rec.clips)
    assert ShardRecord.read(fake, "shard-000000").errors == [["broken0", "broken.mp3"]]
    # records have their own folder: Parquet dataset reads of stats/ and errors/ see only their tables
    assert len(pd.read_parquet(fake / "stats")) == 8 and list(pd.read_parquet(fake / "errors")["key"]) == ["broken0"]


def test_a_record_file_checks_its_own_bytes(copy):
    path = record_path(copy, "shard-000001")
    text = path.read_text()
    sha = ShardRecord.read(copy, "shard-000001").files["shards/shard-000001.tar"].sha256
    path.write_text(text.replace(sha, sha[:-1] + ("0" if sha[-1] != "0" else "1")))  # still valid JSON
    with pytest.raises(DamagedFile, match="record file's own checksum differs"):
        ShardRecord.read(copy, "shard-000001")


def test_verify_passes_a_sound_folder(fake, capsys):
    code, out, _ = cli(capsys, "verify", fake)
    assert code == 0 and "all match their records" in out
    code, body = verify_json(capsys, fake)
    assert code == 0
    assert body == {"folder": str(fake), "kind": "tokenized folder", "files_checked": body["files_checked"], "ok": True,
                    "counts": {"damaged": 0, "missing": 0, "unrecorded": 0, "unexpected": 0}, "findings": []}  # fmt: skip
    assert body["files_checked"] == len([p for p in fake.rglob("*") if p.is_file()])  # shards, stats, codes, errors, records, tokenizer


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_verify_names_each_damaged_file_and_readers_refuse_it_in_one_line(copy, capsys, kind, how):
    name = "shard-000000"  # the shard with an errors file
    path = target(copy, name, kind)
    damage(path, how)
    rel = path.relative_to(copy).as_posix()

    code, body = verify_json(capsys, copy)
    assert code == 1 and not body["ok"]
    found = {f["path"]: f["status"] for f in body["findings"]}
    if kind == "record" and how == "delete":  # the shard's files are there, their checksums are not
        assert found == {shard_files(name)[k]: "unrecorded" for k in ("tar", "stats", "codes", "errors")}
    else:
        assert found == {rel: "missing" if how == "delete" else "damaged"}
    assert all("musiclm tokenize" in f["advice"] and str(copy) in f["advice"] for f in body["findings"])

    # musiclm stats reads the Parquet files (and their records), never a tar
    code, _, err = cli(capsys, "stats", copy)
    if kind == "tar":
        assert code == 0, err
    else:
        assert code == 2
        assert (rel if kind != "record" else name) in one_line_error(err) and "re-run musiclm tokenize" in err

    # the loader: a tar cut or gone, its record damaged, or the stats it counts clips from cut
    refuses = {("tar", "truncate"), ("tar", "delete"), ("stats", "truncate")} | {("record", h) for h in DAMAGES}
    if (kind, how) in refuses:
        with pytest.raises(UserError, match="musiclm tokenize"):
            split_data(copy, TokenInfo.load(copy), None, 0.3)
    elif kind in ("codes", "errors"):
        split_data(copy, TokenInfo.load(copy), None, 0.3)  # training reads neither


def test_a_whole_file_in_the_wrong_place_is_refused_by_its_recorded_size(copy):
    """Its end markers are intact: only the size in the record (or a hash) tells it is not the file written there."""
    shutil.copyfile(copy / "stats" / "shard-000002.parquet", copy / "stats" / "shard-000001.parquet")  # 2 clips, not 3
    with pytest.raises(DamagedFile, match=r"shard-000001.parquet is damaged \(\d+ bytes, recorded \d+\)"):
        split_data(copy, TokenInfo.load(copy), None, 0.3)


def test_stats_hashes_what_it_reads_so_a_changed_value_is_refused(copy, capsys):
    """A duration changed in place: same size, intact markers, and pyarrow reads the new value without a murmur."""
    path = copy / "stats" / "shard-000001.parquet"
    data = path.read_bytes()
    at = data.index(struct.pack("<d", 5.0))  # every fake clip lasts 5 s
    path.write_bytes(data[:at] + struct.pack("<d", 6.0) + data[at + 8 :])
    assert set(pd.read_parquet(path)["duration"]) == {6.0}
    code, _, err = cli(capsys, "stats", copy)
    assert code == 2 and "shard-000001.parquet is damaged (sha256 differs from the record)" in one_line_error(err)


def test_train_refuses_a_damaged_shard_in_one_line(copy, capsys, tmp_path):
    tar = copy / "shards" / "shard-000001.tar"
    size = tar.stat().st_size
    damage(tar, "truncate")
    code, _, err = cli(capsys, "train", "semantic", "--data", copy, "--out", tmp_path / "run", "--preset", "tiny", "--steps", "1")
    assert code == 2
    assert f"shard-000001.tar is damaged ({size // 3} bytes, recorded {size})" in one_line_error(err) and "re-run musiclm tokenize" in err


def test_resume_reads_are_checked(copy):
    damage(copy / "stats" / "shard-000001.parquet", "truncate")
    with pytest.raises(DamagedFile, match="shard-000001.parquet is damaged"):
        done_files(copy)


# ---- checking at the start of a run, and preparing the repair -----------------------------------------------------


def test_damaged_stats_of_a_sound_shard_are_rebuilt_from_its_tar(fake, copy, capsys):
    damage(copy / "stats" / "shard-000001.parquet", "flip")
    damage(copy / "stats" / "_codes" / "shard-000002.parquet", "delete")
    before = digests(copy)
    state = check_shards(copy)
    assert {(f.name, tuple(f.actions)) for f in state.found} == {("shard-000001", ("rebuilt",)), ("shard-000002", ("rebuilt",))}
    assert not state.redo() and digests(copy) == before
    for rel in ("stats/shard-000001.parquet", "stats/_codes/shard-000002.parquet"):
        assert (copy / rel).read_bytes() == (fake / rel).read_bytes()
    assert verify_json(capsys, copy)[0] == 0


def test_a_damaged_shard_goes_on_record_as_to_redo_before_its_files_are_removed(fake, copy, monkeypatch):
    damage(copy / "shards" / "shard-000001.tar", "truncate")
    real_unlink = Path.unlink

    def killed(self, *args, **kwargs):  # a kill right after the record was written
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        check_shards(copy)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    redo = ShardRecord.read(copy, "shard-000001").redo
    assert [k for _, _, keys in redo["clips"] for k in keys] == shard_keys(fake / "shards" / "shard-000001.tar")
    assert redo["problems"]["shards/shard-000001.tar"].startswith("truncated")

    state = check_shards(copy)  # the next run goes on from the record
    assert state.redo()["shard-000001"]["clips"] == redo["clips"]
    assert not any((copy / shard_files("shard-000001")[k]).exists() for k in ("tar", "stats", "codes"))
    assert digests(copy) == {n: d for n, d in digests(fake).items() if n != "shard-000001.tar"}


def test_a_damaged_record_is_written_again_after_its_files_read_whole(fake, copy, capsys):
    damage(record_path(copy, "shard-000002"), "flip")
    state = check_shards(copy)
    assert [(f.name, f.actions) for f in state.found] == [("shard-000002", ["recorded"])]
    assert ShardRecord.read(copy, "shard-000002").files == ShardRecord.read(fake, "shard-000002").files
    assert verify_json(capsys, copy)[0] == 0


def test_a_folder_from_before_records_is_recorded_when_it_reads_whole(fake, copy, capsys):
    shutil.rmtree(copy / "checksums")
    code, body = verify_json(capsys, copy)
    assert code == 1 and {f["status"] for f in body["findings"]} == {"unrecorded"} and len(body["findings"]) == 10
    assert cli(capsys, "stats", copy)[0] == 0  # readers accept it as it always was
    state = check_shards(copy)
    assert state.recorded == ["shard-000000", "shard-000001", "shard-000002"] and not state.found
    # membership from its stats (its planned batches are not known without a plan)
    assert ShardRecord.read(copy, "shard-000001").clips == [[src, -1, keys] for src, _, keys in ShardRecord.read(fake, "shard-000001").clips]
    assert verify_json(capsys, copy)[0] == 0


def test_a_file_changed_in_place_is_hashed_even_when_its_mtime_is_put_back(copy):
    tar = copy / "shards" / "shard-000001.tar"
    st = tar.stat()
    damage(tar, "flip")  # same size, same end blocks: only a hash tells
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    state = check_shards(copy)
    assert [(f.name, f.problems) for f in state.found] == [("shard-000001", {"shards/shard-000001.tar": "sha256 differs from the record"})]


def test_a_full_check_finds_damage_that_left_size_and_times_alone(copy):
    """Bit rot changes no time: only ``tokenize --verify`` (check_shards(full=True)) hashes such a file."""
    tar = copy / "shards" / "shard-000001.tar"
    damage(tar, "flip")
    rec = ShardRecord.read(copy, "shard-000001")
    rec.note(copy, "shards/shard-000001.tar")  # the record's times now match the damaged file's ...
    rec.files["shards/shard-000001.tar"] = ShardRecord.read(copy, "shard-000001").files["shards/shard-000001.tar"]  # ... its digest does not
    rec.write(copy)
    assert check_shards(copy).found == []  # the cheap check cannot see it
    state = check_shards(copy, full=True)
    assert [(f.name, f.problems) for f in state.found] == [("shard-000001", {"shards/shard-000001.tar": "sha256 differs from the record"})]


# ---- musiclm tokenize repairs (Ray, the tiny preset) ---------------------------------------------------------------


def read_tokens(folder: Path) -> dict:
    from tests.test_tokenize import read_samples

    return {s.key: s for s in read_samples(folder)}


def tokenize_args(corpus: Path, out: Path) -> list:
    return ["tokenize", corpus, "--out", out, "--preset", "tiny", "--shard-size", "6"]  # as conftest's `tokenized`


@pytest.mark.slow
@pytest.mark.ray
def test_a_rerun_repairs_every_kind_of_damage_and_leaves_sound_shards_alone(tokenized, audio_corpus, tmp_path, capsys):
    from tests.test_tokenize import BATCH1_AGREEMENT, agreement

    original, _ = tokenized
    out, corpus = tmp_path / "tokens", tmp_path / "corpus"
    shutil.copytree(original, out)
    shutil.copytree(audio_corpus[0], corpus)
    names = [p.stem for p in list_shards(out)]
    errors_files = sorted((out / "errors").glob("shard-*.parquet"))
    assert len(names) >= 7 and errors_files
    plan_before = pd.read_parquet(out / "plan.parquet").set_index("rel")["batch"]

    damaged = {
        target(out, names[1], "tar"): "truncate",  # redone from audio, one of its files gone from the corpus
        target(out, names[2], "tar"): "flip",  # redone from audio
        target(out, names[3], "tar"): "delete",  # redone from audio
        target(out, names[4], "stats"): "truncate",  # rebuilt from the sound tar
        target(out, names[5], "codes"): "flip",  # rebuilt from the sound tar
        target(out, names[6], "record"): "flip",  # written again after a whole read
        errors_files[0]: "flip",  # its failed files decoded again
        out / "plan.parquet": "truncate",  # planned again, keeping the batches the records name
        out / "manifest.json": "delete",  # written again
    }
    for path, how in damaged.items():
        damage(path, how)
    gone_src, _, gone_keys = ShardRecord.read(out, names[1]).clips[-1]
    (corpus / gone_src).unlink()

    code, body = verify_json(capsys, out)
    assert code == 1
    assert {f["path"] for f in body["findings"]} == {p.relative_to(out).as_posix() for p in damaged}
    code, _, err = cli(capsys, "stats", out)
    assert code == 2 and "is damaged" in one_line_error(err)
    code, _, err = cli(capsys, "train", "semantic", "--data", out, "--out", tmp_path / "run", "--preset", "tiny", "--steps", "1")
    assert code == 2 and "musiclm tokenize" in one_line_error(err)

    before = digests(out)
    proc = run_cli(*tokenize_args(corpus, out))
    assert proc.returncode == 0, proc.stderr
    log = " ".join(proc.stderr.split())
    assert f"repaired 3 damaged shards ({names[1]}: " in log
    assert f"rebuilt the statistics of {names[4]}" in log and f"rebuilt the statistics of {names[5]}" in log
    assert f"{len(gone_keys)} clip" in log and "their source audio is gone" in log

    assert verify_json(capsys, out)[0] == 0
    after = digests(out)
    assert set(after) == set(before) | {f"{n}.tar" for n in names[1:4]}, "repaired shards are written back under their names"
    assert all(after[n] == d for n, d in before.items() if n not in {f"{x}.tar" for x in names[1:4]}), "a sound shard was rewritten"

    # tokens equal the undamaged folder's; the gone file's batch-mates were batched without it this time
    want, got = read_tokens(original), read_tokens(out)
    assert set(got) == set(want) - set(gone_keys)
    mates = {rel for rel, b in plan_before.items() if b == plan_before[gone_src]} - {gone_src}
    for key, s in got.items():
        for stream in ("semantic", "acoustic", "clap", "clap_emb"):
            a, b = getattr(s, stream), getattr(want[key], stream)
            if s.meta["source"] in mates:
                assert agreement(a, b) >= BATCH1_AGREEMENT
            else:
                np.testing.assert_array_equal(a, b)

    # nothing is dropped silently: the gone file's clips are listed with the reason; the failed files again
    errors = pd.read_parquet(out / "errors")
    gone = errors[errors["source"] == gone_src]
    assert sorted(gone["key"]) == sorted(gone_keys) and all("source audio is gone" in r for r in gone["reason"])
    assert sorted(set(errors["source"])) == sorted(set(pd.read_parquet(original / "errors")["source"]) | {gone_src})
    plan_after = pd.read_parquet(out / "plan.parquet").set_index("rel")["batch"]
    assert plan_after.to_dict() == plan_before.drop(gone_src).to_dict()
    assert summarize(out)["totals"]["clips"] == summarize(original)["totals"]["clips"] - len(gone_keys)


@pytest.mark.slow
@pytest.mark.ray
def test_a_kill_during_the_repair_leaves_a_folder_the_next_run_completes(tokenized, audio_corpus, tmp_path, capsys):
    original, _ = tokenized
    out = tmp_path / "tokens"
    shutil.copytree(original, out)
    name = list_shards(out)[2].stem
    damage(out / shard_files(name)["tar"], "truncate")
    args = [str(a) for a in tokenize_args(audio_corpus[0], out)]

    run = subprocess.Popen([sys.executable, "-m", "musiclm", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def repair_under_way() -> bool:  # the clips are on record as to redo and the damaged files are gone
        try:
            return bool(ShardRecord.read(out, name).redo) and not (out / shard_files(name)["tar"]).exists()
        except (DamagedFile, OSError):
            return False

    t0 = time.time()
    while not repair_under_way():
        assert run.poll() is None, "the run ended before its repair began"
        assert time.time() - t0 < 300
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    code, body = verify_json(capsys, out)
    found = {(f["path"], f["status"]) for f in body["findings"]}
    assert code == 1 and (f"shards/{name}.tar", "missing") in found
    leftovers = found - {(f"shards/{name}.tar", "missing")}  # the kill may also cut a record being written
    assert all(status == "unexpected" and Path(path).name.startswith(".") and path.endswith(".tmp") for path, status in leftovers), leftovers

    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert f"repaired 1 damaged shard ({name}: " in " ".join(proc.stderr.split())
    assert verify_json(capsys, out)[0] == 0
    assert {n: d for n, d in digests(out).items() if n != f"{name}.tar"} == {n: d for n, d in digests(original).items() if n != f"{name}.tar"}
    want, got = read_tokens(original), read_tokens(out)
    assert set(got) == set(want)
    for key, s in got.items():
        for stream in ("semantic", "acoustic", "clap", "clap_emb"):
            np.testing.assert_array_equal(getattr(s, stream), getattr(want[key], stream))


class _DamagedInWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise DamagedFile("/data/shards/shard-000001.tar", "truncated", "re-run musiclm tokenize CORPUS --out DIR to repair it")
        yield  # a generator: the error is raised in the worker, when it starts iterating


def test_damage_found_inside_a_data_loader_worker_is_still_one_line():
    """torch re-raises a worker's error as its type called with the worker's whole traceback: the sentence is kept."""
    with pytest.raises(DamagedFile) as e:
        for _ in torch.utils.data.DataLoader(_DamagedInWorker(), num_workers=1):
            pass
    assert str(e.value) == "/data/shards/shard-000001.tar is damaged (truncated): re-run musiclm tokenize CORPUS --out DIR to repair it"
