"""A sampling request: what to generate and how, carried once from the API, the command and the page to the run.

:class:`SamplingRequest` holds the settings of one generation (the prompt or
what else it is conditioned on, the length, the batch, the sampling knobs, a
prompt audio to continue). :meth:`MusicLM.generate <musiclm.generation.model.MusicLM.generate>`
builds one from its keywords; ``musiclm generate`` and the web page build one
from their options and fields.

Its checks are here too, as public functions that need no model: the command
runs them before anything is loaded, the page with its own field names, and a
run again once each stage's defaults are known. Each refuses a bad value with a
one-line :class:`~musiclm.errors.UserError` that names the command-line option.

Layer: generation (imports only the base layer, and the pipeline's audio probe when a file is checked).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musiclm.errors import UserError


@dataclass(frozen=True)
class SamplingRequest:
    """One generation's settings. ``None`` leaves a setting to each stage's ``[generate]`` config.

    ``prompt``: one text, or several with ``every`` seconds each (story mode; without ``every`` the
    prompts share ``seconds`` equally); None when ``clap_tokens`` (given CLAP codes, [L] or one row per
    story prompt [P, L]) or ``style_audio`` (a reference clip's CLAP audio tokens) condition instead.
    ``seconds`` of new audio; ``num_samples`` generated as one batch, the ``keep`` best by CLAP
    text-audio similarity returned. ``temperature``: one value or (semantic, coarse, fine); 0 is
    greedy. ``top_k`` 0 and ``top_p`` 1 are off; ``cfg_scale`` 1 is no guidance. ``prompt_audio``: a
    file to continue (the output is the new music only). ``coarse_only`` skips the fine stage;
    ``use_cache=False`` recomputes the whole sequence per token (for checks).
    """

    prompt: str | Sequence[str] | None = None
    seconds: float = 10.0
    num_samples: int | None = None
    keep: int | None = None
    cfg_scale: float | None = None
    temperature: float | Sequence[float] | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    prompt_audio: str | Path | None = None
    every: float | None = None
    coarse_only: bool = False
    use_cache: bool = True
    clap_tokens: np.ndarray | Sequence | None = field(default=None, compare=False)
    style_audio: str | Path | None = None


def prompt_list(prompt: str | Sequence[str]) -> list[str]:
    """One text prompt or several as a list; a :class:`UserError` when none is given or one is blank."""
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


def check_prompt_audio(path: str | Path, what: str = "prompt audio") -> float:
    """Duration in seconds of a readable audio file (the ``what`` of a generation), else a :class:`UserError`."""
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
        check_prompt_audio(style_audio, "style audio")
        return [f"like {Path(style_audio).name}"]
    if prompt is None:
        raise UserError('nothing to condition on: give a text prompt such as "a calm piano over soft rain", or --style-audio FILE')
    return prompt_list(prompt)
