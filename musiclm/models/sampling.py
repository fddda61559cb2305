"""Autoregressive sampling of a stage's target tokens.

One call samples the target part of one window for a batch of sequences:
the conditioning prefix (and any already-known target tokens) is fed once,
then each target token is drawn from its own codebook's head and fed back.

With ``use_cache=True`` every step feeds one token through the model and
reads earlier positions from a :class:`~musiclm.models.transformer.KVCache`;
with ``use_cache=False`` every step recomputes the whole sequence. Both paths
compute the same logits (up to float rounding) and draw the same random
numbers in the same order, so with one seeded ``torch.Generator`` they give
the same tokens.

Classifier-free guidance runs the conditional and the unconditional prefixes
as one batch of 2B sequences (one cache holds both) and combines the logits as
``uncond + cfg_scale * (cond - uncond)`` before temperature and filtering.

Random numbers: a call draws all its noise up front from its generator
(:func:`draw_noise`, one [B, K] row of Exp(1) per sampled token), so the draw
does not depend on how the steps run: the fixed-shape steps of
:mod:`musiclm.models.static_sampling` (captured as CUDA graphs) read the same
rows and sample the same tokens.

Layer: models.
"""

from __future__ import annotations

import torch

from musiclm.models.layout import StageLayout
from musiclm.models.transformer import KVCache, MusicTransformer


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and then outside the top-p nucleus.

    ``logits`` [..., K] -> [..., K] (a new tensor). ``top_k=0`` and ``top_p=1.0`` are off.
    top-k keeps every logit >= the k-th largest (ties at the boundary are kept). top-p keeps the
    smallest set of most likely tokens whose probability (after top-k) sums to at least ``top_p``;
    the most likely token is always kept.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    out = logits.clone()
    if 0 < top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # [..., 1]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p  # the nucleus is already complete without this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def draw_noise(generator: torch.Generator | None, steps: int, rows: int, k: int, device: torch.device | str) -> torch.Tensor:
    """Exp(1) noise for ``steps`` sampled tokens of ``rows`` sequences: [steps, rows, K] float32 on ``device``.

    Drawn on the generator's device (a CPU generator also drives CUDA sampling), in one call."""
    where = generator.device if generator is not None else device
    noise = torch.empty(steps, rows, k, dtype=torch.float32, device=where).exponential_(generator=generator)
    return noise.to(device)


def guide(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance: rows [2B, K] = B conditional then B unconditional -> float32 [B, K],
    ``uncond + cfg_scale * (cond - uncond)``."""
    cond, uncond = logits.float().chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def pick(
    logits: torch.Tensor,
    noise: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    guided: bool = False,
) -> torch.Tensor:
    """One code per sequence from the logits of one step: [B or 2B, K] -> [B] int64.

    ``guided``: the rows are B conditional then B unconditional sequences, combined as
    ``uncond + cfg_scale * (cond - uncond)``. ``noise`` [B, K] Exp(1) (from :func:`draw_noise`), or
    None for greedy: the argmax, as is ``temperature <= 0``. Otherwise the draw is an exponential
    race (equivalent to Gumbel-max): argmax(p / E) over the tempered, top-k/top-p filtered softmax.
    Only tensor operations of fixed shapes, so it runs inside a captured CUDA graph.
    """
    logits = guide(logits, cfg_scale) if guided else logits.float()
    if noise is None or temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)  # [B, K]
    return (probs / noise).argmax(dim=-1)


class _CachedSteps:
    """Feeds new tokens through the model, keeping earlier positions in a KV cache."""

    def __init__(self, model: MusicTransformer, prefix: torch.Tensor, max_len: int):
        self.model = model
        self.cache: KVCache = model.new_cache(prefix.shape[0], max_len)
        self.pending = prefix  # fed together with the first tokens (one prefill pass)

    def feed(self, new: torch.Tensor) -> torch.Tensor:
        """``new`` [B, n] -> hidden state of the last position [B, d]."""
        if self.pending is not None:
            new, self.pending = torch.cat([self.pending, new], dim=1), None
        return self.model(new, self.cache)[:, -1]


class _FullSteps:
    """Recomputes the whole sequence at every step (no cache)."""

    def __init__(self, model: MusicTransformer, prefix: torch.Tensor):
        self.model = model
        self.seq = prefix

    def feed(self, new: torch.Tensor) -> torch.Tensor:
        self.seq = torch.cat([self.seq, new], dim=1)
        return self.model(self.seq)[:, -1]


@torch.inference_mode()
def sample_target(
    model: MusicTransformer,
    layout: StageLayout,
    prefix: torch.Tensor,
    n_target: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    uncond_prefix: torch.Tensor | None = None,
    target_prompt: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    greedy: bool = False,
) -> torch.Tensor:
    """Sample ``n_target`` target ids after ``prefix`` for B sequences at once.

    ``prefix`` [B, P] int64: conditioning ids (``layout.prefix``). ``target_prompt`` [B, M]: the
    first M target ids, already known (continuation, sliding windows); they are fed, not sampled,
    and returned as the first M outputs. ``uncond_prefix`` [B, P]: the prefix with conditioning
    dropped (``layout.prefix(window, drop_cond=True)``), used when ``cfg_scale != 1``.
    Returns [B, n_target] int64 global ids (``layout.target_offset(level) + code``) where the
    j-th token's level is ``layout.target_level(j)``. Runs on the model's device, in eval mode
    (the model's mode is restored afterwards); ``greedy`` (or ``temperature <= 0``) takes argmaxes.
    """
    device = next(model.parameters()).device
    prefix = prefix.to(device=device, dtype=torch.long)
    b, p = prefix.shape
    m = 0 if target_prompt is None else target_prompt.shape[1]
    if m > n_target:
        raise ValueError(f"target_prompt has {m} tokens, more than n_target={n_target}")
    if p + m == 0:
        raise ValueError("nothing to condition on: empty prefix and no target_prompt")
    out = torch.empty(b, n_target, dtype=torch.long, device=device)
    if m:
        if target_prompt.shape[0] != b:
            raise ValueError(f"target_prompt has {target_prompt.shape[0]} rows, prefix has {b}")
        out[:, :m] = target_prompt.to(device)
    if m == n_target:
        return out

    guided = cfg_scale != 1.0 and uncond_prefix is not None
    if guided:
        if uncond_prefix.shape != prefix.shape:
            raise ValueError(f"uncond_prefix {tuple(uncond_prefix.shape)} and prefix {tuple(prefix.shape)} differ in shape")
        prefix = torch.cat([prefix, uncond_prefix.to(device=device, dtype=torch.long)])  # [2B, P]

    def both(ids: torch.Tensor) -> torch.Tensor:  # target ids [B, n] -> [B or 2B, n]
        return ids.repeat(2, 1) if guided else ids

    greedy = greedy or temperature <= 0
    noise = None if greedy else draw_noise(generator, n_target - m, b, model.codebook_size, device)  # [n_target - m, B, K]
    was_training = model.training
    model.eval()
    try:
        # the last target token is never fed back, so the sequence never exceeds p + n_target - 1
        steps = _CachedSteps(model, prefix, p + n_target - 1) if use_cache else _FullSteps(model, prefix)
        hidden = steps.feed(both(out[:, :m]))  # [B or 2B, d]
        for j in range(m, n_target):
            level = int(layout.target_level(j))
            logits = model.logits(hidden, level)  # [B or 2B, K]
            code = pick(
                logits, None if noise is None else noise[j - m], temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, guided=guided
            )  # fmt: skip
            out[:, j] = code + layout.target_offset(level)
            if j + 1 < n_target:
                hidden = steps.feed(both(out[:, j : j + 1]))
    finally:
        model.train(was_training)
    return out
