"""How much audio fitting the quantizers needs, and which files the fit reads.

Layer: pipeline (imports the base layer; models.backbones and pipeline.audio where a check needs them).

A codebook is only as good as its sample: every code needs ``tokenize.fit.min_points_per_code``
points at every level. A residual quantizer fits each level on the same points (the residuals
of the level before), so CLAP's need is ``codebook_size x min_points`` window embeddings,
whatever the depth; the semantic model's is ``codebook_size x min_points`` frames. CLAP windows are the scarce
kind (one per ``clap_hop_seconds``, against the semantic model's 50 frames per second), so a corpus is
judged from its probed durations alone, before any backbone runs over it.

Checks that need a backbone's own settings (the CLAP window of its feature extractor, the semantic
layer count and frame rate, an offline Encodec's codebooks) read them from the backbone's
config files without loading weights: at once for ``random`` and local folders, and for a hub
id when it is in the local cache (else when the backbone loads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from musiclm.config import TokenizeConfig, clap_windows_per_segment, fitted_clap_windows_per_second
from musiclm.errors import UserError


@dataclass(frozen=True)
class BackboneFacts:
    """What the fit plan needs to know of the backbones; None where it is not known without loading."""

    clap_window_seconds: float | None = None
    semantic_frame_rate: float | None = None
    semantic_layers: int | None = None
    codec_frame_rate: float | None = None
    encodec_codebook_size: int | None = None  # only for an Encodec built offline, whose codebooks are fitted


def _cached(load: Callable, source: str, revision: str | None):
    """``load(source)`` from a local folder or the local hub cache only; None when that needs the network."""
    try:
        return load(source, revision=revision, local_files_only=True)
    except (OSError, ValueError, UserError):
        return None


def backbone_facts(t: TokenizeConfig) -> BackboneFacts:
    """Read the backbones' own settings from their configs (no weights are loaded)."""
    from transformers import AutoConfig, AutoFeatureExtractor, ClapFeatureExtractor, SeamlessM4TFeatureExtractor, Wav2Vec2FeatureExtractor

    from musiclm.models import codec, semantic
    from musiclm.models.backbones import RANDOM

    if t.clap.model == RANDOM:
        clap_fe = ClapFeatureExtractor(**t.clap.features)
    else:
        clap_fe = _cached(ClapFeatureExtractor.from_pretrained, t.clap.model, t.clap.revision)
    clap_window = None if clap_fe is None else clap_fe.nb_max_samples / clap_fe.sampling_rate

    s = t.semantic
    if s.model == RANDOM:
        config = semantic.random_config(s)
        fe = SeamlessM4TFeatureExtractor(**s.features) if semantic.family(config) == "wav2vec2-bert" else None
    elif not s.trust_remote_code:  # remote-code configs are read when the model loads
        config = _cached(lambda source, **kw: semantic.read_config(s, source, **kw), s.model, s.revision)
        fe = _cached(AutoFeatureExtractor.from_pretrained, s.model, s.revision)
    else:
        config = fe = None
    if config is not None and fe is None and semantic.family(config) == "hubert":
        fe = Wav2Vec2FeatureExtractor(sampling_rate=s.sample_rate)  # a folder without preprocessor_config.json
    known = config is not None and fe is not None

    c = t.codec
    enc = codec.random_config(c) if c.model == RANDOM else _cached(AutoConfig.from_pretrained, c.model, c.revision)
    return BackboneFacts(
        clap_window_seconds=clap_window,
        semantic_frame_rate=semantic.frame_rate(config, fe) if known else None,
        semantic_layers=config.num_hidden_layers if config is not None else None,
        codec_frame_rate=None if enc is None else codec.codec_frame_rate(enc),
        encodec_codebook_size=enc.codebook_size if c.model == RANDOM and enc.model_type == "encodec" else None,
    )


def check_clap_window(t: TokenizeConfig, extractor_seconds: float) -> None:
    """The CLAP window of the config must be its feature extractor's: a longer one would be cut, a shorter padded."""
    if abs(extractor_seconds - t.clap.window_seconds) > 1e-3:
        raise UserError(
            f"tokenize.clap.window_seconds = {t.clap.window_seconds:g} but the CLAP feature extractor of '{t.clap.model}' "
            f"takes {extractor_seconds:g} s windows: make them equal"
        )


def check_backbones(t: TokenizeConfig, facts: BackboneFacts) -> None:
    """One-line errors for a tokenize config that disagrees with its backbones or cannot feed their codebooks."""
    if facts.clap_window_seconds is not None:
        check_clap_window(t, facts.clap_window_seconds)
    if facts.semantic_layers is not None and not 0 <= t.semantic.layer <= facts.semantic_layers:
        raise UserError(f"tokenize.semantic.layer = {t.semantic.layer} but the semantic model has {facts.semantic_layers} layers (use 0..{facts.semantic_layers})")
    f = t.fit
    for what, k, rate in (
        ("tokenize.semantic.codebook_size", t.semantic.codebook_size, facts.semantic_frame_rate),
        ("the Encodec codebooks (tokenize.codec.arch.codebook_size)", facts.encodec_codebook_size, facts.codec_frame_rate),
    ):
        if not k or rate is None:
            continue
        need = k * f.min_points_per_code
        if f.max_points < need or f.semantic_seconds * rate < need:
            raise UserError(
                f"tokenize.fit cannot feed {what} = {k}: {f.min_points_per_code} points per code need {need} frames, "
                f"but max_points = {f.max_points} and semantic_seconds = {f.semantic_seconds:g} give {min(f.max_points, int(f.semantic_seconds * rate))}"
            )


# ---- the sample -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitFile:
    rel: str
    seconds: float
    clap_windows: int  # at the fit-time hop, over all its segments
    heldout: bool  # its CLAP windows measure the fit instead of feeding it
    semantic: bool  # semantic frames (and Encodec latents) are extracted from it


@dataclass
class FitPlan:
    """The files a fit reads, and what the vocabularies need of them."""

    files: list[FitFile]
    clap_need: int  # CLAP windows the codebooks need (non-held-out)
    semantic_need: int  # semantic frames the k-means needs
    hours_need: float  # audio that gives clap_need windows at full segments, held-out files included

    @property
    def seconds(self) -> float:
        return sum(f.seconds for f in self.files)

    @property
    def clap_windows(self) -> int:
        return sum(f.clap_windows for f in self.files if not f.heldout)

    @property
    def heldout(self) -> list[str]:
        return [f.rel for f in self.files if f.heldout]

    @property
    def semantic_files(self) -> list[str]:
        return [f.rel for f in self.files if f.semantic]

    @property
    def semantic_seconds(self) -> float:
        return sum(f.seconds for f in self.files if f.semantic)


def fit_windows(seconds: float, t: TokenizeConfig) -> int:
    """CLAP windows the fit takes from a file of ``seconds`` (split into segments as tokenize splits it)."""
    from musiclm.pipeline.audio import plan_segments  # here: the tokenizer imports this module, and runs where soundfile is absent

    return sum(clap_windows_per_segment(s, t.clap.window_seconds, t.fit.clap_hop_seconds) for _, s in plan_segments(seconds, t.audio.segment_seconds))


def hours_needed(t: TokenizeConfig) -> float:
    """Hours of audio (in files of at least one segment) that give the CLAP codebooks their floor."""
    return t.clap.codebook_size * t.fit.min_points_per_code / fitted_clap_windows_per_second(t) / 3600


def plan_fit(files: list[str], durations: Callable[[str], float | None], t: TokenizeConfig) -> FitPlan:
    """Draw files in a seeded random order until ``fit.max_seconds`` of audio.

    ``durations(rel)`` probes one file: its seconds, or None when it cannot be read (it is skipped
    here and reported by the tokenize pass). Every ``1 / heldout_fraction``-th file drawn is held
    out; the first ``fit.semantic_seconds`` of audio also give semantic frames.
    """
    f = t.fit
    order = np.random.default_rng(f.seed).permutation(len(files))
    every = round(1 / f.heldout_fraction) if f.heldout_fraction > 0 else 0
    plan = FitPlan([], t.clap.codebook_size * f.min_points_per_code, t.semantic.codebook_size * f.min_points_per_code, hours_needed(t))
    total = semantic = 0.0
    for i in order:
        if total >= f.max_seconds:
            break
        seconds = durations(files[i])
        if seconds is None or seconds < t.audio.min_seconds:
            continue
        n = len(plan.files)
        heldout = every > 0 and n % every == every - 1
        plan.files.append(FitFile(files[i], seconds, fit_windows(seconds, t), heldout, semantic < f.semantic_seconds))
        total += seconds
        if semantic < f.semantic_seconds:
            semantic += seconds
    return plan


def duration_text(seconds: float) -> str:
    """Hours, minutes below one hour, seconds below a minute: "17.6 h", "4.2 min", "12 s"."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def needs_line(t: TokenizeConfig, plan: FitPlan) -> str:
    """What the configured vocabularies need, and what the fit found: printed before any backbone work."""
    c, f = t.clap, t.fit
    return (
        f"the vocabularies need about {duration_text(plan.hours_need * 3600)} of audio to fit: CLAP {c.levels} x {c.codebook_size} codes "
        f"x {f.min_points_per_code} points = {plan.clap_need:,} windows of {c.window_seconds:g} s at a {f.clap_hop_seconds:g} s hop; "
        f"semantic {t.semantic.codebook_size} codes = {plan.semantic_need:,} semantic frames. "
        f"The fit sample: {len(plan.files)} files, {duration_text(plan.seconds)}: {plan.clap_windows:,} windows "
        f"({plan.clap_windows / c.codebook_size:.0f} per code), {len(plan.heldout)} files held out"
    )


def largest_codebook(points: int, min_points: int) -> int:
    """The largest power-of-two codebook that ``points`` can feed at ``min_points`` per code (0 if none)."""
    k = points // min_points
    return 1 << (k.bit_length() - 1) if k >= 1 else 0


def check_enough(t: TokenizeConfig, plan: FitPlan, semantic_rate: float | None) -> None:
    """Refuse, in one line, a corpus too small for the configured CLAP (and semantic) vocabularies."""
    c, f = t.clap, t.fit
    have = plan.clap_windows
    if have < plan.clap_need:
        k = largest_codebook(have, f.min_points_per_code)
        smaller = f"tokenize.clap.codebook_size = {k} fits this corpus" if k >= 2 else "no CLAP codebook fits this corpus"
        raise UserError(
            f"not enough audio to fit the tokenizer: CLAP {c.levels} x {c.codebook_size} codes need {plan.clap_need:,} windows "
            f"({f.min_points_per_code} per code, about {duration_text(plan.hours_need * 3600)} of audio) but the corpus gives {have:,} "
            f"({duration_text(plan.seconds)} in {len(plan.files)} readable files); use a smaller codebook ({smaller}) "
            f"or pass --tokenizer from a tokenizer fitted on a larger corpus"
        )
    if semantic_rate is not None:
        frames = min(int(plan.semantic_seconds * semantic_rate), f.max_points)
        if frames < plan.semantic_need:
            k = largest_codebook(frames, f.min_points_per_code)
            raise UserError(
                f"not enough audio to fit the tokenizer: semantic {t.semantic.codebook_size} codes need {plan.semantic_need:,} semantic frames "
                f"({f.min_points_per_code} per code) but the corpus gives {frames:,}; use tokenize.semantic.codebook_size = {k} or less, "
                "or pass --tokenizer from a tokenizer fitted on a larger corpus"
            )
