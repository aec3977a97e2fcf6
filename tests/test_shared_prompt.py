"""Beams sharing their prompt's KV cache (llmrec.decoding.shared_prompt) against the plain per-beam cache.

* The attention function against softmax attention over each beam's own concatenated ``[prompt ; generated]``
  keys and values, written out in float64 (grouped-query heads, left padding, rows with different beam counts).
* The constrained beam search with the shared prompt against the same search with one cache row per beam (the
  form every other decoding test pins to transformers' ``generate``): identical ranked lists and scores within 1e-9
  relative (float64 models; the search sums float32 log-probs), for Qwen2, Llama, Qwen3 and Mistral, both length
  penalties, both early-stopping rules, latent prompts and a LoRA-wrapped model; a sliding window keeps the per-beam
  cache.
* Other threads' forwards during a search (eager and SDPA models), including one whose layers straddle a switch.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_latent import KINDS, _wrapper

from llmrec.decoding import shared_prompt as sp
from llmrec.decoding.beam_search import PromptState, constrained_beam_search_from_state, prefill_prompts
from llmrec.decoding.trie import TitleTrie
from llmrec.models.tiny import build_tiny_model, build_tiny_tokenizer

PREFIX = "### Response: \n"
PROMPTS = [
    'The user has played: "Anno 2070", "Halo", "Kirby", "Tetris", "Sonic" ### Response: \n',
    "x ### Response: \n",
    'Bought "Zelda" then "Dark Souls 2" ### Response: \n',
    'Played "Gold Edition" ### Response: \n',
]
WORDS = "Super Mario Zelda Halo Tetris Sonic Kirby Gold Deluxe Edition Dark Souls 2 3 Anno Metro".split()


def _titles(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    titles: list[str] = []
    while len(titles) < n:
        t = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        if t not in titles:
            titles.append(t)
    return titles


def _spread(model: torch.nn.Module, seed: int = 3) -> None:
    """Weights with a larger spread than the init's, so that the beams' scores differ clearly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


@pytest.fixture
def counted_attention(monkeypatch):
    """Count the calls of the shared-prompt attention (so a test cannot pass by never using it), and the prompt rows
    each call saw."""
    calls = {"n": 0, "rows": set()}
    inner = sp.shared_prompt_attention

    def counting(*args, **kwargs):
        calls["n"] += 1
        calls["rows"].add(kwargs["shared_prompt"].num_rows)
        return inner(*args, **kwargs)

    monkeypatch.setattr(sp, "shared_prompt_attention", counting)
    return calls


# ----------------------------------------------------------------------------------- the attention alone


class _Layer(torch.nn.Module):
    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx


def test_attention_equals_softmax_over_each_beams_concatenated_prompt_and_generated_positions():
    g = torch.Generator().manual_seed(0)
    rows, kv_heads, groups, dim, prompt_len, gen_len = 3, 2, 3, 8, 7, 4
    heads = kv_heads * groups
    beam_rows = [0, 0, 0, 2, 2]  # row 1 has no live beam: it is dropped from the shared prompt
    n = len(beam_rows)
    mask = torch.ones(rows, prompt_len, dtype=torch.bool)
    mask[1, :5] = False
    mask[2, :2] = False  # left padding
    layers = 2
    pk = [torch.randn(rows, kv_heads, prompt_len, dim, generator=g, dtype=torch.float64) for _ in range(layers)]
    pv = [torch.randn(rows, kv_heads, prompt_len, dim, generator=g, dtype=torch.float64) for _ in range(layers)]
    shared = sp.SharedPrompt(pk, pv, mask, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0,
                             row_ids=torch.arange(rows))
    shared.set_beams(torch.tensor(beam_rows))
    assert shared.num_rows == 2 and shared.slots == 3
    assert shared.beam_slot.tolist() == [0, 1, 2, 0, 1]
    q = torch.randn(n, heads, 1, dim, generator=g, dtype=torch.float64)
    k = torch.randn(n, kv_heads, gen_len, dim, generator=g, dtype=torch.float64)
    v = torch.randn(n, kv_heads, gen_len, dim, generator=g, dtype=torch.float64)
    for layer in range(layers):
        got, weights = sp.shared_prompt_attention(_Layer(layer), q, k, v, None, scaling=0.3, shared_prompt=shared)
        assert weights is None and got.shape == (n, 1, heads, dim)
        for b, row in enumerate(beam_rows):
            real = mask[row]
            for h in range(heads):
                kv = h // groups
                keys = torch.cat([pk[layer][row, kv][real], k[b, kv]])
                values = torch.cat([pv[layer][row, kv][real], v[b, kv]])
                want = torch.softmax(keys @ q[b, h, 0] * 0.3, dim=0) @ values
                torch.testing.assert_close(got[b, 0, h], want, rtol=1e-12, atol=1e-12)


def test_half_precision_attention_rounds_only_its_output():
    """bf16 inputs: scores, softmax and weighted sums are computed in fp32 (from_cache widens the prompt side once),
    so the result is the float64 attention of the same bf16 inputs up to the final rounding to bf16."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(1)
    rows, kv_heads, groups, dim, prompt_len, gen_len = 2, 2, 2, 16, 40, 3
    heads = kv_heads * groups
    cache = DynamicCache()
    pk = torch.randn(rows, kv_heads, prompt_len, dim, generator=g).bfloat16()
    pv = torch.randn(rows, kv_heads, prompt_len, dim, generator=g).bfloat16()
    cache.update(pk, pv, 0)
    mask = torch.ones(rows, prompt_len, dtype=torch.long)
    mask[1, :7] = 0
    shared = sp.SharedPrompt.from_cache(cache, mask)
    assert shared.keys[0].dtype == torch.float32
    shared.set_beams(torch.tensor([0, 0, 1]))
    q = (torch.randn(3, heads, 1, dim, generator=g) * 2).bfloat16()
    k = torch.randn(3, kv_heads, gen_len, dim, generator=g).bfloat16()
    v = torch.randn(3, kv_heads, gen_len, dim, generator=g).bfloat16()
    got, _ = sp.shared_prompt_attention(_Layer(0), q, k, v, None, scaling=dim**-0.5, shared_prompt=shared)
    assert got.dtype == torch.bfloat16
    for b, row in enumerate([0, 0, 1]):
        real = mask[row].bool()
        for h in range(heads):
            kv = h // groups
            keys = torch.cat([pk[row, kv][real], k[b, kv]]).double()
            values = torch.cat([pv[row, kv][real], v[b, kv]]).double()
            want = torch.softmax(keys @ q[b, h, 0].double() * dim**-0.5, dim=0) @ values
            # bf16 has 8 significant bits: the one rounding of the output is within 2^-8 relative
            torch.testing.assert_close(got[b, 0, h].double(), want, rtol=2**-8, atol=1e-3)


def test_shared_attention_refuses_what_it_does_not_compute():
    q = torch.zeros(2, 2, 1, 4)
    kv = torch.zeros(2, 2, 1, 4)
    shared = sp.SharedPrompt([kv], [kv], torch.ones(2, 1, dtype=torch.bool), torch.zeros(0, dtype=torch.long),
                             torch.zeros(0, dtype=torch.long), 0, row_ids=torch.arange(2))
    shared.set_beams(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shared_prompt="):
        sp.shared_prompt_attention(_Layer(0), q, kv, kv, None)
    with pytest.raises(ValueError, match="one token per beam"):
        sp.shared_prompt_attention(_Layer(0), torch.zeros(2, 2, 3, 4), kv, kv, None, shared_prompt=shared)
    with pytest.raises(ValueError, match="dropout"):
        sp.shared_prompt_attention(_Layer(0), q, kv, kv, None, dropout=0.1, shared_prompt=shared)


# ------------------------------------------------------------------------------------ the whole search


def _search_both_ways(model, trie, make_state, **kw):
    shared = constrained_beam_search_from_state(model, trie, make_state(), share_prompt_cache=True, **kw)
    per_beam = constrained_beam_search_from_state(model, trie, make_state(), share_prompt_cache=False, **kw)
    return shared, per_beam


def _assert_same(shared, per_beam):
    assert len(shared) == len(per_beam)
    for a, b in zip(shared, per_beam, strict=True):
        assert a.title_ranking == b.title_ranking
        assert len(a.hypotheses) >= 1
        for (ta, sa), (tb, sb) in zip(a.hypotheses, b.hypotheses, strict=True):
            assert ta == tb and abs(sa - sb) <= 1e-9 * max(1.0, abs(sb)), (ta, sa, sb)


@pytest.mark.parametrize("early_stopping", [True, False])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
@pytest.mark.parametrize("kind", KINDS)
def test_search_with_shared_prompt_equals_per_beam_cache(kind, length_penalty, early_stopping, counted_attention):
    tok = build_tiny_tokenizer(kind)
    model = build_tiny_model(kind, seed=1).double().eval()
    _spread(model)
    assert sp.supports_shared_prompt(model)
    trie = TitleTrie(tok, _titles(40, seed=2), list(range(1, 41)), context_prefix=PREFIX)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()

    def state():
        return prefill_prompts(model, enc.input_ids, enc.attention_mask)

    shared, per_beam = _search_both_ways(model, trie, state, num_beams=6, length_penalty=length_penalty,
                                         early_stopping=early_stopping)
    assert counted_attention["n"] > 0
    _assert_same(shared, per_beam)
    # Rows finished at different steps, so the shared prompt was compacted on the way (not only full batches).
    assert len(PROMPTS) in counted_attention["rows"] and min(counted_attention["rows"]) < len(PROMPTS)
    assert model.config._attn_implementation == "sdpa"  # restored after the search
    consumed = state()
    constrained_beam_search_from_state(model, trie, consumed, num_beams=6)
    assert not consumed.past_key_values.layers  # released: a bf16 original would outlive its fp32 copy otherwise


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("kind", KINDS)
def test_latent_search_with_shared_prompt_equals_per_beam_cache(kind, lora, counted_attention):
    """The latent path (prefill with latent thoughts via inputs_embeds, a PEFT-wrapped model) as evaluate runs it."""
    w, tok = _wrapper(kind, 2, lora=lora)
    _spread(w)
    w.double().eval()
    trie = TitleTrie(tok, _titles(25, seed=5), list(range(1, 26)), context_prefix=PREFIX)
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)

    def state():
        with torch.no_grad():
            cache, logits, mask, pos = w.prefill_with_latents(enc.input_ids, enc.attention_mask)
        return PromptState(logits.float(), cache, mask, pos)

    _assert_same(*_search_both_ways(w.causal_lm, trie, state, num_beams=5))
    assert counted_attention["n"] > 0


def _tiny(model_type: str, **config):
    """A small random model of another supported architecture, on the tiny Qwen2 tokenizer's vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tiny_tokenizer("tiny-qwen2")
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").double().eval()
    _spread(model)
    return model, tok


@pytest.mark.parametrize("model_type", ["qwen3", "mistral"])
def test_other_supported_architectures_equal_the_per_beam_cache(model_type, counted_attention):
    model, tok = _tiny(model_type, sliding_window=None)
    assert sp.supports_shared_prompt(model)
    trie = TitleTrie(tok, _titles(30, seed=4), list(range(1, 31)), context_prefix=PREFIX)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    _assert_same(*_search_both_ways(model, trie, lambda: prefill_prompts(model, enc.input_ids, enc.attention_mask),
                                    num_beams=5))
    assert counted_attention["n"] > 0


def test_a_sliding_window_keeps_the_per_beam_cache(counted_attention):
    """Mistral's window (4,096 by default; 8 here, shorter than the prompts) hides far positions and its prefill
    cache keeps only the window: the search keeps one cache row per beam (the shared form crashed on a cache shorter
    than the prompt, and gave other scores when the title crossed the window)."""
    model, tok = _tiny("mistral", sliding_window=8)
    assert not sp.supports_shared_prompt(model)
    trie = TitleTrie(tok, _titles(10, seed=2), list(range(1, 11)), context_prefix=PREFIX)
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    outs = constrained_beam_search_from_state(model, trie, prefill_prompts(model, enc.input_ids, enc.attention_mask),
                                              num_beams=3)
    assert len(outs) == 2 and counted_attention["n"] == 0
    with pytest.raises(ValueError, match="share_prompt_cache=True"):
        constrained_beam_search_from_state(model, trie, prefill_prompts(model, enc.input_ids, enc.attention_mask),
                                           num_beams=3, share_prompt_cache=True)
    state = prefill_prompts(model, enc.input_ids, enc.attention_mask)
    with pytest.raises(ValueError, match="needs every prompt position"):
        sp.SharedPrompt.from_cache(state.past_key_values, state.attention_mask)


def test_a_prompt_cache_that_cannot_be_shared_is_kept_per_beam(counted_attention):
    """A PromptState built by hand on a cache without every prompt position as one row per prompt (here a
    windowed cache under a model that attends to everything): the default search keeps it per beam, as before."""
    model, tok = _tiny("mistral", sliding_window=None)
    windowed, _ = _tiny("mistral", sliding_window=8)
    trie = TitleTrie(tok, _titles(10, seed=2), list(range(1, 11)), context_prefix=PREFIX)
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    state = prefill_prompts(windowed, enc.input_ids, enc.attention_mask)  # its cache keeps the last 7 positions
    assert state.past_key_values.layers[0].keys.shape[2] < enc.input_ids.shape[1]
    assert len(constrained_beam_search_from_state(model, trie, state, num_beams=3)) == 2
    assert counted_attention["n"] == 0
    state = prefill_prompts(windowed, enc.input_ids, enc.attention_mask)
    with pytest.raises(ValueError, match="needs every prompt position"):
        constrained_beam_search_from_state(model, trie, state, num_beams=3, share_prompt_cache=True)


def test_the_models_attention_is_restored_when_a_step_fails():
    tok = build_tiny_tokenizer("tiny-llama")
    model = build_tiny_model("tiny-llama", seed=1).eval()
    trie = TitleTrie(tok, _titles(10, seed=2), list(range(1, 11)), context_prefix=PREFIX)
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    state = prefill_prompts(model, enc.input_ids, enc.attention_mask)

    def fail(module, args, kwargs):
        raise RuntimeError("boom")

    handle = model.register_forward_pre_hook(fail, with_kwargs=True)
    with pytest.raises(RuntimeError, match="boom"):
        constrained_beam_search_from_state(model, trie, state, num_beams=3)
    handle.remove()
    assert model.config._attn_implementation == "sdpa"




@pytest.mark.parametrize("own", ["sdpa", "eager"])
def test_a_forward_straddling_the_switch_computes_what_it_computes_alone(own):
    """Another thread's forward whose first layers run before a search switches the model and its last ones after
    (or the reverse): one mask and one attention throughout, so the same logits as alone. With one shared name that
    fell back to SDPA, an eager model's forward got an SDPA mask and then eager attention (logits off by ~2)."""
    tok = build_tiny_tokenizer("tiny-llama")
    # float32: transformers' eager attention turns a left-padded float64 batch into NaN (its mask adds float64's min)
    model = build_tiny_model("tiny-llama", seed=1, num_layers=4).eval()
    model.set_attn_implementation(own)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    assert torch.isfinite(want).all()
    for switch_on_first in (True, False):
        switch = sp.use_shared_prompt_attention(model)
        if switch_on_first:
            switch.__enter__()

        def flip(*_, switch=switch, switch_on_first=switch_on_first):
            switch.__exit__(None, None, None) if switch_on_first else switch.__enter__()

        handle = model.model.layers[1].register_forward_hook(flip)
        try:
            with torch.no_grad():
                got = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        finally:
            handle.remove()
        if not switch_on_first:
            switch.__exit__(None, None, None)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the wrong mask moved them by ~2
        assert model.config._attn_implementation == own


@pytest.mark.parametrize("own", ["sdpa", "eager"])
def test_searches_and_ordinary_forwards_in_threads_on_one_model(own):
    """Two searches and a stream of plain forwards of a left-padded batch at once on one model: every search returns
    what it returns alone, every forward its logits alone (some while a search held the model switched), and the
    model's attention is its own again afterwards."""
    import threading

    tok = build_tiny_tokenizer("tiny-llama")
    model = build_tiny_model("tiny-llama", seed=1, num_layers=4).eval()  # float32: see the test above
    model.set_attn_implementation(own)
    _spread(model)
    trie = TitleTrie(tok, _titles(40, seed=2), list(range(1, 41)), context_prefix=PREFIX)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)

    def search():
        state = prefill_prompts(model, enc.input_ids, enc.attention_mask)
        return constrained_beam_search_from_state(model, trie, state, num_beams=6)

    with torch.no_grad():
        want_logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    want = search()
    results, errors, forwards, seen_switched = [], [], [], []
    searching = threading.Event()

    def run_search():
        try:
            searching.set()
            results.append(search())
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    def run_forwards():
        try:
            searching.wait()
            while any(t.is_alive() for t in searchers):
                seen_switched.append(model.config._attn_implementation != own)
                with torch.no_grad():
                    forwards.append(model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits)
        except BaseException as e:
            errors.append(e)

    searchers = [threading.Thread(target=run_search) for _ in range(2)]
    forwarder = threading.Thread(target=run_forwards)
    for t in [*searchers, forwarder]:
        t.start()
    for t in [*searchers, forwarder]:
        t.join()
    assert not errors, errors
    assert len(results) == 2 and forwards and any(seen_switched)
    for got in results:
        _assert_same(got, want)
    for logits in forwards:
        torch.testing.assert_close(logits, want_logits, rtol=1e-6, atol=1e-6)
    assert model.config._attn_implementation == own


def test_a_kernel_that_reads_its_own_name_from_the_config_keeps_working_during_a_search():
    """FlashAttention's forward picks its kernel by module.config._attn_implementation; during a search that names
    the switched implementation, and another thread's forward on an FA model failed ("Could not find the currently
    requested flash attention implementation"). The fallback now sees the model's own name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = "llmrec_test_kernel"

    def kernel(module, *args, **kwargs):
        assert module.config._attn_implementation == name, module.config._attn_implementation
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register(name, kernel)
    AttentionMaskInterface.register(name, sdpa_mask)
    tok = build_tiny_tokenizer("tiny-llama")
    model = build_tiny_model("tiny-llama", seed=1, num_layers=4).eval()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    model.config._attn_implementation = name
    with sp.use_shared_prompt_attention(model), torch.no_grad():
        got = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert model.config._attn_implementation == name
