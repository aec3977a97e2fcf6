"""The fused chunked losses (llmrec.seqrec.fused_losses) equal their plain autograd forms in value and gradients:
the full-softmax cross-entropy of every ID model, and ReaRec-ERL's loss (CE of the mean state and a double loop of
pairwise KLs); and every model's training loss matches the plain form end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmrec.seqrec.fused_losses import fused_ce_sum, fused_erl_loss
from llmrec.seqrec.models import LossContext, ReaRec
from llmrec.seqrec.modules import Backbone


def _model(
    K: int, seed: int, dtype: torch.dtype, kl_cap: float = 0.0, temperature: float = 1.0, n_items: int = 40,
    kl_weight: float = 0.5,
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
    model = ReaRec(bb, mode="erl", reason_steps=K, kl_cap=kl_cap, kl_weight=kl_weight).to(dtype)
    with torch.no_grad():  # init std 0.02 gives near-uniform softmaxes (KL ~ 1e-5); spread them out
        model.backbone.item_emb.weight.normal_(0.0, 0.5)
    return model


def _inputs(K: int, seed: int, dtype: torch.dtype, M: int = 9, d: int = 16, n_items: int = 40):
    g = torch.Generator().manual_seed(1000 + seed)
    Rm = torch.randn(M, K + 1, d, generator=g, dtype=dtype)
    targets = torch.randint(1, n_items + 1, (M,), generator=g)
    return Rm, targets


def _value_and_grads(model: ReaRec, Rm: torch.Tensor, targets: torch.Tensor, reference: bool, chunk: int | None = None):
    R = Rm.clone().requires_grad_(True)
    emb = model.backbone.item_emb.weight
    emb.grad = None
    if reference:
        loss, ce, kl = model._erl_loss_reference(R, targets, 7.0)
    else:
        bb = model.backbone
        loss, ce, kl = fused_erl_loss(R, emb[1:], targets - 1, bb.temperature, model.kl_weight, model.kl_cap, 7.0,
                                      chunk_elements=chunk)
    (loss * 1.3).backward()  # a non-unit upstream gradient
    return loss.detach(), ce, kl, R.grad, emb.grad.clone()


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("temperature", [1.0, 0.4], ids=["t1", "t0.4"])
@pytest.mark.parametrize("chunk", [None, 1, 200], ids=["one-chunk", "row-chunks", "uneven-chunks"])
def test_fused_erl_loss_equals_the_plain_form(K, seed, dtype, tol, temperature, chunk):
    model = _model(K, seed, dtype, temperature=temperature)
    Rm, targets = _inputs(K, seed, dtype)
    got = _value_and_grads(model, Rm, targets, reference=False, chunk=chunk)
    want = _value_and_grads(model, Rm, targets, reference=True)
    loss, ce, kl, gR, gE = got
    assert loss.dtype == dtype and kl.shape == (Rm.shape[0],)
    # a real (not near-zero) diversity and gradient, so the comparison means something
    assert want[2].min() > 1e-2 and want[3].abs().max() > 1e-3
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=tol, atol=tol * b.abs().max()), (a - b).abs().max()
    assert gE[0].abs().max() == 0  # the padding row gets no gradient


@pytest.mark.parametrize("K", [1, 2, 3])
def test_fused_erl_loss_applies_the_cap_identically(K):
    dtype = torch.float64
    probe = _model(K, 7, dtype)
    Rm, targets = _inputs(K, 7, dtype)
    with torch.no_grad():
        v = probe._erl_diversity_reference(Rm).sort().values
    cap = float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2  # between two rows: some capped, some not
    model = _model(K, 7, dtype, kl_cap=cap)
    got = _value_and_grads(model, Rm, targets, reference=False, chunk=50)
    want = _value_and_grads(model, Rm, targets, reference=True)
    capped = want[2] >= cap
    assert 0 < int(capped.sum()) < len(capped)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * b.abs().max()), (a - b).abs().max()
    # capped rows get the CE gradient only: with kl_weight 0 their state gradients are the same
    ce_only = _value_and_grads(_model(K, 7, dtype, kl_cap=cap, kl_weight=0.0), Rm, targets, reference=True)
    assert torch.allclose(got[3][capped], ce_only[3][capped], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(got[3][~capped], ce_only[3][~capped])


def test_fused_erl_loss_refuses_a_single_step():
    with pytest.raises(ValueError, match="K >= 1"):
        fused_erl_loss(torch.zeros(3, 1, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long), 1.0, 0.1, 0.0, 3.0)


def test_erl_training_loss_matches_the_plain_form_end_to_end():
    """The whole ERL training loss (sequence mode) with the fused pass vs the plain form: all parameters' grads."""
    model = _model(2, 3, torch.float64).train()  # no cap: every row's KL gradient counts
    with torch.no_grad():  # distinct reasoning tokens -> distinct step distributions
        model.rpe.weight.normal_(0.0, 2.0)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 41, (4, 6), generator=g)
    ids[0, :2] = 0  # left padding
    tgt = torch.randint(1, 41, (4, 6), generator=g)
    tgt[0, :2] = 0
    batch = {"input_ids": ids, "target_ids": tgt}
    ctx = LossContext(denom=torch.tensor(float((tgt > 0).sum())))

    def run():
        model.zero_grad(set_to_none=True)
        loss, logs = model.loss(batch, ctx)
        loss.backward()
        return loss.detach(), logs, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, logs, grads = run()
    model._erl_loss = model._erl_loss_reference  # instance attribute shadows the method
    loss_ref, logs_ref, grads_ref = run()
    assert logs["kl"] > 1e-2 and logs["kl"] == pytest.approx(logs_ref["kl"], rel=1e-9)
    assert logs["ce"] == pytest.approx(logs_ref["ce"], rel=1e-9)
    assert torch.allclose(loss, loss_ref, rtol=1e-9)
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        assert torch.allclose(grads[n], grads_ref[n], rtol=1e-7, atol=1e-10), n


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("temperature", [1.0, 0.3], ids=["t1", "t0.3"])
@pytest.mark.parametrize("chunk", [None, 1, 130], ids=["one-chunk", "row-chunks", "uneven-chunks"])
def test_fused_ce_sum_equals_cross_entropy(dtype, tol, temperature, chunk):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(11, 8, generator=g, dtype=dtype).requires_grad_(True)
    E = torch.randn(40, 8, generator=g, dtype=dtype).requires_grad_(True)
    targets = torch.randint(0, 40, (11,), generator=g)
    got = fused_ce_sum(h, E, targets, temperature, chunk_elements=chunk)
    gh, gE = torch.autograd.grad(got * 0.7, (h, E))
    want = F.cross_entropy(h @ E.T / temperature, targets, reduction="sum")
    wh, wE = torch.autograd.grad(want * 0.7, (h, E))
    assert got.dtype == dtype and torch.allclose(got, want, rtol=tol)
    for a, b in ((gh, wh), (gE, wE)):
        assert torch.allclose(a, b, rtol=tol, atol=tol * b.abs().max()), (a - b).abs().max()
    with torch.no_grad():  # evaluation: the value only
        assert torch.allclose(fused_ce_sum(h, E, targets, temperature, chunk_elements=chunk), want, rtol=tol)
    with pytest.raises(ValueError, match=r"\[M, d\]"):
        fused_ce_sum(h[None], E, targets)


@pytest.mark.parametrize("name", ["sasrec", "rearec-erl", "rearec-prl", "lares"])
def test_training_losses_match_plain_cross_entropy_end_to_end(name, monkeypatch):
    """Each model's training loss (dropout off, fixed epoch past PRL's warm-up) with the fused CE vs with the plain
    F.cross_entropy over the full logits: same loss, same gradients for every parameter."""
    from llmrec.seqrec import models as M
    from llmrec.seqrec.config import SeqRecConfig

    cfg = SeqRecConfig(model=name, dataset_dir="unused", output_dir="unused", max_history=6, hidden_size=16,
                       n_heads=2, inner_size=32, dropout=0.0, attn_dropout=0.0, mean_recurrence=2,
                       depth_sampling="constant")
    torch.manual_seed(0)
    model = M.build_model(cfg, 40).double().train()
    with torch.no_grad():
        model.backbone.item_emb.weight.normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 41, (4, 6), generator=g)
    ids[0, :2] = 0
    tgt = torch.randint(1, 41, (4, 6), generator=g)
    tgt[0, :2] = 0
    batch = {"input_ids": ids, "target_ids": tgt, "row_index": torch.arange(4)}
    ctx = M.LossContext(denom=torch.tensor(float((tgt > 0).sum())), epoch=5)

    def run():
        torch.manual_seed(1)  # any sampling inside the loss draws the same numbers in both runs
        model.zero_grad(set_to_none=True)
        loss, _ = model.loss(batch, ctx)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = run()

    def plain_ce_sum(self, h, targets, temperature=None):
        return F.cross_entropy(self.backbone.item_logits(h, temperature), targets - 1, reduction="sum")

    monkeypatch.setattr(M.SeqRecModel, "ce_sum", plain_ce_sum)
    if name == "rearec-erl":
        model._erl_loss = model._erl_loss_reference
    loss_ref, grads_ref = run()
    assert torch.allclose(loss, loss_ref, rtol=1e-9)
    assert grads and grads.keys() == grads_ref.keys()
    for n in grads:
        assert torch.allclose(grads[n], grads_ref[n], rtol=1e-7, atol=1e-10), n


@pytest.mark.parametrize("name", ["sasrec", "rearec-erl"])
def test_fused_losses_compute_in_float32_under_bf16_autocast(name):
    """Under bf16 autocast (``--mixed_precision bf16``) the fused losses upcast as autocast does for
    F.cross_entropy: the loss is float32, equal to the plain float32 form on the same bf16 states, and every
    parameter gets a gradient in its own dtype (ERL used to crash here mixing bf16 and float32 matmuls)."""
    from llmrec.seqrec import models as M
    from llmrec.seqrec.config import SeqRecConfig

    cfg = SeqRecConfig(model=name, dataset_dir="unused", output_dir="unused", max_history=6, hidden_size=16,
                       n_heads=2, inner_size=32, dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    model = M.build_model(cfg, 40).train()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 41, (4, 6), generator=g)
    tgt = torch.randint(1, 41, (4, 6), generator=g)
    batch = {"input_ids": ids, "target_ids": tgt, "row_index": torch.arange(4)}
    ctx = M.LossContext(denom=torch.tensor(float(tgt.numel())), epoch=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.loss(batch, ctx)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), n

    g = torch.Generator().manual_seed(1)
    h = torch.randn(7, 16, generator=g).bfloat16().requires_grad_(True)
    E = torch.randn(40, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (7,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_ce_sum(h, E, t, chunk_elements=50)
    want = F.cross_entropy(h.float() @ E.T, t, reduction="sum")
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-5)
    (gh,) = torch.autograd.grad(got, (h,))
    assert gh.dtype == torch.bfloat16
