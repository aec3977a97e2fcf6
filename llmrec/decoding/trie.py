"""A prefix trie over the catalogue's title completions, stored as tensors for batched decoding.

Each catalogue title becomes one token path: the tokens of ``completion_format.format(title=title)``
(D3 format ``"{title}"\\n`` by default) followed by EOS. Constrained beam search walks this trie: a beam's
state is a node index, and the tokens it may emit next are that node's children.

The trie is stored in CSR form so that the allowed tokens of *all* beams can be gathered with a few tensor
ops (no per-beam Python):

* ``child_ptr[n] : child_ptr[n + 1]`` is the slice of ``child_tokens`` / ``child_nodes`` holding the
  children of node ``n`` (sorted by token id);
* ``depth[n]`` is the number of tokens from the root to ``n``;
* ``terminal[n]`` is the index (into :attr:`TitleTrie.titles`) of the title whose path ends at ``n``,
  or ``-1``.

Node 0 is the root, i.e. the position right after the prompt's answer prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_COMPLETION_FORMAT = '"{title}"\n'


class TitleTokenizationError(ValueError):
    """Raised when titles do not tokenize the same after the answer prefix as on their own."""


@dataclass(frozen=True)
class TrieTensors:
    """The CSR arrays of a :class:`TitleTrie` on one device (see the module docstring)."""

    child_ptr: torch.Tensor  # [num_nodes + 1] int64
    child_tokens: torch.Tensor  # [num_edges] int64
    child_nodes: torch.Tensor  # [num_edges] int64
    depth: torch.Tensor  # [num_nodes] int64
    terminal: torch.Tensor  # [num_nodes] int64, title index or -1


class TitleTrie:
    """Token trie over the distinct catalogue titles, with the title -> item ids mapping.

    Args:
        tokenizer: a Hugging Face tokenizer (fast or slow).
        titles: one title per catalogue item.
        item_ids: the item id of each entry of ``titles`` (unique).
        context_prefix: the text the prompt ends with right before the completion (the answer prefix,
            e.g. ``"### Response: \\n"``). Used to check that every completion tokenizes the same in
            context as on its own, which is what makes the trie's token paths the ones the model sees.
        completion_format: how a title is rendered as the completion; must contain ``{title}``.
        add_eos: append ``eos_token_id`` to every completion, so that a path ends exactly when the model
            emits EOS (this is what makes the search stop, as transformers' EOS stopping criterion does).
        eos_token_id: defaults to ``tokenizer.eos_token_id`` (pass e.g. ``<|im_end|>`` for chat models).
        joint_tokenization: ``True`` when prompt and completion are tokenized as one string (then every
            title must tokenize the same after ``context_prefix`` as alone, checked here); ``False`` for
            D3's convention of tokenizing them separately and concatenating the ids.

    Items sharing a title share one path; :attr:`title_item_ids` keeps the item ids of each distinct
    title (ascending). Distinct titles are numbered in order of first appearance in ``titles``.

    Raises:
        ValueError: on an empty catalogue, mismatched lengths, duplicate item ids, a completion that
            contains EOS before its end, distinct titles whose completions tokenize identically (the message
            names each such pair with its items, up to five, and the count), or (``add_eos=False``) a completion
            that is a token-prefix of another, which would leave the end of a title ambiguous.
        TitleTokenizationError: if some titles tokenize differently in context (the message names the
            first few and gives the count).
    """

    def __init__(
        self,
        tokenizer,
        titles: Sequence[str],
        item_ids: Sequence[int],
        *,
        context_prefix: str,
        completion_format: str = DEFAULT_COMPLETION_FORMAT,
        add_eos: bool = True,
        eos_token_id: int | None = None,
        joint_tokenization: bool = True,
    ) -> None:
        titles = list(titles)
        item_ids = [int(i) for i in item_ids]
        if len(titles) == 0:
            raise ValueError("cannot build a TitleTrie from an empty catalogue (no titles given)")
        if len(titles) != len(item_ids):
            raise ValueError(f"got {len(titles)} titles but {len(item_ids)} item ids")
        if len(set(item_ids)) != len(item_ids):
            seen: set[int] = set()
            dups = sorted({i for i in item_ids if i in seen or seen.add(i)})
            raise ValueError(f"item ids must be unique; duplicated: {dups[:10]} ({len(dups)} in total)")
        if "{title}" not in completion_format:
            raise ValueError(f"completion_format must contain '{{title}}', got {completion_format!r}")
        if add_eos:
            eos_token_id = tokenizer.eos_token_id if eos_token_id is None else int(eos_token_id)
            if eos_token_id is None:
                raise ValueError("add_eos=True but the tokenizer has no eos_token_id; pass eos_token_id")

        self.context_prefix = context_prefix
        self.completion_format = completion_format
        self.add_eos = add_eos
        self.eos_token_id: int | None = eos_token_id if add_eos else None

        # Distinct titles in first-appearance order; items sharing a title are one path.
        title_index: dict[str, int] = {}
        title_items: list[list[int]] = []
        for title, item in zip(titles, item_ids, strict=True):
            if not isinstance(title, str):
                raise ValueError(f"titles must be strings, got {type(title).__name__} for item {item}")
            idx = title_index.setdefault(title, len(title_index))
            if idx == len(title_items):
                title_items.append([])
            title_items[idx].append(item)
        self.titles: list[str] = list(title_index)
        self.title_item_ids: list[list[int]] = [sorted(items) for items in title_items]
        self.item_to_title: dict[int, int] = {
            item: t for t, items in enumerate(self.title_item_ids) for item in items
        }

        # replace, not str.format: a literal brace in the format is text (PromptTemplate.render_completion does the
        # same, so training and decoding see one completion)
        completions = [completion_format.replace("{title}", t) for t in self.titles]
        if joint_tokenization:
            paths = _tokenize_in_context(tokenizer, context_prefix, completions, self.titles)
        else:
            # D3's convention: prompt and completion are tokenized separately and the ids
            # concatenated (in training and in evaluation alike), so there is no boundary to check.
            paths = _encode_many(tokenizer, completions)
        if add_eos:
            bad = [t for t, p in zip(self.titles, paths, strict=True) if eos_token_id in p]
            if bad:
                raise ValueError(
                    f"{len(bad)} title(s) tokenize to a sequence containing EOS ({eos_token_id}) before "
                    f"the end, e.g. {bad[:5]}"
                )
            paths = [p + [eos_token_id] for p in paths]
        if any(len(p) == 0 for p in paths):
            raise ValueError("a completion tokenizes to zero tokens; use add_eos=True or a non-empty format")
        self.title_token_ids: list[list[int]] = paths
        self._build(paths)
        self._device_cache: dict[torch.device, TrieTensors] = {}

    # ------------------------------------------------------------------ construction

    def _build(self, paths: list[list[int]]) -> None:
        children: list[dict[int, int]] = [{}]
        terminal: list[int] = [-1]
        depth: list[int] = [0]
        collisions: list[tuple[int, int]] = []  # (title index already at the leaf, title index reaching it)
        for title_idx, path in enumerate(paths):
            node = 0
            for tok in path:
                nxt = children[node].get(tok)
                if nxt is None:
                    nxt = len(children)
                    children[node][tok] = nxt
                    children.append({})
                    terminal.append(-1)
                    depth.append(depth[node] + 1)
                node = nxt
            # Distinct titles can still collide on tokens (a tokenizer that normalises text: case, Unicode, an
            # unknown-character token). They are not merged as a shared title: a leaf is one title string, and
            # title-level matching (the evaluator's title rank, the GRPO title rewards) compares strings, so the
            # other spelling's items would be listed while its title never matched. Every collision is reported.
            if terminal[node] != -1:
                collisions.append((terminal[node], title_idx))
                continue
            terminal[node] = title_idx
        if collisions:
            def named(t: int) -> str:
                return f"{self.titles[t]!r} (item(s) {self.title_item_ids[t]})"

            pairs = "; ".join(f"{named(a)} and {named(b)}" for a, b in collisions[:5])
            raise ValueError(
                f"{len(collisions)} title(s) tokenize to the same completion as another, distinct title, so the "
                f"search could not tell them apart: {pairs}{' ...' if len(collisions) > 5 else ''}. Give such "
                "items one spelling in the catalogue (they then share one title, as items with equal titles do), "
                "make the titles differ in a way the tokenizer keeps, or use a tokenizer that does not normalise them"
            )
        # A beam stops when it reaches a terminal node, so a terminal with children would make the end
        # of a title ambiguous (only possible without EOS).
        ambiguous = [self.titles[terminal[n]] for n in range(len(children)) if terminal[n] >= 0 and children[n]]
        if ambiguous:
            raise ValueError(
                f"{len(ambiguous)} title completion(s) are token-prefixes of other completions, e.g. "
                f"{ambiguous[:5]}; build the trie with add_eos=True"
            )

        counts = [len(c) for c in children]
        ptr = [0]
        for c in counts:
            ptr.append(ptr[-1] + c)
        tokens: list[int] = []
        nodes: list[int] = []
        for c in children:
            for tok in sorted(c):
                tokens.append(tok)
                nodes.append(c[tok])
        self.tensors = TrieTensors(
            child_ptr=torch.tensor(ptr, dtype=torch.long),
            child_tokens=torch.tensor(tokens, dtype=torch.long),
            child_nodes=torch.tensor(nodes, dtype=torch.long),
            depth=torch.tensor(depth, dtype=torch.long),
            terminal=torch.tensor(terminal, dtype=torch.long),
        )
        self.num_nodes = len(children)
        self.max_depth = max(depth)

    # ------------------------------------------------------------------ accessors

    @property
    def num_titles(self) -> int:
        """Number of distinct titles (paths)."""
        return len(self.titles)

    @property
    def child_ptr(self) -> torch.Tensor:
        return self.tensors.child_ptr

    @property
    def child_tokens(self) -> torch.Tensor:
        return self.tensors.child_tokens

    @property
    def child_nodes(self) -> torch.Tensor:
        return self.tensors.child_nodes

    @property
    def depth(self) -> torch.Tensor:
        return self.tensors.depth

    @property
    def terminal(self) -> torch.Tensor:
        return self.tensors.terminal

    def tensors_on(self, device: torch.device | str) -> TrieTensors:
        """The CSR arrays on ``device`` (copied once per device and cached)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.tensors
        if device not in self._device_cache:
            t = self.tensors
            self._device_cache[device] = TrieTensors(*(x.to(device) for x in (
                t.child_ptr, t.child_tokens, t.child_nodes, t.depth, t.terminal
            )))
        return self._device_cache[device]

    def children(self, node: int) -> tuple[list[int], list[int]]:
        """``(tokens, child_nodes)`` of ``node`` as Python lists (for inspection and tests)."""
        lo, hi = int(self.child_ptr[node]), int(self.child_ptr[node + 1])
        return self.child_tokens[lo:hi].tolist(), self.child_nodes[lo:hi].tolist()

    def items_for_titles(self, title_indices: Sequence[int]) -> list[int]:
        """Expand a ranked list of title indices to a ranked list of item ids.

        Each title contributes its item ids in ascending order (a documented, arbitrary tie-break among
        items that share a title); an item already listed is not repeated.
        """
        seen: set[int] = set()
        out: list[int] = []
        for t in title_indices:
            for item in self.title_item_ids[t]:
                if item not in seen:
                    seen.add(item)
                    out.append(item)
        return out

    def __repr__(self) -> str:
        return (
            f"TitleTrie(titles={self.num_titles}, items={len(self.item_to_title)}, nodes={self.num_nodes}, "
            f"max_depth={self.max_depth}, eos={self.eos_token_id})"
        )


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    # Without special tokens: Llama-style tokenizers would otherwise prepend BOS to every piece.
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _tokenize_in_context(
    tokenizer, context_prefix: str, completions: list[str], titles: list[str]
) -> list[list[int]]:
    """Token ids of each completion as they appear right after ``context_prefix``.

    The model is trained (and prompted) on ``prompt + completion`` as one string, so a title is only
    reachable by the search if tokenizing the joined string splits exactly at the boundary, i.e.
    ``tok(prefix + completion) == tok(prefix) + tok(completion)``. BPE merges across the boundary (or a
    SentencePiece prefix space) would break that; we refuse such catalogues rather than silently search
    paths the model never sees.
    """
    prefix_ids = _encode_many(tokenizer, [context_prefix])[0] if context_prefix else []
    alone = _encode_many(tokenizer, completions)
    joined = _encode_many(tokenizer, [context_prefix + c for c in completions]) if context_prefix else alone
    bad = [t for t, a, j in zip(titles, alone, joined, strict=True) if j != prefix_ids + a]
    if bad:
        raise TitleTokenizationError(
            f"{len(bad)} of {len(titles)} title(s) tokenize differently after the context prefix "
            f"{context_prefix!r} than on their own, e.g. {bad[:5]}. The completion must start at a token "
            "boundary: adjust the answer prefix / completion format (or clean the titles)."
        )
    return alone
