"""Constrained sampling of catalogue titles: the rollouts of generation-mode GRPO (vanilla GRPO over titles).

:func:`constrained_sample_from_state` draws one title per row of a prefilled :class:`PromptState`: at each step the
next token is drawn from the model's next-token distribution restricted to the tokens the title trie allows after
the row's prefix (renormalised over them; the softmax is taken at ``temperature``), until the row reaches the end of
a title (its EOS). Every draw is by inverse CDF from a uniform the caller gives, one per row and step: keyed per row,
a row's title does not depend on which other rows share its batch. Rows that have finished keep their cache slot
(their outputs are ignored), so the batch never has to be reordered.

:func:`plain_constrained_sample` is the obviously-right form (the whole sequence recomputed at every step, no cache)
that the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmrec.decoding.beam_search import PromptState
from llmrec.decoding.trie import TitleTrie
from llmrec.models.kv_cache_naming import cache_kwargs, returned_cache

__all__ = [
    "SampledTitle",
    "constrained_sample_from_state",
    "constrained_token_logprobs",
    "draw_token",
    "plain_constrained_sample",
    "trie_nodes",
]


@dataclass
class SampledTitle:
    """One drawn title: its index in ``trie.titles`` and the completion token ids (its EOS included)."""

    title_index: int
    token_ids: list[int]


def draw_token(logits: torch.Tensor, allowed: torch.Tensor, u: float, temperature: float, *,
               allow_non_finite: bool = False) -> int:
    """Index into ``allowed`` drawn from ``softmax(logits[allowed] / temperature)`` by inverse CDF at ``u``.

    >>> draw_token(torch.tensor([0.0, 5.0, 0.0]), torch.tensor([0, 2]), 0.6, 1.0)  # 50/50 between ids 0 and 2
    1

    Raises:
        ValueError: the allowed tokens' probabilities are not finite (a NaN or +inf logit among them, or all
            -inf): there is no distribution to draw from, and the inverse CDF would silently pick the last allowed
            token. With ``allow_non_finite`` that last token is returned instead, as a placeholder for a caller
            that discards the draw (see :func:`constrained_sample_from_state`).
    """
    p = torch.softmax(logits[allowed].double() / temperature, dim=-1)
    if not allow_non_finite and not bool(torch.isfinite(p).all()):
        raise ValueError(f"the next-token probabilities over the {len(allowed)} allowed tokens are not finite (a NaN "
                         "or +inf logit among them, or all -inf): nothing to draw from. This is usually a float16 "
                         "overflow: run the model in bfloat16 or float32 instead of float16")
    cdf = p.cumsum(0)
    return min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype) * cdf[-1]).item()), len(allowed) - 1)


def trie_nodes(trie: TitleTrie, token_ids: list[int]) -> list[int]:
    """The trie node each token of a title's completion is drawn at (the root for the first token): where
    :func:`constrained_token_logprobs` reads the tokens the sampler chose among.

    Raises:
        ValueError: if ``token_ids`` leaves the trie (not a completion of one of its titles).
    """
    nodes, node = [], 0
    for tok in token_ids:
        allowed, lo = _allowed(trie, node)
        hit = (allowed == tok).nonzero()
        if hit.numel() == 0:
            raise ValueError(f"token {tok} at position {len(nodes)} is not a continuation the title trie allows")
        nodes.append(node)
        node = int(trie.child_nodes[lo + int(hit[0])])
    return nodes


def constrained_token_logprobs(logits: torch.Tensor, ids: torch.Tensor, nodes: torch.Tensor, child_ptr: torch.Tensor,
                               child_tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of ``ids`` under the distribution :func:`draw_token` samples from: the softmax of
    ``logits / temperature`` over the tokens the trie allows at each position's node, in float32.

    Args:
        logits: ``[M, C, V]``; ``logits[m, t]`` is the next-token distribution for ``ids[m, t]``.
        ids: ``[M, C]`` the drawn tokens.
        nodes: ``[M, C]`` the trie node of each position (:func:`trie_nodes`); < 0 on padding, where the
            result is the full-vocabulary log-probability (callers mask those positions).
        child_ptr, child_tokens: the trie's CSR arrays (:class:`~llmrec.decoding.trie.TitleTrie`), on the logits'
            device.

    A position whose node allows one token has log-probability 0: the sampler had no choice there.
    Differentiable in ``logits``; the work is over the allowed tokens only, not ``[M, C, V]``.
    """
    x = logits.float() if temperature == 1.0 else logits.float() / temperature
    m, c, v = x.shape
    flat = x.reshape(m * c, v)
    chosen = flat.gather(1, ids.reshape(-1, 1)).squeeze(1)
    node = nodes.reshape(-1)
    on = node >= 0
    pos = on.nonzero().squeeze(1)
    start = child_ptr[node[on]]
    counts = child_ptr[node[on] + 1] - start
    seg = torch.repeat_interleave(pos, counts)  # the flat position of every allowed token
    offset = torch.arange(int(counts.sum()), device=x.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    vals = flat[seg, child_tokens[torch.repeat_interleave(start, counts) + offset]]
    # A log-sum-exp per position over its allowed tokens (the max taken out for stability, without gradient).
    peak = torch.full((m * c,), float("-inf"), device=x.device).scatter_reduce(0, seg, vals.detach(), "amax")
    peak = torch.where(on, peak, torch.zeros_like(peak))
    sums = torch.zeros(m * c, device=x.device).scatter_add(0, seg, torch.exp(vals - peak[seg]))
    lse_allowed = peak + torch.log(torch.where(on, sums, torch.ones_like(sums)))
    lse = torch.where(on, lse_allowed, torch.logsumexp(flat, dim=-1))
    return (chosen - lse).view(m, c)


def _allowed(trie: TitleTrie, node: int) -> tuple[torch.Tensor, int]:
    lo, hi = int(trie.child_ptr[node]), int(trie.child_ptr[node + 1])
    if hi == lo:
        raise ValueError(f"title trie node {node} has no continuation (a malformed trie)")
    return trie.child_tokens[lo:hi], lo


@torch.no_grad()
def constrained_sample_from_state(model, trie: TitleTrie, state: PromptState, uniforms: torch.Tensor,
                                  temperature: float = 1.0, *, allow_non_finite: bool = False) -> list[SampledTitle]:
    """One title per row of ``state``, drawn token by token under the trie's constraint.

    Args:
        model: the causal LM whose cache ``state`` holds (e.g. ``LatentReasoningLM.causal_lm``).
        trie: the catalogue's title trie (its paths end with EOS).
        state: the prefilled prompts (``LatentReasoningLM.prefill_with_latents`` gives its fields).
        uniforms: ``[R, D]`` uniforms in (0, 1), row ``r``'s draw of step ``t`` at ``[r, t]``; ``D`` at least the
            trie's depth (the longest title's token count).
        temperature: > 0; the allowed tokens' logits are divided by it before the softmax.
        allow_non_finite: a row whose logits are not finite (a NaN forward) still gets a title, drawn with the last
            allowed token at each such step, instead of failing the whole batch (:func:`draw_token` raises with
            False, the default). Generation-mode GRPO turns it on: it scores the drawn tokens under the same NaN
            logits and skips that group, while the batch's other prompts still train.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n_rows = state.next_token_logits.shape[0]
    depth = int(trie.depth.max())
    if uniforms.shape[0] != n_rows or uniforms.shape[1] < depth:
        raise ValueError(f"uniforms must be [{n_rows}, >= {depth}] (rows x the trie's depth), got {tuple(uniforms.shape)}")
    device = state.next_token_logits.device
    logits = state.next_token_logits.float()
    cache, attn = state.past_key_values, state.attention_mask.to(device=device, dtype=torch.long)
    pos = state.next_position_ids.to(device=device, dtype=torch.long)
    nodes, tokens, done = [0] * n_rows, [[] for _ in range(n_rows)], [False] * n_rows
    titles = [-1] * n_rows
    for step in range(depth):
        feed = torch.zeros(n_rows, dtype=torch.long)
        for r in range(n_rows):
            if done[r]:
                continue
            allowed, lo = _allowed(trie, nodes[r])
            j = draw_token(logits[r].cpu(), allowed, float(uniforms[r, step]), temperature,
                           allow_non_finite=allow_non_finite)
            feed[r] = allowed[j]
            tokens[r].append(int(allowed[j]))
            nodes[r] = int(trie.child_nodes[lo + j])
            if int(trie.terminal[nodes[r]]) >= 0:
                done[r], titles[r] = True, int(trie.terminal[nodes[r]])
        if all(done):
            break
        attn = torch.cat([attn, attn.new_ones((n_rows, 1))], dim=1)
        out = model(input_ids=feed[:, None].to(device), attention_mask=attn, position_ids=pos[:, None], use_cache=True,
                    **cache_kwargs(cache))
        cache, logits, pos = returned_cache(out), out.logits[:, -1, :].float(), pos + 1
    if not all(done):
        raise ValueError("a sampled title did not end within the trie's depth (a malformed trie)")
    return [SampledTitle(t, tok) for t, tok in zip(titles, tokens)]


@torch.no_grad()
def plain_constrained_sample(next_logits_fn, trie: TitleTrie, uniforms: torch.Tensor, temperature: float = 1.0
                             ) -> list[SampledTitle]:
    """The reference form: ``next_logits_fn(prefixes)`` gives ``[R, V]`` next-token logits for the completion
    prefixes drawn so far (recomputed from scratch each step); the same draws as
    :func:`constrained_sample_from_state`."""
    n_rows = uniforms.shape[0]
    out = []
    for r in range(n_rows):
        node, toks = 0, []
        for step in range(uniforms.shape[1]):
            allowed, lo = _allowed(trie, node)
            logits = next_logits_fn(r, toks)
            j = draw_token(logits, allowed, float(uniforms[r, step]), temperature)
            toks.append(int(allowed[j]))
            node = int(trie.child_nodes[lo + j])
            if int(trie.terminal[node]) >= 0:
                out.append(SampledTitle(int(trie.terminal[node]), toks))
                break
        else:
            raise ValueError("a sampled title did not end within the uniforms given")
    return out
