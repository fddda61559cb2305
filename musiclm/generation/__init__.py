"""Text to music: the three trained stages run backwards from a prompt to a waveform.

By role:

- :mod:`~musiclm.generation.request`: a generation's settings, :class:`SamplingRequest`,
  and their checks (none needs a model);
- :mod:`~musiclm.generation.windows`: window planning (which sampling calls fill
  a stage's timeline, what each one sees, story-mode prompts);
- :mod:`~musiclm.generation.stages`: the per-stage sampling loop (one window of
  one stage, guidance, per-window random numbers);
- :mod:`~musiclm.generation.decode`: codec decoding in crossfaded chunks;
- :mod:`~musiclm.generation.run`: one run of the chain, the stages interleaved
  window by window, decoded and scored (:class:`GenerationRun`, :class:`Generation`);
- :mod:`~musiclm.generation.loading`: where the stages and their tokenizer are found;
- :mod:`~musiclm.generation.model`: the public API, :class:`MusicLM`
  (``generate``, ``stream``, ``run``).

The command's glue (``musiclm generate``) is :mod:`musiclm.commands.generate`.

Layer: generation (above metrics and hub; below app and commands).
"""

from musiclm.generation.model import MusicLM
from musiclm.generation.request import SamplingRequest, check_request
from musiclm.generation.run import Generation, GenerationRun
from musiclm.generation.stages import Stage, StageSettings
from musiclm.generation.windows import Window, plan_windows

__all__ = ["Generation", "GenerationRun", "MusicLM", "SamplingRequest", "Stage", "StageSettings", "Window", "check_request", "plan_windows"]
