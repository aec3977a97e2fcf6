"""Constrained beam search over catalogue titles (D3 / BIGRec / LatentR3 style evaluation).

:func:`constrained_beam_search` ranks the titles of a :class:`~llmrec.decoding.trie.TitleTrie` for a
left-padded batch of prompts. It reproduces the semantics of transformers' beam search
(``generate(num_beams=B, num_return_sequences=B, early_stopping=True or False, do_sample=False,
length_penalty=lp, prefix_allowed_tokens_fn=...)``), but with its own loop:

* each prompt is prefilled once (``generate`` prefills every prompt ``B`` times);
* the beams' trie nodes are a tensor and their allowed continuations are gathered from the trie's CSR
  arrays, so there is no per-beam Python;
* only the live beams are forwarded: beams that finished, beams that fell off (fewer valid continuations
  than beams) and rows that are done are dropped from the batch and the KV cache;
* the beams of a prompt share its KV cache (:mod:`llmrec.decoding.shared_prompt`): one attention over the prompt
  per prompt, and only the generated positions are kept (and reordered) per beam, where the plain form copies
  every beam's whole cache at every step (``share_prompt_cache=False`` keeps that form, the reference).

Semantics matched (transformers 5.x ``GenerationMixin._beam_search``):

* step scores are ``log_softmax`` over the full vocabulary of the fp32 raw logits; disallowed tokens are
  ``-inf`` (what ``PrefixConstrainedLogitsProcessor`` does);
* at each step the top ``2B`` continuations of a row (over all its beams) are taken; those among the first
  ``B`` that end a title (emit EOS) become finished hypotheses, scored ``sum_logprobs / L**length_penalty``
  where ``L`` is the number of generated tokens *including* the EOS (transformers' ``cur_len + 1 -
  decoder_prompt_len``); the running beams of the next step are the first ``B`` of the ``2B`` that did not
  finish;
* a row keeps its ``B`` best finished hypotheses and stops accepting new ones once it holds ``B``
  (``early_stopping=True``, the default here), or when it has no running beam left. With
  ``early_stopping=False`` (``generate``'s own default, which the BIGRec / D3 / LatentR3 code ran) a full row
  goes on while its best running beam's score, normalised at its current length, beats its worst finished
  one, and a better title then replaces the worst. The search stops when every row is done.

The one deliberate difference is transformers' placeholder beams. It starts beams ``1..B-1`` as copies
of beam 0 at score ``-1e9``, and refills the running set with just-finished beams at a ``-1e9`` penalty
when fewer than ``B`` of the top ``2B`` continuations are unfinished. Such a beam copies a real one (or
extends a finished title), and if it reaches EOS among the first ``B`` candidates it is recorded as a
finished hypothesis with score about ``-1e9 / L**lp``. Such a hypothesis takes one of the row's ``B``
slots and can make the row "full" while real titles are still being decoded. That only happens while
a row has had fewer than ``B`` real continuations at every step (a catalogue smaller than the beam, or
one whose titles all share their first words), and there transformers returns fewer real titles than it
could. Here placeholder beams do not exist: a row returns only real titles with finite scores
(possibly fewer than ``B``), and otherwise the two searches coincide. The tests check this against
:func:`reference_constrained_beam_search`, which drops placeholder hypotheses from ``generate``'s output. One more
exception, at strongly negative length penalties (below about -8): a long title's normalised score (sum / L^lp) can
fall below the -1e9 that marks ``generate``'s empty finished slots, which then outrank it (and its early-stop check
can end a row that is not full); this search keeps ranking the real titles.

D3 guidance (optional, :mod:`llmrec.decoding.guidance`): with a :class:`TitleGuidance` of weight ``w``,
each candidate's step log-prob gains ``w * log(M(child) / M(node))`` (the ID model's item mass under the
trie nodes) before the top-``2B`` selection, as a ``LogitsProcessor`` would add it in ``generate``; the
returned scores therefore include ``w * log P_ID(title)`` (length-normalised with the rest). Without
guidance, or with ``w = 0``, the search is the unguided one bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llmrec.decoding.guidance import TitleGuidance
from llmrec.decoding.shared_prompt import SharedPrompt, supports_shared_prompt, use_shared_prompt_attention
from llmrec.decoding.trie import TitleTrie
from llmrec.models.kv_cache_naming import cache_kwargs, returned_cache

if TYPE_CHECKING:
    from transformers import Cache

__all__ = [
    "BeamSearchOutput",
    "MAX_ABS_LENGTH_PENALTY",
    "NonFiniteLogitsError",
    "PromptState",
    "check_length_penalty",
    "prefill_prompts",
    "constrained_beam_search",
    "constrained_beam_search_from_state",
    "reference_constrained_beam_search",
    "make_prefix_allowed_tokens_fn",
    "TrieGuidanceLogitsProcessor",
]


# Beyond |length_penalty| = 10 the normaliser ``L ** length_penalty`` stops being a length penalty: at 700 it
# overflows a float (an OverflowError once a title has two tokens), at -700 it turns every score into -inf (empty
# rankings). Within the bound scores stay finite for any title a catalogue holds (1,000 tokens: 1000 ** 10 = 1e30,
# far from float32's 3.4e38 either way); the papers use 0 (D3) and 1 (BIGRec, LatentR3).
MAX_ABS_LENGTH_PENALTY = 10.0


def check_length_penalty(value: float, name: str = "length_penalty") -> float:
    """``value`` as a float if it is a usable beam length penalty (finite, ``|value| <= 10``), else ValueError.

    >>> check_length_penalty(1)
    1.0
    """
    if isinstance(value, (bool, str)):  # float("1") and float(True) would pass for numbers
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):  # a NaN beam score would rank titles arbitrarily; inf makes every score -0.0
        raise ValueError(f"{name} must be a finite number, got {value}")
    if abs(value) > MAX_ABS_LENGTH_PENALTY:
        raise ValueError(f"{name} must be between {-MAX_ABS_LENGTH_PENALTY:g} and {MAX_ABS_LENGTH_PENALTY:g} (the "
                         "exponent of the title length dividing its log-prob: 1.0 as BIGRec/LatentR3, 0.0 as D3), "
                         f"got {value:g}")
    return value


class NonFiniteLogitsError(ValueError):
    """The model gave a live beam next-token logits whose log-sum-exp is NaN or infinite (see the search loop).

    Attributes:
        rows: the affected prompt rows (0-based rows of the searched batch).
        step: the decoding step (0 = the first completion token).
    """

    def __init__(self, rows: list[int], step: int, where: str = "prompt row(s) (0-based)"):
        self.rows, self.step = rows, step
        shown = ", ".join(map(str, rows[:10])) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
        super().__init__(
            f"the model's next-token logits are not finite (a NaN or +inf logit, or all -inf) for {where} {shown} "
            f"at decoding step {step}: their titles cannot be scored (each would be an empty ranking, counted as a "
            "miss). This is usually a float16 overflow: run the model in bfloat16 or float32 instead of float16")


@dataclass
class BeamSearchOutput:
    """Result of constrained beam search for one prompt.

    Attributes:
        hypotheses: ``(title_index, score)`` pairs, best first; ``score`` is the beam score
            (sum of token log-probs, EOS included, divided by ``length ** length_penalty``). Only real
            titles with finite scores; fewer than ``num_beams`` when the catalogue allows fewer.
        title_ranking: the title indices of ``hypotheses`` (indices into ``trie.titles``).
        item_ranking: ``title_ranking`` expanded to item ids (each title's items in ascending id order,
            no repeats); see :meth:`TitleTrie.items_for_titles`.
    """

    hypotheses: list[tuple[int, float]]
    title_ranking: list[int]
    item_ranking: list[int]

    @classmethod
    def from_hypotheses(cls, trie: TitleTrie, hypotheses: list[tuple[int, float]]) -> BeamSearchOutput:
        titles = [t for t, _ in hypotheses]
        return cls(hypotheses=hypotheses, title_ranking=titles, item_ranking=trie.items_for_titles(titles))


@dataclass
class PromptState:
    """Everything the search needs once the prompts have been consumed by the model.

    Build it with :func:`prefill_prompts`, or yourself when the prompt is not plain token ids (e.g. a
    latent "thought" appended via ``inputs_embeds`` on top of a prefilled cache). Row ``r`` of every field
    belongs to prompt ``r``.

    Attributes:
        next_token_logits: ``[R, V]`` logits predicting the first completion token.
        past_key_values: a transformers ``Cache`` (e.g. ``DynamicCache``) with ``R`` rows holding every
            position attended so far. The search reorders / shrinks it in place.
        attention_mask: ``[R, T]`` 0/1 mask over the cached positions (left padding = leading zeros).
        next_position_ids: ``[R]`` position id of the first completion token (for a left-padded row:
            number of real tokens so far).
    """

    next_token_logits: torch.Tensor
    past_key_values: Cache
    attention_mask: torch.Tensor
    next_position_ids: torch.Tensor


@torch.no_grad()
def prefill_prompts(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
) -> PromptState:
    """Run the prompts through ``model`` once and return the state to start decoding from.

    Args:
        model: a causal LM (transformers ``*ForCausalLM``, possibly PEFT-wrapped), in eval mode.
        input_ids: ``[R, P]`` left-padded prompt ids (or pass ``inputs_embeds`` ``[R, P, H]``).
        attention_mask: ``[R, P]``; defaults to all ones. Must be left-padded: the last column all ones.

    Position ids follow ``generate``: ``cumsum(mask) - 1`` (0 on padding), so a left-padded row gets the
    same positions as if it were alone.
    """
    from transformers import DynamicCache

    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    ref = input_ids if input_ids is not None else inputs_embeds
    device = ref.device
    if attention_mask is None:
        attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=device)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded (attention_mask[:, -1] must be all ones)")
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,  # only the last position's logits are needed; [R, P, V] could be huge
        **cache_kwargs(cache),
    )
    return PromptState(
        next_token_logits=out.logits[:, -1, :],
        past_key_values=returned_cache(out),
        attention_mask=attention_mask,
        next_position_ids=position_ids[:, -1] + 1,
    )


@torch.no_grad()
def constrained_beam_search(
    model,
    trie: TitleTrie,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_beams: int,
    length_penalty: float = 1.0,
    guidance: TitleGuidance | None = None,
    early_stopping: bool = True,
    share_prompt_cache: bool | None = None,
) -> list[BeamSearchOutput]:
    """Rank the trie's titles for each prompt of a left-padded batch by constrained beam search.

    Args:
        model: causal LM in eval mode (dropout would make the search non-deterministic).
        trie: the catalogue; its ``context_prefix`` should be what the prompts end with.
        input_ids, attention_mask: ``[R, P]`` left-padded prompts.
        num_beams: beam width ``B``; at most ``B`` titles are returned per prompt.
        length_penalty: exponent on the generated length (EOS included) dividing the summed log-probs;
            1.0 as in BIGRec / LatentR3, 0.0 (plain sum) as in D3; at most 10 in absolute value
            (:data:`MAX_ABS_LENGTH_PENALTY`).
        guidance: optional D3 guidance by an ID model (one row per prompt); see
            :mod:`llmrec.decoding.guidance`. ``None`` or weight 0 = the plain LM search.
        early_stopping: transformers' flag. True: a row stops once it holds ``B`` finished titles. False
            (``generate``'s default, so what the BIGRec / D3 / LatentR3 code ran): it goes on while its best
            running beam, normalised at its current length, beats its worst finished title, and better titles
            replace worse ones.
        share_prompt_cache: the beams of a prompt read one copy of its KV cache instead of each holding its own
            (:mod:`llmrec.decoding.shared_prompt`; same rankings, less copying). ``None``: whenever the
            architecture allows it; ``False``: one cache row per beam (the plain form).

    Returns:
        One :class:`BeamSearchOutput` per prompt.

    Raises:
        NonFiniteLogitsError: the model's logits for a live beam hold a NaN or +inf (or are all -inf), e.g. a
            float16 overflow; the search does not return the empty rankings those rows would get.
        ValueError: ``num_beams < 1``, a length penalty outside ``[-10, 10]``, or ``share_prompt_cache=True``
            for an architecture whose attention cannot read a shared cache.
    """
    if input_ids.shape[0] == 0:
        return []
    state = prefill_prompts(model, input_ids, attention_mask)
    return constrained_beam_search_from_state(
        model, trie, state, num_beams=num_beams, length_penalty=length_penalty, guidance=guidance,
        early_stopping=early_stopping, share_prompt_cache=share_prompt_cache,
    )


def _best(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest ``(values, columns)`` per row; equal values keep their column order (stable)."""
    values, columns = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], columns[:, :k]


@torch.no_grad()
def constrained_beam_search_from_state(
    model,
    trie: TitleTrie,
    state: PromptState,
    *,
    num_beams: int,
    length_penalty: float = 1.0,
    guidance: TitleGuidance | None = None,
    early_stopping: bool = True,
    share_prompt_cache: bool | None = None,
) -> list[BeamSearchOutput]:
    """Constrained beam search starting from a prefilled :class:`PromptState` (see the module docstring).

    ``state.past_key_values`` is consumed (reordered and shrunk in place). Returns one
    :class:`BeamSearchOutput` per row of the state. ``guidance`` (one row per state row) adds the ID
    model's ``w * log(M(child) / M(node))`` to each candidate's step log-prob. ``share_prompt_cache``: the
    beams of a prompt read one copy of its KV cache (:mod:`llmrec.decoding.shared_prompt`) instead of each
    carrying its own (see :func:`constrained_beam_search`). Raises as :func:`constrained_beam_search` does.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    length_penalty = check_length_penalty(length_penalty)
    logits = state.next_token_logits
    device = logits.device
    n_rows = logits.shape[0]
    if n_rows == 0:
        return []
    if guidance is not None and not guidance.active:
        guidance = None  # weight 0: exactly the unguided search
    if guidance is not None:
        if guidance.node_log_mass.shape != (n_rows, trie.num_nodes):
            raise ValueError(
                f"guidance.node_log_mass has shape {tuple(guidance.node_log_mass.shape)}, expected "
                f"({n_rows}, {trie.num_nodes}) (rows x trie nodes)"
            )
        guidance = guidance.to(device)
    beams = num_beams
    tt = trie.tensors_on(device)
    cache = state.past_key_values
    shared = None
    supported = supports_shared_prompt(model)
    if share_prompt_cache and not supported:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise ValueError(
            f"share_prompt_cache=True: model type {model_type!r} is not one whose "
            "attention can read a shared prompt cache (see llmrec.decoding.shared_prompt)"
        )
    if supported and share_prompt_cache is not False:
        from transformers import DynamicCache

        try:
            shared = SharedPrompt.from_cache(cache, state.attention_mask.to(device))
        except ValueError:
            if share_prompt_cache:
                raise
            # a prompt cache that does not hold every prompt position as one row per prompt: keep it per beam
        else:
            # The state's cache is consumed (as documented): drop its layers, so that a half-precision original does
            # not stay alive beside the fp32 copy for the whole search.
            if isinstance(getattr(cache, "layers", None), list):
                cache.layers.clear()
            cache = DynamicCache()  # per beam: the generated positions only

    # Live beams, kept sorted by row and, within a row, best first (the order transformers keeps its
    # running beams in, which decides the candidate order on exact ties). Beam i uses cache row i.
    live_row = torch.arange(n_rows, device=device)
    live_node = torch.zeros(n_rows, dtype=torch.long, device=device)  # all at the root
    live_score = torch.zeros(n_rows, dtype=torch.float32, device=device)
    attn = state.attention_mask.to(device=device, dtype=torch.long)
    next_pos = state.next_position_ids.to(device=device, dtype=torch.long)

    fin_score = torch.full((n_rows, beams), float("-inf"), dtype=torch.float32, device=device)
    fin_title = torch.full((n_rows, beams), -1, dtype=torch.long, device=device)
    row_done = torch.zeros(n_rows, dtype=torch.bool, device=device)  # takes no more titles, runs no more beams
    neg_inf = torch.tensor(float("-inf"), device=device)

    step = 0
    while True:
        # -- step log-probs of the allowed continuations only: logit - logsumexp (== log_softmax gathered)
        logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)
        # One NaN or +inf logit anywhere in a beam's vocabulary (a float16 overflow) makes its normaliser
        # non-finite, so every candidate of the beam would drop out as invalid and its row return no title:
        # counted as a miss, silently. Masked (-inf) logits are fine as long as one logit is finite. One
        # reduction and host sync per step, beside the ones the step already makes.
        if not bool(torch.isfinite(lse).all()):
            raise NonFiniteLogitsError(sorted(set(live_row[~torch.isfinite(lse)].tolist())), step)
        counts = tt.child_ptr[live_node + 1] - tt.child_ptr[live_node]
        beam_of_edge = torch.repeat_interleave(torch.arange(live_node.numel(), device=device), counts)
        n_edges = beam_of_edge.numel()
        edge_offset = torch.arange(n_edges, device=device) - torch.repeat_interleave(
            counts.cumsum(0) - counts, counts
        )
        edge = tt.child_ptr[live_node][beam_of_edge] + edge_offset
        tok = tt.child_tokens[edge]
        step_logp = logits[beam_of_edge, tok] - lse[beam_of_edge]
        if guidance is not None:
            step_logp = step_logp + guidance.step_bonus(
                live_row[beam_of_edge], live_node[beam_of_edge], tt.child_nodes[edge]
            )
        cand = live_score[beam_of_edge] + step_logp

        # -- lay each row's candidates out densely (beam-major, token ascending, as transformers'
        # flattened [beam * V + token] order) and take the top 2B per row.
        row_of_edge = live_row[beam_of_edge]
        row_counts = torch.bincount(row_of_edge, minlength=n_rows)
        pos_in_row = torch.arange(n_edges, device=device) - (row_counts.cumsum(0) - row_counts)[row_of_edge]
        width = max(int(row_counts.max()), 1)
        dense = torch.full((n_rows, width), float("-inf"), dtype=torch.float32, device=device)
        dense[row_of_edge, pos_in_row] = cand
        dense_edge = torch.full((n_rows, width), -1, dtype=torch.long, device=device)
        dense_edge[row_of_edge, pos_in_row] = torch.arange(n_edges, device=device)
        k = min(2 * beams, width)
        # A stable sort, not topk: topk's order of equal scores changes with the tensor's width (the batch's
        # largest candidate count), so tied titles would rank by their batch-mates.
        top_val, top_pos = _best(dense, k)
        top_edge = dense_edge.gather(1, top_pos)
        valid = (top_edge >= 0) & torch.isfinite(top_val)
        top_edge_safe = top_edge.clamp(min=0)
        child = tt.child_nodes[edge[top_edge_safe]]
        title_at = tt.terminal[child]
        is_fin = valid & (title_at >= 0)

        # -- finished hypotheses: only the first B of the 2B may be kept, and only while the row is not done;
        # score normalised by the generated length incl. EOS. The row keeps its B best.
        in_top_b = torch.arange(k, device=device) < beams
        take = is_fin & in_top_b[None, :] & ~row_done[:, None]
        norm = top_val / float(step + 1) ** length_penalty
        merged_score = torch.cat([fin_score, torch.where(take, norm, neg_inf)], dim=1)
        merged_title = torch.cat([fin_title, torch.where(take, title_at, -1)], dim=1)
        fin_score, keep_idx = _best(merged_score, beams)  # ties: earlier-finished first, then candidate order
        fin_title = merged_title.gather(1, keep_idx)
        row_full = (fin_title >= 0).all(dim=1)
        not_fin = valid & ~is_fin
        if early_stopping:
            row_done = row_full
        else:
            # transformers' heuristic (`_check_early_stop_heuristic`): a full row is done once its best running
            # beam, normalised at its current length (step + 1 tokens), no longer beats its worst finished title;
            # once done it stays done.
            best_running = torch.where(not_fin, top_val, neg_inf).max(dim=1).values
            can_improve = best_running / float(step + 1) ** length_penalty > fin_score.min(dim=1).values
            row_done = row_done | (row_full & ~can_improve)

        # -- running beams of the next step: the first B of the 2B that did not finish, in rows still open.
        keep = not_fin & ((not_fin.cumsum(dim=1) - 1) < beams) & ~row_done[:, None]
        sel_row, sel_k = keep.nonzero(as_tuple=True)  # row-major: rows sorted, best first within a row
        if sel_row.numel() == 0:
            break
        sel_edge = edge[top_edge[sel_row, sel_k]]
        src_beam = beam_of_edge[top_edge[sel_row, sel_k]]
        new_tok = tt.child_tokens[sel_edge]
        live_row = sel_row
        live_node = tt.child_nodes[sel_edge]
        live_score = top_val[sel_row, sel_k]

        # -- advance the model by one token for the surviving beams only.
        cache.reorder_cache(src_beam)
        pos = next_pos[src_beam]
        if shared is None:
            attn = torch.cat([attn[src_beam], attn.new_ones((src_beam.numel(), 1))], dim=1)
            out = model(
                input_ids=new_tok[:, None],
                attention_mask=attn,
                position_ids=pos[:, None],
                use_cache=True,
                **cache_kwargs(cache),
            )
        else:
            shared.set_beams(live_row)
            with use_shared_prompt_attention(model):
                out = model(
                    input_ids=new_tok[:, None], position_ids=pos[:, None], use_cache=True, shared_prompt=shared,
                    **cache_kwargs(cache),
                )
        cache = returned_cache(out)
        logits = out.logits[:, -1, :]
        next_pos = pos + 1
        step += 1

    fin_score_l = fin_score.tolist()
    fin_title_l = fin_title.tolist()
    results = []
    for r in range(n_rows):
        hyps = [
            (t, s) for t, s in zip(fin_title_l[r], fin_score_l[r], strict=True) if t >= 0 and s > float("-inf")
        ]
        results.append(BeamSearchOutput.from_hypotheses(trie, hyps))
    return results


# ---------------------------------------------------------------------------------------- reference

# Hypotheses whose unnormalised log-prob is below this are transformers' placeholder beams (started or
# re-entered at -1e9), not real titles.
_PLACEHOLDER_LOGPROB = -1e8


def make_prefix_allowed_tokens_fn(trie: TitleTrie, prompt_length: int) -> Callable[[int, torch.Tensor], list[int]]:
    """A ``prefix_allowed_tokens_fn`` over a plain nested-dict trie, as D3 / LatentR3 write it.

    Prefixes that are not in the trie, or that already ended with EOS, are only reached by transformers'
    placeholder beams (score <= -1e9). transformers 5 raises on an empty list, so they get one token that is
    not EOS: such a beam can then never "finish" before ``max_new_tokens`` and take a slot a real title
    could still fill (it would with ``[eos]``: the beam re-finishes at the next step with a score around
    ``-1e9 / L**lp``, which outranks the empty-slot placeholder ``-1e9``).
    """
    root: dict[int, dict] = {}
    for path in trie.title_token_ids:
        node = root
        for tok in path:
            node = node.setdefault(tok, {})
    fallback = [0 if trie.eos_token_id != 0 else 1]

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        node = root
        for tok in sent[prompt_length:].tolist():
            node = node.get(tok)
            if node is None:
                return fallback
        return list(node) if node else fallback

    return allowed


class TrieGuidanceLogitsProcessor:
    """D3 guidance as a transformers ``LogitsProcessor``, walking a plain nested-dict trie per beam (slow).

    transformers' beam search calls processors on the step log-probs (after ``log_softmax``, and after
    the ``PrefixConstrainedLogitsProcessor`` that ``prefix_allowed_tokens_fn`` adds), so adding
    ``w * log(M(child) / M(node))`` to each allowed token here is what :func:`constrained_beam_search_from_state`
    does with a :class:`TitleGuidance`. Beam ``j`` of ``generate``'s flat batch belongs to prompt
    ``j // num_beams``. Prefixes that are not in the trie (transformers' placeholder beams) are left as
    they are.
    """

    def __init__(self, trie: TitleTrie, guidance: TitleGuidance, prompt_length: int, num_beams: int):
        tokens, nodes, ptr = trie.child_tokens.tolist(), trie.child_nodes.tolist(), trie.child_ptr.tolist()

        def build(node: int) -> dict[int, tuple[int, dict]]:
            return {tokens[e]: (nodes[e], build(nodes[e])) for e in range(ptr[node], ptr[node + 1])}

        self.root: dict[int, tuple[int, dict]] = build(0)  # token -> (child node, its children)
        self.log_mass = guidance.node_log_mass.float().cpu()
        self.weight = guidance.weight
        self.prompt_length = prompt_length
        self.num_beams = num_beams

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bonus = torch.zeros_like(scores)
        for j, sent in enumerate(input_ids[:, self.prompt_length:].tolist()):
            row = j // self.num_beams
            node, children = 0, self.root
            for tok in sent:
                if tok not in children:
                    children = None
                    break
                node, children = children[tok]
            if not children:
                continue
            toks = list(children)
            kids = torch.tensor([children[t][0] for t in toks])
            step = self.weight * (self.log_mass[row, kids] - self.log_mass[row, node])
            step = step.masked_fill(step.isnan(), float("-inf"))  # a placeholder beam at a zero-mass node
            bonus[j, toks] = step.to(bonus.device, bonus.dtype)
        return scores + bonus


@torch.no_grad()
def reference_constrained_beam_search(
    model,
    trie: TitleTrie,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_beams: int,
    length_penalty: float = 1.0,
    guidance: TitleGuidance | None = None,
    early_stopping: bool = True,
) -> list[BeamSearchOutput]:
    """The same search done by transformers' ``generate`` with ``prefix_allowed_tokens_fn`` (slow).

    Uses a complete ``GenerationConfig`` (greedy beam search, the given ``early_stopping``,
    ``num_return_sequences=num_beams``, neutral penalties) and temporarily blanks
    ``model.generation_config`` so none of the checkpoint's generation defaults leak in. Returned
    sequences are mapped back to title indices; placeholder beams (score ``<= -1e9`` before length
    normalisation, or not a complete title) and repeated titles are dropped. ``guidance`` (weight > 0)
    is applied by a :class:`TrieGuidanceLogitsProcessor`.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if trie.eos_token_id is None:
        raise ValueError("the reference search needs a trie built with add_eos=True")
    if num_beams < 2:
        raise ValueError("num_beams must be >= 2: with num_beams=1 generate() runs greedy decoding instead")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompt_length = input_ids.shape[1]
    pad = getattr(model.config, "pad_token_id", None)
    gen_config = GenerationConfig(
        do_sample=False,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        early_stopping=early_stopping,
        length_penalty=float(length_penalty),
        max_new_tokens=trie.max_depth,
        min_new_tokens=0,
        # Sampling warpers are never applied with do_sample=False; neutral values anyway (top_k is left
        # unset: any explicit value triggers a "flag ignored" warning).
        temperature=1.0,
        top_p=1.0,
        typical_p=1.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        renormalize_logits=False,
        remove_invalid_values=False,
        eos_token_id=trie.eos_token_id,
        pad_token_id=pad if pad is not None else trie.eos_token_id,
        use_cache=True,
        output_scores=True,
        return_dict_in_generate=True,
    )
    processors = LogitsProcessorList()
    if guidance is not None and guidance.active:
        processors.append(TrieGuidanceLogitsProcessor(trie, guidance, prompt_length, num_beams))
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=gen_config,
            prefix_allowed_tokens_fn=make_prefix_allowed_tokens_fn(trie, prompt_length),
            logits_processor=processors,
        )
    finally:
        model.generation_config = saved

    path_to_title = {tuple(p): i for i, p in enumerate(trie.title_token_ids)}
    seqs = out.sequences[:, prompt_length:].tolist()
    scores = out.sequences_scores.tolist()
    results = []
    for r in range(input_ids.shape[0]):
        hyps: list[tuple[int, float]] = []
        seen: set[int] = set()
        for j in range(r * num_beams, (r + 1) * num_beams):
            gen = seqs[j]
            title = None
            for n in range(1, min(len(gen), trie.max_depth) + 1):
                title = path_to_title.get(tuple(gen[:n]))
                if title is not None:
                    break
            if title is None or title in seen:
                continue
            length = len(trie.title_token_ids[title])
            raw = scores[j] * length**length_penalty
            if not raw > _PLACEHOLDER_LOGPROB:
                continue
            seen.add(title)
            hyps.append((title, scores[j]))
        results.append(BeamSearchOutput.from_hypotheses(trie, hyps))
    return results
