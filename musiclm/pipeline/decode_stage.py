"""The decode stage of the tokenize job: a planned batch decoded, segmented and resampled, as a Ray task.

Layer: pipeline (imports the base layer, shards and the lower pipeline modules audio, batch_plan,
batch_runner, ray_runtime).

One CPU task per planned batch (:func:`decode_batch`) reads its files, cuts each into the
segments of :func:`~musiclm.pipeline.audio.plan_segments` and resamples them to every rate the
backbones need; a file or segment that fails becomes an error row, never a failed run.
:func:`in_plan_order` feeds these tasks into an actor pool and hands the outputs back in plan
order (:mod:`musiclm.pipeline.batch_runner`).

Ray workers import this module by its path to run :func:`decode_batch`, and inherit the
environment: ``MUSICLM_TEST_DECODE_FAULT`` (:data:`TEST_FAULT_ENV`) lets the scheduling tests
slow or hang a batch.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np

from musiclm.config import TokenizeConfig
from musiclm.pipeline.audio import load_for_rates, plan_segments, probe
from musiclm.pipeline.batch_plan import failure_reason
from musiclm.pipeline.batch_runner import InPlanOrder
from musiclm.pipeline.ray_runtime import Resources
from musiclm.shards.format import file_key, sample_key


TEST_FAULT_ENV = "MUSICLM_TEST_DECODE_FAULT"


def decode_batch(row: dict[str, Any], *, corpus: str, rates: tuple[int, ...], segment_seconds: float, done: frozenset) -> dict[str, Any]:
    """One planned batch → one row: its number and its segments still to do, pickled.

    A segment is a dict of the meta data of a shard sample, ``error``/``step`` (empty when it
    decoded) and ``audio``, {sample rate: float32 samples}."""
    _test_fault(row)
    segments: list[dict[str, Any]] = []
    for rel, seconds in json.loads(row["files"]):
        path = Path(corpus) / rel
        try:
            info = probe(path)
            spans = plan_segments(seconds, segment_seconds)
        except Exception as e:  # noqa: BLE001 - any failure is recorded, never fatal for the run
            segments.append(_error_row(file_key(rel), rel, "decode", failure_reason(e), seconds))
            continue
        for i, (start, length) in enumerate(spans):
            key = sample_key(rel, i)
            if key in done:
                continue
            try:
                audio = load_for_rates(path, start, length, rates)
            except Exception as e:  # noqa: BLE001
                segments.append(_error_row(key, rel, "decode", failure_reason(e), length))
                continue
            meta = dict(segment=i, segments=len(spans), start=float(start), seconds=float(length), sample_rate=int(info.sample_rate), channels=int(info.channels))
            segments.append({"key": key, "rel": rel, **meta, "error": "", "step": "", "audio": {sr: np.ascontiguousarray(audio[sr], dtype=np.float32) for sr in rates}})
    return {"batch": int(row["batch"]), "payload": pickle.dumps(segments, protocol=5)}


def _error_row(key: str, rel: str, step: str, reason: str, seconds: float = 0.0) -> dict[str, Any]:
    """A failed file or segment; ``seconds`` is its planned audio (for the progress line)."""
    return {"key": key, "rel": rel, "segment": -1, "segments": 0, "start": 0.0, "seconds": float(seconds), "sample_rate": 0, "channels": 0, "error": reason, "step": step}


def _test_fault(row: dict[str, Any]) -> None:
    """For the tests of scheduling only: ``MUSICLM_TEST_DECODE_FAULT`` (JSON, in the environment the Ray workers
    inherit) delays decode tasks, ``{"delay": S}`` up to S seconds at random, ``{"first": S}`` the first
    batch S seconds, or never lets one return, ``{"hang": "rel"}`` (the batch holding that file)."""
    spec = os.environ.get(TEST_FAULT_ENV)
    if not spec:
        return
    fault = json.loads(spec)
    files = [rel for rel, _ in json.loads(row["files"])]
    if fault.get("hang") in files:
        while True:
            time.sleep(60)
    if fault.get("first") and row["index"] == 0:
        time.sleep(float(fault["first"]))
    if fault.get("delay"):
        time.sleep(float(np.random.default_rng().uniform(0, float(fault["delay"]))))


def in_plan_order(ray, actor: type, kwargs: dict[str, Any], res: Resources, batches: dict[int, list[tuple[str, float]]], corpus: Path, tcfg: TokenizeConfig,
                   rates: tuple[int, ...], done: frozenset, stall_seconds: float) -> InPlanOrder:
    """The planned ``batches`` decoded (``decode_batch``) and run through a pool of ``actor``, out in plan order
    (:mod:`musiclm.pipeline.batch_runner`). A crashed actor fails the run loudly (rerunning resumes it)."""
    items = [{"batch": b, "files": json.dumps(members)} for b, members in sorted(batches.items())]
    decode_kwargs = dict(corpus=str(corpus), rates=rates, segment_seconds=tcfg.audio.segment_seconds, done=done)
    return InPlanOrder(ray, decode_batch, decode_kwargs, actor, kwargs, res, items, stall_seconds)
