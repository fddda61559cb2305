"""The on-disk token format: what a shard sample holds and what the tokens mean.

A tokenized corpus folder ``DIR`` holds::

    DIR/tokenizer/tokenizer.json   what the tokens mean (read by TokenInfo)
    DIR/shards/shard-000000.tar    WebDataset: one sample per clip
    DIR/stats/shard-000000.parquet one row per clip of that shard
    DIR/stats/_codes/shard-000000.parquet  per-code counts (stream, level, code, count)
    DIR/errors/shard-000000.parquet  files that failed while that shard was filled

A sample's members (``KEY.<member>`` in the tar):

=================  =========  ==========  =========================================
member             dtype      shape       meaning
=================  =========  ==========  =========================================
``semantic.npy``   uint16     [T_s]       semantic-model layer features, k-means codes
``acoustic.npy``   uint16     [Q, T_a]    codec RVQ codes (Encodec or DAC), level-major
``clap.npy``       uint16     [W, L]      CLAP window embeddings, residual codes
``clap_emb.npy``   float16    [W, D]      CLAP window embeddings (normalised)
``json``           utf-8      {}          source, start, duration, sample_rate, channels, segment
=================  =========  ==========  =========================================

Keys are a stable hash of the file's path relative to the corpus root plus the
segment index, so a rerun produces the same keys and resume can skip them.

Layer: shards.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from musiclm.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
ARRAY_MEMBERS = ("semantic", "acoustic", "clap", "clap_emb")
SHARD_PATTERN = "shard-{index:06d}"


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index=index)


def sample_key(relpath: str, segment: int) -> str:
    """Stable key for segment ``segment`` of the file at ``relpath`` (POSIX, relative to the corpus root).

    WebDataset splits member names at the first dot, so keys hold none.
    """
    digest = hashlib.sha1(relpath.encode("utf-8")).hexdigest()[:20]
    return f"{digest}_{segment:04d}"


def file_key(relpath: str) -> str:
    """The key prefix shared by all segments of one file."""
    return sample_key(relpath, 0).rsplit("_", 1)[0]


@dataclass
class TokenSample:
    """One clip's tokens, as stored in a shard."""

    key: str
    semantic: np.ndarray  # [T_s] uint16
    acoustic: np.ndarray  # [Q, T_a] uint16
    clap: np.ndarray  # [W, L] uint16
    clap_emb: np.ndarray  # [W, D] float16
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return float(self.meta.get("duration", 0.0))

    def to_wds(self) -> dict[str, Any]:
        """The sample as a WebDataset dict (member name -> bytes)."""
        out: dict[str, Any] = {"__key__": self.key}
        for name in ARRAY_MEMBERS:
            out[f"{name}.npy"] = _npy_bytes(getattr(self, name))
        out["json"] = json.dumps(self.meta, sort_keys=True).encode("utf-8")
        return out

    @classmethod
    def from_wds(cls, sample: dict[str, Any]) -> TokenSample:
        """Inverse of :meth:`to_wds`; members may be raw bytes or already decoded by webdataset."""

        def arr(name: str) -> np.ndarray:
            value = sample[f"{name}.npy"]
            return value if isinstance(value, np.ndarray) else np.load(io.BytesIO(value), allow_pickle=False)

        meta = sample["json"]
        if isinstance(meta, (bytes, bytearray)):
            meta = json.loads(meta)
        return cls(sample["__key__"], arr("semantic"), arr("acoustic"), arr("clap"), arr("clap_emb"), dict(meta))


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class StreamInfo:
    """One token stream: ``levels`` codebooks of ``codebook_size`` codes at ``frame_rate`` frames/s."""

    name: str
    levels: int
    codebook_size: int
    frame_rate: Fraction | None  # None for clap: one row per window, not per frame


@dataclass(frozen=True)
class TokenInfo:
    """What the tokens of one tokenizer mean; read from ``tokenizer/tokenizer.json``.

    Training and generation learn everything about tokens from here and never
    import a backbone to do so.
    """

    fingerprint: str
    semantic: StreamInfo
    acoustic: StreamInfo
    clap: StreamInfo
    coarse_levels: int
    clap_window_seconds: float
    clap_hop_seconds: float
    clap_embed_dim: int
    codec_sample_rate: int
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def stream(self, name: str) -> StreamInfo:
        return {"semantic": self.semantic, "acoustic": self.acoustic, "clap": self.clap}[name]

    @property
    def frame_rates(self) -> tuple[Fraction, ...]:
        """The frame rates of the framed streams (semantic, acoustic): what stage windows must be whole in."""
        return tuple(s.frame_rate for s in (self.semantic, self.acoustic) if s.frame_rate)

    def clap_window_for(self, start: float, seconds: float, n_windows: int) -> int:
        """Index of the CLAP window whose centre is nearest the centre of ``[start, start + seconds)``."""
        centre = start + seconds / 2
        first_centre = self.clap_window_seconds / 2
        idx = round((centre - first_centre) / self.clap_hop_seconds) if self.clap_hop_seconds > 0 else 0
        return int(min(max(idx, 0), n_windows - 1))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenInfo:
        s = data["streams"]

        def stream(name: str) -> StreamInfo:
            d = s[name]
            rate = Fraction(d["frame_rate"]).limit_denominator(10_000) if d.get("frame_rate") else None
            return StreamInfo(name, int(d["levels"]), int(d["codebook_size"]), rate)

        return cls(
            fingerprint=data["fingerprint"],
            semantic=stream("semantic"),
            acoustic=stream("acoustic"),
            clap=stream("clap"),
            coarse_levels=int(s["acoustic"]["coarse_levels"]),
            clap_window_seconds=float(s["clap"]["window_seconds"]),
            clap_hop_seconds=float(s["clap"]["hop_seconds"]),
            clap_embed_dim=int(s["clap"]["embed_dim"]),
            codec_sample_rate=int(s["acoustic"]["sample_rate"]),
            raw=data,
        )

    @classmethod
    def load(cls, path: str | Path) -> TokenInfo:
        """From a tokenized corpus folder, its ``tokenizer/`` folder, or the json file itself."""
        path = Path(path)
        for candidate in (path, path / TOKENIZER_FILE, path / "tokenizer" / TOKENIZER_FILE):
            if candidate.is_file():
                try:
                    return cls.from_json(json.loads(candidate.read_text()))
                except (ValueError, KeyError) as e:
                    raise UserError(f"{candidate} is not a musiclm tokenizer file ({e}); re-run musiclm tokenize") from None
        raise UserError(f"no tokenizer found at {path}: expected {path / 'tokenizer' / TOKENIZER_FILE}; run musiclm tokenize first")


def list_shards(data_dir: str | Path) -> list[Path]:
    """Finished shards of a tokenized corpus folder, in order (temporary files excluded)."""
    return sorted((Path(data_dir) / "shards").glob("shard-*.tar"))
