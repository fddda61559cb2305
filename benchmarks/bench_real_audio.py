"""Does our reader take real music files? Every audio file under the folders: probed and decoded whole by
:mod:`musiclm.pipeline.audio`, its duration set against sox and ffmpeg, the files we refuse with our reasons,
and how fast we decode.

For each file:

- ours: :func:`~musiclm.pipeline.audio.probe` (seconds that decode; the header's seconds when it promised
  more) then :func:`~musiclm.pipeline.audio.read_mono` of the whole file; decode speed is audio seconds per
  wall second of the two together, on one thread;
- ``sox --i -D``: the duration sox reads from the header;
- sox decoded: ``sox FILE -n stat`` decodes the whole file; "whole" when it exits 0 without a WARN or FAIL line;
- ffprobe: the container's duration; ffmpeg decoded: ``ffmpeg -v error -i FILE -f s16le -ac 1 -`` counted,
  "whole" when it exits 0 and prints no error.

The table lists the files whose durations disagree by more than a frame of 50 Hz (20 ms) and every refused
file; the summary per folder counts files, hours, refusals, refusals of files sox decodes whole (the goal:
none), and the decode speed.

    python benchmarks/bench_real_audio.py /tmp/realmusic/pkgs/*
    python benchmarks/bench_real_audio.py --musiclm /tmp/base DIR...   # another checkout's reader (before/after)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLACK = 0.02  # seconds: a 50 Hz frame; differences below it are not listed


@dataclass
class Row:
    folder: str
    file: str
    ours: float | None = None  # seconds that decode, by probe; None when refused
    header: float | None = None  # what the header promised, when probe found more than decodes
    read: float | None = None  # seconds read_mono returned for the whole file
    refused: str = ""
    decode_s: float = 0.0  # wall seconds of probe + read_mono
    sox_header: float | None = None
    sox_decoded: float | None = None
    sox_whole: bool = False
    ffprobe: float | None = None
    ffmpeg_decoded: float | None = None
    ffmpeg_whole: bool = False


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=600, **kw)


def sox_facts(path: Path) -> tuple[float | None, float | None, bool]:
    """(header seconds by ``sox --i -D``, decoded seconds by ``sox -n stat``, whether sox decoded it without a warning)."""
    if not shutil.which("sox"):
        return None, None, False
    head = _run(["sox", "--i", "-D", str(path)], text=True)
    header = float(head.stdout) if head.returncode == 0 and head.stdout.strip() else None
    stat = _run(["sox", str(path), "-n", "stat"], text=True)
    length = re.search(r"Length \(seconds\):\s*([\d.]+)", stat.stderr)
    complaints = [line for line in stat.stderr.splitlines() if re.match(r"sox (WARN|FAIL)", line)]
    return header, float(length.group(1)) if length else None, stat.returncode == 0 and length is not None and not complaints


def ffmpeg_facts(path: Path) -> tuple[float | None, float | None, bool]:
    """(container seconds by ffprobe, decoded seconds counted from ffmpeg's PCM, whether ffmpeg decoded it without an error)."""
    if not (shutil.which("ffprobe") and shutil.which("ffmpeg")):
        return None, None, False
    probe = _run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=sample_rate:format=duration", "-of", "json", str(path)], text=True)
    try:
        facts = json.loads(probe.stdout)
        rate = int(facts["streams"][0]["sample_rate"])
        duration = float(facts["format"]["duration"])
    except (ValueError, KeyError, IndexError):
        return None, None, False
    pcm = _run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "s16le", "-ac", "1", "-ar", str(rate), "-"])
    return duration, len(pcm.stdout) / 2 / rate, pcm.returncode == 0 and not pcm.stderr.strip()


def ours(path: Path, row: Row) -> None:
    from musiclm.pipeline.audio import AudioError, probe, read_mono

    start = time.perf_counter()
    try:
        info = probe(path)
        x, sr = read_mono(path)
    except AudioError as e:
        row.refused = e.reason
        return
    finally:
        row.decode_s = time.perf_counter() - start
    row.ours = info.duration
    header = getattr(info, "header_frames", None)  # absent from the reader before it knew of such files
    row.header = header / info.sample_rate if header else None
    row.read = len(x) / sr


def measure(folders: list[Path]) -> list[Row]:
    from musiclm.pipeline.audio import list_audio_files

    rows = []
    for folder in folders:
        for path in list_audio_files(folder):
            row = Row(folder.name, path.relative_to(folder).as_posix())
            ours(path, row)
            row.sox_header, row.sox_decoded, row.sox_whole = sox_facts(path)
            row.ffprobe, row.ffmpeg_decoded, row.ffmpeg_whole = ffmpeg_facts(path)
            rows.append(row)
            print(f"  {row.folder}/{row.file}: {'refused: ' + row.refused if row.refused else f'{row.ours:.3f} s'}", file=sys.stderr)
    return rows


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _differs(r: Row) -> bool:
    mine = r.ours
    return any(mine is None or (other is not None and abs(mine - other) > SLACK) for other in (r.sox_decoded, r.ffmpeg_decoded))


def report(rows: list[Row]) -> str:
    lines = ["| folder | files | hours | refused | refused, sox decodes whole | header promised more | our decode, audio-s/s |", "|---|---|---|---|---|---|---|"]
    for folder in dict.fromkeys(r.folder for r in rows):
        mine = [r for r in rows if r.folder == folder]
        seconds = sum((r.sox_decoded or r.ours or 0.0) for r in mine)
        decoded = sum(r.read or 0.0 for r in mine)
        spent = sum(r.decode_s for r in mine if not r.refused)
        lines.append(
            f"| {folder} | {len(mine)} | {seconds / 3600:.2f} | {sum(bool(r.refused) for r in mine)} | "
            f"{sum(bool(r.refused) and r.sox_whole for r in mine)} | {sum(r.header is not None for r in mine)} | {decoded / spent if spent else 0:.0f} |"
        )
    seconds = sum((r.sox_decoded or r.ours or 0.0) for r in rows)
    spent = sum(r.decode_s for r in rows if not r.refused)
    lines.append(
        f"| all | {len(rows)} | {seconds / 3600:.2f} | {sum(bool(r.refused) for r in rows)} | {sum(bool(r.refused) and r.sox_whole for r in rows)} | "
        f"{sum(r.header is not None for r in rows)} | {sum(r.read or 0.0 for r in rows) / spent if spent else 0:.0f} |"
    )
    odd = [r for r in rows if r.refused or r.header is not None or _differs(r)]
    if odd:
        lines += ["", f"Refused, header longer than the stream, or more than {SLACK * 1000:.0f} ms from sox or ffmpeg (seconds):", "",
                  "| file | ours (probe / read) | header | sox -D | sox decoded | ffprobe | ffmpeg decoded | refused |", "|---|---|---|---|---|---|---|---|"]
        for r in odd:
            sox = f"{_s(r.sox_decoded)}{'' if r.sox_whole else ' (not whole)'}"
            ff = f"{_s(r.ffmpeg_decoded)}{'' if r.ffmpeg_whole else ' (not whole)'}"
            lines.append(f"| {r.folder}/{r.file} | {_s(r.ours)} / {_s(r.read)} | {_s(r.header)} | {_s(r.sox_header)} | {sox} | {_s(r.ffprobe)} | {ff} | {r.refused} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders of audio files (one row of the summary each)")
    parser.add_argument("--musiclm", type=Path, default=ROOT, help="the checkout whose reader is measured (default: this one)")
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args()
    sys.path.insert(0, str(args.musiclm.resolve()))
    import musiclm.pipeline.audio as audio

    print(f"reader: {audio.__file__}", file=sys.stderr)
    rows = measure(args.folders)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print(report(rows))


if __name__ == "__main__":
    main()
