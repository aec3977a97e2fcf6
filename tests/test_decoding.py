import random

import pytest
import torch

from llmrec.decoding.beam_search import (
    PromptState,
    constrained_beam_search,
    constrained_beam_search_from_state,
    make_prefix_allowed_tokens_fn,
    prefill_prompts,
    reference_constrained_beam_search,
)
from llmrec.decoding.trie import TitleTokenizationError, TitleTrie
from llmrec.models.kv_cache_naming import cache_kwargs
from llmrec.models.tiny import build_tiny

PREFIX = "### Response: \n"
PROMPTS = [
    "Below is an instruction that describes a task. ### Response: \n",
    'The user has palyed the following video gamess before: "Anno 2070", "Halo", "Kirby" ### Response: \n',
    "x ### Response: \n",
]
WORDS = (
    "Super Mario Bros. Zelda Breath of the Wild Nintendo Switch PlayStation Xbox One PC Game Edition Call "
    "Duty Black Ops Grand Theft Auto Final Fantasy Pokemon Red Blue Halo Skyrim Tetris Sonic Kirby 2 3 Vol. "
    "Gold Deluxe Ultimate"
).split()


@pytest.fixture(scope="module", params=["tiny-qwen2", "tiny-llama"])
def tiny(request):
    return build_tiny(request.param)


def random_catalogue(seed: int, n: int) -> tuple[list[str], list[int]]:
    """Random multi-word titles plus a duplicated title and titles that are prefixes of others."""
    rng = random.Random(seed)
    titles = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(n)]
    titles += [titles[0], titles[1] + " 2", titles[2] + " Deluxe Edition"]
    ids = list(range(100, 100 + len(titles)))
    rng.shuffle(ids)
    return titles, ids


def encode(tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True)  # tiny tokenizers pad on the left
    return enc.input_ids, enc.attention_mask


def teacher_forced_score(model, tok, prompt, path, length_penalty):
    p = tok(prompt, return_tensors="pt").input_ids
    ids = torch.cat([p, torch.tensor([path])], dim=1)
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    tgt = torch.tensor(path)
    total = logp[p.shape[1] - 1 : -1].gather(1, tgt[:, None]).sum().item()
    return total / len(path) ** length_penalty


# ------------------------------------------------------------------------------------------ trie


def test_trie_structure(tiny):
    _, tok = tiny
    titles = ["Halo", "Zelda", "Halo 2", "Halo", "Kirby Gold"]
    trie = TitleTrie(tok, titles, [5, 3, 9, 1, 7], context_prefix=PREFIX)
    assert trie.titles == ["Halo", "Zelda", "Halo 2", "Kirby Gold"]
    assert trie.title_item_ids == [[1, 5], [3], [9], [7]]
    assert trie.item_to_title == {5: 0, 1: 0, 3: 1, 9: 2, 7: 3}
    for t, path in enumerate(trie.title_token_ids):
        want = tok(f'"{trie.titles[t]}"\n', add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert path == want  # no BOS, even for the Llama-style tokenizer
        node = 0
        for d, token in enumerate(path):
            assert int(trie.terminal[node]) == -1
            toks, kids = trie.children(node)
            assert toks == sorted(toks)
            node = kids[toks.index(token)]
            assert int(trie.depth[node]) == d + 1
        assert int(trie.terminal[node]) == t
        assert trie.children(node) == ([], [])
    assert trie.max_depth == max(len(p) for p in trie.title_token_ids)
    assert trie.child_ptr.shape == (trie.num_nodes + 1,)
    assert trie.child_tokens.shape == trie.child_nodes.shape == (trie.num_nodes - 1,)
    assert trie.items_for_titles([2, 0, 0]) == [9, 1, 5]


def test_trie_errors(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="empty catalogue"):
        TitleTrie(tok, [], [], context_prefix=PREFIX)
    with pytest.raises(ValueError, match="unique"):
        TitleTrie(tok, ["a", "b"], [1, 1], context_prefix=PREFIX)
    # A trailing space in the answer prefix merges with word-initial titles (" Zelda" is one token),
    # but not with punctuation-initial ones.
    titles = ["...And Justice", "Zelda", "!Kirby", "2070"]
    with pytest.raises(TitleTokenizationError) as err:
        TitleTrie(tok, titles, [1, 2, 3, 4], context_prefix="### Response: ", completion_format="{title}\n")
    msg = str(err.value)
    assert "2 of 4" in msg and "'Zelda'" in msg and "'2070'" in msg and "Kirby" not in msg
    # The same titles are fine after a newline.
    TitleTrie(tok, titles, [1, 2, 3, 4], context_prefix="### Response: \n", completion_format="{title}\n")


def test_distinct_titles_with_one_tokenization_are_refused_naming_every_pair_and_its_items():
    """A tokenizer that normalises text (here: lower-cases) can give distinct titles one token path. They are not
    merged (a leaf is one title string, and title-level matching compares strings); the error names every such
    pair with its items, counts them and says what to do -- not only the first pair, with no items or remedy."""
    from tokenizers import normalizers

    from llmrec.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer("tiny-qwen2")
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    # Exact duplicates are still one shared title.
    assert TitleTrie(tok, ["Halo", "Zelda", "Halo"], [1, 2, 3], context_prefix=PREFIX).title_item_ids == [[1, 3], [2]]
    with pytest.raises(ValueError) as err:
        TitleTrie(tok, ["Halo", "Zelda", "HALO", "Kirby", "kirby", "Halo"], [1, 2, 3, 4, 5, 6], context_prefix=PREFIX)
    msg = str(err.value)
    assert msg.startswith("2 title(s) tokenize to the same completion")
    assert "'Halo' (item(s) [1, 6]) and 'HALO' (item(s) [3])" in msg
    assert "'Kirby' (item(s) [4]) and 'kirby' (item(s) [5])" in msg
    assert "one spelling in the catalogue" in msg and "Zelda" not in msg


def test_trie_prefix_titles_need_eos(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="add_eos=True"):
        TitleTrie(tok, ["Halo", "Halo 2"], [1, 2], context_prefix="R:\n", completion_format="{title}", add_eos=False)


# ------------------------------------------------------------------------------------ beam search


@pytest.mark.parametrize(
    "seed,n_titles,num_beams,length_penalty",
    [(0, 40, 4, 1.0), (0, 40, 10, 0.0), (1, 60, 10, 1.0), (1, 60, 4, 0.0), (2, 150, 10, 1.0), (3, 25, 5, 0.5)],
)
def test_matches_transformers_generate(tiny, seed, n_titles, num_beams, length_penalty):
    model, tok = tiny
    titles, ids = random_catalogue(seed, n_titles)
    trie = TitleTrie(tok, titles, ids, context_prefix=PREFIX)
    input_ids, mask = encode(tok, PROMPTS)
    assert (mask == 0).any()  # rows of different lengths, left-padded
    ours = constrained_beam_search(model, trie, input_ids, mask, num_beams=num_beams, length_penalty=length_penalty)
    ref = reference_constrained_beam_search(
        model, trie, input_ids, mask, num_beams=num_beams, length_penalty=length_penalty
    )
    for o, r in zip(ours, ref, strict=True):
        assert len(o.hypotheses) == num_beams
        assert o.title_ranking == r.title_ranking
        assert o.item_ranking == r.item_ranking
        for (_, so), (_, sr) in zip(o.hypotheses, r.hypotheses, strict=True):
            assert so == pytest.approx(sr, abs=1e-4)


def test_scores_are_sequence_logprobs_and_items_expand(tiny):
    model, tok = tiny
    titles, ids = random_catalogue(3, 30)
    trie = TitleTrie(tok, titles, ids, context_prefix=PREFIX)
    input_ids, mask = encode(tok, PROMPTS)
    for lp in (1.0, 0.0):
        out = constrained_beam_search(model, trie, input_ids, mask, num_beams=4, length_penalty=lp)
        for prompt, row in zip(PROMPTS, out, strict=True):
            scores = [s for _, s in row.hypotheses]
            assert scores == sorted(scores, reverse=True)
            assert len(set(row.title_ranking)) == len(row.title_ranking)
            for t, s in row.hypotheses:
                path = trie.title_token_ids[t]
                assert s == pytest.approx(teacher_forced_score(model, tok, prompt, path, lp), abs=1e-4)
            assert row.item_ranking == [i for t in row.title_ranking for i in sorted(trie.title_item_ids[t])]


def test_batch_equals_single_prompts(tiny):
    model, tok = tiny
    titles, ids = random_catalogue(4, 50)
    trie = TitleTrie(tok, titles, ids, context_prefix=PREFIX)
    batched = constrained_beam_search(model, trie, *encode(tok, PROMPTS), num_beams=6)
    for prompt, row in zip(PROMPTS, batched, strict=True):
        (single,) = constrained_beam_search(model, trie, *encode(tok, [prompt]), num_beams=6)
        assert single.title_ranking == row.title_ranking
        for (_, a), (_, b) in zip(single.hypotheses, row.hypotheses, strict=True):
            assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_tied_titles_rank_the_same_alone_and_in_a_batch(tiny, length_penalty):
    """Two tokens with the same embedding and output row make titles that differ only by them score exactly
    alike (common with bf16 logits); their order must not depend on the prompt's batch-mates (torch.topk's tie
    order changes with the tensor's width, which the batch sets)."""
    import copy

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    single = [w for w in WORDS if len(tok(" " + w, add_special_tokens=False).input_ids) == 1]
    a, b = (tok(" " + w, add_special_tokens=False).input_ids[0] for w in single[:2])
    with torch.no_grad():
        model.get_input_embeddings().weight[b] = model.get_input_embeddings().weight[a]
        model.get_output_embeddings().weight[b] = model.get_output_embeddings().weight[a]
    rng = random.Random(0)
    base = list(dict.fromkeys(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(15)))
    titles = list(dict.fromkeys(base + [t + " " + w for t in base[:6] for w in single[:2]]))
    rng.shuffle(titles)
    trie = TitleTrie(tok, titles, list(range(1, len(titles) + 1)), context_prefix=PREFIX)
    batched = constrained_beam_search(model, trie, *encode(tok, PROMPTS), num_beams=8, length_penalty=length_penalty)
    ties = 0
    for prompt, row in zip(PROMPTS, batched, strict=True):
        (alone,) = constrained_beam_search(model, trie, *encode(tok, [prompt]), num_beams=8,
                                           length_penalty=length_penalty)
        assert alone.title_ranking == row.title_ranking
        scores = [s for _, s in alone.hypotheses]
        ties += len(scores) - len(set(scores))
    assert ties > 0  # the case under test occurs
    ids, mask = encode(tok, PROMPTS)
    assert constrained_beam_search(model, trie, ids[:0], mask[:0], num_beams=8) == []  # an empty batch


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_fewer_completions_than_beams(tiny, length_penalty):
    """A catalogue smaller than the beam: every title comes back once, with its exact score, and no
    placeholder beam is returned. transformers may return fewer (its -1e9 placeholder beams can fill the
    finished slots), but whatever it returns must be ours, with the same scores and relative order."""
    model, tok = tiny
    titles = ["Halo", "Halo 2", "Zelda", "Halo", "Kirby Gold Deluxe Edition"]
    trie = TitleTrie(tok, titles, [4, 2, 8, 6, 1], context_prefix=PREFIX)
    input_ids, mask = encode(tok, PROMPTS)
    ours = constrained_beam_search(model, trie, input_ids, mask, num_beams=8, length_penalty=length_penalty)
    ref = reference_constrained_beam_search(model, trie, input_ids, mask, num_beams=8, length_penalty=length_penalty)
    for prompt, o, r in zip(PROMPTS, ours, ref, strict=True):
        assert sorted(o.title_ranking) == list(range(trie.num_titles))
        assert sorted(o.item_ranking) == [1, 2, 4, 6, 8]
        for t, s in o.hypotheses:
            want = teacher_forced_score(model, tok, prompt, trie.title_token_ids[t], length_penalty)
            assert s == pytest.approx(want, abs=1e-4)
        ours_score = dict(o.hypotheses)
        assert [t for t in o.title_ranking if t in dict(r.hypotheses)] == r.title_ranking
        for t, s in r.hypotheses:
            assert s == pytest.approx(ours_score[t], abs=1e-4)


def test_single_title_and_beam_of_one(tiny):
    model, tok = tiny
    input_ids, mask = encode(tok, PROMPTS)
    trie = TitleTrie(tok, ["Halo"], [7], context_prefix=PREFIX)
    for row in constrained_beam_search(model, trie, input_ids, mask, num_beams=3):
        assert row.title_ranking == [0] and row.item_ranking == [7]
    # num_beams=1 is greedy decoding (generate switches to its greedy loop, so compare with that).
    titles, ids = random_catalogue(5, 40)
    trie = TitleTrie(tok, titles, ids, context_prefix=PREFIX)
    ours = constrained_beam_search(model, trie, input_ids, mask, num_beams=1)
    with torch.no_grad():
        greedy = model.generate(
            input_ids=input_ids, attention_mask=mask, do_sample=False, num_beams=1,
            max_new_tokens=trie.max_depth, eos_token_id=trie.eos_token_id, pad_token_id=trie.eos_token_id,
            prefix_allowed_tokens_fn=make_prefix_allowed_tokens_fn(trie, input_ids.shape[1]),
        )
    for row, seq in zip(ours, greedy[:, input_ids.shape[1]:].tolist(), strict=True):
        (title,) = row.title_ranking
        path = trie.title_token_ids[title]
        assert seq[: len(path)] == path
    with pytest.raises(ValueError, match="num_beams"):
        reference_constrained_beam_search(model, trie, input_ids, mask, num_beams=1)


def test_search_from_custom_prompt_state(tiny):
    """The search runs from any prefilled state, e.g. a prompt consumed in two chunks (as LatentR3 will
    append a latent thought to a prefilled cache)."""
    from transformers import DynamicCache

    model, tok = tiny
    titles, ids = random_catalogue(6, 40)
    trie = TitleTrie(tok, titles, ids, context_prefix=PREFIX)
    input_ids, mask = encode(tok, PROMPTS)
    want = constrained_beam_search(model, trie, input_ids, mask, num_beams=5)

    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=input_ids[:, :-3], attention_mask=mask[:, :-3], position_ids=pos[:, :-3],
              use_cache=True, **cache_kwargs(cache))
        embeds = model.get_input_embeddings()(input_ids[:, -3:])
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos[:, -3:],
                    use_cache=True, **cache_kwargs(cache))
    state = PromptState(out.logits[:, -1], cache, mask, pos[:, -1] + 1)
    got = constrained_beam_search_from_state(model, trie, state, num_beams=5)
    for g, w in zip(got, want, strict=True):
        assert g.title_ranking == w.title_ranking
        for (_, a), (_, b) in zip(g.hypotheses, w.hypotheses, strict=True):
            assert a == pytest.approx(b, abs=1e-4)


def test_non_finite_logits_are_an_error_naming_the_rows_and_step(tiny):
    """One NaN or +inf logit anywhere in a row's vocabulary (a float16 overflow; here even at tokens the trie does
    not allow) made that row's normaliser non-finite: every candidate dropped out and the row returned no title,
    which the evaluator counted as a miss. Now an error naming the rows and the step; masked (-inf) logits are fine."""
    model, tok = tiny
    titles, ids = random_catalogue(0, 20)
    trie = TitleTrie(tok, titles, ids, context_prefix=PREFIX)
    input_ids, mask = encode(tok, PROMPTS)
    state = prefill_prompts(model, input_ids, mask)
    first = set(trie.child_tokens[: int(trie.child_ptr[1])].tolist())  # the tokens a title may start with
    outside = next(t for t in range(len(tok)) if t not in first)
    state.next_token_logits = state.next_token_logits.clone()
    state.next_token_logits[1, outside] = float("inf")
    state.next_token_logits[2, outside] = float("nan")
    with pytest.raises(ValueError, match=r"prompt row\(s\) \(0-based\) 1, 2 at decoding step 0: .*"
                                                   r"bfloat16 or float32 instead of float16"):
        constrained_beam_search_from_state(model, trie, state, num_beams=4)

    # ...at a later step too: the first beam (prompt row 0) gets a NaN logit at step 1
    class Poisoned(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits[0, -1, outside] = float("nan")
            return out

    with pytest.raises(ValueError, match=r"prompt row\(s\) \(0-based\) 0 at decoding step 1"):
        constrained_beam_search_from_state(Poisoned(model), trie, prefill_prompts(model, input_ids, mask), num_beams=4)

    # Masked logits: every token a title cannot start with at -inf leaves the search as it was (length_penalty 0:
    # the row's scores all move by the same constant)
    want = constrained_beam_search(model, trie, input_ids, mask, num_beams=4, length_penalty=0.0)
    state = prefill_prompts(model, input_ids, mask)
    keep = torch.zeros(len(tok), dtype=torch.bool)
    keep[sorted(first)] = True
    state.next_token_logits = state.next_token_logits.float().masked_fill(~keep, float("-inf"))
    got = constrained_beam_search_from_state(model, trie, state, num_beams=4, length_penalty=0.0)
    assert [g.title_ranking for g in got] == [w.title_ranking for w in want] and all(g.title_ranking for g in got)


def test_draw_token_refuses_non_finite_probabilities():
    """With a NaN (or +inf) logit among the allowed tokens the inverse CDF silently picked the last token; only a
    caller that discards the draw asks for it now."""
    from llmrec.decoding.sampling import draw_token

    allowed = torch.tensor([0, 1, 2, 3])
    for bad in ([float("nan")] * 4, [0.0, float("inf"), 0.0, 0.0], [float("-inf")] * 4):
        with pytest.raises(ValueError, match="not finite.*bfloat16 or float32"):
            draw_token(torch.tensor(bad), allowed, 0.1, 1.0)
    # the placeholder a caller that discards such draws asks for (generation-mode GRPO skips the group)
    assert draw_token(torch.tensor([float("nan")] * 4), allowed, 0.1, 1.0, allow_non_finite=True) == 3
    # masked tokens are not drawn, and the others are drawn as before
    assert draw_token(torch.tensor([float("-inf"), 0.0, float("-inf"), 0.0]), allowed, 0.1, 1.0) == 1
    assert draw_token(torch.tensor([float("-inf"), 0.0, float("-inf"), 0.0]), allowed, 0.9, 1.0) == 3


@pytest.mark.parametrize("length_penalty", [700.0, -700.0, 10.5, float("nan")])
def test_a_length_penalty_beyond_ten_is_refused(tiny, length_penalty):
    """At 700, ``L ** length_penalty`` overflowed (OverflowError); at -700 every score became -inf (empty rankings)."""
    model, tok = tiny
    titles, ids = random_catalogue(0, 20)
    trie = TitleTrie(tok, titles, ids, context_prefix=PREFIX)
    input_ids, mask = encode(tok, PROMPTS)
    with pytest.raises(ValueError, match=r"length_penalty must be (between -10 and 10|a finite number)"):
        constrained_beam_search(model, trie, input_ids, mask, num_beams=4, length_penalty=length_penalty)
    for edge in (10.0, -10.0):  # the bounds themselves rank every row in full
        out = constrained_beam_search(model, trie, input_ids, mask, num_beams=4, length_penalty=edge)
        assert all(len(o.title_ranking) == 4 for o in out)
        assert all(s > float("-inf") for o in out for _, s in o.hypotheses)


def test_prefill_rejects_right_padding(tiny):
    model, tok = tiny
    input_ids, mask = encode(tok, PROMPTS)
    with pytest.raises(ValueError, match="left-padded"):
        prefill_prompts(model, input_ids, mask.flip(1))


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama 3's template trims the user content (the answer prefix's trailing whitespace is then gone)
TRIMMING = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}"
            "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
            "{% endif %}")


@pytest.mark.parametrize("chat_template,context", [
    (CHATML, "### Response: \n<|im_end|>\n<|im_start|>assistant\n"),
    (TRIMMING, "### Response:<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_chat_template_answer_context_is_what_every_wrapped_prompt_ends_with(tiny, chat_template, context):
    """Not the whole prompt wrapped for a history ["x"] (then `separate` failed for every chat template)."""
    import copy

    from llmrec.data.catalog import ItemCatalog
    from llmrec.decoding.search import answer_context, build_catalog_trie
    from llmrec.prompts import PromptTemplate, wrap_chat

    tok = copy.deepcopy(tiny[1])
    tok.chat_template = chat_template
    tpl = PromptTemplate.load("d3")
    assert answer_context(tpl, tok, use_chat_template=True) == context
    for history in (["x"], ["Halo", "Super Mario Bros. 3"]):
        assert wrap_chat(tok, tpl.render_prompt(history, "video games")).endswith(context)
    titles, ids = random_catalogue(0, 12)
    catalog = ItemCatalog([str(i) for i in ids], titles)
    paths = {tz: build_catalog_trie(catalog, tok, tpl, use_chat_template=True, tokenization=tz).title_token_ids
             for tz in ("separate", "joint")}
    assert paths["separate"] == paths["joint"]
    assert answer_context(tpl, tok, use_chat_template=False) == tpl.answer_prefix


# ------------------------------------------------------------------------------------------ sampling log-probs


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_constrained_token_logprobs_equal_the_plain_restricted_softmax(tiny, temperature):
    """The vectorised log-probs of drawn titles (generation-mode GRPO's ratio) equal, value and gradient, a
    per-position log-softmax over the tokens the trie allows there (what draw_token samples from); padding
    positions (node -1) give the full-vocabulary value; forced tokens give 0."""
    from llmrec.decoding.sampling import constrained_token_logprobs, draw_token, trie_nodes

    _, tok = tiny
    titles, ids = random_catalogue(3, 12)
    trie = TitleTrie(tok, titles, ids, context_prefix=PREFIX)
    paths = [trie.title_token_ids[i] for i in (0, 3, 5, 7)]
    width = max(len(p) for p in paths) + 1
    m, v = len(paths), len(tok)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(m, width, v, generator=gen) * 3).requires_grad_(True)
    x = torch.zeros(m, width, dtype=torch.long)
    nodes = torch.full((m, width), -1, dtype=torch.long)
    for i, p in enumerate(paths):
        x[i, : len(p)] = torch.tensor(p)
        nodes[i, : len(p)] = torch.tensor(trie_nodes(trie, p))
    fast = constrained_token_logprobs(logits, x, nodes, trie.child_ptr, trie.child_tokens, temperature)
    plain = torch.zeros(m, width)
    forced = 0
    for i, p in enumerate(paths):
        for j in range(width):
            if j >= len(p):
                plain[i, j] = torch.log_softmax(logits[i, j] / temperature, -1)[x[i, j]]
                continue
            allowed, _ = trie.children(int(nodes[i, j]))
            plain[i, j] = torch.log_softmax(logits[i, j, allowed] / temperature, -1)[allowed.index(p[j])]
            # the probability draw_token samples this token with: the same distribution
            k = allowed.index(p[j])
            lo = torch.softmax(logits[i, j, allowed].detach().double() / temperature, -1)[:k].sum().item()
            hi = lo + plain[i, j].exp().item()
            assert draw_token(logits[i, j].detach(), torch.tensor(allowed), (lo + hi) / 2, temperature) == k
            forced += len(allowed) == 1
    assert forced > 0 and torch.allclose(fast, plain, atol=1e-5)
    assert (fast[nodes >= 0][torch.tensor([len(trie.children(int(n))[0]) == 1 for n in nodes[nodes >= 0]])] == 0).all()
    weights = torch.randn(m, width, generator=gen)
    (g_fast,) = torch.autograd.grad((fast * weights).sum(), logits)
    (g_plain,) = torch.autograd.grad((plain * weights).sum(), logits)
    assert torch.allclose(g_fast, g_plain, atol=1e-5)
    with pytest.raises(ValueError, match="not a continuation"):
        trie_nodes(trie, [paths[0][0], paths[1][-1] + 10**6])


def _sharp(kind: str, seed: int):
    """A tiny model with weights ~N(0, 1/fan_in) and larger embeddings: peaked next-token distributions, so
    beam search decisions (and early stopping) matter, unlike the near-uniform default initialisation."""
    model, tok = build_tiny(kind, seed=seed)
    g = torch.Generator().manual_seed(seed + 123)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5, generator=g)
        model.get_input_embeddings().weight.mul_(3.0)
    return model.eval(), tok


def test_early_stopping_false_matches_generate():
    """early_stopping=False (generate's default, what the papers' code ran): the same rankings and scores as
    transformers, on models and beams where it returns other lists than early_stopping=True on some rows."""
    prompts = PROMPTS + ['Recommend the next item "Zelda" "Tetris" "Sonic" ### Response: \n', "a ### Response: \n"]
    differ = rows = 0
    for kind, seed in [(k, s) for k in ("tiny-qwen2", "tiny-llama") for s in range(3)]:
        model, tok = _sharp(kind, seed)
        titles, ids = random_catalogue(seed, 80)
        trie = TitleTrie(tok, titles, ids, context_prefix=PREFIX)
        input_ids, mask = encode(tok, prompts)
        for lp, beams in ((1.0, 5), (0.0, 5), (0.5, 3)):
            ours = constrained_beam_search(model, trie, input_ids, mask, num_beams=beams, length_penalty=lp,
                                           early_stopping=False)
            ref = reference_constrained_beam_search(model, trie, input_ids, mask, num_beams=beams,
                                                    length_penalty=lp, early_stopping=False)
            stop = constrained_beam_search(model, trie, input_ids, mask, num_beams=beams, length_penalty=lp)
            for o, r, e in zip(ours, ref, stop, strict=True):
                assert o.title_ranking == r.title_ranking
                for (_, so), (_, sr) in zip(o.hypotheses, r.hypotheses, strict=True):
                    assert so == pytest.approx(sr, abs=1e-4)
                rows += 1
                differ += o.title_ranking != e.title_ranking
    assert differ > 0, f"early stopping changed no ranking in {rows} rows: the case under test did not occur"
