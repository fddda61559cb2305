"""The public API: :class:`MusicLM` turns text into music with three trained stages and their tokenizer.

    text ─► CLAP text tokens ─► semantic ─► coarse ─► fine ─► codec decode ─► waveform

Each stage samples its timeline in windows (:mod:`musiclm.generation.windows`),
one window at a time (:mod:`musiclm.generation.stages`). The stages interleave
window by window: a window runs as soon as the frames it is conditioned on
exist, and the acoustic frames the last stage has finished are decoded in
chunks with a crossfade (:mod:`musiclm.generation.decode`); one such run is a
:class:`~musiclm.generation.run.GenerationRun`. So :meth:`MusicLM.stream` yields
audio while later windows are still to come, and :meth:`MusicLM.generate` is the
same run collected: the same seed gives the same audio either way. Their settings
are the fields of a :class:`~musiclm.generation.request.SamplingRequest`, given
as keywords, or as one request to :meth:`MusicLM.run`.

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

Where the stages and the tokenizer are found is :mod:`musiclm.generation.loading`.

Layer: generation (imports the models, pipeline, metrics and hub layers, and training through :mod:`musiclm.generation.loading`).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from musiclm.errors import UserError
from musiclm.generation.decode import ChunkDecoder
from musiclm.generation.loading import check_stages, load_stages
from musiclm.hub.model_folder import find_tokenizer, own_tokenizer, stage_folders
from musiclm.generation.request import SamplingRequest, check_clap_tokens, check_prompt_audio
from musiclm.generation.run import Generation, GenerationRun, Progress
from musiclm.generation.stages import Stage
from musiclm.pipeline.tokenizer import Tokenizer


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
        check_stages(stages)
        device = next(stages["semantic"].model.parameters()).device
        self.precision = default_precision(device) if precision is None else precision
        self.stages = {name: Stage(for_inference(st.model, self.precision), st.layout, st.cfg, st.run) for name, st in stages.items()}
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and device.type != "cuda":
            raise UserError(f"CUDA graphs need a CUDA device; the stages are on {device}")
        self.samplers: dict = {}  # fixed-shape samplers (and their graphs) by stage, batch and settings, kept across runs
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
        from musiclm.device import pick_device

        dev = pick_device(device, local_rank=0)  # the same devices and errors as musiclm train
        stages = load_stages({"semantic": semantic, "coarse": coarse, "fine": fine}, dev)
        fingerprint = check_stages(stages)
        folder = Path(tokenizer) if tokenizer is not None else find_tokenizer([st.run for st in stages.values()], fingerprint)
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
        sha; None: main) through the Hugging Face cache (:func:`musiclm.hub.pull.resolve_model`). The folder holds
        the run folders semantic/, coarse/ and fine/ (fine may be missing for coarse-only use) and optionally
        tokenizer/. A pulled tokenizer that would run remote code needs ``trust_remote_code=True``."""
        from musiclm.hub.pull import resolve_model

        folder = resolve_model(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        runs = stage_folders(folder)
        return cls.from_runs(runs["semantic"], runs["coarse"], runs.get("fine"), tokenizer=own_tokenizer(folder), device=device, precision=precision, cuda_graphs=cuda_graphs)

    @property
    def sample_rate(self) -> int:
        return self.info.codec_sample_rate

    @property
    def device(self) -> torch.device:
        return next(self.stages["semantic"].model.parameters()).device

    # ---- the public calls ------------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str] | None, seconds: float = 10.0, **settings) -> tuple[np.ndarray, int]:
        """Music for ``prompt``: ``(audio, sample_rate)``, audio float32 [samples] when ``keep`` is 1,
        else [keep, samples] best first; samples = round(seconds * frame_rate) * hop, at the codec rate.

        ``settings`` are the other fields of :class:`~musiclm.generation.request.SamplingRequest`, by
        keyword: ``num_samples``, ``keep``, ``cfg_scale``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
        ``prompt_audio``, ``every``, ``coarse_only``, ``use_cache``, ``clap_tokens``, ``style_audio``.
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
        g = self.generate_with_details(prompt, seconds, **settings)
        return (g.audio[0] if len(g.audio) == 1 else g.audio), g.sample_rate

    def generate_with_details(
        self, prompt: str | Sequence[str] | None, seconds: float = 10.0, *, progress: Progress | None = None, **settings
    ) -> Generation:
        """:meth:`generate` returning a :class:`Generation`: the kept audio [K, samples], every sample's
        tokens and score, the windows sampled, the resolved settings and timings. ``progress`` is
        called after every window."""
        run = self.run(SamplingRequest(prompt, seconds, **settings), progress=progress)
        for _ in run:
            pass
        return run.generation

    def stream(self, prompt: str | Sequence[str] | None, seconds: float = 10.0, *, progress: Progress | None = None, **settings) -> GenerationRun:
        """Music for ``prompt`` as it is made: iterate the result for float32 audio chunks [samples] at
        :attr:`sample_rate`, each as soon as its fine tokens are sampled and decoded. The chunks
        joined are exactly :meth:`generate`'s audio for the same arguments and seed (one sample, so
        ``settings`` are those of :meth:`generate` but ``num_samples``, ``keep`` and ``use_cache``).
        After the last chunk, the result's ``generation`` holds the scored :class:`Generation`.

            for chunk in lm.stream("a calm piano over soft rain", seconds=30):
                player.write(chunk)
        """
        for name in ("num_samples", "keep", "use_cache"):
            if name in settings:
                raise TypeError(f"MusicLM.stream() got an unexpected keyword argument '{name}'")
        return self.run(SamplingRequest(prompt, seconds, num_samples=1, keep=1, **settings), progress=progress, stream=True)

    def run(self, request: SamplingRequest, *, progress: Progress | None = None, stream: bool = False) -> GenerationRun:
        """The :class:`GenerationRun` of ``request``, not yet started: iterate it for audio chunks
        [N, samples] (``stream``: [samples] of its one sample); its ``generation`` is set at the end.
        ``progress`` is called after every window. The request is checked here (a :class:`UserError`)."""
        return GenerationRun(self, request, progress=progress, stream=stream)

    # ---- the steps of a run (GenerationRun calls them) -------------------------------------------------------------
    def prompt_tokens(self, path: str | Path) -> tuple[dict[str, np.ndarray], Fraction, float]:
        """Tokens of the end of a prompt file cut to whole ticks: ({"semantic": [T_s], "acoustic": [Q, T_a]},
        their duration, where in the file the part read starts)."""
        from musiclm.pipeline.audio import AudioError, load_for_rates

        duration = check_prompt_audio(path)
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
        """The chunked codec decoder every generation uses, streamed or not (the same chunks give the
        same audio); acoustic frames before ``start`` are context only."""
        return ChunkDecoder.from_seconds(self.tokenizer.decode_acoustic, self.hop, float(self.info.acoustic.frame_rate), start=start)

    def scores(self, audio: np.ndarray, text_emb: np.ndarray, every: float | None, seconds: float) -> np.ndarray:
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
