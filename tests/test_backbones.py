"""Backbones load through from_pretrained from a folder exactly as from a hub id; tiny ones build offline."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from musiclm.config import load_config
from musiclm.errors import UserError
from musiclm.models.backbones import byte_text_tokenizer, encodec_latents, load_clap, load_encodec, load_mert, set_encodec_codebooks
from musiclm.pipeline.quantizers import fit_encodec_codebooks
from musiclm.pipeline.synth import synth_clip

TINY = load_config("tiny").tokenize


def audio(seconds: float, sr: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(synth_clip("mix", seconds, sr, seed))[None]


def test_tiny_backbones_are_the_same_for_the_same_seed():
    a, b = load_mert(TINY.mert, seed=3), load_mert(TINY.mert, seed=3)
    for (n, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), n
    c = load_mert(TINY.mert, seed=4)
    assert any(not torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), c.model.state_dict().values()))


def test_saved_models_load_back_through_the_hub_id_path(tmp_path):
    """A folder passed as `model` goes through the very from_pretrained call a hub id takes."""
    x16 = audio(2.0, 16000)
    clap = load_clap(TINY.clap)
    clap.save(tmp_path / "clap")
    clap2 = load_clap(replace(TINY.clap, model=str(tmp_path / "clap")))
    feats = clap.features([x16[0].numpy()], sampling_rate=16000, return_tensors="pt", truncation=clap.truncation, padding="repeatpad")
    with torch.no_grad():
        e1 = clap.model.get_audio_features(**feats).pooler_output
        e2 = clap2.model.get_audio_features(**feats).pooler_output
    torch.testing.assert_close(e1, e2)
    assert clap2.text_tokenizer("a calm piano")["input_ids"] == clap.text_tokenizer("a calm piano")["input_ids"]

    mert = load_mert(TINY.mert)
    mert.save(tmp_path / "mert")
    mert2 = load_mert(replace(TINY.mert, model=str(tmp_path / "mert")))
    with torch.no_grad():
        torch.testing.assert_close(mert.model(x16).last_hidden_state, mert2.model(x16).last_hidden_state)
    assert mert2.sample_rate == 16000 and mert2.frame_rate == 50

    enc = load_encodec(TINY.encodec)
    enc.save(tmp_path / "encodec")
    enc2 = load_encodec(replace(TINY.encodec, model=str(tmp_path / "encodec")))
    assert enc2.bandwidth == enc.bandwidth and enc2.frame_rate == 75


def test_random_encodec_codes_vary_only_after_codebooks_are_fitted():
    enc = load_encodec(TINY.encodec)
    x = audio(3.0, 24000)
    with torch.no_grad():
        codes = enc.model.encode(x[:, None], bandwidth=enc.bandwidth).audio_codes[0]
    assert codes.shape[1] == TINY.encodec.num_quantizers
    assert int(codes.max()) == 0, "a random Encodec has all-zero codebooks"
    lat = torch.cat([encodec_latents(enc, audio(3.0, 24000, seed))[0] for seed in range(4)]).numpy()
    set_encodec_codebooks(enc, fit_encodec_codebooks(enc, lat, niter=5))
    with torch.no_grad():
        codes = enc.model.encode(x[:, None], bandwidth=enc.bandwidth).audio_codes[0]
    for level in range(codes.shape[1]):
        assert len(torch.unique(codes[0, level])) > 3



def test_setting_encodec_codebooks_checks_their_shapes():
    enc = load_encodec(TINY.encodec)
    k, dim = enc.codebook_size, enc.model.config.codebook_dim
    before = [layer.codebook.embed.clone() for layer in enc.model.quantizer.layers]
    with pytest.raises(ValueError, match="num_quantizers"):
        set_encodec_codebooks(enc, [np.zeros((k, dim), np.float32)] * (enc.num_quantizers + 1))
    with pytest.raises(ValueError, match=rf"codebook 1 has shape \[{k}, {dim + 1}\]"):
        set_encodec_codebooks(enc, [np.ones((k, dim), np.float32), np.ones((k, dim + 1), np.float32)])
    assert all(torch.equal(b, layer.codebook.embed) for b, layer in zip(before, enc.model.quantizer.layers)), "nothing installed"
    set_encodec_codebooks(enc, [np.ones((k, dim), np.float32)])  # fewer levels than num_quantizers: the first ones
    assert bool((enc.model.quantizer.layers[0].codebook.embed == 1).all())
    assert int(enc.model.quantizer.layers[1].codebook.embed.abs().sum()) == 0

def test_byte_tokenizer_round_trips_any_text():
    tok = byte_text_tokenizer()
    for text in ["a calm piano over soft rain", "Déjà vu — 東京 🎹"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert max(ids) < 260


def test_missing_hub_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load the Encodec backbone 'no-such-org/no-such-model'"):
        load_encodec(replace(TINY.encodec, model="no-such-org/no-such-model"))


def test_encodec_that_cannot_keep_q_codebooks_is_refused(tmp_path):
    enc = load_encodec(TINY.encodec)
    enc.model.config.target_bandwidths = [1.5]  # a model of fewer codebooks than the config asks for
    enc.save(tmp_path / "encodec")
    with pytest.raises(UserError, match="cannot keep 8 codebooks"):
        load_encodec(replace(TINY.encodec, model=str(tmp_path / "encodec")))
