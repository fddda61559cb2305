"""Sampling: logit filters, the draw, KV-cached vs recomputed sampling, guidance, prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from musiclm.models.layout import StageLayout
from musiclm.models.sampling import draw_noise, filter_logits, pick, sample_target
from musiclm.models.static_sampling import SamplerSettings, StaticSampler
from tests.factories import fake_info, fake_sample
from tests.test_transformer import memorised_windows, tiny_model, train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread for the whole module

NEG = float("-inf")


# ---- filters and the draw ----------------------------------------------------------------------
def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row != NEG).flatten().tolist() for row in logits.reshape(-1, logits.shape[-1])]


def test_top_k_keeps_exactly_the_k_largest_logits():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = filter_logits(logits, top_k=2)
    assert kept(out) == [[1, 3], [0, 1]]
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])  # kept logits are untouched


def test_top_k_keeps_ties_at_the_boundary():
    assert kept(filter_logits(torch.tensor([1.0, 2.0, 2.0, 0.0]), top_k=2)) == [[1, 2]]
    assert kept(filter_logits(torch.tensor([2.0, 1.0, 1.0, 0.0]), top_k=2)) == [[0, 1, 2]]


def test_top_p_keeps_the_smallest_most_likely_set_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.2, 0.1])  # sorted: 1 (0.5), 3 (0.2), 0 (0.15), 4 (0.1), 2 (0.05)
    logits = probs.log()
    assert kept(filter_logits(logits, top_p=0.5)) == [[1]]
    assert kept(filter_logits(logits, top_p=0.69)) == [[1, 3]]
    assert kept(filter_logits(logits, top_p=0.71)) == [[0, 1, 3]]
    assert kept(filter_logits(logits, top_p=0.9)) == [[0, 1, 3, 4]]  # 0.85 < 0.9
    assert kept(filter_logits(logits, top_p=0.1)) == [[1]]  # the most likely token always stays


def test_top_p_applies_to_the_distribution_left_by_top_k():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    # after top-k 2 the renormalised mass is 0.625 / 0.375: p = 0.6 needs only the first
    assert kept(filter_logits(logits, top_k=2, top_p=0.6)) == [[0]]
    assert kept(filter_logits(logits, top_p=0.6)) == [[0, 1]]


def test_filters_switched_off_leave_logits_unchanged():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0), logits)
    assert torch.equal(filter_logits(logits, top_k=7), logits)


def test_filters_reject_out_of_range_values():
    with pytest.raises(ValueError):
        filter_logits(torch.zeros(4), top_k=-1)
    with pytest.raises(ValueError):
        filter_logits(torch.zeros(4), top_p=0.0)


def test_draws_follow_the_tempered_softmax():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().expand(40_000, 3)
    g = torch.Generator().manual_seed(0)

    def draws(**kw) -> torch.Tensor:
        return torch.bincount(pick(logits, draw_noise(g, 1, 40_000, 3, "cpu")[0], **kw), minlength=3)

    assert torch.allclose(draws().float() / 40_000, probs, atol=0.01)
    tempered = probs.sqrt() / probs.sqrt().sum()  # temperature 2: p^(1/2), renormalised
    assert torch.allclose(draws(temperature=2.0).float() / 40_000, tempered, atol=0.01)
    assert draws(top_k=1).tolist() == [40_000, 0, 0]
    assert torch.bincount(pick(logits, None), minlength=3).tolist() == [40_000, 0, 0]  # no noise: greedy


# ---- sampling from a model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def layout() -> StageLayout:
    return StageLayout("coarse", fake_info(), 0.2)  # clap 4 + semantic 10 -> acoustic 3 levels x 15 frames


@pytest.fixture(scope="module")
def prefixes(layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional and unconditional prefixes of three different windows: two [3, P] tensors."""
    rng = np.random.default_rng(3)
    windows = [layout.window_at(fake_sample(layout.info, 1.0, rng, name=f"c{i}.wav"), 0.0) for i in range(3)]
    cond = torch.from_numpy(np.stack([layout.prefix(w) for w in windows]))
    uncond = torch.from_numpy(np.stack([layout.prefix(w, drop_cond=True) for w in windows]))
    return cond, uncond


@pytest.fixture(scope="module")
def model(layout):
    return tiny_model(layout, seed=1)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


SETTINGS = {
    "greedy": {"greedy": True},
    "temperature-top-k-top-p": {"temperature": 1.0, "top_k": 8, "top_p": 0.9},
    "greedy-cfg": {"greedy": True, "cfg_scale": 3.0},
    "sampled-cfg": {"temperature": 1.0, "top_k": 8, "top_p": 0.9, "cfg_scale": 3.0},
}


OTHER_STEPS = {  # ways to sample that must give the tokens of the KV-cached steps (sample_target's default)
    "uncached": lambda *args, **kw: sample_target(*args, use_cache=False, **kw),  # the whole sequence recomputed each step
    "fixed-shape": lambda *args, **kw: static_sample(*args, **kw),  # below: the steps a GPU captures as CUDA graphs
}


@pytest.mark.parametrize("steps", OTHER_STEPS)
@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("prompt_len", [0, 7])
def test_uncached_and_fixed_shape_steps_sample_the_tokens_of_the_cached_steps(model, layout, prefixes, steps, name, prompt_len):
    cond, uncond = prefixes
    kw = dict(SETTINGS[name])
    if "cfg_scale" in kw:
        kw["uncond_prefix"] = uncond
    prompt = sample_target(model, layout, cond, prompt_len, generator=seeded(9)) if prompt_len else None
    n = layout.target.length
    cached = sample_target(model, layout, cond, n, target_prompt=prompt, generator=seeded(), use_cache=True, **kw)
    other = OTHER_STEPS[steps](model, layout, cond, n, target_prompt=prompt, generator=seeded(), **kw)
    assert cached.shape == (3, n)
    assert torch.equal(cached, other)


def test_sampled_ids_lie_in_the_codebook_of_their_level(model, layout, prefixes):
    ids = sample_target(model, layout, prefixes[0], layout.target.length, generator=seeded())
    for j in range(ids.shape[1]):
        start = layout.target_offset(int(layout.target_level(j)))
        assert torch.all((ids[:, j] >= start) & (ids[:, j] < start + layout.target_codebook))
    codes = layout.decode_target(ids[0].numpy())  # whole frames decode back to [levels, frames]
    assert codes.shape == (layout.target_levels, layout.target.frames)


def test_same_generator_seed_repeats_the_tokens_and_another_seed_changes_them(model, layout, prefixes):
    n = layout.target.length
    a = sample_target(model, layout, prefixes[0], n, generator=seeded(1))
    b = sample_target(model, layout, prefixes[0], n, generator=seeded(1))
    c = sample_target(model, layout, prefixes[0], n, generator=seeded(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_samples_the_greedy_sequence(model, layout, prefixes):
    n = layout.target.length
    greedy = sample_target(model, layout, prefixes[0], n, greedy=True)
    top1 = sample_target(model, layout, prefixes[0], n, top_k=1, generator=seeded())
    assert torch.equal(greedy, top1)


def test_cfg_scale_one_is_plain_conditional_sampling(model, layout, prefixes):
    cond, uncond = prefixes
    n = layout.target.length
    plain = sample_target(model, layout, cond, n, generator=seeded())
    guided = sample_target(model, layout, cond, n, cfg_scale=1.0, uncond_prefix=uncond, generator=seeded())
    assert torch.equal(plain, guided)


def test_cfg_scale_zero_follows_the_unconditional_prefix(model, layout, prefixes):
    cond, uncond = prefixes
    n = layout.target.length
    guided = sample_target(model, layout, cond, n, cfg_scale=0.0, uncond_prefix=uncond, greedy=True)
    unconditional = sample_target(model, layout, uncond, n, greedy=True)
    assert torch.equal(guided, unconditional)


def test_guidance_extrapolates_from_unconditional_towards_conditional_logits(model, layout, prefixes):
    cond, uncond = prefixes
    scale = 3.0
    with torch.no_grad():
        c = model.logits(model(cond)[:, -1], 0)
        u = model.logits(model(uncond)[:, -1], 0)
    expected = (u + scale * (c - u)).argmax(-1) + layout.target_offset(0)
    first = sample_target(model, layout, cond, 1, cfg_scale=scale, uncond_prefix=uncond, greedy=True)
    assert torch.equal(first[:, 0], expected)
    assert not torch.equal(expected, c.argmax(-1) + layout.target_offset(0))  # guidance changed something


def test_target_prompt_is_returned_and_continued_like_a_sampled_start(model, layout, prefixes):
    n = layout.target.length
    whole = sample_target(model, layout, prefixes[0], n, greedy=True)
    continued = sample_target(model, layout, prefixes[0], n, target_prompt=whole[:, :10], greedy=True)
    assert torch.equal(continued, whole)
    prompt = torch.full((3, 4), layout.target_offset(0))  # a prompt the model would not have chosen
    out = sample_target(model, layout, prefixes[0], n, target_prompt=prompt, greedy=True)
    assert torch.equal(out[:, :4], prompt)


def test_a_batch_samples_each_sequence_as_if_alone(model, layout, prefixes):
    n = layout.target.length
    batch = sample_target(model, layout, prefixes[0], n, greedy=True)
    for i in range(3):
        assert torch.equal(sample_target(model, layout, prefixes[0][i : i + 1], n, greedy=True), batch[i : i + 1])


def test_sampling_disables_dropout_and_restores_training_mode(layout, prefixes):
    model = tiny_model(layout, dropout=0.5).train()
    n = layout.target.length
    a = sample_target(model, layout, prefixes[0], n, generator=seeded(), use_cache=True)
    b = sample_target(model, layout, prefixes[0], n, generator=seeded(), use_cache=False)
    assert torch.equal(a, b)
    assert model.training


def test_prompt_longer_than_the_target_is_refused(model, layout, prefixes):
    with pytest.raises(ValueError, match="more than n_target"):
        sample_target(model, layout, prefixes[0], 3, target_prompt=torch.zeros(3, 5, dtype=torch.long))


def test_greedy_sampling_reproduces_a_memorised_window():
    layout, windows = memorised_windows()
    model, loss = train_tiny(layout, windows, steps=200)
    assert loss < 0.1 * math.log(layout.target_codebook)
    prefix = torch.from_numpy(np.stack([layout.prefix(w) for w in windows]))  # [4, P]
    target = torch.from_numpy(np.stack([layout.target_ids(w) for w in windows]))  # [4, 45]
    assert torch.equal(sample_target(model, layout, prefix, target.shape[1], greedy=True), target)
    # continuing from the first frames works the same way
    out = sample_target(model, layout, prefix, target.shape[1], target_prompt=target[:, :6], temperature=0.1, generator=seeded())
    assert torch.equal(out, target)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cached_and_uncached_sampling_agree_with_a_cpu_generator(layout, prefixes):
    model = tiny_model(layout, seed=1).cuda()
    cond, uncond = prefixes
    kw = {"temperature": 1.0, "top_k": 8, "top_p": 0.9, "cfg_scale": 3.0, "uncond_prefix": uncond}
    n = layout.target.length
    cached = sample_target(model, layout, cond, n, generator=seeded(), use_cache=True, **kw)
    full = sample_target(model, layout, cond, n, generator=seeded(), use_cache=False, **kw)
    assert cached.device.type == "cuda"
    assert torch.equal(cached, full)


# ---- fixed-shape steps (captured as CUDA graphs on a GPU) -----------------------------------------
def static_sample(model, layout, cond, n, *, capture=False, logits_out=None, **kw):
    settings = SamplerSettings(
        temperature=kw.pop("temperature", 1.0), top_k=kw.pop("top_k", 0), top_p=kw.pop("top_p", 1.0),
        cfg_scale=kw.pop("cfg_scale", 1.0), guided="uncond_prefix" in kw, greedy=kw.pop("greedy", False),
    )  # fmt: skip
    sampler = StaticSampler(model, layout, cond.shape[0], settings, capture=capture)
    return sampler.sample(cond, n, logits_out=logits_out, **kw).cpu()


def teacher_forced_logits(model, layout, cond, ids, m, *, cfg_scale=1.0, uncond=None):
    """The (guided) logits of every sampled step [n - m, B, K], from one uncached pass over the whole sequence."""
    seq = torch.cat([cond, ids], dim=1)
    rows = [seq] if uncond is None else [seq, torch.cat([uncond, ids], dim=1)]
    p, out = cond.shape[1], []
    with torch.inference_mode():
        hidden = [model(r.to(next(model.parameters()).device)) for r in rows]
        for j in range(m, ids.shape[1]):
            level = int(layout.target_level(j))
            lg = [model.logits(h[:, p + j - 1], level).float().cpu() for h in hidden]
            out.append(lg[0] if uncond is None else lg[1] + cfg_scale * (lg[0] - lg[1]))
    return torch.stack(out)


def test_one_sampler_serves_windows_of_different_lengths_and_prompts(model, layout, prefixes):
    """A sampler is made once per stage and reused: stale cache entries of a longer window must not leak."""
    cond, _ = prefixes
    n = layout.target.length
    sampler = StaticSampler(model, layout, 3, SamplerSettings(greedy=True), capture=False)
    long = sampler.sample(cond, n).cpu()
    short = sampler.sample(cond, n - 6, target_prompt=long[:, :3]).cpu()
    assert torch.equal(short, sample_target(model, layout, cond, n - 6, target_prompt=long[:, :3], greedy=True))


def check_fixed_shape_logits(model, layout, cond, uncond, capture, atol):
    n, m = layout.target.length, 4
    prompt = sample_target(model, layout, cond, m, greedy=True)
    for cfg in (1.0, 3.0):
        logits: list[torch.Tensor] = []
        kw = {"uncond_prefix": uncond, "cfg_scale": cfg} if cfg != 1.0 else {}
        ids = static_sample(model, layout, cond, n, capture=capture, logits_out=logits, target_prompt=prompt, greedy=True, **kw)
        ref = teacher_forced_logits(model, layout, cond, ids, m, cfg_scale=cfg, uncond=kw.get("uncond_prefix"))
        torch.testing.assert_close(torch.stack(logits), ref, atol=atol, rtol=0)
        greedy = sample_target(model, layout, cond, n, target_prompt=prompt, greedy=True, **kw).cpu()
        assert torch.equal(ids, greedy)


def test_fixed_shape_steps_give_the_teacher_forced_logits(model, layout, prefixes):
    check_fixed_shape_logits(model, layout, *prefixes, capture=False, atol=1e-4)


def test_a_sampler_refuses_what_it_cannot_do(model, layout, prefixes):
    cond, uncond = prefixes
    sampler = StaticSampler(model, layout, 3, SamplerSettings(greedy=True), capture=False)
    with pytest.raises(ValueError, match="takes 3 sequences"):
        sampler.sample(cond[:2], 5)
    with pytest.raises(ValueError, match="uncond_prefix"):
        sampler.sample(cond, 5, uncond_prefix=uncond)
    with pytest.raises(ValueError, match="CUDA"):
        StaticSampler(model, layout, 3, SamplerSettings(), capture=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (none here)")
def test_captured_cuda_graph_steps_match_the_uncaptured_ones(layout, prefixes):
    """On CUDA: teacher-forced logits of the captured steps within 1e-3 of one uncaptured pass (fp32,
    TF32 off), greedy tokens equal to the ordinary steps', and sampled tokens equal to the uncaptured
    fixed-shape steps' for the same seed."""
    cond, uncond = prefixes
    cuda = tiny_model(layout, seed=1).cuda().eval()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        check_fixed_shape_logits(cuda, layout, cond, uncond, capture=True, atol=1e-3)
        kw = {"temperature": 1.0, "top_k": 8, "top_p": 0.9, "cfg_scale": 3.0, "uncond_prefix": uncond}
        n = layout.target.length
        captured = static_sample(cuda, layout, cond, n, capture=True, generator=seeded(), **kw)
        eager = static_sample(cuda, layout, cond, n, capture=False, generator=seeded(), **kw)
        assert torch.equal(captured, eager)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_samplers_are_reused_per_batch_and_settings_and_the_least_recent_dropped(model, layout):
    from musiclm.models.static_sampling import KEEP_SAMPLERS, sampler_for

    cache: dict = {}
    first = sampler_for(model, layout, 3, SamplerSettings(greedy=True), False, cache)
    assert sampler_for(model, layout, 3, SamplerSettings(greedy=True), False, cache) is first
    assert sampler_for(model, layout, 2, SamplerSettings(greedy=True), False, cache) is not first
    for t in range(KEEP_SAMPLERS):
        sampler_for(model, layout, 1, SamplerSettings(temperature=0.5 + t), False, cache)
        sampler_for(model, layout, 3, SamplerSettings(greedy=True), False, cache)  # kept: used again and again
    assert len(cache) == KEEP_SAMPLERS and first in cache.values()
