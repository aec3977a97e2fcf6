"""Transformer building blocks, the GRU backbone, and the backbone interface shared by SASRec, GRU4Rec, ReaRec
and LARES.

The layers follow RecBole's (and so both papers' code) **post-LN** Transformer: attention ->
dropout -> residual -> LayerNorm, then FFN (GELU) -> dropout -> residual -> LayerNorm. Attention
takes an explicit boolean mask ``[B, 1, Q, K]`` (True = may attend) and an optional per-layer
key/value cache, so the same code runs a plain causal pass, a KV-cached reasoning step, and the
"every prefix at once" reasoning pass (queries of many prefixes, each masked to its own keys).

Dropout on the CPU draws uniform numbers instead of calling ``bernoulli_``: these models run with
p = 0.5 on every hidden state and attention map, and CPU ``bernoulli_`` was a quarter of a ReaRec
training step (about 4x slower than ``rand_like``). Same distribution, another random stream; GPUs keep
the fused kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KV = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]
"""One layer's cache: the keys and the values of each block of tokens run so far (``[B, h, n_i, d_h]`` each), kept
as separate blocks: a reasoning step attends to them in place instead of copying them into one growing tensor."""


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout (keep with probability ``1 - p``, scale kept values by ``1 / (1 - p)``).

    Equals ``F.dropout`` in distribution. On the CPU the keep mask is ``rand_like(x) >= p`` (about 4x
    faster than the ``bernoulli_`` inside ``F.dropout``); elsewhere it is ``F.dropout`` itself.

    >>> _ = torch.manual_seed(0); y = dropout(torch.ones(10_000), 0.25, True)
    >>> round((y == 0).float().mean().item(), 2), round(y.max().item(), 4)  # dropped share, kept value
    (0.24, 1.3333)
    """
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or p >= 1:
        return F.dropout(x, p, training)
    return x * ((torch.rand_like(x) >= p) * (1.0 / (1.0 - p)))


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout` (same module type and state, so ``set_dropout`` still finds it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) masked) @ v`` with dropout on the attention weights.

    Without dropout (evaluation) or off the CPU this is ``F.scaled_dot_product_attention``. With
    dropout on the CPU, SDPA falls back to its math path with ``bernoulli_`` (2.8x the cost of the
    no-dropout call); the same math with :func:`dropout` is about 1.5x faster in training.
    """
    if dropout_p == 0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return dropout(weights, dropout_p, True) @ v


def attention_over_blocks(
    q: torch.Tensor, ks: tuple[torch.Tensor, ...], vs: tuple[torch.Tensor, ...], mask: torch.Tensor,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """:func:`attention` over keys/values given as blocks along the key axis (``mask`` covers them all, in order).

    Equal to ``attention(q, cat(ks), cat(vs), mask)`` without the concatenation, which copied the whole cache at
    every reasoning step (~40% of a ReaRec evaluation's reasoning time on the CPU).
    """
    if len(ks) == 1:
        return attention(q, ks[0], vs[0], mask, dropout_p)
    scores = torch.cat([q @ k.transpose(-1, -2) for k in ks], dim=-1) * (1.0 / math.sqrt(q.shape[-1]))
    weights = dropout(torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1), dropout_p, True)
    out, start = None, 0
    for v in vs:
        part = weights[..., start:start + v.shape[-2]] @ v
        out, start = (part if out is None else out + part), start + v.shape[-2]
    return out


class PrefixCache:
    """One layer's cache for reasoning tokens of N prefixes of B encoded rows: prefix ``n`` ends at position
    ``pos[n]`` of row ``rows[n]`` and attends to that row's item keys ``j <= pos[n]`` (real items only) and to its
    own earlier reasoning tokens; passed as ``past`` to the encoder instead of a :data:`KV`.

    The rows' item keys/values are not copied per prefix: the queries are laid out per row, ``[B, h, C, d_h]`` with
    ``C`` the most prefixes any row has (prefix ``n`` in slot ``slot[n]`` of its row), so the item part of attention
    is one batched matmul over the rows, as in a plain forward; the own-token part is per prefix (a dot product
    with each earlier token). Equal to attention over each prefix's own copy of its row's keys (tested), without
    the copies, at the cost of the rows' C slots instead of every position.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, item_allow: torch.Tensor, rows: torch.Tensor,
                 slot: torch.Tensor, width: int, own_keys: tuple[torch.Tensor, ...] = (),
                 own_values: tuple[torch.Tensor, ...] = ()):
        self.keys, self.values = keys, values  # [B, h, L, d_h]: the encoded rows' items
        self.item_allow = item_allow  # [N, L]
        self.rows, self.slot, self.width = rows, slot, width
        self.own_keys, self.own_values = own_keys, own_values  # [N, h, d_h] each, one per earlier token

    @staticmethod
    def for_prefixes(cache: list[KV], valid: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor
                     ) -> list[PrefixCache]:
        """Per-layer caches of the prefixes ``(rows, pos)`` (in any order) from an encoder's item cache."""
        L = valid.shape[1]
        item_allow = valid[rows] & (torch.arange(L, device=valid.device)[None, :] <= pos[:, None])
        counts = torch.bincount(rows, minlength=valid.shape[0])
        starts = counts.cumsum(0) - counts
        order = rows.argsort(stable=True)  # slots are counted in row order, whatever order the prefixes come in
        slot = torch.empty_like(rows)
        slot[order] = torch.arange(len(rows), device=rows.device) - starts[rows[order]]
        width = int(counts.max()) if len(rows) else 0
        return [PrefixCache(ks[0] if len(ks) == 1 else torch.cat(ks, 2), vs[0] if len(vs) == 1 else torch.cat(vs, 2),
                            item_allow, rows, slot, width) for ks, vs in cache]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
               ) -> tuple[torch.Tensor, PrefixCache]:
        """Attention of the new tokens ``q, k, v`` (``[N, h, 1, d_h]``); returns ``(out [N, h, 1, d_h], cache)``."""
        n, h, _, dh = q.shape
        B, L = self.keys.shape[0], self.keys.shape[2]
        own_keys, own_values = (*self.own_keys, k[:, :, 0]), (*self.own_values, v[:, :, 0])
        scale = 1.0 / math.sqrt(dh)
        laid = q.new_zeros(B, self.width, h, dh)
        laid[self.rows, self.slot] = q[:, :, 0]
        item_scores = (laid.transpose(1, 2) @ self.keys.transpose(-1, -2)).transpose(1, 2)[self.rows, self.slot]
        own_scores = torch.stack([(q[:, :, 0] * ok).sum(-1) for ok in own_keys], -1)  # [N, h, k]
        scores = torch.cat([item_scores, own_scores], -1) * scale  # [N, h, L + k]
        allow = torch.cat([self.item_allow, self.item_allow.new_ones(n, len(own_keys))], -1)[:, None]
        weights = dropout(torch.softmax(scores.masked_fill(~allow, float("-inf")), -1), dropout_p, dropout_p > 0)
        w_laid = weights.new_zeros(B, self.width, h, L)
        w_laid[self.rows, self.slot] = weights[..., :L]
        out = (w_laid.transpose(1, 2) @ self.values).transpose(1, 2)[self.rows, self.slot]  # [N, h, d_h]
        for j, ov in enumerate(own_values):
            out = out + weights[..., L + j, None] * ov
        cache = PrefixCache(self.keys, self.values, self.item_allow, self.rows, self.slot, self.width, own_keys,
                            own_values)
        return out[:, :, None], cache


class SelfAttention(nn.Module):
    """Multi-head attention whose keys/values are ``cache + new tokens`` (cache may be ``None``)."""

    def __init__(self, hidden: int, heads: int, attn_dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of n_heads {heads}")
        self.heads, self.head_dim, self.attn_dropout = heads, hidden // heads, attn_dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, past: KV | PrefixCache | None = None
                ) -> tuple[torch.Tensor, KV | PrefixCache]:
        b, q, d = x.shape
        # One copy into [3, B, h, Q, d_h]: attention on contiguous heads is faster than on strided views (SDPA on
        # the CPU: 9.2 ms with the copy vs 12.4 ms without, batch 256 x 50), and the cached keys/values of a
        # reasoning step are then contiguous too (its matmuls would otherwise copy them at every step).
        qkv = self.qkv(x).view(b, q, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).contiguous()
        qh, k, v = qkv[0], qkv[1], qkv[2]
        if isinstance(past, PrefixCache):  # reasoning tokens of selected prefixes (``mask`` is in the cache)
            o, cache = past.attend(qh, k, v, self.attn_dropout if self.training else 0.0)
            return self.out(o.transpose(1, 2).reshape(b, q, d)), cache
        ks, vs = ((k,), (v,)) if past is None else ((*past[0], k), (*past[1], v))
        o = attention_over_blocks(qh, ks, vs, mask, self.attn_dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, q, d)), (ks, vs)


class TransformerLayer(nn.Module):
    """One post-LN layer (RecBole's ``TransformerLayer``)."""

    def __init__(self, hidden: int, heads: int, inner: int, dropout: float, attn_dropout: float, eps: float):
        super().__init__()
        self.attn = SelfAttention(hidden, heads, attn_dropout)
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, past: KV | PrefixCache | None = None
                ) -> tuple[torch.Tensor, KV | PrefixCache]:
        a, kv = self.attn(x, mask, past)
        x = self.ln1(x + self.drop(a))
        f = self.fc2(F.gelu(self.fc1(x)))
        return self.ln2(x + self.drop(f)), kv


class Encoder(nn.Module):
    """A stack of layers; ``forward`` returns the last layer's output and every layer's full K/V."""

    def __init__(
        self,
        n_layers: int,
        hidden: int,
        heads: int,
        inner: int,
        dropout: float,
        attn_dropout: float,
        eps: float,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(hidden, heads, inner, dropout, attn_dropout, eps) for _ in range(n_layers)
        )

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, past: list[KV] | list[PrefixCache] | None = None
    ) -> tuple[torch.Tensor, list[KV] | list[PrefixCache]]:
        cache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, mask, None if past is None else past[i])
            cache.append(kv)
        return x, cache


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """``[B, 1, L, L]`` mask: causal, keys must be real items; the diagonal is always open.

    Opening the diagonal keeps padding queries (left padding) from having an all-masked row (which
    would give NaN); their outputs are never read.
    """
    L = valid.shape[1]
    tri = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    m = tri[None] & valid[:, None, :]
    return (m | torch.eye(L, dtype=torch.bool, device=valid.device)[None])[:, None]


def positions_from_oldest(valid: torch.Tensor) -> torch.Tensor:
    """Absolute positions counted from the oldest real item (0, 1, ...); padding gets 0."""
    return (valid.long().cumsum(1) - 1).clamp_min(0)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """RecBole/ReaRec init: normal(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(0.0, std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()


class Backbone(nn.Module):
    """The interface every reasoning module is written against, here on the causal Transformer (SASRec's).

    * ``embed(ids)`` -> input vectors ``[B, L, d]`` (item + position embedding, LayerNorm, dropout);
    * ``input_norm(x)`` -> the same LayerNorm + dropout, for vectors that are not items (reasoning tokens);
    * ``encode(ids)`` -> ``(h [B, L, d], cache, valid [B, L])``: the output at every position and what a
      reasoning step continues from (here every layer's K/V);
    * ``run(x, valid)`` -> ``h [B, L, d]`` of input vectors ``x`` (a plain causal pass, no cache);
    * ``prefix_cache(cache, valid, rows, pos)`` -> the state of the prefixes ending at ``(rows[n], pos[n])``;
    * ``step(x [N, 1, d], past)`` -> ``(out [N, 1, d], past)``: one more token per prefix (a reasoning step);
    * ``item_logits(h)`` -> scores over the N real items ``[..., N]`` (column ``j`` is item ``j + 1``):
      dot product with the tied item table ``item_emb``, divided by ``temperature``.

    :class:`GRUBackbone` is the same interface on a GRU (GRU4Rec's), so ReaRec reasons on either.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        hidden: int = 64,
        n_layers: int = 2,
        heads: int = 2,
        inner: int = 256,
        dropout: float = 0.5,
        attn_dropout: float = 0.5,
        input_dropout: float | None = None,
        temperature: float = 1.0,
        eps: float = 1e-12,
    ):
        super().__init__()
        self.num_items, self.max_len, self.hidden, self.temperature = num_items, max_len, hidden, temperature
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.in_ln = nn.LayerNorm(hidden, eps=eps)
        self.in_drop = Dropout(dropout if input_dropout is None else input_dropout)
        self.encoder = Encoder(n_layers, hidden, heads, inner, dropout, attn_dropout, eps)

    def input_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.in_drop(self.in_ln(x))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        valid = ids > 0
        return self.input_norm(self.item_emb(ids) + self.pos_emb(positions_from_oldest(valid)))

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[KV], torch.Tensor]:
        valid = ids > 0
        h, cache = self.encoder(self.embed(ids), causal_mask(valid))
        return h, cache, valid

    def run(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, causal_mask(valid))[0]

    def prefix_cache(self, cache: list[KV], valid: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor
                     ) -> list[PrefixCache]:
        return PrefixCache.for_prefixes(cache, valid, rows, pos)

    def step(self, x: torch.Tensor, past: list[PrefixCache]) -> tuple[torch.Tensor, list[PrefixCache]]:
        return self.encoder(x, None, past)

    def item_logits(self, h: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        return tied_item_logits(self, h, temperature)


def tied_item_logits(backbone: nn.Module, h: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """``h`` scored against ``backbone.item_emb`` without its padding row, divided by the temperature."""
    t = backbone.temperature if temperature is None else temperature
    logits = h @ backbone.item_emb.weight[1:].T
    # Dividing by 1 is a full pass over [rows, N] (and one more in backward) for nothing.
    return logits if t == 1 else logits / t


class GRUBackbone(nn.Module):
    """GRU4Rec's encoder (RecBole's form: item embedding -> dropout -> GRU layers without biases -> Linear) behind
    the :class:`Backbone` interface.

    Histories are left-padded; a GRU has no mask, so the padding must leave its state where it starts (zero). It
    does exactly: padding inputs are zeroed (whatever the padding row of the table holds after initialisation),
    and a bias-free GRU maps a zero input and a zero state to a zero state, in every layer (tested against the
    unpadded history). The cache of a reasoning step is every layer's state at every position (``[B, L, d]``
    per layer); a step runs one token per prefix from its prefix's states, so ReaRec's K steps cost K tokens
    per prefix here as on the Transformer. No position embedding (the recurrence orders the items), and
    ``input_norm`` is the input dropout alone (there is no input LayerNorm to share with reasoning tokens).
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        hidden: int = 64,
        n_layers: int = 1,
        dropout: float = 0.3,
        temperature: float = 1.0,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"a GRU backbone needs n_layers >= 1, got {n_layers}")
        self.num_items, self.max_len, self.hidden, self.temperature = num_items, max_len, hidden, temperature
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.in_drop = Dropout(dropout)
        # One module per layer: a reasoning step needs every layer's state at every position, which a
        # multi-layer nn.GRU returns only for its last layer.
        self.grus = nn.ModuleList(nn.GRU(hidden, hidden, 1, bias=False, batch_first=True) for _ in range(n_layers))
        self.dense = nn.Linear(hidden, hidden)
        for gru in self.grus:  # RecBole's GRU4Rec initialisation of the recurrent weights
            nn.init.xavier_uniform_(gru.weight_ih_l0)
            nn.init.xavier_uniform_(gru.weight_hh_l0)

    def input_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.in_drop(x)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.input_norm(self.item_emb(ids) * (ids > 0).unsqueeze(-1))

    def _layers(self, x: torch.Tensor, h0: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        states = []
        for i, gru in enumerate(self.grus):
            x, _ = gru(x, None if h0 is None else h0[i][None].contiguous())
            states.append(x)
        return x, states

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        valid = ids > 0
        out, states = self._layers(self.embed(ids))
        return self.dense(out), states, valid

    def run(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.dense(self._layers(x * valid.unsqueeze(-1))[0])

    def prefix_cache(self, cache: list[torch.Tensor], valid: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor
                     ) -> list[torch.Tensor]:
        return [states[rows, pos] for states in cache]  # [N, d] per layer

    def step(self, x: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out, states = self._layers(x, past)
        return self.dense(out), [s[:, -1] for s in states]

    def item_logits(self, h: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        return tied_item_logits(self, h, temperature)
