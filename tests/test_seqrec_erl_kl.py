"""ReaRec-ERL's diversity term: the one-pass closed form equals the double loop over step pairs."""

from __future__ import annotations

import pytest
import torch

from llmrec.seqrec.models import LossContext, ReaRec
from llmrec.seqrec.modules import Backbone


def _model(
    K: int, seed: int, dtype: torch.dtype, kl_cap: float = 0.0, temperature: float = 1.0, n_items: int = 40
):
    torch.manual_seed(seed)
    bb = Backbone(
        n_items,
        6,
        hidden=16,
        n_layers=1,
        heads=2,
        inner=32,
        dropout=0.0,
        attn_dropout=0.0,
        temperature=temperature,
    )
    model = ReaRec(bb, mode="erl", reason_steps=K, kl_cap=kl_cap).to(dtype)
    with torch.no_grad():  # init std 0.02 gives near-uniform softmaxes (KL ~ 1e-5); spread them out
        model.backbone.item_emb.weight.normal_(0.0, 0.5)
    return model


def _value_and_grads(model: ReaRec, Rm: torch.Tensor, w: torch.Tensor, reference: bool):
    """kl per row and the gradients of ``<w, kl>`` w.r.t. the states and the item table."""
    R = Rm.clone().requires_grad_(True)
    emb = model.backbone.item_emb.weight
    emb.grad = None
    kl = (model._erl_diversity_reference if reference else model._erl_diversity)(R)
    (kl * w).sum().backward()
    return kl.detach(), R.grad, emb.grad.clone()


def _inputs(K: int, seed: int, dtype: torch.dtype, M: int = 9, d: int = 16):
    g = torch.Generator().manual_seed(1000 + seed)
    Rm = torch.randn(M, K + 1, d, generator=g, dtype=dtype)
    w = torch.randn(M, generator=g, dtype=dtype)  # distinct upstream gradient per row
    return Rm, w


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("temperature", [1.0, 0.4], ids=["t1", "t0.4"])
def test_erl_diversity_closed_form_equals_pairwise_loop(K, seed, dtype, tol, temperature):
    model = _model(K, seed, dtype, temperature=temperature)
    Rm, w = _inputs(K, seed, dtype)
    kl, gR, gE = _value_and_grads(model, Rm, w, reference=False)
    kl_ref, gR_ref, gE_ref = _value_and_grads(model, Rm, w, reference=True)
    assert kl.dtype == dtype and kl.shape == (Rm.shape[0],)
    # a real (not near-zero) diversity and gradient, so the comparison means something
    assert kl.min() > 1e-2 and gR_ref.abs().max() > 1e-3
    for a, b in ((kl, kl_ref), (gR, gR_ref), (gE, gE_ref)):
        assert torch.allclose(a, b, rtol=tol, atol=tol * b.abs().max()), (a - b).abs().max()


@pytest.mark.parametrize("K", [1, 2, 3])
def test_erl_diversity_cap_is_applied_identically(K):
    dtype = torch.float64
    probe = _model(K, 7, dtype)
    Rm, w = _inputs(K, 7, dtype)
    with torch.no_grad():
        v = probe._erl_diversity(Rm).sort().values
    cap = float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2  # between two rows: some capped, some not
    model = _model(K, 7, dtype, kl_cap=cap)
    kl, gR, gE = _value_and_grads(model, Rm, w, reference=False)
    kl_ref, gR_ref, gE_ref = _value_and_grads(model, Rm, w, reference=True)
    capped = kl_ref >= cap
    assert 0 < int(capped.sum()) < len(kl)
    assert torch.all(kl <= cap) and torch.all(gR[capped] == 0)  # no gradient above the cap
    for a, b in ((kl, kl_ref), (gR, gR_ref), (gE, gE_ref)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6 * b.abs().max()), (a - b).abs().max()


def test_erl_loss_gradients_match_the_pairwise_loop_end_to_end():
    """The whole ERL training loss (sequence mode) with the closed form vs with the loop form."""
    model = _model(2, 3, torch.float64).train()  # no cap: every row's KL gradient counts
    model.kl_weight = 0.5
    with torch.no_grad():  # distinct reasoning tokens -> distinct step distributions
        model.rpe.weight.normal_(0.0, 2.0)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 41, (4, 6), generator=g)
    ids[0, :2] = 0  # left padding
    tgt = torch.randint(1, 41, (4, 6), generator=g)
    tgt[0, :2] = 0
    batch = {"input_ids": ids, "target_ids": tgt}
    ctx = LossContext(denom=float((tgt > 0).sum()))

    def run():
        model.zero_grad(set_to_none=True)
        loss, logs = model.loss(batch, ctx)
        loss.backward()
        return loss.detach(), logs, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, logs, grads = run()
    model._erl_diversity = model._erl_diversity_reference  # instance attribute shadows the method
    loss_ref, logs_ref, grads_ref = run()
    assert logs["kl"] > 1e-2 and logs["kl"] == pytest.approx(logs_ref["kl"], rel=1e-9)
    assert torch.allclose(loss, loss_ref, rtol=1e-9)
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        assert torch.allclose(grads[n], grads_ref[n], rtol=1e-7, atol=1e-10), n
