"""Fine-tuning a trained stage on a second corpus: ``--init-from`` (every weight) and ``--lora-rank``
(an adapter on a frozen base), adapter runs standing wherever a stage run stands, ``musiclm merge``.

The base is a semantic stage trained on the session's corpus (conftest.py: seven kinds of
synthetic music). The second corpus holds only drums and rain, tokenized with the base
data's tokenizer (``musiclm tokenize --tokenizer``), so its tokens mean the same thing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from musiclm.digest import sha256_file
from musiclm.cli import main
from musiclm.config import STAGES, load_config
from musiclm.errors import UserError
from musiclm.models.layout import layout_for
from musiclm.models.transformer import MusicTransformer
from musiclm.pipeline.synth import synth_clip
from musiclm.shards.format import TokenInfo
from musiclm.training import checkpoint as ckpt
from musiclm.training import lora
from musiclm.training.corpus_split import split_data
from musiclm.training.data import collate, count_labels, val_batches
from musiclm.training.optim import param_groups
from musiclm.training.run_folder import load_stage
from musiclm.training.trainer import run_train
from tests.conftest import run_cli
from tests.factories import (
    fake_info,
    fake_info_json,
    fake_sample,
    fake_shards,
)

REPO = Path(__file__).resolve().parents[1]
CFG = load_config("tiny")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
RANK, ALPHA = 8, 16.0  # scale 2: a merge that forgets the scale shows
TARGETS = ("attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down")


# tests/conftest.py: torch on one thread for the whole module; the second corpus is tokenized here (Ray)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.ray]


@pytest.fixture(scope="module")
def first(tokenized) -> Path:
    return tokenized[0]


@pytest.fixture(scope="module")
def second(first, tmp_path_factory) -> Path:
    """16 clips of drums and rain only (6-8 s, other seeds), tokenized with the first corpus's tokenizer."""
    root = tmp_path_factory.mktemp("corpus2")
    for i in range(16):
        kind = ("drums", "rain")[i % 2]
        sf.write(root / f"{i:02d}_{kind}.wav", synth_clip(kind, 6.0 + i % 3, 24000, seed=1000 + i), 24000)
    out = tmp_path_factory.mktemp("tokens2") / "dir"
    proc = run_cli("tokenize", root, "--out", out, "--tokenizer", first / "tokenizer", "--shard-size", "4")
    assert proc.returncode == 0, proc.stderr
    assert TokenInfo.load(out).fingerprint == TokenInfo.load(first).fingerprint
    return out


@pytest.fixture(scope="module")
def base_run(first, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "semantic"
    run_train("semantic", first, out, CFG, steps=80, eval_every=1000, save_every=1000, device="cpu")
    return out


@pytest.fixture(scope="module")
def full_run(second, base_run, tmp_path_factory) -> Path:
    """Every weight fine-tuned; no --preset: the base run's config, with --steps."""
    out = tmp_path_factory.mktemp("full") / "semantic"
    main(["train", "semantic", "--data", str(second), "--out", str(out), "--init-from", str(base_run), "--steps", "30", "--device", "cpu"])
    return out


@pytest.fixture(scope="module")
def adapter_run(second, base_run, tmp_path_factory) -> Path:
    """A rank-8 adapter (alpha 16) at the higher learning rate adapters take; checkpoints at 20 and 30."""
    out = tmp_path_factory.mktemp("adapter") / "semantic"
    args = ["--init-from", str(base_run), "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA), "--lr", "1e-2"]
    main(["train", "semantic", "--data", str(second), "--out", str(out), *args, "--steps", "30", "--save-every", "10", "--device", "cpu"])
    return out


def held_out_loss(run: Path, data: Path) -> float:
    """Mean loss per target token of ``run`` (loaded with load_stage) on the shards that ``data``'s split holds out."""
    model, layout, cfg, info = load_stage(run, "cpu")
    split = split_data(data, info, None, cfg.train.val_fraction)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in val_batches(split.val, layout, 8, 4):
            n = count_labels(b)
            total += float(model.loss(b["tokens"], b["labels"], b["label_levels"])) * n
            count += n
    return total / count


def a_batch(data: Path, run: Path) -> torch.Tensor:
    _, layout, cfg, info = load_stage(run, "cpu")
    return val_batches(split_data(data, info, None, cfg.train.val_fraction).val, layout, 4, 1)[0]["tokens"]


def logits(model: MusicTransformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(tokens), 0)


def cli_error(capsys, args: list) -> str:
    capsys.readouterr()  # what earlier calls printed
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


# ---- learning -----------------------------------------------------------------------------------------------------------


def test_fine_tuning_lowers_the_held_out_loss_on_the_second_corpus_below_the_base(base_run, full_run, adapter_run, first, second):
    base = held_out_loss(base_run, second)
    full = held_out_loss(full_run, second)
    adapted = held_out_loss(adapter_run, second)
    assert held_out_loss(base_run, first) < base - 0.5  # the second corpus is new to the base
    assert full < base - 0.1, (full, base)
    assert adapted < base - 0.05, (adapted, base)


def test_init_from_starts_at_step_0_from_the_base_weights_with_a_fresh_optimizer(base_run, second, tmp_path):
    out = tmp_path / "ft"
    run_train("semantic", second, out, None, steps=1, lr=1e-12, eval_every=1000, save_every=1000, init_from=base_run)  # lr ~0: the weights stay the start's
    base_ckpt = ckpt.latest_checkpoint(base_run)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]
    state = ckpt.load_state(ckpt.latest_checkpoint(out))
    assert state["step"] == 1 and {int(s["step"]) for s in state["optimizer"]["state"].values()} == {1}  # the base's optimizer was at 80
    tuned, base = load_file(str(ckpt.latest_checkpoint(out) / ckpt.WEIGHTS)), load_file(str(base_ckpt / ckpt.WEIGHTS))
    assert set(tuned) == set(base) and all(torch.allclose(tuned[k], base[k], atol=1e-8) for k in base)
    run = json.loads((out / "run.json").read_text())
    assert run["init_from"] == {"folder": str(base_ckpt.resolve()), "run": str(base_run.resolve()), "file": ckpt.WEIGHTS, "sha256": sha256_file(base_ckpt / ckpt.WEIGHTS), "step": 80}
    assert run["lora"] is None and run["config"]["model"] == json.loads((base_run / "run.json").read_text())["config"]["model"]


# ---- adapters --------------------------------------------------------------------------------------------------------------


def test_adapters_alone_train_from_the_base_model_and_are_not_weight_decayed():
    info = fake_info()
    layout = layout_for("semantic", info, CFG.stages.semantic)
    torch.manual_seed(0)
    model = MusicTransformer.for_layout(CFG.model, layout)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, layout.vocab_size, (2, 40))
    before = logits(model, tokens)
    spec = lora.LoraSpec.make(4, None, CFG.model.d_model)
    assert spec.alpha == 4.0 and spec.scale == 1.0  # the default alpha is the rank
    lora.add_adapters(model, spec)
    torch.testing.assert_close(logits(model, tokens), before)  # B starts at zero: step 0 is the base model

    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["params"] == [] and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(no_decay["params"]) == 2 * len(TARGETS) * CFG.model.n_layers and all(".lora_" in names[id(p)] for p in no_decay["params"])

    opt = torch.optim.AdamW([decay, no_decay], lr=1e-2)
    rng = np.random.default_rng(0)
    b = collate([layout.encode(layout.crop(fake_sample(info, 6.0, rng, name=f"c{i}.wav"), rng), drop_cond=False) for i in range(2)], ["a", "b"])
    for _ in range(3):
        loss = model.loss(b["tokens"], b["labels"], b["label_levels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert set(after) == set(base) and all(torch.equal(after[k], base[k]) for k in base)  # the base is frozen
    assert all(float(v.abs().max()) > 0 for k, v in lora.adapter_weights(model).items() if "lora_B" in k)  # the adapter moved


def test_an_adapter_checkpoint_holds_the_adapter_and_its_optimizer_state_only(adapter_run, base_run):
    folder = ckpt.latest_checkpoint(adapter_run)
    assert [s for s, _ in ckpt.list_checkpoints(adapter_run)] == [20, 30]
    assert sorted(p.name for p in folder.iterdir()) == [ckpt.ADAPTER, ckpt.RECORDS, ckpt.STATE]
    weights = load_file(str(folder / ckpt.ADAPTER))
    assert set(weights) == {f"blocks.{i}.{t}.lora_{ab}.weight" for i in range(CFG.model.n_layers) for t in TARGETS for ab in "AB"}
    assert weights["blocks.0.attn.qkv.lora_A.weight"].shape == (RANK, CFG.model.d_model)
    state = ckpt.load_state(folder)
    assert len(state["optimizer"]["state"]) == len(weights)  # moments for the adapter's tensors, none for the base
    assert [len(g["params"]) for g in state["optimizer"]["param_groups"] if g["weight_decay"] > 0] == [0]  # nothing decays
    run = json.loads((adapter_run / "run.json").read_text())
    base_weights = ckpt.latest_checkpoint(base_run) / ckpt.WEIGHTS
    assert run["init_from"]["folder"] == str(base_weights.parent.resolve()) and run["init_from"]["sha256"] == sha256_file(base_weights)
    assert run["lora"]["rank"] == RANK and run["lora"]["alpha"] == ALPHA and run["lora"]["targets"] == ["qkv", "proj", "gate_up", "down"]
    assert run["trainable_parameters"] == sum(w.numel() for w in weights.values())


def test_an_adapter_run_loads_as_its_base_with_the_adapter_merged(adapter_run, base_run, second, tmp_path):
    tokens = a_batch(second, base_run)
    base, *_ = load_stage(base_run, "cpu")
    adapter = load_file(str(ckpt.latest_checkpoint(adapter_run) / ckpt.ADAPTER))
    # the adapter applied as in training, from this test's own rank and alpha
    applied = lora.add_adapters(load_stage(base_run, "cpu")[0], lora.LoraSpec(RANK, ALPHA))
    lora.load_adapter_weights(applied, adapter, "test")
    expected = logits(applied.eval(), tokens)
    assert float((expected - logits(base, tokens)).abs().max()) > 1e-2  # the adapter changes the model

    model, *_ = load_stage(adapter_run, "cpu")
    assert type(model) is MusicTransformer and not any("lora" in n or "base_layer" in n for n, _ in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training
    torch.testing.assert_close(logits(model, tokens), expected, atol=1e-5, rtol=1e-5)
    merged, want = model.state_dict(), base.state_dict()
    for name, w in want.items():
        target = next((t for t in TARGETS if name.endswith(f"{t}.weight")), None)
        if target is None:
            assert torch.equal(merged[name], w), name  # embedding, norms and heads are the base's
        else:
            prefix = name[: -len(".weight")]
            update = (ALPHA / RANK) * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
            torch.testing.assert_close(merged[name], w + update, atol=1e-6, rtol=0)

    out = tmp_path / "merged"
    main(["merge", str(adapter_run), "--out", str(out)])
    assert sorted(p.name for p in ckpt.latest_checkpoint(out).iterdir()) == [ckpt.WEIGHTS, ckpt.RECORDS, ckpt.STATE]
    run = json.loads((out / "run.json").read_text())
    assert "lora" not in run and run["merged_from"]["step"] == 30 and (out / "tokenizer" / "tokenizer.json").is_file()
    again, *_ = load_stage(out, "cpu")
    assert all(torch.equal(v, merged[k]) for k, v in again.state_dict().items())
    # a merged run is a stage run: it can be fine-tuned again, with an adapter too
    run_train("semantic", second, tmp_path / "again", None, steps=1, eval_every=1000, save_every=1000, init_from=out, lora_rank=2)
    assert ckpt.weights_file(ckpt.latest_checkpoint(tmp_path / "again")).name == ckpt.ADAPTER


def test_an_adapter_run_whose_base_is_missing_or_changed_is_refused_in_one_line(base_run, second, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(base_run, base)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    run_train("semantic", second, adapter, None, steps=2, eval_every=1000, save_every=1000, init_from=base, lora_rank=2)
    main(["merge", str(adapter), "--out", str(merged)])

    weights = ckpt.latest_checkpoint(base) / ckpt.WEIGHTS
    changed = load_file(str(weights))
    changed["embed.weight"][0, 0] += 1.0
    save_file(changed, str(weights))
    assert "the base run changed" in cli_error(capsys, ["merge", adapter, "--out", tmp_path / "m2"])
    with pytest.raises(UserError, match="the base run changed"):
        load_stage(adapter, "cpu")
    assert "the base run changed" in cli_error(capsys, ["train", "semantic", "--data", second, "--out", adapter, "--resume", "--steps", "4"])

    shutil.rmtree(base)
    assert "which is missing" in cli_error(capsys, ["merge", adapter, "--out", tmp_path / "m3"])
    load_stage(merged, "cpu")  # the merged run stands alone


# ---- refusals ------------------------------------------------------------------------------------------------------------


def fake_corpus(folder: Path, fingerprint: str) -> Path:
    """Shards of made-up tokens from another tokenizer."""
    info_json = fake_info_json(fingerprint=fingerprint)
    info = TokenInfo.from_json(info_json)
    rng = np.random.default_rng(0)
    return fake_shards(folder, [fake_sample(info, 5.0, rng, name=f"clip{i}.wav") for i in range(8)], info_json=info_json, shard_size=4)


def test_a_base_of_another_tokenizer_stage_or_model_is_refused_in_one_line(base_run, first, tmp_path, capsys):
    other = fake_corpus(tmp_path / "other", "fake-1")
    err = cli_error(capsys, ["train", "semantic", "--data", other, "--out", tmp_path / "a", "--init-from", base_run])
    assert "another tokenizer" in err and "fake-1" in err and "--tokenizer" in err
    assert "stage 'semantic'" in cli_error(capsys, ["train", "coarse", "--data", first, "--out", tmp_path / "b", "--init-from", base_run])
    wider = tmp_path / "wider.toml"
    wider.write_text('base = "tiny"\n[model]\nd_model = 128\n')
    assert "model.d_model" in cli_error(capsys, ["train", "semantic", "--data", first, "--out", tmp_path / "c", "--config", wider, "--init-from", base_run])
    assert "does not exist" in cli_error(capsys, ["train", "semantic", "--data", first, "--out", tmp_path / "d", "--init-from", tmp_path / "nowhere"])
    assert not any((tmp_path / x).exists() for x in "abcd")  # refused before anything was written


def test_adapter_options_that_cannot_apply_are_refused_in_one_line(base_run, adapter_run, second, tmp_path, capsys):
    train = ["train", "semantic", "--data", second, "--preset", "tiny"]
    assert "pass --init-from" in cli_error(capsys, [*train, "--out", tmp_path / "a", "--lora-rank", "4"])
    assert "--lora-alpha needs --lora-rank" in cli_error(capsys, [*train, "--out", tmp_path / "b", "--init-from", base_run, "--lora-alpha", "8"])
    assert "between 1 and the model width 64" in cli_error(capsys, [*train, "--out", tmp_path / "c", "--init-from", base_run, "--lora-rank", "65"])
    assert "merge it first" in cli_error(capsys, [*train, "--out", tmp_path / "d", "--init-from", adapter_run, "--lora-rank", "4"])
    copy = tmp_path / "copy"
    shutil.copytree(adapter_run, copy)
    assert "rank 8, alpha 16" in cli_error(capsys, ["train", "semantic", "--data", second, "--out", copy, "--resume", "--lora-rank", "4"])
    assert "not an adapter run" in cli_error(capsys, ["merge", base_run, "--out", tmp_path / "e"])
    main(["merge", str(adapter_run), "--out", str(tmp_path / "merged")])
    assert "no optimizer state" in cli_error(capsys, ["train", "semantic", "--data", second, "--out", tmp_path / "merged", "--resume"])


# ---- resume and generation -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_adapter_run_resumes_exactly_where_an_uninterrupted_run_would_be(base_run, second, tmp_path):
    """SIGKILL after the first checkpoint, the same command with --resume: same losses and the same adapter."""
    steps = 60
    config = tmp_path / "log1.toml"
    config.write_text('base = "tiny"\n[train]\nlog_every = 1\n')
    cmd = [sys.executable, "-m", "musiclm", "train", "semantic", "--data", str(second), "--config", str(config), "--init-from", str(base_run),
           "--lora-rank", "4", "--steps", str(steps), "--batch-size", "4", "--save-every", "7", "--eval-every", "30"]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cmd + ["--out", str(straight)], env=ENV, cwd=REPO, check=True, capture_output=True)

    proc = subprocess.Popen(cmd + ["--out", str(killed)], env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while ckpt.latest_checkpoint(killed) is None:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd + ["--out", str(killed), "--resume"], env=ENV, cwd=REPO, check=True, capture_output=True)

    k = json.loads((killed / "run.json").read_text())["resumed_at_step"]
    assert 7 <= k < steps
    a, b = ({m["step"]: m for m in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())} for r in (straight, killed))
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in range(k + 1, steps + 1):
        assert b[s]["train/loss"] == pytest.approx(a[s]["train/loss"], abs=1e-6), s
    assert b[steps]["val/loss"] == pytest.approx(a[steps]["val/loss"], abs=1e-6)
    wa, wb = (load_file(str(ckpt.latest_checkpoint(r) / ckpt.ADAPTER)) for r in (straight, killed))
    assert set(wa) == set(wb) and all(torch.equal(wa[n], wb[n]) for n in wa)


def test_generate_runs_with_an_adapter_run_as_its_semantic_stage(adapter_run, first, tmp_path, capsys):
    """The adapter run copied into a --model folder (its base is named by absolute path); default precision (int8 on a CPU)."""
    models = tmp_path / "model"
    shutil.copytree(adapter_run, models / "semantic")
    for stage in STAGES[1:]:
        run_train(stage, first, models / stage, CFG, steps=2, batch_size=4, eval_every=1000, save_every=1000, device="cpu")
    out = tmp_path / "song.wav"
    main(["generate", "rain on a drum", "--model", str(models), "--seconds", "0.5", "--out", str(out), "--num-samples", "1", "--device", "cpu"])
    assert sf.info(out).frames > 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert Path(meta["stages"]["semantic"]["run"]) == models / "semantic"
    capsys.readouterr()
