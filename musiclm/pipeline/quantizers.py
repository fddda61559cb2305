"""Fitting the quantizers that turn backbone features into integer tokens.

Fitting uses faiss (k-means); applying a fitted quantizer needs only the stored
centroid arrays, so training and generation never import faiss.

- semantic: one k-means codebook on standardised semantic-model layer features;
- clap: a residual quantizer (a loop of k-means over residuals) on CLAP embeddings;
- Encodec (random backbones only): the same residual fit on encoder outputs
  (:func:`fit_encodec_codebooks`; ``musiclm.models.codec.set_encodec_codebooks``
  installs the result in the model).

Layer: pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from musiclm.errors import UserError

if TYPE_CHECKING:
    from musiclm.models.codec import Codec


def fit_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, what: str = "k-means") -> np.ndarray:
    """Centroids [k, D] float32 of ``x`` [N, D]; a clear error when there are fewer than k points."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) < k:
        raise UserError(
            f"not enough data to fit {what}: {len(x)} points for {k} codes; "
            "tokenize a larger corpus (or raise tokenize.fit.max_seconds), or pass --tokenizer from a corpus that has them"
        )
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1, max_points_per_centroid=1 << 20)
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])


def assign(x: np.ndarray | torch.Tensor, centroids: np.ndarray | torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Nearest centroid of each row: x [N, D], centroids [K, D] → codes [N] int64 (same device as x)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    c = torch.as_tensor(centroids, dtype=torch.float32, device=x.device)
    c_sq = (c * c).sum(1)  # [K]
    out = torch.empty(len(x), dtype=torch.int64, device=x.device)
    for a in range(0, len(x), chunk):
        xb = x[a : a + chunk]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is constant per row
        out[a : a + chunk] = torch.argmin(c_sq[None, :] - 2 * xb @ c.T, dim=1)
    return out


def fit_residual(x: np.ndarray, levels: int, k: int, niter: int = 20, seed: int = 0, what: str = "a residual quantizer") -> np.ndarray:
    """Codebooks [levels, k, D] fitted level by level on the residual of the previous levels."""
    residual = np.ascontiguousarray(x, dtype=np.float32).copy()
    books = []
    for level in range(levels):
        c = fit_kmeans(residual, k, niter=niter, seed=seed + level, what=f"{what} (level {level})")
        codes = assign(residual, c).numpy()
        residual -= c[codes]
        books.append(c)
    return np.stack(books)


def fit_encodec_codebooks(enc: Codec, latents: np.ndarray, niter: int = 20, seed: int = 0) -> list[np.ndarray]:
    """The first ``num_quantizers`` codebooks of ``enc`` ([codebook_size, dim] each), fitted by
    residual k-means on encoder outputs ``latents`` [N, dim]; install them with
    ``musiclm.models.codec.set_encodec_codebooks``."""
    return list(fit_residual(latents, enc.num_quantizers, enc.codebook_size, niter=niter, seed=seed, what="Encodec codebooks"))


def residual_encode(x: np.ndarray | torch.Tensor, codebooks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Greedy residual codes: x [N, D], codebooks [L, K, D] → codes [N, L] int64."""
    residual = torch.as_tensor(x, dtype=torch.float32).clone()
    books = torch.as_tensor(codebooks, dtype=torch.float32, device=residual.device)
    codes = []
    for c in books:
        idx = assign(residual, c)
        residual -= c[idx]
        codes.append(idx)
    return torch.stack(codes, dim=1)


def residual_errors(x: np.ndarray | torch.Tensor, codebooks: np.ndarray | torch.Tensor) -> list[float]:
    """How well residual codebooks [L, K, D] reconstruct rows ``x`` [N, D]: for each depth l,
    sum |x - x_hat(levels <= l)|^2 / sum |x|^2 (1.0: no better than zero; 0.0: exact)."""
    residual = torch.as_tensor(x, dtype=torch.float32).clone()
    total = float((residual * residual).sum())
    out = []
    for c in torch.as_tensor(codebooks, dtype=torch.float32):
        residual -= c[assign(residual, c)]
        out.append(float((residual * residual).sum()) / total if total > 0 else 0.0)
    return out


def residual_decode(codes: np.ndarray | torch.Tensor, codebooks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Sum of the chosen codewords: codes [N, L] → [N, D] float32."""
    codes = torch.as_tensor(np.asarray(codes, dtype=np.int64) if isinstance(codes, np.ndarray) else codes)
    books = torch.as_tensor(codebooks, dtype=torch.float32)
    return sum(books[level][codes[:, level]] for level in range(codes.shape[1]))


def fit_semantic(features: np.ndarray, k: int, niter: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means on standardised semantic features [N, D] → (centroids [k, D], norm [2, D] = mean, std)."""
    mean = features.mean(0)
    std = features.std(0) + 1e-5
    centroids = fit_kmeans((features - mean) / std, k, niter=niter, seed=seed, what="semantic k-means")
    return centroids, np.stack([mean, std]).astype(np.float32)
