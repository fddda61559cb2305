"""Optimisation of a stage: AdamW's parameter groups, the learning-rate schedule, and one step's gradients.

AdamW decays the matrices of the linear layers (attention, MLP, output heads)
only; the embedding table and the RMSNorm gains are not decayed (the table
holds ids that are rare or unused in a batch, such as the null and pad ids,
which decay would pull towards zero for no reason). Nor are LoRA adapters:
decay on ``A`` and ``B`` penalises their norms, not the update ``B A`` they
make, and would only pull a fine-tune back towards its base at a rate set by
the rank.

The learning rate warms up linearly over ``warmup_steps`` and then follows a
cosine down to ``lr * min_lr_ratio`` at ``steps``; gradients are clipped to
``grad_clip`` (global norm, in the loop) and accumulated over ``grad_accum``
micro-batches. On CUDA the forward pass runs under bf16 autocast (weights and
optimizer in fp32); on CPU everything is fp32.

Layer: training (imports the base layer, musiclm.models and training.lora).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from musiclm.config import TrainConfig
from musiclm.models.transformer import MusicTransformer
from musiclm.training import lora


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: linear-layer matrices decay; embeddings, norm gains
    and LoRA adapters do not (see the module docstring)."""
    decay, no_decay = [], []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            decayed = isinstance(module, nn.Linear) and name == "weight" and not lora.is_adapter(module_name)
            (decay if decayed else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, tc: TrainConfig, device: torch.device) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` of ``model`` (fused on CUDA) and its :func:`lr_factor` schedule, from ``tc``."""
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=tc.betas, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.steps, tc.min_lr_ratio))
    return optimizer, scheduler


class LossModule(nn.Module):
    """``forward`` = the model's loss, so that DDP (which hooks ``forward``) and torch.compile see the training step."""

    def __init__(self, model: MusicTransformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, label_levels: torch.Tensor) -> torch.Tensor:
        return self.model.loss(tokens, labels, label_levels)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing (fp32) on CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def accumulate_gradients(step_module: nn.Module, batches: Iterator[dict[str, Any]], n: int, device: torch.device, distributed: bool) -> list[torch.Tensor]:
    """Forward and backward of the next ``n`` micro-batches of ``batches``, their gradients summed into ``.grad``.

    ``step_module`` maps (tokens, labels, label_levels) to a mean loss. Each loss is
    divided by ``n``, so the accumulated gradient is the mean of the micro-batches'
    gradients: with equal label counts, the gradient of one batch of all of them.
    Under DDP (``distributed``) gradients are all-reduced with the last micro-batch only.
    Returns the ``n`` losses (0-dim, detached, undivided).
    """
    losses = []
    for micro in range(n):
        b = next(batches)
        sync = micro == n - 1 or not distributed
        with contextlib.nullcontext() if sync else step_module.no_sync():
            with autocast(device):
                loss = step_module(b["tokens"].to(device, non_blocking=True), b["labels"].to(device, non_blocking=True), b["label_levels"].to(device, non_blocking=True))
            (loss / n).backward()
        losses.append(loss.detach())
    return losses
