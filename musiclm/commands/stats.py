"""``musiclm stats``: the summary of a tokenized corpus, as rich tables, JSON or a matplotlib plot.

Everything shown is reduced from the corpus's Parquet statistics by
:func:`musiclm.shards.stats.read_corpus_stats` (never from the shards); this module only describes,
prints and plots it.

Layer: commands (imports the shards layer and the base layer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from musiclm.errors import UserError
from musiclm.shards.stats import STREAMS, CorpusStats, level_summary, read_corpus_stats

HISTOGRAM_BINS = 20


def _describe(stats: CorpusStats) -> dict[str, Any]:
    clips = stats.clips
    durations = clips.durations
    totals = {
        "clips": clips.clips,
        "files": clips.files,
        "hours": float(durations.sum() / 3600.0),
        "shards": clips.shards,
        "failed_files": stats.errors.files,
        "failed_by_step": stats.errors.by_step,
        "errors_dir": str(stats.data_dir / "errors"),
    }
    if len(durations):
        hist, edges = np.histogram(durations, bins=HISTOGRAM_BINS)
        duration = {
            "min": float(durations.min()),
            "mean": float(durations.mean()),
            "median": float(np.median(durations)),
            "max": float(durations.max()),
            "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in hist]},
        }
    else:
        duration = {"min": None, "mean": None, "median": None, "max": None, "histogram": {"edges": [], "counts": []}}
    streams = {}
    for stream in STREAMS:
        k = stats.info.stream(stream).codebook_size
        streams[stream] = {
            "clip_unique_mean": clips.means[f"{stream}_unique"],
            "clip_entropy_bits_mean": clips.means[f"{stream}_entropy_bits"],
            "levels": [{"level": lv, **level_summary(c, k)} for lv, c in enumerate(stats.counts[stream])],
        }
    return {
        "data_dir": str(stats.data_dir),
        "tokenizer": stats.info.fingerprint,
        "totals": totals,
        "durations": duration,
        "streams": streams,
        "fit": stats.info.raw.get("fit"),  # how well the quantizers fit (tokenizer.json); None for a reused tokenizer record without one
    }


def summarize(data_dir: Path) -> dict[str, Any]:
    """A JSON-serialisable summary of a tokenized corpus, read only from its Parquet statistics.

    Returns ``{"data_dir", "tokenizer", "totals", "durations", "streams"}``:

    - ``totals``: clips, files (distinct sources), hours, shards, failed_files
      (distinct sources in ``errors/``), failed_by_step, errors_dir;
    - ``durations``: min, mean, median, max seconds and ``histogram`` {edges, counts};
    - ``streams[s]``: clip_unique_mean, clip_entropy_bits_mean, and ``levels``, a
      list with one dict per level: level, codebook_size, tokens, codes_used,
      utilisation_pct (100 * used / codebook_size), entropy_nats, entropy_bits,
      perplexity (exp of entropy_nats) of the level's code distribution over the
      corpus (None without tokens), and ``top``: the 5 most frequent codes as
      {code, count, share}.

    Raises :class:`UserError` if ``data_dir`` is not a tokenized corpus folder.
    """
    return _describe(read_corpus_stats(data_dir))


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _print_tables(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t, d = summary["totals"], summary["durations"]
    console.print(f"[bold]{summary['data_dir']}[/bold]  tokenizer {summary['tokenizer']}")
    overview = Table(show_header=False, box=None, padding=(0, 2))
    overview.add_column(style="bold", no_wrap=True)
    overview.add_column(overflow="fold")
    overview.add_row("clips", f"{t['clips']}  from {t['files']} files in {t['shards']} shards, {t['hours']:.2f} hours")
    seconds = " / ".join(_fmt(d[k], ".2f") for k in ("min", "mean", "median", "max"))
    overview.add_row("clip seconds", f"{seconds}  (min / mean / median / max)")
    overview.add_row("failed files", str(t["failed_files"]))
    if t["failed_files"]:
        overview.add_row("listed in", t["errors_dir"])
    console.print(overview)

    usage = Table(title="codebook usage over the corpus")
    usage.add_column("stream")
    for col in ("level", "size", "used", "util %", "perplexity", "bits"):
        usage.add_column(col, justify="right")
    usage.add_column("top codes: share %")
    for stream, s in summary["streams"].items():
        for lv in s["levels"]:
            usage.add_row(
                stream,
                str(lv["level"]),
                str(lv["codebook_size"]),
                str(lv["codes_used"]),
                f"{lv['utilisation_pct']:.1f}",
                _fmt(lv["perplexity"], ".1f"),
                _fmt(lv["entropy_bits"], ".2f"),
                " ".join(f"{c['code']}:{100 * c['share']:.1f}" for c in lv["top"]),
            )
    console.print(usage)
    if summary.get("fit"):
        _print_fit(console, summary["fit"])


def _print_fit(console, fit: dict[str, Any]) -> None:
    """The quantizer fit: sample sizes, points per code, CLAP relative reconstruction error per level."""
    from rich.table import Table

    points = ", ".join(f"{name} {p['points']:,} points ({p['points_per_code']:.1f} per code)" for name, p in fit["points"].items())
    console.print(
        f"quantizers fitted on {fit['files']} files ({fit['seconds'] / 3600:.2f} h; {fit['heldout_files']} held out, "
        f"CLAP windows every {fit['clap_hop_seconds']:g} s): {points}"
    )
    errors = fit["clap_relative_error"]
    names = {"fit_audio": "fit audio", "heldout_audio": "held-out audio", "text": f"text ({fit['text_prompts']} descriptions)"}
    table = Table(title="CLAP quantizer: relative reconstruction error |x - x_hat|^2 / |x|^2 after each level")
    table.add_column("embeddings")
    for lv in range(len(errors["fit_audio"])):
        table.add_column(f"L{lv}", justify="right")
    for key, label in names.items():
        if key in errors:
            table.add_row(label, *(f"{e:.3f}" for e in errors[key]))
    console.print(table)


def _plot(stats: CorpusStats, summary: dict[str, Any], path: Path) -> None:
    """PNG: sorted code-frequency curves per level for each stream, and the clip duration histogram."""
    # a bare Figure renders PNG through Agg and leaves pyplot's global backend alone
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2)
    for ax, stream in zip(axes.flat, STREAMS):
        for lv, counts in enumerate(stats.counts[stream]):
            total = counts.sum()
            if total == 0:
                continue
            share = np.sort(counts)[::-1] / total
            share = share[share > 0]
            util = summary["streams"][stream]["levels"][lv]
            ax.plot(np.arange(1, len(share) + 1), share, label=f"L{lv}: {util['utilisation_pct']:.0f}% used, ppl {util['perplexity']:.0f}")
        ax.set_xlim(0, stats.info.stream(stream).codebook_size + 1)  # the unused tail of the codebook shows as empty
        ax.set_yscale("log")
        ax.set_title(f"{stream} (codebook {stats.info.stream(stream).codebook_size})")
        ax.set_xlabel("code rank")
        ax.set_ylabel("share of tokens")
        if ax.lines:
            ax.legend(fontsize=7)
    ax = axes.flat[3]
    hist = summary["durations"]["histogram"]
    if hist["counts"]:
        edges = np.asarray(hist["edges"])
        ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge")
    ax.set_title(f"clip durations ({summary['totals']['clips']} clips, {summary['totals']['hours']:.2f} h)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("clips")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as e:
        raise UserError(f"cannot write the plot to {path} ({e.strerror or e}): pick a writable path") from None


def run_stats(data_dir: Path, as_json: bool = False, plot: Path | None = None) -> None:
    """``musiclm stats``: print the :func:`summarize` dict as rich tables (or JSON), optionally write a PNG."""
    if plot is not None and (Path(plot).is_dir() or not Path(plot).parent.is_dir()):
        raise UserError(f"cannot write the plot to {plot}: give a file name in an existing folder")
    stats = read_corpus_stats(Path(data_dir))
    summary = _describe(stats)
    if plot is not None:
        _plot(stats, summary, Path(plot))
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_tables(summary)
        if plot is not None:
            print(f"plot written to {plot}")
