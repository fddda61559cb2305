"""How ``musiclm tokenize`` runs: the same shards every run, a resource plan that leaves room to decode,
a stall named instead of waited out, a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from musiclm.errors import UserError
from musiclm.pipeline.audio import list_audio_files
from musiclm.pipeline.batch_runner import reorder_window
from musiclm.pipeline.ray_runtime import MIN_ACTOR_CPUS, plan_resources
from musiclm.pipeline.decode_stage import TEST_FAULT_ENV
from musiclm.pipeline.tokenize_job import LOCK_FILE
from musiclm.shards.format import list_shards
from tests.conftest import ROOT, make_test_corpus
from tests.ray_head import ray_head

pytestmark = pytest.mark.ray  # tests/conftest.py: each starts Ray (tokenize runs), one at a time

SLOW_DECODE = json.dumps({"delay": 0.6})  # every decode task sleeps up to 0.6 s, at random


# ---- the resource plan --------------------------------------------------------------------------


@pytest.mark.parametrize("cpus", [1, 2, 8])
@pytest.mark.parametrize("gpus", [0, 1, 8])
@pytest.mark.parametrize("workers", [None, 1, 2, 8])
def test_every_resource_plan_leaves_room_to_decode_or_is_refused_in_one_line(cpus, gpus, workers):
    try:
        res = plan_resources(float(cpus), float(gpus), workers, None)
    except UserError as e:
        assert workers is not None, "the default number of workers is one that fits"
        assert "\n" not in str(e) and f"--workers {workers}" in str(e) and "use " in str(e)
        return
    assert workers is None or res.workers == workers
    assert res.decode_cpus >= min(1.0, cpus / 2), "decode tasks get at least one CPU (half of a lone one)"
    assert res.workers * res.cpus + res.decode_cpus <= cpus + 1e-9
    assert 0 < res.task_cpus <= res.decode_cpus, "a decode task fits in what the actors leave"
    assert res.cpus >= MIN_ACTOR_CPUS[res.gpus > 0]
    assert res.workers * res.gpus <= gpus
    assert res.line().startswith(f"resources: {res.workers} actor")


def test_the_plan_keeps_todays_reservations_where_they_left_decode_room():
    # on the CPU an actor reserves the cores its threads use, and one is left to decoding
    assert plan_resources(2, 0, None, None)[:4] == (1, 0.0, 1.0, 1)
    assert plan_resources(8, 0, None, None)[:4] == (1, 0.0, 7.0, 7)
    assert plan_resources(16, 1, None, 0.5)[:4] == (2, 0.5, 4.0, 4)
    assert plan_resources(16, 2, None, None)[:4] == (2, 1.0, 4.0, 4)
    # where they did not, actors take fractions: 2 actors on 2 CPUs, 8 GPU actors on 8 CPUs
    two = plan_resources(2, 0, 2, None)
    assert (two.workers, two.cpus, two.threads, two.decode_cpus) == (2, 0.5, 1, 1.0)
    eight = plan_resources(8, 8, None, None)
    assert eight.workers == 8 and eight.cpus < 1 and eight.decode_cpus >= 1
    with pytest.raises(UserError, match=r"--workers 3 leaves no CPU for decoding on a cluster of 2 CPUs: use --workers 2"):
        plan_resources(2, 0, 3, None)
    with pytest.raises(UserError, match=r"--workers 2 with 1 GPU each needs 2 GPUs, but the Ray cluster has 1"):
        plan_resources(8, 1, 2, None)


# ---- runs on a small corpus --------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A corpus and its good files in plan order: with --batch-seconds 1 each is a planned batch of its own."""
    root = tmp_path_factory.mktemp("runs") / "corpus"
    files = make_test_corpus(root, n_files=16, seed=5)
    listed = [p.relative_to(root).as_posix() for p in list_audio_files(root)]
    return root, [rel for rel in listed if rel in files["good"]]


def args(corpus: Path, out: Path, tokenizer: Path, *extra) -> list:
    return ["tokenize", corpus, "--out", out, "--tokenizer", tokenizer, "--shard-size", "2", "--batch-seconds", "1", *extra]


def shards(out: Path) -> list[tuple[str, list[tuple[str, list[bytes]]], list[str]]]:
    """Each shard: its name, its clips in tar order (key, tokens of every stream) and the keys of its errors file."""
    found = []
    for p in list_shards(out):
        clips = [(s.key, [np.ascontiguousarray(getattr(s, n)).tobytes() for n in ("semantic", "acoustic", "clap", "clap_emb")]) for s in read_samples_of(p)]
        errors = out / "errors" / f"{p.stem}.parquet"
        found.append((p.stem, clips, sorted(pd.read_parquet(errors)["key"]) if errors.exists() else []))
    names = {name for name, _, _ in found}
    for e in sorted((out / "errors").glob("shard-*.parquet")):  # errors files of indices without a tar
        if e.stem not in names:
            found.append((e.stem, [], sorted(pd.read_parquet(e)["key"])))
    return sorted(found)


def read_samples_of(tar: Path):
    import webdataset as wds

    from musiclm.shards.format import TokenSample

    return [TokenSample.from_wds(s) for s in wds.WebDataset([str(tar)], shardshuffle=False, empty_check=False)]


def cli(*a, fault: str | None = None, timeout: float = 280) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop(TEST_FAULT_ENV, None)
    if fault:
        env[TEST_FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "musiclm", *map(str, a)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tokenized, corpus, tmp_path_factory) -> Path:
    """The corpus tokenized by one actor, with nothing in its way."""
    out = tmp_path_factory.mktemp("runs") / "one"
    proc = cli(*args(corpus[0], out, tokenized[0] / "tokenizer", "--workers", "1"))
    assert proc.returncode == 0, proc.stderr
    assert len(list_shards(out)) >= 4
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_actors_on_this_machine_give_the_shards_of_one(tokenized, corpus, uninterrupted, tmp_path):
    """--workers 2 on the 2-CPU test machine: planned with room to decode, it completes (it used to hang)."""
    out = tmp_path / "two"
    proc = cli(*args(corpus[0], out, tokenized[0] / "tokenizer", "--workers", "2"))
    if proc.returncode == 2:  # a machine too small is refused up front, in one line
        assert len(proc.stderr.strip().splitlines()) == 1 and "--workers 2 leaves no CPU for decoding" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert "resources: 2 actors" in proc.stderr and "left for decoding" in proc.stderr
    assert shards(out) == shards(uninterrupted)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_decode_tasks_of_random_delay_give_the_same_shards(tokenized, corpus, uninterrupted, tmp_path):
    out = tmp_path / "delayed"
    proc = cli(*args(corpus[0], out, tokenized[0] / "tokenizer", "--workers", "2"), fault=json.dumps({"delay": 1.5, "first": 4}))
    assert proc.returncode == 0, proc.stderr
    assert shards(out) == shards(uninterrupted)


def _wait_for_shards(out: Path, n: int, proc: subprocess.Popen) -> None:
    while len(list_shards(out)) < n:
        assert proc.poll() is None, "the run ended before the moment the test waits for"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_stopped_run_resumed_matches_an_uninterrupted_one_shard_for_shard(tokenized, corpus, uninterrupted, tmp_path, sig):
    from filelock import FileLock

    out = tmp_path / "stopped"
    a = args(corpus[0], out, tokenized[0] / "tokenizer", "--workers", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", TEST_FAULT_ENV: SLOW_DECODE}
    # a session of its own: Ctrl-C reaches every process of the terminal's group (Ray's too), as here
    run = subprocess.Popen([sys.executable, "-m", "musiclm", *map(str, a)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    _wait_for_shards(out, 2, run)
    if sig == signal.SIGINT:
        os.killpg(run.pid, sig)
    else:
        run.send_signal(sig)
    _, err = run.communicate(timeout=120)
    kept = len(list_shards(out))
    if sig == signal.SIGKILL:
        assert run.returncode == -signal.SIGKILL
    else:
        assert run.returncode == 128 + sig
        assert err.strip().splitlines()[-1] == f"stopped: {kept} shards kept; re-run the same command to resume"
        assert "Traceback" not in err and "SIGTERM received" not in err and "logging.cc" not in err, err
        FileLock(str(out / LOCK_FILE), timeout=0).acquire()  # released
    assert kept >= 2
    before = shards(out)
    proc = cli(*a)
    assert proc.returncode == 0, proc.stderr
    want = shards(uninterrupted)
    assert shards(out)[: len(before)] == before, "a finished shard was redone"
    assert shards(out) == want
    assert cli("verify", out).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_decode_task_that_never_returns_is_named_and_a_rerun_completes(tokenized, corpus, uninterrupted, tmp_path):
    root, planned = corpus
    stuck = planned[4]  # batch 4: batches 0-3 make finished shards
    config = tmp_path / "stall.toml"
    config.write_text('base = "tiny"\n[tokenize]\nstall_seconds = 20\n')
    out = tmp_path / "stalled"
    a = args(root, out, tokenized[0] / "tokenizer", "--workers", "1")
    proc = cli(*a, "--config", config, fault=json.dumps({"hang": stuck}))
    assert proc.returncode == 2
    err = " ".join(proc.stderr.split())
    assert "tokenize stalled: no batch finished for" in err and "(tokenize.stall_seconds = 20)" in err
    # on 2 CPUs the actor holds one and the stuck task the other: the next batches wait for it
    assert f"decode task of batch 4 ({stuck}): not returned after" in err and "running (it holds one of the 1 CPUs left for decoding)" in err
    assert f"decode task of batch 5 ({planned[5]}): not returned after" in err and "waiting for a CPU (0 of 2 free)" in err
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: tokenize stalled") and "re-run the same command to resume" in last
    before = shards(out)
    assert len(before) >= 2 and before == shards(uninterrupted)[: len(before)], "finished shards are kept"

    proc = cli(*a)
    assert proc.returncode == 0, proc.stderr
    assert shards(out) == shards(uninterrupted)
    assert cli("verify", out).returncode == 0


@pytest.fixture()
def stand_in():
    """A Ray cluster of 8 CPUs on this machine (``ray start --head``) whose workers decode with a fault; yields
    a function that starts it with the given fault and returns its address."""
    with ExitStack() as stack:
        yield lambda fault: stack.enter_context(ray_head(num_cpus=8, env={TEST_FAULT_ENV: fault}))


def keys(out: Path) -> list[tuple[str, list[str]]]:
    """Each shard's clip keys in tar order (membership: the same at any torch thread count)."""
    return [(name, [k for k, _ in clips]) for name, clips, _ in shards(out)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_reorder_buffer_holds_a_window_of_batches_behind_one_that_never_comes(tokenized, corpus, uninterrupted, tmp_path, stand_in):
    """On a stand-in cluster of 8 CPUs, 2 actors leave 2 CPUs to decoding: with one decode task stuck, the other
    batches go on until the reorder window is full, and wait there; none is held beyond it."""
    root, planned = corpus
    stuck = planned[2]
    config = tmp_path / "stall.toml"
    config.write_text('base = "tiny"\n[tokenize]\nstall_seconds = 20\n')
    out = tmp_path / "stalled"
    a = args(root, out, tokenized[0] / "tokenizer", "--workers", "2", "--config", config)
    proc = cli(*a, "--address", stand_in(json.dumps({"hang": stuck})))
    assert proc.returncode == 2, proc.stderr
    err = " ".join(proc.stderr.split())
    assert "resources: 2 actors x (3 CPU, 0 GPU, 3 threads); 2 CPU left for decoding (Ray cluster: 8 CPUs, 0 GPUs)" in err
    assert f"decode task of batch 2 ({stuck}): not returned after" in err and "running: 1 of 8 CPUs are free" in err
    held = reorder_window(2) - 1
    assert f"{held} later batches finished and wait for batch 2 ({stuck}) (reorder buffer, at most {held})" in err, proc.stderr
    assert keys(out) == keys(uninterrupted)[: len(keys(out))]

    proc = cli(*a)  # again on this machine's local Ray (2 CPUs), without the fault
    assert proc.returncode == 0, proc.stderr
    assert keys(out) == keys(uninterrupted)


def _actor_pids(name: str) -> list[int]:
    """Processes whose title Ray set to ``ray::NAME`` (an actor of this class)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "cmdline").read_bytes().split(b"\0")[0].startswith(f"ray::{name}".encode()):
                found.append(int(d.name))
        except OSError:
            continue
    return found


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent's pid
    return False


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_actor_killed_mid_run_ends_it_in_one_line_and_a_rerun_completes(tokenized, corpus, uninterrupted, tmp_path):
    """The kernel's OOM killer takes an actor: one line (which actor, which batch), exit 2, finished shards kept."""
    out = tmp_path / "killed"
    a = args(corpus[0], out, tokenized[0] / "tokenizer", "--workers", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", TEST_FAULT_ENV: SLOW_DECODE}
    run = subprocess.Popen([sys.executable, "-m", "musiclm", *map(str, a)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    _wait_for_shards(out, 1, run)
    mine = [pid for pid in _actor_pids("TokenizeActor") if _descends(pid, run.pid)]
    assert len(mine) == 1
    os.kill(mine[0], signal.SIGKILL)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: tokenize stopped: actor 1 of 1 died while on batch ") and last.endswith("re-run the same command to resume")
    assert "Traceback" not in err
    proc = cli(*a)
    assert proc.returncode == 0, proc.stderr
    assert shards(out) == shards(uninterrupted)
