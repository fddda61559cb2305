"""Fitting the quantizers on real corpora: the dense CLAP sample, the per-code floor, the up-front
refusal of a corpus too small for its vocabularies, and the fit report.

Configs that cannot work together are refused when they are loaded, in one line each.
"""

from __future__ import annotations

import json
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from musiclm.cli import main
from musiclm.config import check_config, clap_windows_per_segment, frame_grid, load_config, preset_names
from musiclm.errors import UserError
from musiclm.pipeline.audio import load_for_rates, plan_segments
from musiclm.pipeline.fit_plan import backbone_facts, check_backbones, check_enough, fit_windows, hours_needed, largest_codebook, plan_fit
from musiclm.pipeline.quantizers import residual_errors
from musiclm.pipeline.text_prompts import MUSIC_DESCRIPTIONS
from musiclm.shards.tokenizer_folder import FORMAT_VERSION, fingerprint, read_record
from tests.conftest import run_cli


def run(capsys, *args: str | Path) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tone_file(path: Path, seconds: float, sr: int = 8000) -> Path:
    """A quiet sine of ``seconds`` (int16 wav at a low rate: an hour is 57 MB)."""
    t = np.arange(int(seconds * sr)) / sr
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr, subtype="PCM_16")
    return path


# ---- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_passes_the_checks(preset):
    cfg = load_config(preset)  # raises on an inconsistent preset
    for stage in ("semantic", "coarse", "fine"):
        assert cfg.stages.get(stage).window_seconds <= cfg.tokenize.audio.segment_seconds / 2


def test_small_and_large_share_one_segmentation():
    """One tokenized folder serves both: the tokenize settings that decide the clips are the same."""
    small, large = load_config("small").tokenize, load_config("large").tokenize
    assert small == large
    assert load_config("large").stages.semantic.window_seconds * 2 <= large.audio.segment_seconds


@pytest.mark.parametrize(
    ("toml", "expect"),
    [
        ('base = "large"\n[tokenize.audio]\nsegment_seconds = 30.0\n', "stages.semantic.window_seconds = 30 does not fit whole"),
        ('base = "small"\n[tokenize.fit]\nmax_seconds = 3600.0\n', "tokenize.fit.max_seconds = 3600 gives at most"),
        ('base = "small"\n[tokenize.fit]\nmax_points = 1000\n', "tokenize.fit.max_points = 1000 cannot feed tokenize.semantic.codebook_size = 1024"),
        ('base = "tiny"\n[tokenize.fit]\nheldout_fraction = 0.7\n', "0 <= heldout_fraction < 0.5"),
    ],
)
def test_an_inconsistent_config_is_refused_in_one_line(capsys, tmp_path, toml, expect):
    bad = write_config(tmp_path / "bad.toml", toml)
    (tmp_path / "music").mkdir()
    tone_file(tmp_path / "music" / "a.wav", 2.0)
    code, err = run(capsys, "tokenize", tmp_path / "music", "--out", tmp_path / "out", "--config", bad)
    assert code == 2 and expect in one_line(err)
    assert not (tmp_path / "out").exists(), "refused before anything was written"


def test_stage_windows_must_be_whole_frames_at_the_backbones_rates():
    """The grid is the backbones': 40 ms at 50 and 75 Hz (MERT or w2v-BERT 2.0, Encodec or DAC 24 kHz); DAC 44.1 kHz's
    86.13 Hz (44100 / 512) puts frames of both streams together only every 5.12 s."""
    assert frame_grid([50, 75]) == Fraction(1, 25) and frame_grid([50, 44100 / 512]) == Fraction(128, 25)
    for preset in ("tiny", "small", "open", "large"):
        check_config(load_config(preset), frame_rates=(50, 75))
    tiny = load_config("tiny")
    off = replace(tiny, stages=replace(tiny.stages, coarse=replace(tiny.stages.coarse, window_seconds=1.01)))
    check_config(off)  # rates unknown: the grid waits for the tokens (training checks it against tokenizer.json)
    with pytest.raises(UserError, match=r"stages.coarse.window_seconds = 1.01 is not a multiple of 0.04 s \(the frame grid shared by the backbones' 50 Hz and 75 Hz\)"):
        check_config(off, frame_rates=(50, 75))
    with pytest.raises(UserError, match=r"stages.semantic.window_seconds = 4 is not a multiple of 5.12 s"):
        check_config(tiny, frame_rates=(50, 44100 / 512))


def test_training_refuses_windows_off_the_grid_of_its_tokens(tokenized, tmp_path, capsys):
    data, _ = tokenized
    bad = write_config(tmp_path / "off.toml", 'base = "tiny"\n[stages.semantic]\nwindow_seconds = 1.01\n')
    code, err = run(capsys, "train", "semantic", "--data", data, "--out", tmp_path / "run", "--config", bad, "--steps", "1")
    assert code == 2 and "stages.semantic.window_seconds = 1.01 is not a multiple of 0.04 s" in one_line(err)
    assert not (tmp_path / "run" / "run.json").exists()


def test_the_fit_budget_check_uses_dense_windows():
    """At a 1 s hop, 60 s segments give 51 windows each: 72,000 s (95% fitted) feed 1024 x 50 points."""
    cfg = load_config("small")
    assert clap_windows_per_segment(60.0, 10.0, 1.0) == 51
    assert clap_windows_per_segment(8.0, 10.0, 1.0) == 1  # a short segment is one repeat-padded window
    check_config(cfg)
    starved = replace(cfg, tokenize=replace(cfg.tokenize, fit=replace(cfg.tokenize.fit, clap_hop_seconds=5.0)))
    with pytest.raises(UserError, match="max_seconds = 72000 gives at most 12540 CLAP windows"):
        check_config(starved)


@pytest.mark.parametrize(
    ("section", "toml", "expect"),
    [
        ("clap", "window_seconds = 3.0\nhop_seconds = 1.0\n", "tokenize.clap.window_seconds = 3 but the CLAP feature extractor of 'random' takes 4 s windows"),
        ("mert", "layer = 5\n", "tokenize.semantic.layer = 5 but the semantic model has 2 layers"),
        ("encodec.arch", "codebook_size = 8192\n", "cannot feed the Encodec codebooks"),
    ],
)
def test_a_config_that_disagrees_with_its_backbones_is_refused_before_ray(capsys, tmp_path, section, toml, expect):
    bad = write_config(tmp_path / "bad.toml", f'base = "tiny"\n[tokenize.{section}]\n{toml}')
    (tmp_path / "music").mkdir()
    tone_file(tmp_path / "music" / "a.wav", 2.0)
    code, err = run(capsys, "tokenize", tmp_path / "music", "--out", tmp_path / "out", "--config", bad)
    assert code == 2 and expect in one_line(err)
    assert not (tmp_path / "out" / "tokenizer").exists()


def test_a_loaded_clap_whose_window_differs_is_refused():
    """The same check once the backbone is loaded (a hub id's extractor is known only then)."""
    from musiclm.pipeline.tokenizer import Tokenizer

    cfg = load_config("tiny").tokenize
    with pytest.raises(UserError, match="tokenize.clap.window_seconds = 3 but the CLAP feature extractor of 'random' takes 4 s windows"):
        Tokenizer.from_config(replace(cfg, clap=replace(cfg.clap, window_seconds=3.0)))


def test_backbone_settings_are_read_from_a_local_folder_without_loading_weights(tmp_path):
    from musiclm.pipeline.tokenizer import Tokenizer

    cfg = load_config("tiny").tokenize
    tok = Tokenizer.from_config(cfg)
    tok.save_backbones(tmp_path)
    local = replace(cfg, clap=replace(cfg.clap, model=str(tmp_path / "clap")), semantic=replace(cfg.semantic, model=str(tmp_path / "semantic")))
    facts = backbone_facts(local)
    assert facts.clap_window_seconds == pytest.approx(cfg.clap.window_seconds)
    assert facts.semantic_layers == tok.semantic.model.config.num_hidden_layers
    assert facts.semantic_frame_rate == pytest.approx(tok.semantic.frame_rate)
    with pytest.raises(UserError, match="takes 4 s windows"):
        check_backbones(replace(local, clap=replace(local.clap, window_seconds=6.0)), facts)


def test_a_hub_id_that_is_not_cached_is_checked_when_it_loads():
    facts = backbone_facts(load_config("small").tokenize)  # offline, nothing cached: nothing known yet, no error
    assert facts.clap_window_seconds is None and facts.semantic_layers is None


# ---- the fit sample -------------------------------------------------------------------------------
def test_fit_windows_count_what_the_tokenizer_cuts(tmp_path):
    """The plan's window count is the number of embeddings the fit will actually get."""
    from musiclm.pipeline.tokenizer import Tokenizer

    cfg = load_config("tiny").tokenize
    tok = Tokenizer.from_config(cfg)
    for seconds in (2.5, 4.0, 6.3, 7.99, 9.1, 17.0):
        path = tone_file(tmp_path / f"{seconds}.wav", seconds, sr=16000)
        cut = 0
        for start, length in plan_segments(seconds, cfg.audio.segment_seconds):
            audio = load_for_rates(path, start, length, (tok.clap.sample_rate,))[tok.clap.sample_rate]
            cut += len(tok.clap_windows(audio, cfg.fit.clap_hop_seconds))
        assert fit_windows(seconds, cfg) == cut, seconds


def test_fit_features_take_clap_windows_at_the_fit_hop(tmp_path):
    """The fit embeds a window every clap_hop_seconds (not the tokens' hop); semantic frames only when asked."""
    from musiclm.pipeline.tokenizer import Tokenizer

    cfg = load_config("tiny").tokenize
    assert cfg.fit.clap_hop_seconds < cfg.clap.hop_seconds
    tok = Tokenizer.from_config(cfg)
    audio = load_for_rates(tone_file(tmp_path / "a.wav", 7.0, sr=16000), 0.0, None, tok.sample_rates)
    rng = np.random.default_rng(0)
    feats = tok.fit_features(audio, max_frames=50, rng=rng, chunk=3)
    assert feats["clap"].shape == (fit_windows(7.0, cfg), tok.clap.embed_dim) == (4, tok.clap.embed_dim)
    assert feats["semantic"].shape[0] == 50
    assert set(tok.fit_features(audio, max_frames=50, rng=rng, frames=False)) == {"clap"}


def test_plan_holds_out_every_twentieth_file_and_stops_at_the_budget():
    cfg = load_config("tiny").tokenize
    cfg = replace(cfg, fit=replace(cfg.fit, max_seconds=300.0, semantic_seconds=60.0))
    files = [f"f{i:03d}.wav" for i in range(100)]
    plan = plan_fit(files, lambda rel: 7.5, cfg)
    assert len(plan.files) == 40  # 300 s of 7.5 s files
    assert len(set(f.rel for f in plan.files)) == 40
    assert [i for i, f in enumerate(plan.files) if f.heldout] == [19, 39]
    assert plan.semantic_seconds == 60.0 and all(f.semantic for f in plan.files[:8]) and not any(f.semantic for f in plan.files[8:])
    assert plan.clap_windows == 38 * fit_windows(7.5, cfg)
    assert plan_fit(files, lambda rel: 7.5, cfg).files == plan.files  # seeded: the same sample every time
    reseeded = replace(cfg, fit=replace(cfg.fit, seed=1))
    assert [f.rel for f in plan_fit(files, lambda rel: 7.5, reseeded).files] != [f.rel for f in plan.files]


def test_plan_skips_unreadable_and_too_short_files():
    cfg = load_config("tiny").tokenize
    durations = {"a.wav": None, "b.wav": 0.5, "c.wav": 6.0}
    plan = plan_fit(list(durations), durations.get, cfg)
    assert [f.rel for f in plan.files] == ["c.wav"]


def test_a_corpus_too_small_is_refused_with_the_numbers_and_the_ways_out():
    cfg = load_config("small").tokenize
    plan = plan_fit([f"{i}.ogg" for i in range(6)], lambda rel: 600.0, cfg)  # one hour
    with pytest.raises(UserError) as e:
        check_enough(cfg, plan, semantic_rate=None)
    msg = str(e.value)
    assert "12 x 1024 codes need 51,200 windows (50 per code, about 17.6 h of audio)" in msg
    assert "gives 3,060 (1.0 h in 6 readable files)" in msg
    assert "tokenize.clap.codebook_size = 32 fits this corpus" in msg and "--tokenizer" in msg
    assert hours_needed(cfg) == pytest.approx(51200 / (51 / 60) / 0.95 / 3600)


def test_the_semantic_floor_is_checked_once_the_mert_rate_is_known():
    cfg = load_config("tiny").tokenize
    cfg = replace(cfg, semantic=replace(cfg.semantic, codebook_size=4096), fit=replace(cfg.fit, max_points=1 << 20))
    plan = plan_fit(["a.wav", "b.wav"], lambda rel: 60.0, cfg)
    check_enough(cfg, plan, semantic_rate=None)
    with pytest.raises(UserError, match=r"semantic 4096 codes need 12,288 semantic frames .* gives 6,000; use tokenize.semantic.codebook_size = 1024"):
        check_enough(cfg, plan, semantic_rate=50.0)


def test_a_corpus_too_small_for_the_semantic_codebook_is_refused_before_ray(capsys, tmp_path):
    """A random MERT's frame rate is known from its config: its floor is checked with CLAP's, up front."""
    bad = write_config(tmp_path / "bad.toml", 'base = "tiny"\n[tokenize.clap]\ncodebook_size = 2\n[tokenize.semantic]\ncodebook_size = 4096\n[tokenize.fit]\nmax_points = 20000\n')
    for i in range(3):
        tone_file(tmp_path / "music" / f"{i}.wav", 20.0)
    code, err = run(capsys, "tokenize", tmp_path / "music", "--out", tmp_path / "out", "--config", bad)
    assert code == 2 and "semantic 4096 codes need 12,288 semantic frames (3 per code) but the corpus gives 3,000; use tokenize.semantic.codebook_size = 512 or less" in err.splitlines()[-1]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".musiclm.lock"], "refused before a tokenizer was started"


def test_largest_codebook_is_a_power_of_two_the_points_can_feed():
    assert largest_codebook(3060, 50) == 32
    assert largest_codebook(3200, 50) == 64
    assert largest_codebook(49, 50) == 0


def test_one_hour_with_the_shipped_vocabularies_is_refused_up_front(tmp_path):
    """The small preset names hub backbones that cannot load here: the refusal comes before any of them is needed."""
    corpus = tmp_path / "hour"
    for i in range(6):
        tone_file(corpus / f"part{i}.wav", 600.0)
    proc = run_cli("tokenize", corpus, "--out", tmp_path / "out", "--preset", "small", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: not enough audio to fit the tokenizer: CLAP 12 x 1024 codes need 51,200 windows")
    assert "the vocabularies need about 17.6 h of audio" in proc.stderr  # printed first, before the refusal
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".musiclm.lock"], "refused before a tokenizer was started"


# ---- the fit report -------------------------------------------------------------------------------
def test_residual_errors_fall_with_depth_and_are_zero_when_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    books = np.stack([x[:16], rng.standard_normal((16, 8)).astype(np.float32) * 0.1])
    errors = residual_errors(x, books)
    assert len(errors) == 2 and 0 < errors[1] <= errors[0] < 1
    exact = np.stack([x[:4], np.zeros((4, 8), np.float32)])
    assert residual_errors(x[:4], exact) == pytest.approx([0.0, 0.0], abs=1e-12)
    assert residual_errors(x, np.zeros((1, 3, 8), np.float32)) == pytest.approx([1.0])


def test_the_fit_report_is_recorded_outside_the_fingerprint(tokenized):
    out, proc = tokenized
    record = read_record(out / "tokenizer")
    fit = record["fit"]
    cfg = load_config("tiny").tokenize
    clap = fit["points"]["clap"]
    assert clap["codes"] == cfg.clap.codebook_size and clap["points"] >= cfg.clap.codebook_size * cfg.fit.min_points_per_code
    assert clap["points_per_code"] == pytest.approx(clap["points"] / clap["codes"], abs=0.01)
    assert fit["points"]["semantic"]["points"] >= cfg.semantic.codebook_size * cfg.fit.min_points_per_code
    assert fit["heldout_files"] >= 1 and fit["heldout_windows"] >= 1
    errors = fit["clap_relative_error"]
    assert set(errors) == {"fit_audio", "heldout_audio", "text"}
    assert all(len(v) == cfg.clap.levels for v in errors.values())
    assert all(a >= b for a, b in zip(errors["fit_audio"], errors["fit_audio"][1:])), "depth never hurts the fitted points"
    assert fit["text_prompts"] == len(MUSIC_DESCRIPTIONS) >= 100
    assert fingerprint(record) == record["fingerprint"], "the report is not part of what tokens mean"
    assert "the vocabularies need about" in proc.stderr and "The fit sample:" in proc.stderr


def test_stats_shows_the_fit(tokenized):
    out, _ = tokenized
    proc = run_cli("stats", out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["fit"] == read_record(out / "tokenizer")["fit"]
    text = run_cli("stats", out)
    assert "relative reconstruction error" in text.stdout and "held-out audio" in text.stdout and "text (100 descriptions)" in text.stdout


def test_an_old_tokenizer_format_is_refused_with_what_to_do(tmp_path, tokenized):
    out, _ = tokenized
    record = read_record(out / "tokenizer")
    old = tmp_path / "tokenizer"
    old.mkdir()
    (old / "tokenizer.json").write_text(json.dumps({**record, "format": FORMAT_VERSION - 1}))
    with pytest.raises(UserError, match="re-run musiclm tokenize into a new --out"):
        read_record(old)
