"""``musiclm audit`` and ``musiclm generate --audit``: check inputs, bring the index up to date, report.

The memorization audit itself (the index, the search, the calibration) is :mod:`musiclm.audit`.

Layer: commands (imports :mod:`musiclm.audit`, the base layer and, lazily, pipeline and metrics).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from musiclm.audit.calibration import EXCERPTS, MIN_FILES, SIGNALS, calibrate, corpus_root, verdict
from musiclm.audit.index import check_corpus, index_lock, open_index
from musiclm.audit.search import search
from musiclm.errors import UserError


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def check_generated(paths: Sequence[str | Path]) -> list[Path]:
    """Every path is a readable audio file (probed, not decoded), else a one-line UserError."""
    from musiclm.pipeline.audio import AudioError, probe

    out = []
    for p in paths:
        p = Path(p)
        try:
            probe(p)
        except AudioError as e:
            raise UserError(f"cannot audit {p}: {e.reason}") from None
        out.append(p)
    if not out:
        raise UserError("give at least one generated audio file to audit")
    return out


def check_audit_target(data: str | Path, seconds: float) -> None:
    """For ``generate --audit DIR``, before anything is generated: ``DIR`` is a tokenized corpus and
    ``seconds`` of audio are enough for its tokenizer."""
    from musiclm.shards.tokenizer_folder import read_record

    check_corpus(data, option="--audit")
    least = float(read_record(data)["config"]["audio"]["min_seconds"])
    if seconds < least:
        raise UserError(f"--audit needs at least {least:g} s of audio (the corpus's tokenizer takes no less); generate --seconds {least:g} or more")


def _load_audio(path: Path, rates: Sequence[int], min_seconds: float) -> dict[int, Any]:
    from musiclm.pipeline.audio import AudioError, load_for_rates

    try:
        audio = load_for_rates(path, 0.0, None, rates)
    except AudioError as e:
        raise UserError(f"cannot audit {path}: {e.reason}") from None
    seconds = len(audio[rates[0]]) / rates[0]
    if seconds < min_seconds:
        raise UserError(f"cannot audit {path}: {seconds:.2f} s is shorter than the {min_seconds:g} s the corpus's tokenizer takes")
    return audio


def prepare(data: str | Path, device: str | None = None, say: Callable[[str], None] = _stderr):
    """The corpus's tokenizer and its audit index, built, extended and calibrated as needed: (tokenizer, index)."""
    from musiclm.metrics import eval_device
    from musiclm.pipeline.tokenizer import Tokenizer

    data, _, _ = check_corpus(data)
    dev = eval_device(device)
    tokenizer = Tokenizer.load(data / "tokenizer", device=str(dev))
    with index_lock(data):
        t0 = time.perf_counter()

        def indexed(name: str, done: int, total: int) -> None:
            if done == total or done % 100 == 0:
                say(f"audit index: {done} of {total} new shards indexed ({time.perf_counter() - t0:.1f} s)")

        index = open_index(data, progress=indexed)
        if index.calibration is None:
            files = len({s for sh in index.shards for s in sh.table["source"]})
            if files < MIN_FILES:
                raise UserError(f"--data {data} holds {files} files: calibrating the audit needs at least {MIN_FILES} (excerpts of some are scored against the others)")
            root = corpus_root(data)
            say(f"audit index: calibrating on excerpts of {min(files, EXCERPTS)} files ({'corpus audio ' + str(root) if root else 'stored tokens: the corpus audio is not found'})")
            t1 = time.perf_counter()
            index.save_calibration(calibrate(index, tokenizer, root))
            say(f"audit index: calibrated in {time.perf_counter() - t1:.1f} s")
    return tokenizer, index


def _strength(cal: dict[str, Any], m) -> float:
    used = [s for s in SIGNALS if cal[s]["used"]] or ["semantic"]
    return max(getattr(m, s) / max(cal[s]["threshold"], 1e-9) for s in used)


def audit(generated: Sequence[str | Path], data: str | Path, top: int = 5, device: str | None = None, say: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Audit generated audio files against the tokenized corpus ``data``; returns the report (the ``--json`` shape).

    Inputs are checked before anything is loaded or built."""
    from musiclm.audit.tokens import query_from_audio

    paths = check_generated(generated)
    check_corpus(data)
    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    tokenizer, index = prepare(data, device, say)
    cal = index.calibration
    files = []
    for path in paths:
        audio = _load_audio(path, tokenizer.sample_rates, tokenizer.cfg.audio.min_seconds)
        q = query_from_audio(tokenizer, audio)
        t0 = time.perf_counter()
        matches = search(index, q, depth=max(16, top))
        search_s = time.perf_counter() - t0
        matches.sort(key=lambda m: _strength(cal, m), reverse=True)
        rows = [{**m.to_json(), "flagged": bool(by), "flagged_by": by} for m in matches[:top] for by in [verdict(cal, m.semantic, m.clap)]]
        by = sorted({s for m in matches for s in verdict(cal, m.semantic, m.clap)}, key=SIGNALS.index)
        files.append(
            {
                "file": str(path),
                "seconds": round(q.seconds, 3),
                "flagged": bool(by),
                "flagged_by": by,
                "semantic": round(max((m.semantic for m in matches), default=0.0), 4),
                "clap": round(max((m.clap for m in matches), default=0.0), 4),
                "search_seconds": round(search_s, 4),
                "matches": rows,
            }
        )
    return {
        "data": str(Path(data)),
        "index": {
            "clips": index.clips,
            "shards": len(index.shards),
            "built": len(index.built),
            "reused": len(index.reused),
            "removed": len(index.removed),
            "entries": index.entries,
            "bytes": index.bytes_on_disk(),
        },
        "calibration": {k: cal[k] for k in ("from", "lossy", "excerpts", "excerpt_seconds", "offsets_right")}
        | {s: {k: cal[s][k] for k in ("threshold", "how", "used", "recall", "novel_max", "copied_p10")} for s in SIGNALS},
        "files": files,
    }


def _fmt_signal(cal: dict[str, Any], s: str) -> str:
    c = cal[s]
    name = "CLAP" if s == "clap" else s
    if not c["used"]:
        return f"{name} {c['threshold']:.3f} (not used: only {c['recall']:.0%} of copies reach it)"
    return f"{name} {c['threshold']:.3f} (catches {c['recall']:.0%} of copies)"


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report as text, one line per item."""
    cal, idx = report["calibration"], report["index"]
    state = f"index built ({idx['built']} shards)" if idx["reused"] == 0 else f"index reused ({idx['reused']} shards" + (f", {idx['built']} new" if idx["built"] else "") + ")"
    lines = [
        f"audit against {report['data']}: {idx['clips']} clips in {idx['shards']} shards; {state}",
        f"thresholds (calibrated on {cal['excerpts']} excerpts of the corpus's {cal['from']}): " + "; ".join(_fmt_signal(cal, s) for s in SIGNALS),
    ]
    for f in report["files"]:
        head = f"FLAGGED by {' and '.join(f['flagged_by'])}" if f["flagged"] else "not flagged"
        lines.append(f"{f['file']} ({f['seconds']:.1f} s): {head}; best semantic {f['semantic']:.3f}, CLAP {f['clap']:.3f}")
        for i, m in enumerate(f["matches"], 1):
            mark = "  <- flagged" if m["flagged_by"] else ""
            g0, g1 = m["generated"]
            s0, s1 = m["source_span"]
            lines.append(
                f"  {i}. {m['source']} at {m['offset']:+.2f} s: semantic {m['semantic']:.3f}, CLAP {m['clap']:.3f}; "
                f"generated {g0:.2f}-{g1:.2f} s = source {s0:.2f}-{s1:.2f} s{mark}"
            )
    n = sum(f["flagged"] for f in report["files"])
    lines.append(f"{n} of {len(report['files'])} files flagged" if n else f"none of {len(report['files'])} files flagged")
    return lines


def run_audit(generated: Sequence[str | Path], data: str | Path, top: int = 5, as_json: bool = False, device: str | None = None) -> list[bool]:
    """``musiclm audit``: print the report (text, or JSON with ``--json``); returns whether each file is flagged."""
    report = audit(generated, data, top=top, device=device)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for line in report_lines(report):
            print(line)
    return [f["flagged"] for f in report["files"]]
