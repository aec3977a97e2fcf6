"""Process state for every llmrec entry point, through accelerate.

On a machine without an accelerator, ``accelerate launch --multi_gpu --num_processes 2`` starts two
processes but accelerate's state only turns them into a gloo group when told it runs on the CPU;
``distributed_state()`` tells it so, so the same code is distributed on GPUs and on CPUs alike.
"""

from __future__ import annotations

import torch


def has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return bool(accel.is_available())
    return torch.cuda.is_available()


def distributed_state():
    """The accelerate ``PartialState`` (CPU/gloo when there is no accelerator)."""
    from accelerate import PartialState

    return PartialState(cpu=not has_accelerator())


def accelerator_kwargs() -> dict:
    """Keyword arguments for ``accelerate.Accelerator`` matching :func:`distributed_state`."""
    return {"cpu": not has_accelerator()}
