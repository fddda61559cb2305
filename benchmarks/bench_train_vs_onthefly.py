"""Training from cached tokens against the on-the-fly design, side by side in one process.

    python benchmarks/bench_train_vs_onthefly.py [--stages semantic coarse] [--batch 2] [--steps 3]

Both loops train the same `small` transformer (6 x 1024) with the same batch,
window and optimizer step. They differ only in where a batch comes from:

- cached (this project): the loader reads integer tokens from shards;
- on the fly (the seed project's and audiocraft's default): every sample decodes
  its window from an audio file, resamples it, runs MERT + Encodec + CLAP (the
  `small` architectures at random weights) and quantizes, then the same step runs.

Prints steps/s of both and their ratio per stage, and the split of an
on-the-fly step between backbones and transformer. The ratio is bounded by
1 + (backbone time per batch) / (transformer time per step): when the
transformer step itself dominates, as it does on a CPU, no data path can make
training much faster than that bound.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def random_quantizers(tok, seed: int = 0) -> dict[str, np.ndarray]:
    """Quantizer arrays of the right shapes; their values do not change the cost."""
    rng = np.random.default_rng(seed)
    c = tok.cfg
    d_mert = tok.semantic.model.config.hidden_size
    return {
        "semantic_centroids": rng.standard_normal((c.semantic.codebook_size, d_mert)).astype(np.float32),
        "semantic_norm": np.stack([np.zeros(d_mert), np.ones(d_mert)]).astype(np.float32),
        "clap_codebooks": rng.standard_normal((c.clap.levels, c.clap.codebook_size, tok.clap.embed_dim)).astype(np.float32) * 0.05,
    }


def main() -> None:
    from bench_tokenize import small_random_config, write_corpus

    from musiclm.models.layout import layout_for
    from musiclm.models.transformer import MusicTransformer
    from musiclm.pipeline.audio import load_for_rates, probe
    from musiclm.pipeline.tokenizer import Tokenizer
    from musiclm.shards.format import TokenInfo, TokenSample, sample_key
    from musiclm.shards.writer import ShardWriter
    from musiclm.training.corpus_split import index_shards
    from musiclm.training.data import TrainStream, collate
    from musiclm.training.optim import param_groups

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", default=["semantic", "coarse"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per loop (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-onthefly-"))
    corpus = work / "corpus"
    write_corpus(corpus, 4, 30.0)
    files = sorted(corpus.glob("*.wav"))
    cfg = small_random_config(clap_codes=1024)
    print("building the small backbones at random weights ...", flush=True)
    tok = Tokenizer.from_config(cfg.tokenize)
    tok.quantizers = random_quantizers(tok)
    info = tok.save(work / "tokens" / "tokenizer")

    # cached: tokenize once, write shards
    writer = ShardWriter(work / "tokens", info, shard_size=64, start_index=0)
    for f in files:
        arrays = tok.tokenize(load_for_rates(f, 0.0, None, tok.sample_rates))
        meta = {"source": f.name, "segment": 0, "segments": 1, "start": 0.0, "duration": probe(f).duration, "sample_rate": 44100, "channels": 1}
        writer.add(TokenSample(sample_key(f.name, 0), arrays["semantic"], arrays["acoustic"], arrays["clap"], arrays["clap_emb"], meta))
    writer.close()
    entries = index_shards(sorted((work / "tokens" / "shards").glob("*.tar")))

    rows = []
    for stage in args.stages:
        layout = layout_for(stage, TokenInfo.load(work / "tokens"), cfg.stages.get(stage))
        model = MusicTransformer.for_layout(cfg.model, layout)
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)

        def train_step(batch) -> float:
            t0 = time.perf_counter()
            loss = model.loss(batch["tokens"], batch["labels"], batch["label_levels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return time.perf_counter() - t0

        stream = iter(TrainStream(entries, layout, args.batch, seed=0, cond_dropout=0.1))

        def cached_batch():
            return next(stream)

        rng = np.random.default_rng(0)
        window = layout.window_seconds

        def onthefly_batch():
            encoded, keys = [], []
            for _ in range(args.batch):
                f = files[int(rng.integers(len(files)))]
                start = float(rng.integers(0, int(30 - window))) if window < 30 else 0.0
                audio = load_for_rates(f, start, window, tok.sample_rates)  # decode + resample
                arrays = tok.tokenize(audio)  # MERT + Encodec + CLAP + quantizers
                sample = TokenSample(f.name, arrays["semantic"], arrays["acoustic"], arrays["clap"], arrays["clap_emb"], {})
                encoded.append(layout.encode(layout.crop(sample, None), drop_cond=bool(rng.random() < 0.1)))
                keys.append(f.name)
            return collate(encoded, keys)

        result = {}
        for name, make in (("cached", cached_batch), ("on the fly", onthefly_batch)):
            train_step(make())  # warm-up
            data_s = step_s = 0.0
            for _ in range(args.steps):
                t0 = time.perf_counter()
                batch = make()
                data_s += time.perf_counter() - t0
                step_s += train_step(batch)
            result[name] = (data_s / args.steps, step_s / args.steps)
            print(f"{stage:9s} {name:10s} data {data_s / args.steps:7.3f} s/step   transformer {step_s / args.steps:7.3f} s/step", flush=True)
        cached = sum(result["cached"])
        fly = sum(result["on the fly"])
        rows.append((stage, layout.seq_len, 1 / cached, 1 / fly, fly / cached, 1 + result["on the fly"][0] / result["cached"][1]))

    print()
    print(f"small transformer ({cfg.model.n_layers} x {cfg.model.d_model}), batch {args.batch}, {args.threads} threads, {args.steps} timed steps")
    print(f"{'stage':9s} {'tokens':>6s} {'cached steps/s':>15s} {'on-the-fly steps/s':>19s} {'speed-up':>9s} {'bound':>6s}")
    for stage, n, c, f, ratio, bound in rows:
        print(f"{stage:9s} {n:6d} {c:15.4f} {f:19.4f} {ratio:8.2f}x {bound:5.2f}x")


if __name__ == "__main__":
    main()
