"""Optimised code paths against plain reference forms, in value AND gradients (or full rankings).

* ReaRec sequence-mode training: the block-mask batched prefix reasoning (one encoded sequence, the reasoning
  tokens of all prefixes together, a KV cache, fused losses) against each prefix encoded alone, unpadded, and
  reasoned by re-encoding it with its reasoning tokens (no cache, no block mask), with plain ``F.cross_entropy``
  (annealed temperatures) / ``_erl_loss_reference``: loss and every parameter's gradient.
* BIGRec (N = 0): ``LatentReasoningLM._forward_plain`` (decoder + LM head on the completion positions only)
  against the plain transformers forward with labels: loss, logits and every gradient, base weights included.
* Latent evaluation: prefill with latents + constrained beam search over a catalogue smaller than the beam
  (so the search is exhaustive) against every title scored by teacher forcing through ``forward_naive``.

float64 wherever the code allows it, so the tolerances are tight; each comparison was checked to fail on a
deliberately broken copy of the optimised path.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from test_latent import KINDS, _batch, _grads, _wrapper

from llmrec.decoding.beam_search import PromptState, constrained_beam_search_from_state
from llmrec.decoding.trie import TitleTrie
from llmrec.models.latent import IGNORE_INDEX, build_naive_inputs, padding_position_ids
from llmrec.seqrec.models import LossContext, ReaRec
from llmrec.seqrec.modules import Backbone


def _worst_grad_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest ``max|got - want| / max|want|`` over the parameters, and the parameter it is found at."""
    assert got.keys() == want.keys(), got.keys() ^ want.keys()
    worst, at = 0.0, ""
    for name, w in want.items():
        scale = w.abs().max().item()
        assert scale > 0, f"zero gradient for {name}: the comparison would be vacuous"
        rel = (got[name] - w).abs().max().item() / scale
        if rel >= worst:
            worst, at = rel, name
    return worst, at


# ------------------------------------------------------------------------- ReaRec batched prefix reasoning

N_ITEMS, SEQ_LEN = 40, 7


def _rearec(mode: str, K: int, temperature: float, seed: int, **kw) -> ReaRec:
    torch.manual_seed(seed)
    bb = Backbone(N_ITEMS, SEQ_LEN, hidden=16, n_layers=2, heads=2, inner=32, dropout=0.0, attn_dropout=0.0,
                  temperature=temperature)
    model = ReaRec(bb, mode=mode, reason_steps=K, kl_weight=0.5, kl_cap=0.0, pta_alpha=2.0, **kw)
    model = model.double().train()
    with torch.no_grad():  # the init's std 0.02 gives near-uniform softmaxes and near-equal reasoning steps
        model.backbone.item_emb.weight[1:].normal_(0.0, 0.5)
        model.rpe.weight.normal_(0.0, 1.0)
    return model


def _sequence_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and next-item targets at every position (sequence mode), left padding of 0..6 columns."""
    g = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(1, N_ITEMS + 1, (4, SEQ_LEN), generator=g)
    tgt = torch.randint(1, N_ITEMS + 1, (4, SEQ_LEN), generator=g)
    for b, pad in enumerate((0, 2, 4, 6)):
        ids[b, :pad] = 0
        tgt[b, :pad] = 0
    tgt[1, 3] = 0  # a real position without a loss
    return ids, tgt


def _plain_reasoning_states(model: ReaRec, items: torch.Tensor) -> torch.Tensor:
    """``[K+1, d]`` states of one unpadded prefix ``items [1, n]`` without a KV cache or a block mask: step k
    re-encodes the items and the k reasoning tokens so far as one plain causal sequence, reads the last."""
    bb = model.backbone
    x_items = bb.embed(items)
    states, tokens = [], []
    for k in range(model.K + 1):
        if k:
            tokens.append(bb.input_norm(states[-1] + model.rpe.weight[k - 1]))
        x = torch.cat([x_items, *(t[:, None] for t in tokens)], 1)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()[None, None]
        out, _ = bb.encoder(x, causal)
        states.append(out[:, -1])
    return torch.cat(states)


def _rearec_plain_loss(model: ReaRec, ids: torch.Tensor, tgt: torch.Tensor, denom: float) -> torch.Tensor:
    """Each loss position's prefix encoded alone (no padding) and reasoned plainly; plain losses."""
    states, targets = [], []
    for b in range(ids.shape[0]):
        for p in range(ids.shape[1]):
            if tgt[b, p] == 0:
                continue
            items = ids[b, : p + 1][ids[b, : p + 1] > 0]
            states.append(_plain_reasoning_states(model, items[None]))
            targets.append(int(tgt[b, p]))
    Rm, t = torch.stack(states), torch.tensor(targets)
    bb = model.backbone
    if model.mode == "erl":
        return model._erl_loss_reference(Rm, t, denom)[0]
    loss = F.cross_entropy(bb.item_logits(Rm[:, -1]), t - 1, reduction="sum") / denom
    K, tau = model.K, bb.temperature
    pta = sum(
        F.cross_entropy(bb.item_logits(Rm[:, k], tau * model.pta_alpha ** (K - k)), t - 1, reduction="sum")
        for k in range(K)
    ) / K
    return loss + model.pl_weight * pta / denom


def _loss_and_grads(model: ReaRec, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("temperature", [1.0, 0.5], ids=["t1", "t0.5"])
@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("mode", ["erl", "prl"])
def test_rearec_batched_prefix_training_loss_and_grads_equal_per_prefix_plain_form(mode, K, temperature):
    """Extends test_batched_prefix_reasoning_equals_per_prefix_forwards (forward values) to the training loss
    and the gradient of every parameter; the plain form shares no reasoning code with ``ReaRec.reason``, so a
    gradient lost in its KV cache shows too. PRL runs without its noisy view: once before the warm-up ends
    (epoch 0 < warmup_epochs) and once past it with cl_weight 0; both must equal the same plain form."""
    seed = 10 * K + int(temperature == 0.5)
    model = _rearec(mode, K, temperature, seed, warmup_epochs=2)
    ids, tgt = _sequence_batch(seed)
    assert tgt[:, :-1].any() and (ids == 0).any()  # sequence mode, left padding
    denom = float((tgt > 0).sum())
    batch = {"input_ids": ids, "target_ids": tgt}

    want, want_grads = _loss_and_grads(model, lambda: _rearec_plain_loss(model, ids, tgt, denom))
    assert want_grads.keys() == {n for n, _ in model.named_parameters()}  # every parameter is compared

    contexts = [LossContext(denom=torch.tensor(denom), epoch=0)]
    if mode == "prl":
        contexts.append(LossContext(denom=torch.tensor(denom), epoch=5))
    for i, ctx in enumerate(contexts):
        model.cl_weight = 1.0 if i == 0 else 0.0
        logs = {}

        def fast(ctx=ctx, logs=logs):
            loss, out = model.loss(batch, ctx)
            logs.update(out)
            return loss

        got, got_grads = _loss_and_grads(model, fast)
        assert "rcl" not in logs  # no noisy view: the plain form has none
        if mode == "erl":
            assert logs["kl"] > 0.1  # the diversity term is not negligible
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        worst, at = _worst_grad_diff(got_grads, want_grads)
        assert worst < 1e-11, f"epoch {ctx.epoch}: gradient of {at} off by {worst:.2e} (relative to its max)"


# ----------------------------------------------------------------------------------- BIGRec N = 0 path


@pytest.mark.parametrize("kind", KINDS)
def test_bigrec_plain_path_grads_equal_hf_forward_grads(kind):
    """N = 0: ``_forward_plain`` (LM head on the completion positions only) vs the plain HF forward with
    labels. Random non-zero LoRA A and B, and the base weights trainable too (embeddings tied to the LM head,
    norms, MLPs), so a gradient lost or doubled anywhere in the optimised path shows."""
    w, tok = _wrapper(kind, 0, lora=True)
    w.double().train()
    for prm in w.parameters():
        prm.requires_grad_(True)
    p, pm, c, cm = _batch(tok)

    out = w.loss(p, pm, c, cm)
    out.loss.backward()
    g_fast = _grads(w)

    ids, mask = torch.cat([p, c], 1), torch.cat([pm, cm], 1)
    labels = torch.cat([torch.full_like(p, IGNORE_INDEX), c.masked_fill(cm == 0, IGNORE_INDEX)], 1)
    ref = w.model(input_ids=ids, attention_mask=mask, position_ids=padding_position_ids(mask), labels=labels)
    ref.loss.backward()
    g_ref = _grads(w)

    assert g_fast.keys() == {n for n, _ in w.named_parameters()}
    assert any("lora_A" in k for k in g_fast) and any("lora_B" in k for k in g_fast)
    assert any("embed_tokens" in k for k in g_fast)
    keep = out.labels != IGNORE_INDEX
    torch.testing.assert_close(out.logits[keep], ref.logits[:, p.shape[1] - 1 : -1][keep], rtol=0, atol=1e-12)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)  # both losses softmax in float32
    worst, at = _worst_grad_diff(g_fast, g_ref)
    assert worst < 1e-12, f"gradient of {at} off by {worst:.2e} (relative to its max)"


# ------------------------------------------------------------------- latent prefill + beam search

PREFIX = "### Response: \n"
PROMPTS = [
    "Below is an instruction. ### Response: \n",
    'The user has played: "Anno 2070", "Halo", "Kirby" ### Response: \n',
    "x ### Response: \n",
]
TITLE_WORDS = "Super Mario Zelda Halo Tetris Sonic Kirby Gold Deluxe Edition Dark Souls 2 3".split()
SCORE_RTOL = 1e-6  # the search sums float32 log-probs of the float64 model's logits (seen: <= 1.4e-7)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_latent_beam_search_equals_ranking_every_title_by_naive_teacher_forcing(kind, n):
    """What ``evaluate`` runs for a latent checkpoint (``prefill_with_latents`` -> ``PromptState`` ->
    ``constrained_beam_search_from_state``) on left-padded prompts, with a catalogue smaller than the beam:
    the ranked list and the scores equal every title scored alone by teacher forcing through the naive
    N+1-pass form on the unpadded prompt, ``sum log p / len**length_penalty``, for length_penalty 1 and 0."""
    w, tok = _wrapper(kind, n)
    torch.manual_seed(7)
    with torch.no_grad():  # a non-trivial pooling head: the latents matter
        for prm in w.latent_head.parameters():
            prm.add_(torch.randn_like(prm) * 0.2)
    w.double().eval()
    rng = random.Random(n)
    titles = list(dict.fromkeys(
        " ".join(rng.choice(TITLE_WORDS) for _ in range(rng.randint(1, 3))) for _ in range(9)
    ))
    trie = TitleTrie(tok, titles, list(range(1, len(titles) + 1)), context_prefix=PREFIX)
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()

    # Plain form: the summed teacher-forced log-prob of each title path (EOS included), per prompt.
    plain = []
    for r in range(len(PROMPTS)):
        prompt = enc.input_ids[r : r + 1][:, enc.attention_mask[r].bool()]
        row = []
        for path in trie.title_token_ids:
            comp = torch.tensor([path])
            x, am, lab = build_naive_inputs(prompt, torch.ones_like(prompt), comp, torch.ones_like(comp),
                                            w.config.latent_token_ids, tok.pad_token_id)
            with torch.no_grad():
                out = w.forward_naive(x, am, lab)
            keep = out.labels != IGNORE_INDEX
            assert int(keep.sum()) == len(path)
            row.append(out.logits[keep].log_softmax(-1).gather(1, out.labels[keep][:, None]).sum().item())
        plain.append(row)

    for lp in (1.0, 0.0):
        with torch.no_grad():
            cache, logits, mask, pos = w.prefill_with_latents(enc.input_ids, enc.attention_mask)
        outs = constrained_beam_search_from_state(w.causal_lm, trie, PromptState(logits.float(), cache, mask, pos),
                                                  num_beams=len(titles) + 2, length_penalty=lp)
        assert len(outs) == len(PROMPTS)
        for r, o in enumerate(outs):
            want = {t: s / len(path) ** lp for t, (s, path) in enumerate(zip(plain[r], trie.title_token_ids))}
            order = sorted(want, key=lambda t: -want[t])
            tol = {t: SCORE_RTOL * max(1.0, abs(s)) for t, s in want.items()}
            assert all(want[a] - want[b] > tol[a] + tol[b] for a, b in zip(order, order[1:])), (
                "near-tied titles: their expected order would be fragile; change the catalogue")
            assert o.title_ranking == order, (kind, n, lp, r)  # every title, in the plain order
            for t, s in o.hypotheses:
                assert abs(s - want[t]) <= tol[t], (kind, n, lp, r, t, s, want[t])
