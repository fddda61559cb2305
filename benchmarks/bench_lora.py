"""LoRA against full fine-tuning at the `small` stage size: trainable parameters, step time, peak memory.

    python benchmarks/bench_lora.py [--stage semantic] [--ranks 8 32] [--batch 2] [--steps 4] [--threads 1]

The `small` transformer (6 x 1024, 8 heads) at random weights stands for a trained
base; the vocabularies are the small preset's (fake token info, as in
bench_kv_cache.py), so no backbone is built. Each variant runs in its own process,
one after the other, so that its peak resident memory (``ru_maxrss``) is its own:

- full: every weight trains (AdamW over the trainer's ``param_groups``);
- lora-R: the trainer's adapters (musiclm/training/lora.py) on qkv, proj, gate_up and
  down, rank R, the base frozen.

Both import peft and build the model before the baseline memory is read, so
"train +MiB" (peak minus that baseline) is what training itself adds: gradients,
AdamW's two moments per trainable parameter, activations kept for the backward
pass; "grad+adam MiB" is the part of it that scales with the trainable
parameters (fp32 gradient and two moments: 12 bytes each). A step is forward +
backward + clip + AdamW step on one batch of ``--batch`` whole windows, timed
``--steps`` times after one warm-up step; the medians of wall and process CPU
time are shown. One thread by default: on this shared 2-core machine, two
OpenMP threads spin-wait whenever another process holds a core, and the same
step's time varied 3x from run to run; at one thread it varies by a few percent.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.factories when run as a script

MIB = 1024 * 1024


def rss_mib() -> float:
    """Resident memory now (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def run_variant(stage: str, rank: int, batch: int, steps: int, threads: int) -> dict:
    """One variant in this process (rank 0: full fine-tune); returns its measurements."""
    import numpy as np
    import peft  # noqa: F401 (imported by both variants, so the baseline memory is alike)
    import torch

    from musiclm.config import load_config
    from musiclm.models.layout import layout_for
    from musiclm.models.transformer import MusicTransformer
    from musiclm.training import lora
    from musiclm.training.data import collate
    from musiclm.training.optim import param_groups
    from tests.factories import fake_info, fake_sample

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config("small")
    info = fake_info(sem_k=1024, ac_k=1024, q=8, coarse=3, clap_levels=12, clap_k=1024, sem_rate=50, ac_rate=75, window=10.0, hop=5.0, emb_dim=512)
    layout = layout_for(stage, info, cfg.stages.get(stage))
    model = MusicTransformer.for_layout(cfg.model, layout)
    if rank:
        lora.add_adapters(model, lora.LoraSpec.make(rank, None, cfg.model.d_model))
    model.train()
    rng = np.random.default_rng(0)
    b = collate([layout.encode(layout.crop(fake_sample(info, 30.0, rng, name=f"c{i}.wav"), rng), drop_cond=False) for i in range(batch)], [str(i) for i in range(batch)])
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=1e-4, betas=cfg.train.betas)
    baseline = rss_mib()

    wall, cpu = [], []
    for _ in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model.loss(b["tokens"], b["labels"], b["label_levels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "variant": f"lora-{rank}" if rank else "full",
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
        "step_s": statistics.median(wall[1:]),
        "cpu_s": statistics.median(cpu[1:]),
        "peak_mib": peak,
        "train_mib": peak - baseline,
        "seq_len": layout.seq_len,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", default="semantic", choices=["semantic", "coarse", "fine"])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32], help="LoRA ranks to compare with full fine-tuning (default 8 32)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant, after one warm-up step (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see the module docstring)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # rank of the variant to run here (0: full)
    args = ap.parse_args(argv)

    if args.child is not None:
        print(json.dumps(run_variant(args.stage, args.child, args.batch, args.steps, args.threads)))
        return

    rows = []
    for rank in [0, *args.ranks]:
        cmd = [sys.executable, __file__, "--child", str(rank), "--stage", args.stage, "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {rows[-1]['variant']}: done", file=sys.stderr, flush=True)

    full = rows[0]
    print(f"small {args.stage} stage (6 x 1024, {full['total']:,} parameters), {full['seq_len']} tokens x batch {args.batch}, CPU, {args.threads} thread(s)")
    print(f"{'variant':<9} {'trainable':>12} {'share':>7} {'step s':>7} {'cpu s':>7} {'peak MiB':>9} {'train +MiB':>10} {'grad+adam MiB':>13} | {'trainable':>9} {'step':>5} {'cpu':>5} {'peak':>5} {'train+':>6}")
    for r in rows:
        print(
            f"{r['variant']:<9} {r['trainable']:>12,} {r['trainable'] / r['total']:>7.2%} {r['step_s']:>7.2f} {r['cpu_s']:>7.2f} {r['peak_mib']:>9.0f} {r['train_mib']:>10.0f} "
            f"{12 * r['trainable'] / MIB:>13.0f} | {r['trainable'] / full['trainable']:>9.4f} {r['step_s'] / full['step_s']:>5.2f} {r['cpu_s'] / full['cpu_s']:>5.2f} "
            f"{r['peak_mib'] / full['peak_mib']:>5.2f} {r['train_mib'] / full['train_mib']:>6.2f}"
        )
    print("ratios (right of |) are to full fine-tuning")


if __name__ == "__main__":
    main()
