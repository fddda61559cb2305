"""The per-stage sampling loop: one window of one stage, for every sample of the batch.

**Guidance.** Stages conditioned on CLAP (semantic, coarse) sample with
classifier-free guidance against the same prefix whose CLAP tokens are replaced
by the null id (``layout.prefix(window, drop_cond=True)``); the fine stage has
no text conditioning and samples plainly.

**Random numbers.** Every window draws from its own generator, seeded from
(seed, stage, window index) (:func:`window_generator`). A window's tokens then
depend only on what it is conditioned on, not on the order the windows run in:
streaming interleaves the stages window by window and gives the same tokens
as running each stage over the whole timeline.

**Steps.** With ``samplers`` (a dict the caller keeps) a window runs on the
fixed-shape steps of :mod:`musiclm.models.static_sampling`, captured as CUDA
graphs when ``capture`` is set; otherwise on
:func:`~musiclm.models.sampling.sample_target`. Both give the same tokens.

Layer: generation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from musiclm.config import STAGES, Config
from musiclm.errors import UserError
from musiclm.generation.windows import Window, padded_prefix, window_arrays
from musiclm.models.layout import StageLayout
from musiclm.models.sampling import sample_target
from musiclm.models.static_sampling import SamplerSettings, sampler_for
from musiclm.models.transformer import MusicTransformer


@dataclass
class Stage:
    """One trained stage: model, sequence layout, the run's config, and the run folder it came from."""

    model: MusicTransformer
    layout: StageLayout
    cfg: Config
    run: Path | None = None

    @property
    def name(self) -> str:
        return self.layout.stage


@dataclass(frozen=True)
class StageSettings:
    """How one stage samples (resolved from the arguments, else from the run's ``[generate]`` config)."""

    temperature: float
    top_k: int
    top_p: float
    cfg_scale: float


def temperatures(temperature: float | Sequence[float] | None) -> tuple[float, float, float] | None:
    """One temperature for all stages, or (semantic, coarse, fine); None leaves each stage's own."""
    if temperature is None:
        return None
    values = [float(temperature)] if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    if len(values) not in (1, 3):
        raise UserError(f"--temperature takes 1 value (all stages) or 3 (semantic, coarse, fine), got {len(values)}")
    if any(not math.isfinite(t) or t < 0 for t in values):
        raise UserError(f"temperatures must be >= 0 (0 is greedy), got {values}")
    return tuple(values * 3 if len(values) == 1 else values)  # type: ignore[return-value]


def resolve_settings(
    stages: dict[str, Stage], temperature: float | Sequence[float] | None, top_k: int | None, top_p: float | None, cfg_scale: float | None
) -> dict[str, StageSettings]:
    """Each stage's settings: the arguments given, else the stage's own ``[generate]`` config."""
    temps = temperatures(temperature)
    out = {}
    for i, name in enumerate(STAGES):
        st = stages.get(name)
        if st is None:
            continue
        g = st.cfg.generate
        out[name] = StageSettings(
            temperature=temps[i] if temps else getattr(g, f"temperature_{name}"),
            top_k=g.top_k if top_k is None else top_k,
            top_p=g.top_p if top_p is None else top_p,
            # 1 is no guidance: a stage without CLAP tokens (fine) has nothing to guide with
            cfg_scale=(g.cfg_scale if cfg_scale is None else cfg_scale) if st.layout.has_clap else 1.0,
        )
    return out


def window_generator(seed: int, w: Window) -> torch.Generator:
    """The CPU generator of window ``w``, derived from (seed, stage, window index)."""
    state = np.random.SeedSequence([int(seed) % 2**64, STAGES.index(w.stage), w.index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_window(
    st: Stage,
    streams: dict[str, np.ndarray],
    w: Window,
    clap_codes: np.ndarray,
    s: StageSettings,
    seed: int,
    *,
    use_cache: bool = True,
    samplers: dict | None = None,
    capture: bool = False,
) -> None:
    """Sample window ``w`` of stage ``st`` for all N rows, writing its new codes into ``streams`` in place.

    ``streams``: {"semantic": [N, T_s], "acoustic": [N, Q, T_a]} int64, the frames the window reads
    already filled; ``clap_codes`` [P, L]: each text prompt's CLAP tokens.
    """
    layout = st.layout
    info = layout.info
    target = layout.target.stream
    n = streams[target].shape[0]
    guided = layout.has_clap and s.cfg_scale != 1.0
    wins = [window_arrays(info, layout, streams, b, w, clap_codes) for b in range(n)]
    prefix = torch.from_numpy(np.stack([padded_prefix(layout, win) for win in wins]))  # [N, P]
    uncond = torch.from_numpy(np.stack([padded_prefix(layout, win, drop_cond=True) for win in wins])) if guided else None
    m = w.known - w.start
    given = torch.from_numpy(np.stack([layout.target_ids(win, frames=m) for win in wins])) if m else None  # [N, M]
    n_target = (w.end - w.start) * layout.target_levels
    generator = window_generator(seed, w)
    if samplers is not None and use_cache:
        settings = SamplerSettings(s.temperature, s.top_k, s.top_p, s.cfg_scale, guided=guided, greedy=s.temperature <= 0)
        sampler = sampler_for(st.model, layout, n, settings, capture, samplers)
        ids = sampler.sample(prefix, n_target, uncond_prefix=uncond, target_prompt=given, generator=generator)
    else:
        ids = sample_target(
            st.model, layout, prefix, n_target, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, cfg_scale=s.cfg_scale,
            uncond_prefix=uncond, target_prompt=given, generator=generator, use_cache=use_cache,
        )  # fmt: skip
    ids = ids.cpu().numpy()
    rows = list(layout.target.levels)
    for b in range(n):
        codes = layout.decode_target(ids[b])  # semantic [frames]; acoustic [levels, frames]
        if target == "semantic":
            streams[target][b, w.known : w.end] = codes[m:]
        else:
            streams[target][b, rows, w.known : w.end] = codes[:, m:]
