"""Generation: text -> semantic -> coarse -> fine -> waveform with tiny trained stages.

The stages are trained for a few steps on the session's tokenized corpus; they
make noise, but every property here (length, windows, conditioning, seeds,
re-ranking, continuation, cache) holds for any weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import musiclm.generation.stages as stages
from musiclm.cli import main
from musiclm.config import STAGES
from musiclm.commands.generate import output_paths
from musiclm.generation import MusicLM, plan_windows
from musiclm.metrics import clap_audio_embeddings


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread for the whole module


@pytest.fixture(scope="module")
def model_dir(trained_runs) -> Path:
    return trained_runs


@pytest.fixture(scope="module")
def lm(model_dir) -> MusicLM:
    """fp32: int8's activation scales follow each call's input, so its cached and recomputed steps round
    differently (the command's tests run the default, int8)."""
    return MusicLM.from_pretrained(model_dir, device="cpu", precision="fp32")


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """Every sample_target call generation makes: the stage and what it fed (prefix, guidance, primer)."""
    seen: list[dict] = []
    real = stages.sample_target

    def recording(model, layout, prefix, n_target, **kw):
        seen.append({"stage": layout.stage, "layout": layout, "prefix": prefix.numpy().copy(), "n_target": n_target, **kw})
        return real(model, layout, prefix, n_target, **kw)

    monkeypatch.setattr(stages, "sample_target", recording)
    return seen


def samples_for(lm: MusicLM, seconds: float) -> int:
    return round(seconds * 75) * lm.hop


def test_import_musiclm_is_cheap_and_exports_musiclm_lazily():
    code = "import sys, musiclm; assert 'torch' not in sys.modules; print(musiclm.__version__, musiclm.MusicLM.__module__)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout.split()
    assert out[1] == "musiclm.generation.model" and out[0]


# ---- windows ---------------------------------------------------------------------------------------------------------
def test_windows_advance_by_half_a_window_and_are_primed_with_the_overlap():
    assert plan_windows(10, 0, 4, 2, 1) == [(0, 0, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    assert plan_windows(3, 0, 4, 2, 1) == [(0, 0, 3)]  # shorter than one window: one short window


def test_the_last_window_moves_back_to_stay_whole():
    # 11 is no multiple of the hop: the last window starts 1 frame after the one before, not 2
    assert plan_windows(11, 0, 4, 2, 1) == [(0, 0, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10), (7, 10, 11)]
    # on a grid of 3 it starts on the grid and ends on it, a frame past the stream's 20
    assert plan_windows(20, 0, 12, 6, 3) == [(0, 0, 12), (6, 12, 18), (9, 18, 21)]


def test_windows_after_a_prompt_keep_half_a_window_of_it_as_context():
    assert plan_windows(12, 5, 4, 2, 1) == [(3, 5, 7), (5, 7, 9), (7, 9, 11), (8, 11, 12)]
    # starts stay on the grid: context grows to the grid line below
    assert plan_windows(20, 7, 6, 3, 3) == [(3, 7, 9), (6, 9, 12), (9, 12, 15), (12, 15, 18), (15, 18, 21)]
    assert plan_windows(6, 5, 4, 2, 1) == [(2, 5, 6)]  # one new frame: a whole window, primed with 3


@pytest.mark.parametrize("window, hop, align", [(4, 2, 1), (6, 3, 3), (200, 100, 2), (150, 75, 3), (75, 36, 3), (12, 6, 2)])
def test_every_window_is_whole_on_the_grid_and_the_windows_tile_the_new_frames(window, hop, align):
    for known in range(0, 2 * window, max(1, window // 7)):
        for total in range(known + 1, known + 4 * window, max(1, window // 11)):
            plan = plan_windows(total, known, window, hop, align)
            assert plan[0][1] == known
            assert all(b[1] == a[2] for a, b in zip(plan, plan[1:]))  # new frames: no gap, no overlap
            assert all(a[0] < b[0] for a, b in zip(plan, plan[1:]))
            for start, k, end in plan:
                assert start % align == 0 and start <= k < end  # primed with all it shares with what exists
            if total >= window:
                assert all(end - start == window for start, _, end in plan), (total, known, plan)
                assert plan[-1][2] == -(-total // align) * align  # ends on the grid, less than a step past the stream
            else:  # nothing to shift: one window of the stream's length
                assert plan == [(0, known, total)]


def test_output_length_is_exact_to_the_codec_frame_beyond_every_window(lm):
    longest = max(st.layout.window_seconds for st in lm.stages.values())
    for seconds in (0.37, 1.0, longest + 1.3):
        g = lm.generate_with_details("a calm piano", seconds, seed=0)
        assert g.audio.shape == (1, samples_for(lm, seconds))
        for name in STAGES:
            wins = [w for w in g.windows if w.stage == name]
            layout = lm.stages[name].layout
            total = (g.semantic if name == "semantic" else g.acoustic).shape[-1]
            grid = 2 if name == "semantic" else 3  # frames per 40 ms, where 50 Hz and 75 Hz frames both start
            timeline = -(-total // grid) * grid  # the stages sample whole ticks; the output drops the rest
            assert wins[0].known == 0 and wins[-1].end == timeline
            assert all(b.known == a.end for a, b in zip(wins, wins[1:]))  # no gap, nothing sampled twice
            if timeline >= layout.target.frames:
                assert all(w.end - w.start == layout.target.frames for w in wins)
            else:
                assert len(wins) == 1
            half = layout.target.frames // 2 // grid * grid
            assert all(b.start - a.start == half for a, b in zip(wins[:-1], wins[1:-1]))
            assert all(0 < b.start - a.start <= half for a, b in zip(wins[-2:-1], wins[-1:]))  # the last: moved back to stay whole
        assert (g.semantic >= 0).all() and (g.acoustic >= 0).all()
    assert sum(w.stage == "semantic" for w in g.windows) >= 2  # the longest run slid every stage


def test_coarse_windows_are_conditioned_on_the_semantic_frames_of_their_span(lm, calls):
    g = lm.generate_with_details("a calm piano", 4.0, seed=0, coarse_only=True)
    layout = lm.stages["coarse"].layout
    coarse = [c for c in calls if c["stage"] == "coarse"]
    wins = [w for w in g.windows if w.stage == "coarse"]
    assert len(coarse) == len(wins) >= 3
    sem_offset = layout.offsets[("semantic", 0)]
    for c, w in zip(coarse, wins):
        a, e = w.start * 2 // 3, -(-w.end * 2 // 3)  # 75 Hz acoustic frames -> 50 Hz semantic frames
        sem_ids = c["prefix"][0, layout.clap_len : layout.clap_len + (e - a)]
        assert np.array_equal(sem_ids - sem_offset, g.semantic[0, a:e])
        if w.known > w.start:  # primed with the coarse ids of the overlap
            assert np.array_equal(c["target_prompt"][0].numpy(), layout.target_ids({"acoustic": g.acoustic[0, :, w.start : w.known]}))


def pads_only_at_the_end(ids: np.ndarray, pad_id: int) -> bool:
    """True when the pad ids of every row of ids [N, P] form its tail (no pad at all counts)."""
    is_pad = ids == pad_id
    return all(not row.any() or row[row.argmax() :].all() for row in is_pad)


@pytest.mark.parametrize("seconds, continued", [(1.3, False), (4.5, False), (1.3, True)])
def test_no_prefix_has_pad_ids_unless_the_output_is_shorter_than_the_window(lm, calls, tmp_path, seconds, continued):
    """Lengths that are no multiple of any stage's hop: every window is whole, so its conditioning
    streams fill the prefix; only a stage whose timeline is shorter than its window pads, at the end."""
    prompt_audio = None
    if continued:
        from musiclm.pipeline.audio_out import write_audio
        from musiclm.pipeline.synth import synth_clip

        prompt_audio = tmp_path / "prompt.wav"
        write_audio(prompt_audio, synth_clip("chord", 2.0, 24000, seed=5), 24000)
    g = lm.generate_with_details("a calm piano", seconds, prompt_audio=prompt_audio, num_samples=2, cfg_scale=2.0, seed=0)
    assert g.audio.shape == (1, samples_for(lm, seconds))
    assert len(calls) == len(g.windows)
    for c, w in zip(calls, g.windows):
        layout = c["layout"]
        frames, pad = layout.target.frames, layout.pad_id
        assert c["stage"] == w.stage and c["n_target"] == (w.end - w.start) * layout.target_levels
        prefixes = [c["prefix"]] + ([c["uncond_prefix"].numpy()] if c["uncond_prefix"] is not None else [])
        alone = [x for x in g.windows if x.stage == w.stage] == [w]
        if alone and w.end < frames:  # a true short output: its conditioning is padded up to the target
            assert all(pads_only_at_the_end(p, pad) for p in prefixes)
        else:
            assert all((p != pad).all() for p in prefixes), f"pad ids inside the prefix of {w}"
            assert w.end - w.start == frames
        if w.known > w.start:  # primed with all of its span that existed
            window = {"semantic": g.semantic[0, w.start : w.known], "acoustic": g.acoustic[0, :, w.start : w.known]}
            assert np.array_equal(c["target_prompt"][0].numpy(), layout.target_ids(window))
    moved = []
    for name in STAGES:  # these lengths make a last window move back, less than a hop after the one before
        starts = [w.start for w in g.windows if w.stage == name]
        grid = 2 if name == "semantic" else 3
        moved.append(len(starts) > 1 and starts[-1] - starts[-2] < lm.stages[name].layout.target.frames // 2 // grid * grid)
    assert any(moved)


# ---- seeds, samples, re-ranking --------------------------------------------------------------------------------------
def test_same_seed_gives_the_same_audio_and_another_seed_differs(lm):
    a, sr = lm.generate("a calm piano", 0.6, seed=1)
    b, _ = lm.generate("a calm piano", 0.6, seed=1)
    c, _ = lm.generate("a calm piano", 0.6, seed=2)
    assert sr == lm.sample_rate and a.shape == (samples_for(lm, 0.6),)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_samples_run_as_one_batch_and_the_best_scored_are_kept(lm, calls):
    g = lm.generate_with_details("a calm piano", 0.6, num_samples=4, keep=2, seed=3)
    assert {c["prefix"].shape[0] for c in calls} == {4}  # every window of every stage: one batch of 4
    assert g.audio.shape == (2, samples_for(lm, 0.6)) and g.scores.shape == (4,)
    assert g.kept == list(np.argsort(-g.scores, kind="stable")[:2])
    # the kept audio is the decode of the kept tokens, and its score is its CLAP similarity to the text
    for row, i in enumerate(g.kept):
        assert np.allclose(lm.tokenizer.decode_acoustic(g.acoustic[i : i + 1])[0], g.audio[row], atol=1e-6)
    text = lm.tokenizer.clap_text_embed(["a calm piano"]).numpy()[0]
    rescored = clap_audio_embeddings(lm.tokenizer, list(g.audio), lm.sample_rate) @ text
    assert np.allclose(rescored, g.scores[g.kept], atol=1e-5)
    audio, _ = lm.generate("a calm piano", 0.6, num_samples=3, keep=3, seed=3)
    assert audio.shape == (3, samples_for(lm, 0.6))


def test_guidance_pairs_each_prefix_with_its_null_conditioned_twin(lm, calls):
    lm.generate_with_details("a calm piano", 0.6, cfg_scale=2.0, seed=0)
    for c in calls:
        layout = c["layout"]
        if layout.has_clap:
            assert c["cfg_scale"] == 2.0
            assert (c["uncond_prefix"][:, : layout.clap_len] == layout.null_id).all()
            assert np.array_equal(c["uncond_prefix"][:, layout.clap_len :].numpy(), c["prefix"][:, layout.clap_len :])
        else:
            assert c["uncond_prefix"] is None and c["cfg_scale"] == 1.0  # fine has no text to guide with


# ---- story mode --------------------------------------------------------------------------------------------------------
def distinct_prompts(lm: MusicLM, n: int) -> list[str]:
    """n prompts whose CLAP tokens differ (the tiny random CLAP maps many texts to the same tokens)."""
    candidates = ["a calm piano", "drums", "x", "jazz", "quiet", "a", "LOUD!!!", "zzzz", "rock", "violin solo", "rain on a tin roof",
                  "techno 140 bpm", "1234", "loud drums and bass", "choir", "??", "ambient pads", "banjo", "Z", "lo-fi hip hop beat"]  # fmt: skip
    codes, _ = lm.tokenizer.text_tokens(candidates)
    chosen: dict[tuple, str] = {}
    for text, c in zip(candidates, codes):
        chosen.setdefault(tuple(c), text)
    assert len(chosen) >= n, f"the tiny CLAP tells only {len(chosen)} of these prompts apart"
    return list(chosen.values())[:n]


def test_story_mode_conditions_each_window_on_the_prompt_of_its_start(lm, calls):
    prompts = distinct_prompts(lm, 2)
    codes, _ = lm.tokenizer.text_tokens(prompts)
    g = lm.generate_with_details(prompts, 6.0, every=2.0, seed=0, coarse_only=True)
    wins = [w for w in g.windows if w.stage in ("semantic", "coarse")]
    assert len(calls) == len(wins)
    used = {"semantic": [], "coarse": []}
    for c, w in zip(calls, wins):
        layout = c["layout"]
        rate = 50 if w.stage == "semantic" else 75
        expected = min(int(w.start / rate // 2.0), 1)  # prompt i from i * 2 s on; the last one holds to the end
        assert w.prompt == expected
        clap = c["prefix"][0, : layout.clap_len] - np.array([layout.offsets[("clap", lv)] for lv in range(layout.clap_len)])
        assert np.array_equal(clap, codes[expected])
        used[w.stage].append(expected)
    assert used == {"semantic": [0, 1], "coarse": [0, 0, 1, 1, 1]}  # windows start every 2 s and every 1 s
    assert g.audio.shape == (1, samples_for(lm, 6.0))  # the music runs on across prompt changes


# ---- continuation ------------------------------------------------------------------------------------------------------
def test_continuation_streams_start_with_the_prompt_audio_tokens(lm, calls, tmp_path):
    from musiclm.pipeline.audio import load_for_rates
    from musiclm.pipeline.audio_out import write_audio
    from musiclm.pipeline.synth import synth_clip

    path = tmp_path / "prompt.wav"
    write_audio(path, synth_clip("chord", 2.0, 24000, seed=5), 24000)
    g = lm.generate_with_details("a calm piano", 1.0, prompt_audio=path, num_samples=2, seed=0)
    expected = lm.tokenizer.tokenize(load_for_rates(path, 0.0, None, lm.tokenizer.sample_rates))
    p_sem, p_ac = g.prompt_frames["semantic"], g.prompt_frames["acoustic"]
    assert p_sem * 3 == p_ac * 2 and p_sem >= len(expected["semantic"]) - 2  # whole 40 ms ticks, at most one dropped
    assert g.prompt_seconds == pytest.approx(p_ac / 75) and g.continues_at == pytest.approx(g.prompt_seconds)
    for row in range(2):
        assert np.array_equal(g.semantic[row, :p_sem], expected["semantic"][:p_sem])
        assert np.array_equal(g.acoustic[row, :, :p_ac], expected["acoustic"][:, :p_ac])
    assert g.audio.shape == (1, samples_for(lm, 1.0))  # the prompt is not part of the output
    for name in STAGES:  # the first window of every stage is primed with the prompt's own ids
        first = next(c for c in calls if c["stage"] == name)
        layout = first["layout"]
        w = next(w for w in g.windows if w.stage == name)
        assert w.known == (p_sem if name == "semantic" else p_ac) > w.start
        window = {"semantic": expected["semantic"][w.start : w.known], "acoustic": expected["acoustic"][:, w.start : w.known]}
        assert np.array_equal(first["target_prompt"][0].numpy(), layout.target_ids(window))


# ---- cache ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cached_and_recomputed_sampling_give_the_same_tokens_through_the_chain(lm):
    fast = lm.generate_with_details("a calm piano", 1.2, num_samples=2, seed=11)
    slow = lm.generate_with_details("a calm piano", 1.2, num_samples=2, seed=11, use_cache=False)
    assert sum(w.stage == "fine" for w in fast.windows) >= 2  # a primed window is part of the check
    assert np.array_equal(fast.semantic, slow.semantic)
    assert np.array_equal(fast.acoustic, slow.acoustic)
    assert np.array_equal(fast.audio, slow.audio)


# ---- the command -----------------------------------------------------------------------------------------------------------
def test_generate_writes_the_kept_samples_and_a_sidecar(model_dir, lm, tmp_path, capsys):
    out = tmp_path / "songs" / "song.wav"
    main(["generate", "a calm piano", "--model", str(model_dir), "--seconds", "0.8", "--out", str(out), "--num-samples", "3", "--keep", "2", "--seed", "7"])
    files = [tmp_path / "songs" / "song-0.wav", tmp_path / "songs" / "song-1.wav"]
    for f in files:
        info = sf.info(f)
        assert (info.frames, info.samplerate, info.format) == (samples_for(lm, 0.8), lm.sample_rate, "WAV")
    meta = json.loads((tmp_path / "songs" / "song.json").read_text())
    assert meta["prompts"] == ["a calm piano"] and meta["seed"] == 7 and meta["seconds"] == 0.8
    assert [o["file"] for o in meta["outputs"]] == [str(f) for f in files]
    scores = [o["clap_score"] for o in meta["outputs"]]
    assert scores == sorted(scores, reverse=True) == sorted(meta["clap_scores"], reverse=True)[:2]
    assert {k: Path(v["run"]) for k, v in meta["stages"].items()} == {s: model_dir / s for s in STAGES}
    assert meta["stages"]["coarse"]["temperature"] == 0.95 and meta["stages"]["semantic"]["cfg_scale"] == 1.5  # tiny's [generate]
    assert meta["tokenizer"]["fingerprint"] == lm.info.fingerprint
    assert "wrote" in capsys.readouterr().out


def test_output_names_follow_the_format_and_keep():
    assert output_paths("a/song.wav", None, 1) == ([Path("a/song.wav")], Path("a/song.json"), "wav")
    assert output_paths("a/song.wav", "flac", 2) == ([Path("a/song-0.flac"), Path("a/song-1.flac")], Path("a/song.json"), "flac")
    assert output_paths("song", None, 1)[0] == [Path("song.wav")]


def error_of(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["  "], "prompt is empty"),
        (["x", "--seconds", "0"], "--seconds"),
        (["x", "--seconds", "-2"], "--seconds"),
        (["x", "--num-samples", "2", "--keep", "3"], "--keep 3 is more than --num-samples 2"),
        (["x", "--every", "2"], "several prompts"),
        (["x", "--format", "mp3"], "--format must be wav or flac"),
        (["x", "--temperature", "1", "--temperature", "2"], "1 value"),
        (["x", "--top-p", "0"], "--top-p"),
        (["x", "--stream", "--num-samples", "2"], "--stream plays one sample"),
        (["x", "--out", "-", "--keep", "2", "--num-samples", "2"], "--out - writes one WAV stream"),
        (["x", "--precision", "fp8"], "fp8"),
        (["x", "--revision", "main"], "drop --revision"),
    ],
)
def test_bad_generate_options_are_one_line_errors(capsys, model_dir, args, words):
    assert words in error_of(capsys, "generate", *args, "--model", model_dir)


def test_missing_or_mismatched_stages_are_one_line_errors(capsys, model_dir, tmp_path):
    assert "no semantic stage" in error_of(capsys, "generate", "x", "--model", tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    for s in ("semantic", "coarse"):
        (partial / s).symlink_to(model_dir / s)
    assert "no fine stage" in error_of(capsys, "generate", "x", "--model", partial)
    other = tmp_path / "other_coarse"
    shutil.copytree(model_dir / "coarse", other)
    run = json.loads((other / "run.json").read_text())
    run["tokenizer"]["fingerprint"] = "0123456789abcdef"  # as if trained on another tokenized corpus
    (other / "run.json").write_text(json.dumps(run))
    line = error_of(capsys, "generate", "x", "--model", model_dir, "--coarse", other)
    assert "different tokenizers" in line and "semantic" in line and "coarse (0123456789abcdef)" in line
    assert "coarse stage" in error_of(capsys, "generate", "x", "--model", model_dir, "--semantic", model_dir / "coarse")


def test_unreadable_prompt_audio_is_a_one_line_error(capsys, model_dir, tmp_path):
    bad = tmp_path / "prompt.wav"
    bad.write_text("not audio")
    assert "cannot read the prompt audio" in error_of(capsys, "generate", "x", "--model", model_dir, "--prompt-audio", bad)
    assert "cannot read the prompt audio" in error_of(capsys, "generate", "x", "--model", model_dir, "--prompt-audio", tmp_path / "missing.wav")


# ---- conditioning on audio: --style-audio -----------------------------------------------------------------------------
def reference_clip(lm: MusicLM, path: Path, seconds: float) -> Path:
    from musiclm.pipeline.synth import synth_clip

    sf.write(path, synth_clip("mix", seconds, 32000, seed=11), 32000)
    return path


def test_the_style_tokens_of_a_clip_are_the_clap_tokens_its_tokenization_gave_it(lm, tmp_path):
    from musiclm.pipeline.audio import load_for_rates

    window = lm.tokenizer.cfg.clap.window_seconds  # one CLAP window: tokenize keeps its tokens as they are
    ref = reference_clip(lm, tmp_path / "ref.wav", window)
    codes, emb = lm.style_tokens(ref)
    tokenized = lm.tokenizer.tokenize(load_for_rates(ref, 0.0, None, lm.tokenizer.sample_rates))
    assert codes.shape == (1, lm.info.clap.levels) and np.array_equal(codes[0], tokenized["clap"][0])
    assert np.allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)


def test_style_audio_generates_what_its_clap_tokens_generate(lm, tmp_path):
    ref = reference_clip(lm, tmp_path / "ref.wav", 6.0)
    codes, emb = lm.style_tokens(ref)
    by_audio = lm.generate_with_details(None, 1.2, style_audio=ref, seed=3)
    by_codes = lm.generate_with_details(None, 1.2, clap_tokens=codes[0], seed=3)
    assert np.array_equal(by_audio.semantic, by_codes.semantic) and np.array_equal(by_audio.acoustic, by_codes.acoustic)
    assert by_audio.prompts == ["like ref.wav"]
    # ranked against the reference clip's own embedding; given codes against the embedding they stand for
    score = (clap_audio_embeddings(lm.tokenizer, [by_audio.audio[0]], lm.sample_rate) * emb).sum()
    assert by_audio.scores[0] == pytest.approx(score, abs=1e-5)
    assert np.allclose(lm.tokenizer.clap_embedding(codes), lm.conditioning([], clap_tokens=codes[0])[1])


def test_generate_style_audio_writes_music_like_a_reference(model_dir, lm, tmp_path, capsys):
    ref = reference_clip(lm, tmp_path / "ref.wav", 3.0)
    out = tmp_path / "like.wav"
    main(["generate", "--style-audio", str(ref), "--model", str(model_dir), "--seconds", "0.8", "--out", str(out)])
    assert sf.info(out).frames == samples_for(lm, 0.8)
    assert json.loads((tmp_path / "like.json").read_text())["prompts"] == ["like ref.wav"]
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    assert "cannot read the style audio" in error_of(capsys, "generate", "--style-audio", bad, "--model", model_dir)
    assert "condition on one thing" in error_of(capsys, "generate", "a calm piano", "--style-audio", ref, "--model", model_dir)
    assert "nothing to condition on" in error_of(capsys, "generate", "--model", model_dir)


# ---- streaming -------------------------------------------------------------------------------------------------------
def test_streamed_chunks_join_to_exactly_the_generated_audio(lm):
    """Stream and generate run the same windows with the same per-window random numbers and decode in
    the same chunks; several chunks come, the first before the whole run is done."""
    kw = {"cfg_scale": 2.0, "seed": 4}
    run = lm.stream("a calm piano", 3.3, **kw)
    chunks = list(run)
    g = lm.generate_with_details("a calm piano", 3.3, num_samples=1, **kw)
    assert len(chunks) >= 3 and all(c.ndim == 1 for c in chunks)
    assert np.array_equal(np.concatenate(chunks), g.audio[0])
    assert np.array_equal(run.generation.acoustic, g.acoustic) and np.array_equal(run.generation.semantic, g.semantic)
    assert run.generation.timings["first_audio"] < sum(v for k, v in run.generation.timings.items() if k in (*STAGES, "decode"))


def test_window_order_does_not_change_the_tokens(lm):
    """Windows interleave across stages; each draws from its own generator, so running every semantic
    window, then every coarse one, then every fine one gives the same tokens."""
    from musiclm.generation.stages import resolve_settings, sample_window
    from musiclm.generation.windows import plan_stage

    g = lm.generate_with_details("a calm piano", 3.3, num_samples=2, cfg_scale=2.0, seed=5)
    order = [w.stage for w in g.windows]
    assert order != sorted(order, key=STAGES.index)  # the run did interleave
    ticks = -(-g.acoustic.shape[-1] // lm.per_tick["acoustic"])
    streams = {
        "semantic": np.full((2, ticks * lm.per_tick["semantic"]), -1, dtype=np.int64),
        "acoustic": np.full((2, lm.info.acoustic.levels, ticks * lm.per_tick["acoustic"]), -1, dtype=np.int64),
    }
    clap_codes, _ = lm.tokenizer.text_tokens(["a calm piano"])
    settings = resolve_settings(lm.stages, None, None, None, 2.0)
    for name in STAGES:  # stage after stage, as generation ran before streaming
        layout = lm.stages[name].layout
        for w in plan_stage(layout, lm.tick, streams[layout.target.stream].shape[-1], 0, 1, None, 0):
            sample_window(lm.stages[name], streams, w, clap_codes, settings[name], 5)
    assert np.array_equal(streams["semantic"][:, : g.semantic.shape[1]], g.semantic)
    assert np.array_equal(streams["acoustic"][:, :, : g.acoustic.shape[2]], g.acoustic)


def test_stream_continues_prompt_audio_and_story_mode_streams(lm, tmp_path):
    from musiclm.pipeline.audio_out import write_audio
    from musiclm.pipeline.synth import synth_clip

    prompt_audio = tmp_path / "prompt.wav"
    write_audio(prompt_audio, synth_clip("chord", 2.0, 24000, seed=5), 24000)
    kw = {"prompt_audio": prompt_audio, "every": 1.0, "seed": 2}
    streamed = np.concatenate(list(lm.stream(["a calm piano", "fast drums"], 2.4, **kw)))
    whole, _ = lm.generate(["a calm piano", "fast drums"], 2.4, num_samples=1, **kw)
    assert streamed.shape == (samples_for(lm, 2.4),) and np.array_equal(streamed, whole)


def test_progress_counts_seconds_of_audio_per_stage(lm):
    seen: dict[str, list[tuple[float, float]]] = {}
    lm.generate_with_details("a calm piano", 4.5, num_samples=1, seed=0, progress=lambda s, d, t: seen.setdefault(s, []).append((d, t)))
    assert set(seen) == set(STAGES)
    for stage, calls in seen.items():
        done = [d for d, _ in calls]
        assert done == sorted(done) and len(calls) >= 2, stage
        assert 4.5 <= calls[-1][0] == calls[-1][1] < 4.5 + 0.04 + 1e-9  # whole ticks of 40 ms: at most one past the end


def test_out_dash_streams_a_wav_that_a_reader_takes_from_a_pipe(model_dir, lm):
    """``--out - --stream``: a WAV stream on stdout (read here from the pipe as a player would), the
    messages on stderr."""
    import io

    cmd = [sys.executable, "-m", "musiclm", "generate", "a calm piano", "--model", str(model_dir), "--seconds", "1.3", "--out", "-", "--stream", "--device", "cpu", "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the threads of this module's lm: the same float rounding
    done = subprocess.run(cmd, capture_output=True, check=True, timeout=600, cwd=Path(__file__).resolve().parents[1], env=env)
    audio, rate = sf.read(io.BytesIO(done.stdout), dtype="float32")
    assert rate == lm.sample_rate and audio.shape == (samples_for(lm, 1.3),) and np.abs(audio).max() > 0
    assert b"to stdout" in done.stderr and b"first audio after" in done.stderr
    whole, _ = lm.generate("a calm piano", 1.3, num_samples=1)
    assert np.abs(audio - np.clip(whole, -1, 1)).max() <= 2 / 32767  # 16-bit PCM of the same audio
