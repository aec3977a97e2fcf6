"""Prepared datasets as item-id sequences for the ID-based recommenders.

The same ``train/valid/test.jsonl`` rows the LLM path reads (see :mod:`llmrec.data.canonical`) are
turned into left-padded id tensors of a fixed length ``max_history`` (pad id 0):

* **valid / test** -- one row per example, history cut to its ``max_history`` most recent items,
  always scored at the last position (the same rows and the same targets as the LLM path).
* **train, ``train_mode="sequence"`` (default)** -- the train split already holds one row per prefix
  (history -> next item). Scoring every prefix row separately encodes the same items over and over,
  so the rows of a user are grouped back into the longest sequence they come from ("chains": a row
  extends a chain when its history equals the chain's tail) and every prefix is trained in ONE causal
  pass with a per-position loss. A position carries a loss only if a train row has that target, so
  the set of (prefix -> target) pairs trained is exactly the train split's. Sequences longer than
  ``max_history + 1`` are cut into consecutive windows of ``max_history`` inputs (newest window
  first); a prefix near the start of a later window then sees fewer than ``max_history`` items of
  context than its row would. This is the usual SASRec training (and the cheapest by far).
* **train, ``train_mode="rows"``** -- one example per train row, loss on the last position only (the
  RecBole / ReaRec-code objective). Slower, exact row semantics.

Both modes give the same batch layout: ``input_ids [B, L]`` and ``target_ids [B, L]`` (0 = no loss at
that position), so every model's loss is written once.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from llmrec.data.canonical import PAD_ITEM_ID, load_prepared

logger = logging.getLogger(__name__)

TRAIN_MODES = ("sequence", "rows")


@dataclass
class SplitRows:
    """One split as arrays: ``inputs [R, L]`` (left-padded ids), ``targets [R]``, original histories."""

    name: str
    inputs: np.ndarray
    targets: np.ndarray
    histories: list[list[int]]
    user_ids: list[str]

    def __len__(self) -> int:
        return len(self.targets)


def left_pad(histories: list[list[int]], length: int) -> np.ndarray:
    """Left-pad (and cut to the newest ``length`` items) every history into an int64 ``[R, length]``."""
    out = np.zeros((len(histories), length), dtype=np.int64)
    for i, h in enumerate(histories):
        h = h[-length:]
        if h:
            out[i, length - len(h) :] = h
    return out


def _check_histories(split: str, histories: list[list[int]], prepared) -> None:
    """An evaluation row needs at least one history item (ids outside 1..N were refused by ``load_prepared``)."""
    for r, h in enumerate(histories):
        if not h and split != "train":  # scoring all-padding input would rank items from nothing
            raise prepared.row_error(split, r, "history_item_ids",
                                     "empty history (an evaluation row needs at least one item)")


def build_chains(
    user_ids: list[str], histories: list[list[int]], targets: list[int]
) -> list[tuple[list[int], list[int]]]:
    """Group prefix rows back into sequences.

    Returns ``(sequence, row_of)`` pairs: ``sequence`` holds items oldest first and ``row_of[p]`` is the
    train-row index whose target is ``sequence[p + 1]`` (``-1`` if no row has that target, i.e. no loss
    at input position ``p``). A user's rows are visited by history length (file order among equals); a row
    extends the most recent chain of its user whose tail equals its history, else it starts a new chain.
    Rows with an empty history have no input and are skipped.

    Exact when a user's train rows are all the prefixes of their train sequence, as ``llmrec data prepare``
    writes them (a dropped item leaves every history, not only its own row). A dataset whose rows were dropped
    while their items stay in later, truncated histories can make the match ambiguous: a row may then join a
    chain whose earlier items are not its own true context (same tail, other items before it).
    """
    by_user: dict[str, list[int]] = defaultdict(list)
    for r, u in enumerate(user_ids):
        by_user[u].append(r)
    chains: list[tuple[list[int], list[int]]] = []
    for rows in by_user.values():
        # Shorter histories first (prefixes before their extensions); file order breaks ties, which keeps
        # chronological order once histories reach the preparation's max_history and stop growing.
        rows = sorted(rows, key=lambda r: len(histories[r]))
        user_chains: list[tuple[list[int], list[int]]] = []
        for r in rows:
            h, t = histories[r], targets[r]
            if not h:
                continue
            for seq, row_of in reversed(user_chains):
                if len(seq) >= len(h) and seq[-len(h) :] == h:
                    seq.append(t)
                    row_of.append(r)
                    break
            else:
                user_chains.append((list(h) + [t], [-1] * (len(h) - 1) + [r]))
        chains.extend(user_chains)
    return chains


def chain_windows(
    chains: list[tuple[list[int], list[int]]], length: int, stride: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut chains into left-padded training windows: ``inputs [E, L]``, ``targets [E, L]``, ``row_index [E]``.

    Windows end every ``stride`` positions from the chain's end (default ``length``: windows do not overlap)
    and carry the loss of their last ``stride`` positions only, so every train row is one loss position
    exactly once. With ``stride < length`` each loss position sees at least ``length - stride`` earlier
    items (or all there are) instead of as few as none at a window's start: closer to per-prefix training
    (``stride = 1``, RecBole's samples) at up to ``length / stride`` times the windows (fewer on short
    sequences: stride 1 makes one window per train row).
    ``row_index`` is the train row of each window's last target (used by LARES's same-target
    augmentation); windows without any loss position are dropped.
    """
    stride = length if stride is None else stride
    if not 1 <= stride <= length:
        raise ValueError(f"window stride must be in 1..{length} (the window length), got {stride}")
    inputs, targets, row_index = [], [], []
    for seq, row_of in chains:
        n_in = len(seq) - 1  # input positions 0..n_in-1, position p predicts seq[p + 1]
        end = n_in
        while end > 0:
            start = max(0, end - length)
            first_loss = max(start, end - stride)
            rows = row_of[first_loss:end]
            if any(r >= 0 for r in rows):
                inp = np.zeros(length, dtype=np.int64)
                tgt = np.zeros(length, dtype=np.int64)
                w = end - start
                inp[length - w :] = seq[start:end]
                tgt[length - w :] = [seq[p + 1] if p >= first_loss and row_of[p] >= 0 else PAD_ITEM_ID
                                     for p in range(start, end)]
                inputs.append(inp)
                targets.append(tgt)
                row_index.append(rows[-1])
            end = first_loss
    if not inputs:
        return np.zeros((0, length), np.int64), np.zeros((0, length), np.int64), np.zeros(0, np.int64)
    return np.stack(inputs), np.stack(targets), np.asarray(row_index, dtype=np.int64)


class TrainExamples(Dataset):
    """Training examples in the shared layout (``input_ids``, ``target_ids``, ``row_index``)."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, row_index: np.ndarray):
        self.inputs = torch.from_numpy(inputs)
        self.targets = torch.from_numpy(targets)
        self.row_index = torch.from_numpy(row_index)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.inputs[i], "target_ids": self.targets[i], "row_index": self.row_index[i]}

    @property
    def num_targets(self) -> int:
        return int((self.targets > 0).sum())


class EvalRows(Dataset):
    """Evaluation rows: ``input_ids [L]``, ``target`` and ``index`` (row number, for per-row output)."""

    def __init__(self, rows: SplitRows):
        self.inputs = torch.from_numpy(rows.inputs)
        self.targets = torch.from_numpy(rows.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.inputs[i], "target": self.targets[i], "index": torch.tensor(i)}


class SameTargetPool:
    """Train rows grouped by target, for LARES's "semantic augmentation" (another row, same next item).

    Only rows with a history are partners: an empty-history row is all padding (and is not trained on), and
    aligning with the state of an all-padding input taught nothing but noise (review).
    """

    def __init__(self, rows: SplitRows):
        self.inputs = torch.from_numpy(rows.inputs)
        with_history = np.nonzero((rows.inputs > 0).any(axis=1))[0] if len(rows.targets) else np.zeros(0, np.int64)
        order = with_history[np.argsort(rows.targets[with_history], kind="stable")]
        sorted_t = rows.targets[order]
        uniq, starts, counts = np.unique(sorted_t, return_index=True, return_counts=True)
        n = int(rows.targets.max()) + 1 if len(rows.targets) else 1
        self.start = np.zeros(n, np.int64)
        self.count = np.zeros(n, np.int64)
        self.start[uniq] = starts
        self.count[uniq] = counts
        self.order = order

    def sample(self, targets: torch.Tensor, exclude_rows: torch.Tensor, generator=None,
               own_inputs: torch.Tensor | None = None, uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """One random train row per target with the same target, other than ``exclude_rows`` when one exists.

        Rows whose target has no other row are paired with themselves (as the LARES code does); a target no row
        with a history leads to is paired with ``own_inputs`` (the batch's own rows; all padding if not given).
        ``uniforms``: one draw in [0, 1) per row picking its partner (LARES passes keyed draws, so a row's partner
        does not depend on the batch or the process layout); default drawn from ``generator``.
        """
        t = targets.cpu().numpy()
        ex = exclude_rows.cpu().numpy()
        cnt = self.count[np.clip(t, 0, len(self.count) - 1)]
        u = (uniforms.cpu().double() if uniforms is not None else torch.rand(len(t), generator=generator)).numpy()
        picks = np.empty(len(t), np.int64)
        for i in range(len(t)):
            c = int(cnt[i])
            if c == 0:
                picks[i] = -1
                continue
            members = self.order[self.start[t[i]] : self.start[t[i]] + c]
            if c > 1 and ex[i] >= 0 and ex[i] in members:
                members = members[members != ex[i]]
            picks[i] = members[min(int(u[i] * len(members)), len(members) - 1)]
        out = torch.zeros(len(t), self.inputs.shape[1], dtype=torch.long)
        if own_inputs is not None:
            out[:, -own_inputs.shape[1]:] = own_inputs[:, -out.shape[1]:].cpu()
        ok = picks >= 0
        out[torch.from_numpy(ok)] = self.inputs[torch.from_numpy(picks[ok])]
        return out


@dataclass
class SeqRecData:
    """A prepared dataset ready for the ID models."""

    directory: Path
    num_items: int
    max_history: int
    train_mode: str
    train_rows: SplitRows
    valid: SplitRows
    test: SplitRows
    train: TrainExamples
    # Train rows with an empty history: no input to predict from, so no example is made of them.
    train_rows_empty_history: int = 0

    def protocol(self) -> dict:
        """The data side of a run's ``results.json`` protocol (sizes, train mode, rows skipped)."""
        proto = {
            "dataset_dir": str(self.directory),
            "num_items": self.num_items,
            "max_history": self.max_history,
            "train_mode": self.train_mode,
            "rows": {"train": len(self.train_rows), "valid": len(self.valid), "test": len(self.test)},
            "train_examples": len(self.train),
            "train_targets": self.train.num_targets,
        }
        if self.train_rows_empty_history:  # only then: the protocol of clean data stays what earlier runs recorded
            proto["skipped"] = {"train_rows_empty_history": self.train_rows_empty_history}
        return proto

    def rows_examples(self, keep: np.ndarray | None = None) -> TrainExamples:
        """Train rows as last-position examples (optionally only ``keep``-masked rows, for LARES RPT)."""
        tr = self.train_rows
        idx = np.nonzero([len(h) > 0 for h in tr.histories])[0]
        if keep is not None:
            idx = idx[keep[idx]]
        inputs = tr.inputs[idx]
        targets = np.zeros_like(inputs)
        targets[:, -1] = tr.targets[idx]
        return TrainExamples(inputs, targets, idx.astype(np.int64))


def load_seqrec_data(
    directory: str | os.PathLike, max_history: int = 50, train_mode: str = "sequence", window_stride: int = 0
) -> SeqRecData:
    """Load a prepared directory into id tensors (see the module docstring); clear errors on bad data."""
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    if train_mode not in TRAIN_MODES:
        raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {train_mode!r}")
    prepared = load_prepared(directory, splits=("train", "valid", "test"), with_titles=False)
    n = prepared.num_items
    splits: dict[str, SplitRows] = {}
    for name in ("train", "valid", "test"):
        ds = prepared.splits[name]
        if len(ds) == 0:
            raise ValueError(f"{prepared.directory}/{name}.jsonl: split '{name}' is empty")
        hists = [list(h) for h in ds["history_item_ids"]]
        targets = list(ds["target_item_id"])
        _check_histories(name, hists, prepared)
        splits[name] = SplitRows(
            name=name,
            inputs=left_pad(hists, max_history),
            targets=np.asarray(targets, dtype=np.int64),
            histories=hists,
            user_ids=list(ds["user_id"]),
        )
    tr = splits["train"]
    n_empty = sum(1 for h in tr.histories if not h)
    if n_empty:
        # Said at WARNING (it was only visible as a smaller row count in an INFO line): these rows are not trained
        # on, and `llmrec data prepare` never writes them, so the file was made or edited by other means.
        logger.warning(
            "%s/train.jsonl: %d of %d train rows have an empty history and are skipped (an ID model needs at least "
            "one history item to predict from); the count is recorded in results.json (protocol.skipped)",
            prepared.directory, n_empty, len(tr))
    data = SeqRecData(
        directory=Path(prepared.directory),
        num_items=n,
        max_history=max_history,
        train_mode=train_mode,
        train_rows=tr,
        valid=splits["valid"],
        test=splits["test"],
        train=TrainExamples(
            np.zeros((0, max_history), np.int64), np.zeros((0, max_history), np.int64), np.zeros(0, np.int64)
        ),
        train_rows_empty_history=n_empty,
    )
    if train_mode == "sequence":
        chains = build_chains(tr.user_ids, tr.histories, list(tr.targets))
        data.train = TrainExamples(*chain_windows(chains, max_history, window_stride or None))
        n_rows = sum(1 for h in tr.histories if h)
        if data.train.num_targets != n_rows:  # every non-empty-history row must land on exactly one position
            raise AssertionError(
                f"sequence grouping lost rows: {data.train.num_targets} targets vs {n_rows} rows"
            )
        logger.info(
            "train: %d rows grouped into %d chains / %d windows", n_rows, len(chains), len(data.train)
        )
        # Chains rebuild contexts as long as a user's whole train sequence; rows prepared with a shorter history
        # (data prepare --max-history) never read that much, in training rows or in evaluation (review).
        longest_row = max(len(h) for split in splits.values() for h in split.histories)
        longest_context = min(max_history, max((len(seq) for seq, _ in chains), default=1) - 1)
        if longest_context > longest_row:
            logger.warning(
                "%s: sequence mode trains with contexts of up to %d items, but no row's history holds more than %d "
                "(the preparation's --max-history?), nor does any validation or test row; set max_history: %d, or "
                "train_mode: rows, to train on the contexts the rows have", prepared.directory, longest_context,
                longest_row, longest_row)
    else:
        data.train = data.rows_examples()
    if len(data.train) == 0:
        raise ValueError(f"{prepared.directory}/train.jsonl: no training example (every history is empty)")
    return data
