"""D3's text-free assistant: guide constrained beam search with an ID-based recommender.

D3 ("Decoding Matters", Bao et al., 2024) adds to the LM's score of each candidate token a term from a
trained ID model (SASRec in the paper): with ``P(i)`` the ID model's softmax probability of item ``i``
for this user and ``M(n) = sum of P(i) over the items whose title path passes through trie node n``,
a step from node ``n`` to its child ``c`` (one token) gets

    step score = log p_LM(token | prompt, prefix) + w * log(M(c) / M(n)).

``M(c) / M(n)`` is the ID model's probability of the token given the prefix (every item under ``n``
continues through exactly one child, so the ratios of the children sum to 1); D3's code normalises the
children's masses the same way. Summed along a path the guidance telescopes: a beam at node ``n`` has
accumulated ``w * log(M(n) / M(root))``, so a finished title ``t`` has

    beam score = (log p_LM(title) + w * log P_ID(t)) / L ** length_penalty,

with ``P_ID(t) = M(t) / M(root)`` the ID model's probability of the title (the mass of every item
sharing it, normalised over the catalogue). The guidance is part of the beam score exactly as a
``LogitsProcessor`` would make it in transformers' beam search: it decides which beams survive each
step, and the returned (length-normalised) scores include it. ``w = 0`` (or no guidance) is the plain
LM search, bit for bit. D3's code mixes ``out = g * lm + (1 - g) * cf``; for ``0 < g <= 1`` that ranks
like ``w = (1 - g) / g`` here (all step scores scaled by ``g``).

Masses are kept as log-masses computed with a log-sum-exp over each node's items, so an item
probability that underflows in fp32 never turns a title into ``log 0`` (D3 adds ``1e-20`` instead).

* :class:`ItemMassIndex` -- built once per trie: the (node, item) pairs of every item's title path,
  root included; :meth:`ItemMassIndex.log_mass` turns ``[R, N + 1]`` item log-probs into ``[R, nodes]``
  node log-masses with two scatters (no per-beam or per-node Python).
* :class:`TitleGuidance` -- what the search takes: per-row node log-masses and the weight ``w``.
* :func:`load_guidance_model` -- a trained ``llmrec seqrec train`` run directory as an eval-mode model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llmrec.decoding.trie import TitleTrie

logger = logging.getLogger(__name__)

__all__ = [
    "ItemMassIndex",
    "TitleGuidance",
    "item_log_probs_from_scores",
    "load_guidance_model",
    "guidance_weights_path",
]


class ItemMassIndex:
    """The node x item incidence of a :class:`TitleTrie`: which items' title paths pass through a node.

    Stored as two aligned int64 vectors ``pair_node`` / ``pair_item`` with one entry per (item, node
    on its title's path) pair, root included; an item shares the path of every item with the same
    title. ``E = sum over items of (title path length + 1)``.
    """

    def __init__(self, trie: TitleTrie):
        tt = trie.tensors
        n_nodes = trie.num_nodes
        counts = tt.child_ptr[1:] - tt.child_ptr[:-1]
        parent = torch.full((n_nodes,), -1, dtype=torch.long)
        parent[tt.child_nodes] = torch.repeat_interleave(torch.arange(n_nodes), counts)
        leaf_of_title = torch.full((trie.num_titles,), -1, dtype=torch.long)
        leaf_nodes = (tt.terminal >= 0).nonzero(as_tuple=True)[0]
        leaf_of_title[tt.terminal[leaf_nodes]] = leaf_nodes
        items = sorted(trie.item_to_title)
        item = torch.tensor(items, dtype=torch.long)
        node = leaf_of_title[torch.tensor([trie.item_to_title[i] for i in items], dtype=torch.long)]
        nodes, owners = [], []
        while node.numel():  # climb all items' paths one level at a time, until every one reached the root
            nodes.append(node)
            owners.append(item)
            up = node != 0
            node, item = parent[node[up]], item[up]
        self.pair_node = torch.cat(nodes)
        self.pair_item = torch.cat(owners)
        self.num_nodes = n_nodes
        self.max_item_id = max(items)
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def pairs_on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        if device.type == "cpu":
            return self.pair_node, self.pair_item
        if device not in self._device_cache:
            self._device_cache[device] = (self.pair_node.to(device), self.pair_item.to(device))
        return self._device_cache[device]

    def log_mass(self, item_log_probs: torch.Tensor) -> torch.Tensor:
        """``[R, num_nodes]`` log of each node's item mass, from ``[R, M]`` item log-probs (column = item id).

        Column 0 (padding) and any item not in the trie are ignored. ``log_mass[:, 0]`` is the root's
        (the whole catalogue's) log-mass; a node all of whose items have log-prob ``-inf`` gets ``-inf``.
        """
        if item_log_probs.dim() != 2:
            raise ValueError(f"item_log_probs must be [rows, items + 1], got shape {tuple(item_log_probs.shape)}")
        if item_log_probs.shape[1] <= self.max_item_id:
            raise ValueError(
                f"item_log_probs has {item_log_probs.shape[1]} columns but the catalogue has item id "
                f"{self.max_item_id} (column i is item i, column 0 is padding)"
            )
        pair_node, pair_item = self.pairs_on(item_log_probs.device)
        lp = item_log_probs.float()[:, pair_item]  # [R, E]
        idx = pair_node.expand(lp.shape[0], -1)
        neg_inf = torch.full((lp.shape[0], self.num_nodes), float("-inf"), device=lp.device)
        peak = neg_inf.scatter_reduce(1, idx, lp, reduce="amax", include_self=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        total = torch.zeros_like(peak).scatter_add_(1, idx, torch.exp(lp - peak.gather(1, idx)))
        return peak + total.log()

    def mass(self, item_probs: torch.Tensor) -> torch.Tensor:
        """``[R, num_nodes]`` item mass of every node from ``[R, M]`` item probabilities (for inspection)."""
        return self.log_mass(item_probs.float().log()).exp()


def item_log_probs_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """``[R, N + 1]`` item log-probs from ``[R, N]`` ID-model scores of items ``1..N``.

    ``SeqRecModel.score`` returns column ``j`` = item ``j + 1``; the softmax is over the N items and
    column 0 (padding) gets ``-inf``.
    """
    lp = torch.log_softmax(scores.float(), dim=-1)
    return torch.cat([lp.new_full((lp.shape[0], 1), float("-inf")), lp], dim=1)


@dataclass
class TitleGuidance:
    """Guidance for one batch of prompts (row ``r`` belongs to prompt ``r``).

    Attributes:
        node_log_mass: ``[R, num_nodes]`` log item mass of every trie node (:meth:`ItemMassIndex.log_mass`).
        weight: finite ``w >= 0``; a step from node ``n`` to child ``c`` adds ``w * (node_log_mass[r, c] -
            node_log_mass[r, n])`` to the candidate's log-prob (see the module docstring).
    """

    node_log_mass: torch.Tensor
    weight: float

    def __post_init__(self) -> None:
        # inf is refused too: inf * 0 (a step that keeps the whole mass) is NaN, and every beam would be lost
        if not (math.isfinite(float(self.weight)) and float(self.weight) >= 0.0):
            raise ValueError(f"guidance weight must be a finite number >= 0, got {self.weight}")
        self.weight = float(self.weight)

    @classmethod
    def from_item_log_probs(cls, index: ItemMassIndex, item_log_probs: torch.Tensor, weight: float) -> TitleGuidance:
        node_log_mass = index.log_mass(item_log_probs)
        if not bool(torch.isfinite(node_log_mass[:, 0]).all()):
            raise ValueError("guidance: every catalogue item has probability 0 for some row")
        return cls(node_log_mass, weight)

    @property
    def active(self) -> bool:
        return self.weight != 0.0

    def step_bonus(self, rows: torch.Tensor, parent: torch.Tensor, child: torch.Tensor) -> torch.Tensor:
        """``w * log(M(child) / M(parent))`` for aligned ``rows`` / ``parent`` / ``child`` node tensors."""
        nlm = self.node_log_mass
        return self.weight * (nlm[rows, child] - nlm[rows, parent])

    def to(self, device: torch.device | str) -> TitleGuidance:
        return TitleGuidance(self.node_log_mass.to(device), self.weight)


# ------------------------------------------------------------------------------------- ID model


def guidance_weights_path(run_dir: Path, results: dict) -> Path:
    """The weights ``llmrec seqrec train`` selected: ``rpt/best`` if LARES RPT won, else ``train/best``."""
    phase = "rpt" if results.get("selected_phase") == "rpt" else "train"
    return run_dir / phase / "best.safetensors"


def check_trained_catalog(trained_dir: str | Path | None, data_dir: str | Path, what: str,
                          catalog_sha256: str | None = None) -> None:
    """Refuse an ID model on a catalogue other than the one it was trained on (its item ids would name other items).

    ``trained_dir`` is the prepared dataset the run recorded, ``catalog_sha256`` the digest of its
    ``catalog.jsonl`` the run recorded (``results.json``'s ``data_sha256``). The recorded digest is what counts: the
    recorded directory may since have been prepared again in place, or be a relative path naming another directory
    from here. Runs from before digests were recorded are compared with the recorded directory's file while it is
    there, else not checked (the item count is checked separately). Raises ``ValueError`` naming ``what``.
    """
    ours = Path(data_dir) / "catalog.jsonl"
    trained_on = Path(str(trained_dir)) / "catalog.jsonl" if trained_dir is not None else None
    if not ours.exists():
        return
    if catalog_sha256 is not None:
        from llmrec.models.backbone import sha256_of_files

        if sha256_of_files([ours]) != catalog_sha256:
            raise ValueError(
                f"{what}: {ours}: the catalogue differs from the one the ID model was trained on"
                f"{f' ({trained_dir})' if trained_dir is not None else ''} (its recorded SHA-256 differs; item ids "
                f"would not match)")
    elif trained_on is not None and trained_on.exists() and trained_on.read_bytes() != ours.read_bytes():
        raise ValueError(
            f"{what}: the ID model was trained on {trained_on.parent}, whose "
            f"catalogue differs from {ours.parent}'s (item ids would not match)")


def eval_keys(rows: list[int], info: dict) -> torch.Tensor:
    """Per-row keys of an ID model's random evaluation draws (a LARES with ``state_init: normal``): the keys its
    trainer's test evaluation uses for the same split rows, so `llmrec evaluate --method seqrec` and D3 guidance
    reproduce it whatever the batches and processes. ``info`` is :func:`load_guidance_model`'s."""
    from llmrec.seqrec.keyed_random import row_keys
    from llmrec.seqrec.models import EVAL_STATE

    return row_keys(torch.tensor(rows, dtype=torch.long), int(info["seed"]), EVAL_STATE)


def load_guidance_model(run_dir: str | Path, device: torch.device | str = "cpu", num_items: int | None = None):
    """Load a finished ``llmrec seqrec train`` run directory as an eval-mode ID model.

    The run's ``results.json`` holds its config (model, sizes, ``max_history``); the weights are the
    selected phase's ``best.safetensors``. Returns ``(model, info)`` with ``info`` holding ``model``,
    ``max_history``, ``num_items``, ``dataset_dir`` (as trained), ``weights`` and ``mask_history``.

    Raises:
        CheckpointError: the directory, ``results.json`` or the weights file is missing.
        SafetensorsFileError: (a ``ValueError``) the weights file is damaged or not a safetensors file.
        ValueError: ``num_items`` is given and differs from the catalogue size the model was trained on.
    """
    from llmrec.models.checkpoint import CheckpointError
    from llmrec.safetensors_io import load_safetensors
    from llmrec.seqrec.config import SeqRecConfig
    from llmrec.seqrec.models import build_model
    from llmrec.seqrec.trainer import checkpoint_remedy

    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"ID-model (seqrec) checkpoint not found: {run} (expected a `llmrec seqrec train` output_dir)")
    results_path = run / "results.json"
    if not results_path.exists():
        present = sorted(p.name for p in run.iterdir())
        raise CheckpointError(
            f"ID-model (seqrec) checkpoint {run}: results.json is missing (it holds the run's config and is written when "
            f"`llmrec seqrec train` finishes); found {present[:12] or 'nothing'}"
        )
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # a bare JSONDecodeError would name no file
        raise ValueError(f"ID-model (seqrec) checkpoint {run}: results.json is damaged ({e}); {checkpoint_remedy(run)}"
                         ) from None
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
        raise CheckpointError(f"ID-model (seqrec) checkpoint {run}: results.json has no 'config' (not a seqrec run?)")
    weights = guidance_weights_path(run, results)
    if not weights.exists():
        raise CheckpointError(f"ID-model (seqrec) checkpoint {run}: weights {weights.relative_to(run)} are missing")
    known = {f.name for f in dataclasses.fields(SeqRecConfig)}
    cfg = SeqRecConfig(**{k: v for k, v in results["config"].items() if k in known})
    state = load_safetensors(weights, remedy=checkpoint_remedy(run))
    key = "backbone.item_emb.weight"
    if key not in state:
        raise CheckpointError(f"ID-model (seqrec) checkpoint {run}: {weights.name} has no {key} (not a seqrec model?)")
    trained_items = int(state[key].shape[0]) - 1
    if num_items is not None and trained_items != num_items:
        raise ValueError(
            f"ID-model (seqrec) checkpoint {run}: the ID model was trained on a catalogue of {trained_items} items, but "
            f"the evaluated catalogue has {num_items}; train it on the same prepared dataset"
        )
    model = build_model(cfg, trained_items)
    model.load_state_dict(state)
    model.eval().to(device)
    info = {
        # seed: a LARES with a random initial state at evaluation (state_init normal) draws it per row from the seed
        # and the row's index (eval_keys), as its own trainer's test evaluation does
        "model": cfg.model, "seed": cfg.seed, "max_history": cfg.max_history, "num_items": trained_items,
        "dataset_dir": results.get("protocol", {}).get("dataset_dir", cfg.dataset_dir),
        "weights": str(weights.relative_to(run)), "mask_history": bool(cfg.mask_history),
        "catalog_sha256": (results.get("data_sha256") or {}).get("catalog.jsonl"),
    }
    return model, info
