"""One short run of the CUDA paths, for a machine with a GPU.

    python benchmarks/gpu_check.py --data DIR --audio FOLDER [--out result.json]

DIR is a corpus tokenized here with the tiny preset (its tokenizer/ and shards/),
FOLDER a few audio files. Each part is timed and reported even if another fails:

1. tokenize on the GPU: the tiny tokenizer on cuda against the same tokenizer on
   the CPU (agreement of codes), and the `small` backbone architectures at random
   weights on cuda: audio-seconds per second of MERT + Encodec + CLAP, batch 1 and
   batched as the tokenize actor calls them, per precision (fp32, bf16, fp16), with
   the code agreement of each against fp32 and of batch 1 against batched;
2. training: `musiclm train` on cuda (bf16 autocast) for a few tiny steps, and the
   `small` transformer's training step in bf16 against fp32 (tokens/s);
3. generation: tiny stages trained on cuda, then `MusicLM.generate` on cuda, today's
   path (fp32, a launch per kernel) against the default (bf16, CUDA graphs); stream ==
   generate; the captured steps of the `small` coarse stage against the ordinary ones
   (logits, greedy tokens, ms per step).

The full generation benchmark on the GPU is one more command:
`python benchmarks/bench_generate.py --device cuda --seconds 10`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS: dict = {}
DEVICE = "cuda"  # --device cpu: a dry run of this script on a machine without a GPU
QUICK = False  # --quick: fewer clips, steps and seconds (for the dry run)


def part(name):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                RESULTS[name] = fn(*a, **k)
                RESULTS[name]["ok"] = True
            except Exception as e:  # noqa: BLE001 - report and go on with the other parts
                RESULTS[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            RESULTS[name]["seconds"] = round(time.perf_counter() - t0, 2)
            print(name, json.dumps(RESULTS[name], default=str)[:1500], flush=True)

        return run

    return wrap


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@part("tokenize_tiny_cuda_vs_cpu")
def tokenize_tiny(data: Path, audio: Path) -> dict:
    from musiclm.pipeline.audio import list_audio_files, load_for_rates
    from musiclm.pipeline.tokenizer import Tokenizer

    cpu = Tokenizer.load(data / "tokenizer", device="cpu")
    gpu = Tokenizer.load(data / "tokenizer", device=DEVICE)
    agree = {"semantic": [], "acoustic": [], "clap": []}
    seconds, t_gpu = 0.0, 0.0
    for f in list_audio_files(audio)[: 2 if QUICK else 6]:
        clip = load_for_rates(f, 0.0, None, cpu.sample_rates)
        a = cpu.tokenize(clip)
        sync()
        t0 = time.perf_counter()
        b = gpu.tokenize(clip)
        sync()
        t_gpu += time.perf_counter() - t0
        seconds += len(clip[cpu.codec.sample_rate]) / cpu.codec.sample_rate
        for k in agree:
            agree[k].append(float((a[k] == b[k]).mean()))
    return {"audio_s": round(seconds, 1), "gpu_audio_s_per_s": round(seconds / t_gpu, 1), "code_agreement_cpu_vs_cuda": {k: round(float(np.mean(v)), 4) for k, v in agree.items()}}


@part("tokenize_small_cuda")
def tokenize_small(audio: Path) -> dict:
    from bench_tokenize import small_random_config
    from bench_train_vs_onthefly import random_quantizers

    from musiclm.pipeline.audio import list_audio_files, load_for_rates
    from musiclm.pipeline.tokenizer import Tokenizer

    tok = Tokenizer.from_config(small_random_config(1024).tokenize, device=DEVICE)
    tok.quantizers = random_quantizers(tok)
    clips = [load_for_rates(f, 0.0, None, tok.sample_rates) for f in list_audio_files(audio)[: 2 if QUICK else 6]]
    tok.tokenize(clips[0])  # warm-up
    times = {"mert": 0.0, "encodec": 0.0, "clap": 0.0, "tokenize": 0.0}
    seconds = 0.0
    for c in clips:
        seconds += len(c[tok.codec.sample_rate]) / tok.codec.sample_rate
        for name, fn in (
            ("mert", lambda: tok.semantic_features(c[tok.semantic.sample_rate])),
            ("encodec", lambda: tok.encode_acoustic(c[tok.codec.sample_rate])),
            ("clap", lambda: tok.clap_audio_embed(tok.clap_windows(c[tok.clap.sample_rate]))),
            ("tokenize", lambda: tok.tokenize(c)),
        ):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name] += time.perf_counter() - t0
    bare = times["mert"] + times["encodec"] + times["clap"]
    return {
        "audio_s": round(seconds, 1),
        "audio_s_per_s": {k: round(seconds / v, 1) for k, v in times.items()},
        "bare_sum_audio_s_per_s": round(seconds / bare, 1),
        "tokenize_vs_bare": round(bare / times["tokenize"], 3),
    }


def synthetic_clips(tok, n: int, seconds: float) -> list[dict[int, np.ndarray]]:
    """``n`` clips of chords over noise at every backbone rate, made with numpy alone (the GPU
    machine has no soundfile or soxr)."""
    rng = np.random.default_rng(0)
    clips = []
    for i in range(n):
        freqs = 110 * 2 ** (rng.integers(0, 24, 3) / 12)
        clip = {}
        for sr in tok.sample_rates:
            t = np.arange(int(seconds * sr)) / sr
            x = sum(np.sin(2 * np.pi * f * t) for f in freqs) / 4 + 0.02 * np.random.default_rng(i).standard_normal(len(t))
            clip[sr] = x.astype(np.float32)
        clips.append(clip)
    return clips


def encodec_codebooks_from_frames(tok, clips) -> None:
    """Give a random Encodec codebooks drawn from its own encoder frames (a random one has all-zero
    codebooks: every code 0, and agreement would be 1 trivially). No k-means: faiss is not there."""
    x = torch.from_numpy(np.stack([c[tok.codec.sample_rate] for c in clips])).to(DEVICE)
    frames = tok.codec.latents(x).reshape(-1, tok.codec.model.config.codebook_dim)
    g = torch.Generator(device="cpu").manual_seed(0)
    for level in range(tok.codec.num_quantizers):
        cb = tok.codec.model.quantizer.layers[level].codebook
        pick = torch.randint(0, len(frames), (tok.codec.codebook_size,), generator=g).to(frames.device)
        cb.embed.copy_(frames[pick] * 0.5**level)
        cb.inited.fill_(1.0)


@part("tokenize_small_batched")
def tokenize_small_batched() -> dict:
    """The small backbones batched as the tokenize actor calls them (equal-length segments), per
    precision: audio-seconds per second of each backbone and of tokenize_batch, against batch-1
    calls, and code agreement of bf16 and fp16 against fp32."""
    from dataclasses import replace

    from bench_tokenize import small_random_config
    from bench_train_vs_onthefly import random_quantizers

    from musiclm.pipeline.tokenizer import Tokenizer

    tok = Tokenizer.from_config(small_random_config(1024).tokenize, device=DEVICE)
    tok.quantizers = random_quantizers(tok)
    base = tok.cfg
    seconds = 10.0 if QUICK else 30.0
    clips = synthetic_clips(tok, 2 if QUICK else 8, seconds)
    encodec_codebooks_from_frames(tok, clips)
    audio = seconds * len(clips)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    stack = {sr: np.stack([c[sr] for c in clips]) for sr in tok.sample_rates}
    windows = [w for c in clips for w in tok.clap_windows(c[tok.clap.sample_rate])]
    out: dict = {"audio_s": audio, "clips": len(clips)}
    codes = {}
    for precision in ("fp32", "bf16", "fp16"):
        tok.cfg = replace(base, precision=precision)
        try:
            tok.tokenize_batch(clips[:1])  # warm-up
            row = {
                "mert": audio / timed(lambda: tok.semantic_features(stack[tok.semantic.sample_rate])),
                "encodec": audio / timed(lambda: tok.encode_acoustic(stack[tok.codec.sample_rate])),
                "clap": audio / timed(lambda: tok.clap_audio_embed(windows)),
            }
            result: list = []
            row["tokenize_batch"] = audio / timed(lambda: result.extend(tok.tokenize_batch(clips)))
            codes[precision] = result
            out[precision] = {k: round(v, 1) for k, v in row.items()}
        except Exception as e:  # noqa: BLE001 - a precision the device cannot run is reported, not fatal
            out[precision] = {"error": f"{type(e).__name__}: {e}"[:300]}
    tok.cfg = base
    batch1 = timed(lambda: [tok.tokenize(c) for c in clips])
    out["fp32_batch1_tokenize"] = round(audio / batch1, 1)
    out["agreement_batch1_vs_batched_fp32"] = {}
    alone = [tok.tokenize(c) for c in clips]
    for name in ("semantic", "acoustic", "clap"):
        out["agreement_batch1_vs_batched_fp32"][name] = round(float(np.mean([np.mean(a[name] == b[name]) for a, b in zip(alone, codes["fp32"])])), 4)
    for precision in ("bf16", "fp16"):
        if precision in codes:
            out[f"agreement_{precision}_vs_fp32"] = {
                name: round(float(np.mean([np.mean(a[name] == b[name]) for a, b in zip(codes["fp32"], codes[precision]) if not isinstance(b, Exception)])), 4)
                for name in ("semantic", "acoustic", "clap")
            }
    return out


@part("train_tiny_cuda_bf16")
def train_tiny(data: Path, work: Path) -> dict:
    from musiclm.config import load_config
    from musiclm.training.trainer import run_train

    cfg = load_config("tiny")
    out = {}
    for stage in ("semantic", "coarse", "fine"):
        run_train(stage, data, work / stage, cfg, steps=4 if QUICK else 40, eval_every=4 if QUICK else 40, save_every=4 if QUICK else 40, device=DEVICE, num_workers=0)
        metrics = [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]
        losses = [m["train/loss"] for m in metrics if "train/loss" in m]
        out[stage] = {"first_loss": round(losses[0], 3), "last_loss": round(losses[-1], 3), "val_loss": [m["val/loss"] for m in metrics if "val/loss" in m][-1]}
    return out


@part("train_small_step_bf16_vs_fp32")
def train_small() -> dict:
    from musiclm.config import load_config
    from musiclm.models.layout import layout_for
    from musiclm.models.transformer import MusicTransformer
    from musiclm.training.optim import param_groups
    from tests.factories import fake_info

    cfg = load_config("small")
    info = fake_info(sem_k=1024, ac_k=1024, clap_levels=12, clap_k=1024, window=10.0, hop=5.0, emb_dim=512)
    out = {}
    for stage in ("semantic", "coarse"):
        layout = layout_for(stage, info, cfg.stages.get(stage))
        model = MusicTransformer.for_layout(cfg.model, layout).to(DEVICE)
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=DEVICE == "cuda")
        b = 1 if QUICK else 16
        tokens = torch.randint(0, layout.vocab_size - 2, (b, layout.seq_len), device=DEVICE)
        labels = torch.randint(0, layout.target_codebook, (b, layout.seq_len), device=DEVICE)
        labels[:, : layout.prefix_len - 1] = -100
        levels = torch.arange(layout.seq_len, device=DEVICE).remainder(layout.target_levels).expand(b, -1).contiguous()
        for dtype in ("bf16", "fp32"):
            def step(model=model, opt=opt):
                with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    loss = model.loss(tokens, labels, levels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                return loss

            for _ in range(1 if QUICK else 3):
                step()
            sync()
            t0 = time.perf_counter()
            n = 1 if QUICK else 10
            for _ in range(n):
                loss = step()
            sync()
            dt = (time.perf_counter() - t0) / n
            out[f"{stage}_{dtype}"] = {"tokens_per_s": round(b * layout.seq_len / dt), "step_s": round(dt, 4), "loss_finite": bool(torch.isfinite(loss))}
        del model, opt
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return out


@part("generate_tiny_cuda")
def generate(work: Path) -> dict:
    """Trained tiny stages on cuda: today's path (fp32, a launch per kernel) against the default
    (bf16, decode steps captured as CUDA graphs); stream == generate; captured == uncaptured steps."""
    from musiclm.generation import MusicLM

    prompt = "a calm piano over soft rain"
    runs = dict(semantic=work / "semantic", coarse=work / "coarse", fine=work / "fine", device=DEVICE)
    out: dict = {}
    graphs = DEVICE == "cuda"
    for label, kw in (("fp32_eager", {"precision": "fp32", "cuda_graphs": False}), ("default", {"cuda_graphs": graphs})):
        m = MusicLM.from_runs(**runs, **kw)
        m.generate(prompt, seconds=2.0, seed=9)  # warm-up: graph capture, allocator
        sync()
        t0 = time.perf_counter()
        g = m.generate_with_details(prompt, seconds=8.0, num_samples=2, keep=1, seed=0)
        sync()
        out[label] = {"precision": m.precision, "cuda_graphs": m.cuda_graphs, "wall_s": round(time.perf_counter() - t0, 2),
                      "timings": {k: round(v, 3) for k, v in g.timings.items()}, "finite": bool(np.isfinite(g.audio).all()),
                      "samples": int(g.audio.shape[1]), "expected_samples": round(8.0 * 75) * g.sample_rate // 75}  # fmt: skip
    chunks = list(m.stream(prompt, seconds=4.0, seed=3))
    whole, _ = m.generate(prompt, seconds=4.0, num_samples=1, seed=3)
    out["stream_equals_generate"] = bool(np.array_equal(np.concatenate(chunks), whole))
    # fp32, greedy: the captured fixed-shape steps against the ordinary steps
    greedy = {}
    for captured in (False, graphs):
        m = MusicLM.from_runs(**runs, precision="fp32", cuda_graphs=captured)
        greedy[captured] = m.generate_with_details(prompt, seconds=3.0, temperature=0.0, num_samples=1, seed=1)
    out["greedy_captured_equals_eager"] = {
        "semantic": bool(np.array_equal(greedy[False].semantic, greedy[graphs].semantic)),
        "acoustic_share_equal": float((greedy[False].acoustic == greedy[graphs].acoustic).mean()),
    }
    out["captured_logits"] = captured_logit_check()
    return out


def captured_logit_check() -> dict:
    """The small coarse stage at random weights (fp32, TF32 off): teacher-forced logits of the captured
    steps against one uncaptured pass, greedy tokens against the ordinary steps, and ms per step."""
    from bench_generate import random_parts

    from musiclm.models.sampling import sample_target
    from musiclm.models.static_sampling import SamplerSettings, StaticSampler

    tok, stages = random_parts("small", DEVICE)
    st = stages["coarse"]
    model, layout = st.model.eval(), st.layout
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = np.random.default_rng(0)
    prefix = torch.from_numpy(rng.integers(0, layout.target_offset(0), size=(1, layout.prefix_len)))
    n = 300 if QUICK else layout.target.length
    logits: list[torch.Tensor] = []
    sampler = StaticSampler(model, layout, 1, SamplerSettings(greedy=True), capture=DEVICE == "cuda")
    ids = sampler.sample(prefix, n, logits_out=logits).cpu()
    with torch.inference_mode():
        hidden = model(torch.cat([prefix, ids], dim=1).to(DEVICE))
        ref = torch.stack([model.logits(hidden[:, prefix.shape[1] + j - 1], int(layout.target_level(j))).float().cpu() for j in range(n)])
    ordinary = sample_target(model, layout, prefix, n, greedy=True).cpu()
    timings = {}
    for label, fn in (("captured", lambda: sampler.sample(prefix, n)), ("ordinary", lambda: sample_target(model, layout, prefix, n, greedy=True))):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        timings[label] = round(1000 * (time.perf_counter() - t0) / n, 3)
    return {
        "max_abs_logit_diff": float((torch.stack(logits) - ref).abs().max()),
        "greedy_tokens_equal": bool(torch.equal(ids, ordinary)),
        "first_difference": int((ids != ordinary).nonzero()[0, 1]) if not torch.equal(ids, ordinary) else None,
        "ms_per_step": timings,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--audio", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer steps and clips (a dry run)")
    args = ap.parse_args()
    global DEVICE, QUICK
    DEVICE, QUICK = args.device, args.quick
    RESULTS["device"] = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    RESULTS["torch"] = torch.__version__
    import transformers

    RESULTS["transformers"] = transformers.__version__
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    tokenize_tiny(args.data, args.audio)
    tokenize_small(args.audio)
    tokenize_small_batched()
    train_tiny(args.data, work)
    train_small()
    generate(work)
    text = json.dumps(RESULTS, indent=2, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
