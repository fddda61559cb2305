"""Text to music: the three trained stages run backwards from a prompt to a waveform.

By role:

- :mod:`~musiclm.generation.windows`: window planning (which sampling calls fill
  a stage's timeline, what each one sees, story-mode prompts);
- :mod:`~musiclm.generation.stages`: the per-stage sampling loop (one window of
  one stage, guidance, per-window random numbers);
- :mod:`~musiclm.generation.decode`: Encodec decoding in crossfaded chunks;
- :mod:`~musiclm.generation.model`: the public API, :class:`MusicLM`
  (``generate``, ``stream``), which interleaves the stages window by window.

The command's glue (``musiclm generate``) is :mod:`musiclm.generate_command`.
"""

from musiclm.generation.model import Generation, GenerationRun, MusicLM, check_request
from musiclm.generation.stages import Stage, StageSettings
from musiclm.generation.windows import Window, plan_windows

__all__ = ["Generation", "GenerationRun", "MusicLM", "Stage", "StageSettings", "Window", "check_request", "plan_windows"]
