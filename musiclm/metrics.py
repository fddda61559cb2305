"""Evaluation: Fréchet Audio Distance between two folders of audio, and the CLAP text-audio score.

FAD fits a Gaussian to the embeddings of each set (one embedding per window of
every file) and reports the Fréchet distance between the two Gaussians::

    d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))

Embeddings come from the tokenizer's own backbones: CLAP audio embeddings (one
per CLAP window, as tokenize cuts them) or MERT layer features (the mean over
frames of each window-long chunk). The CLAP score is the cosine similarity of a
file's CLAP audio embedding (normalised mean over its windows) with its
prompt's CLAP text embedding; generation ranks samples with the same function.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from musiclm.errors import UserError

if TYPE_CHECKING:
    from musiclm.pipeline.tokenizer import Tokenizer

EMBEDDINGS = ("clap", "mert")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): means [D], covariances [D, D].

    The matrix square root is scipy's; when the product of the covariances is singular (its root
    is inaccurate or not finite) ``eps`` is added to both diagonals, and a negligible imaginary
    part left by rounding is dropped.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes differ: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2

    def root(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
        prod = a @ b
        r = linalg.sqrtm(prod)
        scale = max(np.linalg.norm(prod), 1e-300)
        return r, float(np.linalg.norm(r @ r - prod) / scale) if np.isfinite(r).all() else np.inf

    covmean, err = root(sigma1, sigma2)
    if err > 1e-6:  # a singular product: its square root is ill-conditioned
        offset = np.eye(len(mu1)) * eps
        covmean, err = root(sigma1 + offset, sigma2 + offset)
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"the covariance square root has an imaginary part of {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def embedding_stats(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased) of embeddings [N, D], N >= 2, in float64."""
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2 or len(emb) < 2:
        raise UserError(f"a Fréchet distance needs at least 2 embeddings, got {len(emb) if emb.ndim == 2 else 0}: evaluate more or longer files")
    return emb.mean(0), np.cov(emb, rowvar=False)


def _normalised_mean(windows: np.ndarray) -> np.ndarray:
    """One clip's embedding from its window embeddings [W, D]: their mean, normalised -> [D]."""
    m = windows.mean(0)
    return m / max(np.linalg.norm(m), 1e-12)


def clap_audio_embeddings(tokenizer: Tokenizer, audios: Sequence[np.ndarray], sample_rate: int) -> np.ndarray:
    """One CLAP audio embedding per clip: clips [samples] at ``sample_rate`` -> [B, D] float32, each the
    normalised mean of the clip's CLAP windows (all windows embedded in one call)."""
    from musiclm.pipeline.audio import resample

    windows = [tokenizer.clap_windows(resample(a, sample_rate, tokenizer.clap.sample_rate)) for a in audios]
    # a list, not one array: a clip shorter than a window gives one shorter window (repeat-padded by CLAP)
    emb = tokenizer.clap_audio_embed([w for clip in windows for w in clip]).cpu().numpy()  # [W, D]
    out, a = [], 0
    for w in windows:
        out.append(_normalised_mean(emb[a : a + len(w)]))
        a += len(w)
    return np.stack(out).astype(np.float32)


def _read(path: Path, rate: int) -> np.ndarray:
    from musiclm.pipeline.audio import AudioError, read_mono, resample

    try:
        x, sr = read_mono(path)
    except AudioError as e:
        raise UserError(f"cannot read {path}: {e.reason}") from None
    return resample(x, sr, rate)


def embed_file(path: str | Path, tokenizer: Tokenizer, kind: str = "clap") -> np.ndarray:
    """Window embeddings of one audio file: [W, D] float32.

    clap: one normalised CLAP audio embedding per CLAP window (window and hop of the tokenizer).
    mert: the MERT layer features averaged over each chunk of one CLAP window's length
    (chunks do not overlap; a tail shorter than a chunk is dropped unless the file is shorter).
    """
    if kind == "clap":
        x = _read(Path(path), tokenizer.clap.sample_rate)
        return tokenizer.clap_audio_embed(tokenizer.clap_windows(x)).cpu().numpy()
    if kind == "mert":
        sr = tokenizer.mert.sample_rate
        x = _read(Path(path), sr)
        chunk = round(tokenizer.cfg.clap.window_seconds * sr)
        n = len(x) // chunk
        chunks = x[: n * chunk].reshape(n, chunk) if n else x[None]
        return tokenizer.mert_features(chunks).mean(1).cpu().numpy()  # [W, T, D] -> [W, D]
    raise UserError(f"--embedding must be one of {', '.join(EMBEDDINGS)}, got '{kind}'")


def embed_folder(folder: str | Path, tokenizer: Tokenizer, kind: str = "clap") -> np.ndarray:
    """Window embeddings of every audio file under ``folder`` (sorted by path): [N, D] float32."""
    from musiclm.pipeline.audio import audio_files_in

    return np.concatenate([embed_file(p, tokenizer, kind) for p in audio_files_in(folder, "audio")])


def run_eval(
    generated: str | Path,
    reference: str | Path,
    tokenizer: str | Path | Tokenizer,
    prompts: str | Path | None = None,
    embedding: str = "clap",
    out: str | Path | None = None,
) -> dict:
    """``musiclm eval``: FAD between two folders and, with ``prompts``, the CLAP text-audio score.

    ``prompts`` is a text file with one prompt per generated file (blank lines ignored), in the
    order of the generated files sorted by path. Prints the result and writes it as JSON to
    ``out``; returns it as a dict.
    """
    from musiclm.pipeline.audio import audio_files_in
    from musiclm.pipeline.tokenizer import Tokenizer

    if embedding not in EMBEDDINGS:
        raise UserError(f"--embedding must be one of {', '.join(EMBEDDINGS)}, got '{embedding}'")
    gen_files = audio_files_in(generated, "generated")
    ref_files = audio_files_in(reference, "reference")
    texts = None
    if prompts is not None:
        try:
            texts = [line.strip() for line in Path(prompts).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise UserError(f"cannot read the prompts file {prompts}: {e.strerror}") from None
        if len(texts) != len(gen_files):
            raise UserError(f"{prompts} has {len(texts)} prompts for {len(gen_files)} generated files: give one prompt per file, in file-name order")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)

    gen_emb = [embed_file(p, tok, embedding) for p in gen_files]
    ref_emb = [embed_file(p, tok, embedding) for p in ref_files]
    g, r = np.concatenate(gen_emb), np.concatenate(ref_emb)
    fad = frechet_distance(*embedding_stats(g), *embedding_stats(r))
    result: dict = {
        "fad": fad,
        "embedding": embedding,
        "generated": {"folder": str(generated), "files": len(gen_files), "windows": len(g)},
        "reference": {"folder": str(reference), "files": len(ref_files), "windows": len(r)},
        "clap_score": None,
        "clap_scores": None,
    }
    if texts is not None:
        if embedding == "clap":  # the windows are already embedded: average them per file
            audio = np.stack([_normalised_mean(e) for e in gen_emb])
        else:
            rate = tok.clap.sample_rate
            audio = clap_audio_embeddings(tok, [_read(p, rate) for p in gen_files], rate)
        text = tok.clap_text_embed(texts).cpu().numpy()
        scores = (audio * text).sum(-1)
        result["clap_score"] = float(scores.mean())
        result["clap_scores"] = [{"file": str(p), "prompt": t, "score": float(s)} for p, t, s in zip(gen_files, texts, scores)]

    line = f"FAD ({embedding}): {fad:.4f}  ({len(g)} generated windows from {len(gen_files)} files, {len(r)} reference windows from {len(ref_files)} files)"
    print(line)
    if result["clap_score"] is not None:
        print(f"CLAP text-audio score: {result['clap_score']:.4f} (mean over {len(gen_files)} files)")
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result
