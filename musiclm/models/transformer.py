"""The decoder-only transformer shared by the three stages.

A stage is only a :class:`~musiclm.models.layout.StageLayout`; the network is
the same: token embedding, ``n_layers`` pre-norm blocks (RMSNorm, causal
self-attention with rotary positions, SwiGLU MLP), a final RMSNorm, and one
output head per target codebook. The heads are applied only where a label is
(training) or where a token is sampled (generation), so the model never builds
logits over the whole vocabulary or over all target levels at once.

Shapes: B batch, N new positions, L positions in the cache after the call,
H heads, D head width, d model width, K codebook size.

Layer: models.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musiclm.config import ModelConfig
from musiclm.models.layout import IGNORE, StageLayout


def mlp_width(cfg: ModelConfig) -> int:
    """SwiGLU hidden width: ``cfg.mlp_hidden``, or 8/3 * d_model rounded up to a multiple of 64."""
    if cfg.mlp_hidden > 0:
        return cfg.mlp_hidden
    return 64 * math.ceil(8 * cfg.d_model / 3 / 64)


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions.

    ``k[i]`` and ``v[i]`` are ``[B, H, max_len, D]``; positions ``[0, length)``
    are filled. A forward pass writes its new positions in place after
    ``length`` (O(1) per appended token, no reallocation) and then advances
    ``length``.
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, head_dim: int, max_len: int, device=None, dtype=None):
        shape = (batch_size, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.batch_size = batch_size
        self.length = 0

    def reset(self) -> None:
        """Forget every position (the memory is kept for reuse)."""
        self.length = 0


class Rotary(nn.Module):
    """Rotary position embedding (half-split form): rotates channel pairs (i, i + D/2) by position * freq_i.

    Callers name *slots* (indices in the sequence); ``positions`` [S] says the rotary position of each
    slot (a stage's layout: :meth:`~musiclm.models.layout.StageLayout.positions`), so every path that
    names a slot (training, the KV cache, the fixed-shape step) gets the same position from one table.
    Without ``positions`` a slot's position is its index, ``max_len`` of them tabled and any later one
    computed on the fly; with a table, a slot past it has no position and is refused.
    """

    def __init__(self, head_dim: int, base: float, max_len: int = 0, positions: torch.Tensor | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.continues = positions is None  # index positions extend past the table; a layout's do not
        cos, sin = self._table(torch.arange(max_len) if positions is None else torch.as_tensor(positions))
        # not persistent: derived from the config, so checkpoints hold only learned weights
        self.register_buffer("cos", cos, persistent=False)  # [S, D/2], row = slot
        self.register_buffer("sin", sin, persistent=False)

    def _table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of position * freq for ``positions`` [N] -> two [N, D/2] float32."""
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=positions.device) / self.head_dim))
        angles = torch.outer(positions.double(), inv_freq)  # [N, D/2]
        return angles.cos().float(), angles.sin().float()

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """``x`` [B, H, N, D] at slots ``start .. start + N - 1`` -> rotated, same shape and dtype."""
        n = x.shape[-2]
        if start + n <= self.cos.shape[0]:
            cos = self.cos[start : start + n]  # [N, D/2]
            sin = self.sin[start : start + n]
        elif self.continues:  # past the planned length (e.g. a long prompt): compute these positions on the fly
            cos, sin = self._table(torch.arange(start, start + n, device=x.device))
        else:
            raise ValueError(f"slots {start}..{start + n - 1} lie past the {self.cos.shape[0]} slots of this stage's sequence")
        return self._rotate(x, cos, sin)

    def at(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``x`` [B, H, 1, D] at slot ``position``, a 0-d int64 tensor on the device -> rotated, same shape.

        The slot is read on the device (no host sync, fixed shapes), so a captured CUDA graph can
        replay it at every position; it must lie within the table."""
        cos = self.cos.index_select(0, position.view(1))  # [1, D/2]
        sin = self.sin.index_select(0, position.view(1))
        return self._rotate(x, cos, sin)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)  # [B, H, N, D/2] each
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
        self.index = index  # which layer's slot of the KV cache is ours
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head width {self.head_dim} must be even for rotary positions")
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rotary: Rotary, cache: KVCache | None) -> torch.Tensor:
        b, n, d = x.shape  # [B, N, d]
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, D]
        past = cache.length if cache is not None else 0
        q = rotary(q, past)
        k = rotary(k, past)
        if cache is not None:
            cache.k[self.index][:, :, past : past + n] = k
            cache.v[self.index][:, :, past : past + n] = v
            k = cache.k[self.index][:, :, : past + n]  # [B, H, L, D]
            v = cache.v[self.index][:, :, : past + n]
        dropout = self.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=n > 1)
        elif n == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # one new token sees everything
        else:
            # is_causal aligns the mask top-left; new query i sits at absolute position past + i
            mask = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(diagonal=past)  # [N, L]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(b, n, d)  # [B, N, d]
        return self.proj(y)

    def step(self, x: torch.Tensor, rotary: Rotary, cache: KVCache, position: torch.Tensor) -> torch.Tensor:
        """One new token per row at ``position`` (0-d int64 tensor): ``x`` [B, 1, d] -> [B, 1, d].

        Every shape is fixed whatever the position: the key and value are written into the cache with
        ``index_copy_`` and the query attends over all ``max_len`` cached positions with a mask that
        hides those after ``position``. The same numbers as :meth:`forward` with a cache of length
        ``position``; this form can be captured once as a CUDA graph and replayed at every position.
        """
        b, _, d = x.shape
        q, k, v = self.qkv(x).view(b, 1, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, 1, D]
        q, k = rotary.at(q, position), rotary.at(k, position)
        keys, values = cache.k[self.index], cache.v[self.index]  # [B, H, max_len, D]
        keys.index_copy_(2, position.view(1), k)
        values.index_copy_(2, position.view(1), v)
        visible = (torch.arange(cache.max_len, device=x.device) <= position).view(1, -1)  # [1, max_len]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)  # [B, H, 1, D]
        return self.proj(y.transpose(1, 2).reshape(b, 1, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_width(cfg)
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [B, N, hidden] each
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, index)
        self.mlp_norm = nn.RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rotary: Rotary, cache: KVCache | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), rotary, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))

    def step(self, x: torch.Tensor, rotary: Rotary, cache: KVCache, position: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.step(self.attn_norm(x), rotary, cache, position)
        return x + self.mlp(self.mlp_norm(x))


class MusicTransformer(nn.Module):
    """Decoder-only transformer over one stage's flat id sequence, with one output head per target codebook."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, target_levels: int, codebook_size: int, max_seq_len: int, positions: np.ndarray | None = None):
        """``positions`` [max_seq_len]: the rotary position of each slot (a layout's); None: the slot's index."""
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.target_levels = target_levels
        self.codebook_size = codebook_size
        self.max_seq_len = max_seq_len
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.heads = nn.ModuleList(nn.Linear(cfg.d_model, codebook_size, bias=False) for _ in range(target_levels))
        if positions is not None and len(positions) != max_seq_len:
            raise ValueError(f"{len(positions)} positions for a sequence of {max_seq_len} slots")
        table = None if positions is None else torch.as_tensor(np.asarray(positions, dtype=np.int64))
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.rope_base, max_seq_len, table)
        self._init_weights()

    @classmethod
    def for_layout(cls, cfg: ModelConfig, layout: StageLayout) -> MusicTransformer:
        """The model of one stage: vocabulary, heads, length and positions (``cfg.positions``) from ``layout``."""
        return cls(cfg, layout.vocab_size, layout.target_levels, layout.target_codebook, layout.seq_len, layout.positions(cfg.positions))

    def _init_weights(self) -> None:
        # GPT-2: N(0, 0.02) everywhere; projections that add into the residual stream are scaled
        # down by sqrt(2 * n_layers) so the stream's variance does not grow with depth
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * max(self.cfg.n_layers, 1))
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, mean=0.0, std=residual_std)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states.

        ``tokens`` [B, N] int64 -> [B, N, d]. With ``cache``, ``tokens`` are the new positions only:
        they attend to the ``cache.length`` cached positions and causally among themselves, their
        slots continue from ``cache.length``, and the cache is extended in place.
        """
        if cache is not None:
            if tokens.shape[0] != cache.batch_size:
                raise ValueError(f"batch of {tokens.shape[0]} sequences fed to a cache made for {cache.batch_size}")
            if cache.length + tokens.shape[1] > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions; {cache.length} + {tokens.shape[1]} do not fit")
        x = self.drop(self.embed(tokens))  # [B, N, d]
        for block in self.blocks:
            x = block(x, self.rotary, cache)
        if cache is not None:
            cache.length += tokens.shape[1]
        return self.norm(x)

    def step(self, tokens: torch.Tensor, cache: KVCache, position: torch.Tensor) -> torch.Tensor:
        """One token per row at ``position`` with fixed shapes (see :meth:`Attention.step`), for inference.

        ``tokens`` [B, 1] int64, ``position`` a 0-d int64 tensor on the model's device holding the
        number of positions before it (all in ``cache``) -> final-normed hidden state [B, d]. The
        cache's ``length`` is not read or advanced: the caller keeps the position.
        """
        x = self.embed(tokens)  # [B, 1, d]
        for block in self.blocks:
            x = block.step(x, self.rotary, cache, position)
        return self.norm(x)[:, -1]

    def logits(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        """Output head of target codebook ``level``: [..., d] -> [..., K]."""
        return self.heads[level](hidden)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, label_levels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats) over labelled positions.

        ``tokens``, ``labels``, ``label_levels``: [B, N] int64 as built by ``StageLayout.encode``
        (``labels`` = code within its codebook or ``IGNORE``; ``label_levels`` = which head).
        Each head sees only its own positions, so no [B, N, levels, K] tensor is built.
        """
        hidden = self.forward(tokens)  # [B, N, d]
        keep = labels != IGNORE
        h = hidden[keep]  # [n, d]
        y = labels[keep]  # [n]
        lv = label_levels[keep]  # [n]
        total = hidden.new_zeros((), dtype=torch.float32)
        # every head joins the graph even when it has no position in this batch (DDP expects all grads)
        for level in range(self.target_levels):
            sel = lv == level
            logits = self.logits(h[sel], level).float()  # [n_level, K]
            total = total + F.cross_entropy(logits, y[sel], reduction="sum")
        return total / keep.sum().clamp(min=1)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` sequences of up to ``max_len`` positions
        (device and dtype default to the model's)."""
        p = self.embed.weight
        head_dim = self.cfg.d_model // self.cfg.n_heads
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.n_heads, head_dim, max_len, device or p.device, dtype or p.dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
