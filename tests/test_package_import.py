"""What ``import llmrec`` does to the process beyond defining the package."""

import subprocess
import sys

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def _logger_level_after_import(setup: str = "") -> int:
    code = f"import logging\n{setup}\nimport llmrec\nprint(logging.getLogger({BNB_CPU_LOGGER!r}).level)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_import_quiets_bitsandbytes_cpu_kernel_warning():
    # On AVX512-BF16 CPUs bitsandbytes warns at import that it cannot fetch a Hub kernel llmrec never uses.
    assert _logger_level_after_import() == 40  # logging.ERROR


def test_import_keeps_a_level_the_user_set():
    setup = f"logging.getLogger({BNB_CPU_LOGGER!r}).setLevel(logging.DEBUG)"
    assert _logger_level_after_import(setup) == 10  # logging.DEBUG


def test_wrapping_a_model_with_peft_prints_no_transformers_deprecation():
    # PeftModel reads transformers 5's deprecated is_gradient_checkpointing: every LoRA run printed a FutureWarning
    # that was neither the user's code nor llmrec's. Other warnings still show.
    code = ("import warnings\nfrom llmrec.models.tiny import build_tiny_model\nfrom peft import LoraConfig, get_peft_model\n"
            "get_peft_model(build_tiny_model('tiny-qwen2'), LoraConfig(r=2, target_modules=['q_proj']))\n"
            "warnings.warn('another deprecation', FutureWarning)\n")
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, check=True)
    assert "is_gradient_checkpointing" not in out.stderr and "another deprecation" in out.stderr
