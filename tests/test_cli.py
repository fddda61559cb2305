"""Bad input on the command line: one line saying what is wrong and what to do, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from musiclm.cli import main


def run(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    return e.value.code, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def audio_folder(tmp_path: Path) -> Path:
    from musiclm.pipeline.synth_corpus import make_corpus

    root = tmp_path / "music"
    make_corpus(root, 1, seconds=(2.0, 2.0), formats=("wav",), subfolders=False)
    return root


def test_missing_corpus(capsys, tmp_path):
    code, err = run(capsys, "tokenize", tmp_path / "nope", "--out", tmp_path / "out", "--preset", "tiny")
    assert code == 2 and "corpus folder not found" in one_line(err)


def test_corpus_without_audio(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    code, err = run(capsys, "tokenize", tmp_path / "empty", "--out", tmp_path / "out", "--preset", "tiny")
    assert code == 2 and "no audio files" in one_line(err)


def test_unknown_preset(capsys, tmp_path):
    code, err = run(capsys, "tokenize", audio_folder(tmp_path), "--out", tmp_path / "out", "--preset", "huge")
    line = one_line(err)
    assert code == 2 and "unknown preset 'huge'" in line and "tiny" in line


def test_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = run(capsys, "tokenize", audio_folder(tmp_path), "--out", blocker / "sub", "--preset", "tiny")
    assert code == 2 and "cannot write to" in one_line(err)
    code, err = run(capsys, "tokenize", audio_folder(tmp_path), "--out", blocker, "--preset", "tiny")
    assert code == 2 and "is a file" in one_line(err)


@pytest.mark.parametrize(
    "text, expect",
    [
        ("this is [not toml", "not valid TOML"),
        ('base = "tiny"\n[model]\nn_layerz = 3\n', "unknown key 'model.n_layerz'"),
        ('base = "tiny"\n[model]\nn_layers = "three"\n', "'model.n_layers' should be int"),
        ('base = "nope"\n', "unknown preset 'nope'"),
    ],
)
def test_malformed_config(capsys, tmp_path, text, expect):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    code, err = run(capsys, "tokenize", audio_folder(tmp_path), "--out", tmp_path / "out", "--config", cfg)
    assert code == 2 and expect in one_line(err)


def test_missing_argument_is_one_line(capsys, tmp_path):
    code, err = run(capsys, "tokenize", "--preset", "tiny")
    line = one_line(err)
    assert code == 2 and "Missing" in line and "--help" in line


def test_unknown_option_is_one_line(capsys):
    code, err = run(capsys, "stats", "x", "--frobnicate")
    assert code == 2 and "frobnicate" in one_line(err)


def test_an_unexpected_error_keeps_its_own_traceback(monkeypatch, tmp_path):
    """Only user errors become one line; a bug still shows what really went wrong."""
    import musiclm.commands.stats as stats

    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(stats, "run_stats", boom)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["stats", str(tmp_path)])


def test_an_unreachable_ray_cluster(capsys, tmp_path):
    code, err = run(capsys, "tokenize", audio_folder(tmp_path), "--out", tmp_path / "out", "--preset", "tiny", "--address", "127.0.0.1:9")
    assert code == 2 and "cannot reach the Ray cluster at 127.0.0.1:9" in one_line(err)
