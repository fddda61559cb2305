"""Backbones load through from_pretrained from a folder exactly as from a hub id; tiny ones build offline."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from musiclm.config import load_config
from musiclm.errors import UserError
from musiclm.models.backbones import byte_text_tokenizer, load_clap
from musiclm.models.codec import load_codec, set_encodec_codebooks
from musiclm.models.semantic import load_semantic
from musiclm.pipeline.quantizers import fit_encodec_codebooks
from musiclm.pipeline.synth import synth_clip

TINY = load_config("tiny").tokenize


def audio(seconds: float, sr: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(synth_clip("mix", seconds, sr, seed))[None]


def test_tiny_backbones_are_the_same_for_the_same_seed():
    a, b = load_semantic(TINY.semantic, seed=3), load_semantic(TINY.semantic, seed=3)
    for (n, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), n
    c = load_semantic(TINY.semantic, seed=4)
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

    mert = load_semantic(TINY.semantic)
    mert.save(tmp_path / "mert")
    mert2 = load_semantic(replace(TINY.semantic, model=str(tmp_path / "mert")))
    with torch.no_grad():
        torch.testing.assert_close(mert.model(x16).last_hidden_state, mert2.model(x16).last_hidden_state)
    assert mert2.sample_rate == 16000 and mert2.frame_rate == 50

    enc = load_codec(TINY.codec)
    enc.save(tmp_path / "encodec")
    enc2 = load_codec(replace(TINY.codec, model=str(tmp_path / "encodec")))
    assert enc2.bandwidth == enc.bandwidth and enc2.frame_rate == 75


def test_random_encodec_codes_vary_only_after_codebooks_are_fitted():
    enc = load_codec(TINY.codec)
    x = audio(3.0, 24000)
    with torch.no_grad():
        codes = enc.model.encode(x[:, None], bandwidth=enc.bandwidth).audio_codes[0]
    assert codes.shape[1] == TINY.codec.num_quantizers
    assert int(codes.max()) == 0, "a random Encodec has all-zero codebooks"
    lat = torch.cat([enc.latents(audio(3.0, 24000, seed))[0] for seed in range(4)]).numpy()
    set_encodec_codebooks(enc, fit_encodec_codebooks(enc, lat, niter=5))
    with torch.no_grad():
        codes = enc.model.encode(x[:, None], bandwidth=enc.bandwidth).audio_codes[0]
    for level in range(codes.shape[1]):
        assert len(torch.unique(codes[0, level])) > 3



def test_setting_encodec_codebooks_checks_their_shapes():
    enc = load_codec(TINY.codec)
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
    with pytest.raises(UserError, match="cannot load the codec backbone 'no-such-org/no-such-model'"):
        load_codec(replace(TINY.codec, model="no-such-org/no-such-model"))


def test_encodec_that_cannot_keep_q_codebooks_is_refused(tmp_path):
    enc = load_codec(TINY.codec)
    enc.model.config.target_bandwidths = [1.5]  # a model of fewer codebooks than the config asks for
    enc.save(tmp_path / "encodec")
    with pytest.raises(UserError, match="cannot keep 8 codebooks"):
        load_codec(replace(TINY.codec, model=str(tmp_path / "encodec")))


def with_quantizers(tok, seed: int = 0):
    """``tok`` with random quantizers of its config's sizes (what tokens mean is not under test here)."""
    rng = np.random.default_rng(seed)
    t, d = tok.cfg, tok.semantic.dim
    tok.quantizers = {
        "semantic_centroids": rng.standard_normal((t.semantic.codebook_size, d)).astype(np.float32),
        "semantic_norm": np.stack([np.zeros(d), np.ones(d)]).astype(np.float32),
        "clap_codebooks": rng.standard_normal((t.clap.levels, t.clap.codebook_size, tok.clap.embed_dim)).astype(np.float32),
    }
    return tok


def rewrite_record(folder, record) -> None:
    """Write ``record`` as the folder's tokenizer.json with its fingerprint and the folder's checksums made to match."""
    import json

    from musiclm.integrity import FileRecord, write_records
    from musiclm.shards.tokenizer_folder import RECORDS_FILE, fingerprint

    record["fingerprint"] = fingerprint(record)
    (folder / "tokenizer.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    files = {p.relative_to(folder).as_posix(): FileRecord.of(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != RECORDS_FILE}
    write_records(folder / RECORDS_FILE, files)


# ---- the semantic model and the codec are settings --------------------------------------------------
# tiny w2v-BERT and DAC built offline from `arch` (model_type picks the family), as the `open` preset's
# checkpoints are at full size in tests/test_fidelity_open.py
TINY_OPEN = """\
base = "tiny"

[tokenize.semantic]
layer = 1

[tokenize.semantic.arch]
model_type = "wav2vec2-bert"
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 64
output_hidden_size = 32
conv_depthwise_kernel_size = 7

[tokenize.codec]
num_quantizers = 4
coarse_quantizers = 1

[tokenize.codec.arch]
model_type = "dac"
sampling_rate = 24000
encoder_hidden_size = 8
decoder_hidden_size = 32
hidden_size = 16
n_codebooks = 6
codebook_size = 32
downsampling_ratios = [2, 4, 5, 8]
upsampling_ratios = [8, 5, 4, 2]
"""


@pytest.fixture(scope="module")
def tiny_open(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_open") / "tiny_open.toml"
    path.write_text(TINY_OPEN)
    return load_config(path=path)


def test_a_random_w2v_bert_and_dac_build_from_their_model_type(tiny_open):
    sem = load_semantic(tiny_open.tokenize.semantic)
    assert type(sem.model).__name__ == "Wav2Vec2BertModel" and sem.frame_rate == 50 and sem.sample_rate == 16000
    assert len(sem.model.encoder.layers) == 2  # layer 1 of 2: one past it
    codec = load_codec(tiny_open.tokenize.codec)
    assert type(codec.model).__name__ == "DacModel" and (codec.hop, codec.frame_rate, codec.codebook_size) == (320, 75, 32)
    with torch.inference_mode():
        codes = codec.encode(audio(1.0, 24000))
        assert codes.shape == (1, 4, 75) and codec.decode(codes).shape == (1, 24000)


def test_the_tokenizer_reads_rates_and_sizes_from_any_backbone_and_records_their_classes(tiny_open, tmp_path):
    from musiclm.pipeline.tokenizer import Tokenizer

    tok = Tokenizer.from_config(tiny_open.tokenize)
    streams = tok.streams()
    assert (streams["semantic"]["frame_rate"], streams["acoustic"]["frame_rate"]) == (50, 75)
    assert (streams["acoustic"]["levels"], streams["acoustic"]["codebook_size"], streams["acoustic"]["coarse_levels"]) == (4, 32, 1)
    assert not tok.learns_codebooks  # DAC's codebooks are its own; only an offline Encodec's are fitted
    clip = {sr: synth_clip("mix", 3.0, sr, 0) for sr in tok.sample_rates}
    feats = tok.fit_features(clip, 1000, np.random.default_rng(0))
    assert feats["semantic"].shape == (149, 32) and "codec" not in feats
    info = with_quantizers(tok).save(tmp_path / "tokenizer")
    assert {k: v["class"] for k, v in tok.record["backbones"].items()} == {"clap": "ClapModel", "semantic": "Wav2Vec2BertModel", "codec": "DacModel"}
    assert sorted(p.name for p in (tmp_path / "tokenizer").iterdir() if p.is_dir()) == ["clap", "codec", "semantic"]
    out = Tokenizer.load(tmp_path / "tokenizer").tokenize(clip)
    assert out["semantic"].shape == (149,) and out["acoustic"].shape == (4, 225)  # 3 s at 50 Hz less one, at 75 Hz
    assert info.acoustic.levels == 4 and info.coarse_levels == 1


def test_a_config_of_the_old_names_is_still_read(tmp_path):
    """`tokenize.mert`, `tokenize.encodec` and `tokenize.fit.mert_seconds` were renamed; a user's file (over a preset's
    new names) and a recorded config (tokenizer.json, run.json) with the old ones read as the new."""
    from musiclm.config import config_from_dict, to_dict

    old = tmp_path / "old.toml"
    old.write_text('base = "tiny"\n[tokenize.mert]\nlayer = 1\n[tokenize.encodec]\ncoarse_quantizers = 2\n[tokenize.fit]\nmert_seconds = 60.0\n')
    cfg = load_config(path=old)
    assert (cfg.tokenize.semantic.layer, cfg.tokenize.codec.coarse_quantizers, cfg.tokenize.fit.semantic_seconds) == (1, 2, 60.0)
    assert cfg.tokenize.semantic.codebook_size == TINY.semantic.codebook_size  # the preset's other keys stay
    recorded = to_dict(load_config("tiny"))
    t = recorded["tokenize"]
    t["mert"], t["encodec"] = t.pop("semantic"), t.pop("codec")
    t["fit"]["mert_seconds"] = t["fit"].pop("semantic_seconds")
    assert config_from_dict(recorded).tokenize == TINY


def test_a_tokenizer_folder_of_the_old_layout_still_loads(tmp_path):
    """Folders written before the backbones were pluggable: backbones "mert" and "encodec" in mert/ and encodec/,
    no classes recorded. The record is what was written then, so its fingerprint still checks."""
    import json
    import shutil

    from musiclm.pipeline.tokenizer import Tokenizer

    tok = with_quantizers(Tokenizer.from_config(TINY))
    clip = {sr: synth_clip("mix", 2.0, sr, 0) for sr in tok.sample_rates}
    folder = tmp_path / "tokenizer"
    tok.save(folder)
    want = Tokenizer.load(folder).tokenize(clip)
    record = json.loads((folder / "tokenizer.json").read_text())
    for new, old in (("semantic", "mert"), ("codec", "encodec")):
        shutil.move(folder / new, folder / old)
        entry = record["backbones"].pop(new)
        entry.pop("class")
        entry["path"] = old
        record["backbones"][old] = entry
        record["config"][old] = record["config"].pop(new)
    record["config"]["fit"]["mert_seconds"] = record["config"]["fit"].pop("semantic_seconds")
    rewrite_record(folder, record)
    got = Tokenizer.load(folder).tokenize(clip)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_a_backbone_that_now_loads_as_another_class_is_refused(tmp_path):
    import json

    from musiclm.integrity import DamagedFile
    from musiclm.pipeline.tokenizer import Tokenizer

    folder = tmp_path / "tokenizer"
    with_quantizers(Tokenizer.from_config(TINY)).save(folder)
    record = json.loads((folder / "tokenizer.json").read_text())
    assert record["backbones"]["semantic"]["class"] == "HubertModel" and record["backbones"]["codec"]["class"] == "EncodecModel"
    record["backbones"]["semantic"]["class"] = "Wav2Vec2BertModel"
    rewrite_record(folder, record)
    with pytest.raises(DamagedFile, match="its semantic backbone was a Wav2Vec2BertModel but .* now loads a HubertModel"):
        Tokenizer.load(folder)
