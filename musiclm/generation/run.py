"""One generation run: the chain of stages sampled window by window, decoded as frames finish, then scored.

    conditioning + prompt tokens ─► timeline ─► windows of each stage, interleaved ─► chunked decode ─► scores

The stages interleave window by window: a window runs as soon as the frames it is
conditioned on exist (:meth:`GenerationRun.run_until`), and the acoustic frames the
last stage has finished are decoded in chunks with a crossfade
(:mod:`musiclm.generation.decode`). Iterating a :class:`GenerationRun` yields that
audio as it is made; once the iteration ends, its ``generation`` holds the scored
:class:`Generation`. A run is made by :meth:`MusicLM.run <musiclm.generation.model.MusicLM.run>`.

Layer: generation (imports the base layer and its sibling generation modules; the model it runs on brings the rest).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from musiclm.config import STAGES
from musiclm.errors import UserError
from musiclm.generation.request import SamplingRequest, check_clap_tokens, check_request, conditioning_prompts
from musiclm.generation.stages import StageSettings, resolve_settings, sample_window
from musiclm.generation.windows import Window, plan_stage, span

Progress = Callable[[str, float, float], None]  # (stage, seconds of output done, seconds in total) after each window
UPSTREAM = {"coarse": "semantic", "fine": "coarse"}  # the stage whose tokens condition each stage


@dataclass
class Generation:
    """Everything one :meth:`MusicLM.generate_with_details` call (or one finished stream) made.

    Token arrays cover the whole timeline: the prompt audio's frames first (``prompt_frames``), then
    the new ones. ``audio`` holds the new part only.
    """

    audio: np.ndarray  # [K, samples] float32 at sample_rate, best first
    sample_rate: int
    kept: list[int]  # batch index of each row of audio
    scores: np.ndarray  # [N] CLAP text-audio cosine similarity of every sample
    semantic: np.ndarray  # [N, T_s] int64 codes
    acoustic: np.ndarray  # [N, Q, T_a] int64 codes (coarse_only: [N, C, T_a])
    prompts: list[str]
    every: float | None
    prompt_frames: dict[str, int]  # {"semantic": n, "acoustic": n} frames that came from prompt_audio
    prompt_seconds: float  # seconds of prompt audio that were tokenized and kept (whole ticks)
    continues_at: float | None  # where the new music continues the prompt file (seconds); None without one
    windows: list[Window]  # in the order they ran
    settings: dict[str, StageSettings]
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds: "prompts", each stage, "decode", "score", "first_audio"


class GenerationRun:
    """One generation of ``request`` on ``lm`` (a :class:`~musiclm.generation.model.MusicLM`), run window
    by window; iterating it yields audio chunks [N, samples] (``stream``: [samples], one sample) as the
    last stage finishes frames. ``progress`` is called after every window. ``generation`` is set once
    the iteration ends. The request is checked here, against the stages' own defaults."""

    def __init__(self, lm, request: SamplingRequest, *, progress: Progress | None = None, stream: bool = False):
        r = request
        self.lm, self.request, self.progress, self.streamed = lm, r, progress, stream
        self.seconds, self.seed, self.use_cache, self.coarse_only, self.prompt_audio = r.seconds, r.seed, r.use_cache, r.coarse_only, r.prompt_audio
        clap_tokens = None if r.clap_tokens is None else check_clap_tokens(r.clap_tokens, lm.info.clap.levels, lm.info.clap.codebook_size)
        self.prompts = conditioning_prompts(r.prompt, clap_tokens, r.style_audio)
        self.clap_tokens, self.style_audio = clap_tokens, r.style_audio
        defaults = lm.stages["semantic"].cfg.generate
        self.n = defaults.num_samples if r.num_samples is None else r.num_samples
        self.k = min(defaults.keep, self.n) if r.keep is None else r.keep
        check_request(self.prompts, r.seconds, self.n, self.k, r.every, r.top_k, r.top_p, r.cfg_scale, stream=stream)
        if not r.coarse_only and "fine" not in lm.stages:
            raise UserError("no fine stage: pass --fine RUN (or --model DIR holding fine/), or generate with --coarse-only")
        self.new_frames = lm.stages["coarse"].layout.frames_of("acoustic", r.seconds)
        if self.new_frames < 1:
            raise UserError(f"--seconds {r.seconds:g} is shorter than one codec frame ({1 / float(lm.info.acoustic.frame_rate):.3g} s)")
        self.every = r.seconds / len(self.prompts) if len(self.prompts) > 1 and r.every is None else r.every
        self.settings = resolve_settings(lm.stages, r.temperature, r.top_k, r.top_p, r.cfg_scale)
        self.names = ("semantic", "coarse") if r.coarse_only else STAGES
        self.levels = lm.info.coarse_levels if r.coarse_only else lm.info.acoustic.levels  # acoustic levels decoded
        self.timings: dict[str, float] = {}
        self.generation: Generation | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        t_start = t0 = time.perf_counter()
        self._condition()
        self.timings["prompts"] = time.perf_counter() - t0
        self._lay_out_timeline()
        self._plan()
        decoder = self.lm.decoder(start=self.p_ac)
        if self.p_ac:
            decoder.push(self.streams["acoustic"][:, : self.levels, : self.p_ac])  # the prompt's frames: context, never emitted
        pieces = []
        self.timings["decode"] = 0.0
        for decode in self._decodes(decoder):
            t0 = time.perf_counter()
            audio = decode()
            self.timings["decode"] += time.perf_counter() - t0
            if audio.shape[1]:
                self.timings.setdefault("first_audio", time.perf_counter() - t_start)
                pieces.append(audio)
                yield audio[0] if self.streamed else audio
        self.generation = self._scored(np.concatenate(pieces, axis=1))  # [N, samples]

    # ---- the steps ----------------------------------------------------------------------------------------------------
    def _condition(self) -> None:
        """The CLAP codes [P, L] windows are conditioned on, the embeddings [P, D] samples are scored
        against, and the prompt audio's tokens (none without one)."""
        lm = self.lm
        self.clap_codes, self.text_emb = lm.conditioning(self.prompts, self.clap_tokens, self.style_audio)
        if self.prompt_audio is None:
            self.prompt_tokens, self.prompt_seconds, self.read_from = None, Fraction(0), None
        else:
            self.prompt_tokens, self.prompt_seconds, self.read_from = lm.prompt_tokens(self.prompt_audio)

    def _lay_out_timeline(self) -> None:
        """The token streams of the whole timeline, the prompt frames filled in, the rest -1:
        ``streams`` {"semantic": [N, T_s], "acoustic": [N, Q, T_a]}, semantic covering every acoustic frame.

        The stages sample whole ticks: a last window ends on the grid, up to a tick past the output,
        and the next stage's window over the same span needs those conditioning frames. The frames
        past ``t_sem`` / ``t_ac`` are dropped from the result."""
        lm, info, n, prompt = self.lm, self.lm.info, self.n, self.prompt_tokens
        self.p_sem = 0 if prompt is None else prompt["semantic"].shape[-1]
        self.p_ac = 0 if prompt is None else prompt["acoustic"].shape[-1]
        self.t_ac = self.p_ac + self.new_frames
        self.t_sem = self.p_sem + math.ceil(Fraction(self.new_frames) * info.semantic.frame_rate / info.acoustic.frame_rate)
        ticks = -(-self.t_ac // lm.per_tick["acoustic"])
        self.streams = {
            "semantic": np.full((n, ticks * lm.per_tick["semantic"]), -1, dtype=np.int64),
            "acoustic": np.full((n, info.acoustic.levels, ticks * lm.per_tick["acoustic"]), -1, dtype=np.int64),
        }
        if prompt is not None:
            self.streams["semantic"][:, : self.p_sem] = prompt["semantic"]
            self.streams["acoustic"][:, :, : self.p_ac] = prompt["acoustic"]

    def _plan(self) -> None:
        """Each stage's windows (``plans``), and how far each stage has filled its stream and run its plan."""
        lm = self.lm
        self.plans, self.filled, self.done = {}, {}, {}
        for name in self.names:
            layout = lm.stages[name].layout
            known = self.p_sem if layout.target.stream == "semantic" else self.p_ac
            self.plans[name] = plan_stage(layout, lm.tick, self.streams[layout.target.stream].shape[-1], known, len(self.prompts), self.every, self.prompt_seconds)
            self.filled[name], self.done[name] = known, 0
            self.timings[name] = 0.0
        self.windows: list[Window] = []
        self.samplers = lm.samplers if lm.fixed_steps or lm.cuda_graphs else None  # on a GPU, fixed-shape steps captured as graphs

    def run_until(self, name: str, frames: int) -> None:
        """Sample windows of stage ``name`` (and first what they are conditioned on) until its
        target stream is filled up to ``frames``."""
        lm, info = self.lm, self.lm.info
        st, plan = lm.stages[name], self.plans[name]
        rate = info.stream(st.layout.target.stream).frame_rate
        while self.filled[name] < frames and self.done[name] < len(plan):
            w = plan[self.done[name]]
            if name in UPSTREAM:
                up = UPSTREAM[name]
                self.run_until(up, span(info, st.layout, w, lm.stages[up].layout.target.stream)[1])
            t0 = time.perf_counter()
            sample_window(st, self.streams, w, self.clap_codes, self.settings[name], self.seed, use_cache=self.use_cache, samplers=self.samplers, capture=lm.cuda_graphs)
            self.timings[name] += time.perf_counter() - t0
            self.filled[name], self.done[name] = w.end, self.done[name] + 1
            self.windows.append(w)
            if self.progress is not None:
                first = plan[0].known
                self.progress(name, float((w.end - first) / rate), float((plan[-1].end - first) / rate))

    def _decodes(self, decoder) -> Iterator[Callable[[], np.ndarray]]:
        """After each window of the last stage, the decode of the frames it finished; then the rest."""
        last, pushed = self.names[-1], self.p_ac
        for w in self.plans[last]:
            self.run_until(last, w.end)
            final = min(self.filled[last], self.t_ac)
            yield lambda a=pushed, e=final: decoder.push(self.streams["acoustic"][:, : self.levels, a:e])
            pushed = final
        yield decoder.finish

    def _scored(self, audio: np.ndarray) -> Generation:
        """The run's :class:`Generation`: ``audio`` [N, samples] scored against the conditioning, the best kept."""
        lm = self.lm
        assert audio.shape[1] == self.new_frames * lm.hop, (audio.shape, self.new_frames, lm.hop)
        t0 = time.perf_counter()
        scores = lm.scores(audio, self.text_emb, self.every, self.seconds)
        kept = [int(i) for i in np.argsort(-scores, kind="stable")[: self.k]]
        self.timings["score"] = time.perf_counter() - t0
        return Generation(
            audio=audio[kept],
            sample_rate=lm.sample_rate,
            kept=kept,
            scores=scores,
            semantic=self.streams["semantic"][:, : self.t_sem],
            acoustic=self.streams["acoustic"][:, : self.levels, : self.t_ac],
            prompts=self.prompts,
            every=self.every,
            prompt_frames={"semantic": self.p_sem, "acoustic": self.p_ac},
            prompt_seconds=float(self.prompt_seconds),
            continues_at=None if self.read_from is None else self.read_from + float(self.prompt_seconds),
            windows=self.windows,
            settings={name: self.settings[name] for name in self.names},
            timings=self.timings,
        )
