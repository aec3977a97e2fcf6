"""llmrec.seqrec.modules' CPU dropout and attention against torch's own forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmrec.seqrec.modules import Dropout, SelfAttention, attention, causal_mask, dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_with_probability_one_minus_p_and_rescales(p):
    torch.manual_seed(0)
    x = torch.randn(200_000)
    y = dropout(x, p, True)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    # Unbiased, as F.dropout: E[y] = x, checked on a constant input.
    ones = dropout(torch.ones(200_000), p, True)
    assert abs(ones.mean().item() - 1.0) < 0.03


def test_dropout_is_identity_in_eval_at_zero_and_zero_at_one():
    x = torch.randn(4, 5)
    assert dropout(x, 0.5, False) is x
    assert dropout(x, 0.0, True) is x
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))


def test_dropout_gradient_is_the_mask_over_keep_probability():
    torch.manual_seed(1)
    x = torch.randn(64, 32, requires_grad=True)
    y = dropout(x, 0.3, True)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.7)


def test_dropout_module_is_an_nn_dropout_that_follows_train_and_eval():
    m = Dropout(0.5)
    assert isinstance(m, torch.nn.Dropout)
    x = torch.ones(1000)
    assert torch.equal(m.eval()(x), x)
    assert (m.train()(x) == 0).any()


def _masks(b=3, q=6, extra_keys=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, q, generator=g) > 0.3
    valid[:, -1] = True
    m = causal_mask(valid)  # [b, 1, q, q]
    # Extra always-open keys (like reasoning tokens attending to themselves).
    return torch.cat([m, torch.ones(b, 1, q, extra_keys, dtype=torch.bool)], -1)


def test_attention_without_dropout_is_sdpa():
    torch.manual_seed(2)
    mask = _masks()
    q = torch.randn(3, 2, 6, 8)
    k, v = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    torch.testing.assert_close(attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_attention_with_dropout_is_the_plain_math_with_the_same_mask():
    """Replay the random stream: softmax(qk^T/sqrt(d) masked), drop with the same uniforms, times v."""
    torch.manual_seed(3)
    mask = _masks()
    q = torch.randn(3, 2, 6, 8, requires_grad=True)
    k, v = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    torch.manual_seed(7)
    out = attention(q, k, v, mask, dropout_p=0.4)
    torch.manual_seed(7)
    w = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf")), -1)
    keep = torch.rand_like(w) >= 0.4
    ref = (w * keep / 0.6) @ v
    torch.testing.assert_close(out, ref)
    g_out, = torch.autograd.grad(out.sum(), q)
    g_ref, = torch.autograd.grad(ref.sum(), q)
    torch.testing.assert_close(g_out, g_ref)


def test_attention_dropout_is_unbiased_against_sdpa():
    """Averaged over many dropout draws, the output approaches SDPA's no-dropout output."""
    torch.manual_seed(4)
    mask = _masks(b=2, q=5, extra_keys=1)
    q = torch.randn(2, 2, 5, 4)
    k, v = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    mean = torch.stack([attention(q, k, v, mask, dropout_p=0.5) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=0.08, rtol=0)


def test_self_attention_module_uses_dropout_only_in_training():
    torch.manual_seed(5)
    layer = SelfAttention(8, 2, attn_dropout=0.5)
    x = torch.randn(2, 4, 8)
    mask = causal_mask(torch.ones(2, 4, dtype=torch.bool))
    layer.eval()
    a, _ = layer(x, mask)
    b, _ = layer(x, mask)
    assert torch.equal(a, b)
    layer.train()
    c, _ = layer(x, mask)
    assert not torch.allclose(a, c)
