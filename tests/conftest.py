"""Shared fixtures: a synthesised corpus, tokenized once per test session with the tiny preset.

Nothing here reaches a model hub: the tiny preset builds every backbone offline,
and HF_HUB_OFFLINE makes any accidental hub lookup fail fast instead of hanging.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """``python -m musiclm ARGS`` in a fresh process, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "musiclm", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def make_test_corpus(root: Path, n_files: int = 14, seed: int = 0, bad: bool = True) -> dict[str, list[str]]:
    """A corpus of synthesised music (several formats, rates, channel counts), plus bad files.

    Returns {"good": relpaths, "bad": relpaths} (POSIX, relative to ``root``).
    """
    from musiclm.pipeline.synth import make_bad_files, make_corpus

    good = [p.relative_to(root).as_posix() for p in make_corpus(root, n_files, seconds=(3.0, 11.0), seed=seed)]
    bad_rel: list[str] = []
    if bad:
        for name, path in make_bad_files(root / "bad").items():
            if path.is_file():
                bad_rel.append(path.relative_to(root).as_posix())
        short = root / "bad" / "too_short.wav"
        sf.write(short, (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32), 16000)  # 0.5 s
        bad_rel.append(short.relative_to(root).as_posix())
        (root / "notes.txt").write_text("not audio, not listed")
    return {"good": sorted(good), "bad": sorted(bad_rel)}


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a whole test module, its thread count put back after it. A module asks for it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``.

    Tiny models gain nothing from a second thread, and on a busy 2-core machine every op's thread barrier can
    wait out a scheduler slice (a 3 s test took 100 s). Module scope, so that the models a module trains once
    in its own module-scoped fixtures are trained on one thread too (they are set up after this fixture).
    """
    from tests.factories import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def audio_corpus(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_test_corpus(root, n_files=40)


@pytest.fixture(scope="session")
def tokenized(audio_corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The corpus tokenized once with the tiny preset (fits the tokenizer): (DIR, the finished process)."""
    root, _ = audio_corpus
    out = tmp_path_factory.mktemp("tokens") / "dir"
    proc = run_cli("tokenize", root, "--out", out, "--preset", "tiny", "--shard-size", "6")
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.fixture(scope="session")
def trained_runs(tokenized, tmp_path_factory) -> Path:
    """semantic/, coarse/ and fine/ runs trained for 4 steps each on the session corpus, on one thread (their
    tokenizer is found through run.json; each carries the corpus manifest). Tests only read them."""
    from musiclm.config import STAGES, load_config
    from musiclm.training.trainer import run_train
    from tests.factories import torch_threads

    data, _ = tokenized
    root = tmp_path_factory.mktemp("runs")
    with torch_threads(1):
        for stage in STAGES:
            run_train(stage, data, root / stage, load_config("tiny"), steps=4, batch_size=4, eval_every=1000, save_every=1000, device="cpu")
    return root


@pytest.fixture(scope="session")
def pretrained_standins(tmp_path_factory):
    """The ``small`` preset's checkpoints (CLAP-large, MERT-v0, Encodec 24 kHz) rebuilt from their real
    configs at random weights (tests/pretrained.py), saved once per session into a tmp folder.

    ``pretrained_standins["clap"]`` (also "mert", "encodec", or the hub id) is a folder that loads as
    ``model = str(folder)``; each is saved on first use only (CLAP ~740 MB, MERT ~360 MB, Encodec ~90 MB; all three
    about a minute on two CPU cores).
    ``tests.pretrained.standin_config(pretrained_standins)`` is the small preset pointing at all three.
    """
    from tests.pretrained import StandinFolders

    return StandinFolders(tmp_path_factory.mktemp("pretrained"))
