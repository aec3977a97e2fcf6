"""Full-catalogue losses in one chunked pass over the item table (exact; no ``[rows, N]`` logits kept).

Every ID model here scores a state ``h`` against all N items (``z = h E^T / t``) and trains with a full-softmax
loss. Computed plainly, autograd keeps the ``[rows, N]`` logits (and for ReaRec-ERL ``[rows, K+1, N]``) and each
elementwise pass over them goes to main memory: on the Amazon Games catalogue (N = 17K) that is ~12M floats per
batch of 128 sequences for SASRec's cross-entropy and ~36M for ERL's loss. Here the rows go through in chunks
sized to stay in cache: each chunk computes its logits once, the loss and its gradient with respect to the logits
in closed form, and immediately folds that gradient into ``dh`` and ``dE`` (two matmuls); nothing the size of the
logits outlives its chunk. The gradients are thus computed in the forward pass (the loss is a scalar with a single
consumer, as in fused linear-cross-entropy kernels) and scaled by the incoming gradient in backward; with
gradients off (evaluation) only the value is computed.

* :func:`fused_ce_sum` -- summed cross-entropy ``sum_m CE(h_m E^T / t, target_m)``; gradient ``softmax - onehot``.
  The plain form is ``F.cross_entropy(h @ E.T / t, targets, reduction="sum")``.
* :func:`fused_erl_loss` -- ReaRec-ERL's loss of states ``R [M, K+1, d]`` (``K1 = K + 1``)::

      loss = ( sum_m CE(mean_k z_mk, target_m) - kl_weight * sum_m min(kl_m, cap) ) / denom

  where the cross-entropy reads the mean of the step states (ERL's ensemble; ``mean_k z_k`` equals the logits of
  ``mean_k R_k`` because the scoring is linear) and ``kl_m`` is the mean over ordered step pairs ``i != j`` of
  ``KL(p_j || sg(p_i))`` (ERL's diversity term, maximised: hence the minus; capped, no gradient above the cap).
  Closed form of the diversity (``l_j = log p_j``, ``S = sum_i l_i``): ``sum_{i != j} KL(p_j || sg(p_i)) =
  sum_j <p_j, g_j>`` with ``g_j = K1 l_j - S``; its gradient w.r.t. ``z_j`` is ``p_j * (g_j - f_j)`` with
  ``f_j = <p_j, g_j>`` (the stop-gradient leaves ``(K1 - 1) l_j`` as the only dependence on ``z_j``, whose
  softmax-weighted sum vanishes). :meth:`llmrec.seqrec.models.ReaRec._erl_loss_reference` is the plain form.

Both are tested against their plain forms in value and gradients (tests/test_seqrec_fused_losses.py). Under
autocast (``accelerate launch --mixed_precision bf16``) both compute in float32 with autocast off, as autocast runs
``F.cross_entropy``: a log-sum-exp over thousands of items in bf16 loses the loss's precision, and the chunk
matmuls would otherwise mix the autocast dtype with the float32 gradient buffers. Gradients flow back to the
inputs in their own dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one chunk's [rows, K1, N] logits: ~4 MB in fp32 stays in a CPU core's L2/L3 (measured on the Games
# catalogue: ~1.8x faster than the unchunked form for the diversity term); GPUs want larger chunks.
CPU_CHUNK_ELEMENTS = 1 << 20
GPU_CHUNK_ELEMENTS = 1 << 26


def _chunk_rows(rows_per_state: int, n_items: int, chunk_elements: int | None, cuda: bool) -> int:
    if chunk_elements is None:
        chunk_elements = GPU_CHUNK_ELEMENTS if cuda else CPU_CHUNK_ELEMENTS
    return max(1, chunk_elements // (rows_per_state * n_items))


def _at_least_float32(states: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in their common dtype, at least float32 (bf16/fp16 autocast outputs are upcast; float64 stays)."""
    dtype = torch.promote_types(torch.promote_types(states.dtype, table.dtype), torch.float32)
    return states.to(dtype), table.to(dtype)


class _FusedCESum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, E, targets, temperature, chunk_rows, want_grad):
        inv_t = 1.0 / temperature
        grad_h = torch.empty_like(h) if want_grad else None
        grad_E = torch.zeros_like(E) if want_grad else None
        total = h.new_zeros((), dtype=torch.float64)
        with torch.no_grad():
            for a in range(0, h.shape[0], chunk_rows):
                x, tgt = h[a:a + chunk_rows], targets[a:a + chunk_rows, None]
                z = x @ E.T
                if temperature != 1:
                    z.mul_(inv_t)
                lse = torch.logsumexp(z, -1, keepdim=True)
                total += (lse - z.gather(1, tgt)).sum().double()
                if want_grad:
                    g = z.sub_(lse).exp_()  # softmax
                    g.scatter_add_(1, tgt, g.new_full(tgt.shape, -1.0))
                    if temperature != 1:
                        g.mul_(inv_t)
                    grad_h[a:a + chunk_rows] = g @ E
                    grad_E.addmm_(g.T, x)
        ctx.save_for_backward(grad_h, grad_E)
        return total.to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_E = ctx.saved_tensors
        return grad_h * grad_out, grad_E * grad_out, None, None, None, None


def fused_ce_sum(
    h: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """``sum_m CE(h_m item_table^T / temperature, targets_m)`` for states ``h [M, d]``, 0-based ``targets [M]``.

    Equals ``F.cross_entropy(h @ item_table.T / temperature, targets, reduction="sum")`` in value and gradients,
    chunked (module docstring). Example: ``ce = fused_ce_sum(h, emb.weight[1:], item_ids - 1)``.
    """
    if h.dim() != 2:
        raise ValueError(f"h must be [M, d], got {tuple(h.shape)}")
    rows = _chunk_rows(1, item_table.shape[0], chunk_elements, h.is_cuda)
    # Under no_grad (or with nothing to differentiate) only the value is computed.
    want_grad = torch.is_grad_enabled() and (h.requires_grad or item_table.requires_grad)
    h, item_table = _at_least_float32(h, item_table)
    with torch.autocast(h.device.type, enabled=False):
        return _FusedCESum.apply(h, item_table, targets, float(temperature), rows, want_grad)


class _FusedERLLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, R, E, targets, temperature, kl_weight, kl_cap, denom, chunk_rows):
        M, K1, _ = R.shape
        N = E.shape[0]
        inv_t = 1.0 / temperature
        pairs = K1 * (K1 - 1)
        grad_R = torch.empty_like(R)
        grad_E = torch.zeros_like(E)
        ce_total = R.new_zeros((), dtype=torch.float64)
        kl_rows = R.new_empty(M)
        with torch.no_grad():
            for a in range(0, M, chunk_rows):
                r, tgt = R[a:a + chunk_rows], targets[a:a + chunk_rows]
                c = r.shape[0]
                z = r @ E.T  # [c, K1, N]
                if temperature != 1:
                    z.mul_(inv_t)
                # Cross-entropy of the mean logits and its gradient softmax(zm) - onehot.
                zm = z.mean(1)
                lse = torch.logsumexp(zm, -1, keepdim=True)
                ce_total += (lse.squeeze(1) - zm.gather(1, tgt[:, None]).squeeze(1)).sum().double()
                g_ce = zm.sub_(lse).exp_()
                g_ce.scatter_add_(1, tgt[:, None], g_ce.new_full((c, 1), -1.0))
                # Pairwise diversity (see the module docstring) and its gradient p * (g - f).
                logp = F.log_softmax(z, -1)
                p = logp.exp()
                S = logp.sum(1, keepdim=True)
                g = logp.mul_(K1).sub_(S)
                f = torch.linalg.vecdot(p, g)  # [c, K1]
                kl = f.sum(1) / pairs
                kl_rows[a:a + c] = kl
                coef = (-kl_weight * inv_t / (denom * pairs)) * (
                    (kl <= kl_cap).to(R.dtype) if kl_cap > 0 else torch.ones_like(kl)
                )
                gz = g.sub_(f.unsqueeze(-1)).mul_(p).mul_(coef[:, None, None])
                gz.add_(g_ce.unsqueeze(1), alpha=inv_t / (denom * K1))
                grad_R[a:a + c] = gz @ E
                grad_E.addmm_(gz.reshape(c * K1, N).T, r.reshape(c * K1, -1))
        kl_used = kl_rows.clamp(max=kl_cap) if kl_cap > 0 else kl_rows
        loss = (ce_total / denom).to(R.dtype) - kl_weight * kl_used.sum() / denom
        ce_sum = ce_total.to(R.dtype)
        ctx.save_for_backward(grad_R, grad_E)
        ctx.mark_non_differentiable(ce_sum, kl_rows)
        return loss, ce_sum, kl_rows

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grad_R, grad_E = ctx.saved_tensors
        return grad_R * grad_loss, grad_E * grad_loss, None, None, None, None, None, None


def fused_erl_loss(
    R: torch.Tensor,
    item_table: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    kl_weight: float,
    kl_cap: float,
    denom: float,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ERL's loss (module docstring) of states ``R [M, K+1, d]`` against ``item_table [N, d]``.

    ``targets`` are 0-based rows of ``item_table``; ``kl_cap`` 0 = no cap; ``denom`` divides both sums. Returns
    ``(loss, ce_sum, kl_per_row)``: only ``loss`` is differentiable (w.r.t. ``R`` and ``item_table``); the other
    two are for logging (``ce_sum`` is the summed cross-entropy, ``kl_per_row`` the uncapped diversity).

    Example: ``loss, ce, kl = fused_erl_loss(R, emb.weight[1:], tgt - 1, 1.0, 0.05, 1.0, float(n))``.
    """
    if R.dim() != 3 or R.shape[1] < 2:
        raise ValueError(f"R must be [M, K+1, d] with K >= 1, got {tuple(R.shape)}")
    chunk_rows = _chunk_rows(R.shape[1], item_table.shape[0], chunk_elements, R.is_cuda)
    R, item_table = _at_least_float32(R, item_table)
    with torch.autocast(R.device.type, enabled=False):
        return _FusedERLLoss.apply(R, item_table, targets, float(temperature), float(kl_weight), float(kl_cap),
                                   float(denom), chunk_rows)
