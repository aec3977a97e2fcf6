"""Process state for every llmrec entry point, through accelerate.

On a machine without an accelerator, ``accelerate launch --multi_gpu --num_processes 2`` starts two
processes but accelerate's state only turns them into a gloo group when told it runs on the CPU;
``distributed_state()`` tells it so, so the same code is distributed on GPUs and on CPUs alike.
"""

from __future__ import annotations

import os

import torch


def has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return bool(accel.is_available())
    return torch.cuda.is_available()


# Where launchers put the number of processes: torchrun/accelerate, then MPI (Intel, Open MPI, MVAPICH), as
# accelerate's own state reads them.
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """The number of processes this one was launched among (1 when not launched by a multi-process launcher)."""
    for name in _WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return max(int(value), 1)
            except ValueError:
                continue
    return 1


def import_dynamo_before_process_group() -> None:
    """Import ``torch._dynamo`` before a process group exists, when this process will join one.

    Importing ``torch._dynamo`` (DDP's constructor does) after the default process group is created keeps
    references to that group forever (torch 2.13), so ``destroy_process_group`` at exit no longer frees it and
    its gloo worker threads outlive the interpreter: a worker that drops the last collective a moment after the
    main thread went on (a barrier holding an all-gather of Python tensors) then needs the GIL during
    interpreter finalisation, and the process aborts ("terminate called without an active exception", SIGABRT)
    after its work had finished: about one 2-process ``seqrec train`` in 20 failed so. Imported first, nothing
    holds the group, and destroying it joins those threads while the interpreter is whole. A single process
    (:func:`launched_processes` 1) has no group and skips the ~1 s import. (The SFT and GRPO modules import it
    anyway, through transformers.)
    """
    if launched_processes() > 1:
        import torch._dynamo  # noqa: F401


def distributed_state():
    """The accelerate ``PartialState`` (CPU/gloo when there is no accelerator)."""
    from accelerate import PartialState

    import_dynamo_before_process_group()
    return PartialState(cpu=not has_accelerator())


def accelerator_kwargs() -> dict:
    """Keyword arguments for ``accelerate.Accelerator`` matching :func:`distributed_state`.

    Called before the Accelerator is created, it also imports ``torch._dynamo`` when processes are launched, in
    case the Accelerator is what creates the process group (see :func:`import_dynamo_before_process_group`).
    """
    import_dynamo_before_process_group()
    return {"cpu": not has_accelerator()}
