"""Integrity of what training and generation read: run folders, checkpoints and the tokenizer folder.

Each kind of file is damaged three ways (cut in half, eight bytes flipped in the middle, deleted).
``musiclm verify`` names exactly that file; loading the stages for generation refuses it in one
line (it checks what it reads: a checkpoint's weights are hashed, state.pt is not read, a saved
backbone gets the cheap check); ``train --resume`` goes on from the newest sound checkpoint and
trains to the end, reaching the same weights as a resume from an undamaged copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from musiclm.config import load_config
from musiclm.errors import UserError
from musiclm.generation import MusicLM
from musiclm.integrity import UNRECORDED, FileRecord, end_marker_problem, quick_check, read_records
from musiclm.shards import tokenizer_folder as tok
from musiclm.training import checkpoint as ckpt
from musiclm.commands.verify import verify_folder
from musiclm.training.run_folder import load_stage
from musiclm.training.trainer import run_train
from tests.conftest import run_cli
from tests.factories import materialize

DAMAGES = ("truncate", "flip", "delete")
STEP = "step-000000004"  # the one checkpoint of each session run (trained_runs: 4 steps, saved at the end)
KINDS = {  # a file of each kind, relative to a stage run folder
    "weights": f"checkpoints/{STEP}/model.safetensors",
    "state": f"checkpoints/{STEP}/state.pt",
    "checkpoint record": f"checkpoints/{STEP}/records.json",
    "run.json": "run.json",
    "quantizer": "tokenizer/semantic_kmeans.npy",
    "backbone": "tokenizer/semantic/model.safetensors",
    "tokenizer.json": "tokenizer/tokenizer.json",
    "tokenizer record": "tokenizer/records.json",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread for the whole module


def damage(path: Path, how: str) -> None:
    """Cut ``path`` in half, flip 8 bytes in its middle, or delete it."""
    if how == "delete":
        path.unlink()
        return
    data = path.read_bytes()
    mid = len(data) // 2
    if how == "truncate":
        path.write_bytes(data[:mid])
    else:
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 8]) + data[mid + 8 :])


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.fixture
def model(trained_runs, tmp_path) -> Path:
    """A copy of the session's semantic/, coarse/ and fine/ runs, to damage."""
    return Path(shutil.copytree(trained_runs, tmp_path / "model"))


def load_model(folder: Path) -> MusicLM:
    return MusicLM.from_runs(folder / "semantic", folder / "coarse", folder / "fine", device="cpu")


# ---- what is written ----------------------------------------------------------------------------------------------------


def test_each_checkpoint_and_the_tokenizer_record_their_files(trained_runs):
    run = trained_runs / "semantic"
    folder = run / "checkpoints" / STEP
    assert read_records(folder / ckpt.RECORDS) == {name: FileRecord.of(folder / name) for name in (ckpt.WEIGHTS, ckpt.STATE)}
    assert json.loads((run / "run.json").read_text())[ckpt.RECORDS_FROM] == 0
    tokenizer = run / "tokenizer"
    files = {p.relative_to(tokenizer).as_posix() for p in tokenizer.rglob("*") if p.is_file()} - {tok.RECORDS_FILE}
    assert read_records(tokenizer / tok.RECORDS_FILE) == {rel: FileRecord.of(tokenizer / rel) for rel in sorted(files)}
    assert {"tokenizer.json", "semantic_kmeans.npy", "semantic/model.safetensors"} <= files
    assert verify_folder(trained_runs)[2] == []


# ---- verify -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_verify_names_exactly_the_damaged_file(model, kind, how):
    rel = f"semantic/{KINDS[kind]}"
    damage(model / rel, how)
    kind_of, _, findings = verify_folder(model)
    assert kind_of == "model folder"
    assert [(f.path, f.status) for f in findings] == [(rel, "missing" if how == "delete" else "damaged")]
    assert findings[0].advice


@pytest.mark.parametrize("change", [-1, 1], ids=["one-byte-short", "one-byte-long"])
def test_a_safetensors_file_one_byte_short_or_long_is_told_by_its_header(tmp_path, change):
    """Its header says where the last tensor ends, so a weights file without a record (or before its size is
    compared with one) is damaged when it ends anywhere else, one byte off included."""
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(path))  # 24 data bytes
    assert end_marker_problem(path) is None
    data = path.read_bytes()
    path.write_bytes(data[:-1] if change < 0 else data + b"\0")
    assert end_marker_problem(path) == f"safetensors holds {24 + change} data bytes, its header says 24"
    assert quick_check(path, UNRECORDED) == end_marker_problem(path)


def test_verify_of_a_run_folder_that_lost_its_run_json_names_it(model):
    (model / "fine" / "run.json").unlink()
    kind_of, _, findings = verify_folder(model / "fine")
    assert kind_of == "run folder"
    assert [(f.path, f.status) for f in findings] == [("run.json", "missing")]


@pytest.mark.slow
def test_verify_command_exits_0_on_a_clean_copy_and_1_naming_a_damaged_file(model):
    proc = run_cli("verify", model / "coarse")
    assert proc.returncode == 0 and "all match their records" in proc.stdout, proc.stderr
    damage(model / "coarse" / KINDS["backbone"], "flip")  # a flipped byte is found by hashing only
    proc = run_cli("verify", model, "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert [(f["path"], f["status"], f["detail"]) for f in report["findings"]] == [("coarse/tokenizer/semantic/model.safetensors", "damaged", "sha256 differs from the record")]


# ---- generation ---------------------------------------------------------------------------------------------------------

REFUSED = [(kind, how) for kind in KINDS for how in DAMAGES if kind != "state" and (kind, how) != ("backbone", "flip")]


@pytest.mark.parametrize(("kind", "how"), REFUSED)
def test_loading_for_generation_refuses_a_damaged_file_in_one_line(model, kind, how):
    rel = KINDS[kind]
    damage(model / "semantic" / rel, how)
    with pytest.raises(UserError) as e:
        load_model(model)
    line = one_line(e)
    assert rel.split("/")[-1] in line and ("missing" in line if how == "delete" else "damaged" in line), line


def test_generation_does_not_read_optimizer_state_and_leaves_a_flipped_backbone_byte_to_verify(model):
    """state.pt is for resuming only; the saved backbones get the cheap check (size, header) on every load
    and are hashed by verify, which names the file."""
    damage(model / "semantic" / KINDS["state"], "truncate")
    damage(model / "semantic" / KINDS["backbone"], "flip")
    load_model(model)
    assert [f.path for f in verify_folder(model)[2]] == [f"semantic/{KINDS[k]}" for k in ("state", "backbone")]


def test_a_saved_backbone_file_that_still_parses_is_caught_by_its_recorded_size(model):
    """A file cut at a point where its format still looks whole (here a JSON config without its final newline)."""
    path = model / "semantic" / "tokenizer" / "semantic" / "config.json"
    data = path.read_bytes()
    assert data.endswith(b"}\n")
    path.write_bytes(data[:-1])
    with pytest.raises(UserError) as e:
        load_model(model)
    line = one_line(e)
    assert "semantic/config.json" in line and f"{len(data) - 1} bytes, recorded {len(data)}" in line


def test_an_edited_tokenizer_json_that_still_parses_is_refused_before_it_is_read(model):
    path = model / "semantic" / KINDS["tokenizer.json"]
    path.write_bytes(path.read_bytes().replace(b'"format": 3', b'"format": 2'))  # same size, valid JSON
    with pytest.raises(UserError) as e:
        load_model(model)
    assert f"{path} is damaged (sha256 differs from the record)" in one_line(e)

@pytest.mark.slow
@pytest.mark.parametrize(("kind", "how"), [("backbone", "truncate"), ("weights", "flip")])
def test_generate_command_refuses_a_damaged_input_in_one_line(model, tmp_path, kind, how):
    damage(model / "semantic" / KINDS[kind], how)
    proc = run_cli("generate", "a calm piano", "--model", model, "--seconds", "1", "--out", tmp_path / "x.wav")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(model / "semantic" / KINDS[kind]) in proc.stderr
    assert not (tmp_path / "x.wav").exists()


def test_a_stage_is_not_loaded_from_an_older_checkpoint_than_asked_the_message_names_it(resumable, tmp_path):
    run = Path(shutil.copytree(resumable, tmp_path / "run"))
    damage(run / "checkpoints" / "step-000000004" / ckpt.WEIGHTS, "flip")
    with pytest.raises(UserError) as e:
        load_stage(run, device="cpu")
    line = one_line(e)
    assert "sha256 differs" in line and f"pass {run / 'checkpoints' / 'step-000000002'}" in line
    load_stage(run / "checkpoints" / "step-000000002", device="cpu")  # named, it loads
    with pytest.raises(UserError, match="restore it from a copy"):
        load_stage(run / "checkpoints" / "step-000000004", device="cpu")


# ---- resume -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumable(tokenized, tmp_path_factory) -> Path:
    """A tiny semantic run of 4 steps with checkpoints at steps 2 and 4 (read-only: copy it)."""
    data, _ = tokenized
    out = tmp_path_factory.mktemp("resumable") / "run"
    run_train("semantic", data, out, load_config("tiny"), steps=4, batch_size=4, save_every=2, eval_every=1000, device="cpu")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4]
    return out


def resume(run: Path, data: Path, cfg=None) -> Path:
    overrides = {} if cfg is None else {"batch_size": 4, "save_every": 2, "eval_every": 1000}
    return run_train("semantic", data, run, cfg, steps=6, resume=True, device="cpu", **overrides)


@pytest.fixture(scope="module")
def reference(resumable, tokenized, tmp_path_factory) -> dict:
    """The step-6 weights of the undamaged run resumed from step 4."""
    run = Path(shutil.copytree(resumable, tmp_path_factory.mktemp("reference") / "run"))
    resume(run, tokenized[0])
    return load_file(str(run / "checkpoints" / "step-000000006" / ckpt.WEIGHTS))


def assert_trained_to_the_end(run: Path, reference: dict) -> None:
    assert ckpt.latest_checkpoint(run).name == "step-000000006"
    assert ckpt.load_state(ckpt.latest_checkpoint(run))["step"] == 6
    got = load_file(str(run / "checkpoints" / "step-000000006" / ckpt.WEIGHTS))
    assert got.keys() == reference.keys() and all((got[k] == reference[k]).all() for k in got), "exact resume"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 6


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", ["weights", "state", "checkpoint record"])
def test_resume_goes_back_to_the_newest_sound_checkpoint_and_trains_to_the_end(resumable, tokenized, reference, tmp_path, capsys, kind, how):
    run = Path(shutil.copytree(resumable, tmp_path / "run"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000000004"  # latest names the damaged one
    name = KINDS[kind].split("/")[-1]
    damage(run / "checkpoints" / "step-000000004" / name, how)
    resume(run, tokenized[0])
    err = capsys.readouterr().err
    assert f"checkpoint step-000000004 is damaged ({name}: " in err and "resuming from step-000000002" in err, err
    assert_trained_to_the_end(run, reference)
    # the damaged checkpoint is moved aside, not deleted; verify lists it as not part of the run
    assert (run / "checkpoints" / "damaged-step-000000004").is_dir()
    findings = verify_folder(run)[2]
    assert {f.status for f in findings} == {"unexpected"}
    assert {f.path.split("/")[1] for f in findings} == {"damaged-step-000000004"}
    assert all("set aside" in f.detail for f in findings)


def test_resume_refuses_in_one_line_when_no_checkpoint_is_sound(resumable, tokenized, tmp_path):
    run = Path(shutil.copytree(resumable, tmp_path / "run"))
    damage(run / "checkpoints" / "step-000000004" / ckpt.STATE, "flip")
    damage(run / "checkpoints" / "step-000000002" / ckpt.WEIGHTS, "truncate")
    with pytest.raises(UserError) as e:
        resume(run, tokenized[0])
    line = one_line(e)
    assert "no sound checkpoint" in line and "step-000000004: state.pt: sha256 differs" in line and "step-000000002: model.safetensors: " in line
    assert "another --out" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000000002", "step-000000004"], "nothing moved"


@pytest.mark.slow
def test_train_command_refuses_in_one_line_when_no_checkpoint_is_sound(resumable, tokenized, tmp_path):
    run = Path(shutil.copytree(resumable, tmp_path / "run"))
    for step in ("step-000000002", "step-000000004"):
        damage(run / "checkpoints" / step / ckpt.WEIGHTS, "delete")
    proc = run_cli("train", "semantic", "--data", tokenized[0], "--out", run, "--resume", "--steps", "6", "--device", "cpu")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "no sound checkpoint" in proc.stderr and "model.safetensors: missing" in proc.stderr


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_run_json_is_written_again_from_the_config_given(resumable, tokenized, reference, tmp_path, how):
    run = Path(shutil.copytree(resumable, tmp_path / "run"))
    damage(run / "run.json", how)
    with pytest.raises(UserError) as e:
        resume(run, tokenized[0])
    assert ("run.json is missing" if how == "delete" else "run.json is damaged (not valid JSON)") in one_line(e) and "--preset/--config" in one_line(e)
    resume(run, tokenized[0], cfg=load_config("tiny"))
    assert_trained_to_the_end(run, reference)
    assert json.loads((run / "run.json").read_text())[ckpt.RECORDS_FROM] == 2  # the oldest checkpoint with a record file
    assert verify_folder(run)[2] == []


@pytest.mark.parametrize(
    ("kind", "how", "left_damaged"),
    [("tokenizer.json", "flip", []), ("backbone", "truncate", ["backbone"])],
    ids=["tokenizer.json-copied-again", "backbone-not-read-by-training"],
)
def test_resume_goes_on_past_a_damaged_file_of_the_tokenizer_copy(resumable, tokenized, reference, tmp_path, kind, how, left_damaged):
    """A damaged tokenizer.json is copied again from the data folder; a damaged backbone, which training does
    not read, is left for verify to name."""
    run = Path(shutil.copytree(resumable, tmp_path / "run"))
    damage(run / KINDS[kind], how)
    resume(run, tokenized[0])
    assert_trained_to_the_end(run, reference)
    assert [f.path for f in verify_folder(run)[2]] == [KINDS[k] for k in left_damaged]


# ---- checkpoints written before record files --------------------------------------------------------------------------


def unrecorded(run: Path) -> Path:
    """``run`` as musiclm wrote it before record files: no records.json, no RECORDS_FROM in run.json."""
    for _, folder in ckpt.step_folders(run):
        (folder / ckpt.RECORDS).unlink()
    record = json.loads((run / "run.json").read_text())
    del record[ckpt.RECORDS_FROM]
    (run / "run.json").write_text(json.dumps(record))
    return run


def unrecorded_files(run: Path) -> list[str]:
    findings = verify_folder(run)[2]
    assert {f.status for f in findings} <= {"unrecorded"}, findings
    return [f.path for f in findings]


def test_checkpoints_without_records_load_verify_as_unrecorded_and_resume(resumable, tokenized, reference, tmp_path):
    run = unrecorded(Path(shutil.copytree(resumable, tmp_path / "run")))
    assert unrecorded_files(run) == [f"checkpoints/step-00000000{s}/{f}" for s in (2, 4) for f in (ckpt.WEIGHTS, ckpt.STATE)]
    load_stage(run, device="cpu")
    resume(run, tokenized[0])
    assert_trained_to_the_end(run, reference)
    assert json.loads((run / "run.json").read_text())[ckpt.RECORDS_FROM] == 5  # checkpoints after step 4 have records
    assert (run / "checkpoints" / "step-000000006" / ckpt.RECORDS).is_file()
    assert unrecorded_files(run) == [f"checkpoints/step-000000004/{f}" for f in (ckpt.WEIGHTS, ckpt.STATE)]


def test_an_unrecorded_checkpoint_that_torch_cannot_read_is_passed_over(resumable, tokenized, reference, tmp_path, capsys):
    run = unrecorded(Path(shutil.copytree(resumable, tmp_path / "run")))
    damage(run / "checkpoints" / "step-000000004" / ckpt.STATE, "truncate")
    resume(run, tokenized[0])
    err = capsys.readouterr().err
    assert "checkpoint step-000000004 is damaged (state.pt: unreadable" in err and "resuming from step-000000002" in err, err
    assert_trained_to_the_end(run, reference)


# ---- pushed and pulled models -------------------------------------------------------------------------------------------


def test_a_pushed_model_carries_the_weights_record_and_verifies(trained_runs, model, tmp_path):
    from musiclm.hub.push import push_operations

    pulled = materialize(push_operations(trained_runs, "owner/name"), tmp_path / "pulled")
    assert (pulled / "README.md").is_file()  # the model card is part of a pulled model
    folder = pulled / "semantic" / "checkpoints" / STEP
    assert sorted(p.name for p in folder.iterdir()) == [ckpt.WEIGHTS, ckpt.RECORDS]
    assert read_records(folder / ckpt.RECORDS) == {ckpt.WEIGHTS: FileRecord.of(folder / ckpt.WEIGHTS)}
    assert verify_folder(pulled)[2] == []
    damage(folder / ckpt.WEIGHTS, "flip")
    assert [(f.path, f.detail) for f in verify_folder(pulled)[2]] == [(f"semantic/checkpoints/{STEP}/{ckpt.WEIGHTS}", "sha256 differs from the record")]
    with pytest.raises(UserError) as e:
        MusicLM.from_pretrained(pulled, device="cpu")
    assert "model.safetensors is damaged" in one_line(e)
    # a push refuses damaged weights
    damage(model / "coarse" / KINDS["weights"], "flip")
    with pytest.raises(UserError) as e:
        push_operations(model, "owner/name")
    assert "coarse/checkpoints" in one_line(e) and "then push again" in one_line(e)


def test_a_tokenizer_written_before_record_files_loads_checked_by_the_sums_in_tokenizer_json(model):
    for stage in ("semantic", "coarse", "fine"):
        folder = model / stage / "tokenizer"
        (folder / tok.RECORDS_FILE).unlink()
        record = json.loads((folder / "tokenizer.json").read_text())
        del record["records"]
        (folder / "tokenizer.json").write_text(json.dumps(record))
    load_model(model)
    findings = verify_folder(model)[2]
    assert [(f.path, f.status) for f in findings] == [(f"{s}/tokenizer/tokenizer.json", "unrecorded") for s in ("coarse", "fine", "semantic")]
    damage(model / "semantic" / KINDS["quantizer"], "flip")
    with pytest.raises(UserError) as e:
        load_model(model)
    assert "semantic_kmeans.npy is damaged (sha256 differs from the record)" in one_line(e)
