"""Inference precision: bf16 and int8 stages keep the held-out loss of fp32, store what they claim, and sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from musiclm.config import STAGES, load_config
from musiclm.errors import UserError
from musiclm.models.layout import IGNORE, StageLayout, layout_for
from musiclm.models.precision import INFERENCE_PRECISIONS, default_precision, for_inference, weight_bytes
from musiclm.models.sampling import sample_target
from musiclm.models.transformer import MusicTransformer
from musiclm.shards.format import TokenInfo
from musiclm.shards.stats import unigram_entropy
from musiclm.training.corpus_split import split_data
from musiclm.training.data import val_batches
from musiclm.training.run_folder import load_stage
from musiclm.training.trainer import run_train
from tests.factories import fake_info, fake_sample

CFG = load_config("tiny")
# enough for every tiny stage to fall well below the unigram entropy of its held-out codes
# (semantic about half of it, coarse and fine about 12% under); about 10 s per stage on one thread
TRAIN_STEPS = 100


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread for the whole module


def small_layout() -> StageLayout:
    # coarse stage of a 0.4 s window: clap 4 + semantic 20 -> acoustic 3 levels x 30 frames (114 tokens)
    return StageLayout("coarse", fake_info(), 0.4)


def random_model(layout: StageLayout) -> MusicTransformer:
    torch.manual_seed(0)
    return MusicTransformer.for_layout(CFG.model, layout)


@torch.inference_mode()
def held_out_predictions(model: MusicTransformer, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [n, K] (fp32) of every labelled position of ``batches``, and their labels [n]."""
    logp, labels = [], []
    for b in batches:
        hidden = model(b["tokens"])  # [B, N, d]
        keep = b["labels"] != IGNORE
        h, y, lv = hidden[keep], b["labels"][keep], b["label_levels"][keep]
        for level in range(model.target_levels):
            logp.append(model.logits(h[lv == level], level).float().log_softmax(-1))
            labels.append(y[lv == level])
    return torch.cat(logp), torch.cat(labels)


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_and_int8_keep_the_held_out_loss_within_1_percent_of_fp32_and_predict_like_it_on_a_trained_stage(stage, tokenized, tmp_path):
    """A random model's loss barely depends on its weights' precision; a trained one's does. So the stage is
    trained first (and shown to have learned: its loss is well below the entropy of the held-out codes'
    frequencies), then every precision is scored on the same held-out windows.

    The loss alone is a blunt check: rounding errors move it both ways, and on these models even 4-bit weights,
    weights 5% too large or float8 weights stay within 1%. The mean KL divergence of each precision's predictions
    from fp32's is sharper. Measured over 8 runs (nats per label): int8 2e-5 to 2.6e-4 and bf16 at most 1.1e-5,
    against 7e-4 to 1.4e-3 for 4-bit weights (semantic and coarse; fine stayed under 5e-4), 1.3e-3 to 4.2e-3
    for 8-bit weights dequantized 5% too large, and 9e-4 to 1e-3 for float8 weights (semantic and coarse). The bound sits
    between."""
    data = tokenized[0]
    info = TokenInfo.load(data)
    layout = layout_for(stage, info, CFG.stages.get(stage))
    split = split_data(data, info, None, CFG.train.val_fraction)
    val = val_batches(split.val, layout, CFG.train.batch_size, CFG.train.eval_batches)  # the trainer's validation set
    unigram = unigram_entropy(data, layout.target.stream, list(layout.target.levels), shards=[Path(e.path).stem for e in split.val])
    run_train(stage, data, tmp_path, CFG, steps=TRAIN_STEPS, eval_every=TRAIN_STEPS, save_every=TRAIN_STEPS)
    model = load_stage(tmp_path, "cpu")[0]

    pred = {p: held_out_predictions(for_inference(model, p), val) for p in INFERENCE_PRECISIONS}
    ref = pred["fp32"][0]  # [n, K] log-probabilities
    loss = {p: -lp.gather(1, y[:, None]).mean().item() for p, (lp, y) in pred.items()}
    kl = {p: (ref.exp() * (ref - lp)).sum(-1).mean().item() for p, (lp, _) in pred.items()}
    trainer_val = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["val/loss"]
    assert loss["fp32"] == pytest.approx(trainer_val, rel=1e-4)  # the same held-out loss the trainer reports
    assert loss["fp32"] < 0.95 * unigram, (loss, unigram)
    for p in ("bf16", "int8"):
        assert abs(loss[p] / loss["fp32"] - 1) < 0.01, (p, loss)
        assert kl[p] < 5e-4, (p, kl)


def test_int8_holds_every_linear_weight_in_int8_and_leaves_the_fp32_model_untouched():
    model = random_model(small_layout()).train()
    int8 = for_inference(model, "int8")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert any(n.startswith("heads.") for n in linears) and any(n.endswith(".qkv") for n in linears)
    for name in linears:
        q = int8.get_submodule(name)
        assert isinstance(q, DynamicQuantizedLinear) and q.weight().dtype == torch.qint8, name
        assert type(model.get_submodule(name)) is nn.Linear and model.get_submodule(name).weight.dtype == torch.float32
    assert weight_bytes(int8) < 0.4 * weight_bytes(model)  # 1 byte per linear weight; embedding and norms stay fp32
    assert not int8.training and model.training
    assert int8.new_cache(2, 8).k[0].dtype == torch.float32


def test_bf16_halves_the_weights_and_its_kv_cache_follows_while_the_rotary_tables_stay_fp32():
    model = random_model(small_layout()).train()
    bf16 = for_inference(model, "bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert weight_bytes(bf16) * 2 == weight_bytes(model)
    assert bf16.rotary.cos.dtype == torch.float32 and torch.equal(bf16.rotary.cos, model.rotary.cos)
    assert bf16.new_cache(2, 8).k[0].dtype == torch.bfloat16
    assert not bf16.training and model.training and model.embed.weight.dtype == torch.float32


def test_fp32_is_the_model_itself_in_eval_mode():
    model = random_model(small_layout()).train()
    assert for_inference(model, "fp32") is model and not model.training


@pytest.mark.parametrize("precision", INFERENCE_PRECISIONS)
def test_greedy_guided_sampling_runs_at_each_precision_and_gives_ids_of_the_target_codebooks(precision):
    layout = small_layout()
    window = layout.window_at(fake_sample(layout.info, 2.0, np.random.default_rng(0)), 0.0)
    cond, uncond = (torch.from_numpy(layout.prefix(window, drop_cond=d))[None] for d in (False, True))  # [1, P] each
    model = for_inference(random_model(layout), precision)
    n = layout.target.length
    ids = sample_target(model, layout, cond, n, cfg_scale=3.0, uncond_prefix=uncond, greedy=True)  # [1, n]
    assert ids.shape == (1, n)
    codes = layout.decode_target(ids[0].numpy())  # raises for an id outside its level's codebook
    assert codes.shape == (layout.target_levels, layout.target.frames)


def test_an_unknown_precision_is_a_one_line_error_listing_the_choices():
    with pytest.raises(UserError) as e:
        for_inference(random_model(small_layout()), "fp16")
    msg = str(e.value)
    assert "'fp16'" in msg and all(p in msg for p in INFERENCE_PRECISIONS) and "\n" not in msg


def test_int8_off_the_cpu_is_refused_in_one_line():
    model = random_model(small_layout()).to("meta")  # any device but the CPU; no GPU needed
    with pytest.raises(UserError, match="int8 runs on the CPU only") as e:
        for_inference(model, "int8")
    assert "\n" not in str(e.value)


def test_the_default_is_int8_on_the_cpu_and_bf16_on_gpus_with_bf16_tensor_cores(monkeypatch):
    assert default_precision(torch.device("cpu")) == "int8"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert default_precision(torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert default_precision("cuda:0") == "fp32"
    assert default_precision("meta") == "fp32"
