"""``musiclm train``: the run folder, checkpoints, exact resume, DDP, errors, and that every stage learns."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from musiclm.cli import main
from musiclm.config import load_config
from musiclm.models.layout import IGNORE, layout_for
from musiclm.models.transformer import MusicTransformer
from musiclm.shards.format import TokenInfo
from musiclm.shards.stats import unigram_entropy
from musiclm.training import checkpoint as ckpt
from musiclm.training.corpus_split import split_data
from musiclm.training.data import collate
from musiclm.training.optim import LossModule, accumulate_gradients, lr_factor, param_groups
from musiclm.training.run_folder import load_stage
from musiclm.training.trainer import run_train
from tests.factories import fake_info_json, fake_sample, fake_shards, torch_threads, write_tokenizer_json

REPO = Path(__file__).resolve().parents[1]
CFG = load_config("tiny")
# one BLAS thread: on a busy 2-core machine two threads per process run tiny steps 10x slower
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread for the whole module


def write_corpus(folder: Path, n_clips: int, shard_size: int = 8, fingerprint: str = "fake-0", seed: int = 0) -> Path:
    """Clips of 3-8 s whose codes come in runs (tests/factories.py), so a model can learn them."""
    info_json = fake_info_json(fingerprint=fingerprint)
    info = TokenInfo.from_json(info_json)
    rng = np.random.default_rng(seed)
    clips = (fake_sample(info, float(rng.uniform(3.0, 8.0)), rng, name=f"{fingerprint}/clip{i}.wav") for i in range(n_clips))
    return fake_shards(folder, clips, info_json=info_json, shard_size=shard_size)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """48 clips in 6 shards: 5 train, 1 held out for validation (tiny's val_fraction 0.2)."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), 48)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny-log1.toml"
    path.write_text('base = "tiny"\n[train]\nlog_every = 1\n')
    return path


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory) -> Path:
    """A semantic run of 7 steps, saving every 3 (tiny keeps the last 2 checkpoints)."""
    out = tmp_path_factory.mktemp("run") / "semantic"
    with torch_threads(1):
        run_train("semantic", corpus, out, CFG, steps=7, save_every=3, eval_every=3, batch_size=4)
    return out


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- pieces ---------------------------------------------------------------------------------------------------------


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    f = [lr_factor(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1) and lr_factor(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_only_linear_weights_are_decayed():
    model = MusicTransformer.for_layout(CFG.model, layout_for("coarse", TokenInfo.from_json(fake_info_json()), CFG.stages.coarse))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(kept) and decayed | kept == set(names.values())
    assert "embed.weight" in kept and "norm.weight" in kept and "blocks.0.attn_norm.weight" in kept
    assert "heads.0.weight" in decayed and "blocks.0.attn.qkv.weight" in decayed and "blocks.1.mlp.down.weight" in decayed


def test_accumulating_n_micro_batches_gives_the_gradient_of_one_batch_of_all_of_them():
    """Each micro-batch's loss is a mean over its labels; with equal label counts (whole windows,
    no pads), n micro-batches of b, each loss divided by n, sum to the gradient of one batch of n*b."""
    info = TokenInfo.from_json(fake_info_json())
    layout = layout_for("coarse", info, CFG.stages.coarse)  # three target levels: every head gets a gradient
    rng = np.random.default_rng(0)
    windows = [layout.crop(fake_sample(info, 6.0, rng, name=f"c{i}.wav"), rng) for i in range(6)]
    encoded = [layout.encode(w, drop_cond=bool(i % 3 == 0)) for i, w in enumerate(windows)]
    assert len({int((e.labels != IGNORE).sum()) for e in encoded}) == 1  # equal label counts

    def gradients(batches: list[dict]) -> tuple[dict[str, torch.Tensor], float]:
        torch.manual_seed(0)
        model = MusicTransformer.for_layout(CFG.model, layout).train()
        losses = accumulate_gradients(LossModule(model), iter(batches), len(batches), torch.device("cpu"), distributed=False)
        assert len(losses) == len(batches) and all(x.grad_fn is None for x in losses)
        return {n: p.grad.clone() for n, p in model.named_parameters()}, float(sum(losses)) / len(losses)

    one, one_loss = gradients([collate(encoded, [str(i) for i in range(6)])])
    three, three_loss = gradients([collate(encoded[i : i + 2], ["a", "b"]) for i in range(0, 6, 2)])
    assert three_loss == pytest.approx(one_loss, rel=1e-5)
    for name, g in one.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(three[name], g, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_checkpoints_are_pruned_to_keep_last_and_latest_names_the_newest(tmp_path):
    w = {"x": torch.arange(3.0)}
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, w, {"step": step}, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [30, 40]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000000040"
    assert ckpt.load_state(ckpt.latest_checkpoint(tmp_path))["step"] == 40
    assert torch.equal(ckpt.load_weights(ckpt.latest_checkpoint(tmp_path))["x"], w["x"])


def test_a_checkpoint_cut_by_a_kill_is_ignored_and_cleaned(tmp_path):
    ckpt.save_checkpoint(tmp_path, 10, {"x": torch.zeros(1)}, {"step": 10}, keep_last=0)
    partial = tmp_path / "checkpoints" / ".tmp-step-000000020-123"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"cut")
    (tmp_path / "checkpoints" / "latest").write_text("step-000000020\n")  # points at nothing complete
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000000010"
    ckpt.clean_partial(tmp_path)
    assert not partial.exists()


# ---- a run ------------------------------------------------------------------------------------------------------------


def test_a_run_folder_holds_config_tokenizer_checkpoints_and_metrics(trained_run, corpus):
    run = json.loads((trained_run / "run.json").read_text())
    assert run["stage"] == "semantic" and run["world_size"] == 1
    assert run["config"]["train"]["steps"] == 7 and run["config"]["train"]["batch_size"] == 4
    assert run["config"]["model"] == json.loads(json.dumps(CFG.to_dict()["model"]))
    assert run["fingerprint"] == "fake-0" and run["tokenizer"]["fingerprint"] == "fake-0"
    assert run["data"] == str(corpus.resolve()) and run["layout"]["seq_len"] == 204
    assert (trained_run / "tokenizer" / "tokenizer.json").read_text() == (corpus / "tokenizer" / "tokenizer.json").read_text()
    # saves at 3 and 6 and a final one at 7; tiny keeps the last 2
    assert [s for s, _ in ckpt.list_checkpoints(trained_run)] == [6, 7]
    assert (trained_run / "checkpoints" / "latest").read_text().strip() == "step-000000007"
    metrics = read_metrics(trained_run)
    assert [m["step"] for m in metrics] == [3, 6, 7]  # tiny logs every 10 steps, evals every 3 and at the end
    assert all(isinstance(m["step"], int) and math.isfinite(m["val/loss"]) for m in metrics)
    assert {"train/loss", "train/lr", "tokens_per_s"} <= set(metrics[-1])
    assert list((trained_run / "tb").glob("events.out.tfevents.*"))


def test_load_stage_returns_the_latest_weights_and_the_layout(trained_run):
    model, layout, cfg, info = load_stage(trained_run, device="cpu")
    assert layout.stage == "semantic" and layout.seq_len == 204 and info.fingerprint == "fake-0"
    assert cfg.model == CFG.model and not model.training
    saved = load_file(str(trained_run / "checkpoints" / "step-000000007" / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    older, _, _, _ = load_stage(trained_run / "checkpoints" / "step-000000006", device="cpu")
    assert not torch.equal(older.embed.weight, model.embed.weight)


# ---- user errors --------------------------------------------------------------------------------------------------------


def cli_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_a_data_folder_without_shards_is_refused(capsys, tmp_path):
    write_tokenizer_json(tmp_path / "data", fake_info_json())
    err = cli_error(capsys, ["train", "semantic", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--preset", "tiny"])
    assert "has no shards" in err


def test_validation_data_of_another_tokenizer_is_refused(capsys, corpus, tmp_path):
    other = write_corpus(tmp_path / "other", 4, fingerprint="fake-1")
    err = cli_error(capsys, ["train", "semantic", "--data", str(corpus), "--val-data", str(other), "--out", str(tmp_path / "run"), "--preset", "tiny"])
    assert "another tokenizer" in err and "fake-1" in err


def test_an_unknown_stage_is_refused(capsys, corpus, tmp_path):
    err = cli_error(capsys, ["train", "medium", "--data", str(corpus), "--out", str(tmp_path / "run"), "--preset", "tiny"])
    assert "unknown stage 'medium'" in err


def test_a_run_with_checkpoints_is_not_restarted_without_resume(capsys, corpus, trained_run):
    err = cli_error(capsys, ["train", "semantic", "--data", str(corpus), "--out", str(trained_run), "--preset", "tiny", "--steps", "7", "--batch-size", "4"])
    assert "--resume" in err


def test_resuming_a_run_of_another_stage_is_refused(capsys, corpus, trained_run):
    err = cli_error(capsys, ["train", "coarse", "--data", str(corpus), "--out", str(trained_run), "--preset", "tiny", "--resume"])
    assert "stage 'semantic'" in err


def test_resuming_a_run_of_another_model_config_is_refused(capsys, corpus, trained_run, tmp_path):
    other = tmp_path / "wider.toml"
    other.write_text('base = "tiny"\n[model]\nd_model = 128\n')
    err = cli_error(capsys, ["train", "semantic", "--data", str(corpus), "--out", str(trained_run), "--config", str(other), "--resume"])
    assert "model.d_model" in err


def test_resuming_on_tokens_of_another_tokenizer_is_refused(capsys, trained_run, tmp_path):
    other = write_corpus(tmp_path / "other", 4, fingerprint="fake-1")
    err = cli_error(capsys, ["train", "semantic", "--data", str(other), "--out", str(trained_run), "--preset", "tiny", "--resume"])
    assert "another tokenizer" in err


# ---- processes ------------------------------------------------------------------------------------------------------------


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the event the test waits for"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_killed_run_resumes_exactly_where_an_uninterrupted_run_would_be(corpus, config_file, tmp_path):
    """SIGKILL after the first checkpoint, --resume: same losses and same final weights as a run never stopped."""
    steps = 60
    # two loader workers, and checkpoints at odd steps: the resumed loader must also rotate its workers
    cmd = [sys.executable, "-m", "musiclm", "train", "semantic", "--data", str(corpus), "--config", str(config_file),
           "--steps", str(steps), "--batch-size", "4", "--save-every", "7", "--eval-every", "30", "--workers", "2"]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cmd + ["--out", str(straight)], env=ENV, cwd=REPO, check=True, capture_output=True)

    proc = subprocess.Popen(cmd + ["--out", str(killed)], env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: ckpt.latest_checkpoint(killed) is not None, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd + ["--out", str(killed), "--resume"], env=ENV, cwd=REPO, check=True, capture_output=True)

    k = json.loads((killed / "run.json").read_text())["resumed_at_step"]
    assert 7 <= k < steps
    a = {m["step"]: m for m in read_metrics(straight)}
    b = {m["step"]: m for m in read_metrics(killed)}
    assert sorted(b) == sorted(a) == list(range(1, steps + 1))  # lines logged after step k by the killed run were dropped
    for s in range(k + 1, steps + 1):
        assert b[s]["train/loss"] == pytest.approx(a[s]["train/loss"], abs=1e-6), s
    assert b[steps]["val/loss"] == pytest.approx(a[steps]["val/loss"], abs=1e-6)
    wa, wb = (load_file(str(ckpt.latest_checkpoint(r) / "model.safetensors")) for r in (straight, killed))
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


@pytest.mark.slow
def test_two_processes_train_on_disjoint_data_and_one_writes(tmp_path):
    """torchrun with 2 CPU ranks (gloo): disjoint clips per epoch, one writer, a loss that falls like one process's."""
    data = write_corpus(tmp_path / "data", 32)  # 4 shards of 8: each rank reads 2 shards = 4 batches of 4 per epoch
    val = write_corpus(tmp_path / "val", 8, seed=1)
    keys = tmp_path / "keys"
    keys.mkdir()
    args = ["train", "semantic", "--data", str(data), "--val-data", str(val), "--preset", "tiny",
            "--steps", "30", "--save-every", "10", "--eval-every", "10"]  # fmt: skip
    # PYTHONFAULTHANDLER: a rank killed by a signal prints every thread's Python stack to its stderr
    env = {**ENV, "MUSICLM_DEBUG_KEYS": str(keys), "PYTHONFAULTHANDLER": "1"}
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "musiclm", *args, "--out", str(out), "--batch-size", "4"],
                          env=env, cwd=REPO, capture_output=True, text=True, check=False)  # fmt: skip
    # the ranks inherit torchrun's stderr: on failure show theirs and torchrun's summary
    assert proc.returncode == 0, proc.stderr[-6000:]

    def epoch0(rank: int) -> list[str]:
        lines = (keys / f"keys-rank{rank}.txt").read_text().split("\n")
        return [line.split()[1] for line in lines if line and int(line.split()[0]) < 4]

    k0, k1 = epoch0(0), epoch0(1)
    assert len(k0) == len(k1) == 16 and set(k0).isdisjoint(k1) and len(set(k0) | set(k1)) == 32

    assert [s for s, _ in ckpt.list_checkpoints(out)] == [20, 30]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000000020", "step-000000030"]
    assert ckpt.load_state(out / "checkpoints" / "step-000000030")["step"] == 30
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    ddp = read_metrics(out)
    assert [m["step"] for m in ddp] == [10, 20, 30]  # one line per logged step: a single writer

    single = tmp_path / "single"
    run_train("semantic", data, single, CFG, steps=30, batch_size=8, save_every=10, eval_every=10, val_data=val)
    one = read_metrics(single)
    assert ddp[-1]["train/loss"] < ddp[0]["train/loss"] - 0.5
    assert ddp[-1]["val/loss"] == pytest.approx(one[-1]["val/loss"], abs=0.25)


BLOCK_BACKBONES = """
import importlib.abc, sys
BLOCKED = ("transformers", "faiss", "ray", "soundfile", "soxr", "musiclm.models.backbones", "musiclm.pipeline")
class NoBackbones(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked: training must not need it")
        return None
sys.meta_path.insert(0, NoBackbones())
from musiclm.cli import main
main(sys.argv[1:])
assert not [m for m in sys.modules if m.split(".")[0] in ("transformers", "faiss", "ray", "soundfile", "soxr")]
"""


@pytest.mark.slow
def test_training_needs_no_backbone_library(corpus, tmp_path):
    args = ["train", "coarse", "--data", str(corpus), "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "3", "--batch-size", "2", "--workers", "1"]
    proc = subprocess.run([sys.executable, "-c", BLOCK_BACKBONES, *args], env=ENV, cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-000000003"


# ---- learning -----------------------------------------------------------------------------------------------------------

LEARN_STEPS = 200


@pytest.fixture(scope="module")
def learn_corpus(tokenized) -> Path:
    """Real tokens: the synthetic corpus tokenized by `musiclm tokenize` with the tiny preset (conftest.py)."""
    return tokenized[0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["semantic", "coarse", "fine"])
def test_each_stage_learns_below_the_unigram_entropy_of_its_target(stage, learn_corpus, tmp_path):
    """On held-out shards, the loss falls below the entropy of those shards' own code frequencies:
    the best a model can do without context. So the model uses context."""
    info = TokenInfo.load(learn_corpus)
    layout = layout_for(stage, info, CFG.stages.get(stage))
    split = split_data(learn_corpus, info, None, CFG.train.val_fraction)
    held_out = [Path(e.path).stem for e in split.val]
    assert held_out and not any(e.exclude for e in split.val)
    baseline = unigram_entropy(learn_corpus, layout.target.stream, list(layout.target.levels), shards=held_out)
    run_train(stage, learn_corpus, tmp_path / stage, CFG, steps=LEARN_STEPS, eval_every=LEARN_STEPS // 4, save_every=LEARN_STEPS)
    val = [m["val/loss"] for m in read_metrics(tmp_path / stage) if "val/loss" in m]
    assert len(val) == 4 and min(val) < baseline, (val, baseline)
