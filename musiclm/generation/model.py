"""The public API: :class:`MusicLM` turns text into music with three trained stages and their tokenizer.

    text ─► CLAP text tokens ─► semantic ─► coarse ─► fine ─► Encodec decode ─► waveform

Each stage samples its timeline in windows (:mod:`musiclm.generation.windows`),
one window at a time (:mod:`musiclm.generation.stages`). The stages interleave
window by window: a window runs as soon as the frames it is conditioned on
exist, and the acoustic frames the last stage has finished are decoded in
chunks with a crossfade (:mod:`musiclm.generation.decode`). So
:meth:`MusicLM.stream` yields audio while later windows are still to come, and
:meth:`MusicLM.generate` is the same run collected: the same seed gives the same
audio either way.

``seconds`` becomes ``round(seconds * frame_rate)`` acoustic frames, hence
exactly that many codec hops of samples. The stages sample the timeline rounded
up to whole ticks (a last window ends on the grid); the frames past the output,
less than a tick, condition the next stage and are then dropped.

**Re-ranking.** N samples run as one batch through every stage; each is decoded
and scored by the cosine similarity of its CLAP audio embedding (the normalised
mean over CLAP windows, :func:`musiclm.metrics.clap_audio_embeddings`) with the
prompt's CLAP text embedding. The K best are kept, best first. Streaming keeps
its one sample, so it takes no ``num_samples`` above 1.

**Story mode.** Several prompts, each for ``every`` seconds (see
:mod:`musiclm.generation.windows`). A sample's score is the mean of its
segments' scores, each segment [i*E, (i+1)*E) against its own prompt.

**Continuation.** ``prompt_audio`` is read (its last seconds: as long as the
longest stage window, all a window can look back on), tokenized with the same
tokenizer and cut to whole grid ticks. Its tokens start every stream, so they
prime the first window of each stage and the decoder's context. The output does
**not** include the prompt: it is the ``seconds`` of new music that follow it.
The new music continues the prompt file at :attr:`Generation.continues_at`
seconds (its end, less the part of one tick that did not fill whole frames).

**Speed.** The stage models run at an inference precision
(:mod:`musiclm.models.precision`: bf16 on a GPU, int8 linear layers on a CPU by
default) and, on a GPU, on single-token steps captured as CUDA graphs
(:mod:`musiclm.models.static_sampling`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from musiclm.config import STAGES
from musiclm.errors import UserError
from musiclm.generation.decode import ChunkDecoder
from musiclm.generation.stages import Stage, StageSettings, resolve_settings, sample_window
from musiclm.generation.windows import Window, plan_stage, span
from musiclm.pipeline.tokenizer import Tokenizer

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


# ---- argument checks (cheap: the command calls them before loading anything) -------------------------------------------


def _prompt_list(prompt: str | Sequence[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UserError("the text prompt is empty: give a description such as \"a calm piano over soft rain\"")
    return prompts


def check_request(
    prompts: list[str],
    seconds: float,
    num_samples: int | None,
    keep: int | None,
    every: float | None,
    top_k: int | None,
    top_p: float | None,
    cfg_scale: float | None,
    stream: bool = False,
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
    if stream and num_samples is not None and num_samples > 1:
        raise UserError(f"--stream plays one sample as it is made, --num-samples {num_samples} asks to re-rank whole samples: drop one of them")
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


def _check_prompt_audio(path: str | Path, what: str = "prompt audio") -> float:
    """Duration of a readable audio file (the ``what`` of a generation), else UserError."""
    from musiclm.pipeline.audio import AudioError, probe

    try:
        return probe(path).duration
    except AudioError as e:
        raise UserError(f"cannot read the {what} {path}: {e.reason}") from None


def check_clap_tokens(tokens, levels: int, codebook_size: int) -> np.ndarray:
    """Given CLAP codes, ``[L]`` or one row per story prompt ``[P, L]`` -> [P, L] int64; a one-line
    :class:`UserError` for anything else (wrong level count, codes out of range, not whole numbers)."""
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError):
        arr = np.asarray([], dtype=object)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.size == 0 or arr.dtype.kind not in "iu":
        raise UserError(f"clap_tokens must be whole-number codes, [{levels}] or one row of {levels} per prompt: got {np.asarray(tokens, dtype=object).shape} of {arr.dtype}")
    if arr.shape[1] != levels:
        raise UserError(f"clap_tokens has {arr.shape[1]} codes per row; this model's CLAP quantizer has {levels} levels")
    if arr.min() < 0 or arr.max() >= codebook_size:
        raise UserError(f"clap_tokens must be codes in [0, {codebook_size}), got {int(arr.min())}..{int(arr.max())}")
    return arr.astype(np.int64)


def conditioning_prompts(prompt: str | Sequence[str] | None, clap_tokens: np.ndarray | None, style_audio: str | Path | None) -> list[str]:
    """What a generation is conditioned on, as the labels it reports: the text prompts, else one label per
    row of ``clap_tokens`` (checked: [P, L]), else the style audio's. Exactly one of the three must be
    given (UserError)."""
    given = [name for name, v in (("a text prompt", prompt), ("clap_tokens", clap_tokens), ("--style-audio", style_audio)) if v is not None]
    if len(given) > 1:
        raise UserError(f"condition on one thing: {' and '.join(given)} were both given")
    if clap_tokens is not None:
        return [f"clap tokens {' '.join(str(int(c)) for c in row)}" for row in clap_tokens]
    if style_audio is not None:
        _check_prompt_audio(style_audio, "style audio")
        return [f"like {Path(style_audio).name}"]
    if prompt is None:
        raise UserError('nothing to condition on: give a text prompt such as "a calm piano over soft rain", or --style-audio FILE')
    return _prompt_list(prompt)


# ---- loading ---------------------------------------------------------------------------------------------------------


def _find_tokenizer(runs: list[Path], fingerprint: str) -> Path:
    """The tokenizer folder of these runs: RUN/tokenizer/, else the data folder recorded in RUN/run.json.

    The first that holds the stages' tokenizer is taken, damaged or not (Tokenizer.load refuses a damaged
    one): a copy whose tokenizer.json is gone but whose record file says it had one is refused here, not
    passed over for the next candidate."""
    from musiclm.shards.tokenizer_folder import ADVICE, RECORDS_FILE, read_checked_record, tokenizer_folder
    from musiclm.shards.format import TOKENIZER_FILE
    from musiclm.training.run_folder import RUN_FILE

    candidates = [run / "tokenizer" for run in runs]
    for run in runs:
        try:
            data = json.loads((run / RUN_FILE).read_text()).get("data")
        except (OSError, ValueError):
            data = None
        if data:
            candidates.append(tokenizer_folder(data))
    for folder in candidates:
        if not (folder / TOKENIZER_FILE).is_file() and (folder / RECORDS_FILE).is_file():
            raise UserError(f"{folder / TOKENIZER_FILE} is missing: {ADVICE}")
        if (folder / TOKENIZER_FILE).is_file() and read_checked_record(folder)["fingerprint"] == fingerprint:
            return folder
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise UserError(f"cannot find the tokenizer (fingerprint {fingerprint}) these stages were trained with; looked in {tried}")


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


class MusicLM:
    """Three trained stages and their tokenizer: text in, waveform out.

    ``stages`` maps "semantic", "coarse" and (optionally) "fine" to :class:`Stage`. All stages and
    the tokenizer must share one tokenizer fingerprint. ``precision`` ("fp32", "bf16", "int8"; None:
    the device's default) is applied to the stage models here; ``cuda_graphs`` (None: on CUDA
    devices) captures their decode steps.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stages: dict[str, Stage],
        tokenizer_path: Path | None = None,
        *,
        precision: str | None = None,
        cuda_graphs: bool | None = None,
    ):
        from musiclm.models.precision import default_precision, for_inference

        stages = {name: st for name, st in stages.items() if st is not None}
        _check_stages(stages)
        device = next(stages["semantic"].model.parameters()).device
        self.precision = default_precision(device) if precision is None else precision
        self.stages = {name: Stage(for_inference(st.model, self.precision), st.layout, st.cfg, st.run) for name, st in stages.items()}
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and device.type != "cuda":
            raise UserError(f"CUDA graphs need a CUDA device; the stages are on {device}")
        self._samplers: dict = {}  # fixed-shape samplers (and their graphs) by stage, batch and settings
        # sample on the fixed-shape steps of static_sampling: captured as graphs with cuda_graphs; set it
        # without them (any device) to run those same steps eagerly, as the checks of that path do
        self.fixed_steps = self.cuda_graphs
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
        precision: str | None = None,
        cuda_graphs: bool | None = None,
    ) -> MusicLM:
        """Stages from their run folders (or checkpoint folders); ``fine`` may be None for coarse-only use.

        The tokenizer is ``tokenizer`` if given, else RUN/tokenizer/ of a stage, else the data
        folder recorded in a stage's run.json. Fingerprints are checked before the tokenizer's
        backbones are loaded.
        """
        from musiclm.hub.model_folder import stage_source
        from musiclm.training.checkpoint import run_folder
        from musiclm.device import pick_device
        from musiclm.training.run_folder import load_stage

        dev = pick_device(device, local_rank=0)  # the same devices and errors as musiclm train
        paths = {"semantic": semantic, "coarse": coarse, "fine": fine}
        stages: dict[str, Stage] = {}
        for name, path in paths.items():
            if path is None:
                continue  # a missing semantic or coarse stage is refused by _check_stages
            path = Path(path)
            if not path.exists():
                raise UserError(f"the {name} stage {path} does not exist: pass a run folder written by musiclm train {name}")
            source = stage_source(path)  # a pushed or pulled stage has weights but no training state
            model, layout, cfg, _ = load_stage(source, device=dev)
            stages[name] = Stage(model, layout, cfg, run_folder(source))
        fingerprint = _check_stages(stages)
        folder = Path(tokenizer) if tokenizer is not None else _find_tokenizer([st.run for st in stages.values()], fingerprint)
        return cls(Tokenizer.load(folder, device=str(dev)), stages, tokenizer_path=folder, precision=precision, cuda_graphs=cuda_graphs)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str | torch.device | None = None,
        precision: str | None = None,
        cuda_graphs: bool | None = None,
        *,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> MusicLM:
        """A local model folder, or a hub repo id ``owner/name`` pulled at ``revision`` (a branch, tag or commit
        sha; None: main) through the Hugging Face cache (:func:`musiclm.hub.resolve_model`). The folder holds
        the run folders semantic/, coarse/ and fine/ (fine may be missing for coarse-only use) and optionally
        tokenizer/. A pulled tokenizer that would run remote code needs ``trust_remote_code=True``."""
        from musiclm.hub.pull import resolve_model

        folder = resolve_model(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        runs = {}
        for name in STAGES:
            if (folder / name).exists():
                runs[name] = folder / name
            elif name != "fine":
                raise UserError(f"no {name} stage: {folder} has no {name}/ run folder")
        tok = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
        return cls.from_runs(runs["semantic"], runs["coarse"], runs.get("fine"), tokenizer=tok, device=device, precision=precision, cuda_graphs=cuda_graphs)

    @property
    def sample_rate(self) -> int:
        return self.info.codec_sample_rate

    @property
    def device(self) -> torch.device:
        return next(self.stages["semantic"].model.parameters()).device

    # ---- the public calls ------------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[str] | None,
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
        clap_tokens: np.ndarray | Sequence | None = None,
        style_audio: str | Path | None = None,
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
        (see the module docstring). Instead of text (``prompt`` None), ``clap_tokens`` conditions on
        given CLAP codes, [L] or one row per story prompt [P, L], and ``style_audio`` on the CLAP audio
        tokens of a reference clip (:meth:`style_tokens`). ``coarse_only`` skips the fine stage and decodes the coarse
        codebooks alone. ``use_cache=False`` recomputes the whole sequence per token (for checks).
        The same arguments and ``seed`` give the same audio on the same device and precision.
        """
        g = self.generate_with_details(
            prompt, seconds, num_samples=num_samples, keep=keep, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, prompt_audio=prompt_audio, every=every, coarse_only=coarse_only, use_cache=use_cache,
            clap_tokens=clap_tokens, style_audio=style_audio,
        )  # fmt: skip
        return (g.audio[0] if len(g.audio) == 1 else g.audio), g.sample_rate

    def generate_with_details(
        self,
        prompt: str | Sequence[str] | None,
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
        clap_tokens: np.ndarray | Sequence | None = None,
        style_audio: str | Path | None = None,
    ) -> Generation:
        """:meth:`generate` returning a :class:`Generation`: the kept audio [K, samples], every sample's
        tokens and score, the windows sampled, the resolved settings and timings. ``progress`` is
        called after every window."""
        run = GenerationRun(
            self, prompt, seconds, num_samples=num_samples, keep=keep, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, prompt_audio=prompt_audio, every=every, coarse_only=coarse_only, use_cache=use_cache,
            progress=progress, stream=False, clap_tokens=clap_tokens, style_audio=style_audio,
        )  # fmt: skip
        for _ in run:
            pass
        return run.generation

    def stream(
        self,
        prompt: str | Sequence[str] | None,
        seconds: float = 10.0,
        *,
        cfg_scale: float | None = None,
        temperature: float | Sequence[float] | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        prompt_audio: str | Path | None = None,
        every: float | None = None,
        coarse_only: bool = False,
        progress: Progress | None = None,
        clap_tokens: np.ndarray | Sequence | None = None,
        style_audio: str | Path | None = None,
    ) -> GenerationRun:
        """Music for ``prompt`` as it is made: iterate the result for float32 audio chunks [samples] at
        :attr:`sample_rate`, each as soon as its fine tokens are sampled and decoded. The chunks
        joined are exactly :meth:`generate`'s audio for the same arguments and seed (one sample).
        After the last chunk, the result's ``generation`` holds the scored :class:`Generation`.

            for chunk in lm.stream("a calm piano over soft rain", seconds=30):
                player.write(chunk)
        """
        return GenerationRun(
            self, prompt, seconds, num_samples=1, keep=1, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, prompt_audio=prompt_audio, every=every, coarse_only=coarse_only, use_cache=True, progress=progress, stream=True,
            clap_tokens=clap_tokens, style_audio=style_audio,
        )  # fmt: skip

    # ---- the steps -------------------------------------------------------------------------------------------------
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

    def style_tokens(self, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """The CLAP *audio* tokens of a reference clip, "music like this": ([1, L] codes, [1, D] embedding),
        the normalised mean of its CLAP windows' embeddings, quantized as training's CLAP tokens are."""
        from musiclm.metrics import clap_audio_embeddings
        from musiclm.pipeline.audio import AudioError, read_mono

        try:
            audio, rate = read_mono(path)
        except AudioError as e:
            raise UserError(f"cannot read the style audio {path}: {e.reason}") from None
        emb = clap_audio_embeddings(self.tokenizer, [audio], rate)  # [1, D]
        return self.tokenizer.clap_codes(torch.from_numpy(emb).to(self.tokenizer.device)).cpu().numpy(), emb

    def conditioning(self, prompts: list[str], clap_tokens=None, style_audio: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The CLAP tokens [P, L] each window is conditioned on, and the embeddings [P, D] samples are
        scored against: of the text ``prompts``, else the given ``clap_tokens`` (scored against the
        embedding they quantize), else the ``style_audio``'s."""
        if clap_tokens is not None:
            codes = check_clap_tokens(clap_tokens, self.info.clap.levels, self.info.clap.codebook_size)
            return codes, self.tokenizer.clap_embedding(codes)
        if style_audio is not None:
            return self.style_tokens(style_audio)
        return self.tokenizer.text_tokens(prompts)

    def decoder(self, start: int = 0) -> ChunkDecoder:
        """The chunked Encodec decoder every generation uses, streamed or not (the same chunks give the
        same audio); acoustic frames before ``start`` are context only."""
        return ChunkDecoder.from_seconds(self.tokenizer.decode_acoustic, self.hop, float(self.info.acoustic.frame_rate), start=start)

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


class GenerationRun:
    """One generation, run window by window; iterating it yields audio chunks [N, samples] (streamed:
    [samples]) as the last stage finishes frames. ``generation`` is set once the iteration ends."""

    def __init__(self, lm: MusicLM, prompt, seconds: float, *, num_samples, keep, cfg_scale, temperature, top_k, top_p, seed,
                 prompt_audio, every, coarse_only, use_cache, progress, stream, clap_tokens=None, style_audio=None):  # fmt: skip
        self.lm, self.seconds, self.seed, self.use_cache, self.progress, self.streamed = lm, seconds, seed, use_cache, progress, stream
        if clap_tokens is not None:
            clap_tokens = check_clap_tokens(clap_tokens, lm.info.clap.levels, lm.info.clap.codebook_size)
        self.prompts = conditioning_prompts(prompt, clap_tokens, style_audio)
        self.clap_tokens, self.style_audio = clap_tokens, style_audio
        defaults = lm.stages["semantic"].cfg.generate
        self.n = defaults.num_samples if num_samples is None else num_samples
        self.k = min(defaults.keep, self.n) if keep is None else keep
        check_request(self.prompts, seconds, self.n, self.k, every, top_k, top_p, cfg_scale, stream=stream)
        if not coarse_only and "fine" not in lm.stages:
            raise UserError("no fine stage: pass --fine RUN (or --model DIR holding fine/), or generate with --coarse-only")
        self.new_frames = lm.stages["coarse"].layout.frames_of("acoustic", seconds)
        if self.new_frames < 1:
            raise UserError(f"--seconds {seconds:g} is shorter than one codec frame ({1 / float(lm.info.acoustic.frame_rate):.3g} s)")
        if len(self.prompts) > 1 and every is None:
            every = seconds / len(self.prompts)
        self.every = every
        self.coarse_only = coarse_only
        self.settings = resolve_settings(lm.stages, temperature, top_k, top_p, cfg_scale)
        self.names = ("semantic", "coarse") if coarse_only else STAGES
        self.prompt_audio = prompt_audio
        self.timings: dict[str, float] = {}
        self.generation: Generation | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        lm, info, n = self.lm, self.lm.info, self.n
        t_start = t0 = time.perf_counter()
        clap_codes, text_emb = lm.conditioning(self.prompts, self.clap_tokens, self.style_audio)  # [P, L], [P, D]
        prompt_tokens, prompt_seconds, read_from = lm._prompt_tokens(self.prompt_audio) if self.prompt_audio is not None else (None, Fraction(0), None)
        self.timings["prompts"] = time.perf_counter() - t0

        # the timeline: prompt frames, then the new ones; semantic covers every acoustic frame
        p_sem = 0 if prompt_tokens is None else prompt_tokens["semantic"].shape[-1]
        p_ac = 0 if prompt_tokens is None else prompt_tokens["acoustic"].shape[-1]
        t_ac = p_ac + self.new_frames
        t_sem = p_sem + math.ceil(Fraction(self.new_frames) * info.semantic.frame_rate / info.acoustic.frame_rate)
        # The stages sample whole ticks: a last window ends on the grid, up to a tick past the output,
        # and the next stage's window over the same span needs those conditioning frames. The frames
        # past t_sem / t_ac are dropped from the result.
        ticks = -(-t_ac // lm.per_tick["acoustic"])
        streams = {
            "semantic": np.full((n, ticks * lm.per_tick["semantic"]), -1, dtype=np.int64),
            "acoustic": np.full((n, info.acoustic.levels, ticks * lm.per_tick["acoustic"]), -1, dtype=np.int64),
        }
        if prompt_tokens is not None:
            streams["semantic"][:, :p_sem] = prompt_tokens["semantic"]
            streams["acoustic"][:, :, :p_ac] = prompt_tokens["acoustic"]

        plans, filled, done = {}, {}, {}
        for name in self.names:
            layout = lm.stages[name].layout
            known = p_sem if layout.target.stream == "semantic" else p_ac
            plans[name] = plan_stage(layout, lm.tick, streams[layout.target.stream].shape[-1], known, len(self.prompts), self.every, prompt_seconds)
            filled[name], done[name] = known, 0
            self.timings[name] = 0.0
        windows: list[Window] = []
        capture = lm.cuda_graphs
        samplers = lm._samplers if lm.fixed_steps or capture else None  # on a GPU, fixed-shape steps captured as graphs

        def run_until(name: str, frames: int) -> None:
            """Sample windows of stage ``name`` (and first what they are conditioned on) until its
            target stream is filled up to ``frames``."""
            st, plan = lm.stages[name], plans[name]
            rate = info.stream(st.layout.target.stream).frame_rate
            while filled[name] < frames and done[name] < len(plan):
                w = plan[done[name]]
                if name in UPSTREAM:
                    up = UPSTREAM[name]
                    run_until(up, span(info, st.layout, w, lm.stages[up].layout.target.stream)[1])
                t0 = time.perf_counter()
                sample_window(st, streams, w, clap_codes, self.settings[name], self.seed, use_cache=self.use_cache, samplers=samplers, capture=capture)
                self.timings[name] += time.perf_counter() - t0
                filled[name], done[name] = w.end, done[name] + 1
                windows.append(w)
                if self.progress is not None:
                    first = plan[0].known
                    self.progress(name, float((w.end - first) / rate), float((plan[-1].end - first) / rate))

        levels = info.coarse_levels if self.coarse_only else info.acoustic.levels
        decoder = lm.decoder(start=p_ac)
        if p_ac:
            decoder.push(streams["acoustic"][:, :levels, :p_ac])  # the prompt's frames: context, never emitted
        last, pieces = self.names[-1], []

        def decodes() -> Iterator[Callable[[], np.ndarray]]:
            """After each window of the last stage, the decode of the frames it finished; then the rest."""
            pushed = p_ac
            for w in plans[last]:
                run_until(last, w.end)
                final = min(filled[last], t_ac)
                yield lambda a=pushed, e=final: decoder.push(streams["acoustic"][:, :levels, a:e])
                pushed = final
            yield decoder.finish

        self.timings["decode"] = 0.0
        for decode in decodes():
            t0 = time.perf_counter()
            audio = decode()
            self.timings["decode"] += time.perf_counter() - t0
            if audio.shape[1]:
                self.timings.setdefault("first_audio", time.perf_counter() - t_start)
                pieces.append(audio)
                yield audio[0] if self.streamed else audio

        audio = np.concatenate(pieces, axis=1)  # [N, samples]
        assert audio.shape[1] == self.new_frames * lm.hop, (audio.shape, self.new_frames, lm.hop)
        t0 = time.perf_counter()
        scores = lm._scores(audio, text_emb, self.every, self.seconds)
        kept = [int(i) for i in np.argsort(-scores, kind="stable")[: self.k]]
        self.timings["score"] = time.perf_counter() - t0
        self.generation = Generation(
            audio=audio[kept],
            sample_rate=lm.sample_rate,
            kept=kept,
            scores=scores,
            semantic=streams["semantic"][:, :t_sem],
            acoustic=streams["acoustic"][:, :levels, :t_ac],
            prompts=self.prompts,
            every=self.every,
            prompt_frames={"semantic": p_sem, "acoustic": p_ac},
            prompt_seconds=float(prompt_seconds),
            continues_at=None if read_from is None else read_from + float(prompt_seconds),
            windows=windows,
            settings={name: self.settings[name] for name in self.names},
            timings=self.timings,
        )
