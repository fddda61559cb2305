"""Sampling with fixed-shape decode steps, captured as CUDA graphs on a GPU.

On a GPU a decode step of a 6-layer stage is a few hundred small kernels; launched
one by one from Python they cost more than they compute (about 2 ms a step on an
H100 for well under that of work). Here every step of a window has the same
shapes, so it is captured once as a CUDA graph and replayed: one launch per step.

What makes the shapes fixed:

- the KV cache holds all ``layout.seq_len`` positions of a window from the start;
  a step writes its key and value at its position with ``index_copy_`` and
  attends over the whole cache with a mask (:meth:`MusicTransformer.step`);
- the position, the step's index and the rotary angles are read from tensors on
  the device, advanced inside the graph, never from Python;
- sampling (guidance, temperature, top-k/top-p, the exponential race) runs
  inside the graph too (:func:`~musiclm.models.sampling.pick`), on noise drawn
  for the whole window before it starts (:func:`~musiclm.models.sampling.draw_noise`),
  and the sampled id is written into the output and fed back on the device.

A stage's target levels take turns (coarse: 3 codebooks, frame-major), and each
level has its own output head, so one graph is captured per level and the loop
replays the graph of each step's level. The prefix and any known target tokens
are fed first in one ordinary pass (its length varies); only the single-token
steps are captured. One sampler serves every window of a stage for a batch of
fixed size and fixed settings; batched samples share it.

Without ``capture`` (any device) the same step runs eagerly: that is how the CPU
tests check the fixed-shape step against :func:`~musiclm.models.sampling.sample_target`.

Layer: models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from musiclm.models.layout import StageLayout
from musiclm.models.sampling import draw_noise, guide, pick
from musiclm.models.transformer import MusicTransformer


KEEP_SAMPLERS = 12  # samplers kept per MusicLM: every stage of a few batch sizes and settings


@dataclass(frozen=True)
class SamplerSettings:
    """How a sampler draws; a captured graph bakes these in."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    guided: bool = False  # rows are B conditional then B unconditional sequences
    greedy: bool = False


class StaticSampler:
    """Samples the target of windows of one stage, B sequences at a time, with fixed-shape steps.

    ``rows``: sequences per call (B; the model sees 2B when guided). ``capture``: capture each
    level's step as a CUDA graph (the model must be on a CUDA device, in eval mode).
    """

    def __init__(self, model: MusicTransformer, layout: StageLayout, rows: int, settings: SamplerSettings, capture: bool):
        self.model, self.layout, self.rows, self.settings = model, layout, rows, settings
        device = model.embed.weight.device
        if model.training:
            raise ValueError("put the model in eval mode before sampling (dropout would be captured)")
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {device}")
        fed = 2 * rows if settings.guided else rows
        n = layout.target.length  # target ids in a whole window
        self.cache = model.new_cache(fed, layout.seq_len)
        self.token = torch.zeros(fed, 1, dtype=torch.long, device=device)  # the id fed at the next step
        self.position = torch.zeros((), dtype=torch.long, device=device)  # position of the last id fed
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # which target id the step samples
        self.out = torch.zeros(rows, n, dtype=torch.long, device=device)
        self.noise = torch.ones(n, rows, model.codebook_size, device=device)  # row j: noise of target id j
        self.logits = torch.zeros(rows, model.codebook_size, device=device)  # the last step's (guided) logits
        self.record = False
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture()

    def _step(self, level: int) -> None:
        """Feed ``token`` at the next position, sample target id ``index`` (of codebook ``level``)."""
        self.position.add_(1)
        hidden = self.model.step(self.token, self.cache, self.position)  # [B or 2B, d]
        self._choose(hidden, level)

    def _choose(self, hidden: torch.Tensor, level: int) -> None:
        s = self.settings
        logits = self.model.logits(hidden, level)
        self.logits.copy_(guide(logits, s.cfg_scale) if s.guided else logits)
        noise = None if s.greedy else self.noise.index_select(0, self.index)[0]  # [B, K]
        code = pick(self.logits, noise, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)  # guidance done above
        ids = code + self.layout.target_offset(level)  # [B]
        self.out.index_copy_(1, self.index, ids[:, None])
        self.token.copy_((ids.repeat(2) if s.guided else ids)[:, None])
        self.index.add_(1)

    def _levels(self) -> list[int]:
        return sorted({int(self.layout.target_level(j)) for j in range(self.layout.target_levels)})

    def _capture(self) -> None:
        # warm up on a side stream (lazy library initialisation must not happen during capture)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for level in self._levels():
                self.position.zero_()
                self.index.zero_()
                self._step(level)
        torch.cuda.current_stream().wait_stream(side)
        for level in self._levels():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                self._step(level)
            self.graphs[level] = graph

    @torch.inference_mode()
    def sample(
        self,
        prefix: torch.Tensor,
        n_target: int,
        *,
        uncond_prefix: torch.Tensor | None = None,
        target_prompt: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        logits_out: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """As :func:`~musiclm.models.sampling.sample_target` (same arguments, same noise, same tokens up
        to float rounding): [B, n_target] int64 global ids, on the model's device.

        ``logits_out``: a list that receives each sampled step's (guided) logits [B, K] on the CPU, for
        checks (it syncs every step).
        """
        layout, s, model = self.layout, self.settings, self.model
        device = self.out.device
        b, p = prefix.shape
        m = 0 if target_prompt is None else target_prompt.shape[1]
        if b != self.rows:
            raise ValueError(f"this sampler takes {self.rows} sequences, got {b}")
        if not m < n_target <= layout.target.length or p + n_target - 1 > layout.seq_len:
            raise ValueError(f"{n_target} target ids after {p} + {m} do not fit a {layout.stage} window")
        if s.guided != (uncond_prefix is not None):
            raise ValueError("a guided sampler takes an uncond_prefix, an unguided one none")
        seq = prefix.to(device=device, dtype=torch.long)
        if m:
            seq = torch.cat([seq, target_prompt.to(device=device, dtype=torch.long)], dim=1)
            self.out[:, :m] = target_prompt.to(device)
        if s.guided:
            uncond = uncond_prefix.to(device=device, dtype=torch.long)
            seq = torch.cat([seq, torch.cat([uncond, seq[:, p:]], dim=1)])  # [2B, P + M]
        if not s.greedy:
            self.noise[m:n_target] = draw_noise(generator, n_target - m, b, model.codebook_size, device)

        self.cache.reset()
        hidden = model(seq, self.cache)[:, -1]  # the prefix and known ids, in one ordinary pass
        self.index.fill_(m)
        self.position.fill_(seq.shape[1] - 1)
        for j in range(m, n_target):
            level = int(layout.target_level(j))
            if j == m:
                self._choose(hidden, level)
            elif level in self.graphs:
                self.graphs[level].replay()
            else:
                self._step(level)
            if logits_out is not None:
                logits_out.append(self.logits.to("cpu", copy=True))
        return self.out[:, :n_target].clone()


def sampler_for(model: MusicTransformer, layout: StageLayout, rows: int, settings: SamplerSettings, capture: bool, cache: dict) -> StaticSampler:
    """The sampler of ``(model, rows, settings)`` from ``cache`` (a dict the caller keeps), made on first use:
    a captured sampler is reused by every window and every call with the same batch and settings. The
    cache keeps the :data:`KEEP_SAMPLERS` most recently used (each holds a KV cache and its graphs)."""
    key = (id(model), rows, settings, capture)
    sampler = cache.pop(key, None) or StaticSampler(model, layout, rows, settings, capture)
    cache[key] = sampler  # the most recently used last
    while len(cache) > KEEP_SAMPLERS:
        cache.pop(next(iter(cache)))
    return sampler
