"""Shared fixtures: a synthesised corpus, tokenized once per test run with the tiny preset; and the rules that let
the suite run on several pytest-xdist workers (``make test``: ``pytest -n 2``).

Nothing here reaches a model hub: the tiny preset builds every backbone offline,
and HF_HUB_OFFLINE makes any accidental hub lookup fail fast instead of hanging.

Under xdist (:class:`ModuleScheduling`, this suite's own scheduler):

- a test that starts Ray itself (a tokenize run, ``ray.init``) carries the ``ray`` marker and lives in one of
  :data:`RAY_MODULES`; those modules are one unit of work, sent first, to one worker, so one Ray cluster runs at
  a time (each ``ray`` test also holds a lock shared by the workers, in case another scheduler is chosen);
- every other module is a unit of its own, so a module's own fixtures are built on one worker only;
- the session corpus, its tokenized folder and the trained runs are made once per run, by the first worker to ask
  (the tokenize run under the Ray lock), and read by both (:func:`made_once`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from filelock import FileLock

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

ROOT = Path(__file__).resolve().parents[1]


# ---- running on several xdist workers -------------------------------------------------------------------------------
def _run_dir(config: pytest.Config) -> Path | None:
    """The tmp folder shared by the xdist workers of this test run (pytest-N/, above each worker's basetemp
    popen-gwN/, which xdist passes as --basetemp), or None when not under xdist."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return None
    return Path(config.getoption("basetemp")).parent


_RAY_LOCK: FileLock | None = None


def ray_lock(config: pytest.Config):
    """A lock held across the xdist workers while Ray runs (reentrant within a worker); no lock without xdist."""
    global _RAY_LOCK
    run = _run_dir(config)
    if run is None:
        return nullcontext()
    if _RAY_LOCK is None:
        _RAY_LOCK = FileLock(run / "ray.lock")
    return _RAY_LOCK


# the test modules holding a test that starts Ray: under xdist they run together, on one worker
RAY_MODULES = frozenset(
    {"test_finetune", "test_integrity_data", "test_manifest", "test_recipe_open", "test_recipe_small", "test_tokenize", "test_tokenize_runs", "test_wheel"}
)


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: ``ray`` for the modules of :data:`RAY_MODULES`, else its module."""
    module = nodeid.split("::", 1)[0]
    return "ray" if Path(module).stem in RAY_MODULES else module


def pytest_collection_modifyitems(config, items):
    stray = [item.nodeid for item in items if item.get_closest_marker("ray") and work_unit(item.nodeid) != "ray"]
    if stray:
        raise pytest.UsageError(f"tests marked ray outside tests/conftest.py's RAY_MODULES: {stray}")


@pytest.hookimpl(optionalhook=True)  # an xdist hook: only called when pytest-xdist runs the suite
def pytest_xdist_make_scheduler(config, log):
    """Whole modules per worker, the Ray modules as one unit (xdist's ``loadgroup`` is not used: its group marks
    do not reach the scheduler under pytest 9.2, which no longer lets a plugin rename a test's node id)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

        def _assign_work_unit(self, node) -> None:
            if "ray" in self.workqueue:  # the longest unit starts first
                self.workqueue.move_to_end("ray", last=False)
            super()._assign_work_unit(node)

    return ModuleScheduling(config, log)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # outside pytest-timeout's wrapper: waiting is not running
def pytest_runtest_protocol(item, nextitem):
    """A ``ray`` test holds the Ray lock from its setup (module fixtures that tokenize included) to its teardown."""
    with ray_lock(item.config) if item.get_closest_marker("ray") else nullcontext():
        yield


def made_once(config: pytest.Config, tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``name`` after ``make(folder)`` filled it, once per test run: in this session's tmp folder, or
    under xdist in the run's shared tmp folder, made by the first worker to ask (under a lock; the others wait,
    then reuse it). A ``make`` that fails leaves no folder for the others: the next to ask tries again."""
    root = _run_dir(config)
    if root is None:
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    folder, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def run_cli(*args: str, timeout: float = 600, threads: int | None = None, **kw) -> subprocess.CompletedProcess:
    """``python -m musiclm ARGS`` in a fresh process, as a user would run it; ``threads``: its torch threads
    (``OMP_NUM_THREADS``), for a run that shares the machine with the other xdist worker."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return subprocess.run([sys.executable, "-m", "musiclm", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def make_test_corpus(root: Path, n_files: int = 14, seed: int = 0, bad: bool = True) -> dict[str, list[str]]:
    """A corpus of synthesised music (several formats, rates, channel counts), plus bad files.

    Returns {"good": relpaths, "bad": relpaths} (POSIX, relative to ``root``).
    """
    from musiclm.pipeline.synth_corpus import make_bad_files, make_corpus

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
def audio_corpus(pytestconfig, tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    def make(root: Path) -> None:
        (root.parent / f"{root.name}.json").write_text(json.dumps(make_test_corpus(root, n_files=40)))

    root = made_once(pytestconfig, tmp_path_factory, "corpus", make)
    return root, json.loads((root.parent / f"{root.name}.json").read_text())


@pytest.fixture(scope="session")
def tokenized(audio_corpus, pytestconfig, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The corpus tokenized once with the tiny preset (fits the tokenizer): (DIR, the finished process)."""
    root, _ = audio_corpus

    def make(folder: Path) -> None:
        proc = run_cli("tokenize", root, "--out", folder / "dir", "--preset", "tiny", "--shard-size", "6")
        assert proc.returncode == 0, proc.stderr
        (folder / "process.json").write_text(json.dumps({"args": proc.args, "stdout": proc.stdout, "stderr": proc.stderr}))

    with ray_lock(pytestconfig):  # taken before made_once's own lock, as a ray test (holding it) may ask for this
        folder = made_once(pytestconfig, tmp_path_factory, "tokens", make)
    proc = json.loads((folder / "process.json").read_text())
    return folder / "dir", subprocess.CompletedProcess(proc["args"], 0, proc["stdout"], proc["stderr"])


def _recipe(preset: str, standins, pytestconfig, tmp_path_factory) -> dict:
    from tests.small_recipe import make_recipe, recipe_paths

    with ray_lock(pytestconfig):  # taken before made_once's own lock, as a ray test (holding it) may ask for this
        work = made_once(pytestconfig, tmp_path_factory, f"recipe_{preset}", lambda folder: make_recipe(folder, standins, preset))
    return recipe_paths(work)


@pytest.fixture(scope="module")
def small_recipe(pretrained_standins, pytestconfig, tmp_path_factory) -> dict:
    """The `small` recipe's corpus tokenized at full size (tests/small_recipe.py), once per run:
    {"config", "data", "work", "log"}."""
    return _recipe("small", pretrained_standins, pytestconfig, tmp_path_factory)


@pytest.fixture(scope="module")
def open_recipe(pretrained_standins, pytestconfig, tmp_path_factory) -> dict:
    """The `open` recipe's corpus (w2v-BERT 2.0 and DAC 24 kHz for MERT and Encodec), as :func:`small_recipe`."""
    return _recipe("open", pretrained_standins, pytestconfig, tmp_path_factory)


@pytest.fixture(scope="session")
def trained_runs(tokenized, pytestconfig, tmp_path_factory) -> Path:
    """semantic/, coarse/ and fine/ runs trained for 4 steps each on the session corpus, on one thread (their
    tokenizer is found through run.json; each carries the corpus manifest). Tests only read them."""
    from musiclm.config import STAGES, load_config
    from musiclm.training.trainer import run_train
    from tests.factories import torch_threads

    data, _ = tokenized

    def make(root: Path) -> None:
        with torch_threads(1):
            for stage in STAGES:
                run_train(stage, data, root / stage, load_config("tiny"), steps=4, batch_size=4, eval_every=1000, save_every=1000, device="cpu")

    return made_once(pytestconfig, tmp_path_factory, "runs", make)


@pytest.fixture(scope="session")
def pretrained_standins(pytestconfig, tmp_path_factory):
    """The checkpoints of the ``small`` and ``open`` presets (CLAP-large, MERT-v0, Encodec 24 kHz, w2v-BERT 2.0,
    DAC 24 kHz) rebuilt from their real configs at random weights (tests/pretrained.py), each saved once per
    test run (shared by the xdist workers) on first use.

    ``pretrained_standins["clap"]`` (also "mert", "encodec", "w2v-bert", "dac", or the hub id) is a folder that
    loads as ``model = str(folder)`` (CLAP ~740 MB, MERT ~360 MB, Encodec ~90 MB, w2v-BERT ~2.3 GB, DAC ~300 MB).
    ``tests.pretrained.standin_config(pretrained_standins, preset)`` is the preset pointing at them.
    """
    from tests.pretrained import StandinFolders

    def place(key: str, save) -> Path:
        return made_once(pytestconfig, tmp_path_factory, f"standin-{key}", save)

    return StandinFolders(tmp_path_factory.mktemp("pretrained"), place=place)
