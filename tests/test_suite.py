"""The suite's own scheduling under pytest-xdist (tests/conftest.py): a module's tests share one worker, and the
modules that start Ray share one worker between them, so one Ray cluster runs at a time."""

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODULE = """
import time

def test_a():
    time.sleep(0.2)

def test_b():
    pass

def test_c():
    time.sleep(0.1)
"""


def test_modules_stay_whole_and_the_ray_modules_share_one_worker(tmp_path):
    # two Ray modules (their names are in RAY_MODULES) and three others, run by the suite's own conftest hooks
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_collection_modifyitems, pytest_xdist_make_scheduler\n")
    for name in ("test_tokenize", "test_manifest", "test_one", "test_two", "test_three"):
        (tmp_path / f"{name}.py").write_text(MODULE)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-v", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    workers = defaultdict(set)
    for worker, module in re.findall(r"\[(gw\d)\] .*?PASSED (?:\S*/)?(test_\w+)\.py::", done.stdout):
        workers[module].add(worker)
    assert len(workers) == 5 and sum(len(w) for w in workers.values()) == 5, workers  # each module on one worker
    assert workers["test_tokenize"] == workers["test_manifest"], workers  # the Ray modules on the same one
