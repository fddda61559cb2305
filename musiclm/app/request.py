"""The web page's form as a generation request: values in, a checked :class:`Request` out.

Nothing here imports gradio, so the form's rules are tested without a browser. The checks
are the library's own (:func:`~musiclm.generation.request.check_request`,
:func:`~musiclm.generation.stages.temperatures`); this module adds only the page's limits
(longest output, most samples) and story times that would leave a prompt unplayed, and
names the form's fields where the library's messages name command-line options. A
:class:`Request` becomes the library's :class:`~musiclm.generation.request.SamplingRequest`
with :meth:`Request.sampling`.

Layer: app (imports the generation layer's request checks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from musiclm.errors import UserError
from musiclm.generation.request import SamplingRequest, check_request, prompt_list
from musiclm.generation.stages import temperatures

MAX_SECONDS = 300.0  # one request holds the queue of one for its whole run
MAX_SAMPLES = 16  # generated in one batch
MAX_KEEP = 4  # result slots on the page
MAX_SEED = 2**32 - 1

# The library speaks of command-line options; the page of its fields' labels.
FIELDS = {
    "--num-samples": "Samples generated",
    "--cfg-scale": "Guidance",
    "--temperature": "Temperature",
    "--seconds": "Seconds",
    "--every": "Seconds per prompt",
    "--keep": "Samples kept",
}


@dataclass(frozen=True)
class Request:
    """One checked generation request. ``every`` is None for one prompt, or for several sharing
    ``seconds`` equally; ``cfg_scale`` and ``temperature`` None leave each stage's own settings."""

    prompts: list[str]
    seconds: float
    num_samples: int
    keep: int
    cfg_scale: float | None
    temperature: tuple[float, float, float] | None  # semantic, coarse, fine
    seed: int
    every: float | None

    @property
    def streams(self) -> bool:
        """One sample can be played as it is made; several are re-ranked once whole."""
        return self.num_samples == 1

    def kwargs(self) -> dict:
        """Keyword arguments of :meth:`MusicLM.generate_with_details` (fields of a :class:`SamplingRequest`)
        after the prompts and seconds."""
        return dict(num_samples=self.num_samples, keep=self.keep, cfg_scale=self.cfg_scale, temperature=self.temperature, seed=self.seed, every=self.every)

    def sampling(self, **more) -> SamplingRequest:
        """This request as the library's :class:`SamplingRequest`; ``more``: its fields the form does not
        hold (``prompt_audio``, ``coarse_only``). Top-k and top-p are each stage's own."""
        return SamplingRequest(self.prompts, self.seconds, **self.kwargs(), **more)


def parse_story(text: str | None, every: float | None) -> tuple[list[str], float | None]:
    """The prompt box as (prompts, every): one prompt per non-empty line; ``every`` 0 or empty
    means the prompts share the output equally (None)."""
    prompts = prompt_list([line.strip() for line in (text or "").splitlines() if line.strip()])
    if every is not None and every == 0:
        every = None
    return prompts, every


def build_request(
    prompt: str | None,
    seconds: float | None,
    num_samples: float | None,
    keep: float | None,
    cfg_scale: str | None,
    temperature: str | None,
    seed: float | None,
    every: str | None,
) -> Request:
    """The form's values as a :class:`Request`, or a :class:`UserError` naming the field and what to do.

    Number fields come as the page sends them (floats, None when empty); ``cfg_scale``,
    ``temperature`` and ``every`` are text, where empty means each stage's own setting (for
    ``every``: equal shares). ``temperature`` is one value, or three for semantic, coarse, fine.
    """
    guidance = _optional("Guidance", cfg_scale)
    temps = _optional("Temperature", temperature, many=True)
    prompts, every_s = parse_story(prompt, _optional("Seconds per prompt", every))
    seconds = _number("Seconds", seconds)
    if seconds > MAX_SECONDS:
        raise UserError(f"'Seconds' must be at most {MAX_SECONDS:g} on this page, got {seconds:g}: use musiclm generate for longer music")
    num_samples = _whole("Samples generated", num_samples, 1, MAX_SAMPLES)
    keep = _whole("Samples kept", keep, 1, MAX_KEEP)
    seed = _whole("Seed", seed, 0, MAX_SEED)
    temps = None if temps is None else temperatures(temps[0] if len(temps) == 1 else temps)
    check_request(prompts, seconds, num_samples, keep, every_s, None, None, guidance)
    if every_s is not None:
        late = [i + 1 for i in range(len(prompts)) if i * every_s >= seconds]
        if late:
            raise UserError(
                f"prompt {late[0]} would start at {(late[0] - 1) * every_s:g} s, past the end of the {seconds:g} s asked: "
                f"lower 'Seconds per prompt', raise 'Seconds' above {(len(prompts) - 1) * every_s:g}, or drop the last prompts"
            )
    return Request(prompts, seconds, num_samples, keep, guidance, temps, seed, every_s)


def _optional(label: str, text: str | None, many: bool = False):
    """An optional number typed as text: None when empty; with ``many``, a tuple of the numbers
    separated by spaces or commas."""
    words = (text or "").replace(",", " ").split()
    if not words:
        return None
    try:
        values = tuple(float(w) for w in words)
    except ValueError:
        raise UserError(f"'{label}' must be a number, or empty for the default; got '{text.strip()}'") from None
    if not many and len(values) > 1:
        raise UserError(f"'{label}' takes one number, got '{text.strip()}'")
    return values if many else values[0]


def _number(label: str, value: float | None) -> float:
    if value is None or not math.isfinite(value):
        raise UserError(f"'{label}' is empty: give a number")
    return float(value)


def _whole(label: str, value: float | None, low: int, high: int) -> int:
    value = _number(label, value)
    if value != int(value) or not low <= value <= high:
        raise UserError(f"'{label}' must be a whole number from {low} to {high}, got {value:g}")
    return int(value)


def page_message(error: UserError, names: dict[str, str] | None = None) -> str:
    """The library's one-line message with the form's labels for command-line options, and
    ``names`` (an uploaded file's temporary path → its name) replaced."""
    text = str(error)
    for flag, label in FIELDS.items():
        text = text.replace(flag, f"'{label}'")
    for path, name in (names or {}).items():
        text = text.replace(path, name)
    return text


class StageProgress:
    """A ``Progress`` callback ``(stage, done_seconds, total_seconds)`` for a run whose stages
    interleave: reports ``(fraction of all stages' work done, a line per stage)`` to ``report``."""

    def __init__(self, stages: tuple[str, ...], report: Callable[[float, str], None]):
        self.done = {name: (0.0, None) for name in stages}
        self.report = report

    def __call__(self, stage: str, done: float, total: float) -> None:
        self.done[stage] = (done, total)
        self.report(self.fraction, self.describe())

    @property
    def fraction(self) -> float:
        return sum(min(1.0, d / t) if t else 0.0 for d, t in self.done.values()) / len(self.done)

    def describe(self) -> str:
        return ", ".join(f"{name} {d:.1f}/{t:.1f} s" for name, (d, t) in self.done.items() if t)
