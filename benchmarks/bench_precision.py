"""One decode step of a `small` stage at each inference precision (fp32, bf16, int8), side by side.

    python benchmarks/bench_precision.py --threads 2
    python benchmarks/bench_precision.py --runs RUNS --data TOKENS   # also held-out losses of trained stages

The stage is the small preset's coarse transformer (6 x 1024, the small
vocabularies) at random weights, built in memory as ``bench_kv_cache.py``
builds it: a decode step costs the same whatever the weights hold, and no
backbone is needed. Its KV cache is filled to ``--cache`` positions (default
1000, about a coarse window), then each step feeds one token and computes one
head's logits, as ``sample_target`` does. Batch 1 is one sample; batch 2 is
one sample under classifier-free guidance (conditional and unconditional rows).

The precisions take turns in ``--rounds`` rounds of ``--steps`` steps each, so
other load on the machine hits them alike; the table shows the median round.
Weight bytes count every weight (``precision.weight_bytes``); the embedding
is among them but a step reads only one row of it per sequence.

With ``--runs RUNS --data TOKENS`` (RUNS holding trained ``semantic``,
``coarse``, ``fine`` run folders, TOKENS the tokenized folder they were trained
on) it also prints each stage's held-out loss at each precision, on the
trainer's validation windows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.factories when run as a script

from musiclm.config import STAGES, load_config  # noqa: E402
from musiclm.models.layout import layout_for  # noqa: E402
from musiclm.models.precision import INFERENCE_PRECISIONS, for_inference, weight_bytes  # noqa: E402
from musiclm.models.transformer import KVCache, MusicTransformer  # noqa: E402
from tests.factories import fake_info  # noqa: E402


def small_coarse_stage(seed: int = 0) -> MusicTransformer:
    """The small preset's coarse stage at random weights, fp32, eval mode."""
    cfg = load_config("small")
    # the small preset's vocabularies: semantic 1024 @ 50 Hz, acoustic 8 x 1024 @ 75 Hz (3 coarse), clap 12 x 1024
    info = fake_info(sem_k=1024, ac_k=1024, q=8, coarse=3, clap_levels=12, clap_k=1024, sem_rate=50, ac_rate=75, window=10.0, hop=5.0, emb_dim=512)
    torch.manual_seed(seed)
    return MusicTransformer.for_layout(cfg.model, layout_for("coarse", info, cfg.stages.coarse)).eval()


@torch.inference_mode()
def filled_cache(model: MusicTransformer, batch: int, length: int, room: int) -> KVCache:
    """A cache of ``batch`` sequences holding ``length`` random positions, with ``room`` more free."""
    cache = model.new_cache(batch, length + room)
    model(torch.randint(0, model.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)), cache)
    return cache


@torch.inference_mode()
def time_steps(model: MusicTransformer, cache: KVCache, length: int, steps: int) -> float:
    """Milliseconds per decode step over ``steps`` steps starting at cache length ``length``."""
    cache.length = length  # forget the previous round's steps
    token = torch.zeros(cache.batch_size, 1, dtype=torch.long)
    t0 = time.perf_counter()
    for _ in range(steps):
        hidden = model(token, cache)[:, -1]  # [B, d]
        model.logits(hidden, 0).float()  # [B, K]
    return 1000 * (time.perf_counter() - t0) / steps


def cache_bytes(cache: KVCache) -> int:
    return sum(t.numel() * t.element_size() for t in cache.k + cache.v)


def speed(args) -> None:
    t0 = time.perf_counter()
    fp32 = small_coarse_stage()
    models = {p: for_inference(fp32, p) for p in INFERENCE_PRECISIONS}
    c = fp32.cfg
    print(f"decode step at each precision: small coarse stage ({c.n_layers} x {c.d_model}, {fp32.num_parameters() / 1e6:.0f} M parameters, "
          f"vocabulary {fp32.vocab_size}) at random weights, KV cache at {args.cache} positions, {torch.get_num_threads()} CPU threads; "
          f"built in {time.perf_counter() - t0:.0f} s")
    embed_mb = fp32.embed.weight.numel() * fp32.embed.weight.element_size() / 1e6
    for batch in (1, 2):
        caches = {p: filled_cache(m, batch, args.cache, args.steps) for p, m in models.items()}
        for p, m in models.items():  # warm-up: allocator, thread pool, packed-weight paths
            time_steps(m, caches[p], args.cache, 2)
        ms: dict[str, list[float]] = {p: [] for p in models}
        for _ in range(args.rounds):
            for p, m in models.items():
                ms[p].append(time_steps(m, caches[p], args.cache, args.steps))
        what = "one sample" if batch == 1 else "one guided sample (2 rows)"
        print(f"\nbatch {batch}, {what}: median of {args.rounds} rounds x {args.steps} steps")
        print(f"  {'':>5}  {'ms/step':>8}  {'min':>6}  {'vs fp32':>8}  {'weights MB':>10}  {'cache MB':>8}  cache dtype")
        base = statistics.median(ms["fp32"])
        for p, m in models.items():
            med = statistics.median(ms[p])
            print(f"  {p:>5}  {med:8.1f}  {min(ms[p]):6.1f}  {base / med:7.2f}x  {weight_bytes(m) / 1e6:10.0f}  "
                  f"{cache_bytes(caches[p]) / 1e6:8.0f}  {caches[p].k[0].dtype}")
    print(f"\n(the embedding is {embed_mb:.0f} MB of the fp32 and int8 weights, {embed_mb / 2:.0f} MB of bf16's; a step reads one row of it per sequence)")


def losses(runs: Path, data: Path) -> None:
    from musiclm.shards.format import TokenInfo
    from musiclm.training.corpus_split import split_data
    from musiclm.training.data import count_labels, val_batches
    from musiclm.training.run_folder import load_stage

    print(f"\nheld-out loss (nats per label) of the trained stages in {runs}, on the trainer's validation windows of {data}")
    print(f"  {'':>8}  " + "  ".join(f"{p:>16}" for p in INFERENCE_PRECISIONS))
    info = TokenInfo.load(data)
    for stage in STAGES:
        model, layout, cfg, _ = load_stage(runs / stage, "cpu")
        split = split_data(data, info, None, cfg.train.val_fraction)
        val = val_batches(split.val, layout, cfg.train.batch_size, cfg.train.eval_batches)
        row = {}
        for p in INFERENCE_PRECISIONS:
            m = for_inference(model, p)
            with torch.inference_mode():
                total = sum(float(m.loss(b["tokens"], b["labels"], b["label_levels"])) * count_labels(b) for b in val)
            row[p] = total / sum(count_labels(b) for b in val)
        print(f"  {stage:>8}  " + "  ".join(f"{v:8.4f} ({100 * (v / row['fp32'] - 1):+.2f}%)" for v in row.values()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--cache", type=int, default=1000, help="positions in the KV cache (default 1000)")
    ap.add_argument("--steps", type=int, default=10, help="decode steps per round (default 10)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds per precision (default 7)")
    ap.add_argument("--runs", type=Path, help="folder of trained semantic/coarse/fine runs: also print their held-out losses")
    ap.add_argument("--data", type=Path, help="the tokenized folder those runs were trained on (with --runs)")
    args = ap.parse_args(argv)
    if (args.runs is None) != (args.data is None):
        ap.error("--runs and --data go together")
    torch.set_num_threads(args.threads)
    speed(args)
    if args.runs is not None:
        losses(args.runs, args.data)
    print(f"\nload average at the end (1/5/15 min): {' / '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs "
          f"(other work on the machine skews wall times)")


if __name__ == "__main__":
    main()
