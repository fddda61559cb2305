"""KV-cached sampling vs full recomputation, coarse stage at the `small` size.

Generates ``--seconds`` of coarse acoustic tokens (3 per 75 Hz frame) with
random weights, the way generation does for audio longer than one window:
the first window samples its 4 s whole; every next window advances 2 s and
is primed with the previous window's last 2 s of coarse ids (``target_prompt``);
the last one advances less, on the 40 ms grid, so that it too spans 4 s.

The cached run is timed whole. Recomputing the full sequence for every token
is far too slow to run whole on a CPU, so for each window a few of its steps
are timed (each one a full forward over prefix + targets so far, exactly what
``sample_target(use_cache=False)`` does per token), at the midpoints of equal
slices of the window's steps; their mean times the window's step count is the
estimate. The printout says what was measured and what was extrapolated.

    python benchmarks/bench_kv_cache.py --seconds 10 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.factories when run as a script

from musiclm.config import load_config
from musiclm.generation import plan_windows
from musiclm.models.layout import layout_for
from musiclm.models.sampling import sample_target
from musiclm.models.transformer import MusicTransformer
from tests.factories import fake_info, fake_sample


@dataclass
class Window:
    start_frame: int  # first acoustic frame of the window
    prefix: torch.Tensor  # [B, P] conditioning ids
    prompt: torch.Tensor | None  # [B, M] coarse ids carried over from the previous window
    n_target: int  # target ids of the whole window (prompt included)
    ids: torch.Tensor | None = None  # [B, n_target] after the cached run
    cached_s: float = 0.0  # wall seconds
    cached_cpu_s: float = 0.0  # process CPU seconds (all threads)
    step_lengths: tuple[int, ...] = ()  # sequence lengths of the timed full-recompute steps
    step_s: tuple[float, ...] = ()
    step_cpu_s: tuple[float, ...] = ()

    @property
    def m(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[1]

    @property
    def sampled(self) -> int:
        return self.n_target - self.m


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="audio to generate (default 10)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--points", type=int, default=3, help="full-recompute steps timed per window (default 3)")
    ap.add_argument("--batch", type=int, default=1, help="sequences sampled at once (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = load_config("small")
    # the small preset's vocabularies: semantic 1024 @ 50 Hz, acoustic 8 x 1024 @ 75 Hz (3 coarse), clap 12 x 1024
    info = fake_info(sem_k=1024, ac_k=1024, q=8, coarse=3, clap_levels=12, clap_k=1024, sem_rate=50, ac_rate=75, window=10.0, hop=5.0, emb_dim=512)
    layout = layout_for("coarse", info, cfg.stages.coarse)
    torch.manual_seed(args.seed)
    model = MusicTransformer.for_layout(cfg.model, layout).eval()
    levels = layout.target_levels
    rate = float(info.acoustic.frame_rate)
    # a tick longer than the output: the last window ends on the grid, up to a tick past it
    sample = fake_sample(info, args.seconds + float(layout.tick), np.random.default_rng(args.seed))
    total_frames = layout.frames_of("acoustic", args.seconds)
    window_frames = layout.target.frames
    align = int(info.acoustic.frame_rate * layout.tick)  # frames per tick: window starts lie on the grid
    hop_frames = window_frames // 2 // align * align  # as generation's _plan
    c = cfg.model
    print(f"KV-cache benchmark: coarse stage, preset small ({c.n_layers} layers x {c.d_model}, {c.n_heads} heads, "
          f"{model.num_parameters() / 1e6:.1f} M parameters), random weights, {torch.get_num_threads()} CPU threads")
    print(f"layout {layout.describe()}")
    print(f"audio {args.seconds:g} s = {total_frames} coarse frames = {total_frames * levels} coarse tokens x batch {args.batch}; "
          f"windows of {window_frames / rate:g} s advancing {hop_frames / rate:g} s, primed with the previous {(window_frames - hop_frames) / rate:g} s "
          f"(the last one advancing less, to stay whole)")

    # warm-up (allocator, thread pool), not timed
    warm_prefix = torch.from_numpy(layout.prefix(layout.window_at(sample, 0.0)))[None].repeat(args.batch, 1)
    sample_target(model, layout, warm_prefix, 4, use_cache=True)
    sample_target(model, layout, warm_prefix, 1, use_cache=False)

    # Each window: the KV-cached run, timed whole; then a few of its steps by full recomputation.
    # Interleaving keeps both measurements of a window under the same load on a shared machine.
    gen = torch.Generator().manual_seed(args.seed)
    windows: list[Window] = []
    for start, known, end in plan_windows(total_frames, 0, window_frames, hop_frames, align):  # generation's windows
        keep, new = known - start, end - known  # frames carried over from the previous window, frames sampled
        win = layout.window_at(sample, float(start / rate))
        prefix = torch.from_numpy(layout.prefix(win))[None].repeat(args.batch, 1)
        prompt = windows[-1].ids[:, -keep * levels :] if keep else None
        w = Window(start, prefix, prompt, (keep + new) * levels)
        t0, c0 = time.perf_counter(), time.process_time()
        w.ids = sample_target(model, layout, prefix, w.n_target, target_prompt=prompt, temperature=cfg.generate.temperature_coarse, generator=gen)
        w.cached_s, w.cached_cpu_s = time.perf_counter() - t0, time.process_time() - c0

        p = prefix.shape[1]
        js = [w.m + int((i + 0.5) * w.sampled / args.points) for i in range(args.points)]
        times, cpu = [], []
        for j in js:  # one uncached step: forward over prefix + j target ids, then draw target j
            t0, c0 = time.perf_counter(), time.process_time()
            sample_target(model, layout, prefix, j + 1, target_prompt=w.ids[:, :j], use_cache=False, generator=torch.Generator().manual_seed(j))
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        w.step_lengths = tuple(p + j for j in js)
        w.step_s, w.step_cpu_s = tuple(times), tuple(cpu)
        windows.append(w)

    # ---- report ---------------------------------------------------------------------------------
    print()
    print(f"{'window':>6} {'start':>6} {'prefix':>6} {'prompt':>6} {'sampled':>7} | {'KV cache':>9} | {'full recompute':>14} | {'speedup':>7}  (full recompute: timed steps, sequence length -> seconds)")
    cached_total = full_total = cached_cpu = full_cpu = 0.0
    sampled_total = timed_steps = 0
    for i, w in enumerate(windows, 1):
        est = float(np.mean(w.step_s)) * w.sampled
        cached_total += w.cached_s
        full_total += est
        cached_cpu += w.cached_cpu_s
        full_cpu += float(np.mean(w.step_cpu_s)) * w.sampled
        sampled_total += w.sampled
        timed_steps += len(w.step_s)
        steps = ", ".join(f"{n} -> {s:.2f}" for n, s in zip(w.step_lengths, w.step_s))
        print(f"{i:>6} {w.start_frame / rate:>5.1f}s {w.prefix.shape[1]:>6} {w.m:>6} {w.sampled:>7} | {w.cached_s:>8.1f}s | "
              f"{est:>10.1f}s est | {est / w.cached_s:>6.1f}x  ({steps})")
    tokens = sampled_total * args.batch
    print()
    print(f"sampled coarse tokens: {sampled_total} per sequence x batch {args.batch} = {tokens}")
    print(f"KV cache, MEASURED (every step, prefills included): {cached_total:8.1f} s wall  {tokens / cached_total:8.2f} tokens/s  "
          f"({1000 * cached_total / sampled_total:.1f} ms per step; {cached_cpu:.1f} s CPU)")
    print(f"full recompute, EXTRAPOLATED from {timed_steps} timed steps of {sampled_total} (per window: mean step time x its steps): "
          f"{full_total:8.1f} s wall  {tokens / full_total:8.3f} tokens/s  ({1000 * full_total / sampled_total:.0f} ms per step; {full_cpu:.1f} s CPU)")
    print(f"speedup of the KV cache: {full_total / cached_total:.1f}x wall, {full_cpu / cached_cpu:.1f}x CPU time  (goal: >= 30x)")
    print(f"load average at the end (1/5/15 min): {' / '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs "
          f"(other work on the machine skews wall times)")


if __name__ == "__main__":
    main()
