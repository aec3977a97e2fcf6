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


def test_the_sdist_carries_every_prompt_and_recipe(tmp_path):
    """setup.py copies prompts/ and recipes/ into the wheel; an sdist without them (no MANIFEST.in) built a wheel
    without them, and `llmrec quickstart` failed at run time (a review)."""
    import shutil
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and *.egg-info behind
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".git", "runs", "data", "benchmarks", "build", "dist",
                                                             "*.egg-info", "__pycache__", ".*"))
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src, check=True,
                   capture_output=True)
    (tarball,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(tarball) as tar:
        shipped = {"/".join(Path(n).parts[1:]) for n in tar.getnames()}
    wanted = {str(p.relative_to(root)) for d in ("prompts", "recipes") for p in (root / d).rglob("*") if p.is_file()}
    assert wanted and wanted <= shipped, sorted(wanted - shipped)[:5]


def test_building_the_command_line_parser_imports_no_training_library():
    """The bench options lived in modules importing trl and peft: every `llmrec` command, `--help` included, paid
    ~9 s of imports before parsing its arguments (a review's profile)."""
    import subprocess
    import sys

    code = ("import sys, llmrec.cli; llmrec.cli.build_parser(); "
            "print(sorted(m for m in ('trl', 'peft', 'transformers', 'datasets', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
