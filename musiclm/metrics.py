"""Evaluation: Fréchet Audio Distance between two folders of audio, and the CLAP text-audio score.

FAD fits a Gaussian to the embeddings of each set (one embedding per window of
every file) and reports the Fréchet distance between the two Gaussians::

    d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))

Embeddings come from the tokenizer's own backbones: CLAP audio embeddings (one
per CLAP window, as tokenize cuts them) or semantic-model layer features (the mean over
frames of each window-long chunk). The CLAP score is the cosine similarity of a
file's CLAP audio embedding (normalised mean over its windows) with its
prompt's CLAP text embedding; generation ranks samples with the same function.

Folders are embedded in batches of windows from many files (:func:`embed_files`):
a few threads decode and resample the next files while the backbone runs, and
the windows go through it ``batch_windows`` at a time. Each window's embedding
does not depend on its batch (no layer mixes the rows of a batch), so the FAD
equals the file-by-file one (:func:`embed_file`) up to float rounding.

Layer: metrics.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np

from musiclm.errors import UserError

if TYPE_CHECKING:
    import torch

    from musiclm.pipeline.tokenizer import Tokenizer

EMBEDDINGS = ("clap", "semantic")
OLD_EMBEDDINGS = {"mert": "semantic"}  # --embedding mert: its name while the semantic model was always MERT
BATCH_WINDOWS = 64  # windows per backbone call (64 CLAP windows of 10 s at 48 kHz: 123 MB of audio)


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


def _file_windows(path: Path, tokenizer: Tokenizer, kind: str) -> np.ndarray:
    """The windows of one file that :func:`embed_file` embeds: [W, samples] at the backbone's rate.

    clap: the tokenizer's CLAP windows. semantic: chunks of one CLAP window's length (no overlap; a
    tail shorter than a chunk is dropped unless the file is shorter, then it is the one chunk)."""
    if kind == "clap":
        return tokenizer.clap_windows(_read(path, tokenizer.clap.sample_rate))
    sr = tokenizer.semantic.sample_rate
    x = _read(path, sr)
    chunk = round(tokenizer.cfg.clap.window_seconds * sr)
    n = len(x) // chunk
    return x[: n * chunk].reshape(n, chunk) if n else x[None]


def _embed_windows(tokenizer: Tokenizer, kind: str, windows: Sequence[np.ndarray]) -> np.ndarray:
    """Embeddings [N, D] float32 of N windows [samples] in one backbone call (semantic: one per run of equal lengths).

    clap: normalised CLAP audio embeddings. semantic: the semantic model's layer features averaged over frames."""
    if kind == "clap":
        return tokenizer.clap_audio_embed(list(windows)).cpu().numpy()
    out, a = [], 0
    while a < len(windows):  # the semantic model takes a rectangular batch: a short file's one chunk goes alone
        b = a + 1
        while b < len(windows) and len(windows[b]) == len(windows[a]):
            b += 1
        out.append(tokenizer.semantic_features(np.stack(windows[a:b])).mean(1).cpu().numpy())  # [n, T, D] -> [n, D]
        a = b
    return np.concatenate(out)


def _check_kind(kind: str) -> str:
    """``kind`` under its present name, or a one-line error."""
    kind = OLD_EMBEDDINGS.get(kind, kind)
    if kind not in EMBEDDINGS:
        raise UserError(f"--embedding must be one of {', '.join(EMBEDDINGS)}, got '{kind}'")
    return kind


def embed_file(path: str | Path, tokenizer: Tokenizer, kind: str = "clap") -> np.ndarray:
    """Window embeddings of one audio file: [W, D] float32.

    clap: one normalised CLAP audio embedding per CLAP window (window and hop of the tokenizer).
    semantic: the semantic model's layer features averaged over each chunk of one CLAP window's length
    (chunks do not overlap; a tail shorter than a chunk is dropped unless the file is shorter).
    """
    kind = _check_kind(kind)
    return _embed_windows(tokenizer, kind, _file_windows(Path(path), tokenizer, kind))


def _prefetched(fn: Callable[[Path], np.ndarray], files: Sequence[Path], workers: int) -> Iterator[np.ndarray]:
    """``fn(file)`` for each file, in order, computed by ``workers`` threads at most ``2 * workers``
    files ahead of the consumer (decoding and resampling release the GIL, so they overlap with the model)."""
    with ThreadPoolExecutor(workers, thread_name_prefix="eval-decode") as pool:
        ahead: deque[Future] = deque()
        try:
            for p in files:
                ahead.append(pool.submit(fn, p))
                if len(ahead) >= 2 * workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:  # an error or an early stop: do not decode the rest
            for f in ahead:
                f.cancel()


def embed_files(
    files: Sequence[str | Path],
    tokenizer: Tokenizer,
    kind: str = "clap",
    batch_windows: int = BATCH_WINDOWS,
    on_file: Callable[[], None] | None = None,
    workers: int | None = None,
) -> list[np.ndarray]:
    """Window embeddings of each file, as :func:`embed_file` gives them: a list of [W_i, D] float32.

    The windows of consecutive files go through the backbone together, ``batch_windows`` at a time
    (a file may span two batches); ``workers`` threads (default: up to 4) decode the next files
    meanwhile. Memory holds the windows of at most ``2 * workers`` decoded files plus one batch.
    ``on_file()`` is called as each file's embeddings are complete, in file order.
    """
    kind = _check_kind(kind)
    if batch_windows < 1:
        raise UserError(f"--batch-windows must be at least 1, got {batch_windows}")
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    parts: list[list[np.ndarray]] = [[] for _ in files]
    left = [0] * len(files)  # windows of each file not embedded yet
    queue: list[np.ndarray] = []  # windows waiting for a batch, in file order
    owner: list[int] = []  # the file of each queued window
    done = 0  # files whose embeddings are complete

    def run_batch(n: int) -> None:
        nonlocal done
        emb = _embed_windows(tokenizer, kind, queue[:n])  # [n, D]
        who = np.asarray(owner[:n])
        del queue[:n], owner[:n]
        for i in dict.fromkeys(who.tolist()):
            rows = emb[who == i]
            parts[i].append(rows)
            left[i] -= len(rows)
        while done < len(files) and left[done] == 0 and parts[done]:
            done += 1
            if on_file is not None:
                on_file()

    def read(path: str | Path) -> np.ndarray:
        return _file_windows(Path(path), tokenizer, kind)

    with closing(_prefetched(read, list(files), workers)) as decoded:
        for i, windows in enumerate(decoded):
            queue.extend(windows)
            owner.extend([i] * len(windows))
            left[i] = len(windows)
            while len(queue) >= batch_windows:
                run_batch(batch_windows)
    if queue:
        run_batch(len(queue))
    return [np.concatenate(p) for p in parts]


def embed_folder(folder: str | Path, tokenizer: Tokenizer, kind: str = "clap", batch_windows: int = BATCH_WINDOWS) -> np.ndarray:
    """Window embeddings of every audio file under ``folder`` (sorted by path): [N, D] float32."""
    from musiclm.pipeline.audio import audio_files_in

    return np.concatenate(embed_files(audio_files_in(folder, "audio"), tokenizer, kind, batch_windows))


def eval_device(device: str | None) -> torch.device:
    """The device for ``--device``: auto (or None) is cuda when available, else cpu; cpu, cuda, cuda:N
    are checked to exist (a :class:`UserError` otherwise), as for musiclm train and generate."""
    from musiclm.device import pick_device

    return pick_device(None if device in (None, "auto") else device, local_rank=0)


class _FileProgress:
    """A rich progress bar per folder on a terminal (stderr, so stdout keeps only the result); nothing otherwise."""

    def __enter__(self) -> Self:
        from rich.console import Console

        console = Console(stderr=True)
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TextColumn("files"), TimeElapsedColumn(), TimeRemainingColumn(), console=console
            )
            self.bar.start()
        return self

    def task(self, name: str, files: int) -> Callable[[], None] | None:
        """A callback advancing a new bar ``name`` of ``files`` steps by one; None without a terminal."""
        if self.bar is None:
            return None
        bar, task = self.bar, self.bar.add_task(name, total=files)
        return lambda: bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_eval(
    generated: str | Path,
    reference: str | Path,
    tokenizer: str | Path | Tokenizer,
    prompts: str | Path | None = None,
    embedding: str = "clap",
    out: str | Path | None = None,
    device: str | None = "auto",
    batch_windows: int | None = None,
) -> dict:
    """``musiclm eval``: FAD between two folders and, with ``prompts``, the CLAP text-audio score.

    ``prompts`` is a text file with one prompt per generated file (blank lines ignored), in the
    order of the generated files sorted by path. ``device`` (auto, cpu, cuda, cuda:N; see
    :func:`eval_device`) is where a tokenizer loaded from a folder runs; a :class:`Tokenizer`
    object runs where it is. ``batch_windows``: windows per backbone call (:func:`embed_files`;
    None: ``BATCH_WINDOWS``).
    Prints the result (a progress bar per folder goes to stderr on a terminal) and writes it as
    JSON to ``out``; returns it as a dict.
    """
    from musiclm.pipeline.audio import audio_files_in
    from musiclm.pipeline.tokenizer import Tokenizer

    embedding = _check_kind(embedding)
    batch_windows = BATCH_WINDOWS if batch_windows is None else batch_windows
    dev = eval_device(device)  # refused before any file is read
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
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer, device=str(dev))

    with _FileProgress() as progress:
        gen_emb = embed_files(gen_files, tok, embedding, batch_windows, progress.task("generated", len(gen_files)))
        ref_emb = embed_files(ref_files, tok, embedding, batch_windows, progress.task("reference", len(ref_files)))
        clap_emb = None
        if texts is not None:  # CLAP windows per generated file, for the text-audio score
            clap_emb = gen_emb if embedding == "clap" else embed_files(gen_files, tok, "clap", batch_windows, progress.task("CLAP score", len(gen_files)))
    g, r = np.concatenate(gen_emb), np.concatenate(ref_emb)
    fad = frechet_distance(*embedding_stats(g), *embedding_stats(r))
    result: dict = {
        "fad": fad,
        "embedding": embedding,
        "device": str(tok.device),
        "generated": {"folder": str(generated), "files": len(gen_files), "windows": len(g)},
        "reference": {"folder": str(reference), "files": len(ref_files), "windows": len(r)},
        "clap_score": None,
        "clap_scores": None,
    }
    if texts is not None:
        audio = np.stack([_normalised_mean(e) for e in clap_emb])  # as clap_audio_embeddings averages them
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
