"""The fit job: the quantizers fitted on a sample of the corpus, before it is tokenized without ``--tokenizer``.

Layer: pipeline (imports the base layer, models and the lower pipeline modules).

::

    probe the corpus, choose the sample (:mod:`musiclm.pipeline.fit_plan`; a corpus too small is refused here)
      → its files in planned batches, decoded (:mod:`musiclm.pipeline.decode_stage`)
      → FitActor pool (:mod:`musiclm.pipeline.actors`): CLAP windows, semantic frames, Encodec latents
      → k-means on the driver (faiss) → tokenizer/ with its fit report

Features reach the driver in plan order and every clip draws its frames with its own seed, so the
fitted quantizers do not depend on how many actors ran or which was first.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from musiclm import atomic
from musiclm.config import TokenizeConfig, to_dict
from musiclm.errors import UserError
from musiclm.pipeline.actors import FitActor, output_rows
from musiclm.pipeline.audio import AudioError, plan_segments, probe
from musiclm.pipeline.batch_plan import plan_batches, quiet_stderr
from musiclm.pipeline.batch_runner import ActorLost, Stalled
from musiclm.pipeline.decode_stage import in_plan_order
from musiclm.pipeline.progress import FitProgress, stalled_error
from musiclm.pipeline.ray_runtime import Resources

FEATURES = ("semantic", "clap", "codec")


def plan_fit_sample(console, files: list[str], corpus: Path, tcfg: TokenizeConfig):
    """The fit sample of ``files`` (a :class:`~musiclm.pipeline.fit_plan.FitPlan`), from their probed durations.
    Refused in one line, before any backbone runs: backbone settings that do not fit the config, and a corpus
    too small for the vocabularies (the semantic floor too when its frame rate is known from the backbone's config;
    else once it has loaded, in :func:`fit_tokenizer`)."""
    from musiclm.pipeline.fit_plan import backbone_facts, check_backbones, check_enough, needs_line, plan_fit

    facts = backbone_facts(tcfg)
    check_backbones(tcfg, facts)

    def duration(rel: str) -> float | None:
        try:
            with quiet_stderr():
                return probe(corpus / rel).duration
        except AudioError:
            return None

    plan = plan_fit(files, duration, tcfg)
    if not plan.files:
        raise UserError(f"no decodable audio of at least {tcfg.audio.min_seconds:g} s under {corpus} to fit the tokenizer on")
    console.print(needs_line(tcfg, plan))
    check_enough(tcfg, plan, facts.semantic_frame_rate)
    return plan


def fit_tokenizer(ray, console, plan, corpus: Path, out: Path, tcfg: TokenizeConfig, res: Resources, stall_seconds: float) -> None:
    """Fit the quantizers on the files of ``plan`` (a :class:`~musiclm.pipeline.fit_plan.FitPlan`) and save the
    tokenizer to ``out/tokenizer``, with a fit report (points per code, CLAP's relative error, time taken)."""
    from musiclm.pipeline.fit_plan import check_enough
    from musiclm.pipeline.tokenizer import Tokenizer

    staging = atomic.fresh_staging(out / "tokenizer")
    tok = Tokenizer.from_config(tcfg)
    check_enough(tcfg, plan, semantic_rate=tok.semantic.frame_rate)
    tok.save_backbones(staging)  # random backbones: every actor loads these exact weights
    t0 = time.time()
    feats, cpu_seconds = _extract_features(ray, console, plan, corpus, out, tcfg, tok, staging, res, stall_seconds)
    extract = time.time() - t0
    t0, cpu0 = time.time(), time.process_time()
    counts = _fit_quantizers(tok, feats, tcfg)
    kmeans = time.time() - t0
    kmeans_cores = (time.process_time() - cpu0) / max(kmeans, 1e-9)  # faiss runs k-means on every core of the driver
    errors = _clap_errors(tok, feats)
    taken = {"features": (extract, cpu_seconds / max(extract, 1e-9)), "kmeans": (kmeans, kmeans_cores)}
    report = _fit_report(plan, tcfg, feats, counts, errors, taken)
    tok.save(staging, fit_report=report)
    atomic.replace_folder(staging, out / "tokenizer")
    e = errors.get("heldout_audio", errors["fit_audio"])
    n_clap, n_semantic = counts["clap"][0], counts["semantic"][0]
    console.print(
        f"fitted in {extract:.0f} s of features ({report['cores_busy']['features']:.1f} cores busy) + {kmeans:.0f} s of k-means "
        f"({report['cores_busy']['kmeans']:.1f} cores busy): {n_clap:,} CLAP windows ({n_clap / tcfg.clap.codebook_size:.1f} per code), "
        f"{n_semantic:,} semantic frames; CLAP relative error after {len(tok.quantizers['clap_codebooks'])} levels {e[-1]:.3f} (held-out audio), "
        f"{errors['text'][-1]:.3f} (text)"
    )


def _extract_features(ray, console, plan, corpus: Path, out: Path, tcfg: TokenizeConfig, tok, staging: Path, res: Resources,
                      stall_seconds: float) -> tuple[dict[str, list[np.ndarray]], float]:
    """The features of the sample, by a FitActor pool loading the backbones saved in ``staging``:
    ({"semantic", "clap", "codec", "heldout": list of [N, dim] float32 arrays}, CPU seconds the actors spent).
    The CLAP windows of held-out files go to "heldout" (measured, not fitted on)."""
    fit = tcfg.fit
    semantic_segments = sum(len(plan_segments(f.seconds, tcfg.audio.segment_seconds)) for f in plan.files if f.semantic)
    max_frames = max(1, math.ceil(fit.max_points / max(semantic_segments, 1)))
    kwargs = dict(cfg_dict=to_dict(tcfg), backbone_dir=str(staging), threads=res.threads, max_frames=max_frames, seed=fit.seed, semantic_files=plan.semantic_files)
    batches = dict(plan_batches([(f.rel, f.seconds) for f in plan.files], tcfg.batch_seconds))
    runner = in_plan_order(ray, FitActor, kwargs, res, batches, corpus, tcfg, tok.sample_rates, frozenset(), stall_seconds)
    heldout = frozenset(plan.heldout)
    feats: dict[str, list[np.ndarray]] = {"semantic": [], "clap": [], "codec": [], "heldout": []}
    dims = {"semantic": tok.semantic.dim, "clap": tok.clap.embed_dim, "codec": tok.codec.model.config.codebook_dim}
    cpu_seconds = 0.0
    with FitProgress(console, len(plan.files)) as bar:
        try:
            for _, output in runner:  # in plan order: the fit does not depend on which actor was first
                for row in output_rows(output):
                    bar.update(row["rel"])
                    cpu_seconds += row["cpu"]
                    for name in FEATURES:
                        if row[name]:
                            x = np.frombuffer(row[name], dtype=np.float32).reshape(-1, dims[name])
                            feats["heldout" if name == "clap" and row["rel"] in heldout else name].append(x)
        except Stalled as e:
            raise stalled_error(console, out, e, stall_seconds) from None
        except ActorLost as e:
            raise UserError(f"fitting the tokenizer stopped: {e}; re-run the same command to start it again") from None
    if not feats["semantic"] or not feats["clap"]:
        raise UserError(f"none of the {len(plan.files)} sampled files could be decoded to fit the tokenizer; see musiclm tokenize's errors")
    return feats, cpu_seconds


def _fit_quantizers(tok, feats: dict[str, list[np.ndarray]], tcfg: TokenizeConfig) -> dict[str, tuple[int, int]]:
    """k-means on ``feats``: semantic centroids and the CLAP residual quantizer into ``tok.quantizers``, and Encodec's
    codebooks when it was built offline. Returns {quantizer: (points, codes)}."""
    from musiclm.models.codec import set_encodec_codebooks
    from musiclm.pipeline.quantizers import fit_encodec_codebooks, fit_residual, fit_semantic

    fit = tcfg.fit
    semantic = np.concatenate(feats["semantic"])
    clap = np.concatenate(feats["clap"])
    centroids, norm = fit_semantic(semantic, tcfg.semantic.codebook_size, niter=fit.niter, seed=fit.seed)
    books = fit_residual(clap, tcfg.clap.levels, tcfg.clap.codebook_size, niter=fit.niter, seed=fit.seed, what="CLAP residual quantizer")
    counts = {"clap": (len(clap), tcfg.clap.codebook_size), "semantic": (len(semantic), tcfg.semantic.codebook_size)}
    if feats["codec"]:
        latents = np.concatenate(feats["codec"])
        set_encodec_codebooks(tok.codec, fit_encodec_codebooks(tok.codec, latents, niter=fit.niter, seed=fit.seed))
        counts["codec"] = (len(latents), tok.codec.codebook_size)
    tok.quantizers = {"semantic_centroids": centroids, "semantic_norm": norm, "clap_codebooks": books}
    return counts


def _clap_errors(tok, feats: dict[str, list[np.ndarray]]) -> dict[str, list[float]]:
    """CLAP's relative error after each residual level, on the fit's audio, on held-out audio and on text
    prompts (CLAP's text–audio gap, measured)."""
    from musiclm.pipeline.quantizers import residual_errors
    from musiclm.pipeline.text_prompts import MUSIC_DESCRIPTIONS

    books = tok.quantizers["clap_codebooks"]
    errors = {"fit_audio": residual_errors(np.concatenate(feats["clap"]), books), "text": residual_errors(tok.clap_text_embed(list(MUSIC_DESCRIPTIONS)), books)}
    if feats["heldout"]:
        errors["heldout_audio"] = residual_errors(np.concatenate(feats["heldout"]), books)
    return errors


def _fit_report(plan, tcfg: TokenizeConfig, feats: dict[str, list[np.ndarray]], counts: dict[str, tuple[int, int]], errors: dict[str, list[float]],
                taken: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """The fit report saved with the tokenizer; ``taken``: {"features"/"kmeans": (wall seconds, cores busy)}."""
    from musiclm.pipeline.text_prompts import MUSIC_DESCRIPTIONS

    fit = tcfg.fit
    return {
        "files": len(plan.files),
        "seconds": round(plan.seconds, 3),
        "heldout_files": len(frozenset(plan.heldout)),
        "heldout_windows": int(sum(len(x) for x in feats["heldout"])),
        "clap_hop_seconds": fit.clap_hop_seconds,
        "min_points_per_code": fit.min_points_per_code,
        "points": {name: {"points": int(n), "codes": int(k), "points_per_code": round(n / k, 2)} for name, (n, k) in counts.items()},
        "clap_relative_error": {k: [round(e, 5) for e in v] for k, v in errors.items()},
        "text_prompts": len(MUSIC_DESCRIPTIONS),
        "seconds_taken": {name: round(wall, 2) for name, (wall, _) in taken.items()},
        "cores_busy": {name: round(cores, 2) for name, (_, cores) in taken.items()},  # CPU seconds per wall second
    }
