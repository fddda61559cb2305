"""musiclm as a user installs it: a wheel built from the checkout, installed into a fresh virtual
environment outside it, runs the tiny chain with the checkout nowhere on its import path.

The fresh environment has no pip and installs nothing from an index: the wheel goes in with
``pip --python`` (no dependencies), and one ``.pth`` line puts the test environment's
site-packages after it for the dependencies. That line adds a folder, not a site directory,
so the ``.pth`` files in it are not run: the test environment's editable install of this
checkout (a meta-path finder) stays out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "musiclm"
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE")  # what pyproject.toml names beside the package


def package_files() -> list[str]:
    """Every file of the package in the checkout (POSIX, relative to the root): git's tracked files
    when the checkout is a git repository, else every file but byte code."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", PACKAGE], cwd=ROOT, capture_output=True, check=True).stdout
        tracked = [name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        tracked = []
    if tracked:
        return sorted(name for name in tracked if (ROOT / name).is_file())  # a file deleted but not yet committed is gone
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / PACKAGE).rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the checkout as it is now, built from a copy so that no build folder or egg-info
    lands in the checkout (other runs may be using it)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / PACKAGE, src / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # No build isolation: setuptools comes from this environment, so nothing is downloaded.
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(work / "dist"), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = (work / "dist").glob(f"{PACKAGE}-*.whl")
    return built


def test_the_wheel_holds_every_file_of_the_package(wheel):
    """Presets and any other file the package reads at run time travel with it, not only modules."""
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [line for line in whl.read(metadata).decode().splitlines() if line.startswith("Requires-Python:")]
    missing = [name for name in package_files() if name not in names]
    assert not missing, f"files of the package missing from the wheel: {missing}"
    assert {f"{PACKAGE}/configs/{p}.toml" for p in ("tiny", "small", "large")} <= names
    assert requires == ["Requires-Python: >=3.11"], "tomllib and typing.Self need Python 3.11"


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment holding the wheel; returns its python."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)]
    proc = subprocess.run(pip, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # this environment's, for the dependencies
    Path(purelib, "test-dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    return python


def run_installed(python: Path, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``args`` (a console script of the environment, or its python) from ``cwd``, outside the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(COLUMNS="200", PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    exe = python if args[0] == "python" else python.parent / args[0]
    proc = subprocess.run([str(exe), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


WHERE = """
import sys, musiclm
from musiclm import MusicLM
from musiclm.config import load_config, preset_names
print(musiclm.__file__)
print(MusicLM.__module__)
print(" ".join(preset_names()))
print(load_config("large").model.n_layers, load_config(path="mine.toml").model.n_layers, load_config(path="mine.toml").tokenize.clap.model)
print(sum("editable" in str(getattr(f, "__module__", "")) for f in sys.meta_path))
print("\\n".join(sys.path))
"""


@pytest.mark.slow
@pytest.mark.ray
def test_the_installed_wheel_runs_the_tiny_chain_outside_the_checkout(installed, tmp_path):
    from musiclm.pipeline.synth_corpus import make_corpus

    env_root = installed.parent.parent.resolve()
    (tmp_path / "mine.toml").write_text('base = "small"\n[model]\nn_layers = 3\n')
    lines = run_installed(installed, tmp_path, "python", "-c", WHERE).stdout.splitlines()
    module, generation, presets, layers, editable_finders, *path = lines
    assert Path(module).resolve().is_relative_to(env_root), f"musiclm was imported from {module}, not from the wheel"
    assert generation == "musiclm.generation.model" and presets == "large open small tiny"
    assert layers == "24 3 laion/larger_clap_music", "--preset and base = \"small\" read the presets the wheel carries"
    assert editable_finders == "0", "the editable install of the checkout is not active"
    assert [p for p in path if p and (Path(p) / PACKAGE).is_dir()] == [str(env_root / Path(module).parent.parent.relative_to(env_root))], "only the wheel's copy is on the path"

    # Enough audio for the tiny vocabularies (CLAP 4 x 16 codes at 3 points each, 4 s windows at a 1 s hop).
    make_corpus(tmp_path / "music", 8, seconds=(14.0, 14.0), seed=0)
    run_installed(installed, tmp_path, "musiclm", "tokenize", "music", "--out", "data", "--preset", "tiny")
    assert list((tmp_path / "data" / "shards").glob("shard-*.tar")), "tokenize wrote shards"
    for stage in ("semantic", "coarse", "fine"):
        run_installed(installed, tmp_path, "musiclm", "train", stage, "--data", "data", "--out", f"runs/{stage}", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--device", "cpu")
    run_installed(installed, tmp_path, "musiclm", "generate", "a calm piano", "--model", "runs", "--seconds", "1", "--out", "out.wav", "--device", "cpu", "--precision", "fp32")  # int8's quantisation costs more than it saves at tiny
    import soundfile as sf

    info = sf.info(tmp_path / "out.wav")
    assert info.frames == info.samplerate, "1 s of audio"
