"""musiclm: train and run MusicLM-style text-to-music models from cached integer tokens.

``from musiclm import MusicLM`` loads the generation code (torch, transformers) on first use only,
so ``import musiclm`` stays cheap for the command line.

Layer: top.
"""

from __future__ import annotations

from musiclm.version import __version__

__all__ = ["MusicLM", "__version__"]


def __getattr__(name: str):
    if name == "MusicLM":
        from musiclm.generation import MusicLM

        return MusicLM
    raise AttributeError(f"module 'musiclm' has no attribute {name!r}")
