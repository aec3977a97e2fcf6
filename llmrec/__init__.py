"""llmrec: LLM-based sequential recommendation with latent reasoning tokens."""

import logging as _logging

__version__ = "0.1.0"

# peft imports bitsandbytes whenever it is installed, and on a CPU with AVX512-BF16 bitsandbytes then tries to
# fetch a 4-bit CPU kernel from the Hugging Face Hub, which needs trust_remote_code and fails with a warning on
# every llmrec command. llmrec never runs 4-bit on a CPU (finetune=qlora asks for CUDA), so that kernel is never
# needed: quiet that one logger unless the user has configured it.
_bnb_cpu_logger = _logging.getLogger("bitsandbytes.backends.cpu.ops")
if _bnb_cpu_logger.level == _logging.NOTSET:
    _bnb_cpu_logger.setLevel(_logging.ERROR)
