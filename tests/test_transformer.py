"""MusicTransformer: shapes, loss, causality, KV cache, learning."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from musiclm.config import ModelConfig, load_config
from musiclm.models.layout import IGNORE, StageLayout
from musiclm.models.transformer import MusicTransformer, Rotary, mlp_width
from tests.factories import fake_info, fake_sample


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread for the whole module


@pytest.fixture(scope="module")
def layout() -> StageLayout:
    # coarse stage of a 0.4 s window: clap 4 + semantic 20 -> acoustic 3 levels x 30 frames (114 tokens)
    return StageLayout("coarse", fake_info(), 0.4)


def tiny_model(layout: StageLayout, seed: int = 0, **overrides) -> MusicTransformer:
    cfg = dataclasses.replace(load_config("tiny").model, **overrides)
    torch.manual_seed(seed)
    return MusicTransformer.for_layout(cfg, layout).eval()


def random_tokens(layout: StageLayout, batch: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, layout.vocab_size, (batch, n), generator=g)


def test_forward_gives_one_hidden_state_per_position_and_heads_give_codebook_logits(layout):
    model = tiny_model(layout)
    d = model.cfg.d_model
    hidden = model(random_tokens(layout, 3, 17))
    assert hidden.shape == (3, 17, d)
    assert len(model.heads) == layout.target_levels == 3
    for level in range(layout.target_levels):
        assert model.logits(hidden, level).shape == (3, 17, layout.target_codebook)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) > 0


def test_mlp_width_defaults_to_eight_thirds_of_d_model_rounded_up_to_64():
    assert mlp_width(ModelConfig(d_model=1024, mlp_hidden=0)) == 2752  # 2730.7 -> 43 * 64
    assert mlp_width(ModelConfig(d_model=64, mlp_hidden=0)) == 192  # 170.7 -> 3 * 64
    assert mlp_width(ModelConfig(d_model=64, mlp_hidden=100)) == 100


def test_loss_equals_hand_computed_cross_entropy_over_labelled_positions(layout):
    model = tiny_model(layout)
    tokens = random_tokens(layout, 2, 9)
    labels = torch.full((2, 9), IGNORE)
    levels = torch.zeros(2, 9, dtype=torch.long)
    # (batch, position, level, code): mixed levels, most positions unlabelled
    picks = [(0, 2, 0, 5), (0, 3, 1, 31), (0, 4, 2, 0), (1, 0, 2, 7), (1, 8, 0, 12)]
    for b, i, lv, code in picks:
        labels[b, i], levels[b, i] = code, lv

    hidden = model(tokens)
    expected = sum(-F.log_softmax(model.logits(hidden[b, i], lv), dim=-1)[code] for b, i, lv, code in picks) / len(picks)
    assert torch.allclose(model.loss(tokens, labels, levels), expected, atol=1e-6)


def test_loss_gives_every_head_a_gradient_even_when_its_level_is_absent(layout):
    # DDP requires every parameter to take part in every step
    model = tiny_model(layout).train()
    tokens = random_tokens(layout, 2, 9)
    labels = torch.full((2, 9), IGNORE)
    labels[0, 3] = 4  # level 0 only
    loss = model.loss(tokens, labels, torch.zeros(2, 9, dtype=torch.long))
    loss.backward()
    assert model.heads[0].weight.grad.abs().sum() > 0
    for head in model.heads[1:]:
        assert head.weight.grad is not None and torch.all(head.weight.grad == 0)


def test_changing_a_later_token_leaves_earlier_hidden_states_unchanged(layout):
    model = tiny_model(layout)
    tokens = random_tokens(layout, 1, 20)
    changed = tokens.clone()
    changed[0, 12] = (changed[0, 12] + 1) % layout.vocab_size
    a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def test_cached_forward_matches_full_forward_for_prefill_single_tokens_and_appended_blocks(layout):
    model = tiny_model(layout)
    tokens = random_tokens(layout, 2, 40)
    full = model(tokens)  # [2, 40, d]
    cache = model.new_cache(2, 40)
    pieces = [model(tokens[:, :10], cache)]  # prefill into an empty cache
    for i in range(10, 20):  # one token at a time
        pieces.append(model(tokens[:, i : i + 1], cache))
    pieces.append(model(tokens[:, 20:33], cache))  # a block appended after cached positions
    pieces.append(model(tokens[:, 33:40], cache))
    assert cache.length == 40
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_cache_is_preallocated_and_filled_in_place(layout):
    model = tiny_model(layout)
    cache = model.new_cache(2, 16)
    assert cache.k[0].shape == (2, model.cfg.n_heads, 16, model.cfg.d_model // model.cfg.n_heads)
    assert len(cache.k) == len(cache.v) == model.cfg.n_layers
    pointers = [t.data_ptr() for t in cache.k + cache.v]
    tokens = random_tokens(layout, 2, 16)
    model(tokens[:, :5], cache)
    for i in range(5, 16):
        model(tokens[:, i : i + 1], cache)
    assert [t.data_ptr() for t in cache.k + cache.v] == pointers
    assert cache.length == 16
    with pytest.raises(ValueError, match="do not fit"):
        model(tokens[:, :1], cache)


def test_rotary_positions_continue_past_the_planned_sequence_length(layout):
    cfg = load_config("tiny").model
    torch.manual_seed(0)
    model = MusicTransformer(cfg, layout.vocab_size, layout.target_levels, layout.target_codebook, max_seq_len=8).eval()
    tokens = random_tokens(layout, 1, 20)
    full = model(tokens)
    cache = model.new_cache(1, 20)
    pieces = [model(tokens[:, :5], cache)] + [model(tokens[:, i : i + 1], cache) for i in range(5, 20)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def rotated(rotary: Rotary, x: torch.Tensor, position: int) -> torch.Tensor:
    """One head vector ``x`` [D] as rotary sees it at ``position``."""
    return rotary(x.view(1, 1, 1, -1), position).view(-1)


def test_rotary_attention_scores_depend_on_relative_position_only():
    """q.k after rotary is a function of j - i: the same pair shifted by s scores the same.
    The table covers 64 positions; shifts of 500 also check positions computed on the fly."""
    rotary = Rotary(head_dim=16, base=10_000.0, max_len=64)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        q, k = torch.randn(2, 16, generator=g)
        for i, j in [(0, 0), (3, 7), (7, 3), (10, 50), (63, 1)]:
            score = rotated(rotary, q, i) @ rotated(rotary, k, j)
            for s in (1, 13, 40, 500):
                shifted = rotated(rotary, q, i + s) @ rotated(rotary, k, j + s)
                assert shifted.item() == pytest.approx(score.item(), abs=1e-4), (i, j, s)
        # and the score does see the distance (a rotary that did nothing would pass the above)
        near, far = (rotated(rotary, q, 0) @ rotated(rotary, k, j) for j in (0, 5))
        assert abs(near.item() - far.item()) > 1e-2


def test_rotary_preserves_the_norm_of_every_head_vector():
    rotary = Rotary(head_dim=16, base=10_000.0, max_len=64)
    x = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(1))  # [B, H, N, D]
    for start in (0, 30, 100):  # inside the table, across its end, past it
        assert torch.allclose(rotary(x, start).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert not torch.allclose(rotary(x, 5), x, atol=1e-2)


def test_residual_projections_start_smaller_than_other_weights(layout):
    model = tiny_model(layout)
    n_layers = model.cfg.n_layers
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    for block in model.blocks:
        assert block.attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * n_layers), rel=0.1)
        assert block.mlp.down.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * n_layers), rel=0.1)


def test_dropout_applies_in_training_mode_only(layout):
    model = tiny_model(layout, dropout=0.5)
    tokens = random_tokens(layout, 1, 12)
    assert torch.equal(model(tokens), model(tokens))
    model.train()
    assert not torch.allclose(model(tokens), model(tokens))


def test_state_dict_holds_only_learned_weights(layout):
    model = tiny_model(layout)
    names = set(model.state_dict())
    assert not any("rotary" in n for n in names)
    restored = tiny_model(layout, seed=1)
    restored.load_state_dict(model.state_dict())
    tokens = random_tokens(layout, 1, 12)
    assert torch.equal(restored(tokens), model(tokens))


def memorised_windows(seconds: float = 0.2) -> tuple[StageLayout, list[dict[str, np.ndarray]]]:
    """A short coarse layout and four fixed windows of one fake clip (codes in runs, acoustic
    codes a function of semantic ones): a deterministic data set a tiny model can memorise."""
    layout = StageLayout("coarse", fake_info(), seconds)  # clap 4 + semantic 10 -> acoustic 3 x 15 (59 tokens)
    sample = fake_sample(layout.info, 2.0, np.random.default_rng(7))
    return layout, [layout.window_at(sample, start) for start in (0.0, 0.4, 0.8, 1.2)]


def train_tiny(layout: StageLayout, windows: list[dict[str, np.ndarray]], steps: int) -> tuple[MusicTransformer, float]:
    """Train the tiny preset on ``windows`` (one batch, every step); return the model and its final loss."""
    model = tiny_model(layout).train()
    encoded = [layout.encode(w) for w in windows]
    tokens, labels, levels = (torch.from_numpy(np.stack([getattr(e, f) for e in encoded])) for f in ("tokens", "labels", "label_levels"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        loss = model.loss(tokens, labels, levels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model, model.loss(tokens, labels, levels).item()


def test_tiny_model_learns_a_deterministic_sequence():
    layout, windows = memorised_windows()
    _model, loss = train_tiny(layout, windows, steps=200)
    # an untrained model sits at log(K) = 3.47 nats
    assert loss < 0.1 * math.log(layout.target_codebook)
