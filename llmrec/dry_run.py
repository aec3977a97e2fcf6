"""``--dry-run`` for ``llmrec sft``, ``llmrec grpo`` and ``llmrec evaluate``: check a recipe before a GPU run.

A dry run resolves the recipe (plus command-line overrides) into its config and prints the values that
matter, checks the inputs (the prepared dataset and its splits, the SFT checkpoint GRPO starts from, the
evaluated checkpoint, the D3 guidance run), builds the model architecture on the **meta device** (shapes
only: no weight is read or allocated) to count total and trainable parameters, and prints the accelerate
plan (processes, distributed type, precision, per-device / accumulated / global batch, steps per epoch
when the data is there). It writes nothing: no output directory, no converted model, no prepared sample,
no downloaded file (a hub config is read into memory, never into the cache).

Exit codes (a decision, documented in the README):

* ``0`` -- ready: the recipe is valid and every input it needs exists;
* ``3`` -- the recipe is valid but an input is missing (dataset, split, checkpoint, guidance run, model
  alias); each is printed with the command that makes it. Every other check still runs, so one dry run
  shows everything that is left to do;
* ``1`` -- invalid: a config error (unknown key, bad value: printed as ``llmrec: error: ...``), an
  accelerate plan the stage refuses (latent GRPO under FSDP/DeepSpeed), or a model whose architecture
  cannot be determined.

Where the architecture comes from, first match wins: a tiny alias (built on the meta device); an llmrec
alias (its converted copy's config, else the installed GGUF's metadata read in place, else the shipped
config); a local directory or ``config.json``; the Hugging Face cache; the hub (``config.json`` fetched
into memory); and only when the hub is unreachable, the architecture configs shipped in
``llmrec/models/known_configs/`` for the hub ids of the shipped GPU recipes. The output says which.

Where the accelerate plan comes from, first match wins: ``--accelerate-config FILE`` (and
``--num-processes N``); the environment of a running ``accelerate launch``; the recipe's own launch
command (the comment it opens with); else one process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import socket
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from llmrec.config import int_at_least

__all__ = [
    "EXIT_INVALID",
    "EXIT_MISSING",
    "EXIT_READY",
    "KNOWN_CONFIGS_DIR",
    "AcceleratePlan",
    "Architecture",
    "DryRunReport",
    "ParameterCount",
    "add_dry_run_arguments",
    "build_meta_model",
    "count_parameters",
    "grpo_steps_per_epoch",
    "known_config_path",
    "maybe_dry_run",
    "resolve_accelerate_plan",
    "resolve_architecture",
    "run_dry_run",
    "trainer_steps_per_epoch",
]

EXIT_READY = 0
EXIT_INVALID = 1
EXIT_MISSING = 3
KNOWN_CONFIGS_DIR = Path(__file__).resolve().parent / "models" / "known_configs"
_HUB_TIMEOUT_S = 5.0


# ----------------------------------------------------------------------------------------------- report


@dataclass
class DryRunReport:
    """What a dry run found: printable lines, missing inputs (with the command that makes each), errors."""

    title: str
    lines: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def section(self, name: str) -> None:
        self.lines.append(f"{name}:")

    def item(self, key: str, value: Any) -> None:
        self.lines.append(f"  {key}: {value}")

    def note(self, text: str) -> None:
        self.lines.append(f"  note: {text}")

    def missing_input(self, what: str, fix: str) -> None:
        self.missing.append(what)
        self.lines.append(f"  MISSING {what}")
        self.lines.append(f"    make it with: {fix}")

    def error(self, text: str) -> None:
        self.errors.append(text)
        self.lines.append(f"  ERROR {text}")

    @property
    def exit_code(self) -> int:
        if self.errors:
            return EXIT_INVALID
        return EXIT_MISSING if self.missing else EXIT_READY

    def render(self) -> str:
        if self.errors:
            verdict = f"dry run: INVALID ({len(self.errors)} error(s)); exit code {EXIT_INVALID}"
        elif self.missing:
            verdict = (f"dry run: recipe OK, NOT READY: missing {'; '.join(self.missing)}; "
                       f"exit code {EXIT_MISSING}")
        else:
            verdict = f"dry run: READY; exit code {EXIT_READY}"
        return "\n".join([self.title, *self.lines, verdict]) + "\n"


def _fmt_count(n: int) -> str:
    """``1543714304`` -> ``1,543,714,304 (1.54B)``."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n:,} ({n / scale:.3g}{unit})"
    return f"{n:,}"


def _fmt_gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


# ------------------------------------------------------------------------------------------ recipe text


def _recipe_path(config_path: str | None) -> Path | None:
    if not config_path:
        return None
    from llmrec.resources import resolve_resource

    try:
        return resolve_resource(config_path, "recipes")
    except FileNotFoundError:
        return None


def _header_commands(recipe: Path | None) -> list[str]:
    """The commands in the comment a recipe opens with (``accelerate launch ...`` / ``llmrec ...``)."""
    if recipe is None:
        return []
    out = []
    for line in recipe.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith(("accelerate launch", "llmrec ")):
            out.append(text.split("   #")[0].split("  #")[0].strip())
    return out


def _recipe_label(path: Path) -> str:
    from llmrec.resources import resource_dir

    try:
        return "recipes/" + path.resolve().relative_to(resource_dir("recipes").resolve()).as_posix()
    except (ValueError, FileNotFoundError):
        return str(path)


def _recipes_writing(output_dir: str, prefixes: tuple[str, ...]) -> list[Path]:
    """Shipped recipes whose ``output_dir`` is ``output_dir`` (the run that makes a missing checkpoint)."""
    import yaml

    from llmrec.config import load_yaml_text, yaml_text
    from llmrec.resources import resource_dir

    try:
        base = resource_dir("recipes")
    except FileNotFoundError:
        return []
    found = []
    for p in sorted(base.rglob("*.yaml")):
        if p.parent.name == "accelerate" or not p.name.startswith(prefixes):
            continue
        try:
            data = load_yaml_text(p.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue
        # as the recipe's run reads it: `output_dir: 0123` is '0123', not octal 83
        if isinstance(data, dict) and data.get("output_dir") and Path(yaml_text(data["output_dir"])) == Path(output_dir):
            found.append(p)
    return found


def _planned_sft(output_dir: str, depth: int = 0) -> tuple[Any, str] | None:
    """``(LatentSFTConfig, recipe label)`` of the shipped SFT recipe whose run ends up in ``output_dir``.

    A GRPO output leads to the SFT recipe of its ``sft_checkpoint`` (GRPO keeps the SFT model's shape).
    """
    from llmrec.config import ConfigError, load_yaml_text, parse_config, yaml_text

    for p in _recipes_writing(output_dir, ("sft", "grpo")):
        if p.name.startswith("grpo"):
            data = load_yaml_text(p.read_text(encoding="utf-8")) or {}
            if depth == 0 and data.get("sft_checkpoint"):
                found = _planned_sft(yaml_text(data["sft_checkpoint"]), depth + 1)
                if found is not None:
                    return found[0], f"{found[1]} (via {_recipe_label(p)})"
            continue
        from llmrec.training.sft import LatentSFTConfig

        try:
            (cfg,) = parse_config([LatentSFTConfig], p)
        except ConfigError:
            continue
        return cfg, _recipe_label(p)
    return None


def _command_for_run(output_dir: str, prefixes: tuple[str, ...], fallback: str) -> str:
    for p in _recipes_writing(output_dir, prefixes):
        cmds = _header_commands(p)
        if cmds:
            return cmds[0]
        return f"llmrec {p.name.split('_')[0]} --config {_recipe_label(p)}"
    return fallback


def _prepare_hint(recipe: Path | None, key: str, dataset: str) -> str:
    """The command that prepares ``dataset``: the recipe's own comment on its ``key:`` line when it names
    that output, else the generic form."""
    if recipe is not None:
        for line in recipe.read_text(encoding="utf-8").splitlines():
            if line.startswith(f"{key}:") and "llmrec data prepare" in line:
                cmd = line.split("#", 1)[1].strip()
                cmd = cmd[cmd.index("llmrec data prepare"):]
                m = re.search(r"--output\s+(\S+)", cmd)
                if m and Path(m.group(1)) == Path(dataset):
                    return cmd
    return (f"llmrec data prepare --format <format> --input <raw dir> --output {dataset}  (README 'Data'; the GPU "
            f"recipes use --format amazon2018 --category <Amazon category>)")


# ------------------------------------------------------------------------------------------------- data


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def check_dataset(report: DryRunReport, dataset: str | None, splits: Sequence[str], recipe: Path | None,
                  key: str = "dataset") -> dict[str, int] | None:
    """Report on a prepared dataset (or embedded sample) and its ``splits``; rows per split when known.

    A missing directory, catalogue or split is a missing input (with the command that prepares it), never
    an exception: the other checks of the dry run still run. Nothing is prepared or written.
    """
    report.section("data")
    if not dataset:
        report.error(f"no {key} given")
        return None
    splits = [s for s in dict.fromkeys(splits) if s]
    directory = _dataset_directory(dataset)
    if directory != Path(dataset):  # an embedded sample's name
        report.item(key, f"{dataset} (embedded sample)")
        if not (directory / "stats.json").exists():
            report.note(f"prepared into {directory} on first use (not yet; the dry run prepares nothing)")
            return None
    else:
        report.item(key, str(directory))
        if not directory.is_dir():
            report.missing_input(f"dataset {dataset} (directory not found)", _prepare_hint(recipe, key, dataset))
            return None
    if not (directory / "catalog.jsonl").exists():
        report.missing_input(f"dataset {dataset} (no catalog.jsonl: not a prepared directory)",
                             _prepare_hint(recipe, key, dataset))
        return None
    from llmrec.data.canonical import read_stats

    stats = read_stats(directory / "stats.json")  # {} when absent; a damaged one is named
    items = (stats.get("cleaned") or {}).get("catalog_items") or _count_lines(directory / "catalog.jsonl")
    report.item("catalogue items", f"{items:,}")
    rows: dict[str, int] = {}
    for split in splits:
        path = directory / f"{split}.jsonl"
        if not path.exists():
            report.missing_input(f"split '{split}' of {dataset} ({path.name} not found)",
                                 _prepare_hint(recipe, key, dataset) + f"  (with '{split}' in --splits)")
            continue
        n = (stats.get("rows") or {}).get(split)
        rows[split] = int(n) if isinstance(n, int) else _count_lines(path)
        report.item(f"{split} rows", f"{rows[split]:,}")
    return rows


def check_prompt(report: DryRunReport, prompt: str) -> None:
    from llmrec.prompts import PromptTemplate

    try:
        PromptTemplate.load(prompt)
    except (OSError, ValueError) as e:
        report.error(f"prompt template {prompt!r}: {e}")
    else:
        report.item("prompt template", f"{prompt} (found)")


# ------------------------------------------------------------------------------------------ architecture


@dataclass
class Architecture:
    """A model's transformers config (no weights), where it came from, and what the real run still needs."""

    config: Any  # transformers.PretrainedConfig
    source: str
    missing: tuple[str, str] | None = None  # (what, command) the real run needs first


def known_config_path(name: str) -> Path | None:
    """The shipped architecture config of a hub id or alias (``Qwen/Qwen2.5-1.5B`` -> ``Qwen__Qwen2.5-1.5B.json``)."""
    path = KNOWN_CONFIGS_DIR / (name.replace("/", "__") + ".json")
    return path if path.is_file() else None


def _config_from_dict(data: dict[str, Any], where: str):
    from transformers import CONFIG_MAPPING

    data = {k: v for k, v in data.items() if not k.startswith("_")}
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{where}: model_type {model_type!r} is not a transformers architecture")
    return CONFIG_MAPPING[model_type].from_dict(data)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _hub_unreachable_reason() -> str | None:
    """Why the hub cannot be asked (offline mode, no connection), or None when it may be reachable."""
    from huggingface_hub import constants

    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")) \
            or constants.HF_HUB_OFFLINE:
        return "offline mode (HF_HUB_OFFLINE)"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct connection says nothing: let the client try
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=_HUB_TIMEOUT_S):
            return None
    except OSError as e:
        return f"cannot connect to {host}:{port}: {e}"


class _HubAnswered(Exception):
    """The hub was reached and refused (no such repo, gated, ...): not a reason to use a shipped config."""


def _fetch_hub_config(repo_id: str) -> dict[str, Any]:
    """``config.json`` of a hub repo, read into memory (nothing is written to the HF cache)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    resp = get_session().get(hf_hub_url(repo_id, "config.json"), headers=build_hf_headers(),
                             timeout=_HUB_TIMEOUT_S * 2, follow_redirects=True)
    if resp.status_code != 200:
        raise _HubAnswered(f"the hub answered HTTP {resp.status_code} for {repo_id}/config.json")
    return json.loads(resp.content)


def resolve_architecture(name: str) -> Architecture:
    """The architecture of ``name`` (alias, tiny model, local dir or ``config.json``, hub id) without weights.

    Raises ``ValueError`` when it cannot be determined; never writes anything (see the module docstring
    for the order of the sources).
    """
    from llmrec.models import backbone
    from llmrec.models.tiny import TINY_ALIASES

    if name in TINY_ALIASES:
        return Architecture(backbone.describe_architecture(name), "built-in tiny random model")
    if name in backbone.ALIASES:
        spec = backbone.ALIASES[name]
        if backbone.alias_is_cached(name):
            return Architecture(backbone.describe_architecture(name),
                                f"converted copy of alias {name} in {backbone.alias_cache_path(name)}")
        installed = backbone.alias_is_installed(name)
        if installed and len(spec.modules) == 1:
            # One GGUF file: its metadata is read in place (a split GGUF would need concatenating = writing).
            return Architecture(backbone.describe_architecture(name),
                                f"GGUF metadata of the installed alias {name} (converted into the cache on the "
                                f"first real run)")
        shipped = known_config_path(name)
        need = ((f"model alias {name} (installed, not converted)", f"llmrec models convert {name}") if installed
                else (f"model alias {name} (not installed)", spec.install_command))
        if shipped is None:
            raise ValueError(f"the architecture of alias {name} is unknown until it is converted: run "
                             f"`{need[1]}`" + ("" if installed else f" then `llmrec models convert {name}`"))
        return Architecture(_config_from_dict(_read_json(shipped), str(shipped)),
                            f"shipped architecture config {shipped.name} ({need[0]})", missing=need)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".json":
        return Architecture(_config_from_dict(_read_json(path), str(path)), f"local config file {path}")
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ValueError(f"{path} has no config.json (not a saved model directory)")
        return Architecture(_config_from_dict(_read_json(cfg), str(cfg)), f"local config {cfg}")
    if backbone._looks_like_path(name) or path.exists():
        raise ValueError(f"'{name}' is not a model directory, a config.json or a known alias "
                         f"({', '.join(backbone.known_aliases())})")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", cache_dir=constants.HF_HUB_CACHE)
    if isinstance(cached, str):
        return Architecture(_config_from_dict(_read_json(Path(cached)), cached), f"Hugging Face cache ({cached})")
    reason = _hub_unreachable_reason()
    if reason is None:
        try:
            data = _fetch_hub_config(name)
            return Architecture(_config_from_dict(data, f"{name}/config.json"),
                                "the Hugging Face Hub (config.json read into memory, nothing cached)")
        except _HubAnswered as e:
            raise ValueError(f"cannot read the architecture of '{name}': {e}") from None
        except Exception as e:  # any transport failure means "unreachable"
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    shipped = known_config_path(name)
    if shipped is None:
        raise ValueError(f"cannot read the architecture of '{name}': the hub is unreachable ({reason}) and it is "
                         f"not in the Hugging Face cache; give a local model directory or config.json")
    return Architecture(_config_from_dict(_read_json(shipped), str(shipped)),
                        f"shipped architecture config llmrec/models/known_configs/{shipped.name} "
                        f"(the hub is unreachable: {reason})")


def _tokenizer_length(name: str) -> int | None:
    """``len(tokenizer)`` when the tokenizer is available offline without writing anything, or recorded in the
    shipped architecture config, else None."""
    length = _local_tokenizer_length(name)
    return length if length is not None else _shipped_tokenizer_length(name)


def _local_tokenizer_length(name: str) -> int | None:
    from llmrec.models import backbone
    from llmrec.models.tiny import TINY_ALIASES, build_tiny_tokenizer

    try:
        if name in TINY_ALIASES:
            return len(build_tiny_tokenizer(name))
        from transformers import AutoTokenizer

        if name in backbone.ALIASES:
            if not backbone.alias_is_cached(name):
                return None
            return len(AutoTokenizer.from_pretrained(str(backbone.alias_cache_path(name)), local_files_only=True))
        path = Path(name).expanduser()
        if path.is_dir():
            if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
                return None
            return len(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
        if path.exists() or backbone._looks_like_path(name):
            return None
        from huggingface_hub import constants, try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "tokenizer_config.json", cache_dir=constants.HF_HUB_CACHE), str):
            return None
        return len(AutoTokenizer.from_pretrained(name, local_files_only=True, cache_dir=constants.HF_HUB_CACHE))
    except Exception:  # the count is informative; any failure means "unknown"
        return None


def _shipped_tokenizer_length(name: str) -> int | None:
    """``len(tokenizer)`` recorded in the shipped architecture config (``_llmrec_tokenizer_length``), if any.

    It tells a dry run whether the latent tokens need new embedding rows before the alias is converted or
    the hub reached (SmolLM2's 49,152 rows are all taken; Qwen2.5 pads its vocabulary beyond the tokenizer).
    """
    shipped = known_config_path(name)
    if shipped is None:
        return None
    length = _read_json(shipped).get("_llmrec_tokenizer_length")
    return int(length) if length is not None else None


# ---------------------------------------------------------------------------------------------- params


def build_meta_model(config: Any, dtype: str | torch.dtype = "bfloat16") -> torch.nn.Module:
    """``AutoModelForCausalLM.from_config`` on the meta device: every parameter has its shape, none has storage."""
    from transformers import AutoModelForCausalLM

    from llmrec.models.backbone import resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    if not isinstance(torch_dtype, torch.dtype):
        torch_dtype = torch.bfloat16
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)


@dataclass
class ParameterCount:
    """Parameter counts of the model a stage builds, by part, and the memory they imply per process."""

    parts: dict[str, int]
    trainable_parts: list[str]
    weight_bytes: int
    train_state_bytes: int  # gradients + AdamW's two moments of the trainable parameters

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def trainable(self) -> int:
        return sum(self.parts[p] for p in self.trainable_parts)


def count_parameters(
    config: Any,
    dtype: str = "bfloat16",
    *,
    lora: dict[str, Any] | None = None,
    latent: Any = None,
    extra_embedding_rows: int = 0,
    train_lm: bool = False,
    train_lora: bool = False,
    train_head: bool = True,
    quantized_4bit: bool = False,
) -> ParameterCount:
    """Count the parameters of base LM (+ added embedding rows) + LoRA + latent pooling head, built on meta.

    Args:
        config: the LM's transformers config.
        dtype: the LM's weights dtype.
        lora: ``{"r", "lora_alpha", "lora_dropout", "target_modules"}`` to inject LoRA (peft, on meta).
        latent: a :class:`~llmrec.models.latent.LatentConfig` with N >= 1 for the pooling head, or None.
        extra_embedding_rows: rows the latent tokens add to the embedding matrix (x2 when untied).
        train_lm / train_lora / train_head: which parts train (full fine-tune / adapter / head).
        quantized_4bit: QLoRA's 4-bit base (about half a byte per weight of the decoder's linear layers).

    Raises ``ValueError`` when a LoRA target module does not exist in the model.
    """
    from llmrec.models.backbone import resolve_dtype
    from llmrec.models.latent import LatentPoolingHead

    model = build_meta_model(config, dtype)
    parts: dict[str, int] = {"base LM": sum(p.numel() for p in model.parameters())}
    elem = model.get_input_embeddings().weight.element_size()
    weight_bytes = parts["base LM"] * elem
    if quantized_4bit:
        linear = sum(m.weight.numel() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
        # bitsandbytes holds the decoder's linear weights in 4 bits; QLoRA's prepare_model_for_kbit_training upcasts
        # every other parameter (embeddings, norms, biases, an untied lm_head) to float32: they were sized in the
        # model dtype (~30% under for Qwen2.5-1.5B in bfloat16)
        elem = 4
        weight_bytes = int(linear * 0.5) + (parts["base LM"] - linear) * elem
    hidden = config.get_text_config().hidden_size if hasattr(config, "get_text_config") else config.hidden_size
    tied = bool(getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                        "tie_word_embeddings", False))
    if extra_embedding_rows > 0:
        parts["added embedding rows"] = extra_embedding_rows * hidden * (1 if tied else 2)
        weight_bytes += parts["added embedding rows"] * elem
    train_state = 0
    trainable = []
    if train_lm:
        trainable += [p for p in parts]
        train_state += 3 * sum(parts.values()) * elem  # gradient + 2 AdamW moments, in the weights' dtype
    if lora:
        from peft import LoraConfig, get_peft_model

        from llmrec.training.sft import peft_target_modules

        lcfg = LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora.get("lora_dropout", 0.0),
                          target_modules=peft_target_modules(lora["target_modules"]), task_type="CAUSAL_LM",
                          bias="none")
        if extra_embedding_rows > 0:
            # SFT adds the latent tokens' rows before wrapping: an adapter on the embedding or the LM head is as
            # wide as the resized matrix.
            with torch.device("meta"):
                model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + extra_embedding_rows,
                                              mean_resizing=False)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated question
            peft_model = get_peft_model(model, lcfg)
        lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
        parts["LoRA adapters"] = sum(p.numel() for p in lora_params)
        lora_bytes = sum(p.numel() * p.element_size() for p in lora_params)
        weight_bytes += lora_bytes
        if train_lora:
            trainable.append("LoRA adapters")
            train_state += 3 * lora_bytes
    if latent is not None and latent.num_latent_tokens >= 1:
        with torch.device("meta"):
            head = LatentPoolingHead.from_config(hidden, latent)
        parts["latent pooling head"] = sum(p.numel() for p in head.parameters())
        head_bytes = parts["latent pooling head"] * resolve_dtype(latent.head_dtype).itemsize
        weight_bytes += head_bytes
        if train_head:
            trainable.append("latent pooling head")
            train_state += 3 * head_bytes
    return ParameterCount(parts, trainable, int(weight_bytes), int(train_state))


def _report_architecture(report: DryRunReport, arch: Architecture) -> None:
    cfg = arch.config.get_text_config() if hasattr(arch.config, "get_text_config") else arch.config
    classes = getattr(arch.config, "architectures", None)
    report.item("architecture", cfg.model_type + (f" ({', '.join(classes)})" if classes else ""))
    report.item("architecture from", arch.source)
    report.item("shape", f"layers {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, "
                f"intermediate {getattr(cfg, 'intermediate_size', '?')}, heads {cfg.num_attention_heads} "
                f"(kv {getattr(cfg, 'num_key_value_heads', cfg.num_attention_heads)}), vocab {cfg.vocab_size}, "
                f"tied embeddings {bool(getattr(cfg, 'tie_word_embeddings', False))}")
    if arch.missing:
        report.missing_input(*arch.missing)


def _report_counts(report: DryRunReport, counts: ParameterCount, training: bool) -> None:
    parts = ", ".join(f"{k} {v:,}" for k, v in counts.parts.items())
    report.item("parameters total", f"{_fmt_count(counts.total)}  [{parts}]")
    if training:
        share = counts.trainable / counts.total if counts.total else 0.0
        report.item("parameters trainable", f"{_fmt_count(counts.trainable)} = {share:.2%}  "
                    f"[{', '.join(counts.trainable_parts) or 'nothing'}]")
        report.item("memory per process", f"~{_fmt_gb(counts.weight_bytes + counts.train_state_bytes)} "
                    f"(weights {_fmt_gb(counts.weight_bytes)} + gradients and AdamW states "
                    f"{_fmt_gb(counts.train_state_bytes)}; activations not included)")
    else:
        report.item("memory per process", f"~{_fmt_gb(counts.weight_bytes)} of weights (activations and beams not included)")


def _latent_rows(report: DryRunReport, name: str, vocab_size: int, latent: Any) -> int:
    """Embedding rows the latent tokens add (0 when they fit the matrix, as with Qwen's padded vocabulary)."""
    n = latent.num_latent_tokens if latent is not None else 0
    if n == 0:
        return 0
    length = _tokenizer_length(name)
    if length is None:
        report.note(f"tokenizer not available offline: the {n} latent token(s) are assumed to fit the "
                    f"{vocab_size:,} embedding rows (no resize)")
        return 0
    return max(0, length + n - vocab_size)


# ---------------------------------------------------------------------------------------------- accelerate


@dataclass
class AcceleratePlan:
    """How many processes of what kind the stage runs as (what ``accelerate launch`` would start)."""

    num_processes: int = 1
    distributed_type: str = "NO"
    mixed_precision: str = "no"
    source: str = "no accelerate config: one process (plain `llmrec ...`)"
    # The distributed type was set (a config file, --cpu, --multi_gpu, ...): accelerate launches a NO/--cpu plan as
    # one process whatever --num_processes says, and promotes a process count to multi-GPU only when none was set.
    type_fixed: bool = False

    @property
    def sharded(self) -> bool:
        return self.distributed_type in ("FSDP", "DEEPSPEED")


def _plan_from_file(path: str, label: str | None = None) -> AcceleratePlan:
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig

    from llmrec.config import ConfigError
    from llmrec.resources import resolve_resource

    try:
        resolved = resolve_resource(path, "recipes")
        cfg = ClusterConfig.from_yaml_file(yaml_file=str(resolved))
    except (OSError, ValueError, TypeError, yaml.YAMLError) as e:  # missing, unreadable, not YAML, wrong keys
        # one line (a YAML error spans several)
        raise ConfigError(f"accelerate config {path}: {' '.join(str(e).split()) or type(e).__name__}") from None
    dist = getattr(cfg.distributed_type, "value", str(cfg.distributed_type))
    mp = getattr(cfg.mixed_precision, "value", str(cfg.mixed_precision or "no"))
    n = cfg.num_processes if cfg.num_processes and cfg.num_processes > 0 else 1
    if str(dist) == "NO":
        n = 1  # accelerate's simple launcher: one process, whatever num_processes the file holds
    return AcceleratePlan(n, str(dist), str(mp), label or f"accelerate config {path}", type_fixed=True)


def _plan_from_launch_command(command: str, recipe_label: str) -> AcceleratePlan:
    """The plan of an ``accelerate launch`` command line (its --config_file, then its flags)."""
    tokens = shlex.split(command.split(" -m ", 1)[0])[2:]
    opts: dict[str, str | bool] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            key, eq, val = tok[2:].partition("=")
            if eq:
                opts[key] = val
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                opts[key] = tokens[i + 1]
                i += 1
            else:
                opts[key] = True
        i += 1
    label = f"the recipe's launch command ({recipe_label}: {command})"
    plan = _plan_from_file(str(opts["config_file"]), label) if "config_file" in opts else AcceleratePlan(source=label)
    for flag, dist in (("cpu", "NO"), ("multi_gpu", "MULTI_GPU"), ("use_fsdp", "FSDP"), ("use_deepspeed", "DEEPSPEED")):
        if opts.get(flag):
            plan.distributed_type, plan.type_fixed = dist, True
    if isinstance(opts.get("num_processes"), str):
        plan.num_processes = int(opts["num_processes"])
    if opts.get("cpu") or plan.type_fixed and plan.distributed_type == "NO":
        plan.num_processes = 1  # accelerate's simple launcher starts one process, whatever --num_processes says
    if isinstance(opts.get("mixed_precision"), str):
        plan.mixed_precision = str(opts["mixed_precision"])
    return plan


def _launched_by_accelerate() -> bool:
    return "ACCELERATE_MIXED_PRECISION" in os.environ or (
        "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ)


def resolve_accelerate_plan(accelerate_config: str | None = None, num_processes: int | None = None,
                            recipe: Path | None = None) -> AcceleratePlan:
    """The plan from ``--accelerate-config``, a running ``accelerate launch``, the recipe header, or one process."""
    if accelerate_config:
        plan = _plan_from_file(accelerate_config)
    elif _launched_by_accelerate():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dist = ("FSDP" if _truthy(os.environ.get("ACCELERATE_USE_FSDP"))
                else "DEEPSPEED" if _truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED"))
                else "MULTI_GPU" if world > 1 else "NO")
        plan = AcceleratePlan(world, dist, os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),
                              "the running `accelerate launch` (its environment)")
    else:
        launch = [c for c in _header_commands(recipe) if c.startswith("accelerate launch")]
        plan = _plan_from_launch_command(launch[0], _recipe_label(recipe)) if launch and recipe else AcceleratePlan()
    if num_processes and plan.type_fixed and plan.distributed_type == "NO":
        # `accelerate launch --num_processes N` with this config (or --cpu) starts one process (simple launcher)
        plan.source += (f", --num-processes {num_processes} ignored: accelerate launches distributed_type NO (or "
                        f"--cpu) as one process; plan for N with a multi-process config such as recipes/accelerate/ddp.yaml")
    elif num_processes:
        plan.num_processes = int(num_processes)
        plan.source += f", --num-processes {num_processes}"
    if plan.num_processes > 1 and plan.distributed_type == "NO" and not plan.type_fixed:
        plan.distributed_type = "MULTI_GPU"  # as accelerate does with no type set, on a machine with the GPUs
    return plan


def _report_plan(report: DryRunReport, plan: AcceleratePlan) -> None:
    from llmrec.distributed import has_accelerator

    report.section("accelerate plan")
    report.item("from", plan.source)
    report.item("processes", plan.num_processes)
    report.item("distributed type", plan.distributed_type)
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if plan.num_processes > gpus:
            report.note(f"this machine has {gpus} GPU(s) for {plan.num_processes} processes")
    elif not has_accelerator():
        here = "on the CPU, with gloo between the processes" if plan.num_processes > 1 else "on the CPU"
        report.note(f"this machine has no GPU; the plan describes the machine the recipe is launched on "
                    f"(here the same launch would run {here})")


def trainer_steps_per_epoch(rows: int, per_device: int, world: int, grad_accum: int, drop_last: bool = False) -> int:
    """Optimiser steps of one epoch under ``transformers.Trainer`` + accelerate (the last partial step counts).

    ``drop_last`` (``dataloader_drop_last``): the short last batch is dropped, then what does not fill a batch on
    every process (it counted as a step: 33 rows, batch 4, accumulation 8 made 1 step, not 2)."""
    batches = (rows // per_device) // world if drop_last else math.ceil(math.ceil(rows / per_device) / world)
    return max(1, batches // grad_accum + int(batches % grad_accum > 0))


def grpo_steps_per_epoch(prompts: int, per_device_rows: int, world: int, grad_accum: int, group: int) -> int:
    """Optimiser steps of one latent GRPO epoch (the last incomplete batch of prompts is dropped)."""
    return prompts // (per_device_rows * world * grad_accum // group)


def _warmup(warmup: float, total: int | None) -> str:
    if warmup >= 1:
        return f"{int(warmup)} steps"
    return f"{warmup:g} of the run" + (f" = {math.ceil(total * warmup)} steps" if total else "")


# ------------------------------------------------------------------------------------------------ stages


_SFT_FIELDS = ("model_name_or_path", "model_dtype", "finetune", "lora_r", "lora_alpha", "lora_dropout",
               "lora_target_modules", "num_latent_tokens", "head_num_heads", "head_dim", "rope_base", "head_dtype",
               "head_output_norm", "dataset", "train_split", "eval_split", "max_train_rows", "max_eval_rows", "history_length", "prompt",
               "noun", "max_length", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
               "max_grad_norm", "num_train_epochs", "max_steps", "per_device_train_batch_size",
               "gradient_accumulation_steps", "eval_strategy", "eval_steps", "save_strategy", "save_steps",
               "load_best_model_at_end", "early_stopping_patience", "bf16", "fp16",
               "seed", "output_dir")
_GRPO_FIELDS = ("sft_checkpoint", "model_name_or_path", "model_dtype", "dataset", "train_split", "max_train_rows",
                "history_length", "max_length", "rollout", "temperature", "policy_logprob", "num_generations",
                "reward_funcs", "reward_weights", "advantage_mode", "noise_scale", "noise_mode", "loss_type", "num_iterations", "epsilon",
                "epsilon_high", "beta", "train_lora", "naive_forward", "learning_rate", "lr_scheduler_type",
                "warmup_steps", "max_grad_norm", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps", "save_steps", "seed", "output_dir")
_EVAL_FIELDS = ("dataset", "split", "max_rows", "row_seed", "method", "model_name_or_path", "checkpoint", "dtype",
                "prompt", "noun", "use_chat_template", "history_length", "max_prompt_length", "prompt_fit",
                "num_beams", "length_penalty", "early_stopping", "tokenization", "guidance_checkpoint", "guidance_weight",
                "batch_size", "batch_order", "ks", "output_dir")
_LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
_HEAD_FIELDS = ("head_num_heads", "head_dim", "rope_base", "head_dtype", "head_output_norm")


def _report_config(report: DryRunReport, config: Any, names: Iterable[str], skip: Iterable[str] = ()) -> None:
    report.section("config (resolved recipe + overrides)")
    skip = set(skip)
    for name in names:
        if name not in skip and hasattr(config, name):
            value = getattr(config, name)
            report.item(name, getattr(value, "value", value))


def _recorded_rows(kind: str | None, meta: dict[str, Any]) -> int | None:
    """Embedding rows of a checkpoint: a full one's config.json already has them; an adapter's are recorded."""
    if kind == "full":
        return None
    rows = meta.get("embedding_rows")
    return int(rows) if rows is not None else None


def _model_section(report: DryRunReport, name: str, dtype: str, embedding_rows: int | None = None,
                   **count_kwargs: Any) -> ParameterCount | None:
    """Architecture + meta-device parameter counts; errors are reported, never raised.

    ``embedding_rows`` is the size a checkpoint recorded (latent tokens included); without it the latent
    tokens' rows are worked out from the tokenizer when it is available offline.
    """
    report.section("model (meta device: shapes only, no weights loaded)")
    try:
        arch = resolve_architecture(name)
    except (ValueError, OSError, RuntimeError) as e:  # a bad GGUF checksum, a corrupt cached config.json, ...
        report.item("model", f"{name} in {dtype}")
        report.error(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        return None
    cfg = arch.config.get_text_config() if hasattr(arch.config, "get_text_config") else arch.config
    if str(dtype) == "auto":
        # the dtype the weights are stored in, as from_pretrained(dtype="auto") loads them: float32 for the built-in
        # aliases (their converted copies) and tiny models, else the config's (float32 when it records none); it was
        # sized as bfloat16, half the float32 weights the run loads
        from llmrec.models.backbone import known_aliases

        stored = None if name in known_aliases() else (getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None))
        dtype = str(stored).removeprefix("torch.") if stored is not None and str(stored) != "auto" else "float32"
        report.item("model", f"{name} in auto = {dtype} (the stored weights' dtype)")
    else:
        report.item("model", f"{name} in {dtype}")
    _report_architecture(report, arch)
    if embedding_rows is not None:
        extra = max(0, embedding_rows - cfg.vocab_size)
    elif Path(name).is_dir() and (Path(name) / "config.json").exists() and (Path(name) / "llmrec_config.json").exists():
        extra = 0  # a full llmrec checkpoint: its config.json has the resized vocabulary
    else:
        extra = _latent_rows(report, name, cfg.vocab_size, count_kwargs.get("latent"))
    try:
        return count_parameters(arch.config, dtype, extra_embedding_rows=extra, **count_kwargs)
    except ValueError as e:
        report.error(f"cannot build the model: {str(e).strip().splitlines()[0]}")
        return None


def _lora_from_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The LoRA settings an SFT checkpoint's llmrec_config.json records (for the adapter's size)."""
    return {"r": meta.get("lora_r", 8), "lora_alpha": meta.get("lora_alpha", 16),
            "lora_dropout": meta.get("lora_dropout", 0.0), "target_modules": meta.get("lora_target_modules")}


def _check_qlora(report: DryRunReport, compute_dtype: Any) -> None:
    """A 4-bit base needs bitsandbytes and a named compute dtype: the setting the run builds, checked as it is
    (the run refuses either when it loads the model; the dry run said READY)."""
    from llmrec.models.backbone import qlora_quantization_config

    try:
        qlora_quantization_config(compute_dtype)
    except (ImportError, ValueError) as e:
        report.error(str(e))


def dry_run_sft(config: Any, plan: AcceleratePlan, recipe: Path | None, report: DryRunReport) -> None:
    """Checks of ``llmrec sft``: data splits, model + LoRA/full + head on meta, batch and steps."""
    lora = config.finetune in ("lora", "qlora")
    latent = config.latent_config() if config.num_latent_tokens >= 1 else None
    skip = (() if lora else _LORA_FIELDS) + (() if latent else _HEAD_FIELDS)
    if str(getattr(config.eval_strategy, "value", config.eval_strategy)) != "steps":
        skip += ("eval_steps",)
    if str(getattr(config.save_strategy, "value", config.save_strategy)) != "steps":
        skip += ("save_steps",)
    _report_config(report, config, _SFT_FIELDS, skip)
    rows = check_dataset(report, config.dataset, [config.train_split, config.eval_split or ""], recipe)
    check_prompt(report, config.prompt)
    counts = _model_section(
        report, config.model_name_or_path, config.model_dtype,
        lora={"r": config.lora_r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
              "target_modules": config.lora_target_modules} if lora else None,
        latent=latent, train_lm=config.finetune == "full", train_lora=lora, quantized_4bit=config.finetune == "qlora",
    )
    if counts is not None:
        _report_counts(report, counts, training=True)
    if config.finetune == "qlora":
        _check_qlora(report, config.model_dtype)
        if not torch.cuda.is_available():
            report.note("finetune=qlora without a CUDA GPU: bitsandbytes runs the 4-bit layers on the CPU (slow)")
    _report_plan(report, plan)
    precision = "bf16" if config.bf16 else "fp16" if config.fp16 else plan.mixed_precision
    report.item("mixed precision", f"{precision} (weights {config.model_dtype}"
                + (", from the recipe's bf16/fp16)" if config.bf16 or config.fp16 else ", from the accelerate plan)"))
    if plan.sharded:
        report.note(f"{plan.distributed_type} with llmrec's SFT checkpoint format is not covered by llmrec's tests; "
                    "DDP (recipes/accelerate/ddp.yaml) is")
    per, ga, world = config.per_device_train_batch_size, config.gradient_accumulation_steps, plan.num_processes
    report.item("per-device batch", per)
    report.item("gradient accumulation", ga)
    report.item("global batch", f"{per * ga * world} rows = {per} x {ga} x {world} processes")
    train_rows = (rows or {}).get(config.train_split)
    total = None
    if train_rows is not None:
        used = min(train_rows, config.max_train_rows) if config.max_train_rows else train_rows
        from llmrec.config import ConfigError
        from llmrec.training.sft import refuse_layout_dependent_drop_last

        try:  # the run counts the rows kept (a row without history is skipped): checked on the rows drawn here
            refuse_layout_dependent_drop_last(config, used, world)
        except ConfigError as e:
            report.error(str(e))
        steps = trainer_steps_per_epoch(used, per, world, ga, config.dataloader_drop_last)
        total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps)
        report.item("steps per epoch", f"{steps:,} ({used:,} training rows)")
        report.item("total steps", f"{total:,}" + (" (max_steps)" if config.max_steps > 0
                                                  else f" ({config.num_train_epochs:g} epochs)"))
    else:
        report.item("steps per epoch", "unknown until the dataset is prepared")
    report.item("warmup", _warmup(config.warmup_steps, total))
    strategy = str(getattr(config.eval_strategy, "value", config.eval_strategy))
    if config.eval_split and strategy == "no":
        report.item("validation loss", f"none (eval_strategy: no: the {config.eval_split} rows are never evaluated)")
    elif config.eval_split:
        eval_rows = (rows or {}).get(config.eval_split)
        if eval_rows is not None and config.max_eval_rows:
            eval_rows = min(eval_rows, config.max_eval_rows)
        when = "each epoch" if strategy == "epoch" else f"every {config.eval_steps:g} steps"
        # as run_sft: early stopping whenever there are validation rows and a patience (load_best_model_at_end only
        # decides which weights are kept at the end)
        stop = (f"; early stopping after {config.early_stopping_patience} evaluation(s) without a better eval_loss"
                if config.early_stopping_patience > 0 else "")
        keep = "; the best checkpoint is loaded at the end" if config.load_best_model_at_end else \
            "; the last weights are kept (load_best_model_at_end: false)"
        report.item("validation loss", f"{when} on {f'{eval_rows:,} ' if eval_rows else ''}{config.eval_split} rows"
                    f"{stop}{keep}")
    from llmrec.training.finished_runs import (
        dataset_dir_or_none,
        finished_sft_differences,
        refuse_other_finished_run,
    )
    from llmrec.training.sft import RESULTS_NAME, last_complete_checkpoint, refuse_changed_sft_resume

    def check_finished() -> None:
        refuse_other_finished_run(Path(config.output_dir), "SFT run",
                                  finished_sft_differences(config, dataset_dir_or_none(config.dataset)),
                                  "set retrain: true to train it again with these settings, or use another output_dir")

    _report_output(report, config.output_dir, RESULTS_NAME, config.retrain, last_complete_checkpoint, check_finished,
                   lambda ckpt: refuse_changed_sft_resume(config, ckpt, plan.num_processes))


def _report_output(report: DryRunReport, output_dir: str | None, results_name: str, retrain: bool,
                   last_checkpoint, check_finished=None, check_resume=None) -> None:
    """What the real run would do with its output directory (skip a finished run, resume, start).

    ``check_finished()`` and ``check_resume(checkpoint)`` are the real run's own refusals (a finished run or a
    checkpoint made with other settings or data): their error is the report's, not a READY the run then refuses.
    """
    report.section("output")
    out = Path(output_dir or ".")
    report.item("output_dir", str(out))
    if retrain:
        report.note("retrain: true -- the real run starts again")
    elif (out / results_name).exists():
        try:
            if check_finished is not None:
                check_finished()
        except (ValueError, OSError) as e:
            report.error(str(e))
            return
        report.note(f"{out} holds a finished run ({results_name}) made with these settings: the real run skips it "
                    "(retrain: true trains again)")
    else:
        last = last_checkpoint(out)
        if last and check_resume is not None:
            try:
                check_resume(last)
            except (ValueError, OSError) as e:
                report.error(str(e))
                return
        report.item("resume", f"from {last}" if last else "nothing to resume: a fresh run")


def _checkpoint_meta(path: Path) -> dict[str, Any]:
    meta_path = path / "llmrec_config.json"
    return _read_json(meta_path) if meta_path.exists() else {}


def _read_checkpoint(ckpt: Path, report: DryRunReport) -> tuple[str | None, dict[str, Any], Any]:
    """``(kind, llmrec_config.json, LatentConfig or None)`` of an existing checkpoint; a bad one is a report error."""
    from llmrec.models.checkpoint import CheckpointError, checkpoint_kind
    from llmrec.models.latent import LATENT_CONFIG_NAME, LatentConfig

    kind = None
    try:
        kind = checkpoint_kind(ckpt)
    except CheckpointError as e:
        report.error(str(e))
    latent = LatentConfig.load_json(ckpt / LATENT_CONFIG_NAME)[0] if (ckpt / LATENT_CONFIG_NAME).exists() else None
    return kind, _checkpoint_meta(ckpt), latent


def _adapter_base(report: DryRunReport, ckpt: Path, model_name_or_path: str | None) -> str | None:
    """The base an adapter checkpoint loads onto (its recorded one); naming another is an error, as in the run."""
    from llmrec.models.checkpoint import adapter_base, recorded_base

    try:
        return adapter_base(ckpt, model_name_or_path)
    except ValueError as e:
        report.error(str(e))
        return recorded_base(ckpt)[0] or model_name_or_path


def _rows_left_by_sft(report: DryRunReport, ckpt: Path | None, split: str, n: int) -> int | None:
    """Rows of ``split`` (``n``) that ``exclude_sft_rows`` leaves to draw the prompts from, as the trainer counts
    them; None (steps unknown) when the SFT checkpoint is not there yet or its train rows cannot be read (an
    error, as in the run)."""
    from llmrec.config import ConfigError
    from llmrec.training.grpo import sft_train_row_indices
    from llmrec.training.sft import TRAINING_ARGS_JSON

    if ckpt is None or not ckpt.is_dir():
        report.note("exclude_sft_rows: the rows left to draw from are known once the SFT checkpoint exists")
        return None
    try:
        seen = sft_train_row_indices(ckpt, split, n)
    except ConfigError as e:  # no training_args.json, or a GRPO output given as the SFT checkpoint
        report.error(str(e))
        return None
    except ValueError as e:  # a damaged training_args.json (json names no file)
        report.error(f"exclude_sft_rows: {ckpt / TRAINING_ARGS_JSON} cannot be read: {e}")
        return None
    left = n - len(seen)
    report.item("exclude_sft_rows", f"{len(seen):,} of {n:,} {split} rows were the SFT's; the prompts are drawn "
                f"from the other {left:,}")
    if left == 0:
        report.error(f"exclude_sft_rows: the SFT checkpoint trained on every {split} row")
        return None
    return left


def dry_run_grpo(config: Any, plan: AcceleratePlan, recipe: Path | None, report: DryRunReport) -> None:
    """Checks of ``llmrec grpo``: the SFT checkpoint, data, head-only (or + LoRA) counts, groups and steps."""
    from llmrec.models.latent import LATENT_CONFIG_NAME, LatentConfig

    _report_config(report, config, _GRPO_FIELDS)
    report.section("SFT checkpoint")
    ckpt = Path(config.sft_checkpoint) if config.sft_checkpoint else None
    meta: dict[str, Any] = {}
    kind = None
    latent = LatentConfig(num_latent_tokens=1)
    if ckpt is None:
        report.error("sft_checkpoint is required (the output_dir of `llmrec sft` with num_latent_tokens >= 1)")
    elif not ckpt.is_dir():
        fix = _command_for_run(str(ckpt), ("sft",), f"llmrec sft --config <latent SFT recipe> --output_dir {ckpt}")
        report.missing_input(f"SFT checkpoint {ckpt}", fix)
        planned = _planned_sft(str(ckpt))
        if planned is not None:
            sft_cfg, label = planned
            meta = {k: v for k, v in sft_cfg.checkpoint_fields().items() if v is not None}
            latent = sft_cfg.latent_config()
            report.note(f"until it exists, the model below is the one {label} trains")
        else:
            report.note("until it exists, the model below is model_name_or_path with one latent token and the "
                        "default pooling head")
    else:
        kind, meta, found_latent = _read_checkpoint(ckpt, report)
        if found_latent is not None:
            latent = found_latent
            if latent.num_latent_tokens < 1:
                report.error(f"{ckpt} has no latent token: latent GRPO needs a latent SFT checkpoint")
        elif kind is not None:
            report.error(f"{ckpt} has no {LATENT_CONFIG_NAME}: latent GRPO needs a latent SFT checkpoint")
        report.item("checkpoint", f"{ckpt} ({kind or '?'}; finetune {meta.get('finetune', '?')}, "
                    f"{latent.num_latent_tokens} latent token(s))")
        if kind == "adapter" and meta.get("finetune") == "qlora":  # loaded onto a 4-bit base, as it was trained
            _check_qlora(report, config.model_dtype if config.model_dtype != "auto"
                         else meta.get("model_dtype") or "float32")
    dataset = config.dataset or meta.get("dataset")
    # the held-out check reads its split when the run starts (a missing one ended the real run, not the dry run)
    splits = [config.train_split] + ([config.eval_split] if config.eval_rows > 0 else [])
    if dataset:
        rows = check_dataset(report, dataset, splits, recipe)
    else:
        report.section("data")
        rows = None
        if ckpt is not None and ckpt.is_dir():
            report.error("no dataset given and the SFT checkpoint records none")
        else:
            report.item("dataset", "the SFT checkpoint's (not there yet)")
    base = config.model_name_or_path or meta.get("model_name_or_path")
    if kind == "adapter":
        base = _adapter_base(report, ckpt, config.model_name_or_path)
    model_name = str(ckpt) if kind == "full" else base
    lora = None
    # a QLoRA adapter stays unmerged on its 4-bit base (load_sft_checkpoint): its LoRA layers are part of the model
    qlora = kind == "adapter" and meta.get("finetune") == "qlora"
    if config.train_lora:
        if kind == "full" or meta.get("finetune") == "full":
            report.error(f"train_lora: {ckpt} is not a LoRA checkpoint")
        elif meta:
            lora = _lora_from_meta(meta)
        else:
            report.note("train_lora: the adapter's size is known once the SFT checkpoint exists")
    elif qlora:
        lora = _lora_from_meta(meta)
    counts = None
    if model_name:
        counts = _model_section(report, model_name, config.model_dtype, embedding_rows=_recorded_rows(kind, meta),
                                lora=lora, latent=latent, train_lm=False, train_lora=bool(lora) and config.train_lora,
                                train_head=True, quantized_4bit=qlora)
    else:
        report.section("model (meta device: shapes only, no weights loaded)")
        report.error("no base model: set model_name_or_path (or run the SFT stage so its checkpoint records it)")
    if counts is not None:
        _report_counts(report, counts, training=True)
    _report_plan(report, plan)
    report.item("mixed precision", f"{plan.mixed_precision} (from the accelerate plan; weights {config.model_dtype})")
    if plan.sharded:
        report.error(f"latent GRPO runs on one device or with DDP, not with {plan.distributed_type} (the trainer "
                     "refuses it: the trained head is small, shard nothing); use recipes/accelerate/ddp.yaml "
                     "or single_gpu.yaml")
    g, per, ga, world = config.num_generations, config.per_device_train_batch_size, config.gradient_accumulation_steps, \
        plan.num_processes
    global_rows = per * ga * world
    report.item("group size G", g)
    report.item("per-device batch", f"{per} rows = {per // g} prompt(s) x G {g}")
    report.item("gradient accumulation", ga)
    report.item("global batch", f"{global_rows} rows = {per} x {ga} x {world} processes"
                + (f" = {global_rows // g} prompts" if global_rows % g == 0 else ""))
    if global_rows % g:
        report.error(f"the global batch ({global_rows} rows) must be divisible by num_generations ({g})")
        return
    prompts = (rows or {}).get(config.train_split)
    if prompts is not None and config.exclude_sft_rows:
        prompts = _rows_left_by_sft(report, ckpt, config.train_split, prompts)
    total = None
    if prompts is not None:
        used = min(prompts, config.max_train_rows) if config.max_train_rows else prompts
        if global_rows // g > used:
            report.error(f"an optimiser step needs {global_rows // g} prompts, "
                         + (f"exclude_sft_rows leaves {used}" if config.exclude_sft_rows else f"the split has {used}"))
        else:
            steps = grpo_steps_per_epoch(used, per, world, ga, g)
            total = config.max_steps if config.max_steps > 0 else max(1, int(steps * config.num_train_epochs))
            report.item("steps per epoch", f"{steps:,} ({used:,} prompts; the last incomplete batch is dropped)")
            report.item("total steps", f"{total:,}")
    else:
        report.item("steps per epoch", "unknown until the dataset is prepared" if not config.exclude_sft_rows
                    else "unknown until the dataset is prepared and the SFT's train rows are known")
    ni = config.num_iterations
    if ni > 1:  # the scheduler counts optimiser updates, num_iterations per scored batch (a "step")
        updates = config.get_warmup_steps(total * ni) if total else (int(config.warmup_steps)
                                                                     if config.warmup_steps >= 1 else None)
        report.item("warmup", (f"{updates:,} optimiser updates ({ni} per step)" if updates is not None else
                               f"{config.warmup_steps:g} of the run's optimiser updates ({ni} per step)"))
    else:
        report.item("warmup", _warmup(config.warmup_steps, total))
    if config.eval_rows > 0:
        held = (rows or {}).get(config.eval_split)
        report.item("held-out check", f"{min(config.eval_rows, held) if held is not None else config.eval_rows:,} "
                    f"{config.eval_split} rows, before and after training")
    from llmrec.training.finished_runs import finished_grpo_differences, refuse_other_finished_run
    from llmrec.training.grpo import (
        RESULTS_NAME,
        _prompt_dataset_dir,
        last_grpo_checkpoint,
        refuse_changed_grpo_resume,
    )

    def check_finished() -> None:
        refuse_other_finished_run(Path(config.output_dir), "GRPO run",
                                  finished_grpo_differences(config, _prompt_dataset_dir(config)),
                                  "set retrain: true to train it again with these settings, or use another output_dir")

    _report_output(report, config.output_dir, RESULTS_NAME, config.retrain, last_grpo_checkpoint, check_finished,
                   lambda ckpt: refuse_changed_grpo_resume(ckpt, config, plan.num_processes))


def _dataset_directory(dataset: str) -> Path:
    """Where ``dataset`` (a prepared directory or an embedded sample's name) is read from, preparing nothing."""
    from llmrec.data.samples import SAMPLES, sample_cache_dir

    return sample_cache_dir(dataset) if dataset in SAMPLES and not Path(dataset).exists() else Path(dataset)


def _check_seqrec_run(report: DryRunReport, run: Path, dataset: str | None,
                      section: str = "ID model (method seqrec: full ranking by a `llmrec seqrec train` run)",
                      label: str = "ID-model run") -> int | None:
    """Check the ``llmrec seqrec train`` run that ``evaluate --method seqrec`` ranks with, as the evaluator loads it
    (:func:`~llmrec.decoding.guidance.load_guidance_model`): its results.json config, the selected weights' tensor
    names and shapes against the model that config builds (on the meta device: the header is read, no tensor), and
    the catalogue it was trained on. Returns the catalogue size it was trained on (None when unknown)."""
    import dataclasses

    from llmrec.decoding.guidance import check_trained_catalog, guidance_weights_path
    from llmrec.safetensors_io import open_safetensors
    from llmrec.seqrec.config import SeqRecConfig
    from llmrec.seqrec.models import backbone_of, build_model

    report.section(section)
    report.item("checkpoint", str(run))
    results_path = run / "results.json"
    if not results_path.is_file():
        fix = _command_for_run(str(run), ("sasrec", "gru4rec", "rearec", "lares"),
                               f"llmrec seqrec train --config recipes/seqrec/sasrec_games.yaml --dataset_dir "
                               f"{dataset} --output_dir {run}")
        state = "directory not found" if not run.is_dir() else "no results.json: the run has not finished"
        report.missing_input(f"{label} {run} ({state})", fix)
        return None
    try:
        results = _read_json(results_path)
    except (UnicodeDecodeError, ValueError) as e:
        report.error(f"{results_path} is damaged ({e})")
        return None
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
        report.error(f"{results_path} has no 'config' (not a `llmrec seqrec train` run?)")
        return None
    known = {f.name for f in dataclasses.fields(SeqRecConfig)}
    try:
        cfg = SeqRecConfig(**{k: v for k, v in results["config"].items() if k in known})
    except (TypeError, ValueError) as e:
        report.error(f"{results_path}: its config does not load ({e})")
        return None
    weights = guidance_weights_path(run, results)
    try:
        with open_safetensors(weights) as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, ValueError) as e:  # missing, damaged or not a safetensors file (the message names it)
        report.error(f"ID-model weights: {e}")
        return None
    key = "backbone.item_emb.weight"
    if key not in found:
        report.error(f"{weights} has no {key} (not a seqrec model?)")
        return None
    items = found[key][0] - 1
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in build_model(cfg, items).state_dict().items()}
    if found != wanted:  # the evaluator's load_state_dict (strict) would refuse it
        other = sorted(k for k in found.keys() & wanted.keys() if found[k] != wanted[k])
        report.error(f"{weights} does not fit the {cfg.model} its results.json describes (missing "
                     f"{sorted(wanted.keys() - found.keys())[:3]}, unexpected {sorted(found.keys() - wanted.keys())[:3]}"
                     f", other shapes {other[:3]})")
    encoder = (f"{cfg.n_layers} GRU layer(s)" if backbone_of(cfg) == "gru" else
               f"{cfg.n_layers} Transformer layer(s), {cfg.n_heads} head(s)")
    report.item("model", f"{cfg.model} (ID model): hidden {cfg.hidden_size}, {encoder}; reads the last "
                f"{cfg.max_history} items of each history")
    report.item("weights", f"{weights.relative_to(run)} ({_fmt_count(sum(math.prod(s) for s in found.values()))} "
                f"parameters, trained on {items:,} items)")
    if dataset:
        directory = _dataset_directory(dataset)
        catalog = directory / "catalog.jsonl"
        if catalog.exists():
            n = _count_lines(catalog)
            trained_on = (results.get("protocol") or {}).get("dataset_dir", cfg.dataset_dir)
            try:
                if n != items:
                    raise ValueError(f"checkpoint {run}: the ID model was trained on {items:,} items, {directory} "
                                     f"has {n:,}")
                check_trained_catalog(trained_on, directory, f"checkpoint {run}",
                                      (results.get("data_sha256") or {}).get("catalog.jsonl"))
            except ValueError as e:
                report.error(str(e))
    return items


def dry_run_evaluate(config: Any, plan: AcceleratePlan, recipe: Path | None, report: DryRunReport) -> None:
    """Checks of ``llmrec evaluate``: data, checkpoint, guidance run, model on meta, row sharding."""

    _report_config(report, config, _EVAL_FIELDS)
    wanted = sorted({config.split, "train"}) if config.method == "popularity" else [config.split]
    rows = check_dataset(report, config.dataset, wanted, recipe)
    if config.method == "beam":
        check_prompt(report, config.prompt)
    latent, kind, meta = None, None, {}
    if config.method == "beam" and config.checkpoint:
        report.section("checkpoint")
        ckpt = Path(config.checkpoint)
        if not ckpt.is_dir():
            fix = _command_for_run(str(ckpt), ("sft", "grpo"), f"llmrec sft|grpo --config <recipe> --output_dir {ckpt}")
            report.missing_input(f"checkpoint {ckpt}", fix)
            planned = _planned_sft(str(ckpt))
            if planned is not None and planned[0].num_latent_tokens >= 1:
                latent = planned[0].latent_config()
                report.note(f"until it exists, the model below has the latent head {planned[1]} trains")
            elif planned is None:
                report.note("until it exists, the model below is the base model alone (no latent head)")
        else:
            kind, meta, latent = _read_checkpoint(ckpt, report)
            report.item("checkpoint", f"{ckpt} ({kind or '?'}, "
                        f"{latent.num_latent_tokens if latent else 0} latent token(s))")
            if kind == "adapter" and meta.get("finetune") == "qlora":  # loaded onto a 4-bit base, as it was trained
                _check_qlora(report, config.dtype if config.dtype != "auto" else meta.get("model_dtype") or "float32")
            if meta.get("dataset") and Path(str(meta["dataset"])) != Path(config.dataset):
                report.note(f"the checkpoint was trained on {meta['dataset']}, evaluated on {config.dataset}")
    seqrec_items = None
    if config.method == "seqrec":
        seqrec_items = _check_seqrec_run(report, Path(config.checkpoint), config.dataset)
    if config.method == "beam" and config.guidance_checkpoint:
        g = Path(config.guidance_checkpoint)
        if config.guided:
            # the checks the evaluator's load makes (config, weights, the catalogue it was trained on): an ID model
            # of another catalogue was READY here and refused by the run
            _check_seqrec_run(report, g, config.dataset,
                              section=f"D3 guidance (weight {config.guidance_weight:g}: the ID model's run)",
                              label="guidance run")
        else:
            report.section("D3 guidance")
            report.item("guidance", f"{g} (weight 0: off, the run does not read it)")
    if config.method == "beam":
        name = str(config.checkpoint) if kind == "full" else config.model_name_or_path
        if kind == "adapter":
            name = _adapter_base(report, Path(config.checkpoint), config.model_name_or_path)
        qlora = kind == "adapter" and meta.get("finetune") == "qlora"  # unmerged on its 4-bit base, as trained
        counts = _model_section(report, name, config.dtype, embedding_rows=_recorded_rows(kind, meta), latent=latent,
                                train_head=False, lora=_lora_from_meta(meta) if qlora else None, quantized_4bit=qlora)
        if counts is not None:
            _report_counts(report, counts, training=False)
    _report_plan(report, plan)
    n = (rows or {}).get(config.split)
    world = plan.num_processes
    if config.method == "beam":
        report.item("precision", f"weights {config.dtype} (evaluate does not autocast)")
        report.item("batch per process", f"{config.batch_size} rows x {config.num_beams} beams")
    elif config.method == "seqrec":
        report.item("model", "the ID model above: every catalogue item scored per row (full ranking)"
                    + (f", {seqrec_items:,} items" if seqrec_items is not None else ""))
    else:
        report.item("model", "none: the popularity ranking of the training targets")
    if n is not None:
        used = min(n, config.max_rows) if config.max_rows > 0 else n
        if config.method == "seqrec":  # the evaluator stripes rows over the processes, 256 per forward
            report.item("rows", f"{used:,} of {n:,} {config.split} rows; row r goes to process r mod {world} "
                        f"(~{math.ceil(used / world):,} per process, scored 256 at a time)")
        else:
            batches = math.ceil(used / config.batch_size)
            report.item("rows", f"{used:,} of {n:,} {config.split} rows in {batches:,} batches; batch b goes to "
                        f"process b mod {world} (~{math.ceil(batches / world):,} per process)")
    else:
        report.item("rows", "unknown until the dataset is prepared")
    report.section("output")
    out = Path(config.output_dir)
    report.item("output_dir", str(out))
    if (out / "results.json").exists():
        _check_finished_evaluation(config, out, report)


def _check_finished_evaluation(config: Any, out: Path, report: DryRunReport) -> None:
    """What the real run does with the ``results.json`` in ``out``: nothing for the same protocol; another protocol
    or a seqrec training run there is refused (the settings compared as the pipeline compares finished
    evaluations, and the digests of the weights it evaluated against those the config points to now, as the real run
    compares them)."""
    from llmrec.bench_pipeline import _evaluated_weights, eval_protocol_differences
    from llmrec.evaluation.evaluator import _same_dataset

    results = out / "results.json"
    try:
        prev = json.loads(results.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        report.error(f"{results} cannot be read ({e}): remove it to evaluate again")
        return
    if not isinstance(prev, dict):
        report.error(f"{results} is not a results file (a JSON {type(prev).__name__}): remove it to evaluate again")
    elif (out / "run_config.json").exists() and "phases" in prev:
        report.error(f"{out} holds an `llmrec seqrec train` run, not an evaluation; choose another output_dir")
    else:
        proto = prev.get("protocol") or {}
        diff = eval_protocol_differences(proto, config)
        if "dataset" in diff and _same_dataset(str(diff["dataset"][0]), str(diff["dataset"][1])):
            del diff["dataset"]  # another spelling of the same directory (the real run accepts it too)
        # The real run's fingerprint also records the checkpoints' paths as given (the pipeline, which compares
        # against archives, leaves them out): another spelling or a moved copy is another protocol there.
        asked = {"checkpoint": config.checkpoint}
        if getattr(config, "guided", False):
            asked["guidance checkpoint"] = config.guidance_checkpoint
        recorded = {"checkpoint": proto.get("checkpoint"),
                    "guidance checkpoint": (proto.get("guidance") or {}).get("checkpoint")}
        if proto.get("method") != "popularity":  # records no checkpoint
            diff.update({k: (recorded[k], v) for k, v in asked.items() if recorded[k] != v})
        # Weights retrained in place since (same paths, other digests): the real run's fingerprint differs too.
        # Digests only when the settings agree (a full fine-tune's weights are gigabytes to hash).
        changed = [] if diff else [what for what, (then, now) in _evaluated_weights(proto, config).items()
                                   if now is not None and then != now]
        if diff:
            changes = ", ".join(f"{k}={found!r} (here {asked!r})" for k, (found, asked) in diff.items())
            report.error(f"{out} holds results of a different protocol ({changes}): the real run refuses it; choose "
                         f"another output_dir, or remove {out} to evaluate again")
        elif changed:
            report.error(f"{out} holds results of other weights: the {' and '.join(changed)} weights changed since "
                         f"(another SHA-256); the real run refuses it: choose another output_dir, or remove {out} to "
                         "evaluate again")
        else:
            report.note(f"{out} holds results.json of this protocol: the real run does nothing (remove it to "
                        "evaluate again)")


# ------------------------------------------------------------------------------------------------- entry


def add_dry_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--dry-run``, ``--accelerate-config`` and ``--num-processes`` on a stage's parser."""
    parser.add_argument("--dry-run", action="store_true",
                        help="check the recipe without training or loading weights: resolved config, data, model "
                        "parameters on the meta device, accelerate plan; writes nothing. Exit 0 ready, 3 an input "
                        "is missing (printed with the command that makes it), 1 invalid")
    parser.add_argument("--accelerate-config", default=None, metavar="FILE",
                        help="dry run: plan for this accelerate config (e.g. recipes/accelerate/ddp.yaml); default: "
                        "the running accelerate launch, else the recipe's own launch command")
    parser.add_argument("--num-processes", type=int_at_least(1), default=None, metavar="N",
                        help="dry run: plan for N processes (as accelerate launch --num_processes N)")


_STAGES = {
    "sft": ("llmrec.training.sft", "LatentSFTConfig", dry_run_sft),
    "grpo": ("llmrec.training.grpo", "LatentGRPOConfig", dry_run_grpo),
    "evaluate": ("llmrec.evaluation.evaluator", "EvalConfig", dry_run_evaluate),
}


def maybe_dry_run(stage: str, args: argparse.Namespace, extra: dict[str, Any] | None = None) -> int | None:
    """The dry run's exit code when ``--dry-run`` was given, else None (the command runs for real).

    The dry-run-only flags without ``--dry-run`` are an error rather than silently ignored: a real run's
    processes come from ``accelerate launch``, not from ``--num-processes``.
    """
    if getattr(args, "dry_run", False):
        return run_dry_run(stage, args, extra)
    given = [flag for flag, dest in (("--accelerate-config", "accelerate_config"), ("--num-processes", "num_processes"))
             if getattr(args, dest, None) is not None]
    if given:
        from llmrec.config import ConfigError

        raise ConfigError(f"{' and '.join(given)} only apply with --dry-run; a real run takes its processes from "
                          f"`accelerate launch --config_file <file> [--num_processes N] -m llmrec.cli {stage} ...`")
    return None


def run_dry_run(stage: str, args: argparse.Namespace, extra: dict[str, Any] | None = None) -> int:
    """Resolve ``args.config`` + overrides for ``stage`` (sft, grpo, evaluate), check everything, print the report.

    Returns the exit code (see the module docstring). A config error is raised (``ConfigError``), as
    without ``--dry-run``. Under ``accelerate launch`` only the main process prints.
    """
    import importlib

    from llmrec.config import parse_config

    module, cls_name, check = _STAGES[stage]
    cls = getattr(importlib.import_module(module), cls_name)
    (config,) = parse_config([cls], args.config, getattr(args, "overrides", None), extra=extra)
    recipe = _recipe_path(args.config)
    plan = resolve_accelerate_plan(getattr(args, "accelerate_config", None), getattr(args, "num_processes", None),
                                   recipe)
    label = _recipe_label(recipe) if recipe else "defaults (no --config)"
    report = DryRunReport(f"llmrec {stage} --dry-run: {label} (nothing is trained, loaded or written)")
    check(config, plan, recipe, report)
    if int(os.environ.get("RANK", "0")) == 0:
        print(report.render(), end="")
    return report.exit_code
