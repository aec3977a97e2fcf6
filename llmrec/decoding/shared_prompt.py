"""Beams that share their prompt's KV cache instead of each holding a copy of it.

In beam search every beam of a prompt attends to the same prompt positions. The plain form keeps one KV
cache row per beam and re-gathers all of it (``Cache.reorder_cache``: prompt and generated positions) at
every step, then concatenates the new token: on a few-hundred-token prompt and ~10-token titles that copy,
and the attention over it run beam by beam, are most of a decoding step's time. Here the prompt's keys and
values stay in one row per prompt, only the generated positions live per beam (a short cache that is cheap
to reorder), and one attention function joins the two:

* the beams of a prompt are laid out as the query rows of one matrix product against that prompt's keys
  (``[slots x heads, D] @ [D, P]``: one pass over the prompt's cache for all its beams);
* each beam's scores over its own generated positions are computed apart;
* one softmax over the concatenated scores (the prompt's left padding masked), then the two weighted sums
  of values are added. That is exactly attention over ``[prompt ; generated]``; only the summation order
  differs from the per-beam form: float rounding, which after SmolLM2's 30 layers moves fp32 title scores by
  ~1e-6, so a near-tied beam can be kept by one form and dropped by the other (1 of 24 Games rows measured).

It plugs into transformers through its attention interface (``AttentionInterface.register``): a model's
attention layer projects and rotates the new token's query and key as usual, appends them to the per-beam
cache passed as the model's cache, and hands them to the registered function, which reads the prompt's
keys and values from a :class:`SharedPrompt` passed as a keyword argument of the model call. Used only for
the single-token decoding steps of :func:`~llmrec.decoding.beam_search.constrained_beam_search_from_state`,
and only for architectures whose attention follows that functional pattern and attends to every position
(:func:`supports_shared_prompt`); other models keep the per-beam cache. The model's attention implementation is
switched for each decoding step (:func:`use_shared_prompt_attention`) to a name registered per original
implementation (``llmrec_shared_prompt+sdpa``, ``+eager``, ...), whose mask function and whose attention for a call
without ``shared_prompt=`` are the original's: a forward of another thread during a search computes what it would
without it, whichever side of a switch its layers run on.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "SHARED_PROMPT_ATTENTION",
    "SharedPrompt",
    "shared_prompt_attention",
    "supports_shared_prompt",
    "use_shared_prompt_attention",
]

SHARED_PROMPT_ATTENTION = "llmrec_shared_prompt"

# Decoder architectures whose attention calls ``ALL_ATTENTION_FUNCTIONS`` with (module, query, key, value, ...)
# after ``cache.update`` and whose modules carry ``layer_idx``, with full (not sliding-window) attention when the
# config says so. Kept to what the package loads and tests; another architecture falls back to the per-beam cache.
_SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})


@dataclass
class SharedPrompt:
    """The prompts' cached keys and values, one row per prompt, and where each live beam reads them.

    Attributes:
        keys, values: per layer, ``[R, H_kv, P, D]`` (the prompt-side cache; a latent appended at prefill
            is part of it).
        prompt_mask: ``[R, P]`` bool, True on real (non-padding) positions.
        beam_row: ``[N]`` prompt row of each live beam, non-decreasing (beams grouped by row).
        beam_slot: ``[N]`` index of the beam among its row's live beams.
        slots: the most live beams any row has (the query rows laid out per prompt).
        row_ids: ``[R]`` the prompt each row holds, numbered as when built (rows whose search ended are dropped).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    prompt_mask: torch.Tensor
    beam_row: torch.Tensor
    beam_slot: torch.Tensor
    slots: int
    row_ids: torch.Tensor | None = None

    @classmethod
    def from_cache(cls, cache, prompt_mask: torch.Tensor) -> SharedPrompt:
        """Take the layers of a prefilled transformers ``Cache`` (``R`` rows) as the shared prompt (in fp32 when the
        cache is in half precision: one copy of ``R`` rows, read by every step)."""
        layers = getattr(cache, "layers", None)
        if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
            raise ValueError(f"the prompt cache ({type(cache).__name__}) holds no keys and values to share")
        for i, layer in enumerate(layers):
            if tuple(layer.keys.shape[::2]) != tuple(prompt_mask.shape):
                raise ValueError(
                    f"layer {i} of the prompt cache holds {layer.keys.shape[2]} positions of {layer.keys.shape[0]} "
                    f"rows, the prompt mask {prompt_mask.shape[1]} of {prompt_mask.shape[0]} (a sliding-window or "
                    "static cache?): the shared prompt needs every prompt position, one row per prompt"
                )
        empty = torch.zeros(0, dtype=torch.long, device=prompt_mask.device)

        def wide(t: torch.Tensor) -> torch.Tensor:
            return t.to(torch.promote_types(t.dtype, torch.float32))

        return cls(
            keys=[wide(layer.keys) for layer in cache.layers], values=[wide(layer.values) for layer in cache.layers],
            prompt_mask=prompt_mask.bool(), beam_row=empty, beam_slot=empty, slots=0,
            row_ids=torch.arange(prompt_mask.shape[0], device=prompt_mask.device),
        )

    @property
    def num_rows(self) -> int:
        return self.prompt_mask.shape[0]

    def set_beams(self, prompt_of_beam: torch.Tensor) -> None:
        """Point the live beams at their prompts (``prompt_of_beam``: each beam's prompt, as numbered when the
        shared prompt was built, non-decreasing). Prompt rows left without a beam are dropped first, so that a
        prompt whose search is done no longer costs attention."""
        alive, beam_row = torch.unique_consecutive(prompt_of_beam, return_inverse=True)
        if alive.numel() < self.num_rows:
            keep = torch.searchsorted(self.row_ids, alive)
            self.keys = [k.index_select(0, keep) for k in self.keys]
            self.values = [v.index_select(0, keep) for v in self.values]
            self.prompt_mask = self.prompt_mask.index_select(0, keep)
            self.row_ids = alive
        counts = torch.bincount(beam_row, minlength=self.num_rows)
        starts = counts.cumsum(0) - counts
        self.beam_row = beam_row
        self.beam_slot = torch.arange(beam_row.numel(), device=beam_row.device) - starts[beam_row]
        self.slots = int(counts.max())


def shared_prompt_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    shared_prompt: SharedPrompt | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of one new token per beam over its prompt (shared) and its own generated positions.

    ``query`` ``[N, H, 1, D]``; ``key``/``value`` ``[N, H_kv, t, D]``: the beam's generated positions, the
    new one included (what the per-beam cache's ``update`` returned). ``attention_mask`` is not used: every
    generated position is attended, and the prompt's padding comes from ``shared_prompt.prompt_mask``.
    Returns ``([N, 1, H, D], None)`` as transformers' attention functions do.
    """
    if shared_prompt is None:
        raise ValueError("shared_prompt_attention needs the prompts' cache (shared_prompt=)")
    n, heads, q_len, dim = query.shape
    if q_len != 1:
        raise ValueError(f"shared-prompt attention decodes one token per beam, got {q_len} query positions")
    if dropout:
        raise ValueError("shared-prompt attention is for evaluation: attention dropout must be 0")
    sp = shared_prompt
    pk, pv = sp.keys[module.layer_idx], sp.values[module.layer_idx]
    rows, kv_heads, prompt_len, _ = pk.shape
    groups = heads // kv_heads  # query heads per key/value head (grouped-query attention)
    slots = sp.slots
    if scaling is None:
        scaling = dim**-0.5
    # The whole attention in fp32 at least (the prompt side was stored so): bf16 scores and weights would add
    # rounding that transformers' SDPA kernels, which accumulate in fp32, do not.
    acc = torch.promote_types(query.dtype, torch.float32)
    q = query[:, :, 0, :].to(acc)  # [N, H, D]
    pk, pv = pk.to(acc), pv.to(acc)  # no copy when stored wide (from_cache)
    # Layers may sit on several devices (device_map): the rows and mask follow the layer's cache (no copy when there).
    beam_row, beam_slot = sp.beam_row.to(pk.device), sp.beam_slot.to(pk.device)
    prompt_mask = sp.prompt_mask.to(pk.device)

    # Prompt side: a prompt's beams become the query rows of one product with its keys. [R, Hkv, S*G, D]
    q_pad = q.new_zeros(rows, slots, heads, dim)
    q_pad[beam_row, beam_slot] = q
    q_pad = q_pad.view(rows, slots, kv_heads, groups, dim).permute(0, 2, 1, 3, 4).reshape(
        rows, kv_heads, slots * groups, dim
    )
    prompt_scores = torch.matmul(q_pad, pk.transpose(-1, -2)) * scaling  # [R, Hkv, S*G, P]
    prompt_scores = prompt_scores.masked_fill(~prompt_mask[:, None, None, :], float("-inf"))
    prompt_scores = prompt_scores.view(rows, kv_heads, slots, groups, prompt_len).permute(0, 2, 1, 3, 4)
    prompt_scores = prompt_scores[beam_row, beam_slot]  # [N, Hkv, G, P]

    # Generated side: each beam against its own few positions. [N, Hkv, G, t]
    q_beam = q.view(n, kv_heads, groups, dim)
    own_scores = torch.matmul(q_beam, key.to(acc).transpose(-1, -2)) * scaling

    # One softmax over [prompt ; generated].
    probs = torch.softmax(torch.cat([prompt_scores, own_scores], dim=-1), dim=-1)
    prompt_probs, own_probs = probs.split([prompt_len, key.shape[2]], dim=-1)

    p_pad = probs.new_zeros(rows, slots, kv_heads, groups, prompt_len)
    p_pad[beam_row, beam_slot] = prompt_probs
    p_pad = p_pad.permute(0, 2, 1, 3, 4).reshape(rows, kv_heads, slots * groups, prompt_len)
    prompt_out = torch.matmul(p_pad, pv).view(rows, kv_heads, slots, groups, dim).permute(0, 2, 1, 3, 4)
    out = prompt_out[beam_row, beam_slot] + torch.matmul(own_probs, value.to(acc))  # [N, Hkv, G, D]
    return out.reshape(n, 1, heads, dim).to(query.dtype), None


def _model_eager_attention(module: torch.nn.Module):
    """The eager attention function of ``module``'s modeling file: what its layers fall back to for ``"eager"``."""
    return sys.modules[type(module).__module__].eager_attention_forward


class _AsImplementation:
    """``module`` seen through a config whose ``_attn_implementation`` is ``implementation`` (everything else is
    the module's and its config's own)."""

    def __init__(self, module: torch.nn.Module, implementation: str):
        self._module = module
        self.config = _ConfigAs(module.config, implementation)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


class _ConfigAs:
    def __init__(self, config, implementation: str):
        self._config = config
        self._attn_implementation = implementation

    def __getattr__(self, name: str):
        return getattr(self._config, name)


def _switched_implementation(own: str | None) -> str:
    """The name of the attention implementation a search switches a model whose own implementation is ``own`` to.

    Its decoding steps (``shared_prompt=`` given) run :func:`shared_prompt_attention`; any other forward (another
    thread using the model during a search) runs the model's own attention with the mask of the model's own mask
    function, so that a forward whose layers straddle a switch sees one mask and one attention throughout.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    own = own or "eager"
    name = f"{SHARED_PROMPT_ATTENTION}+{own}"
    with _switch_lock:
        if name in AttentionInterface._global_mapping:
            return name

        def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, shared_prompt=None,
                      **kwargs):
            if shared_prompt is None:
                fallback = ALL_ATTENTION_FUNCTIONS.get_interface(own, _model_eager_attention(module))
                # The module as its own implementation sees it: FlashAttention's forward picks its kernel by
                # module.config._attn_implementation, which names the switched implementation meanwhile.
                return fallback(_AsImplementation(module, own), query, key, value, attention_mask, dropout=dropout,
                                scaling=scaling, **kwargs)
            return shared_prompt_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                           shared_prompt=shared_prompt)

        AttentionInterface.register(name, attention)
        own_mask = AttentionMaskInterface._global_mapping.get(own)
        if own_mask is not None:  # else transformers builds no mask for either name
            AttentionMaskInterface.register(name, own_mask)
    return name


def supports_shared_prompt(model) -> bool:
    """Whether ``model`` (a transformers causal LM, possibly PEFT-wrapped) can decode with a shared prompt: a
    supported architecture whose every layer attends to every position (no sliding window: Mistral's default
    4,096-token window, or Qwen2's when ``use_sliding_window`` is on, keeps the per-beam cache)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in _SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "sliding_window", None) is not None:
        return False  # a window hides far positions (and the prefill cache keeps only the window): not computed here
    layer_types = getattr(config, "layer_types", None)
    return layer_types is None or all(t == "full_attention" for t in layer_types)


# config id -> (blocks inside use_shared_prompt_attention, the implementation to restore after the last one)
_switched: dict[int, tuple[int, str | None]] = {}
_switch_lock = threading.RLock()


@contextlib.contextmanager
def use_shared_prompt_attention(model) -> Iterator[None]:
    """Switch ``model``'s attention to the shared-prompt one for the duration of the block; the model's own
    implementation is restored when the last such block on it ends, errors included. Searches in several threads on
    one model nest, and an ordinary forward meanwhile computes what it computes without them."""
    config = model.config
    key = id(config)
    with _switch_lock:
        depth, own = _switched.get(key, (0, config._attn_implementation))
        _switched[key] = (depth + 1, own)
        config._attn_implementation = _switched_implementation(own)
    try:
        yield
    finally:
        with _switch_lock:
            depth, own = _switched.pop(key)
            if depth > 1:
                _switched[key] = (depth - 1, own)
            else:
                config._attn_implementation = own
