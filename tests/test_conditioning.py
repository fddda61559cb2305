"""The stages follow their conditioning, proven on corpora whose answer is known (tests/known_answer.py).

Each stage trains at ``tiny`` size on a corpus where it *needs* its conditioning; then, on held-out
clips, it must predict its target teacher-forced, lose that when given another clip's conditioning,
and, chained through :class:`MusicLM` over 12 s (several windows of every stage), generate streams that
follow every relation frame by frame, on every sampling path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from musiclm.config import STAGES
from musiclm.errors import UserError
from musiclm.generation import MusicLM
from musiclm.training.run_folder import load_stage
from musiclm.training.trainer import run_train
from tests import known_answer as ka

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow, pytest.mark.timeout(1500)]  # the first test pays for training the three stages
SECONDS = 12.0


@pytest.fixture(scope="module")
def trained(tokenized, tmp_path_factory) -> dict[str, dict]:
    """Per stage: its run folder (trained on its known-answer corpus) and held-out clips of that corpus.

    With KNOWN_ANSWER_RUNS=DIR set, the corpora and runs are kept in DIR and a later session reuses
    them (to check a change to generation alone without training again); unset, all is made anew."""
    tokenizer = tokenized[0] / "tokenizer"
    keep = os.environ.get("KNOWN_ANSWER_RUNS")
    root = Path(keep) if keep else tmp_path_factory.mktemp("known")
    out = {}
    for stage in STAGES:
        data, val, run = root / stage, root / f"{stage}-val", root / "runs" / stage
        if not (keep and (run / "checkpoints").is_dir()):
            for folder in (data, val, run):
                shutil.rmtree(folder, ignore_errors=True)
            ka.write_known_corpus(data, tokenizer, stage, n_clips=48, seed=0)
            ka.write_known_corpus(val, tokenizer, stage, n_clips=16, seed=1)
            run_train(stage, data, run, ka.known_answer_config(), steps=ka.STEPS[stage], eval_every=10**6, save_every=10**6, device="cpu")
        out[stage] = {"run": run, "val": ka.read_samples(val)}
    return out


def held_out(trained: dict, stage: str):
    model, layout, _, _ = load_stage(trained[stage]["run"], device="cpu")
    wins = ka.windows(layout, trained[stage]["val"])
    # another clip's conditioning: 7 clips on, which is of another style (styles take turns by 4)
    others = [ka.swapped(layout, w, wins[(i + 7 * 3) % len(wins)]) for i, w in enumerate(wins)]
    return model, layout, wins, others


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_predicts_held_out_clips_from_its_conditioning(trained, stage):
    model, layout, wins, _ = held_out(trained, stage)
    accuracy, loss, _ = ka.teacher_forced(model, layout, wins)
    assert accuracy >= 0.99, (stage, accuracy, loss)


@pytest.mark.parametrize("stage", ["coarse", "fine"])
def test_another_clips_conditioning_costs_at_least_a_third_of_the_accuracy(trained, stage):
    model, layout, wins, others = held_out(trained, stage)
    accuracy = ka.teacher_forced(model, layout, wins)[0]
    swapped = ka.teacher_forced(model, layout, others)[0]
    assert accuracy - swapped >= 0.3, (stage, accuracy, swapped)


def test_the_semantic_stage_takes_its_first_token_style_from_clap(trained):
    model, layout, wins, others = held_out(trained, "semantic")
    own, given = (np.array([w["clap"] for w in ws]) for ws in (wins, others))
    first = ka.teacher_forced(model, layout, wins)[2] - layout.target_offset(0)
    first_swapped = ka.teacher_forced(model, layout, others)[2] - layout.target_offset(0)
    assert np.mean(ka.style_of_semantic(first) == ka.style_of_clap(own)) >= 0.95
    assert np.mean(ka.style_of_semantic(first_swapped) == ka.style_of_clap(given)) >= 0.95
    assert np.mean(ka.style_of_semantic(first_swapped) == ka.style_of_clap(own)) <= 0.25  # chance, or less


# ---- generated chains ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(trained) -> dict[str, MusicLM]:
    runs = [trained[s]["run"] for s in STAGES]
    return {precision: MusicLM.from_runs(*runs, device="cpu", precision=precision) for precision in ("fp32", "int8")}


def style_row(trained, style: int) -> np.ndarray:
    """A held-out clip's CLAP tokens of ``style``."""
    return next(s.clap[0] for s in trained["semantic"]["val"] if ka.style_of_clap(s.clap[0]) == style).astype(np.int64)


def check_follows(lm: MusicLM, g, clap: np.ndarray) -> dict[str, float]:
    rates = {}
    for b in range(len(g.semantic)):
        ok = ka.agreement(lm.info, g.semantic[b], g.acoustic[b], clap, g.prompt_frames)
        for name, frames in ok.items():
            rates[name] = min(rates.get(name, 1.0), float(frames.mean()))
    assert all(r >= 0.99 for r in rates.values()), rates
    return rates


PATHS = {
    "int8, KV cache": dict(precision="int8"),
    "fp32, KV cache": dict(precision="fp32"),
    "fp32, recomputed": dict(precision="fp32", use_cache=False),
    "int8, fixed-shape steps": dict(precision="int8", fixed_steps=True),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_a_generated_chain_follows_every_relation_across_windows(trained, chain, path):
    opts = dict(PATHS[path])
    lm = chain[opts.pop("precision")]
    lm.fixed_steps = opts.pop("fixed_steps", False)
    try:
        clap = style_row(trained, 1)
        g = lm.generate_with_details(None, SECONDS, clap_tokens=clap, seed=5, **opts)
    finally:
        lm.fixed_steps = False
    assert {w.stage for w in g.windows} == set(STAGES)
    for stage in STAGES:  # 12 s spans several windows of every stage
        assert sum(w.stage == stage for w in g.windows) >= 3
    check_follows(lm, g, clap)


def test_a_streamed_chain_follows_every_relation(trained, chain):
    lm = chain["int8"]
    clap = style_row(trained, 2)
    run = lm.stream(None, SECONDS, clap_tokens=clap, seed=6)
    chunks = list(run)
    assert len(chunks) > 3
    check_follows(lm, run.generation, clap)


def test_a_continued_prompt_is_followed_from_its_last_frame_on(trained, chain, monkeypatch, tmp_path):
    """The prompt's tokens are a held-out clip's (audio through the tiny backbones would not follow the
    relations); the new frames must follow them, starting from the prompt's last semantic frame."""
    lm = chain["int8"]
    clip = trained["semantic"]["val"][3]
    ticks = 50  # 2 s of prompt
    tokens = {"semantic": clip.semantic[: ticks * lm.per_tick["semantic"]].astype(np.int64), "acoustic": clip.acoustic[:, : ticks * lm.per_tick["acoustic"]].astype(np.int64)}
    monkeypatch.setattr(lm, "prompt_tokens", lambda path: (tokens, ticks * lm.tick, 0.0))
    clap = clip.clap[0].astype(np.int64)
    g = lm.generate_with_details(None, SECONDS, clap_tokens=clap, seed=7, prompt_audio=tmp_path / "unread.wav")
    assert g.prompt_frames == {"semantic": 100, "acoustic": 150}
    assert np.array_equal(g.semantic[0, :100], tokens["semantic"])
    rates = check_follows(lm, g, clap)
    assert rates["semantic"] >= 0.99  # includes the first new frame following the prompt's last


def test_clap_tokens_take_one_row_per_story_prompt_and_bad_ones_are_one_line_errors(trained, chain):
    lm = chain["int8"]
    rows = np.stack([style_row(trained, 0), style_row(trained, 3)])
    g = lm.generate_with_details(None, 2.4, clap_tokens=rows, every=1.2, seed=1)
    assert g.prompts == [f"clap tokens {' '.join(map(str, r))}" for r in rows]
    assert {w.prompt for w in g.windows if w.stage == "semantic"} <= {0, 1}
    bad = {
        "levels": (rows[0][:3], "has 3 codes per row; this model's CLAP quantizer has 4 levels"),
        "range": (rows[0] + 100, "must be codes in [0, 16)"),
        "negative": (rows[0] - 100, "must be codes in [0, 16)"),
        "fractions": (rows[0] + 0.5, "whole-number codes"),
        "ragged": ([[1, 2, 3, 4], [1, 2]], "whole-number codes"),
    }
    for name, (tokens, words) in bad.items():
        with pytest.raises(UserError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            lm.generate(None, 1.0, clap_tokens=tokens)
    with pytest.raises(UserError, match="condition on one thing"):
        lm.generate("a calm piano", 1.0, clap_tokens=rows[0])
    with pytest.raises(UserError, match="nothing to condition on"):
        lm.generate(None, 1.0)
