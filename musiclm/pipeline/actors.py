"""The backbone actors of the tokenize job: each holds a Tokenizer and turns decoded batches into rows.

Layer: pipeline (imports the base layer, shards and pipeline.tokenizer, which holds the models).

:class:`TokenizeActor` turns the decoded segments of a planned batch (a row of
:func:`~musiclm.pipeline.decode_stage.decode_batch`) into packed shard samples or error rows;
:class:`FitActor` extracts the features the quantizers are fitted on. Both answer in columns
(dict of lists) that :func:`output_rows` reads back as rows on the driver. Ray imports this
module by its path in each actor process.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from musiclm.config import tokenize_config_from_dict
from musiclm.shards.format import TokenSample


class _BatchActor:
    def run(self, row: dict[str, Any]) -> dict[str, list]:
        """The output rows of one decoded planned batch (``decode_batch``'s row)."""
        return self({"batch": [row["batch"]], "payload": [row["payload"]]})

    def ready(self) -> bool:
        return True


class TokenizeActor(_BatchActor):
    """Holds the tokenizer; turns the decoded segments of a planned batch into shard samples."""

    def __init__(self, tokenizer_dir: str, threads: int):
        self.tok = _load_tokenizer(tokenizer_dir, None, None, threads)
        self.told = 0  # back-off lines already passed on

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("batch", "rows", "key", "rel", "error", "step", "seconds", "compute", "gpu", "note", "sample")}
        for number, payload in zip(batch["batch"], batch["payload"]):
            segments = pickle.loads(payload)
            good = [s for s in segments if not s["error"]]
            t0 = time.perf_counter()
            results = self.tok.tokenize_batch([s["audio"] for s in good]) if good else []
            compute = time.perf_counter() - t0
            by_key = {s["key"]: r for s, r in zip(good, results)}
            note = "; ".join(self.tok.backoffs[self.told :])
            self.told = len(self.tok.backoffs)
            total = sum(s["seconds"] for s in good) or 1.0
            gpu = _gpu_utilization()
            for s in segments:
                r = by_key.get(s["key"])
                error, step, sample = s["error"], s["step"], b""
                if isinstance(r, Exception):
                    error, step = f"{type(r).__name__}: {r}", "tokenize"
                elif r is not None:
                    meta = {"source": s["rel"], **{k: s[k] for k in ("segment", "segments", "start", "sample_rate", "channels")}, "duration": s["seconds"]}
                    sample = pack_sample(TokenSample(s["key"], r["semantic"], r["acoustic"], r["clap"], r["clap_emb"], meta))
                out["batch"].append(int(number))
                out["rows"].append(len(segments))
                out["key"].append(s["key"])
                out["rel"].append(s["rel"])
                out["error"].append(error)
                out["step"].append(step)
                out["seconds"].append(float(s["seconds"]))
                out["compute"].append(compute * s["seconds"] / total if r is not None else 0.0)
                out["gpu"].append(gpu)
                out["note"].append(note)
                note = ""
                out["sample"].append(sample)
        return out


class FitActor(_BatchActor):
    """Extracts the features that quantizers are fitted on: CLAP windows of every clip, semantic frames
    (and Encodec latents) of the clips of ``semantic_files``."""

    def __init__(self, cfg_dict: dict, backbone_dir: str, threads: int, max_frames: int, seed: int, semantic_files: list[str]):
        self.tok = _load_tokenizer(None, cfg_dict, backbone_dir, threads)
        self.max_frames = max_frames
        self.seed = seed
        self.semantic_files = frozenset(semantic_files)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"rel": [], "semantic": [], "clap": [], "codec": [], "cpu": []}
        for payload in batch["payload"]:
            cpu = time.process_time()
            for s in pickle.loads(payload):
                if s["error"]:
                    continue
                # seeded per clip so the fitted quantizers do not depend on how clips were batched
                rng = np.random.default_rng([self.seed, int(s["key"][:8], 16)])
                feats = self.tok.fit_features(s["audio"], self.max_frames, rng, frames=s["rel"] in self.semantic_files)
                out["rel"].append(s["rel"])
                for name in ("semantic", "clap", "codec"):
                    f = feats.get(name)
                    out[name].append(b"" if f is None else np.ascontiguousarray(f, dtype=np.float32).tobytes())
                out["cpu"].append(time.process_time() - cpu)  # CPU seconds of this actor process, all its threads
                cpu = time.process_time()
        return out


def _load_tokenizer(tokenizer_dir: str | None, cfg_dict: dict | None, backbone_dir: str | None, threads: int):
    """The saved tokenizer at ``tokenizer_dir``, else one built from ``cfg_dict`` with the backbones saved in
    ``backbone_dir`` (the fit); on the GPU when there is one, with ``threads`` torch threads."""
    import torch

    from musiclm.pipeline.tokenizer import Tokenizer

    torch.set_num_threads(min(threads, os.cpu_count() or 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if tokenizer_dir is not None:
        return Tokenizer.load(tokenizer_dir, device=device)
    return Tokenizer.from_config(tokenize_config_from_dict(cfg_dict), device=device, folders=Path(backbone_dir))


def _gpu_utilization() -> float:
    """The busy percentage of this process's GPU as NVML reports it; -1 where it cannot."""
    import torch

    try:
        return float(torch.cuda.utilization()) if torch.cuda.is_available() else -1.0
    except Exception:  # noqa: BLE001 - pynvml missing or NVML unavailable
        return -1.0


def pack_sample(sample: TokenSample) -> bytes:
    """A sample as one bytes value (its WebDataset members, length-prefixed) for the trip to the driver."""
    parts = [(k, v) for k, v in sample.to_wds().items() if k != "__key__"]
    header = json.dumps([sample.key, [(k, len(v)) for k, v in parts]]).encode()
    return len(header).to_bytes(4, "little") + header + b"".join(v for _, v in parts)


def unpack_sample(data: bytes) -> TokenSample:
    """The sample :func:`pack_sample` packed, on the driver."""
    n = int.from_bytes(data[:4], "little")
    key, sizes = json.loads(data[4 : 4 + n])
    members: dict[str, Any] = {"__key__": key}
    pos = 4 + n
    for name, size in sizes:
        members[name] = data[pos : pos + size]
        pos += size
    return TokenSample.from_wds(members)


def output_rows(output: dict[str, list]) -> Iterator[dict[str, Any]]:
    """The rows of an actor's output columns."""
    names = list(output)
    for values in zip(*output.values()):
        yield dict(zip(names, values))
