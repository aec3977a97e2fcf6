"""llmrec: LLM-based sequential recommendation with latent reasoning tokens."""

import atexit as _atexit
import logging as _logging
import sys as _sys
import warnings as _warnings

__version__ = "0.1.0"

# peft imports bitsandbytes whenever it is installed, and on a CPU with AVX512-BF16 bitsandbytes then tries to
# fetch a 4-bit CPU kernel from the Hugging Face Hub, which needs trust_remote_code and fails with a warning on
# every llmrec command. Its portable 4-bit code serves finetune=qlora on a CPU (slowly) without that kernel: quiet
# that one logger unless the user has configured it.
_bnb_cpu_logger = _logging.getLogger("bitsandbytes.backends.cpu.ops")
if _bnb_cpu_logger.level == _logging.NOTSET:
    _bnb_cpu_logger.setLevel(_logging.ERROR)

# peft's PeftModel reads transformers 5's deprecated `is_gradient_checkpointing` while wrapping a model, so every
# LoRA SFT, GRPO, evaluation and recommend run printed a FutureWarning about code that is neither the user's nor
# llmrec's. Only that message is ignored.
_warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _destroy_process_group_at_exit() -> None:
    """End the default process group, if a run started one, while the interpreter is still whole.

    A process that leaves its gloo group alive until interpreter finalisation can abort with "terminate called
    without an active exception" (gloo's worker threads still hold tensors while Python is torn down), failing a
    run whose work had finished. Registered at import, so every entry point and every script using llmrec ends
    its group cleanly; torch is looked up, not imported, so importing llmrec stays cheap.
    """
    dist = _sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        import gc

        # Models and accelerators left in reference cycles still hold the group; collected first, destroying
        # it frees the group and joins its worker threads (see llmrec.distributed.import_dynamo_before_process_group).
        gc.collect()
        dist.destroy_process_group()


_atexit.register(_destroy_process_group_at_exit)
