"""SASRec, GRU4Rec, ReaRec (ERL / PRL) and LARES on the backbone interface of :mod:`llmrec.seqrec.modules`
(the causal Transformer :class:`~llmrec.seqrec.modules.Backbone`, or :class:`~llmrec.seqrec.modules.GRUBackbone` for
GRU4Rec and, with ``backbone: gru``, ReaRec).

Every model implements the same two calls used by the trainer:

* ``loss(batch, ctx) -> (loss, logs)`` -- ``batch`` has ``input_ids`` / ``target_ids`` ``[B, L]``
  (0 = no loss there, see :mod:`llmrec.seqrec.data`). Per-position cross-entropies are **summed and
  divided by ``ctx.denom``** (the global number of loss positions / number of processes), so the
  gradient averaged by DDP equals the single-process gradient of the same global batch exactly.
* ``score(input_ids) -> [B, N]`` -- full-ranking scores of items ``1..N`` (column ``j`` = item
  ``j + 1``) for the last position of left-padded histories.

Paper/spec choices (see ../shared/papers/rearec-lares.md) are documented where they are made; the
defects of the official code listed there (ERL reading PRL's noise, PRL's contrastive term undefined
during warm-up, K = 0 crashing, the reference model run with gradients) are not reproduced.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmrec.seqrec.fused_losses import fused_ce_sum, fused_erl_loss
from llmrec.seqrec.keyed_random import keyed_generator, keyed_trunc_normal, keyed_uniform, row_keys
from llmrec.seqrec.modules import KV, Backbone, Encoder, GRUBackbone, causal_mask, init_weights

MODEL_NAMES = ("sasrec", "gru4rec", "rearec-erl", "rearec-prl", "lares")
BACKBONES = ("transformer", "gru")

# Streams of LARES's keyed draws (keyed_random): with the seed, epoch, step or row, each draw has its own key.
SPT_DEPTH, SPT_STATE, ALIGN_DEPTH, ALIGN_STATE, AUG_STATE, SLA_STEP = 1, 2, 3, 4, 5, 6
RPT_DEPTH, RPT_STATE, EVAL_STATE, FILTER_STATE, AUG_PICK = 7, 8, 9, 10, 11


@dataclass
class LossContext:
    """What a loss needs besides the batch."""

    denom: torch.Tensor | float = 1.0  # normaliser of summed per-position losses
    epoch: int = 0  # 0-based training epoch
    aug_pool: Any = None  # SameTargetPool (LARES SPT)
    extra: dict = field(default_factory=dict)
    seed: int = 0  # run seed: keys the draws that must not depend on the process layout
    step: int = 0  # 0-based batch index within the epoch (the same global batch on every layout)


class SeqRecModel(nn.Module):
    """Base class: a backbone, a loss and last-position scoring."""

    backbone: Backbone | GRUBackbone

    def forward(
        self, batch: dict[str, torch.Tensor], ctx: LossContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # The training forward IS the loss, so a DDP-wrapped model syncs gradients through it.
        return self.loss(batch, ctx)

    def loss(self, batch: dict[str, torch.Tensor], ctx: LossContext) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def user_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """The vector scored against the item table at the last position ``[B, d]``."""
        raise NotImplementedError

    @torch.no_grad()
    def score(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.item_logits(self.user_vectors(ids))

    def ce_sum(
        self, h: torch.Tensor, targets: torch.Tensor, temperature: float | None = None
    ) -> torch.Tensor:
        """Full-softmax cross-entropy over all N items, summed over rows (targets are item ids 1..N)."""
        bb = self.backbone
        t = bb.temperature if temperature is None else temperature
        # Chunked, exact (llmrec.seqrec.fused_losses): the plain form is F.cross_entropy(bb.item_logits(h, t), ...).
        return fused_ce_sum(h, bb.item_emb.weight[1:], targets - 1, t)


class SASRec(SeqRecModel):
    """Causal Transformer, tied item embeddings, full-softmax CE (per position or last position).

    The head and loss read the backbone interface only: :class:`GRU4Rec` is this model on :class:`GRUBackbone`.
    """

    def __init__(self, backbone: Backbone | GRUBackbone):
        super().__init__()
        self.backbone = backbone
        self.apply(init_weights)

    def user_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        h, _, _ = self.backbone.encode(ids)
        return h[:, -1]

    def loss(self, batch, ctx):
        ids, tgt = batch["input_ids"], batch["target_ids"]
        h, _, _ = self.backbone.encode(ids)
        m = tgt > 0
        ce = self.ce_sum(h[m], tgt[m])
        return ce / ctx.denom, {"ce": ce.detach().item() / max(int(m.sum()), 1)}


class GRU4Rec(SASRec):
    """GRU4Rec (Hidasi et al.; RecBole's form with full-softmax CE): a GRU over the item embeddings, its output
    at the last position scored against the tied item table. Trained as SASRec is (every prefix of a window in
    one pass, per-position loss), so the two differ only in the encoder."""

    def __init__(self, backbone: GRUBackbone):
        if not isinstance(backbone, GRUBackbone):
            raise TypeError(f"GRU4Rec runs on a GRUBackbone, got {type(backbone).__name__}")
        super().__init__(backbone)


class ReaRec(SeqRecModel):
    """ReaRec: K reasoning steps that feed the last hidden state back (ERL or PRL learning).

    Step k builds the token ``r_{k-1} + p^R_k`` (reasoning position embedding ``p^R``, a separate
    table from the item positions), applies the backbone's input LayerNorm + dropout, and runs the same
    encoder on it with every layer's K/V cache, so a step costs one token per prefix. Written against the
    backbone interface (``encode``, ``prefix_cache``, ``step``): on :class:`GRUBackbone` a step continues each
    prefix's recurrent state instead (the paper applies ReaRec to Transformer encoders only: SASRec, BERT4Rec,
    UniSRec, MoRec; on a GRU it is this package's extension, the same steps on another encoder).

    ``reason`` takes the prefixes to reason from, as (row, position) pairs: every row's last position at
    inference, every position that has a target in sequence-mode training. There the reasoning tokens of all
    those prefixes of the encoded windows run together: the token of prefix ``p`` attends to its row's item
    keys ``j <= p`` and to its own earlier reasoning tokens only, which is exactly the per-prefix computation
    (tested against per-prefix forwards, and against ``reason_dense``, the every-position form).
    """

    def __init__(
        self,
        backbone: Backbone | GRUBackbone,
        mode: str = "erl",
        reason_steps: int = 2,
        kl_weight: float = 0.05,
        kl_cap: float = 1.0,
        pta_alpha: float = 5.0,
        pl_weight: float = 1.0,
        cl_weight: float = 1.0,
        noise_std: float = 0.01,
        warmup_epochs: int = 2,
        cl_max_rows: int = 1024,
        cl_negatives: str = "batch",
    ):
        super().__init__()
        if mode not in ("erl", "prl"):
            raise ValueError(f"ReaRec mode must be 'erl' or 'prl', got {mode!r}")
        if reason_steps < 0:
            raise ValueError(f"reason_steps (K) must be >= 0, got {reason_steps}")
        if cl_negatives not in ("batch", "other_sequences"):
            raise ValueError(f"cl_negatives must be 'batch' or 'other_sequences', got {cl_negatives!r}")
        self.backbone, self.mode, self.K = backbone, mode, reason_steps
        self.cl_negatives = cl_negatives
        self.kl_weight, self.kl_cap = kl_weight, kl_cap
        self.pta_alpha, self.pl_weight = pta_alpha, pl_weight
        self.cl_weight, self.noise_std, self.warmup_epochs, self.cl_max_rows = (
            cl_weight,
            noise_std,
            warmup_epochs,
            cl_max_rows,
        )
        # Reasoning position embeddings (only when K > 0, so DDP sees no unused parameter).
        self.rpe = nn.Embedding(reason_steps, backbone.hidden) if reason_steps > 0 else None
        self.reasoning_layout = "pairs"  # "dense": reason_dense in training (the reference; tests, benchmarks)
        self.apply(init_weights)

    # -- reasoning ---------------------------------------------------------------------------------
    def reason(
        self,
        h: torch.Tensor,
        cache: list[KV] | list[torch.Tensor],
        valid: torch.Tensor,
        pos: torch.Tensor,
        rows: torch.Tensor | None = None,
        base: torch.Tensor | None = None,
        noise_std: float = 0.0,
    ) -> torch.Tensor:
        """Run K steps for the prefixes ``(rows[n], pos[n])``; return ``R [N, K+1, d]`` (``R[:, 0]`` = r0).

        The prefix of row ``b`` ending at position ``p`` is what a per-prefix forward would encode: its
        reasoning tokens attend to the row's item keys ``j <= p`` and to their own earlier tokens, nothing else.
        ``rows`` may come in any order; ``None`` means one prefix per row, ``pos[b]`` for row ``b`` (inference:
        every row's last position). The reasoning tokens of the N prefixes are the only new tokens
        (:class:`~llmrec.seqrec.modules.PrefixCache` attends them to their rows' cached items), so the work grows
        with the prefixes read, not with ``B x L``: in training, the positions that have a target (about 1 in 9
        of a Games window, which is mostly padding). ``base`` (``[N, K+1, d]``) builds step k's token from
        ``base[:, k-1]`` instead of this chain's own previous state (PRL's noisy view reuses the clean chain's
        states, as its code does); ``noise_std`` adds fresh Gaussian noise to every reasoning token (std, not
        variance). :meth:`reason_dense` is the former every-position form.
        """
        if rows is None:
            if pos.shape != (h.shape[0],):
                raise ValueError(f"rows=None reads one prefix per row: pos must have shape ({h.shape[0]},), got "
                                 f"{tuple(pos.shape)}")
            rows = torch.arange(len(pos), device=h.device)
        states = [h[rows, pos]]  # [N, d]
        if self.K == 0:
            return torch.stack(states, 1)
        past = self.backbone.prefix_cache(cache, valid, rows, pos)
        for k in range(1, self.K + 1):
            src = states[-1] if base is None else base[:, k - 1]
            x = src + self.rpe.weight[k - 1]
            if noise_std > 0:
                x = x + torch.randn_like(x) * noise_std
            x = self.backbone.input_norm(x)[:, None]  # [N, 1, d]: one new token per prefix
            r, past = self.backbone.step(x, past)
            states.append(r[:, 0])
        return torch.stack(states, 1)

    def reason_dense(
        self,
        h: torch.Tensor,
        cache: list[KV] | list[torch.Tensor],
        valid: torch.Tensor,
        qpos: torch.Tensor,
        base: torch.Tensor | None = None,
        noise_std: float = 0.0,
    ) -> torch.Tensor:
        """The reference form of :meth:`reason`: the prefixes ending at every ``qpos`` of EVERY row at once, as
        ``R [B, K+1, P, d]`` (a block mask keeps each prefix to its own keys), whether or not a prefix is read.

        What training ran before (B x L reasoning tokens per step, most of them padding on short-history
        data); kept for the tests and for ``scripts/seqrec_reasoning_layout_bench.py``. ``base`` is
        ``[B, K+1, P, d]`` here. Transformer backbone only (its block mask has no meaning for a GRU).
        """
        if not isinstance(self.backbone, Backbone):
            raise ValueError("reason_dense (reasoning_layout 'dense') needs the Transformer backbone")
        B, L, _ = h.shape
        P = qpos.numel()
        states = [h[:, qpos]]
        if self.K == 0:
            return torch.stack(states, 1)
        item_allow = valid[:, None, :] & (
            torch.arange(L, device=h.device)[None, None, :] <= qpos[None, :, None]
        )
        own = torch.eye(P, dtype=torch.bool, device=h.device).expand(B, P, P)
        past = cache
        for k in range(1, self.K + 1):
            src = states[-1] if base is None else base[:, k - 1]
            x = src + self.rpe.weight[k - 1]
            if noise_std > 0:
                x = x + torch.randn_like(x) * noise_std
            x = self.backbone.input_norm(x)
            mask = torch.cat([item_allow] + [own] * k, dim=-1)[:, None]
            r, past = self.backbone.encoder(x, mask, past)
            states.append(r)
        return torch.stack(states, 1)

    def _reason_targets(
        self, h: torch.Tensor, cache: list[KV] | list[torch.Tensor], valid: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
        base: torch.Tensor | None = None, noise_std: float = 0.0,
    ) -> torch.Tensor:
        """``R [N, K+1, d]`` of the training prefixes ``(rows, pos)`` by :meth:`reason`, or, when
        ``reasoning_layout`` is ``"dense"`` (tests and benchmarks only), by :meth:`reason_dense` over every row
        at the positions read, then picked out (the same values; other random draws where dropout is on)."""
        if self.reasoning_layout == "pairs":
            return self.reason(h, cache, valid, pos, rows, base=base, noise_std=noise_std)
        if self.reasoning_layout != "dense":
            raise ValueError(f"reasoning_layout must be 'pairs' or 'dense', got {self.reasoning_layout!r}")
        qpos = torch.unique(pos)
        col = torch.searchsorted(qpos, pos)
        dense_base = None
        if base is not None:  # the pairs' states put back in place; the other prefixes' outputs are never read
            dense_base = base.new_zeros(h.shape[0], base.shape[1], len(qpos), base.shape[2])
            dense_base[rows, :, col] = base
        return self.reason_dense(h, cache, valid, qpos, base=dense_base, noise_std=noise_std)[rows, :, col]

    @torch.no_grad()
    def reason_recompute(self, ids: torch.Tensor) -> torch.Tensor:
        """Reference without a cache: re-encode items + all reasoning tokens so far at every step.

        Returns ``R [B, K+1, d]`` at the last position; used by tests to check the cached path (on either backbone).
        """
        x_items = self.backbone.embed(ids)
        valid = ids > 0
        h = self.backbone.run(x_items, valid)
        states, toks = [h[:, -1]], []
        for k in range(1, self.K + 1):
            toks.append(self.backbone.input_norm(states[-1] + self.rpe.weight[k - 1]))
            x = torch.cat([x_items, torch.stack(toks, 1)], 1)
            v = torch.cat([valid, torch.ones(len(ids), k, dtype=torch.bool, device=ids.device)], 1)
            states.append(self.backbone.run(x, v)[:, -1])
        return torch.stack(states, 1)

    def _readout(self, R: torch.Tensor) -> torch.Tensor:
        # ERL: the mean of all K+1 states INCLUDING r0 (the paper's 1/K is a typo); PRL: r_K.
        return R.mean(1) if self.mode == "erl" else R[:, -1]

    def user_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        h, cache, valid = self.backbone.encode(ids)
        last = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
        return self._readout(self.reason(h, cache, valid, last))

    # -- losses ------------------------------------------------------------------------------------
    def loss(self, batch, ctx):
        ids, tgt = batch["input_ids"], batch["target_ids"]
        h, cache, valid = self.backbone.encode(ids)
        rows, pos = (tgt > 0).nonzero(as_tuple=True)  # the prefixes with a target, row by row
        Rm = self._reason_targets(h, cache, valid, rows, pos)  # [M, K+1, d]
        t = tgt[rows, pos]
        n = max(len(t), 1)
        logs: dict[str, float] = {}
        if self.mode == "erl":
            if self.kl_weight > 0 and self.K > 0:
                loss, ce, kl = self._erl_loss(Rm, t, float(ctx.denom))
                logs["ce"] = ce.item() / n
                logs["kl"] = kl.mean().item() if len(kl) else 0.0
            else:
                ce = self.ce_sum(Rm.mean(1), t)
                loss = ce / ctx.denom
                logs["ce"] = ce.detach().item() / n
        else:
            ce = self.ce_sum(Rm[:, -1], t)
            loss = ce / ctx.denom
            logs["ce"] = ce.detach().item() / n
            if self.K > 0 and self.pl_weight > 0:
                # Progressive temperature annealing: step k at tau * alpha^(K-k); the code's form (final
                # step at tau + w_pl * MEAN of the earlier steps' CEs), not the paper's plain sum.
                tau = self.backbone.temperature
                pl = (
                    sum(self.ce_sum(Rm[:, k], t, tau * self.pta_alpha ** (self.K - k)) for k in range(self.K))
                    / self.K
                )
                loss = loss + self.pl_weight * pl / ctx.denom
                logs["pta"] = pl.detach().item() / n
            # Reasoning-aware contrastive learning, only after warm-up; exactly 0 before it (the
            # official code leaves it undefined there and crashes).
            if self.K > 0 and self.cl_weight > 0 and self.noise_std > 0 and ctx.epoch >= self.warmup_epochs:
                h2, cache2, _ = self.backbone.encode(ids)  # second view: its own dropout masks and cache
                R2m = self._reason_targets(h2, cache2, valid, rows, pos, base=Rm, noise_std=self.noise_std)
                cl = self._rcl(Rm, R2m, rows)
                loss = loss + self.cl_weight * cl
                logs["rcl"] = cl.detach().item()
        return loss, logs

    def _erl_loss(
        self, Rm: torch.Tensor, targets: torch.Tensor, denom: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ERL's loss of states ``Rm [M, K+1, d]``: CE of the mean state minus ``kl_weight`` x the capped pairwise
        diversity, both summed and divided by ``denom``; returns ``(loss, ce_sum, kl_per_row)``.

        One chunked pass over the item table (:func:`llmrec.seqrec.fused_losses.fused_erl_loss`);
        :meth:`_erl_loss_reference` is the plain form it equals (value and gradients, tested).
        """
        bb = self.backbone
        return fused_erl_loss(Rm, bb.item_emb.weight[1:], targets - 1, bb.temperature, self.kl_weight,
                              self.kl_cap, denom)

    def _erl_loss_reference(
        self, Rm: torch.Tensor, targets: torch.Tensor, denom: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_erl_loss` in plain autograd: the CE of the mean state and :meth:`_erl_diversity_reference`."""
        ce = F.cross_entropy(self.backbone.item_logits(Rm.mean(1)), targets - 1, reduction="sum")
        kl = self._erl_diversity_reference(Rm)
        kl_used = kl.clamp(max=self.kl_cap) if self.kl_cap > 0 else kl
        return ce / denom - self.kl_weight * kl_used.sum() / denom, ce.detach(), kl.detach()

    def _erl_diversity_reference(self, Rm: torch.Tensor) -> torch.Tensor:
        """ERL's diversity per row, uncapped: the mean over ordered step pairs ``i != j`` of
        ``KL(p_j || sg(p_i))``, as a plain double loop (slow; the definition the fused loss is tested against).
        Maximising a KL is unbounded: the loss caps it at ``kl_cap`` (0 = none; no gradient above the cap)."""
        logp = F.log_softmax(self.backbone.item_logits(Rm), -1)  # [M, K+1, N]
        p = logp.exp()
        K1 = Rm.shape[1]
        total = Rm.new_zeros(Rm.shape[0])
        for i in range(K1):
            for j in range(K1):
                if i != j:
                    total = total + (p[:, j] * (logp[:, j] - logp[:, i].detach())).sum(-1)
        return total / (K1 * (K1 - 1))

    def _rcl(self, Rm: torch.Tensor, R2m: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
        """InfoNCE per step k >= 1: noisy r~_k vs clean r_k of the same prefix, the other prefixes in the batch
        negatives; with ``cl_negatives="other_sequences"``, not those of the same training sequence
        (``sequence [M]``: each prefix's batch row).

        Prefixes beyond ``cl_max_rows`` are subsampled (sequence mode has one per position, and the
        similarity matrix is prefixes^2). Negatives are local to the process (not gathered).
        """
        M = Rm.shape[0]
        if M == 0:  # no prefix with a target in this batch: a mean over no rows would be NaN
            return Rm.sum() * 0.0
        if M > self.cl_max_rows:
            idx = torch.randperm(M, device=Rm.device)[: self.cl_max_rows]
            Rm, R2m = Rm[idx], R2m[idx]
            sequence = sequence[idx]
        labels = torch.arange(Rm.shape[0], device=Rm.device)
        tau = self.backbone.temperature
        # Same-sequence negatives: masked out of the softmax (the positive, on the diagonal, stays).
        drop = None
        if self.cl_negatives == "other_sequences":
            drop = (sequence[:, None] == sequence[None, :]) & (labels[:, None] != labels[None, :])
        total = Rm.new_zeros(())
        for k in range(1, self.K + 1):
            logits = R2m[:, k] @ Rm[:, k].T / tau
            if drop is not None:
                logits = logits.masked_fill(drop, float("-inf"))
            total = total + F.cross_entropy(logits, labels)
        return total / self.K


class LARES(SeqRecModel):
    """LARES: a pre-block, then a shared recurrent core that refines EVERY position ``k`` times.

    ``T_0 = scale * truncnorm(std)`` (per token and dimension) in training; ``T_t = C(LN(f(T_{t-1}, H)))``
    with ``f`` = average (``add``), ``concat`` (Linear 2d->d) or ``linear`` (sigmoid gate). Depth ``k``
    is drawn once per forward call from the Poisson-lognormal scheme in training and fixed to
    ``mean_recurrence`` at evaluation. ``state_init="normal_zero"`` (default here) uses a zero initial
    state at evaluation so metrics are deterministic; ``"normal"`` keeps the official random one.

    Random depths and initial states are keyed draws (:mod:`llmrec.seqrec.keyed_random`): a depth by the seed,
    epoch and global step, an initial state by the seed, epoch and the example's row, so training gives the
    same result on any number of processes (dropout aside) and a resumed run repeats the uninterrupted one.
    """

    def __init__(
        self,
        backbone: Backbone,
        n_pre_layers: int = 1,
        n_core_layers: int = 1,
        heads: int = 2,
        inner: int = 256,
        dropout: float = 0.5,
        attn_dropout: float = 0.5,
        mean_recurrence: int = 4,
        depth_sampling: str = "poisson-lognormal",
        state_init: str = "normal_zero",
        state_std: float = 1.0,
        state_scale: float = 3.0,
        fuse: str = "add",
        tla_weight: float = 0.1,
        sla_weight: float = 0.5,
        align_tau: float = 1.0,
        align_sim: str = "dot",
        sla_exclude_final: bool = False,
    ):
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise ValueError(f"LARES runs on the Transformer backbone (its pre-block and recurrent core are Transformer "
                             f"layers over every position), got {type(backbone).__name__}")
        if mean_recurrence < 1:
            raise ValueError(f"mean_recurrence must be >= 1, got {mean_recurrence}")
        if depth_sampling not in ("poisson-lognormal", "constant"):
            raise ValueError(
                f"depth_sampling must be 'poisson-lognormal' or 'constant', got {depth_sampling!r}"
            )
        if state_init not in ("normal", "normal_zero", "zero"):
            raise ValueError(f"state_init must be normal/normal_zero/zero, got {state_init!r}")
        if fuse not in ("add", "concat", "linear"):
            raise ValueError(f"fuse must be add/concat/linear, got {fuse!r}")
        if align_sim not in ("dot", "cos"):
            raise ValueError(f"align_sim must be dot/cos, got {align_sim!r}")
        self.backbone = backbone
        d, eps = backbone.hidden, 1e-12
        # The backbone's own encoder is the pre-block A; the core C has its own (shared-over-steps) layers.
        backbone.encoder = Encoder(n_pre_layers, d, heads, inner, dropout, attn_dropout, eps)
        self.core = Encoder(n_core_layers, d, heads, inner, dropout, attn_dropout, eps)
        self.core_ln = nn.LayerNorm(d, eps=eps)
        self.fuse = fuse
        if fuse == "concat":
            self.fuse_proj = nn.Linear(2 * d, d)
        elif fuse == "linear":
            self.fuse_gate = nn.Parameter(torch.zeros(d))
        self.mean_recurrence, self.depth_sampling = mean_recurrence, depth_sampling
        self.state_init, self.state_std, self.state_scale = state_init, state_std, state_scale
        self.tla_weight, self.sla_weight, self.align_tau, self.align_sim = (
            tla_weight,
            sla_weight,
            align_tau,
            align_sim,
        )
        self.sla_exclude_final = sla_exclude_final
        # RPT settings (set by the trainer before the RPT phase).
        self.rpt: dict[str, Any] = {}
        self.reference: LARES | None = None
        self.apply(init_weights)

    # -- recurrence --------------------------------------------------------------------------------
    def sample_depth(self, generator: torch.Generator | None = None) -> int:
        """Training depth: k = 1 + Poisson(lambda), lambda ~ LogNormal(ln mu - s^2/2, s = 0.5), k <= 3 mu.

        ``generator`` (CPU) makes the draw a keyed one; without it the global generator is used.
        """
        mu = self.mean_recurrence
        if self.depth_sampling == "constant" or not self.training:
            return mu
        s = 0.5
        rate = math.exp(torch.randn((), generator=generator).item() * s + math.log(mu) - s * s / 2)
        k = 1 + int(torch.poisson(torch.tensor(rate), generator=generator).item())
        return min(k, 3 * mu)

    def initial_state(
        self, like: torch.Tensor, random: bool | None = None, keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        """T_0 shaped like ``like [B, L, d]``: zeros, or ``scale * truncnorm(std)`` (at 3 std).

        ``keys [B]`` (:func:`~llmrec.seqrec.keyed_random.row_keys`) draws row ``i``'s state from ``keys[i]``
        alone; without them the global generator is used.
        """
        if random is None:
            random = self.state_init == "normal" or (self.state_init == "normal_zero" and self.training)
        if not random:
            return torch.zeros_like(like)
        if keys is not None:
            z = keyed_trunc_normal(keys.to(like.device), tuple(like.shape[1:]), self.state_std).to(like.dtype)
        else:
            z = torch.empty_like(like)
            nn.init.trunc_normal_(z, 0.0, self.state_std, -3 * self.state_std, 3 * self.state_std)
        return self.state_scale * z

    def _fuse(self, T: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        if self.fuse == "add":
            return (T + H) / 2
        if self.fuse == "concat":
            return self.fuse_proj(torch.cat([T, H], -1))
        g = torch.sigmoid(self.fuse_gate)
        return g * T + (1 - g) * H

    def states(
        self,
        ids: torch.Tensor,
        depth: int,
        T0: torch.Tensor | None = None,
        collect: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run pre-block + ``depth`` core steps; return the final ``T [B, L, d]`` and, if ``collect``
        (positions) is given, the state at those positions after every step. ``keys``: see
        :meth:`initial_state` (unused when ``T0`` is given)."""
        valid = ids > 0
        mask = causal_mask(valid)
        H, _ = self.backbone.encoder(self.backbone.embed(ids), mask)
        T = self.initial_state(H, keys=keys) if T0 is None else T0
        steps = []
        for _ in range(depth):
            T, _ = self.core(self.core_ln(self._fuse(T, H)), mask)
            if collect is not None:
                steps.append(T[:, collect])
        return T, steps

    def user_vectors(
        self, ids: torch.Tensor, depth: int | None = None, keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        T, _ = self.states(ids, depth or self.mean_recurrence, keys=keys)
        return T[:, -1]

    @torch.no_grad()
    def score(self, ids: torch.Tensor, depth: int | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone.item_logits(self.user_vectors(ids, depth, keys))

    # -- SPT ---------------------------------------------------------------------------------------
    def _nce(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.align_sim == "cos":
            x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        return F.cross_entropy(x @ y.T / self.align_tau, torch.arange(len(x), device=x.device))

    def loss(self, batch, ctx):
        if ctx.extra.get("phase") == "rpt":
            return self.rpt_loss(batch, ctx)
        ids, tgt = batch["input_ids"], batch["target_ids"]
        seed, epoch, step = ctx.seed, ctx.epoch, ctx.step
        # (a) recommendation loss at every loss position, with its own random depth.
        T, _ = self.states(
            ids,
            self.sample_depth(keyed_generator(seed, SPT_DEPTH, epoch, step)),
            keys=row_keys(batch["row_index"], seed, SPT_STATE, epoch),
        )
        m = tgt > 0
        ce = self.ce_sum(T[m], tgt[m])
        loss = ce / ctx.denom
        logs = {"ce": ce.detach().item() / max(int(m.sum()), 1), "depth": 0.0}
        real = tgt[:, -1] > 0  # False only for rows the loader added to fill a last batch (no target)
        if (self.tla_weight > 0 or self.sla_weight > 0) and ctx.aug_pool is not None and bool(real.any()):
            # Alignment on each example's last position (its newest train row): (b) the same sequence
            # with a fresh depth k', (c) another train row with the same target, same k'. In-batch
            # negatives are local to the process and include same-target rows (as the code does).
            if not bool(real.all()):
                ids, tgt, row_index = ids[real], tgt[real], batch["row_index"][real]
            else:
                row_index = batch["row_index"]
            last = torch.tensor([ids.shape[1] - 1], device=ids.device)
            k2 = self.sample_depth(keyed_generator(seed, ALIGN_DEPTH, epoch, step))
            Tb, steps = self.states(ids, k2, collect=last, keys=row_keys(row_index, seed, ALIGN_STATE, epoch))
            u_b = Tb[:, -1]
            # the partner drawn per row (keyed): it drew from the global generator, so a row's partner depended on
            # where the row sat in the batch and on the number of processes
            pick = keyed_uniform(row_keys(row_index, seed, AUG_PICK, epoch), (1,))[:, 0]
            aug = ctx.aug_pool.sample(tgt[:, -1], row_index, own_inputs=ids, uniforms=pick).to(ids.device)
            u_c = self.states(aug, k2, keys=row_keys(row_index, seed, AUG_STATE, epoch))[0][:, -1]
            logs["depth"] = float(k2)
            if self.tla_weight > 0:
                tla = (self._nce(u_b, u_c) + self._nce(u_c, u_b)) / 2
                loss = loss + self.tla_weight * tla
                logs["tla"] = tla.detach().item()
            n_choices = k2 - 1 if self.sla_exclude_final else k2
            if self.sla_weight > 0 and k2 > 1 and n_choices > 0:
                j = int(torch.randint(n_choices, (), generator=keyed_generator(seed, SLA_STEP, epoch, step)).item())
                t_j = steps[j][:, 0]
                sla = (self._nce(u_b, t_j) + self._nce(t_j, u_b)) / 2
                loss = loss + self.sla_weight * sla
                logs["sla"] = sla.detach().item()
        return loss, logs

    # -- RPT ---------------------------------------------------------------------------------------
    def make_reference(self) -> None:
        """Freeze a copy of the current (SPT) model as the RPT reference (eval mode, no grad)."""
        ref = copy.deepcopy(self)
        ref.reference = None
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        # Stored outside the module tree so it is not trained, saved or wrapped by DDP.
        object.__setattr__(self, "reference", ref)

    def rpt_loss(self, batch, ctx):
        """GRPO-style post-training on last-position rows (see the spec, section 2.5).

        G rollouts per row, each a full forward with its own random depth k_g, initial state and
        dropout. Per-step "action" log-prob l_{g,t} = log softmax(o_{g,t} E^T)[v+]; reward from the
        final step (Recall@k or NDCG@k of the target, pad/history unmasked); group-normalised
        advantage; k3 KL to the frozen SPT reference run with the SAME depth and initial state, under
        no_grad. loss = -mean_t[exp(l - sg(l)) A_g - beta KL_t], averaged over rows and rollouts.
        """
        from llmrec.evaluation.metrics import ranks_from_scores

        cfg = self.rpt
        G, beta, rk = int(cfg.get("group", 4)), float(cfg.get("beta", 1.0)), int(cfg.get("reward_k", 10))
        ids, tgt = batch["input_ids"], batch["target_ids"][:, -1]
        # Rows the loader added to fill a last batch have no target: any item stands in, and they weigh 0.
        real = (tgt > 0).float()
        tgt = tgt.clamp(min=1)
        last = torch.tensor([ids.shape[1] - 1], device=ids.device)
        B = len(ids)
        rewards, terms = [], []
        for g in range(G):
            # Keyed by (step, rollout) and (row, rollout): the same rollouts on any number of processes.
            k = self.sample_depth(keyed_generator(ctx.seed, RPT_DEPTH, ctx.epoch, ctx.step, g))
            with torch.no_grad():
                T0 = self.initial_state(
                    ids.new_empty((*ids.shape, self.backbone.hidden), dtype=torch.float),
                    # Random unless the model was trained from zeros ('zero'): rollouts start from the
                    # states SPT trained on, whatever the module's train/eval mode.
                    random=self.state_init != "zero",
                    keys=row_keys(batch["row_index"], ctx.seed, RPT_STATE, ctx.epoch, g),
                )
            _, steps = self.states(ids, k, T0=T0, collect=last)
            o = torch.stack([s[:, 0] for s in steps], 1)  # [B, k, d]
            logp_all = F.log_softmax(self.backbone.item_logits(o), -1)  # [B, k, N]
            logp = logp_all.gather(-1, (tgt - 1)[:, None, None].expand(B, k, 1)).squeeze(-1)  # [B, k]
            with torch.no_grad():
                ranks = ranks_from_scores(logp_all[:, -1].detach(), tgt - 1)
                if cfg.get("reward", "recall") == "ndcg":
                    r = torch.where(ranks < rk, 1.0 / torch.log2(ranks.float() + 2), torch.zeros(()))
                else:
                    r = (ranks < rk).float()
                ref = self.reference
                _, rsteps = ref.states(ids, k, T0=T0, collect=last)
                ro = torch.stack([s[:, 0] for s in rsteps], 1)
                ref_logp = F.log_softmax(ref.backbone.item_logits(ro), -1)
                ref_logp = ref_logp.gather(-1, (tgt - 1)[:, None, None].expand(B, k, 1)).squeeze(-1)
            rewards.append(r.to(ids.device))
            diff = ref_logp - logp
            kl = torch.exp(diff) - diff - 1
            terms.append((logp, kl))
        R = torch.stack(rewards, 1)  # [B, G]
        A = (R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + 1e-4)
        total = ids.new_zeros((), dtype=torch.float)
        for g, (logp, kl) in enumerate(terms):
            per_step = torch.exp(logp - logp.detach()) * A[:, g : g + 1] - beta * kl
            total = total - (per_step.mean(1) * real).sum()
        # Rows summed and divided by denom (rows per process) -> mean over rows; then over rollouts.
        loss = total / (ctx.denom * G)
        # Logged over the real rows only: the trainer weights each process's value by its share of real rows, and
        # the fillers' stand-in target made the logged kl depend on the process count (a review).
        n_real = real.sum().clamp(min=1)
        reward = (R.mean(1) * real).sum() / n_real
        kl_mean = sum((k.mean(1) * real).sum() for _, k in terms) / (G * n_real)
        return loss, {"reward": reward.detach().item(), "kl": kl_mean.detach().item()}


def backbone_of(cfg: Any) -> str:
    """The backbone a config's model runs on: its ``backbone`` field, or with ``auto`` (and in configs recorded
    before the field existed) the model's own: a GRU for GRU4Rec, the Transformer for the others."""
    kind = getattr(cfg, "backbone", "auto")
    if kind == "auto":
        return "gru" if cfg.model == "gru4rec" else "transformer"
    return kind


def build_model(cfg: Any, num_items: int) -> SeqRecModel:
    """Build the model named by ``cfg.model`` from a :class:`~llmrec.seqrec.config.SeqRecConfig`."""
    if cfg.model not in MODEL_NAMES:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {MODEL_NAMES}")
    kind = backbone_of(cfg)
    if kind not in BACKBONES:
        raise ValueError(f"unknown backbone {kind!r}; choose one of {BACKBONES}")
    if kind == "gru":
        # GRU4Rec's input dropout is its only dropout (RecBole's dropout_prob on the item embeddings)
        bb: Backbone | GRUBackbone = GRUBackbone(
            num_items, cfg.max_history, hidden=cfg.hidden_size, n_layers=cfg.n_layers,
            dropout=cfg.dropout if cfg.input_dropout is None else cfg.input_dropout, temperature=cfg.temperature)
    else:
        bb = Backbone(
            num_items,
            cfg.max_history,
            hidden=cfg.hidden_size,
            n_layers=cfg.n_layers,
            heads=cfg.n_heads,
            inner=cfg.inner_size,
            dropout=cfg.dropout,
            attn_dropout=cfg.attn_dropout,
            input_dropout=cfg.input_dropout,
            temperature=cfg.temperature,
        )
    if cfg.model == "sasrec":
        return SASRec(bb)
    if cfg.model == "gru4rec":
        return GRU4Rec(bb)
    if cfg.model.startswith("rearec"):
        return ReaRec(
            bb,
            mode=cfg.model.split("-")[1],
            reason_steps=cfg.reason_steps,
            kl_weight=cfg.kl_weight,
            kl_cap=cfg.kl_cap,
            pta_alpha=cfg.pta_alpha,
            pl_weight=cfg.pl_weight,
            cl_weight=cfg.cl_weight,
            noise_std=cfg.noise_std,
            warmup_epochs=cfg.warmup_epochs,
            cl_max_rows=cfg.cl_max_rows,
            cl_negatives=cfg.cl_negatives,
        )
    return LARES(
        bb,
        n_pre_layers=cfg.n_pre_layers,
        n_core_layers=cfg.n_core_layers,
        heads=cfg.n_heads,
        inner=cfg.inner_size,
        dropout=cfg.dropout,
        attn_dropout=cfg.attn_dropout,
        mean_recurrence=cfg.mean_recurrence,
        depth_sampling=cfg.depth_sampling,
        state_init=cfg.state_init,
        state_std=cfg.state_std,
        state_scale=cfg.state_scale,
        fuse=cfg.fuse,
        tla_weight=cfg.tla_weight,
        sla_weight=cfg.sla_weight,
        align_tau=cfg.align_tau,
        align_sim=cfg.align_sim,
        sla_exclude_final=cfg.sla_exclude_final,
    )
