"""Inference precision of the stage transformers: fp32, bf16, or int8 weights.

Sampling one token reads every weight of a stage once, so on a CPU a decode
step is bound by memory bandwidth and its cost follows the bytes read. One
decode step of the ``small`` coarse stage (6 x 1024, KV cache at 1,000
positions, 2 threads of this AVX-512 VNNI/BF16 CPU without AMX;
``benchmarks/bench_precision.py``) took 18.0 ms in fp32, 11.6 in bf16 and 5.3
in int8 for one sequence, and 37.5, 17.0 and 7.9 ms for the two rows of a
guided sample.

- ``fp32``: the model as trained.
- ``bf16``: every weight in bfloat16; the KV cache follows (``new_cache`` takes
  its dtype from the embedding). The rotary tables stay fp32: ``Rotary``
  rotates in fp32 anyway, and tables rounded to bf16 (3 significant digits)
  would blur the angles of far positions (on tiny stages, whose windows are
  short, it made no difference). Logits are cast to fp32 where they are used
  (``loss``, ``sample_target``), so softmax and cross-entropy run in fp32.
- ``int8``: every ``nn.Linear`` (attention qkv and proj, MLP gate_up and down,
  and the output heads) holds int8 weights with one scale per output row;
  activations are quantized per call to 8 bits ("dynamic" quantization). The
  embedding, the norms and the KV cache stay fp32. Quantizing the heads too
  changed the held-out loss of trained tiny stages by under 0.05% (as did
  keeping them fp32), so they are quantized: one fewer special case. The fp32
  cache is now a large part of what a step reads (small stage, 1,000
  positions: 50 MB per sequence against 80 MB of int8 linear weights); a bf16
  cache would need the attention to take fp32 queries with bf16 keys.

How int8 is done: torch's dynamic quantization
(``torch.ao.quantization.quantize_dynamic`` with ``per_channel_dynamic_qconfig``;
fbgemm/oneDNN int8 kernels, which use the CPU's VNNI instructions). Measured
with the pinned torch 2.13.0, same stage, in one process (ms per step, batch 1
/ batch 2; fp32 19.0 / 38.6 in that run):

- torch's ``quantize_dynamic``: 5.4 / 7.7. It is deprecated in favour of
  torchao (it warns "will be removed") but still present and working in
  2.13; ``for_inference`` silences its two deprecation warnings. A torch
  upgrade that removes it fails ``tests/test_precision.py`` at import.
- torchao 0.18.0 (it installs without pulling another torch):
  ``Int8WeightOnlyConfig`` 29.6 / 38.1 and
  ``Int8DynamicActivationInt8WeightConfig`` 28.2 / 31.7, no faster than fp32.
  In eager mode its x86 int8 paths cast the int8 weight back to float at
  every call or run a Python-level int matmul, expecting ``torch.compile`` to
  fuse them; its fast CPU kernels target ARM. Generation runs eager, with a
  cache whose length changes every step, so compiling is no option.
- int8 weights with bf16 activations through ``aten._weight_int8pack_mm``
  (hand-written module around a private op): about 8 / 13, slower than
  dynamic quantization.

Per-channel scales cost nothing over one scale per tensor (5.4 ms both) and
keep a row of large weights from coarsening the others.

int8 runs on the CPU only (torch's quantized kernels have no CUDA backend):
on other devices it is refused.

Layer: models.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

from musiclm.errors import UserError
from musiclm.models.transformer import MusicTransformer

INFERENCE_PRECISIONS = ("fp32", "bf16", "int8")


def check_precision(precision: str) -> str:
    """``precision`` itself if it is one of :data:`INFERENCE_PRECISIONS`, else a one-line UserError."""
    if precision not in INFERENCE_PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: choose one of {', '.join(INFERENCE_PRECISIONS)}")
    return precision


def default_precision(device: torch.device | str) -> str:
    """The precision generation uses on ``device`` unless told otherwise.

    CPU: ``int8`` (the fastest, 3-5x fp32, and within 0.1% of fp32's held-out
    loss on trained tiny stages, ``tests/test_precision.py``). CUDA: ``bf16``
    on GPUs with bf16 tensor cores (compute capability 8.0, Ampere, and newer),
    where it halves the bytes read and stays as accurate; ``fp32`` on older
    GPUs, which emulate bf16 slowly. Any other device: ``fp32``.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return "int8"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "bf16"
    return "fp32"


def for_inference(model: MusicTransformer, precision: str) -> MusicTransformer:
    """``model`` (fp32 weights, any mode) ready for sampling at ``precision``, in eval mode.

    ``fp32`` returns ``model`` itself, switched to eval mode. ``bf16`` and
    ``int8`` return a new model and leave ``model`` untouched. ``int8`` needs
    ``model`` on the CPU (a one-line UserError elsewhere). The returned model's
    ``new_cache`` makes a bf16 KV cache for bf16 and an fp32 one otherwise.
    """
    check_precision(precision)
    weight = model.embed.weight
    if weight.dtype != torch.float32:
        raise ValueError(f"for_inference converts an fp32 model, got {weight.dtype} weights")
    if precision == "fp32":
        return model.eval()
    if precision == "bf16":
        out = copy.deepcopy(model)
        for child in out.children():
            if child is not out.rotary:  # derived tables: fp32 costs nothing per step and keeps positions exact
                child.to(torch.bfloat16)
        return out.eval()
    if weight.device.type != "cpu":
        raise UserError(f"int8 runs on the CPU only, the model is on {weight.device.type}: choose bf16 or fp32 there")
    with warnings.catch_warnings():
        # quantize_dynamic is deprecated in favour of torchao, which has no fast eager int8 path on x86 (module docstring)
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel", category=UserWarning)
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a forward pass reads: every parameter, plus each int8 linear's packed
    weight (1 byte per value) with its per-row scales and zero points. Derived buffers (rotary
    tables) are not counted."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, DynamicQuantizedLinear):
            w = m.weight()  # [out, in] qint8
            total += w.numel() * w.element_size()
            if w.qscheme() == torch.per_channel_affine:
                total += w.q_per_channel_scales().nbytes + w.q_per_channel_zero_points().nbytes
    return total
