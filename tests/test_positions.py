"""Rotary positions that mean time: the layout's table, one table for every path, and runs from before."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from musiclm.config import config_from_dict, load_config, to_dict
from musiclm.errors import UserError
from musiclm.models.layout import StageLayout
from musiclm.models.sampling import sample_target
from musiclm.models.transformer import MusicTransformer
from musiclm.training.resume import check_resumable
from musiclm.training.run_folder import load_stage
from tests.factories import fake_info

INDEX_RUN = Path(__file__).parent / "fixtures" / "index_run"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread for the whole module


def test_time_positions_put_the_same_instant_of_every_stream_at_one_position():
    layout = StageLayout("coarse", fake_info(), 0.4)  # clap 4 + semantic 20 -> acoustic 3 x 30
    pos = layout.positions("time")
    assert pos.shape == (layout.seq_len,)
    assert layout.ticks_per_second == 150 and layout.ticks_per_frame("semantic") == 3 and layout.ticks_per_frame("acoustic") == 2
    assert (pos[: layout.clap_len] == 0).all()  # CLAP holds for the whole window: before the timeline
    sem = pos[layout.clap_len : layout.prefix_len]
    ac = pos[layout.prefix_len :].reshape(30, 3)
    assert (ac == ac[:, :1]).all()  # a frame's levels share its position
    assert sem[0] == ac[0, 0] == 1  # the timeline starts at 1, after CLAP
    for t in range(30):  # acoustic frame t at time t/75 s, semantic frame 2t/3 at the same time when whole
        if (2 * t) % 3 == 0:
            assert ac[t, 0] == sem[2 * t // 3]
    # 40 ms later (one grid tick: 2 semantic, 3 acoustic frames) is 6 ticks later in both streams
    assert sem[2] - sem[0] == ac[3, 0] - ac[0, 0] == 6


def test_index_positions_are_the_slots_and_unknown_kinds_are_refused():
    layout = StageLayout("fine", fake_info(), 0.4)
    assert (layout.positions("index") == np.arange(layout.seq_len)).all()
    fine = layout.positions("time")
    assert (fine[: layout.prefix_len].reshape(30, 3)[:, 0] == 1 + 2 * np.arange(30)).all()
    with pytest.raises(ValueError, match="positions"):
        layout.positions("frame")


def test_the_model_of_a_layout_rotates_by_the_configured_positions():
    layout = StageLayout("coarse", fake_info(), 0.4)
    cfg = load_config("tiny").model
    assert cfg.positions == "time"  # the default of every preset
    for kind in ("time", "index"):
        torch.manual_seed(0)
        model = MusicTransformer.for_layout(dataclasses.replace(cfg, positions=kind), layout)
        table = model.rotary._table(torch.from_numpy(layout.positions(kind)))
        assert torch.equal(model.rotary.cos, table[0]) and torch.equal(model.rotary.sin, table[1])


def test_a_time_table_refuses_slots_past_the_window():
    layout = StageLayout("fine", fake_info(), 0.4)
    model = MusicTransformer.for_layout(load_config("tiny").model, layout).eval()
    cache = model.new_cache(1, layout.seq_len + 1)
    model(torch.zeros(1, layout.seq_len, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="past the"):
        model(torch.zeros(1, 1, dtype=torch.long), cache)


def test_presets_default_to_time_and_a_bad_value_is_a_one_line_error(tmp_path):
    for preset in ("tiny", "small", "large"):
        assert load_config(preset).model.positions == "time"
    path = tmp_path / "bad.toml"
    path.write_text('base = "tiny"\n[model]\npositions = "sequence"\n')
    with pytest.raises(UserError, match="model.positions = 'sequence' is not one of time, index"):
        load_config(path=path)


def test_a_recorded_config_without_positions_reads_as_index_and_one_with_them_as_recorded():
    recorded = to_dict(load_config("tiny"))
    assert config_from_dict(recorded).model.positions == "time"
    del recorded["model"]["positions"]
    assert config_from_dict(recorded).model.positions == "index"


def test_a_run_from_before_positions_resumes_with_its_recorded_config():
    run = json.loads((INDEX_RUN / "run.json").read_text())
    assert "positions" not in run["config"]["model"]
    model, layout, cfg, info = load_stage(INDEX_RUN, device="cpu")
    check_resumable(run, "coarse", cfg, info, INDEX_RUN)  # index, as recorded: the same model
    timed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, positions="time"))
    with pytest.raises(UserError, match="positions"):
        check_resumable(run, "coarse", timed, info, INDEX_RUN)


def test_a_run_from_before_positions_samples_exactly_what_it_sampled_then(tmp_path):
    """The fixture's tokens were sampled by the code before positions were a setting."""
    run = tmp_path / "run"
    shutil.copytree(INDEX_RUN, run)
    saved = np.load(run / "expected_tokens.npz")
    model, layout, cfg, _ = load_stage(run, device="cpu")
    assert cfg.model.positions == "index"

    def sample(m: MusicTransformer, **kw) -> np.ndarray:
        g = torch.Generator().manual_seed(3)
        return sample_target(m, layout, torch.from_numpy(saved["prefix"]), layout.target.length, temperature=1.0, generator=g, **kw).numpy()

    assert np.array_equal(sample(model), saved["tokens"])
    assert np.array_equal(sample(model, use_cache=False), saved["tokens"])
    # the same weights read with time positions sample otherwise: the check above can fail
    timed = MusicTransformer.for_layout(dataclasses.replace(cfg.model, positions="time"), layout).eval()
    timed.load_state_dict(model.state_dict())
    assert not np.array_equal(sample(timed), saved["tokens"])
