"""Latent reasoning wrapper: the efficient cache-reusing form must equal the paper's naive N+1-pass form.

Tiny random Qwen2 / Llama models in float32 (no downloads). LoRA adapters are initialised with random
A *and* B (``init_lora_weights=False``) so that every LoRA tensor gets a non-zero gradient to compare.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from llmrec.models.kv_cache_naming import cache_kwargs, returned_cache
from llmrec.models.latent import (
    IGNORE_INDEX,
    LATENT_CONFIG_NAME,
    LATENT_HEAD_NAME,
    LatentConfig,
    LatentPoolingHead,
    LatentReasoningLM,
    add_latent_tokens,
    build_naive_inputs,
    completion_cross_entropy,
    input_embedding_rms,
    padding_position_ids,
)
from llmrec.models.tiny import build_tiny, build_tiny_model, build_tiny_tokenizer

KINDS = ["tiny-qwen2", "tiny-llama"]
PROMPTS = [
    'The user has palyed the following video gamess before: "Halo", "Minecraft", "Tetris"\n### Response: \n',
    "Zelda\n### Response: \n",
    'Given a list of video games: "Super Mario Bros.", "Donkey Kong"\n### Response: \n',
]
COMPLETIONS = ['"Halo"\n', '"Super Mario Bros. Deluxe Edition"\n', '"Kirby"\n']


def _batch(tok, prompts=PROMPTS, completions=COMPLETIONS):
    """Left-padded prompts, right-padded completions (+EOS), as the efficient form takes them."""
    tok.padding_side = "left"
    p = tok(prompts, return_tensors="pt", padding=True)
    eos = tok.eos_token
    tok.padding_side = "right"
    c = tok([x + eos for x in completions], return_tensors="pt", padding=True, add_special_tokens=False)
    assert p.attention_mask[:, 0].min() == 0, "the batch must have prompts of different lengths"
    return p.input_ids, p.attention_mask, c.input_ids, c.attention_mask


def _wrapper(kind: str, n: int, *, lora: bool = False, seed: int = 0, head_output_norm: bool = False):
    model, tok = build_tiny(kind)
    cfg = LatentConfig(num_latent_tokens=n, head_output_norm=head_output_norm)
    add_latent_tokens(tok, model, cfg)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
    torch.manual_seed(seed + 1)
    return LatentReasoningLM(model, cfg), tok


def _grads(w: LatentReasoningLM) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in w.named_parameters() if p.requires_grad and p.grad is not None}
    w.zero_grad(set_to_none=True)
    return out


def _max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        scale = b[k].abs().max().item()
        assert scale > 0, f"zero gradient for {k}: the comparison would be vacuous"
        worst = max(worst, (a[k] - b[k]).abs().max().item() / scale)
    return worst


# ------------------------------------------------------------------------------------------- config


def test_config_defaults_and_validation():
    assert LatentConfig().latent_tokens == ["<|Thought|>"]
    assert LatentConfig(num_latent_tokens=3).latent_tokens == ["<|Thought_1|>", "<|Thought_2|>", "<|Thought_3|>"]
    assert LatentConfig(num_latent_tokens=0).latent_tokens == []
    with pytest.raises(ValueError):
        LatentConfig(num_latent_tokens=2, latent_tokens=["<|a|>"])
    with pytest.raises(ValueError):
        LatentConfig(head_dim=7)
    with pytest.raises(ValueError):
        LatentConfig(head_dtype="float33")
    # head_dtype by the resolver of model_dtype: "bf16" was refused though model_dtype takes it; int8 failed with a
    # traceback at the first parameter; float64 passed here but not the dry run (review)
    assert LatentConfig(head_dtype="bf16").head_dtype == "bfloat16"
    for bad in ("int8", "float64", "auto"):
        with pytest.raises(ValueError, match="head_dtype"):
            LatentConfig(head_dtype=bad)
    from llmrec.models.backbone import checked_dtype_name

    assert checked_dtype_name("AUTO", "dtype") == checked_dtype_name("torch.auto", "dtype") == "auto"
    for f in LatentConfig.__dataclass_fields__.values():
        assert f.metadata.get("help"), f"field {f.name} has no help string"


def test_config_json_round_trip(tmp_path):
    cfg = LatentConfig(num_latent_tokens=2, latent_token_ids=[600, 601], head_num_heads=2, head_dim=16)
    cfg.save_json(tmp_path / "c.json", hidden_size=64)
    back, meta = LatentConfig.load_json(tmp_path / "c.json")
    assert back == cfg and meta == {"hidden_size": 64}


# ------------------------------------------------------------------------------------------- tokens


def test_add_latent_tokens_grows_embeddings_and_stores_ids():
    model, tok = build_tiny("tiny-qwen2")
    n_before = len(tok)
    cfg = LatentConfig(num_latent_tokens=2)
    ids = add_latent_tokens(tok, model, cfg)
    assert ids == [n_before, n_before + 1] == cfg.latent_token_ids
    assert model.get_input_embeddings().weight.shape[0] == n_before + 2
    for t, i in zip(cfg.latent_tokens, ids):
        assert tok.encode(f"a{t}b", add_special_tokens=False).count(i) == 1


def test_add_latent_tokens_never_shrinks_a_padded_matrix():
    tok = build_tiny_tokenizer("tiny-qwen2")
    model = build_tiny_model("tiny-qwen2", vocab_size=len(tok) + 40)  # like Qwen's padded 151,936 rows
    ids = add_latent_tokens(tok, model, LatentConfig())
    assert ids == [len(tok) - 1]
    assert model.get_input_embeddings().weight.shape[0] == len(tok) + 39  # untouched, not shrunk
    # The id is explicit, not "the last embedding row": the naive form still finds the latent.
    w = LatentReasoningLM(model, LatentConfig(latent_token_ids=ids))
    p, pm, c, cm = _batch(tok)
    x, am, lab = build_naive_inputs(p, pm, c, cm, ids, tok.pad_token_id)
    torch.testing.assert_close(w.forward_naive(x, am).labels, lab[:, 1:])


def test_tokenizer_that_already_has_the_latent_token(caplog):
    model, tok = build_tiny("tiny-qwen2")
    first = add_latent_tokens(tok, model, LatentConfig())
    size, rows = len(tok), model.get_input_embeddings().weight.shape[0]
    cfg = LatentConfig()
    with caplog.at_level(logging.INFO, logger="llmrec.models.latent"):
        again = add_latent_tokens(tok, model, cfg)
    assert again == first == cfg.latent_token_ids
    assert len(tok) == size and model.get_input_embeddings().weight.shape[0] == rows
    assert "already has latent token" in caplog.text


def test_plain_vocab_entry_is_reused_or_rejected():
    tok = build_tiny_tokenizer("tiny-qwen2")
    vocab = tok.get_vocab()
    word = next(t for t in vocab if len(t) > 3 and t.isascii() and t.isalpha())
    # A plain vocabulary entry that encodes to its own single id is reused.
    assert add_latent_tokens(tok, None, LatentConfig(latent_tokens=[word])) == [vocab[word]]
    # A vocabulary entry that does not encode back to one id (byte-level form) cannot be a latent token.
    spaced = next(t for t in vocab if t.startswith("\u0120") and len(t) > 3)
    with pytest.raises(ValueError, match="exactly one id"):
        add_latent_tokens(tok, None, LatentConfig(latent_tokens=[spaced]))


# -------------------------------------------------------------------------------------- pooling head


def test_pooling_head_is_invariant_to_padding_side():
    torch.manual_seed(0)
    head = LatentPoolingHead(32, num_heads=2, head_dim=8)
    lengths = [5, 9, 7]
    width = 11
    rows = [torch.randn(n, 32) for n in lengths]
    left = torch.full((3, width, 32), float("nan"))  # padding content must never leak
    right = torch.full((3, width, 32), float("nan"))
    lmask = torch.zeros(3, width, dtype=torch.long)
    rmask = torch.zeros(3, width, dtype=torch.long)
    for b, r in enumerate(rows):
        left[b, width - len(r) :], lmask[b, width - len(r) :] = r, 1
        right[b, : len(r)], rmask[b, : len(r)] = r, 1
    out_left = head(left, lmask, width - 1)
    out_right = head(right, rmask, torch.tensor(lengths) - 1)
    assert torch.isfinite(out_left).all()
    torch.testing.assert_close(out_left, out_right, rtol=0, atol=1e-6)
    # Each row alone, unpadded, gives the same vector.
    for b, r in enumerate(rows):
        alone = head(r[None], torch.ones(1, len(r), dtype=torch.long), len(r) - 1)
        torch.testing.assert_close(alone[0], out_left[b], rtol=0, atol=1e-6)


def test_pooling_head_init_and_dtype():
    head = LatentPoolingHead.from_config(64, LatentConfig())
    assert head.q_proj.weight.shape == (64, 64) and head.v_proj.weight.shape == (64, 64)
    assert all(torch.equal(lin.bias, torch.zeros(64)) for lin in (head.q_proj, head.k_proj, head.v_proj))
    assert abs(head.q_proj.weight.std().item() - 0.02) < 0.005
    h = torch.randn(2, 4, 64, dtype=torch.bfloat16)
    assert head(h, torch.ones(2, 4), 3).dtype == torch.float32  # fp32 whatever the LM dtype


def test_pooling_head_keeps_its_dtype_inside_autocast():
    """The Trainer's bf16: true runs the forward under autocast, which computed the fp32 head's matmuls in bf16
    (outputs off by ~1% of their scale): training pooled otherwise than inference."""
    torch.manual_seed(0)
    head = LatentPoolingHead.from_config(64, LatentConfig(head_output_norm=True))
    h, mask = torch.randn(2, 5, 64, dtype=torch.bfloat16), torch.ones(2, 5)
    plain = head(h, mask, 4)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = head(h, mask, 4)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)


def test_input_embedding_rms_is_the_median_row_rms():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 1.0], [6.0, 8.0], [0.0, 2.0]])
    # row RMS: 3.5355, 0, 1, 7.0711, 1.4142 -> median 1.4142
    assert input_embedding_rms(w) == pytest.approx(2**0.5)


def test_input_embedding_rms_in_chunks_equals_the_whole_matrix_at_once():
    torch.manual_seed(0)
    w = (torch.randn(20000, 16) * torch.rand(20000, 1) * 3).to(torch.bfloat16)  # three chunks, the last partial
    plain = float(w.float().pow(2).mean(-1).sqrt().median())
    assert input_embedding_rms(w) == plain


def test_head_output_norm_puts_latents_at_the_input_embeddings_scale():
    torch.manual_seed(0)
    plain = LatentPoolingHead(32, num_heads=2, head_dim=8)
    normed = LatentPoolingHead(32, num_heads=2, head_dim=8, output_norm=True)
    normed.load_state_dict({**plain.state_dict(), "output_norm_weight": torch.ones(32)})
    normed.scale_output_to(0.25)
    h, mask = torch.randn(3, 6, 32) * 50, torch.ones(3, 6, dtype=torch.long)
    ref = plain(h, mask, 5)
    expected = ref / ref.pow(2).mean(-1, keepdim=True).sqrt() * 0.25  # the obviously right form
    torch.testing.assert_close(normed(h, mask, 5), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="output_norm=True"):
        plain.scale_output_to(1.0)
    with pytest.raises(ValueError, match="positive finite"):
        normed.scale_output_to(0.0)

    # In the wrapper, every latent starts at the RMS of the LM's token embeddings, whatever the hidden states'.
    w, tok = _wrapper("tiny-qwen2", 2, head_output_norm=True)
    target = input_embedding_rms(w.embed_tokens.weight)
    p, pm, c, cm = _batch(tok)
    rms = w(p, pm, c, cm).latents.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, target), rtol=1e-3, atol=0)  # eps 1e-6 aside
    off, _ = _wrapper("tiny-qwen2", 2)
    assert off.latent_head.output_norm_weight is None
    assert "output_norm_weight" not in off.latent_head.state_dict()  # the paper's head saves what it always did


def test_padding_position_ids():
    m = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert padding_position_ids(m).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0]]


# ------------------------------------------------------------------------------ efficient == naive


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("naive_side", ["right", "left"])
@pytest.mark.parametrize("head_output_norm", [False, True])
def test_efficient_forward_equals_naive_logits_and_grads(kind, n, naive_side, head_output_norm):
    if head_output_norm and naive_side == "left":
        pytest.skip("one padding side is enough for the output norm")
    w, tok = _wrapper(kind, n, lora=True, head_output_norm=head_output_norm)
    w.train()
    p, pm, c, cm = _batch(tok)

    eff = w.loss(p, pm, c, cm)
    eff.loss.backward()
    g_eff = _grads(w)

    x, am, lab = build_naive_inputs(p, pm, c, cm, w.config.latent_token_ids, tok.pad_token_id, naive_side)
    nai = w.loss(input_ids=x, attention_mask=am, labels=lab)
    nai.loss.backward()
    g_nai = _grads(w)

    assert torch.equal(eff.labels[eff.labels != IGNORE_INDEX], nai.labels[nai.labels != IGNORE_INDEX])
    # the naive loss builds the scored positions' logits only; laid out in full they are the same, as is the loss
    a, b = eff.logits[eff.labels != IGNORE_INDEX], nai.scored_logits
    with torch.no_grad():
        full = w.forward_naive(x, am, lab)
    assert nai.logits is None and torch.equal(full.logits[full.labels != IGNORE_INDEX], full.scored_logits)
    torch.testing.assert_close(completion_cross_entropy(full.logits, full.labels), nai.loss, rtol=0, atol=1e-6)
    assert a.shape[0] == int(cm.sum())
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    torch.testing.assert_close(eff.loss, nai.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(w(p, pm, c, cm, return_loss=True).loss, eff.loss, rtol=0, atol=0)
    torch.testing.assert_close(eff.latents, nai.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(eff.latent_hidden_states, nai.latent_hidden_states, rtol=0, atol=1e-4)

    assert any("lora_A" in k for k in g_eff) and any("lora_B" in k for k in g_eff)
    assert any(k.startswith("latent_head.") for k in g_eff)
    assert _max_rel_diff(g_eff, g_nai) < 1e-4


def test_latent_actually_changes_the_answer():
    # Guards the equality tests against a latent too small to matter.
    w, tok = _wrapper("tiny-qwen2", 1)
    p, pm, c, cm = _batch(tok)
    out = w(p, pm, c, cm)
    noise = torch.randn_like(out.latents) * out.latents.norm(dim=-1, keepdim=True)
    noisy = w(p, pm, c, cm, latent_noise=noise)
    assert (out.logits - noisy.logits).abs().max() > 1e-2


@pytest.mark.parametrize("n", [1, 2])
def test_latent_noise_same_in_both_forms(n):
    w, tok = _wrapper("tiny-llama", n)
    p, pm, c, cm = _batch(tok)
    noise = torch.randn(p.shape[0], n, w.lm_config.hidden_size)
    eff = w(p, pm, c, cm, latent_noise=noise)
    x, am, _ = build_naive_inputs(p, pm, c, cm, w.config.latent_token_ids, tok.pad_token_id)
    nai = w.forward_naive(x, am, latent_noise=noise)
    torch.testing.assert_close(eff.logits[eff.labels >= 0], nai.logits[nai.labels >= 0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("n", [1, 2])
def test_gradient_checkpointing_falls_back_to_exact_cacheless_form(n):
    w, tok = _wrapper("tiny-qwen2", n)
    p, pm, c, cm = _batch(tok)
    ref = w.loss(p, pm, c, cm)
    w.causal_lm.activation_checkpointing_enable()
    w.train()
    assert not w._cache_usable()
    out = w.loss(p, pm, c, cm)
    out.loss.backward()
    g_gc = _grads(w)
    w.causal_lm.activation_checkpointing_disable()
    w.loss(p, pm, c, cm).loss.backward()
    g_ref = _grads(w)
    keep = ref.labels != IGNORE_INDEX
    torch.testing.assert_close(out.logits[keep], ref.logits[keep], rtol=0, atol=1e-4)
    assert _max_rel_diff(g_gc, g_ref) < 1e-4


def test_shared_prefix_group_equals_repeated_prompts():
    # GRPO pattern (N=1): prompt + latent pooled once per prompt, expanded to a group of G noised members.
    import dataclasses

    w, tok = _wrapper("tiny-qwen2", 1)
    p, pm, c, cm = _batch(tok)
    g = 3
    noise = torch.randn(p.shape[0] * g, 1, w.lm_config.hidden_size)
    noise[::g] = 0  # member 0 of each group is the noise-free latent
    prefix = w.encode_prefix(p, pm).repeat_interleave(g)
    prefix = dataclasses.replace(prefix, latents=prefix.latents + noise)
    shared = w.decode_completion(prefix, c.repeat_interleave(g, 0), cm.repeat_interleave(g, 0))
    ref = w(p.repeat_interleave(g, 0), pm.repeat_interleave(g, 0), c.repeat_interleave(g, 0),
            cm.repeat_interleave(g, 0), latent_noise=noise)
    torch.testing.assert_close(shared.logits, ref.logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- N = 0 baseline


@pytest.mark.parametrize("kind", KINDS)
def test_zero_latents_is_the_plain_lm(kind):
    w, tok = _wrapper(kind, 0)
    assert w.latent_head is None and w.config.latent_token_ids == []
    p, pm, c, cm = _batch(tok)
    out = w.loss(p, pm, c, cm)

    ids, mask = torch.cat([p, c], 1), torch.cat([pm, cm], 1)
    labels = torch.cat([torch.full_like(p, IGNORE_INDEX), c.masked_fill(cm == 0, IGNORE_INDEX)], 1)
    plain = w.model(input_ids=ids, attention_mask=mask, position_ids=padding_position_ids(mask), labels=labels)
    pl = plain.logits[:, p.shape[1] - 1 : -1]
    torch.testing.assert_close(out.logits, pl, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=1e-6)

    # Naive form with N=0 (labels required) is the same plain LM.
    x, am, lab = build_naive_inputs(p, pm, c, cm, [], tok.pad_token_id)
    nai = w.loss(input_ids=x, attention_mask=am, labels=lab)
    torch.testing.assert_close(nai.loss, out.loss, rtol=0, atol=1e-6)

    # The cached prefix path with N=0 gives the same logits as the one-pass path.
    # (Logits where the label is -100 -- padding queries -- are unspecified.)
    cached = w.decode_completion(w.encode_prefix(p, pm), c, cm)
    keep = out.labels != IGNORE_INDEX
    torch.testing.assert_close(cached.logits[keep], out.logits[keep], rtol=0, atol=1e-5)

    # Generation prefill = the plain LM's last prompt logits.
    _, last, m2, nxt = w.prefill_with_latents(p, pm)
    torch.testing.assert_close(last, pl[:, 0], rtol=0, atol=1e-6)
    assert torch.equal(nxt, pm.sum(1)) and torch.equal(m2, pm)


# ------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2])
def test_prefill_with_latents_continues_like_forward(kind, n):
    w, tok = _wrapper(kind, n)
    p, pm, c, cm = _batch(tok)
    ref = w(p, pm, c, cm)
    cache, last, mask, nxt = w.prefill_with_latents(p, pm)
    assert mask.shape == (p.shape[0], p.shape[1] + n) and torch.equal(nxt, pm.sum(1) + n)
    torch.testing.assert_close(last, ref.logits[:, 0], rtol=0, atol=1e-5)
    # Two greedy-style steps with the teacher tokens reproduce the training logits.
    for j in range(2):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        with torch.no_grad():
            step = w.model(input_ids=c[:, j : j + 1], attention_mask=mask, position_ids=nxt[:, None],
                           use_cache=True, **cache_kwargs(cache))
        cache, nxt = returned_cache(step), nxt + 1
        torch.testing.assert_close(step.logits[:, -1], ref.logits[:, j + 1], rtol=0, atol=1e-5)
    # GRPO's members: noise of one row per prompt x repeat; one row's noise is not broadcast to every row
    h = w.lm_config.hidden_size
    with pytest.raises(ValueError, match="latent_noise must have shape"):
        w.prefill_with_latents(p, pm, latent_noise=torch.zeros(1, h), repeats=2)
    _, noised, _, _ = w.prefill_with_latents(p, pm, latent_noise=torch.zeros(p.shape[0] * 2, h), repeats=2)
    torch.testing.assert_close(noised, last.repeat_interleave(2, 0), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path):
    w, tok = _wrapper("tiny-llama", 2)
    with torch.no_grad():
        for prm in w.latent_head.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)  # not the init values
    w.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / LATENT_CONFIG_NAME).read_text())
    assert saved["config"]["latent_token_ids"] == w.config.latent_token_ids
    assert saved["hidden_size"] == 64 and (tmp_path / LATENT_HEAD_NAME).exists()

    base, _ = build_tiny("tiny-llama")
    base.resize_token_embeddings(w.embed_tokens.weight.shape[0])
    base.load_state_dict(w.model.state_dict())
    back = LatentReasoningLM.from_pretrained(tmp_path, base, tokenizer=tok)
    assert back.config == w.config
    p, pm, c, cm = _batch(tok)
    torch.testing.assert_close(back(p, pm, c, cm).logits, w(p, pm, c, cm).logits, rtol=0, atol=0)

    other_tok = build_tiny_tokenizer("tiny-llama")
    other_tok.add_special_tokens({"extra_special_tokens": ["<|x|>"]}, replace_extra_special_tokens=False)
    add_latent_tokens(other_tok, None, LatentConfig(num_latent_tokens=2))
    with pytest.raises(ValueError, match="tokenizer maps latent tokens"):
        LatentReasoningLM.from_pretrained(tmp_path, base, tokenizer=other_tok)


def test_save_load_round_trip_with_output_norm(tmp_path):
    w, tok = _wrapper("tiny-qwen2", 1, head_output_norm=True)
    with torch.no_grad():
        w.latent_head.output_norm_weight.mul_(torch.rand(w.lm_config.hidden_size) + 0.5)  # trained, not the init
    w.save_pretrained(tmp_path)
    base, _ = build_tiny("tiny-qwen2")
    base.resize_token_embeddings(w.embed_tokens.weight.shape[0])
    base.load_state_dict(w.model.state_dict())
    back = LatentReasoningLM.from_pretrained(tmp_path, base, tokenizer=tok)
    assert back.config.head_output_norm
    torch.testing.assert_close(back.latent_head.output_norm_weight, w.latent_head.output_norm_weight, rtol=0, atol=0)
    p, pm, c, cm = _batch(tok)
    torch.testing.assert_close(back(p, pm, c, cm).logits, w(p, pm, c, cm).logits, rtol=0, atol=0)


def test_config_written_before_the_output_norm_loads_as_the_papers_head(tmp_path):
    w, tok = _wrapper("tiny-qwen2", 1)
    w.save_pretrained(tmp_path)
    payload = json.loads((tmp_path / LATENT_CONFIG_NAME).read_text())
    del payload["config"]["head_output_norm"]
    (tmp_path / LATENT_CONFIG_NAME).write_text(json.dumps(payload))
    back = LatentReasoningLM.from_pretrained(tmp_path, w.model, tokenizer=tok)
    assert not back.config.head_output_norm and back.latent_head.output_norm_weight is None


def test_save_load_zero_latents(tmp_path):
    w, _ = _wrapper("tiny-qwen2", 0)
    w.save_pretrained(tmp_path)
    assert not (tmp_path / LATENT_HEAD_NAME).exists()
    back = LatentReasoningLM.from_pretrained(tmp_path, w.model)
    assert back.latent_head is None and back.num_latent_tokens == 0


# --------------------------------------------------------------------------------------------- errors


def test_input_validation():
    w, tok = _wrapper("tiny-qwen2", 1)
    p, pm, c, cm = _batch(tok)
    with pytest.raises(ValueError, match="left-padded"):
        w(p.flip(1), pm.flip(1), c, cm)
    with pytest.raises(ValueError, match="right-padded"):
        w(p, pm, c.flip(1), cm.flip(1))
    with pytest.raises(ValueError, match="exactly once"):
        w.forward_naive(torch.cat([p, c], 1), torch.cat([pm, cm], 1))
    model, _ = build_tiny("tiny-qwen2")
    with pytest.raises(ValueError, match="add_latent_tokens"):
        LatentReasoningLM(model, LatentConfig())


def test_completion_cross_entropy_ignores_masked():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, IGNORE_INDEX, 2], [IGNORE_INDEX, IGNORE_INDEX, 4]])
    ref = torch.nn.functional.cross_entropy(logits[labels >= 0], labels[labels >= 0])
    torch.testing.assert_close(completion_cross_entropy(logits, labels), ref)
    torch.testing.assert_close(completion_cross_entropy(logits, labels, "sum"), ref * 3)
