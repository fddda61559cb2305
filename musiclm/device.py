"""The torch device a command runs on, from the user's ``--device``: the one choice train, generate and eval share.

Layer: base (imports only musiclm.errors).
"""

from __future__ import annotations

import torch

from musiclm.errors import UserError


def pick_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """The device for ``device`` (``--device``): None is ``cuda:local_rank`` when CUDA is available, else cpu.

    ``cpu``, ``cuda`` (``cuda:local_rank``: one device per torchrun rank) and ``cuda:N`` are checked to
    exist on this machine; anything else is a one-line :class:`UserError` that says what to pass.
    """
    if device is None:
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
        if dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UserError(f"unsupported device '{device}': use cpu, cuda or cuda:N")
    return dev
