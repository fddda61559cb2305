"""Does the loader keep up? Tokens/s of the training loader alone, per stage, against the model's appetite.

Writes a synthetic corpus shaped like the ``small`` preset's tokens (semantic
1024 codes at 50 Hz, acoustic 8 x 1024 at 75 Hz, CLAP 12 x 1024 per 10 s window
with a 5 s hop, 30 s clips), then for each stage measures

- the loader alone in this process (``num_workers=0``, so one core): windows
  cropped, encoded and batched per second, counted in tokens (B x N);
- the tokens per second one training step of the ``small`` model (6 x 1024)
  consumes on this machine's CPU: forward + backward on a batch of
  ``--model-batch`` windows;

and prints their ratio. Loader time is reported both as wall time and as the
process's CPU time, since a shared machine makes wall time noisy.

    python benchmarks/bench_loader.py                 # all stages
    python benchmarks/bench_loader.py --stages coarse --batches 200 --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from musiclm.config import STAGES, load_config
from musiclm.models.layout import layout_for
from musiclm.models.transformer import MusicTransformer
from musiclm.shards.format import TokenInfo, TokenSample, list_shards, sample_key, shard_name
from musiclm.training.corpus_split import index_shards
from musiclm.training.data import TrainStream

SMALL_INFO = {
    "format": 1,
    "fingerprint": "bench-small",
    "streams": {
        "semantic": {"levels": 1, "codebook_size": 1024, "frame_rate": 50, "sample_rate": 16000},
        "acoustic": {"levels": 8, "codebook_size": 1024, "frame_rate": 75, "sample_rate": 24000, "coarse_levels": 3},
        "clap": {"levels": 12, "codebook_size": 1024, "window_seconds": 10.0, "hop_seconds": 5.0, "embed_dim": 512, "frame_rate": None},
    },
}


def write_corpus(folder: Path, shards: int, clips_per_shard: int, seconds: float, seed: int = 0) -> TokenInfo:
    """Synthetic small-preset shards under ``folder`` (random codes; the loader's cost does not depend on them)."""
    import json

    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer" / "tokenizer.json").write_text(json.dumps(SMALL_INFO))
    (folder / "shards").mkdir(exist_ok=True)
    info = TokenInfo.from_json(SMALL_INFO)
    rng = np.random.default_rng(seed)
    t_s, t_a = int(seconds * 50), int(seconds * 75)
    w = int((seconds - info.clap_window_seconds) // info.clap_hop_seconds) + 1
    for s in range(shards):
        with wds.TarWriter(str(folder / "shards" / f"{shard_name(s)}.tar")) as sink:
            for i in range(clips_per_shard):
                name = f"bench/{s}/{i}.wav"
                sample = TokenSample(
                    sample_key(name, 0),
                    rng.integers(0, 1024, t_s, dtype=np.uint16),
                    rng.integers(0, 1024, (8, t_a), dtype=np.uint16),
                    rng.integers(0, 1024, (w, 12), dtype=np.uint16),
                    rng.standard_normal((w, 512)).astype(np.float16),
                    {"source": name, "start": 0.0, "duration": seconds, "sample_rate": 24000, "channels": 1, "segment": 0},
                )
                sink.write(sample.to_wds())
    return info


def loader_rate(stream: TrainStream, batches: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of ``batches`` batches, after one warm-up batch."""
    it = iter(stream)
    next(it)
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = sum(b["tokens"].numel() for b in itertools.islice(it, batches))
    return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def model_rate(model: MusicTransformer, batch: dict, steps: int) -> float:
    """Tokens per second of forward + backward on ``batch`` (best of ``steps`` after one warm-up)."""
    best = float("inf")
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = model.loss(batch["tokens"], batch["labels"], batch["label_levels"])
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:
            best = min(best, time.perf_counter() - t)
    return batch["tokens"].numel() / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--clips", type=int, default=128, help="clips per shard")
    ap.add_argument("--seconds", type=float, default=30.0, help="clip length")
    ap.add_argument("--batch-size", type=int, default=32, help="loader batch size (small preset: 32)")
    ap.add_argument("--batches", type=int, default=60, help="loader batches timed per stage")
    ap.add_argument("--model-batch", type=int, default=4)
    ap.add_argument("--model-steps", type=int, default=1, help="timed model steps per stage (after one warm-up)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for the model step")
    ap.add_argument("--no-model", action="store_true", help="measure the loader only")
    ap.add_argument("--data", type=Path, default=None, help="keep the synthetic corpus here (default: a temporary folder)")
    args = ap.parse_args()

    cfg = load_config("small")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp)
        if not list_shards(folder):
            t = time.perf_counter()
            write_corpus(folder, args.shards, args.clips, args.seconds)
            print(f"wrote {args.shards * args.clips} clips of {args.seconds:g} s in {time.perf_counter() - t:.1f} s")
        info = TokenInfo.load(folder)
        entries = index_shards(list_shards(folder))
        print(f"loader: one process, no workers; model: small ({cfg.model.n_layers} x {cfg.model.d_model}), batch {args.model_batch}, {args.threads} torch threads")
        print(f"{'stage':<9} {'N':>5} {'loader tok/s (wall)':>20} {'(cpu)':>12} {'model tok/s':>12} {'ratio':>8}")
        for stage in args.stages:
            layout = layout_for(stage, info, cfg.stages.get(stage))
            torch.set_num_threads(1)  # the loader is measured on one core
            stream = TrainStream(entries, layout, args.batch_size, seed=0, cond_dropout=cfg.stages.get(stage).cond_dropout)
            wall, cpu = loader_rate(stream, args.batches)
            line = f"{stage:<9} {layout.seq_len:>5} {wall:>20,.0f} {cpu:>12,.0f}"
            if not args.no_model:
                torch.set_num_threads(args.threads)
                torch.manual_seed(0)
                model = MusicTransformer.for_layout(cfg.model, layout)
                batch = next(iter(TrainStream(entries, layout, args.model_batch, seed=1, cond_dropout=0.0)))
                need = model_rate(model, batch, args.model_steps)
                line += f" {need:>12,.0f} {wall / need:>7.0f}x"
                del model
            print(line, flush=True)


if __name__ == "__main__":
    main()
