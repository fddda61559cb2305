"""Low-rank adapters (LoRA) on a trained stage transformer, through peft.

An adapted linear layer ``y = W x`` computes ``y = W x + (alpha / rank) * B (A x)``
with ``A`` [rank, d_in] and ``B`` [d_out, rank] trained and ``W`` frozen. peft starts
``B`` at zero, so step 0 of an adapter run computes exactly its base model. The
adapted layers (:data:`TARGETS`) are the attention's ``qkv`` and ``proj`` and the
MLP's ``gate_up`` and ``down`` in every block; the embedding table, the norms and
the output heads stay the base's.

The default ``alpha`` is ``rank`` (scale 1): the update is ``B A`` itself, in the
units of the weight it is added to, so ``--lr`` alone sets how far a step moves it,
whatever the rank. Keep ``alpha`` fixed while changing the rank to get the LoRA
paper's convention instead (a scale that falls as 1 / rank).

Merging folds ``W + (alpha / rank) * B A`` into plain fp32 weights: the result is a
plain :class:`~musiclm.models.transformer.MusicTransformer` with no trace of peft,
so quantizing and CUDA graphs see an ordinary model.

peft is imported only where adapters are made or merged: it imports transformers,
which plain training does not need.

Layer: training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from musiclm.errors import UserError
from musiclm.models.transformer import MusicTransformer

TARGETS = ("qkv", "proj", "gate_up", "down")  # module names in models/transformer.py
ADAPTER_PREFIX = "lora_"  # peft names the adapter's modules lora_A, lora_B, ... under the adapted layer


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What an adapter run trains: ``rank``, ``alpha`` (scale = alpha / rank) and the adapted layers."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS

    @classmethod
    def make(cls, rank: int, alpha: float | None, d_model: int) -> LoraSpec:
        """From the command line: ``alpha`` None means ``rank``. UserError for a rank outside 1..d_model."""
        if rank < 1 or rank > d_model:
            raise UserError(f"--lora-rank must be between 1 and the model width {d_model}, got {rank}")
        if alpha is not None and not alpha > 0:
            raise UserError(f"--lora-alpha must be > 0, got {alpha}")
        return cls(rank, float(rank if alpha is None else alpha))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict[str, Any]:
        import peft

        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "peft": peft.__version__}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LoraSpec:
        return cls(int(d["rank"]), float(d["alpha"]), tuple(d["targets"]))

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets), lora_dropout=0.0, bias="none")


def is_adapter(module_name: str) -> bool:
    """Whether a module (by its dotted name in the model) belongs to an adapter."""
    return any(part.startswith(ADAPTER_PREFIX) for part in module_name.split("."))


def add_adapters(model: MusicTransformer, spec: LoraSpec) -> MusicTransformer:
    """Wrap the target layers of ``model`` with fresh adapters, in place; returns ``model``.

    Every parameter that is not an adapter's is frozen (``requires_grad`` False).
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(spec.peft_config(), model)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
    return model


def adapter_weights(model: MusicTransformer) -> dict[str, torch.Tensor]:
    """The adapter's tensors of a model made by :func:`add_adapters` (names without peft's adapter name,
    e.g. ``blocks.0.attn.qkv.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_adapter_weights(model: MusicTransformer, weights: dict[str, torch.Tensor], where: str) -> None:
    """Put saved adapter tensors into a model made by :func:`add_adapters` with the same spec.

    UserError when they do not fit (another rank, other layers), naming ``where`` they came from.
    """
    from peft import set_peft_model_state_dict

    expected = set(adapter_weights(model))
    if set(weights) != expected:
        extra, missing = sorted(set(weights) - expected), sorted(expected - set(weights))
        raise UserError(f"{where} does not hold this run's adapter (unexpected: {extra[:2]}, missing: {missing[:2]})")
    try:
        set_peft_model_state_dict(model, weights)
    except RuntimeError as e:  # shapes: another rank than run.json says
        raise UserError(f"{where} does not fit this run's adapter: {str(e).splitlines()[0]}") from None


def merged(base: MusicTransformer, spec: LoraSpec, weights: dict[str, torch.Tensor], where: str) -> MusicTransformer:
    """``base`` with the adapter ``weights`` folded into its weights: a plain MusicTransformer.

    ``base`` is changed in place and returned; its weights become ``W + scale * B A`` (in
    the dtype of ``W``), every parameter trainable again, as any loaded model's are.
    """
    from peft import LoraModel

    tuner = LoraModel(base, spec.peft_config(), "default")
    load_adapter_weights(tuner.model, weights, where)
    model = tuner.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    return model
