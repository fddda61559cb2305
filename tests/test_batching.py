"""Batched backbone calls: the driver's batch plan, one batch through the tokenizer, CUDA
out-of-memory back-off, and the precision setting scoped to the backbone calls."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from musiclm.config import load_config
from musiclm.errors import UserError
from musiclm.pipeline.ray_runtime import Resources, plan_cluster_resources
from musiclm.pipeline.batch_plan import plan_batches
from musiclm.pipeline.tokenizer import Tokenizer


def test_plan_keeps_files_whole_in_order_and_within_the_batch_seconds():
    files = [("a", 10.0), ("b", 15.0), ("c", 8.0), ("d", 40.0), ("e", 5.0), ("f", 30.0)]
    batches = plan_batches(files, 32.0, first=7)
    assert batches == [
        (7, [("a", 10.0), ("b", 15.0)]),
        (8, [("c", 8.0)]),
        (9, [("d", 40.0)]),  # longer than a batch: a batch of its own, never split
        (10, [("e", 5.0)]),
        (11, [("f", 30.0)]),
    ]
    # the plan is a function of the listing alone: the same files give the same batches
    assert plan_batches(files, 32.0, first=7) == batches
    assert plan_batches([], 32.0) == []


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """The tiny backbones with random quantizers: enough to compare call paths."""
    t = Tokenizer.from_config(load_config("tiny").tokenize)
    rng = np.random.default_rng(0)
    d = t.semantic.model.config.hidden_size
    t.quantizers = {
        "semantic_centroids": rng.standard_normal((32, d)).astype(np.float32),
        "semantic_norm": np.stack([np.zeros(d), np.ones(d)]).astype(np.float32),
        "clap_codebooks": 0.3 * rng.standard_normal((4, 16, t.clap.embed_dim)).astype(np.float32),
    }
    return t


def clip(tok: Tokenizer, seconds: float, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 48000)) / 48000
    x = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) + 0.05 * rng.standard_normal(len(t))
    return {sr: x[:: 48000 // sr][: int(seconds * sr)].astype(np.float32) for sr in tok.sample_rates}


def test_a_batch_gives_every_clip_its_own_tokens(tok):
    clips = [clip(tok, 8.0, 0), clip(tok, 8.0, 1), clip(tok, 5.0, 2), clip(tok, 2.5, 3), clip(tok, 8.0, 4)]
    batched = tok.tokenize_batch(clips)
    for c, b in zip(clips, batched):
        alone = tok.tokenize(c)
        assert set(b) == {"semantic", "acoustic", "clap", "clap_emb"}
        for name in ("semantic", "acoustic", "clap"):
            assert b[name].shape == alone[name].shape and b[name].dtype == np.uint16
            assert np.mean(b[name] == alone[name]) >= 0.99, name
        assert len(b["semantic"]) == pytest.approx(len(c[16000]) / 16000 * tok.semantic.frame_rate, abs=2)


def test_a_clip_that_fails_is_reported_and_its_neighbours_go_on(tok, monkeypatch):
    clips = [clip(tok, 4.0, 0), clip(tok, 4.0, 1), clip(tok, 4.0, 2)]
    poisoned = clips[1][tok.codec.sample_rate]
    real = tok.encode_acoustic

    def encode(audio):
        if any(np.array_equal(row, poisoned) for row in np.atleast_2d(audio)):
            raise RuntimeError("bad clip")
        return real(audio)

    monkeypatch.setattr(tok, "encode_acoustic", encode)
    out = tok.tokenize_batch(clips)
    assert isinstance(out[1], RuntimeError)
    for i in (0, 2):
        np.testing.assert_array_equal(out[i]["acoustic"], tok.tokenize_batch([clips[i]])[0]["acoustic"])


def test_cuda_out_of_memory_halves_the_rows_per_call_and_says_so_once(tok, monkeypatch):
    clips = [clip(tok, 4.0, i) for i in range(6)]
    expected = tok.tokenize_batch(clips)
    real = tok.semantic_features
    calls: list[int] = []

    def mert(audio):
        calls.append(len(np.atleast_2d(audio)))
        if len(np.atleast_2d(audio)) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(audio)

    monkeypatch.setattr(tok, "semantic_features", mert)
    monkeypatch.setattr(tok, "backoffs", [])
    monkeypatch.setattr(tok, "_max_rows", {})
    got = tok.tokenize_batch(clips)
    assert calls == [6, 3] + [1] * 6
    assert tok.backoffs == ["semantic: CUDA out of memory at 6 rows per call, fewer from now on"]
    for g, e in zip(got, expected):
        assert not isinstance(g, Exception)
        assert np.mean(g["semantic"] == e["semantic"]) >= 0.99
    calls.clear()
    tok.tokenize_batch(clips)  # the smaller size sticks: no new out-of-memory, no new line
    assert calls == [1] * 6 and len(tok.backoffs) == 1


def test_precision_runs_under_autocast_inside_the_backbone_calls_only(tok):
    seen = {}
    bf16 = dataclasses.replace(tok.cfg, precision="bf16")
    low = Tokenizer(bf16, tok.clap, tok.semantic, tok.codec, tok.quantizers)
    with low.precision():
        seen["inside"] = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
    assert seen["inside"] == (True, torch.bfloat16)
    assert not torch.is_autocast_enabled("cpu")
    with tok.precision():
        assert not torch.is_autocast_enabled("cpu")
    c = [clip(tok, 8.0, 5)]
    ours, full = low.tokenize_batch(c)[0], tok.tokenize_batch(c)[0]
    # bf16 moves features by ~1e-2 relative: tokens agree mostly, not always (benchmarks/bench_agreement.py)
    assert not np.array_equal(ours["clap_emb"], full["clap_emb"])
    assert np.mean(ours["semantic"] == full["semantic"]) > 0.5
    # Encodec stays in fp32 whatever the precision: under autocast most of its codes would change
    np.testing.assert_array_equal(ours["acoustic"], full["acoustic"])
    assert not torch.is_autocast_enabled("cpu")


def test_an_unknown_precision_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('base = "tiny"\n[tokenize]\nprecision = "int8"\n')
    with pytest.raises(UserError, match="tokenize.precision"):
        load_config(path=path)


class FakeRay:
    def __init__(self, cpus: int, gpus: int):
        self.total = {"CPU": float(cpus), "GPU": float(gpus)}

    def cluster_resources(self) -> dict:
        return self.total


def test_actors_share_a_gpu_with_a_fraction_per_worker():
    assert plan_cluster_resources(FakeRay(16, 1), None, 0.5)[:4] == Resources(workers=2, gpus=0.5, cpus=4.0, threads=4)[:4]
    assert plan_cluster_resources(FakeRay(16, 2), None, None)[:4] == Resources(workers=2, gpus=1.0, cpus=4.0, threads=4)[:4]
    # on the CPU an actor reserves the cores its threads use, one is left to decoding (tests/test_tokenize_runs.py: the plan)
    assert plan_cluster_resources(FakeRay(2, 0), None, None)[:4] == Resources(workers=1, gpus=0.0, cpus=1.0, threads=1)[:4]
    assert plan_cluster_resources(FakeRay(8, 0), None, None)[:4] == Resources(workers=1, gpus=0.0, cpus=7.0, threads=7)[:4]
    with pytest.raises(UserError, match="--gpus-per-worker"):
        plan_cluster_resources(FakeRay(8, 0), None, 0.5)



def test_the_tokenizer_imports_without_audio_io_ray_or_faiss():
    """The GPU machines have torch but none of soundfile, soxr, ray or faiss: the tokenizer, generation
    and the benchmarks meant for those machines (gpu_check.py, bench_generate.py) must still import there."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('soundfile', 'soxr', 'ray', 'faiss'):\n"
        "            raise ImportError('absent: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from musiclm.pipeline.tokenizer import Tokenizer\n"
        "import runpy, musiclm.generation, musiclm.commands.generate\n"
        "for script in ('benchmarks/gpu_check.py', 'benchmarks/bench_generate.py'):\n"
        "    runpy.run_path(script, run_name='imported')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr
