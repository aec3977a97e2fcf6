"""Glue between prepared data, prompts and the constrained beam search (used by the evaluator)."""

from __future__ import annotations

import torch

from llmrec.decoding.beam_search import (
    PromptState,
    constrained_beam_search,
    constrained_beam_search_from_state,
)
from llmrec.decoding.guidance import TitleGuidance
from llmrec.decoding.trie import TitleTrie
from llmrec.models.latent import LatentReasoningLM
from llmrec.prompts import PromptTemplate, check_titles_are_plain_text, encode, render_to_fit, wrap_chat


def answer_context(template: PromptTemplate, tokenizer, use_chat_template: bool) -> str:
    """The text every prompt ends with right before the answer (what the trie checks titles against).

    Without a chat template: the template's answer prefix. With one: the answer prefix as the chat template
    renders it at the end of the user turn, then the template's text up to the answer (the end of the user
    turn and the assistant header of ``add_generation_prompt``), e.g.
    ``"### Response: \\n<|im_end|>\\n<|im_start|>assistant\\n"``. Never the history, which differs by prompt.
    """
    if use_chat_template:
        prompt = template.render_prompt(["x"])
        wrapped = wrap_chat(tokenizer, prompt)
        # The user content up to its answer prefix. Some chat templates trim the content (Llama 3's does), which
        # can only change its end: without an answer prefix the prompt's trailing whitespace may be gone.
        head = prompt[: len(prompt) - len(template.answer_prefix)]
        for part in (head, head.rstrip()):
            at = wrapped.rfind(part)
            if part and at >= 0:
                return wrapped[at + len(part):]
        raise ValueError(
            f"prompt template '{template.name}': the tokenizer's chat template does not keep the prompt's text in "
            f"the user turn ({wrapped[:200]!r}...), so where the answer starts is unknown"
        )
    if not template.answer_prefix:
        raise ValueError(f"prompt template '{template.name}' declares no answer_prefix")
    return template.answer_prefix


TOKENIZATIONS = ("separate", "joint")


def _catalog_name(catalog) -> str:
    """The catalogue's file where it is known (a prepared dataset's), for error messages."""
    path = getattr(catalog, "path", None)
    return str(path) if path else "the catalogue"


def build_catalog_trie(
    catalog, tokenizer, template: PromptTemplate, use_chat_template: bool = False, tokenization: str = "separate"
) -> TitleTrie:
    """A :class:`TitleTrie` over every catalogue title, in the template's completion format + EOS.

    ``tokenization="separate"`` (default, D3's convention, also used by SFT): the prompt and the
    completion are tokenized on their own and the ids concatenated. Then the prompt's tail must
    tokenize the same at the end of a real prompt as alone, which is checked here. ``"joint"``:
    prompt + completion are one string, and every title must tokenize the same after the answer
    prefix as alone (checked by the trie; BPE tokenizers that merge the prefix's trailing space
    with the next character fail this, e.g. SmolLM2 with the D3 prompt).
    """
    if tokenization not in TOKENIZATIONS:
        raise ValueError(f"tokenization must be one of {TOKENIZATIONS}, got {tokenization!r}")
    check_titles_are_plain_text(tokenizer, catalog.titles, catalog.item_ids, _catalog_name(catalog))
    context = answer_context(template, tokenizer, use_chat_template)
    if tokenization == "separate":
        sample = template.render_prompt(["Example title"])
        if use_chat_template:
            sample = wrap_chat(tokenizer, sample)
        tail = tokenizer(context, add_special_tokens=False)["input_ids"]
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
        if ids[len(ids) - len(tail):] != tail:
            what = "answer prefix" if not use_chat_template else "answer prefix and chat template's assistant header"
            raise ValueError(
                f"prompt template '{template.name}': its {what} {context!r} tokenizes differently at the "
                "end of a prompt than alone; the decoding root would be ambiguous"
            )
    return TitleTrie(
        tokenizer,
        catalog.titles,
        list(catalog.item_ids),
        context_prefix=context,
        completion_format=template.completion_format,
        joint_tokenization=tokenization == "joint",
    )


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` / ``attention_mask`` (special tokens such as BOS included)."""
    encoded = [encode(tokenizer, p, first=True) for p in prompts]  # one BOS, also after a chat template
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for r, e in enumerate(encoded):
        ids[r, width - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[r, width - len(e):] = 1
    return ids.to(device), mask.to(device)


def answer_budget(trie: TitleTrie, model=None) -> int:
    """Tokens a prompt leaves free: the longest catalogue answer (completion + EOS), plus the model's latent
    tokens. Prompts are cut to fit without looking at the row's true answer, whose length would otherwise decide
    how much history a row keeps."""
    latent = model.num_latent_tokens if isinstance(model, LatentReasoningLM) else 0
    return max(len(p) for p in trie.title_token_ids) + latent


def render_prompts(template: PromptTemplate, tokenizer, examples: list[dict], config, reserved: int = 0,
                   latent_tokens: int = 0) -> list[str]:
    """Prompts for ``examples`` (rows with ``history_titles``), histories cut from the left to fit.

    ``config.prompt_fit`` (default ``own_answer``): ``own_answer`` fits prompt + the model's ``latent_tokens`` + the
    row's ``target_title`` in ``config.max_prompt_length`` (as SFT and GRPO do); ``longest_answer`` fits the prompt
    alone in ``max_prompt_length - reserved`` (see :func:`answer_budget`, latents included) and never reads the target.
    """
    own = getattr(config, "prompt_fit", "own_answer") == "own_answer"
    out = []
    for ex in examples:
        rendered, _ = render_to_fit(
            template, tokenizer, list(ex["history_titles"]), ex["target_title"] if own else None,
            config.max_prompt_length - latent_tokens if own else config.max_prompt_length - reserved,
            noun=config.noun, use_chat_template=config.use_chat_template,
        )
        out.append(rendered["prompt"])
    return out


def prompt_lengths(model, tokenizer, trie: TitleTrie, template: PromptTemplate, examples: list[dict], config) -> list[int]:
    """Tokens of each example's prompt as :func:`rank_batch` encodes it (before padding; latent tokens not counted)."""
    latent = model.num_latent_tokens if isinstance(model, LatentReasoningLM) else 0
    prompts = render_prompts(template, tokenizer, examples, config, answer_budget(trie, model), latent)
    return [len(encode(tokenizer, p, first=True)) for p in prompts]


def rank_batch(
    model, tokenizer, trie: TitleTrie, template: PromptTemplate, examples: list[dict], config,
    guidance: TitleGuidance | None = None,
):
    """Constrained beam search for a batch; per row ``(titles, item ids, scores)`` best first.

    ``guidance``: optional D3 guidance by an ID model, one row per example (scores then include it).
    """
    if not examples:
        return []
    latent = model.num_latent_tokens if isinstance(model, LatentReasoningLM) else 0
    early_stopping = bool(getattr(config, "early_stopping", True))
    prompts = render_prompts(template, tokenizer, examples, config, answer_budget(trie, model), latent)
    device = next(model.parameters()).device
    ids, mask = encode_prompts(tokenizer, prompts, device)
    if isinstance(model, LatentReasoningLM):
        # Prefill the prompt, pool and feed the (noise-free) latents, then search from that state.
        with torch.no_grad():
            cache, logits, full_mask, next_pos = model.prefill_with_latents(ids, mask)
        state = PromptState(next_token_logits=logits.float(), past_key_values=cache, attention_mask=full_mask,
                            next_position_ids=next_pos)
        outputs = constrained_beam_search_from_state(model.causal_lm, trie, state, num_beams=config.num_beams,
                                                     length_penalty=config.length_penalty, guidance=guidance,
                                                     early_stopping=early_stopping)
    else:
        outputs = constrained_beam_search(model, trie, ids, mask, num_beams=config.num_beams,
                                          length_penalty=config.length_penalty, guidance=guidance,
                                          early_stopping=early_stopping)
    return [
        ([trie.titles[t] for t in o.title_ranking], list(o.item_ranking), [round(float(s), 6) for _, s in o.hypotheses])
        for o in outputs
    ]
