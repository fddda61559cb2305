"""The installed version of musiclm, read from the package metadata (recorded in sidecars and run folders).

Layer: base.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("musiclm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
