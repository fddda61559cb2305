"""Evaluation metrics: the Fréchet distance against closed forms, and musiclm eval on small folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from musiclm.cli import main
from musiclm.errors import UserError
from musiclm.metrics import embed_file, embed_files, embed_folder, embedding_stats, frechet_distance, run_eval

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: the backbones run faster on one thread here


def closed_form_commuting(mu1, a, mu2, b) -> float:
    """Fréchet distance of N(mu1, Q diag(a) Q^T) and N(mu2, Q diag(b) Q^T): the covariances commute, so
    (S1 S2)^(1/2) = Q diag(sqrt(a b)) Q^T and the trace term is sum((sqrt(a) - sqrt(b))^2)."""
    return float(np.sum((np.asarray(mu1) - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


# ---- the distance --------------------------------------------------------------------------------------------------
def test_a_set_against_itself_is_at_distance_zero():
    x = np.random.default_rng(0).standard_normal((2000, 8)) @ rotation(8, 1) * 3 + 5
    mu, sigma = embedding_stats(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_diagonal_gaussians_match_the_hand_computation():
    mu1, s1 = np.array([0.0, 1.0, 2.0]), np.diag([1.0, 4.0, 9.0])
    mu2, s2 = np.array([1.0, 1.0, 0.0]), np.diag([4.0, 1.0, 9.0])
    # |mu1 - mu2|^2 = 1 + 0 + 4; sum (sqrt(s1) - sqrt(s2))^2 = 1 + 1 + 0
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(7.0, abs=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(7.0, abs=1e-9)


def test_rotated_gaussians_match_the_closed_form():
    q = rotation(5, 2)
    a, b = np.array([0.5, 1.0, 2.0, 3.0, 0.2]), np.array([2.0, 1.5, 0.3, 3.0, 1.0])
    mu1, mu2 = np.zeros(5), np.array([1.0, -2.0, 0.5, 0.0, 0.3])
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(closed_form_commuting(mu1, a, mu2, b), rel=1e-9)


def test_samples_of_two_gaussians_approach_the_closed_form():
    rng = np.random.default_rng(3)
    q = rotation(4, 4)
    a, b = np.array([0.5, 1.0, 2.0, 3.0]), np.array([2.0, 1.5, 0.3, 3.0])
    mu1, mu2 = np.array([0.0, 1.0, 0.0, 0.0]), np.array([1.0, -1.0, 0.5, 0.0])
    n = 200_000
    x = rng.standard_normal((n, 4)) * np.sqrt(a) @ q.T + mu1
    y = rng.standard_normal((n, 4)) * np.sqrt(b) @ q.T + mu2
    got = frechet_distance(*embedding_stats(x), *embedding_stats(y))
    assert got == pytest.approx(closed_form_commuting(mu1, a, mu2, b), rel=0.02)


def test_singular_covariances_still_give_a_finite_distance():
    x = np.random.default_rng(5).standard_normal((5, 16))  # 5 points in 16 dimensions: rank 4
    shift = np.full(16, 0.5)
    mu, sigma = embedding_stats(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-3
    assert frechet_distance(*embedding_stats(x), *embedding_stats(x + shift)) == pytest.approx(16 * 0.25, abs=1e-3)


def test_stats_need_at_least_two_embeddings():
    with pytest.raises(UserError, match="at least 2"):
        embedding_stats(np.zeros((1, 4)))


# ---- folders ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tokenized):
    from musiclm.pipeline.tokenizer import Tokenizer

    data, _ = tokenized
    return Tokenizer.load(data / "tokenizer")


def write_folder(root: Path, kinds_seconds: list[tuple[str, float]], seed: int) -> Path:
    from musiclm.pipeline.audio_out import write_audio
    from musiclm.pipeline.synth import synth_clip

    root.mkdir(parents=True)
    for i, (kind, seconds) in enumerate(kinds_seconds):
        write_audio(root / f"{i:02d}_{kind}.wav", synth_clip(kind, seconds, 22050, seed + i), 22050)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    gen = write_folder(root / "generated", [("chord", 9.0), ("drums", 6.0), ("melody", 7.0)], seed=0)
    ref = write_folder(root / "reference", [("rain", 8.0), ("arpeggio", 8.0), ("tone", 8.0)], seed=10)
    return gen, ref


def test_clap_embeds_every_window_and_mert_every_window_long_chunk(tokenizer, folders):
    gen, _ = folders
    clap = embed_folder(gen, tokenizer, "clap")
    # tiny CLAP: 4 s windows every 2 s -> 9 s: 3, 6 s: 2, 7 s: 2
    assert clap.shape == (7, tokenizer.clap.embed_dim)
    assert np.allclose(np.linalg.norm(clap, axis=1), 1.0, atol=1e-5)
    mert = embed_folder(gen, tokenizer, "mert")
    assert mert.shape == (2 + 1 + 1, tokenizer.semantic.model.config.hidden_size)  # whole 4 s chunks


def test_run_eval_writes_fad_and_per_file_clap_scores(tokenizer, folders, tmp_path, capsys):
    gen, ref = folders
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a chord\n\ndrums\na melody\n")  # blank lines are not prompts
    out = tmp_path / "eval" / "result.json"
    result = run_eval(gen, ref, tokenizer, prompts=prompts, out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["fad"] > 0 and np.isfinite(result["fad"])
    assert (result["generated"]["windows"], result["reference"]["windows"]) == (7, 9)
    files = sorted(gen.glob("*.wav"))
    assert [s["file"] for s in result["clap_scores"]] == [str(f) for f in files]
    assert [s["prompt"] for s in result["clap_scores"]] == ["a chord", "drums", "a melody"]
    text = tokenizer.clap_text_embed(["a chord", "drums", "a melody"]).numpy()
    for f, t, s in zip(files, text, result["clap_scores"]):
        m = embed_file(f, tokenizer).mean(0)
        assert s["score"] == pytest.approx(float(m @ t / np.linalg.norm(m)), abs=1e-5)
    assert result["clap_score"] == pytest.approx(np.mean([s["score"] for s in result["clap_scores"]]))
    assert "FAD (clap)" in capsys.readouterr().out


def test_a_folder_against_itself_has_no_distance(tokenizer, folders):
    gen, ref = folders
    same = run_eval(gen, gen, tokenizer)["fad"]
    assert abs(same) < 1e-3
    assert run_eval(gen, ref, tokenizer)["fad"] > 100 * abs(same)
    assert np.isfinite(run_eval(gen, ref, tokenizer, embedding="mert")["fad"])


def one_line_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


def test_eval_errors_are_one_line(capsys, folders, tmp_path, tokenized):
    gen, ref = folders
    data, _ = tokenized
    (tmp_path / "empty").mkdir()
    base = ["eval", "--tokenizer", data / "tokenizer"]
    assert "holds no audio files" in one_line_error(capsys, *base, "--generated", tmp_path / "empty", "--reference", ref)
    assert "does not exist" in one_line_error(capsys, *base, "--generated", gen, "--reference", tmp_path / "nope")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("only one\n")
    assert "1 prompts for 3 generated files" in one_line_error(capsys, *base, "--generated", gen, "--reference", ref, "--prompts", prompts)
    assert "--embedding" in one_line_error(capsys, *base, "--generated", gen, "--reference", ref, "--embedding", "vggish")


def test_eval_errors_on_a_device_that_is_not_there(capsys, monkeypatch, folders, tokenized):
    import torch

    gen, ref = folders
    data, _ = tokenized
    base = ["eval", "--tokenizer", data / "tokenizer", "--generated", gen, "--reference", ref]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA is not available" in one_line_error(capsys, *base, "--device", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "1 CUDA device(s)" in one_line_error(capsys, *base, "--device", "cuda:7")
    assert "unknown device 'tpu:x'" in one_line_error(capsys, *base, "--device", "tpu:x")


def test_eval_on_the_cpu_loads_the_tokenizer_there(folders, tokenized, capsys):
    gen, ref = folders
    data, _ = tokenized
    result = run_eval(gen, ref, data / "tokenizer", device="cpu")
    assert result["device"] == "cpu" and np.isfinite(result["fad"])


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    import torch

    from musiclm.metrics import eval_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eval_device("auto") == eval_device(None) == torch.device("cpu")


# tiny CLAP on fp32 CPU: batched and file-by-file window embeddings agree to ~1e-6; the FAD to ~1e-6 relative
@pytest.mark.parametrize("kind", ["clap", "mert"])
def test_batched_windows_give_the_file_by_file_embeddings_and_fad(tokenizer, folders, kind, tmp_path):
    gen, ref = folders
    short = write_folder(tmp_path / "short", [("tone", 2.5)], seed=20)  # shorter than a window: one short window
    files = sorted(gen.glob("*.wav")) + sorted(short.glob("*.wav")) + sorted(ref.glob("*.wav"))
    one_by_one = [embed_file(f, tokenizer, kind) for f in files]
    for batch in (1, 4, 64):  # one window per call; batches cutting through files; every file in one call
        batched = embed_files(files, tokenizer, kind, batch_windows=batch, workers=2)
        assert [b.shape for b in batched] == [e.shape for e in one_by_one]
        for b, e in zip(batched, one_by_one):
            np.testing.assert_allclose(b, e, rtol=1e-4, atol=1e-5)
    per_file = run_eval(gen, ref, tokenizer, embedding=kind, batch_windows=1)["fad"]
    batched = run_eval(gen, ref, tokenizer, embedding=kind, batch_windows=64)["fad"]
    gen_emb, ref_emb = np.concatenate(one_by_one[:3]), np.concatenate(one_by_one[4:])
    reference = frechet_distance(*embedding_stats(gen_emb), *embedding_stats(ref_emb))
    assert batched == pytest.approx(per_file, rel=1e-4)
    assert batched == pytest.approx(reference, rel=1e-4)


def test_files_are_reported_done_in_order_once_each(tokenizer, folders):
    gen, ref = folders
    files = sorted(gen.glob("*.wav")) + sorted(ref.glob("*.wav"))
    done: list[int] = []
    embs = embed_files(files, tokenizer, batch_windows=4, on_file=lambda: done.append(len(done)))
    assert done == list(range(len(files))) and len(embs) == len(files)


def test_an_unreadable_file_stops_the_batches_with_a_user_error(tokenizer, folders, tmp_path):
    gen, _ = folders
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(UserError, match="cannot read .*bad.wav"):
        embed_files([*sorted(gen.glob("*.wav")), bad], tokenizer, batch_windows=2)


def test_progress_goes_to_stderr_and_stdout_keeps_the_result(folders, tokenized, tmp_path, capsys, monkeypatch):
    gen, ref = folders
    data, _ = tokenized
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws its bar as on a terminal
    out = tmp_path / "result.json"
    main(["eval", "--tokenizer", str(data / "tokenizer"), "--generated", str(gen), "--reference", str(ref), "--out", str(out), "--device", "cpu", "--batch-windows", "2"])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("FAD (clap): ") and lines[1] == f"wrote {out}"
    assert "reference" in captured.err and "3/3" in captured.err  # the bar, drawn on stderr
    assert json.loads(out.read_text())["generated"]["files"] == 3


def test_eval_prints_only_the_result_without_a_terminal(folders, tokenized):
    from tests.conftest import run_cli

    gen, ref = folders
    data, _ = tokenized
    proc = run_cli("eval", "--tokenizer", data / "tokenizer", "--generated", gen, "--reference", ref, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("FAD (clap): ") and len(proc.stdout.splitlines()) == 1
    assert "━" not in proc.stderr and "3/3" not in proc.stderr  # no bar when stderr is a pipe
