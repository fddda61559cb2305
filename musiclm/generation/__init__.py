"""Text to music: the three trained stages run backwards from a prompt to a waveform.

    text ─► CLAP text tokens ─► semantic ─► coarse ─► fine ─► Encodec decode ─► waveform

**Sliding windows.** A stage never sees a sequence longer than it was trained on
(its :class:`~musiclm.models.layout.StageLayout`), so any duration is sampled in
windows of the stage's length:

- the first window is sampled whole; each next one starts half a window later
  and is primed with the frames it shares with the one before (they are fed as
  ``target_prompt``, not sampled again), so the music runs on without a seam;
- window starts lie on the time grid where semantic and acoustic frames both
  begin (:attr:`StageLayout.tick`, 40 ms at 50/75 Hz), so the coarse window over
  [t0, t1) is conditioned on exactly the semantic frames of [t0, t1), and the
  fine window on the coarse frames of the same span;
- every window is as long as the layout's: the last one starts at most half a
  window after the one before, so that it ends with the timeline, and is primed
  with all it shares with what exists. Only a timeline shorter than a stage's
  window gets a short one, whose conditioning prefix is padded with ``pad_id``
  up to the target, as training does for clips shorter than a window;
- the stages run one after the other over the whole duration (every semantic
  window, then every coarse window, then every fine window).

``seconds`` becomes ``round(seconds * frame_rate)`` acoustic frames, hence
exactly that many codec hops of samples. The stages sample the timeline rounded
up to whole ticks (a window ends on the grid); the frames past the output, less
than a tick, condition the next stage and are then dropped.

**Guidance.** Stages conditioned on CLAP (semantic, coarse) sample with
classifier-free guidance against the same prefix whose CLAP tokens are replaced
by the null id (``layout.prefix(window, drop_cond=True)``); the fine stage has
no text conditioning and samples plainly.

**Re-ranking.** N samples run as one batch through every stage; each is decoded
and scored by the cosine similarity of its CLAP audio embedding (the normalised
mean over CLAP windows, :func:`musiclm.metrics.clap_audio_embeddings`) with the
prompt's CLAP text embedding. The K best are kept, best first.

**Story mode.** With prompts p_0 .. p_{n-1} and ``every = E`` seconds, a window
whose start lies in [i*E, (i+1)*E) seconds of the output is conditioned on p_i
(the last prompt holds to the end; a window that starts inside a continued
prompt audio uses p_0). Windows overlap, so the music stays continuous where the
prompt changes. A sample's score is the mean of its segments' scores, each
segment [i*E, (i+1)*E) against its own prompt.

**Continuation.** ``prompt_audio`` is read (its last seconds: as long as the
longest stage window, all a window can look back on), tokenized with the same
tokenizer and cut to whole grid ticks. Its tokens start every stream, so they
prime the first window of each stage. The output does **not** include the
prompt: it is the ``seconds`` of new music that follow it. The new music
continues the prompt file at :attr:`Generation.continues_at` seconds (its end,
less the part of one tick that did not fill whole frames).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from musiclm.config import STAGES, Config
from musiclm.errors import UserError
from musiclm.models.layout import StageLayout
from musiclm.models.sampling import sample_target
from musiclm.models.transformer import MusicTransformer
from musiclm.pipeline.tokenizer import Tokenizer

FORMATS = ("wav", "flac")
Progress = Callable[[str, int, int], None]  # (stage, frames done, frames in total) after each window


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


@dataclass(frozen=True)
class Window:
    """One sampling call of ``stage``: target frames [start, end) of its stream, of which [start, known)
    already existed and were fed as ``target_prompt``. ``prompt`` indexes the text prompt whose CLAP
    tokens conditioned it (None for the fine stage, which has no CLAP prefix). The last window's
    ``end`` may pass the output's last frame by less than a tick (see the module docstring)."""

    stage: str
    start: int
    known: int
    end: int
    prompt: int | None


@dataclass
class Generation:
    """Everything one :meth:`MusicLM.generate_with_details` call made.

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
    windows: list[Window]
    settings: dict[str, StageSettings]
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds: "prompts" (text, prompt audio), each stage, "decode", "score"


def plan_windows(total: int, known: int, window: int, hop: int, align: int) -> list[tuple[int, int, int]]:
    """Sampling calls that fill frames [known, total) of one stream: ``(start, known, end)`` per window.

    Windows start ``hop`` frames apart on multiples of ``align`` and are primed with [start, known),
    the frames they share with what exists; the first starts as late as leaves it ``window - hop``
    frames of context (0 when nothing exists yet). When ``total >= window`` every window spans
    exactly ``window`` frames: the last one starts further back (still on the grid) so that it ends
    at ``total`` rounded up to a multiple of ``align``, and the caller must hold the frames up to
    there. Only a stream shorter than one window gets a shorter one, ``(0, known, total)``.
    """
    if not 0 < align <= hop <= window:
        raise ValueError(f"need 0 < align <= hop <= window, got align={align}, hop={hop}, window={window}")
    out = []
    start = max(0, known - (window - hop)) // align * align
    while known < total:
        if start + window >= total:
            # the last window: cut short at the stream's end, its conditioning would fill only part
            # of the prefix and leave pad ids before the target, which training shows only for clips
            # shorter than a window; moved back on the grid, it stays whole, primed with more context
            start = max(0, -(-(total - window) // align) * align)
        end = start + window if total >= window else total
        out.append((start, known, end))
        known, start = end, start + hop
    return out


# ---- argument checks (cheap: run_generate calls them before loading anything) ------------------------------------------


def _prompt_list(prompt: str | Sequence[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UserError("the text prompt is empty: give a description such as \"a calm piano over soft rain\"")
    return prompts


def _temperatures(temperature: float | Sequence[float] | None) -> tuple[float, float, float] | None:
    if temperature is None:
        return None
    values = [float(temperature)] if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    if len(values) not in (1, 3):
        raise UserError(f"--temperature takes 1 value (all stages) or 3 (semantic, coarse, fine), got {len(values)}")
    if any(not math.isfinite(t) or t < 0 for t in values):
        raise UserError(f"temperatures must be >= 0 (0 is greedy), got {values}")
    return tuple(values * 3 if len(values) == 1 else values)  # type: ignore[return-value]


def check_request(
    prompts: list[str],
    seconds: float,
    num_samples: int | None,
    keep: int | None,
    every: float | None,
    top_k: int | None,
    top_p: float | None,
    cfg_scale: float | None,
) -> None:
    """Refuse impossible requests with a one-line :class:`UserError` (``None`` values are not checked)."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"--seconds must be a positive number, got {seconds:g}")
    if num_samples is not None and num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    if keep is not None and keep < 1:
        raise UserError(f"--keep must be at least 1, got {keep}")
    if num_samples is not None and keep is not None and keep > num_samples:
        raise UserError(f"--keep {keep} is more than --num-samples {num_samples}: keep at most as many samples as are generated")
    if every is not None:
        if len(prompts) < 2:
            raise UserError("--every switches between several prompts: give two or more prompts, or drop --every")
        if not math.isfinite(every) or every <= 0:
            raise UserError(f"--every must be a positive number of seconds, got {every:g}")
    if top_k is not None and top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 is off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (1 is off), got {top_p:g}")
    if cfg_scale is not None and (not math.isfinite(cfg_scale) or cfg_scale < 0):
        raise UserError(f"--cfg-scale must be >= 0 (1 is no guidance), got {cfg_scale:g}")


def _check_prompt_audio(path: str | Path) -> float:
    """Duration of a readable prompt audio file, else UserError."""
    from musiclm.pipeline.audio import AudioError, probe

    try:
        return probe(path).duration
    except AudioError as e:
        raise UserError(f"cannot read the prompt audio {path}: {e.reason}") from None


# ---- loading ---------------------------------------------------------------------------------------------------------


def _find_tokenizer(runs: list[Path], fingerprint: str) -> Path:
    """The tokenizer folder of these runs: RUN/tokenizer/, else the data folder recorded in RUN/run.json."""
    from musiclm.pipeline.tokenizer import read_record, tokenizer_folder
    from musiclm.shards.format import TOKENIZER_FILE
    from musiclm.training.trainer import RUN_FILE

    candidates = [run / "tokenizer" for run in runs]
    for run in runs:
        try:
            data = json.loads((run / RUN_FILE).read_text()).get("data")
        except (OSError, ValueError):
            data = None
        if data:
            candidates.append(tokenizer_folder(data))
    for folder in candidates:
        if (folder / TOKENIZER_FILE).is_file() and read_record(folder)["fingerprint"] == fingerprint:
            return folder
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise UserError(f"cannot find the tokenizer (fingerprint {fingerprint}) these stages were trained with; looked in {tried}")


class MusicLM:
    """Three trained stages and their tokenizer: text in, waveform out.

    ``stages`` maps "semantic", "coarse" and (optionally) "fine" to :class:`Stage`. All stages and
    the tokenizer must share one tokenizer fingerprint.
    """

    def __init__(self, tokenizer: Tokenizer, stages: dict[str, Stage], tokenizer_path: Path | None = None):
        self.stages = {name: st for name, st in stages.items() if st is not None}
        _check_stages(self.stages)
        self.info = self.stages["semantic"].layout.info
        if tokenizer.info.fingerprint != self.info.fingerprint:
            raise UserError(
                f"the tokenizer {tokenizer_path or ''} (fingerprint {tokenizer.info.fingerprint}) is not the one the stages were "
                f"trained with ({self.info.fingerprint})"
            )
        self.tokenizer = tokenizer
        self.tokenizer_path = tokenizer_path
        self.tick: Fraction = self.stages["coarse"].layout.tick  # seconds; semantic and acoustic frames both start on it
        self.per_tick = {s: int(self.info.stream(s).frame_rate * self.tick) for s in ("semantic", "acoustic")}  # frames in one tick
        hop = Fraction(self.info.codec_sample_rate) / self.info.acoustic.frame_rate
        if hop.denominator != 1:
            raise UserError(f"the codec's frame rate {self.info.acoustic.frame_rate} does not divide its sample rate {self.info.codec_sample_rate}")
        self.hop = int(hop)  # codec samples per acoustic frame

    @classmethod
    def from_runs(
        cls,
        semantic: str | Path | None,
        coarse: str | Path | None,
        fine: str | Path | None = None,
        *,
        tokenizer: str | Path | None = None,
        device: str | torch.device | None = None,
    ) -> MusicLM:
        """Stages from their run folders (or checkpoint folders); ``fine`` may be None for coarse-only use.

        The tokenizer is ``tokenizer`` if given, else RUN/tokenizer/ of a stage, else the data
        folder recorded in a stage's run.json. Fingerprints are checked before the tokenizer's
        backbones are loaded.
        """
        from musiclm.training.checkpoint import run_folder
        from musiclm.training.trainer import _pick_device, load_stage

        dev = _pick_device(device, local_rank=0)  # the same devices and errors as musiclm train
        paths = {"semantic": semantic, "coarse": coarse, "fine": fine}
        stages: dict[str, Stage] = {}
        for name, path in paths.items():
            if path is None:
                continue  # a missing semantic or coarse stage is refused by _check_stages
            path = Path(path)
            if not path.exists():
                raise UserError(f"the {name} stage {path} does not exist: pass a run folder written by musiclm train {name}")
            model, layout, cfg, _ = load_stage(path, device=dev)
            stages[name] = Stage(model, layout, cfg, run_folder(path))
        fingerprint = _check_stages(stages)
        folder = Path(tokenizer) if tokenizer is not None else _find_tokenizer([st.run for st in stages.values()], fingerprint)
        return cls(Tokenizer.load(folder, device=str(dev)), stages, tokenizer_path=folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None) -> MusicLM:
        """``folder`` holds the run folders semantic/, coarse/ and fine/ (fine may be missing for
        coarse-only use) and optionally tokenizer/."""
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"model folder {folder} does not exist: it should hold semantic/, coarse/ and fine/ run folders")
        runs = {}
        for name in STAGES:
            if (folder / name).exists():
                runs[name] = folder / name
            elif name != "fine":
                raise UserError(f"no {name} stage: {folder} has no {name}/ run folder")
        tok = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
        return cls.from_runs(runs["semantic"], runs["coarse"], runs.get("fine"), tokenizer=tok, device=device)

    @property
    def sample_rate(self) -> int:
        return self.info.codec_sample_rate

    @property
    def device(self) -> torch.device:
        return next(self.stages["semantic"].model.parameters()).device

    # ---- the public calls ------------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[str],
        seconds: float = 10.0,
        *,
        num_samples: int | None = None,
        keep: int | None = None,
        cfg_scale: float | None = None,
        temperature: float | Sequence[float] | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        prompt_audio: str | Path | None = None,
        every: float | None = None,
        coarse_only: bool = False,
        use_cache: bool = True,
    ) -> tuple[np.ndarray, int]:
        """Music for ``prompt``: ``(audio, sample_rate)``, audio float32 [samples] when ``keep`` is 1,
        else [keep, samples] best first; samples = round(seconds * frame_rate) * hop, at the codec rate.

        ``prompt``: one text, or several with ``every`` seconds each (story mode; without ``every``
        the prompts share ``seconds`` equally). ``num_samples`` are generated as one batch and the
        ``keep`` best by CLAP text-audio similarity are returned. ``temperature``: one value or
        (semantic, coarse, fine); 0 is greedy. ``top_k`` 0 and ``top_p`` 1 are off; ``cfg_scale`` 1
        is no guidance. Settings left None come from each stage's ``[generate]`` config (its own
        temperature, top-k, top-p and guidance; samples and keep from the semantic stage's).
        ``prompt_audio``: a file to continue; the output is the new music only, not the prompt
        (see the module docstring). ``coarse_only`` skips the fine stage and decodes the coarse
        codebooks alone. ``use_cache=False`` recomputes the whole sequence per token (for checks).
        The same arguments and ``seed`` give the same audio on the same device.
        """
        g = self.generate_with_details(
            prompt, seconds, num_samples=num_samples, keep=keep, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, prompt_audio=prompt_audio, every=every, coarse_only=coarse_only, use_cache=use_cache,
        )  # fmt: skip
        return (g.audio[0] if len(g.audio) == 1 else g.audio), g.sample_rate

    def generate_with_details(
        self,
        prompt: str | Sequence[str],
        seconds: float = 10.0,
        *,
        num_samples: int | None = None,
        keep: int | None = None,
        cfg_scale: float | None = None,
        temperature: float | Sequence[float] | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        prompt_audio: str | Path | None = None,
        every: float | None = None,
        coarse_only: bool = False,
        use_cache: bool = True,
        progress: Progress | None = None,
    ) -> Generation:
        """:meth:`generate` returning a :class:`Generation`: the kept audio [K, samples], every sample's
        tokens and score, the windows sampled, the resolved settings and timings. ``progress`` is
        called after every window."""
        prompts = _prompt_list(prompt)
        defaults = self.stages["semantic"].cfg.generate
        n = defaults.num_samples if num_samples is None else num_samples
        k = min(defaults.keep, n) if keep is None else keep
        check_request(prompts, seconds, n, k, every, top_k, top_p, cfg_scale)
        if not coarse_only and "fine" not in self.stages:
            raise UserError("no fine stage: pass --fine RUN (or --model DIR holding fine/), or generate with --coarse-only")
        new_frames = self.stages["coarse"].layout.frames_of("acoustic", seconds)
        if new_frames < 1:
            raise UserError(f"--seconds {seconds:g} is shorter than one codec frame ({1 / float(self.info.acoustic.frame_rate):.3g} s)")
        if len(prompts) > 1 and every is None:
            every = seconds / len(prompts)
        settings = self._settings(temperature, top_k, top_p, cfg_scale)
        names = ("semantic", "coarse") if coarse_only else STAGES
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        clap_codes, text_emb = self.tokenizer.text_tokens(prompts)  # [P, L] uint16, [P, D]
        prompt_tokens, prompt_seconds, read_from = self._prompt_tokens(prompt_audio) if prompt_audio is not None else (None, Fraction(0), None)
        timings["prompts"] = time.perf_counter() - t0

        # the timeline: prompt frames, then the new ones; semantic covers every acoustic frame
        p_sem = 0 if prompt_tokens is None else prompt_tokens["semantic"].shape[-1]
        p_ac = 0 if prompt_tokens is None else prompt_tokens["acoustic"].shape[-1]
        t_ac = p_ac + new_frames
        t_sem = p_sem + math.ceil(Fraction(new_frames) * self.info.semantic.frame_rate / self.info.acoustic.frame_rate)
        # The stages sample whole ticks: a last window ends on the grid, up to a tick past the output,
        # and the next stage's window over the same span needs those conditioning frames. The frames
        # past t_sem / t_ac are dropped from the result.
        ticks = -(-t_ac // self.per_tick["acoustic"])
        streams = {
            "semantic": np.full((n, ticks * self.per_tick["semantic"]), -1, dtype=np.int64),
            "acoustic": np.full((n, self.info.acoustic.levels, ticks * self.per_tick["acoustic"]), -1, dtype=np.int64),
        }
        if prompt_tokens is not None:
            streams["semantic"][:, :p_sem] = prompt_tokens["semantic"]
            streams["acoustic"][:, :, :p_ac] = prompt_tokens["acoustic"]

        gen = torch.Generator().manual_seed(int(seed))  # one CPU generator drives every draw, on any device
        windows: list[Window] = []
        for name in names:
            st = self.stages[name]
            t0 = time.perf_counter()
            total = streams[st.layout.target.stream].shape[-1]
            known = p_sem if st.layout.target.stream == "semantic" else p_ac
            plan = self._plan(st.layout, total, known, len(prompts), every, prompt_seconds)
            self._sample_stage(st, streams, plan, clap_codes, settings[name], gen, use_cache, progress)
            windows += plan
            timings[name] = time.perf_counter() - t0

        t0 = time.perf_counter()
        levels = self.info.coarse_levels if coarse_only else self.info.acoustic.levels
        codes = streams["acoustic"][:, :levels, :t_ac]
        first, length = p_ac * self.hop, new_frames * self.hop
        # one sample at a time: the decoder's activations grow with the duration times the batch
        audio = np.stack([self.tokenizer.decode_acoustic(codes[b : b + 1])[0][first : first + length] for b in range(n)])
        timings["decode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        scores = self._scores(audio, text_emb, every, seconds)
        kept = [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
        timings["score"] = time.perf_counter() - t0
        return Generation(
            audio=audio[kept],
            sample_rate=self.sample_rate,
            kept=kept,
            scores=scores,
            semantic=streams["semantic"][:, :t_sem],
            acoustic=codes,
            prompts=prompts,
            every=every,
            prompt_frames={"semantic": p_sem, "acoustic": p_ac},
            prompt_seconds=float(prompt_seconds),
            continues_at=None if read_from is None else read_from + float(prompt_seconds),
            windows=windows,
            settings={name: settings[name] for name in names},
            timings=timings,
        )

    # ---- the steps -------------------------------------------------------------------------------------------------
    def _settings(self, temperature, top_k, top_p, cfg_scale) -> dict[str, StageSettings]:
        temps = _temperatures(temperature)
        out = {}
        for i, name in enumerate(STAGES):
            st = self.stages.get(name)
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

    def _prompt_tokens(self, path: str | Path) -> tuple[dict[str, np.ndarray], Fraction, float]:
        """Tokens of the end of a prompt file cut to whole ticks: ({"semantic": [T_s], "acoustic": [Q, T_a]},
        their duration, where in the file the part read starts)."""
        from musiclm.pipeline.audio import AudioError, load_for_rates

        duration = _check_prompt_audio(path)
        need = self.tokenizer.cfg.audio.min_seconds
        if duration < need:
            raise UserError(f"the prompt audio {path} is {duration:.2f} s long; continuing needs at least {need:g} s")
        context = max(st.layout.window_seconds for st in self.stages.values())
        start = max(0.0, duration - context)
        try:
            audio = load_for_rates(path, start, None, self.tokenizer.sample_rates)
        except AudioError as e:
            raise UserError(f"cannot read the prompt audio {path}: {e.reason}") from None
        tokens = self.tokenizer.tokenize(audio)
        ticks = min(tokens[s].shape[-1] // n for s, n in self.per_tick.items())
        kept = {s: tokens[s][..., : ticks * n].astype(np.int64) for s, n in self.per_tick.items()}
        return kept, ticks * self.tick, start

    def _plan(self, layout: StageLayout, total: int, known: int, n_prompts: int, every: float | None, prompt_seconds: Fraction) -> list[Window]:
        """The windows of one stage over frames [known, total) of its target stream, with their text prompt."""
        rate = self.info.stream(layout.target.stream).frame_rate
        align = int(rate * self.tick)
        window = layout.target.frames
        hop = max(align, window // 2 // align * align)
        every_f = None if every is None else Fraction(every).limit_denominator(10_000)
        out = []
        for start, k, end in plan_windows(total, known, window, hop, align):
            prompt = None
            if layout.has_clap:
                prompt = 0
                if every_f is not None:
                    t = Fraction(start) / rate - prompt_seconds  # seconds into the output
                    prompt = min(max(math.floor(t / every_f), 0), n_prompts - 1)
            out.append(Window(layout.stage, start, k, end, prompt))
        return out

    def _sample_stage(
        self,
        st: Stage,
        streams: dict[str, np.ndarray],
        plan: list[Window],
        clap_codes: np.ndarray,
        s: StageSettings,
        gen: torch.Generator,
        use_cache: bool,
        progress: Progress | None,
    ) -> None:
        """Sample every window of one stage for all N rows, writing codes into ``streams`` in place."""
        layout = st.layout
        target = layout.target.stream
        rows = list(layout.target.levels)
        n = streams[target].shape[0]
        guided = layout.has_clap and s.cfg_scale != 1.0
        total = plan[-1].end - plan[0].known if plan else 0
        for w in plan:
            wins = [self._window(layout, streams, b, w, clap_codes) for b in range(n)]
            prefix = np.stack([_padded_prefix(layout, win) for win in wins])  # [N, P]
            uncond = np.stack([_padded_prefix(layout, win, drop_cond=True) for win in wins]) if guided else None
            m = w.known - w.start
            given = np.stack([layout.target_ids(win, frames=m) for win in wins]) if m else None  # [N, M]
            ids = sample_target(
                st.model,
                layout,
                torch.from_numpy(prefix),
                (w.end - w.start) * layout.target_levels,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                cfg_scale=s.cfg_scale,
                uncond_prefix=None if uncond is None else torch.from_numpy(uncond),
                target_prompt=None if given is None else torch.from_numpy(given),
                generator=gen,
                use_cache=use_cache,
            ).cpu().numpy()
            for b in range(n):
                codes = layout.decode_target(ids[b])  # semantic [frames]; acoustic [levels, frames]
                if target == "semantic":
                    streams[target][b, w.known : w.end] = codes[m:]
                else:
                    streams[target][b, rows, w.known : w.end] = codes[:, m:]
            if progress is not None:
                progress(st.name, w.end - plan[0].known, total)

    def _window(self, layout: StageLayout, streams: dict[str, np.ndarray], b: int, w: Window, clap_codes: np.ndarray) -> dict[str, np.ndarray]:
        """Row ``b``'s arrays for window ``w`` (the layout's window dict): every time stream cut to the
        window's span, the text prompt's CLAP tokens."""
        t_rate = self.info.stream(layout.target.stream).frame_rate
        win: dict[str, np.ndarray] = {}
        for stream in layout.streams:
            ratio = self.info.stream(stream).frame_rate / t_rate
            a, e = int(w.start * ratio), math.ceil(w.end * ratio)  # starts lie on the grid: a is exact
            win[stream] = streams[stream][b][..., a:e]
        if layout.has_clap:
            win["clap"] = clap_codes[w.prompt]
        return win

    def _scores(self, audio: np.ndarray, text_emb: np.ndarray, every: float | None, seconds: float) -> np.ndarray:
        """CLAP text-audio cosine similarity per sample [N]: mean over story segments, each against its prompt."""
        from musiclm.metrics import clap_audio_embeddings

        n_prompts = len(text_emb)
        if every is None or n_prompts == 1:
            segments = [(0, audio.shape[1], 0)]
        else:  # prompt i from i * every on; the last one that starts in time holds to the end
            used = [i for i in range(n_prompts) if i * every < seconds]
            edges = [round(i * every * self.sample_rate) for i in used] + [audio.shape[1]]
            segments = [(edges[j], edges[j + 1], i) for j, i in enumerate(used) if edges[j + 1] > edges[j]]
        pieces = [audio[b, a:e] for b in range(len(audio)) for a, e, _ in segments]
        emb = clap_audio_embeddings(self.tokenizer, pieces, self.sample_rate).reshape(len(audio), len(segments), -1)  # [N, S, D]
        text = np.asarray(text_emb, dtype=np.float32)[[i for _, _, i in segments]]  # [S, D]
        return (emb * text[None]).sum(-1).mean(-1)


def _check_stages(stages: dict[str, Stage]) -> str:
    """Refuse a missing semantic or coarse stage, a stage in the wrong role, or stages trained on
    different tokenizers; returns the shared tokenizer fingerprint."""
    for name in ("semantic", "coarse"):
        if name not in stages:
            raise UserError(f"no {name} stage: pass --{name} RUN or --model DIR holding {name}/")
    for name, st in stages.items():
        if st.layout.stage != name:
            raise UserError(f"{st.run or 'the model'} is a {st.layout.stage} stage, given as the {name} stage")
    fingerprints = {name: st.layout.info.fingerprint for name, st in stages.items()}
    if len(set(fingerprints.values())) > 1:
        which = ", ".join(f"{name} ({fp})" for name, fp in fingerprints.items())
        raise UserError(f"the stages were trained on tokens of different tokenizers: {which}; train all three on one tokenized corpus")
    return next(iter(fingerprints.values()))


def _padded_prefix(layout: StageLayout, window: dict[str, np.ndarray], drop_cond: bool = False) -> np.ndarray:
    """The conditioning prefix [prefix_len]: a short window's prefix is followed by pad ids, as in training."""
    prefix = layout.prefix(window, drop_cond)
    out = np.full(layout.prefix_len, layout.pad_id, dtype=np.int64)
    out[: len(prefix)] = prefix
    return out


# ---- the command -----------------------------------------------------------------------------------------------------


def output_paths(out: str | Path, fmt: str | None, keep: int) -> tuple[list[Path], Path, str]:
    """Audio files (FILE.wav, or FILE-0.wav, FILE-1.wav ... for keep > 1), the sidecar FILE.json and the format.

    The format is ``fmt``, else the suffix of ``out`` (.wav or .flac), else wav.
    """
    out = Path(out)
    suffix = out.suffix.lower().lstrip(".")
    if fmt is None:
        if suffix and suffix not in FORMATS:
            raise UserError(f"cannot write {out}: musiclm writes .wav or .flac (or pass --format wav|flac)")
        fmt = suffix or "wav"
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise UserError(f"--format must be wav or flac, got '{fmt}'")
    base = out.with_suffix("") if suffix in FORMATS else out
    files = [base.with_name(f"{base.name}.{fmt}")] if keep == 1 else [base.with_name(f"{base.name}-{i}.{fmt}") for i in range(keep)]
    return files, base.with_name(f"{base.name}.json"), fmt


def run_generate(
    prompts: list[str],
    *,
    model: str | Path | None = None,
    semantic: str | Path | None = None,
    coarse: str | Path | None = None,
    fine: str | Path | None = None,
    seconds: float = 10.0,
    out: str | Path = "out.wav",
    num_samples: int | None = None,
    keep: int | None = None,
    cfg_scale: float | None = None,
    temperature: float | Sequence[float] | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    prompt_audio: str | Path | None = None,
    every: float | None = None,
    coarse_only: bool = False,
    use_cache: bool = True,
    fmt: str | None = None,
    device: str | None = None,
) -> list[Path]:
    """``musiclm generate``: write the kept samples as audio files plus a JSON sidecar; returns the audio paths.

    Stage run folders come from ``--semantic/--coarse/--fine``, else ``model``/<stage>. Every
    argument is checked before a model is loaded.
    """
    prompts = _prompt_list(prompts)
    check_request(prompts, seconds, num_samples, keep, every, top_k, top_p, cfg_scale)
    _temperatures(temperature)
    output_paths(out, fmt, 1)  # the format, before any work
    if prompt_audio is not None:
        _check_prompt_audio(prompt_audio)
    runs: dict[str, Path | None] = {}
    for name, given in (("semantic", semantic), ("coarse", coarse), ("fine", fine)):
        path = Path(given) if given is not None else (Path(model) / name if model is not None else None)
        if name == "fine" and coarse_only:
            path = None
        elif path is None or not path.exists():
            where = f"{path} does not exist" if path is not None else f"pass --model DIR holding {name}/ or --{name} RUN"
            raise UserError(f"no {name} stage: {where}" + ("" if name != "fine" else " (or generate with --coarse-only)"))
        runs[name] = path
    tokenizer = Path(model) / "tokenizer" if model is not None and (Path(model) / "tokenizer").is_dir() else None

    t0 = time.perf_counter()
    lm = MusicLM.from_runs(runs["semantic"], runs["coarse"], runs["fine"], tokenizer=tokenizer, device=device)
    load_s = time.perf_counter() - t0
    with _ProgressDisplay() as progress:
        g = lm.generate_with_details(
            prompts, seconds, num_samples=num_samples, keep=keep, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, prompt_audio=prompt_audio, every=every, coarse_only=coarse_only, use_cache=use_cache,
            progress=progress,
        )  # fmt: skip

    from musiclm import __version__
    from musiclm.pipeline.audio import write_audio

    files, sidecar, kind = output_paths(out, fmt, len(g.kept))
    for path, audio in zip(files, g.audio):
        write_audio(path, audio, g.sample_rate, kind)
    samples = g.audio.shape[1]
    record = {
        "musiclm": __version__,
        "prompts": g.prompts,
        "every": g.every,
        "seconds": seconds,
        "seed": seed,
        "num_samples": len(g.scores),
        "keep": len(g.kept),
        "coarse_only": coarse_only,
        "use_cache": use_cache,
        "device": str(lm.device),
        "sample_rate": g.sample_rate,
        "samples": samples,
        "acoustic_frames": samples // lm.hop,
        "outputs": [{"file": str(p), "sample": i, "clap_score": float(g.scores[i])} for p, i in zip(files, g.kept)],
        "clap_scores": [float(s) for s in g.scores],
        "stages": {
            name: {
                "run": str(lm.stages[name].run) if lm.stages[name].run else None,
                **vars(s),
                "windows": sum(w.stage == name for w in g.windows),
                "window_seconds": lm.stages[name].layout.window_seconds,
            }
            for name, s in g.settings.items()
        },
        "tokenizer": {"fingerprint": lm.info.fingerprint, "path": str(lm.tokenizer_path) if lm.tokenizer_path else None},
        "prompt_audio": None
        if prompt_audio is None
        else {
            "path": str(prompt_audio),
            "seconds_used": g.prompt_seconds,
            "continues_at": g.continues_at,
            "included_in_output": False,  # the files hold only the new music (see musiclm.generation)
        },
        "timings": {"load": load_s, **g.timings},
    }
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    sidecar.write_text(json.dumps(record, indent=2) + "\n")

    audio_s = samples / g.sample_rate
    work_s = sum(g.timings.values())
    stage_times = ", ".join(f"{k} {v:.1f} s" for k, v in g.timings.items())
    for p, i in zip(files, g.kept):
        print(f"wrote {p}  ({audio_s:.2f} s at {g.sample_rate} Hz, CLAP score {g.scores[i]:.3f}, sample {i} of {len(g.scores)})")
    print(f"settings in {sidecar}; {stage_times} (real-time factor {work_s / audio_s:.2f})")
    return files


class _ProgressDisplay:
    """A rich progress bar per stage on a terminal (stderr); nothing otherwise."""

    def __enter__(self) -> Progress | None:
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            self.bar = None
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

        self.bar = RichProgress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TextColumn("frames"), TimeElapsedColumn(), console=console)
        self.tasks: dict[str, int] = {}
        self.bar.start()

        def update(stage: str, done: int, total: int) -> None:
            if stage not in self.tasks:
                self.tasks[stage] = self.bar.add_task(stage, total=total)
            self.bar.update(self.tasks[stage], completed=done)

        return update

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

