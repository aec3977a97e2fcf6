"""Latent reasoning tokens (LatentR3) on any Hugging Face causal LM (Qwen2, Llama; plain or PEFT).

Before the model writes its answer, ``N`` "thought" positions are filled with vectors pooled from the
model's own final-layer hidden states by a small attention head (the paper's *LatentRATT*):

    prompt  ->  r_1 = head(H(prompt))            query at the last prompt token
            ->  r_2 = head(H(prompt, r_1))       query at r_1's position          (N > 1 only)
            ...
            ->  answer tokens, conditioned on prompt and r_1..r_N

Two equivalent ways to compute the training logits are implemented:

* :meth:`LatentReasoningLM.forward` -- the efficient form. Attention is causal, so the prompt's hidden
  states do not depend on the latents or the answer: run the LM over the (left-padded) prompt once with
  a KV cache, pool r_1 from it, feed r_1..r_{N-1} one step each through the cache, and finally run
  [r_N, answer tokens] on top of the cache. The LM sees prompt + latents + answer exactly once, which is
  the cost of plain SFT. Gradients flow through the cache into the prompt pass (nothing is detached).
* :meth:`LatentReasoningLM.forward_naive` -- the paper's reference code: N+1 passes over the full
  sequence [prompt, latent placeholders, answer], replacing the latent positions' input embeddings by
  the pooled vectors pass after pass. Kept as the executable specification the efficient form is tested
  against (and for layouts coming straight from an SFT collator).

Design decisions (see ``papers/latentr3.md`` section 7):

* The latent token ids are stored explicitly in :class:`LatentConfig` (the reference code located the
  thought token as "the last embedding row", which breaks as soon as the vocabulary is padded).
* Position ids are ``cumsum(attention_mask) - 1`` everywhere (LM and pooling head), as ``generate``
  does, so a row gets the same positions whatever its padding side. RoPE only sees relative offsets
  anyway; using per-row positions makes left- and right-padded batches agree to the last bit in the head.
* The pooling head runs in float32 whatever the LM dtype (the reference ran its softmax in bf16).
* ``num_latent_tokens=0`` is the plain LM (the BIGRec baseline path): no head, one pass.
* With gradient checkpointing active, transformers silently drops the KV cache inside checkpointed
  layers; the efficient form then re-runs the growing prefix without a cache (still exact, ~2x the
  prompt cost) instead of producing wrong logits.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "LATENT_CONFIG_NAME",
    "LATENT_HEAD_NAME",
    "LatentConfig",
    "LatentLMOutput",
    "LatentPoolingHead",
    "LatentPrefix",
    "LatentReasoningLM",
    "add_latent_tokens",
    "build_naive_inputs",
    "completion_cross_entropy",
    "input_embedding_rms",
    "padding_position_ids",
]

LATENT_CONFIG_NAME = "latent_config.json"
LATENT_HEAD_NAME = "latent_head.safetensors"
_FORMAT = "llmrec-latent"
_FORMAT_VERSION = 1
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------- config


@dataclass
class LatentConfig:
    """How many latent tokens, what they are called, and the shape of the pooling head."""

    num_latent_tokens: int = field(
        default=1,
        metadata={"help": "Number N of latent 'thought' positions before the answer (0 = plain LM, the BIGRec baseline)."},
    )
    latent_tokens: list[str] | None = field(
        default=None,
        metadata={
            "help": "Token strings of the latent positions, one per latent. Default: '<|Thought|>' for N=1, "
            "'<|Thought_1|>'..'<|Thought_N|>' for N>1."
        },
    )
    latent_token_ids: list[int] | None = field(
        default=None,
        metadata={
            "help": "Tokenizer ids of latent_tokens, filled by add_latent_tokens and saved with the checkpoint "
            "(never inferred from the vocabulary size)."
        },
    )
    head_num_heads: int = field(default=1, metadata={"help": "Attention heads of the pooling head (paper: 1)."})
    head_dim: int | None = field(
        default=None,
        metadata={
            "help": "Query/key width per head; None = hidden_size / head_num_heads (full width, as the paper). "
            "Values are always full hidden width (split over heads): there is no output projection."
        },
    )
    rope_base: float = field(default=1000.0, metadata={"help": "RoPE base of the pooling head (paper: 1000)."})
    head_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the pooling head's parameters and computation, independent of the LM's dtype."},
    )
    head_output_norm: bool = field(
        default=False,
        metadata={
            "help": "End the pooling head with an RMSNorm whose weight starts at the RMS of the LM's input "
            "embeddings, so every latent enters the LM at a token embedding's scale. Off (the paper's head), a "
            "latent comes out at the scale of final-layer hidden states: after latent SFT on Games its norm was "
            "about 8x a token embedding's (median row) on SmolLM2-135M and 290x on Qwen2.5-Coder-0.5B."
        },
    )

    def __post_init__(self) -> None:
        n = self.num_latent_tokens
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"num_latent_tokens must be an int >= 0, got {n!r}")
        if self.latent_tokens is None:
            self.latent_tokens = ["<|Thought|>"] if n == 1 else [f"<|Thought_{i}|>" for i in range(1, n + 1)]
        self.latent_tokens = list(self.latent_tokens)
        if len(self.latent_tokens) != n:
            raise ValueError(f"{n} latent tokens configured but {len(self.latent_tokens)} token strings given")
        if len(set(self.latent_tokens)) != n:
            raise ValueError(f"latent token strings must be distinct, got {self.latent_tokens}")
        if self.latent_token_ids is not None:
            self.latent_token_ids = [int(i) for i in self.latent_token_ids]
            if len(self.latent_token_ids) != n:
                raise ValueError(f"{n} latent tokens but {len(self.latent_token_ids)} latent_token_ids")
            if len(set(self.latent_token_ids)) != n:
                raise ValueError(f"latent_token_ids must be distinct, got {self.latent_token_ids}")
        if self.head_num_heads < 1:
            raise ValueError("head_num_heads must be >= 1")
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        # The resolver of model_dtype / dtype, so "bf16" is bfloat16 here too, and only the float dtypes the
        # package runs (int8 failed with a traceback at the first parameter; float64 passed here but not the dry run)
        from llmrec.models.backbone import checked_dtype_name

        name = checked_dtype_name(self.head_dtype, "head_dtype")
        if name == "auto":
            raise ValueError("head_dtype: name a dtype (bfloat16, float32, float16), not auto: the head is built "
                             "here, not loaded")
        self.head_dtype = name

    @property
    def torch_head_dtype(self) -> torch.dtype:
        return getattr(torch, self.head_dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatentConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LatentConfig keys {sorted(unknown)}")
        return cls(**data)

    def save_json(self, path: str | os.PathLike[str], **metadata: Any) -> None:
        """Write the config (plus ``metadata`` such as ``hidden_size``) as JSON."""
        payload = {"format": _FORMAT, "version": _FORMAT_VERSION, **metadata, "config": self.to_dict()}
        Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> tuple[LatentConfig, dict[str, Any]]:
        """Return ``(config, metadata)`` from a file written by :meth:`save_json`."""
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        if payload.get("format") != _FORMAT or "config" not in payload:
            raise ValueError(f"{path} is not an llmrec latent config")
        if payload.get("version", 0) > _FORMAT_VERSION:
            raise ValueError(f"{path}: latent config version {payload['version']} is newer than this llmrec")
        meta = {k: v for k, v in payload.items() if k not in ("format", "version", "config")}
        return cls.from_dict(payload["config"]), meta


# ---------------------------------------------------------------------------------------------- helpers


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a possibly PEFT-wrapped model (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def padding_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` with 0 on padding: the position ids ``generate`` uses, for either padding side."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def completion_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of already-aligned ``logits [B, T, V]`` against ``labels [B, T]`` (-100 = ignore).

    ``reduction="mean"`` averages over the labelled tokens of the batch (token-level mean, as HF's
    causal-LM loss); ``"sum"`` lets a trainer normalise by the token count over gradient accumulation.
    The softmax runs in float32 whatever the logits' dtype.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def build_naive_inputs(
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    completion_input_ids: torch.Tensor,
    completion_attention_mask: torch.Tensor,
    latent_token_ids: Sequence[int],
    pad_token_id: int,
    padding_side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay prompt + latent placeholders + completion out as one padded sequence per row.

    Inputs use the efficient form's layout (prompts in any padding, completions right-padded). Returns
    ``(input_ids, attention_mask, labels)`` of ``[B, L]`` in ``padding_side`` padding, labels -100 on the
    prompt, the latents and the padding. ``padding_side="right"`` is the SFT collator's layout.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    latent = torch.tensor(list(latent_token_ids), dtype=prompt_input_ids.dtype)
    rows = []
    for b in range(prompt_input_ids.shape[0]):
        p = prompt_input_ids[b][prompt_attention_mask[b].bool()].cpu()
        c = completion_input_ids[b][completion_attention_mask[b].bool()].cpu()
        ids = torch.cat([p, latent, c])
        lab = torch.cat([torch.full((len(p) + len(latent),), IGNORE_INDEX, dtype=ids.dtype), c])
        rows.append((ids, lab))
    width = max(len(ids) for ids, _ in rows)
    out_ids = torch.full((len(rows), width), pad_token_id, dtype=prompt_input_ids.dtype)
    out_mask = torch.zeros((len(rows), width), dtype=torch.long)
    out_lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=prompt_input_ids.dtype)
    for b, (ids, lab) in enumerate(rows):
        sl = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        out_ids[b, sl], out_mask[b, sl], out_lab[b, sl] = ids, 1, lab
    dev = prompt_input_ids.device
    return out_ids.to(dev), out_mask.to(dev), out_lab.to(dev)


def add_latent_tokens(tokenizer, model: nn.Module | None, config: LatentConfig) -> list[int]:
    """Register ``config.latent_tokens`` as special tokens and make sure the model has rows for them.

    * A token the tokenizer already knows (e.g. a checkpoint's tokenizer saved after an earlier call) is
      **reused** with its existing id and logged -- never added a second time.
    * Every latent token must encode to exactly one id; otherwise :class:`ValueError`.
    * The embedding matrix is resized only when an id does not fit: it grows to ``len(tokenizer)`` and is
      never shrunk (Qwen pads its matrix to 151,936 rows; shrinking it to the tokenizer's 151,666, as the
      reference code did, throws away rows for nothing). New rows get transformers' mean initialisation.
      The latent rows' input embeddings are never read by the latent forward (the latent positions take
      the pooled vectors), but a tied LM head scores them, so they must exist.

    ``model`` may be a PEFT model or ``None`` (tokenizer only). Sets ``config.latent_token_ids`` and
    returns the ids in latent order.
    """
    tokens = list(config.latent_tokens or [])
    if not tokens:
        config.latent_token_ids = []
        return []
    vocab = tokenizer.get_vocab()
    reused = {t: vocab[t] for t in tokens if t in vocab}
    if reused:
        logger.info("tokenizer already has latent token(s) %s; reusing their ids (no duplicates added)", reused)
    new = [t for t in tokens if t not in vocab]
    if new:
        tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]
    for tok, tid in zip(tokens, ids):
        enc = tokenizer.encode(tok, add_special_tokens=False)
        if enc != [tid]:
            raise ValueError(
                f"latent token {tok!r} must encode to exactly one id ({tid}) but encodes to {enc}; "
                "it is probably a plain (splittable) vocabulary entry -- choose another latent token string"
            )
    if len(set(ids)) != len(ids):
        raise ValueError(f"latent tokens {tokens} map to non-distinct ids {ids}")
    if model is not None:
        lm = _causal_lm(model)
        rows = lm.get_input_embeddings().weight.shape[0]
        if max(ids) >= rows:
            new_rows = max(len(tokenizer), max(ids) + 1)
            logger.info("resizing token embeddings %d -> %d rows for latent tokens %s", rows, new_rows, ids)
            lm.resize_token_embeddings(new_rows)
        else:
            logger.info("latent token ids %s fit the existing %d embedding rows; no resize", ids, rows)
    config.latent_token_ids = ids
    return ids


# ------------------------------------------------------------------------------------------ pooling head


def input_embedding_rms(weight: torch.Tensor) -> float:
    """Median over the vocabulary of each token embedding row's RMS (the median ignores a few outlier rows, e.g.
    never-trained padding rows of zeros).

    Rows are upcast in chunks, so a bf16 embedding of a large vocabulary is never copied whole in float32."""
    w = weight.detach()
    row_rms = torch.cat([chunk.float().pow(2).mean(-1).sqrt() for chunk in w.split(8192)])
    return float(row_rms.median())


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LatentPoolingHead(nn.Module):
    """Single-query attention with RoPE that pools a latent vector from final-layer hidden states.

    The paper's LatentRATT: Q, K, V are linear maps (with bias) of the hidden states H (taken after the
    LM's final norm); the query is the row at ``query_index`` (the position right before the latent),
    keys/values are the non-padding rows up to and including it. No output projection, residual or norm:
    the result is used directly as the latent position's input embedding, so V is full hidden width
    (split over heads). ``head_dim`` only sets the Q/K width per head.

    ``output_norm=True`` (not the paper) appends an RMSNorm with a learnable per-channel weight
    (``output_norm_weight``), which :class:`LatentReasoningLM` starts at the RMS of the LM's input embeddings:
    the paper's latent has the scale of final-layer hidden states, which for some LMs is hundreds of times a
    token embedding's, an input the LM never saw in pre-training.

    RoPE positions are per-row ``cumsum(mask) - 1`` (see :func:`padding_position_ids`), so a row gives
    the same result whether it is left- or right-padded; only relative offsets matter to RoPE, so the
    choice of origin is otherwise immaterial. Computation runs in the head's parameter dtype (float32 by
    default) whatever the dtype of ``hidden_states``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 1,
        head_dim: int | None = None,
        rope_base: float = 1000.0,
        dtype: torch.dtype = torch.float32,
        output_norm: bool = False,
        output_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by head_num_heads {num_heads}")
        head_dim = head_dim or hidden_size // num_heads
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.hidden_size, self.num_heads, self.head_dim, self.rope_base = hidden_size, num_heads, head_dim, rope_base
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=True, dtype=dtype)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=True, dtype=dtype)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=True, dtype=dtype)
        self.output_norm_eps = output_norm_eps
        self.output_norm_weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype)) if output_norm else None
        self.reset_parameters()

    @classmethod
    def from_config(cls, hidden_size: int, config: LatentConfig) -> LatentPoolingHead:
        return cls(hidden_size, config.head_num_heads, config.head_dim, config.rope_base, config.torch_head_dtype,
                   output_norm=config.head_output_norm)

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) weights and zero biases: HF's default init, which the paper's head got; an output norm's
        weight starts at 1 (see :meth:`scale_output_to`)."""
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=std)
            nn.init.zeros_(lin.bias)
        if self.output_norm_weight is not None:
            nn.init.ones_(self.output_norm_weight)

    @torch.no_grad()
    def scale_output_to(self, rms: float) -> None:
        """Start the output norm's weight at ``rms`` (every latent then has that RMS). Requires ``output_norm``."""
        if self.output_norm_weight is None:
            raise ValueError("scale_output_to needs a head built with output_norm=True")
        if not (rms > 0 and math.isfinite(rms)):
            raise ValueError(f"output RMS must be a positive finite number, got {rms}")
        self.output_norm_weight.fill_(rms)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, heads, T, d]; positions: [B, T]
        d = self.head_dim
        inv_freq = 1.0 / (
            self.rope_base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
        )
        angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, d/2]
        emb = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, T, d]
        return x * emb.cos().to(x.dtype) + _rotate_half(x) * emb.sin().to(x.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        query_index: torch.Tensor | int,
    ) -> torch.Tensor:
        """Pool ``[B, H]`` from ``hidden_states [B, T, H]``.

        Args:
            hidden_states: final-layer hidden states (after the final norm), any float dtype.
            attention_mask: ``[B, T]`` 0/1, 1 on real tokens (either padding side).
            query_index: ``[B]`` (or an int for all rows) column of the query, i.e. the position right
                before the latent; keys are the real tokens at columns ``<= query_index``.

        The head computes in its parameters' dtype (``head_dtype``) even inside an autocast region (the
        Trainer's ``bf16: true``), so training and inference pool alike.
        """
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            return self._pool(hidden_states, attention_mask, query_index)

    def _pool(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
              query_index: torch.Tensor | int) -> torch.Tensor:
        dtype = self.q_proj.weight.dtype
        b, t, _ = hidden_states.shape
        mask = attention_mask.to(hidden_states.device).bool()
        if isinstance(query_index, int):
            query_index = torch.full((b,), query_index, dtype=torch.long, device=hidden_states.device)
        cols = torch.arange(t, device=hidden_states.device)
        keep = mask & (cols[None, :] <= query_index[:, None])
        if not bool(mask.gather(1, query_index[:, None]).all()):
            raise ValueError("the pooling query must sit on a real (non-padding) token")
        # Zero padded rows first: whatever the LM left there (even NaN) must not leak through 0 * x.
        h = torch.where(keep[..., None], hidden_states, hidden_states.new_zeros(())).to(dtype)
        positions = padding_position_ids(mask)
        h_q = h[torch.arange(b, device=h.device), query_index]  # [B, H]
        nh, d = self.num_heads, self.head_dim
        q = self.q_proj(h_q).view(b, nh, 1, d)
        k = self.k_proj(h).view(b, t, nh, d).transpose(1, 2)
        v = self.v_proj(h).view(b, t, nh, self.hidden_size // nh).transpose(1, 2)
        q = self._rope(q, positions.gather(1, query_index[:, None]))
        k = self._rope(k, positions)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # [B, nh, 1, T]
        scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
        out = (scores.softmax(dim=-1) @ v).reshape(b, self.hidden_size)  # [B, H]
        if self.output_norm_weight is not None:
            out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.output_norm_eps) * self.output_norm_weight
        return out


# ------------------------------------------------------------------------------------------ the wrapper


@dataclass
class LatentLMOutput:
    """Output of :meth:`LatentReasoningLM.forward` / :meth:`~LatentReasoningLM.forward_naive`.

    ``logits`` and ``labels`` are *aligned*: ``logits[:, t]`` is the distribution scored against
    ``labels[:, t]`` (the shift is already done), so :func:`completion_cross_entropy` applies to both forms
    and ``logits[labels != -100]`` lists the completion tokens' logits in the same order for both.

    Attributes:
        logits: efficient form ``[B, C, V]`` (``logits[:, j]`` predicts ``completion_input_ids[:, j]``;
            for N >= 1, ``logits[:, 0]`` is the output at the last latent position). Naive form
            ``[B, L-1, V]``: the full sequence's logits without the last position.
        labels: same shape as ``logits[..., 0]``; the target token ids, -100 where nothing is scored.
            Logits at -100 positions (prompt, latents, padding) are unspecified and differ between the forms
            (the naive form does not project them: zeros).
        latents: ``[B, N, H]`` pooled latent vectors in the head's dtype (noise included), ``None`` for N=0.
        latent_hidden_states: ``[B, N, H]`` final-layer hidden states at the latent positions.
        scored_logits: naive form only, ``[S, V]``: the logits of the scored positions alone (``labels != -100``,
            row by row), what ``logits[labels != -100]`` holds; with ``full_logits=False`` the only logits built.
        loss: filled by :meth:`LatentReasoningLM.loss`.
    """

    logits: torch.Tensor | None
    labels: torch.Tensor
    latents: torch.Tensor | None = None
    latent_hidden_states: torch.Tensor | None = None
    scored_logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None


@dataclass
class LatentPrefix:
    """The state after the prompt and latents 1..N-1 went through the LM (see :meth:`~LatentReasoningLM.encode_prefix`).

    The last latent ``latents[:, -1]`` has been pooled but not yet fed to the LM: the next call feeds it
    (followed by answer tokens). For GRPO-style groups with N=1, the prefix of each prompt can be built
    once, expanded with :meth:`repeat_interleave`, and given differently-noised last latents
    (``dataclasses.replace(prefix, latents=prefix.latents + eps)``) before :meth:`decode_completion`.

    Attributes:
        past_key_values: transformers ``Cache`` of every consumed position (``None`` in cache-less mode).
        inputs_embeds: cache-less mode only (gradient checkpointing): every input embedding consumed so far.
        hidden_states: ``[B, T, H]`` final-layer hidden states of the consumed positions.
        attention_mask: ``[B, T]`` 0/1 over the consumed positions (prompt left-padded, then latents).
        position_ids: ``[B, T]`` position ids of the consumed positions.
        next_position_ids: ``[B]`` position id of the next input (the last latent, or the first answer
            token when N=0).
        latents: ``[B, N, H]`` pooled latents (head dtype), ``None`` when N=0.
        prompt_length: number of prompt columns ``P`` (the latents start at column P).
    """

    past_key_values: Any
    inputs_embeds: torch.Tensor | None
    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    next_position_ids: torch.Tensor
    latents: torch.Tensor | None
    prompt_length: int

    def repeat_interleave(self, repeats: int) -> LatentPrefix:
        """Each row ``repeats`` times in a row (a GRPO group per prompt). The cache is expanded in place."""
        if self.past_key_values is not None:
            self.past_key_values.batch_repeat_interleave(repeats)

        def rep(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.repeat_interleave(repeats, dim=0)

        return LatentPrefix(
            past_key_values=self.past_key_values,
            inputs_embeds=rep(self.inputs_embeds),
            hidden_states=rep(self.hidden_states),
            attention_mask=rep(self.attention_mask),
            position_ids=rep(self.position_ids),
            next_position_ids=rep(self.next_position_ids),
            latents=rep(self.latents),
            prompt_length=self.prompt_length,
        )


class LatentReasoningLM(nn.Module):
    """A causal LM with ``N`` latent reasoning tokens before the answer and the pooling head that fills them.

    Args:
        model: a transformers causal LM (Qwen2, Llama, ...) or a PEFT model wrapping one. It is kept as
            the submodule ``model`` (so ``.train()``, ``.to()`` and ``.parameters()`` cover it); the
            wrapper calls its decoder and LM head directly to compute logits only where needed.
        config: the latent configuration; for N >= 1 ``config.latent_token_ids`` must be set
            (see :func:`add_latent_tokens`).
        head: an existing pooling head (default: a freshly initialised one on the model's device).
    """

    def __init__(self, model: nn.Module, config: LatentConfig, head: LatentPoolingHead | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        n = config.num_latent_tokens
        if n and config.latent_token_ids is None:
            raise ValueError("config.latent_token_ids is not set: call add_latent_tokens(tokenizer, model, config)")
        rows = self.embed_tokens.weight.shape[0]
        if n and max(config.latent_token_ids) >= rows:
            raise ValueError(f"latent token ids {config.latent_token_ids} do not fit the {rows} embedding rows")
        hidden = self.lm_config.hidden_size
        if n == 0:
            if head is not None:
                raise ValueError("num_latent_tokens=0 takes no pooling head")
            self.latent_head = None
        else:
            if head is None:
                head = LatentPoolingHead.from_config(hidden, config)
                if head.output_norm_weight is not None:
                    head.scale_output_to(input_embedding_rms(self.embed_tokens.weight))
            if head.hidden_size != hidden:
                raise ValueError(f"pooling head width {head.hidden_size} != model hidden size {hidden}")
            self.latent_head = head.to(self.embed_tokens.weight.device)

    # -- access to the wrapped LM's parts (PEFT-transparent)

    @property
    def causal_lm(self) -> nn.Module:
        return _causal_lm(self.model)

    @property
    def lm_config(self):
        return self.causal_lm.config

    @property
    def embed_tokens(self) -> nn.Module:
        return self.causal_lm.get_input_embeddings()

    @property
    def num_latent_tokens(self) -> int:
        return self.config.num_latent_tokens

    def _decoder(self) -> nn.Module:
        return self.causal_lm.get_decoder()

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        # Apply the head to a contiguous 2-D view: on a sliced (non-contiguous) 3-D input, torch falls back to a
        # batched matmul that copies the whole [V, H] weight once per row (most of a GRPO step's time on CPU).
        flat = hidden.reshape(-1, hidden.shape[-1])
        return self.causal_lm.get_output_embeddings()(flat).view(*hidden.shape[:-1], -1)

    def _cache_usable(self) -> bool:
        """False when a checkpointed decoder layer would silently drop the KV cache (training + checkpointing)."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        return not any(
            isinstance(m, GradientCheckpointingLayer)
            and m.gradient_checkpointing
            and m.training
            and not getattr(m, "_can_checkpoint_with_cache", False)
            for m in self._decoder().modules()
        )

    def _run(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """One decoder call -> (final-layer hidden states after the final norm, cache)."""
        from llmrec.models.kv_cache_naming import cache_kwargs, returned_cache

        if use_cache and past_key_values is None:
            from transformers import DynamicCache

            past_key_values = DynamicCache(config=self.lm_config)
        out = self._decoder()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **cache_kwargs(past_key_values if use_cache else None),
        )
        return out.last_hidden_state, (returned_cache(out) if use_cache else None)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor, query_index: torch.Tensor | int) -> torch.Tensor:
        assert self.latent_head is not None
        return self.latent_head(hidden, mask, query_index)

    @staticmethod
    def _check_noise(noise: torch.Tensor | None, b: int, n: int, h: int) -> None:
        if noise is not None and tuple(noise.shape) != (b, n, h):
            raise ValueError(f"latent_noise must have shape {(b, n, h)}, got {tuple(noise.shape)}")

    # -- efficient form

    def encode_prefix(
        self,
        prompt_input_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor | None = None,
        *,
        latent_noise: torch.Tensor | None = None,
        use_cache: bool | None = None,
    ) -> LatentPrefix:
        """Consume the left-padded prompt, pool every latent, feed latents 1..N-1 through the LM.

        ``latent_noise [B, N, H]`` is added to each pooled latent before it is used (LR-GRPO's
        ``r + eps``); with N > 1 a noised latent also changes the later latents, as in the paper's
        sequential form. ``use_cache=None`` uses the KV cache unless gradient checkpointing is active.
        """
        if prompt_attention_mask is None:
            prompt_attention_mask = torch.ones_like(prompt_input_ids)
        mask = prompt_attention_mask.to(device=prompt_input_ids.device, dtype=torch.long)
        if not bool(mask[:, -1].all()):
            raise ValueError("prompts must be left-padded (prompt_attention_mask[:, -1] must be all ones)")
        if use_cache is None:
            use_cache = self._cache_usable()
        elif use_cache and not self._cache_usable():
            raise ValueError("use_cache=True while gradient checkpointing is active: transformers would drop the cache")
        b, p = prompt_input_ids.shape
        n, hsz = self.num_latent_tokens, self.lm_config.hidden_size
        self._check_noise(latent_noise, b, n, hsz)
        embeds = self.embed_tokens(prompt_input_ids)
        positions = padding_position_ids(mask)
        hidden, cache = self._run(embeds, mask, positions, None, use_cache)
        next_pos = mask.sum(-1)
        latents = []
        for i in range(n):
            # Left padding: the query (last prompt token, then the previous latent) is always the last column.
            r = self._pool(hidden, mask, hidden.shape[1] - 1)
            if latent_noise is not None:
                r = r + latent_noise[:, i].to(r.dtype)
            latents.append(r)
            if i == n - 1:
                break  # the last latent is fed together with whatever follows it
            e = r[:, None].to(embeds.dtype)
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            positions = torch.cat([positions, next_pos[:, None]], dim=1)
            if use_cache:
                h_new, cache = self._run(e, mask, next_pos[:, None], cache, True)
                hidden = torch.cat([hidden, h_new], dim=1)
            else:
                embeds = torch.cat([embeds, e], dim=1)
                hidden, _ = self._run(embeds, mask, positions)
            next_pos = next_pos + 1
        return LatentPrefix(
            past_key_values=cache,
            inputs_embeds=None if use_cache else embeds,
            hidden_states=hidden,
            attention_mask=mask,
            position_ids=positions,
            next_position_ids=next_pos,
            latents=torch.stack(latents, dim=1) if latents else None,
            prompt_length=p,
        )

    def decode_completion(
        self,
        prefix: LatentPrefix,
        completion_input_ids: torch.Tensor,
        completion_attention_mask: torch.Tensor | None = None,
    ) -> LatentLMOutput:
        """Feed [last latent, completion tokens] on top of ``prefix`` and return aligned completion logits.

        The cache in ``prefix`` is extended in place (``crop`` it to reuse the prefix).
        """
        if completion_attention_mask is None:
            completion_attention_mask = torch.ones_like(completion_input_ids)
        cmask = completion_attention_mask.to(device=completion_input_ids.device, dtype=torch.long)
        if bool((cmask[:, 1:] > cmask[:, :-1]).any()):
            raise ValueError("completions must be right-padded")
        b, c = completion_input_ids.shape
        n = self.num_latent_tokens
        embeds = self.embed_tokens(completion_input_ids)
        if n:
            embeds = torch.cat([prefix.latents[:, -1:].to(embeds.dtype), embeds], dim=1)
            new_mask = torch.cat([cmask.new_ones(b, 1), cmask], dim=1)
        else:
            new_mask = cmask
        steps = torch.arange(embeds.shape[1], device=embeds.device)
        new_pos = prefix.next_position_ids[:, None] + steps[None, :]
        mask = torch.cat([prefix.attention_mask, new_mask], dim=1)
        if prefix.inputs_embeds is None:
            h, _ = self._run(embeds, mask, new_pos, prefix.past_key_values, True)
        else:
            all_pos = torch.cat([prefix.position_ids, new_pos], dim=1)
            h_all, _ = self._run(torch.cat([prefix.inputs_embeds, embeds], dim=1), mask, all_pos)
            h = h_all[:, prefix.attention_mask.shape[1]:]
        if n:
            # h[:, 0] is the last latent's output (predicts completion token 0); h[:, j] predicts token j.
            scored = h[:, :c]
            latent_hidden = torch.cat([prefix.hidden_states[:, prefix.prompt_length:], h[:, :1]], dim=1)
        else:
            scored = torch.cat([prefix.hidden_states[:, -1:], h[:, : c - 1]], dim=1)
            latent_hidden = None
        labels = completion_input_ids.masked_fill(cmask == 0, IGNORE_INDEX)
        return LatentLMOutput(
            logits=self._lm_head(scored), labels=labels, latents=prefix.latents, latent_hidden_states=latent_hidden
        )

    def forward(
        self,
        prompt_input_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        completion_input_ids: torch.Tensor,
        completion_attention_mask: torch.Tensor | None = None,
        *,
        latent_noise: torch.Tensor | None = None,
        return_loss: bool = False,
    ) -> LatentLMOutput:
        """Efficient latent forward (one LM pass over prompt + latents + completion, cache-reused).

        Args:
            prompt_input_ids / prompt_attention_mask: ``[B, P]``, **left**-padded (every prompt ends at
                the last column, right before the latents).
            completion_input_ids / completion_attention_mask: ``[B, C]`` answer tokens (EOS included),
                **right**-padded.
            latent_noise: optional ``[B, N, H]`` added to the pooled latents (LR-GRPO).
            return_loss: also set ``loss`` (mean CE over the completion tokens). Use this rather than
                :meth:`loss` when the wrapper is inside DistributedDataParallel: DDP only arms its gradient
                all-reduce when its own ``forward`` is called.

        Returns a :class:`LatentLMOutput` with aligned ``logits [B, C, V]`` / ``labels [B, C]``.
        With ``num_latent_tokens=0`` this is one plain LM pass over [prompt, completion].
        """
        if self.num_latent_tokens == 0:
            out = self._forward_plain(
                prompt_input_ids, prompt_attention_mask, completion_input_ids, completion_attention_mask
            )
        else:
            prefix = self.encode_prefix(prompt_input_ids, prompt_attention_mask, latent_noise=latent_noise)
            out = self.decode_completion(prefix, completion_input_ids, completion_attention_mask)
        if return_loss:
            out.loss = completion_cross_entropy(out.logits, out.labels)
        return out

    def _forward_plain(
        self,
        prompt_input_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        completion_input_ids: torch.Tensor,
        completion_attention_mask: torch.Tensor | None,
    ) -> LatentLMOutput:
        # The BIGRec path: one pass, logits only where a completion token is predicted.
        if completion_attention_mask is None:
            completion_attention_mask = torch.ones_like(completion_input_ids)
        pmask = prompt_attention_mask.to(device=prompt_input_ids.device, dtype=torch.long)
        cmask = completion_attention_mask.to(device=prompt_input_ids.device, dtype=torch.long)
        if not bool(pmask[:, -1].all()):
            raise ValueError("prompts must be left-padded (prompt_attention_mask[:, -1] must be all ones)")
        p, c = prompt_input_ids.shape[1], completion_input_ids.shape[1]
        mask = torch.cat([pmask, cmask], dim=1)
        embeds = self.embed_tokens(torch.cat([prompt_input_ids, completion_input_ids], dim=1))
        hidden, _ = self._run(embeds, mask, padding_position_ids(mask))
        labels = completion_input_ids.masked_fill(cmask == 0, IGNORE_INDEX)
        return LatentLMOutput(logits=self._lm_head(hidden[:, p - 1 : p - 1 + c]), labels=labels)

    # -- naive (reference) form

    def _latent_columns(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` columns of the latent placeholders; each row must hold them once, contiguous, in order."""
        n = self.num_latent_tokens
        ids = torch.tensor(self.config.latent_token_ids, device=input_ids.device)
        is_latent = torch.isin(input_ids, ids) & attention_mask.bool()
        counts = is_latent.sum(-1)
        if bool((counts != n).any()):
            raise ValueError(f"every row must contain the {n} latent token(s) exactly once; counts {counts.tolist()}")
        cols = is_latent.nonzero()[:, 1].view(-1, n)
        if n > 1 and bool((cols.diff(dim=1) != 1).any()):
            raise ValueError("latent tokens must be contiguous")
        if bool((input_ids.gather(1, cols) != ids[None, :]).any()):
            raise ValueError(f"latent tokens must appear in the configured order {self.config.latent_token_ids}")
        return cols

    def forward_naive(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        latent_noise: torch.Tensor | None = None,
        full_logits: bool = True,
    ) -> LatentLMOutput:
        """The paper's reference computation: N+1 LM passes over the whole sequence.

        Args:
            input_ids / attention_mask: ``[B, L]`` rows of [prompt, latent tokens, completion], left- or
                right-padded (see :func:`build_naive_inputs`).
            labels: ``[B, L]`` targets, -100 on prompt, latents and padding. Default (N >= 1): the real
                tokens after the last latent. Required for N = 0.
            full_logits: also lay the scored logits out as ``[B, L-1, V]`` (``logits``); False leaves ``logits``
                None and only ``scored_logits`` built (the loss and GRPO's naive form read those: filling and
                reading back the full buffer cost ~70 ms per SmolLM2 row, ~2% of a naive GRPO step, a review).

        Pass i (i = 1..N) runs the LM with latents 1..i-1 already substituted, pools latent i with the
        query at the column right before it, and substitutes it; the last pass gives the logits.
        """
        mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
        b, length = input_ids.shape
        n, hsz = self.num_latent_tokens, self.lm_config.hidden_size
        self._check_noise(latent_noise, b, n, hsz)
        if n == 0 and labels is None:
            raise ValueError("forward_naive needs labels when num_latent_tokens=0")
        positions = padding_position_ids(mask)
        embeds = self.embed_tokens(input_ids)
        cols = self._latent_columns(input_ids, mask) if n else None
        latents = []
        col_range = torch.arange(length, device=input_ids.device)
        for i in range(n):
            hidden, _ = self._run(embeds, mask, positions)
            r = self._pool(hidden, mask, cols[:, i] - 1)
            if latent_noise is not None:
                r = r + latent_noise[:, i].to(r.dtype)
            latents.append(r)
            at = (col_range[None, :] == cols[:, i : i + 1])[..., None]
            embeds = torch.where(at, r[:, None].to(embeds.dtype), embeds)
        hidden, _ = self._run(embeds, mask, positions)
        if labels is None:
            after = col_range[None, :] > cols[:, -1:]
            labels = input_ids.masked_fill(~(after & mask.bool()), IGNORE_INDEX)
        latent_hidden = hidden.gather(1, cols[..., None].expand(-1, -1, hsz)) if n else None
        # The LM head at the scored positions only (the others' logits are unspecified, here zeros): the vocabulary
        # projection of every prompt position was most of the head's cost and would flatter a comparison with the
        # efficient form, which projects only the completion (benchmark review).
        shifted = labels[:, 1:]
        scored = shifted != IGNORE_INDEX
        projected = self._lm_head(hidden[:, :-1][scored])
        logits = None
        if full_logits:
            logits = projected.new_zeros(b, length - 1, projected.shape[-1])
            logits[scored] = projected
        return LatentLMOutput(
            logits=logits,
            labels=shifted,
            latents=torch.stack(latents, dim=1) if latents else None,
            latent_hidden_states=latent_hidden,
            scored_logits=projected,
        )

    # -- loss

    def loss(
        self,
        prompt_input_ids: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        completion_input_ids: torch.Tensor | None = None,
        completion_attention_mask: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        latent_noise: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> LatentLMOutput:
        """Cross-entropy over the completion tokens; returns the output with ``loss`` set.

        Pass the efficient form's four tensors, or ``input_ids``/``attention_mask`` (and optionally
        ``labels``) for the naive form. Both score exactly the completion tokens (never prompt, latents
        or padding), so they give the same loss. Under DDP call ``ddp_model(..., return_loss=True)``
        instead (this method bypasses DDP's forward).
        """
        if input_ids is not None:
            if prompt_input_ids is not None:
                raise ValueError("pass either the prompt/completion tensors or input_ids, not both")
            out = self.forward_naive(input_ids, attention_mask, labels, latent_noise=latent_noise, full_logits=False)
            scored = out.labels != IGNORE_INDEX  # the same tokens, the same mean, without the [B, L-1, V] buffer
            out.loss = completion_cross_entropy(out.scored_logits[None], out.labels[scored][None], reduction)
            return out
        else:
            if prompt_input_ids is None or completion_input_ids is None:
                raise ValueError("loss needs prompt and completion tensors (or input_ids for the naive form)")
            out = self.forward(
                prompt_input_ids, prompt_attention_mask, completion_input_ids, completion_attention_mask,
                latent_noise=latent_noise,
            )
        out.loss = completion_cross_entropy(out.logits, out.labels, reduction)
        return out

    # -- generation

    @torch.no_grad()
    def prefill_with_latents(
        self, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor | None = None,
        latent_noise: torch.Tensor | None = None, repeats: int = 1,
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill left-padded prompts and the (noise-free) latents for decoding.

        Returns ``(past_key_values, last_logits [B, V], attention_mask [B, P+N], next_position_ids [B])``:
        ``last_logits`` is the output at the last latent (the last prompt token when N=0) and predicts the
        first answer token; continue decoding with the cache, appending a 1 to the mask and using
        ``next_position_ids`` (+1 per step). Matches ``llmrec.decoding.beam_search.PromptState``.

        ``repeats``: every prompt becomes that many consecutive rows (``B * repeats`` rows; the prompt pass runs
        once); ``latent_noise`` ``[B * repeats, H]`` is added to each row's last latent (GRPO's members).
        """
        prefix = self.encode_prefix(prompt_input_ids, prompt_attention_mask, use_cache=True)
        if self.num_latent_tokens == 0:
            if latent_noise is not None:
                raise ValueError("latent_noise needs a latent token (num_latent_tokens >= 1)")
            if repeats > 1:
                prefix = prefix.repeat_interleave(repeats)
            last = prefix.hidden_states[:, -1]
            return prefix.past_key_values, self._lm_head(last), prefix.attention_mask, prefix.next_position_ids
        if repeats > 1:
            prefix = prefix.repeat_interleave(repeats)
        b = prompt_input_ids.shape[0] * repeats
        e = prefix.latents[:, -1:]
        if latent_noise is not None:
            if tuple(latent_noise.shape) != (b, e.shape[-1]):  # not broadcast: one row's noise would reach every row
                raise ValueError(f"latent_noise must have shape {(b, e.shape[-1])} (prompts x repeats, hidden), "
                                 f"got {tuple(latent_noise.shape)}")
            e = e + latent_noise[:, None].to(e.dtype)
        e = e.to(self.embed_tokens.weight.dtype)
        mask = torch.cat([prefix.attention_mask, prefix.attention_mask.new_ones(b, 1)], dim=1)
        h, cache = self._run(e, mask, prefix.next_position_ids[:, None], prefix.past_key_values, True)
        return cache, self._lm_head(h[:, -1]), mask, prefix.next_position_ids + 1

    # -- persistence

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``latent_config.json`` (ids included) and, for N >= 1, ``latent_head.safetensors``.

        The LM itself (adapter or full weights) and the tokenizer are saved by their own
        ``save_pretrained``; always ship the tokenizer with the latent config.
        """
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {"hidden_size": self.lm_config.hidden_size}
        if self.latent_head is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in self.latent_head.state_dict().items()}
            save_file(state, str(out / LATENT_HEAD_NAME), metadata={"format": _FORMAT})
        self.config.save_json(out / LATENT_CONFIG_NAME, **meta)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], base_model: nn.Module, tokenizer=None
    ) -> LatentReasoningLM:
        """Rebuild the wrapper around ``base_model`` (already carrying its adapter) from ``directory``.

        With ``tokenizer`` given, checks that each latent token still maps to its stored id.
        """
        from llmrec.safetensors_io import load_safetensors

        folder = Path(directory)
        config, meta = LatentConfig.load_json(folder / LATENT_CONFIG_NAME)
        hidden = _causal_lm(base_model).config.hidden_size
        if meta.get("hidden_size", hidden) != hidden:
            raise ValueError(f"latent head was trained for hidden size {meta['hidden_size']}, model has {hidden}")
        if tokenizer is not None and config.num_latent_tokens:
            got = [tokenizer.convert_tokens_to_ids(t) for t in config.latent_tokens]
            if got != config.latent_token_ids:
                raise ValueError(
                    f"tokenizer maps latent tokens {config.latent_tokens} to {got}, checkpoint stores "
                    f"{config.latent_token_ids}: load the tokenizer saved with the checkpoint"
                )
        head = None
        if config.num_latent_tokens:
            head = LatentPoolingHead.from_config(hidden, config)
            head.load_state_dict(load_safetensors(folder / LATENT_HEAD_NAME), strict=True)
        return cls(base_model, config, head)
