"""Semantic-token n-grams: what the audit index stores and what a query looks up.

A token sequence is first cut into *runs* (a code repeated over consecutive
frames counts once, placed at the frame where its run starts), so that a
steady note or a silence is one symbol rather than hundreds of identical
n-grams, and a run that ends a frame early or late still gives the same
symbols. An n-gram is ``n`` consecutive run codes; its 64-bit hash is a
bijective mix (splitmix64's finaliser) of a polynomial of the codes, so that
hashes are spread evenly and the minimum of a window is a fair pick.

The index keeps a *winnowed* subset (Schleimer et al., 2003): the smallest
hash of every ``w`` consecutive n-grams, which keeps about ``2 / (w + 1)``
of them and guarantees one per window. A query keeps all of its n-grams, so
every indexed n-gram inside a copied stretch is found.

Layer: audit.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_MUL = np.uint64(0x9E3779B97F4A7C15)  # an odd constant: the polynomial base


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, a bijection of uint64 (in place on a copy)."""
    h = h ^ (h >> np.uint64(30))
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def runs(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run-length view of codes [T]: (the code of each run [R] uint64, the frame where it starts [R] int64)."""
    t = np.asarray(tokens).astype(np.uint64, copy=False).ravel()
    if len(t) == 0:
        return t, np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
    return t[starts], starts.astype(np.int64)


def ngram_hashes(tokens: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every n-gram of run codes of ``tokens`` [T]: (hashes [G] uint64, first frame of each [G] int64).

    G = runs - n + 1 (none when there are fewer than n runs). Equal n-grams hash equally, in any clip."""
    codes, frames = runs(tokens)
    g = len(codes) - n + 1
    if g <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    h = np.zeros(g, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _MUL + codes[j : j + g] + np.uint64(1)
        h = _mix(h)
    return h, frames[:g]


def winnow(hashes: np.ndarray, frames: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The smallest hash of every ``w`` consecutive n-grams (each kept once, in order); all of them when w <= 1
    or there are fewer than ``w``."""
    if w <= 1 or len(hashes) <= w:
        return hashes, frames
    pick = np.unique(sliding_window_view(hashes, w).argmin(axis=1) + np.arange(len(hashes) - w + 1))
    return hashes[pick], frames[pick]
