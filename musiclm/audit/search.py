"""One query against the audit index: the training files nearest a generated file, with offsets and scores.

Three steps:

1. **Vote on diagonals** (as audio fingerprinting does): every n-gram of the
   query's semantic tokens that the index holds votes for (clip, corpus frame -
   query frame). A copied stretch puts many votes on one diagonal, whatever a
   few changed tokens break; chance matches scatter. Votes on neighbouring
   diagonals (one frame apart) count together. This runs once per sub-frame
   phase of the query (see :class:`Query`).
2. **Find CLAP neighbours**: the corpus windows whose SimHash codes are nearest
   to each query window's.
3. **Verify** every clip found by either: read its stored tokens and count,
   at the voted diagonal (refined by one frame either way), the query frames
   whose token equals the clip's. Clips of one source file that agree on the
   file-level offset are merged (a copy may straddle two segments).

Scores per source file:

- ``semantic``: the largest share of identical semantic tokens over any
  stretch of the query one CLAP window long (10 s in the small preset; the
  whole query when shorter), at one offset. The MusicLM paper measured
  memorisation the same way (the share of matching semantic tokens).
- ``clap``: the cosine similarity of the nearest pair of CLAP windows (the
  query's, computed from its audio, and the stored ``clap_emb`` of the clip).

The offset is ``source time - generated time`` in seconds, from the diagonal
and the phase: where in the source file the generated file's first second
would be. It is exact to a frame (20 ms at 50 Hz) when tokens agree.

Layer: audit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from musiclm.audit.index import AuditIndex
from musiclm.audit.ngrams import ngram_hashes

_D_BITS = 24  # diagonals are packed with the clip id: |corpus frame - query frame| < 2**23 (46 h at 50 Hz)
MIN_VOTES = 2  # one n-gram in common says nothing about a clip


@dataclass
class Query:
    """A generated file as the index sees it.

    ``semantic`` [P, T] holds the file's semantic tokens at P sub-frame phases: row ``k`` is the tokens of
    the audio with its first ``shifts[k]`` seconds dropped (k/P of a frame), so that one row's frames line
    up with the corpus's to within 1/(2P) of a frame whatever the shift of the copy. ``clap`` [W, D] holds
    its normalised CLAP window embeddings at the tokenize hop."""

    semantic: np.ndarray  # [P, T] int64
    shifts: np.ndarray  # [P] float seconds
    clap: np.ndarray  # [W, D] float32
    seconds: float


@dataclass
class Match:
    """One training source file near a query."""

    source: str
    key: str  # the clip (file segment) that agrees most
    start: float  # seconds into the source where that clip starts
    offset: float  # seconds: source time - generated time
    query_start: float  # the stretch of the generated file that agrees most, seconds
    query_end: float
    semantic: float  # share of identical semantic tokens over that stretch
    clap: float  # cosine of the nearest pair of CLAP windows
    clap_offset: float  # source time - generated time of that pair of windows
    votes: int  # n-gram votes on the diagonal (all phases' best)
    gids: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "clip": self.key,
            "offset": round(self.offset, 3),
            "generated": [round(self.query_start, 3), round(self.query_end, 3)],
            "source_span": [round(self.query_start + self.offset, 3), round(self.query_end + self.offset, 3)],
            "semantic": round(self.semantic, 4),
            "clap": round(self.clap, 4),
            "clap_offset": round(self.clap_offset, 3),
            "votes": self.votes,
        }


@dataclass
class _Diagonals:
    """The best diagonal of each clip that got votes, for one phase (sorted by clip id)."""

    gids: np.ndarray
    diag: np.ndarray
    votes: np.ndarray

    def get(self, gid: int) -> tuple[int, int] | None:
        i = np.searchsorted(self.gids, gid)
        return (int(self.diag[i]), int(self.votes[i])) if i < len(self.gids) and self.gids[i] == gid else None


def _diagonals(gid: np.ndarray, diag: np.ndarray) -> _Diagonals:
    """The best diagonal of each clip from its votes (one per matching n-gram)."""
    if len(gid) == 0:
        z = np.zeros(0, np.int64)
        return _Diagonals(z, z, z)
    key = (gid << _D_BITS) + (diag + (1 << (_D_BITS - 1)))
    u, c = np.unique(key, return_counts=True)
    smooth = c.copy()
    for step in (-1, 1):  # a diagonal one frame over counts too (tokens jitter at run edges)
        j = np.minimum(np.searchsorted(u, u + step), len(u) - 1)
        hit = u[j] == u + step
        smooth[hit] += c[j[hit]]
    g = u >> _D_BITS
    order = np.lexsort((-smooth, g))  # per clip, the diagonal with most votes first
    first = np.r_[True, g[order][1:] != g[order][:-1]]
    best = order[first]
    return _Diagonals(g[best], (u[best] & ((1 << _D_BITS) - 1)) - (1 << (_D_BITS - 1)), smooth[best])


def _vote(index: AuditIndex, semantic: np.ndarray, exclude: np.ndarray | None) -> list[_Diagonals]:
    """The best diagonal per clip for each phase's tokens (rows of ``semantic`` [P, T]); one pass over the index."""
    grams = [ngram_hashes(row, index.params.n) for row in semantic]
    phase = np.concatenate([np.full(len(h), k) for k, (h, _) in enumerate(grams)])
    frames = np.concatenate([f for _, f in grams])
    gid, cf, qi = index.lookup(np.concatenate([h for h, _ in grams]))
    if exclude is not None and len(exclude) and len(gid):
        keep = ~np.isin(gid, exclude)
        gid, cf, qi = gid[keep], cf[keep], qi[keep]
    out = []
    for k in range(len(semantic)):
        mine = phase[qi] == k
        out.append(_diagonals(gid[mine], cf[mine] - frames[qi[mine]]))
    return out


def _agreement(query: np.ndarray, clip: np.ndarray, d: int) -> tuple[int, np.ndarray]:
    """Query frames j whose token equals the clip's frame j + d', for the best d' in d-1..d+1:
    (d', bool [T])."""
    best = (d, np.zeros(len(query), bool))
    best_n = -1
    for dd in (d, d - 1, d + 1):
        a = np.zeros(len(query), bool)
        lo, hi = max(0, -dd), min(len(query), len(clip) - dd)
        if hi > lo:
            a[lo:hi] = query[lo:hi] == clip[lo + dd : hi + dd]
        n = int(a.sum())
        if n > best_n:
            best, best_n = (dd, a), n
    return best


def _best_stretch(agree: np.ndarray, frames: int) -> tuple[float, int, int]:
    """The largest share of True over a stretch of ``frames`` (all of ``agree`` when shorter): (share, start, end)."""
    n = len(agree)
    if n == 0:
        return 0.0, 0, 0
    L = min(frames, n)
    c = np.r_[0, np.cumsum(agree)]
    sums = c[L:] - c[: n - L + 1]
    j = int(sums.argmax())
    return float(sums[j]) / L, j, j + L


def _semantic(q: Query, phases: list[_Diagonals], gids: list[int], meta: dict, samples: dict, rate: float, window: int):
    """The best verified agreement of one source's clips with the query over all phases, or None when none
    of its clips got a vote: (share, phase, first and end query frame of the stretch, anchor clip, its diagonal,
    its votes)."""
    best = None
    for k, p in enumerate(phases):
        voted = [(g, *hit) for g in gids if (hit := p.get(g)) is not None]
        if not voted:
            continue
        anchor, d0, votes = max(voted, key=lambda t: t[2])
        file_diag = round(meta[anchor]["start"] * rate) + d0
        agree = np.zeros(q.semantic.shape[1], bool)
        d_anchor = d0
        for g, d, _ in voted:
            if abs(round(meta[g]["start"] * rate) + d - file_diag) > 2:
                continue  # another place in the same file
            dd, a = _agreement(q.semantic[k], samples[g].semantic.astype(np.int64), d)
            agree |= a
            if g == anchor:
                d_anchor = dd
        score, j0, j1 = _best_stretch(agree, window)
        if best is None or score > best[0]:
            best = (score, k, j0, j1, anchor, d_anchor, votes)
    return best


def _nearest_windows(q: Query, gids: list[int], meta: dict, samples: dict, hop: float) -> tuple[float, float, int]:
    """The nearest pair of CLAP windows between the query and one source's clips: (cosine, source time -
    query time of the pair, its clip); cosine 0 when either has no window."""
    emb = np.asarray(q.clap, np.float32)
    best = (0.0, 0.0, gids[0])
    for g in gids:
        c = np.asarray(samples[g].clap_emb, np.float32)
        if len(c) == 0 or len(emb) == 0:
            continue
        sim = emb @ c.T / (np.linalg.norm(emb, axis=1, keepdims=True) * np.linalg.norm(c, axis=1) + 1e-12)  # [Wq, Wc]
        i, j = np.unravel_index(int(sim.argmax()), sim.shape)
        if sim[i, j] > best[0]:
            best = (float(sim[i, j]), meta[g]["start"] + (j - i) * hop, g)
    return best


def search(index: AuditIndex, q: Query, depth: int = 16, clap_k: int = 8, exclude: np.ndarray | None = None) -> list[Match]:
    """Source files near the query ``q``, strongest first (by semantic share, then CLAP).

    ``depth``: clips verified per phase, those with most votes (at least :data:`MIN_VOTES`). ``clap_k``:
    nearest CLAP windows per query window. ``exclude``: global clip ids left out (calibration leaves out a
    held-out file's clips)."""
    rate = index.rate
    window = max(1, round(index.info.clap_window_seconds * rate))
    hop = index.info.clap_hop_seconds
    phases = _vote(index, q.semantic, exclude)
    wanted: set[int] = set()
    for p in phases:
        top = np.argsort(-p.votes, kind="stable")[:depth]
        wanted.update(int(g) for g in p.gids[top[p.votes[top] >= MIN_VOTES]])
    if len(q.clap):
        rows = index.clap_nearest(q.clap, clap_k)
        gids = index.clips_of_rows(rows)
        if exclude is not None and len(exclude):
            gids = gids[~np.isin(gids, exclude)]
        wanted.update(int(g) for g in gids)
    if not wanted:
        return []
    samples = index.read_clips(wanted)
    meta = {g: index.clip(g) for g in wanted}
    by_source: dict[str, list[int]] = {}
    for g in sorted(wanted):
        by_source.setdefault(meta[g]["source"], []).append(g)

    matches = []
    for source, gids in by_source.items():
        clap, clap_offset, clap_gid = _nearest_windows(q, gids, meta, samples, hop)
        found = _semantic(q, phases, gids, meta, samples, rate, window)
        if found is None:  # found by CLAP alone
            m = meta[clap_gid]
            matches.append(Match(source, m["key"], m["start"], clap_offset, 0.0, 0.0, 0.0, clap, clap_offset, 0, gids))
            continue
        score, k, j0, j1, anchor, d, votes = found
        m = meta[anchor]
        shift = float(q.shifts[k])
        offset = m["start"] + d / rate - shift  # clip frame j + d is query frame j, which starts shift late
        matches.append(Match(source, m["key"], m["start"], offset, j0 / rate + shift, j1 / rate + shift, score, clap, clap_offset, votes, gids))
    matches.sort(key=lambda m: (m.semantic, m.clap), reverse=True)
    return matches
