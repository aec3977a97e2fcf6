"""Recommend with a trained model: :class:`Recommender` (Python API) and ``llmrec recommend`` (CLI).

What a user does after training::

    from llmrec.recommend import Recommender

    rec = Recommender.from_pretrained("runs/games/sft_latent")          # dataset read from the checkpoint
    rec.recommend(["Halo 3", "Gears of War"], k=10)                      # -> [Recommendation, ...]
    rec.recommend([["Halo 3"], [12, 40, 7]], k=5)                        # a batch -> one list per history

``from_pretrained`` accepts

* an llmrec SFT (latent or BIGRec-style) or GRPO checkpoint -- it has ``llmrec_config.json``, which
  records the base model, dataset, prompt, noun, history length and token budget used in training;
  those are the defaults here (each can be overridden);
* another causal-LM checkpoint (a full ``save_pretrained`` model, or a peft adapter applied to
  ``base_model`` / the adapter's recorded base), or a plain base model (an alias such as
  ``smollm2-135m`` / ``tiny-qwen2``, a local model directory or a hub id) for zero-shot use: these
  record no dataset, so ``dataset`` is required, and prompt settings default to ``llmrec evaluate``'s;
* a finished ``llmrec seqrec train`` run directory (``results.json`` + ``train/best.safetensors``,
  ``rpt/best.safetensors`` when LARES's RPT phase was selected): the ID model is rebuilt from the
  config stored in ``results.json`` and given the selected best weights.

How items are ranked -- the same as the evaluation of each model kind, so what ``recommend`` returns for
a history is what the evaluator ranked for it:

* **LLM**: the history's titles (the most recent ``history_length``) are rendered with the prompt
  template and the catalogue's titles are ranked by constrained beam search
  (:func:`llmrec.decoding.search.rank_batch`, the evaluator's code path) with ``num_beams >= k`` (at
  most the number of distinct titles: that search prunes nothing, a wider beam ranks the same). A
  title shared by several items expands to those items in ascending id order (the evaluator's item
  level); each item carries its title's beam score (log-probability / length**length_penalty). Beam
  search is approximate, so the beam width changes the ranking: with the default ``num_beams = k`` the
  top 3 of ``k=5`` need not be the result of ``k=3``; fix ``num_beams`` to make rankings independent
  of ``k`` (the evaluator's ``num_beams`` reproduces its rankings). The
  prompt keeps the most recent history items that fit ``max_prompt_length`` minus the latent tokens
  minus the longest catalogue answer: the evaluator's ``prompt_fit="longest_answer"``, which never reads the true
  answer (its default ``"own_answer"`` fits each test prompt around the row's own target title instead, so a
  history near the length limit can keep one item more or less there than here). The LLM computes in the
  checkpoint's ``model_dtype`` unless ``dtype`` is given, where the evaluator defaults to bfloat16: pass the
  evaluation's ``dtype`` to reproduce it. In bfloat16 a row's batch-mates (left padding, other kernel blocking)
  move its beam scores: on 50 Games rows of the quickstart's GRPO checkpoint, batch 1 and batch 8 gave another
  top-10 order on 31 rows and another top-1 on 3 (the same hits@10), same-title scores up to 0.07 apart (the
  evaluator records its ``batch_size`` for this reason, and ``llmrec compare`` warns when LM runs differ in it);
  in float32 the two batch sizes gave identical rankings. **D3 decoding**: with
  ``guidance_checkpoint`` (a seqrec run on the same catalogue) and ``guidance_weight``, every beam step adds the
  weighted log of the ID model's probability mass over the items whose titles extend the prefix, as ``llmrec
  evaluate --guidance_checkpoint`` does; the ID model reads each given history up to its own ``max_history``, and
  the scores include the guidance (D3 decodes with ``length_penalty=0``). The rankings equal the guided
  evaluation's, except with a LARES guide that draws its initial state (``state_init: normal``): its draws are keyed
  by the history's content here and by the split row there (a warning says so).
* **ID models** (SASRec, GRU4Rec, ReaRec, LARES): every catalogue item is scored for the left-padded history
  (:meth:`~llmrec.seqrec.models.SeqRecModel.score`; padding id 0 is never a candidate) and the top ``k``
  are returned, ties broken by the smaller item id (as the seqrec evaluation ranks). A LARES with
  ``state_init: normal`` is the exception, as a guide above: its initial-state draws are keyed by the history's
  content here and by the split row in the evaluation (a warning says so).

History items are **not excluded** by default, following both evaluations (``history_masked: False``
in the evaluator's protocol; ``mask_history`` of the seqrec run, False unless the run set it).
``exclude_history=True`` removes the item ids of the whole given history from the candidates (also those older
than the ``history_length`` items the model reads, which the seqrec evaluation of a ``mask_history`` run does not
mask: its rows hold only those; item level: another item sharing the title of a history item given by id stays a
candidate; a title given as a title removes all its items); for
LLMs each history's beam is widened by the number of its distinct history titles so that ``k`` items remain
whenever the catalogue has them, and histories are decoded in groups of equal width, so the exclusion of one
history does not change the beam width of another.

Histories are lists of titles (``str``) or catalogue item ids (``int``), which may be mixed; a string is
always a title (titles such as ``"1942"`` exist). A title is matched exactly, then after Unicode NFKC, case folding
and whitespace collapsing, then after also decoding HTML character references (:func:`normalize_title`: the
catalogue's ``Orcs &amp; Humans`` is found as ``Orcs & Humans`` and the other way round; a catalogue holding both
forms of a title matches each by the earlier tiers). A title that still matches nothing,
or matches several distinct titles after normalisation, is an :class:`UnknownItemError` naming the
title and its 1-based position (``on_unknown="error"``, default) or is dropped with a logged warning
and recorded in :attr:`Recommender.last_skipped` (``on_unknown="skip"``). An id outside the catalogue
is always an error, as is an empty history (or one whose every item was skipped; over an ``--input`` file with
``--on-unknown skip`` such a row gets no recommendations, is listed and counted, and the rest go on). A title
shared by several items stands for the item with the smallest id (this matters only for ID models; pass ids to
choose), with a logged warning, listed in :attr:`ResolvedHistory.shared_titles` and the output line's
``shared_titles``; ``exclude_history`` then removes every item of that title (which of them the user meant is
not known).

The CLI (``llmrec recommend``) prints a table for one ``--history`` or maps ``--input`` JSONL
(``{"history": [...], "user": ...}`` per line) to ``--output`` JSONL (``{"user": ..., "line": ...,
"recommendations": [{"item_id", "title", "score"}], "skipped": [...]}`` per line, same order; ``line`` is the input
line it answers, as blank input lines are skipped), written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import numbers
import os
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmrec.data.catalog import normalize_title_text
from llmrec.evaluation.evaluator import PROMPT_DEFAULTS

logger = logging.getLogger(__name__)

__all__ = [
    "ON_UNKNOWN",
    "EmptiedHistoryError",
    "HistoryError",
    "PromptFitError",
    "Recommendation",
    "Recommender",
    "ResolvedHistory",
    "SharedTitle",
    "SkippedItem",
    "UnknownItemError",
    "normalize_title",
    "register_cli",
]

ON_UNKNOWN = ("error", "skip")
SEQREC_RESULTS = "results.json"
# Defaults for LLMs whose checkpoint records no settings (base models, plain checkpoints): EvalConfig's.
LLM_DEFAULTS: dict[str, Any] = {
    **PROMPT_DEFAULTS, "length_penalty": 1.0, "use_chat_template": False, "dtype": "bfloat16", "batch_size": 8,
    "early_stopping": True,
}
SEQREC_BATCH_SIZE = 256


# ------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Recommendation:
    """One recommended item.

    Attributes:
        item_id: catalogue item id (1..N).
        title: the item's catalogue title.
        score: the model's score, higher is better; comparable within one model only (LLM: beam score,
            the title's summed token log-probability / length**length_penalty; ID model: the item logit).
    """

    item_id: int
    title: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        """``{"item_id", "title", "score"}`` (the JSONL output form)."""
        return {"item_id": self.item_id, "title": self.title, "score": self.score}


@dataclass(frozen=True)
class SkippedItem:
    """A history entry dropped by ``on_unknown="skip"``: its 1-based position, value and why."""

    position: int
    value: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"position": self.position, "value": self.value, "reason": self.reason}


@dataclass(frozen=True)
class SharedTitle:
    """A history title that several catalogue items carry: it stands for the smallest of ``item_ids`` (an ID
    model reads that one; pass an id to choose another), and ``exclude_history`` removes all of them."""

    position: int
    value: str
    item_ids: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"position": self.position, "value": self.value, "item_ids": list(self.item_ids)}


@dataclass
class ResolvedHistory:
    """A history mapped to catalogue item ids (oldest first), with the entries that were skipped and the
    titles that several items share."""

    item_ids: list[int]
    skipped: list[SkippedItem]
    shared_titles: list[SharedTitle] = field(default_factory=list)

    def excluded_ids(self) -> set[int]:
        """The items ``exclude_history`` removes: the history's ids, and every item of a title given in it."""
        return set(self.item_ids).union(*(s.item_ids for s in self.shared_titles))


class HistoryError(ValueError):
    """A history that cannot be used (empty, wrong type of entry, unknown item)."""


class UnknownItemError(HistoryError):
    """A title or item id that is not in the catalogue (the message names it and its position)."""


class EmptiedHistoryError(HistoryError):
    """A history whose every item was an unknown title skipped by ``on_unknown="skip"`` (``skipped`` lists them)."""

    def __init__(self, message: str, skipped: list[SkippedItem]):
        super().__init__(message)
        self.skipped = skipped


class PromptFitError(HistoryError):
    """A history whose prompt cannot fit the model's token budget (``index``: its position in the batch)."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def _check_option_types(ints: dict[str, Any], flags: dict[str, Any]) -> None:
    """Refuse API options of the wrong type before anything loads: ``exclude_history="no"`` is truthy (it excluded),
    ``history_length=2.5`` failed as a bare slice TypeError at the first recommend, ``"3"`` as a comparison error."""
    for name, value in ints.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    for name, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False (or None: the default), got {type(value).__name__} {value!r}")


def _check_ordered(history: Any, what: str) -> None:
    """A set (or a mapping's keys) has no oldest-first order: its iteration order (hash order, per process for
    strings) would silently become the history's order."""
    if isinstance(history, (Set, Mapping)):
        raise TypeError(f"{what} is a {type(history).__name__}, which has no order: give a list, oldest item first")


def normalize_title(title: str) -> str:
    """The key of the second, lenient title match: HTML character references decoded
    (:func:`~llmrec.data.catalog.normalize_title_text`; scraped catalogues hold them, users type the characters),
    NFKC, case folded, whitespace collapsed.

    >>> normalize_title("  Super  MARIO\\tbros "), normalize_title("Orcs &amp; Humans")
    ('super mario bros', 'orcs & humans')
    """
    return _fold_title(normalize_title_text(title))


def _fold_title(title: str) -> str:
    """NFKC, case folded, whitespace collapsed: the lenient key before references are decoded."""
    return " ".join(unicodedata.normalize("NFKC", title).casefold().split())


class _TitleIndex:
    """Title -> item id lookups over a catalogue (exact first, then normalised)."""

    def __init__(self, catalog) -> None:
        self.catalog = catalog
        self.exact: dict[str, int] = {}
        self.items: dict[str, list[int]] = {}  # title -> all its item ids, ascending
        for item_id, title in enumerate(catalog.titles, start=1):
            self.exact.setdefault(title, item_id)  # ascending ids: a shared title keeps its smallest id
            self.items.setdefault(title, []).append(item_id)
        # Two lenient tiers: a catalogue prepared with text=keep can hold a title both escaped and plain
        # ("Sid Meier&#39;s ..." and "Sid Meier's ..." on Games), which only the decoding tier merges; a
        # query that the folding alone matches to one title is not made ambiguous by that.
        self.folded: dict[str, list[str]] = {}
        self.normalized: dict[str, list[str]] = {}
        for title in self.exact:
            self.folded.setdefault(_fold_title(title), []).append(title)
            self.normalized.setdefault(normalize_title(title), []).append(title)

    def lookup(self, title: str) -> tuple[int | None, str]:
        """``(item id, "")`` or ``(None, reason)``."""
        if title in self.exact:
            return self.exact[title], ""
        candidates = self.folded.get(_fold_title(title)) or self.normalized.get(normalize_title(title), [])
        if len(candidates) == 1:
            return self.exact[candidates[0]], ""
        if candidates:
            shown = ", ".join(repr(c) for c in candidates[:5])
            return None, (f"matches {len(candidates)} catalogue titles after normalisation (case, whitespace, HTML "
                          f"character references: {shown})")
        return None, ("is not in the catalogue (no exact match, nor one that ignores case, whitespace and HTML "
                      "character references)")

    def suggestions(self, title: str, n: int = 3) -> list[str]:
        close = difflib.get_close_matches(normalize_title(title), list(self.normalized), n=n, cutoff=0.6)
        return [self.normalized[c][0] for c in close]


# ------------------------------------------------------------------------------------------- backends


@dataclass
class _DecodeSettings:
    """What :func:`llmrec.decoding.search.rank_batch` reads from an evaluation config."""

    max_prompt_length: int
    noun: str
    use_chat_template: bool
    num_beams: int
    length_penalty: float
    early_stopping: bool = True
    prompt_fit: str = "longest_answer"  # a recommender has no answer to leave room for


class _LLMBackend:
    kind = "llm"

    def __init__(self, model, tokenizer, catalog, *, prompt: str, noun: str, use_chat_template: bool,
                 tokenization: str, max_prompt_length: int, num_beams: int | None, length_penalty: float,
                 batch_size: int, early_stopping: bool = True) -> None:
        from llmrec.decoding.search import build_catalog_trie
        from llmrec.models.latent import LatentReasoningLM
        from llmrec.prompts import PromptTemplate

        self.model, self.tokenizer, self.catalog = model, tokenizer, catalog
        self.template = PromptTemplate.load(prompt)
        self.trie = build_catalog_trie(catalog, tokenizer, self.template, use_chat_template, tokenization)
        self.noun, self.use_chat_template = noun, use_chat_template
        self.num_beams, self.length_penalty, self.batch_size = num_beams, length_penalty, batch_size
        self.early_stopping = early_stopping
        self.num_latent_tokens = model.num_latent_tokens if isinstance(model, LatentReasoningLM) else 0
        self.guidance: tuple[_SeqRecBackend, float, Any] | None = None  # (ID model, weight, title mass index)
        longest_answer = max(len(p) for p in self.trie.title_token_ids)  # completion + EOS
        # rank_batch leaves room for the longest answer and the latent tokens itself (answer_budget): checked here
        # so that a budget too small fails when the recommender is built.
        self.max_prompt_length = max_prompt_length
        if max_prompt_length - self.num_latent_tokens - longest_answer < 1:
            raise ValueError(
                f"max_prompt_length {max_prompt_length} leaves no room for a prompt: the longest catalogue "
                f"answer takes {longest_answer} tokens and there are {self.num_latent_tokens} latent tokens"
            )

    def guide_with(self, id_model: _SeqRecBackend, weight: float) -> None:
        """D3 decoding: every beam step adds ``weight`` times the log of the ID model's probability mass over the
        items whose titles extend the prefix (:mod:`llmrec.decoding.guidance`, as ``llmrec evaluate
        --guidance_checkpoint``)."""
        from llmrec.decoding.guidance import ItemMassIndex

        self.guidance = (id_model, weight, ItemMassIndex(self.trie))

    def _guidance_for(self, histories: list[list[int]]):
        from llmrec.decoding.guidance import TitleGuidance, item_log_probs_from_scores

        id_model, weight, index = self.guidance
        return TitleGuidance.from_item_log_probs(index, item_log_probs_from_scores(id_model.scores(histories)), weight)

    def beams_for(self, k: int, excluded: set[int] | None) -> int:
        """Beam width for one history: ``num_beams`` (at least ``k``), plus one per distinct title among the
        excluded item ids, so that ``k`` items remain after removing them whenever the catalogue has them; at most
        the number of distinct titles."""
        beams = max(self.num_beams or k, k)
        if excluded:
            beams += len({self.catalog.title(i) for i in excluded})
        # With as many beams as titles nothing is ever pruned, so a wider beam ranks the same -- but its buffers
        # grow with the width (k=10**9 would allocate gigabytes per history).
        return min(beams, len(self.trie.titles))

    @torch.no_grad()
    def recommend(self, histories: list[list[int]], k: int, excluded: list[set[int]] | None,
                  first_index: int = 0, whole_histories: list[list[int]] | None = None) -> list[list[Recommendation]]:
        """``histories``: what the prompt shows; ``whole_histories``: the given histories, which the guiding ID
        model reads up to its own ``max_history`` (default: ``histories``)."""
        from llmrec.decoding.beam_search import NonFiniteLogitsError
        from llmrec.decoding.search import rank_batch
        from llmrec.prompts import PromptError

        out: list[list[Recommendation]] = [[] for _ in histories]
        # Histories that need the same beam width are decoded together: a history's recommendations must not
        # depend on which other histories share its batch (beam search is approximate: a wider beam can find
        # another top-k).
        by_width: dict[int, list[int]] = {}
        for i in range(len(histories)):
            by_width.setdefault(self.beams_for(k, excluded[i] if excluded else None), []).append(i)
        for width, members in by_width.items():
            settings = _DecodeSettings(self.max_prompt_length, self.noun, self.use_chat_template, width,
                                       self.length_penalty, self.early_stopping)
            examples = [{"history_titles": [self.catalog.title(i) for i in histories[m]], "target_title": None}
                        for m in members]
            guidance = None
            if self.guidance is not None:
                guidance = self._guidance_for([(whole_histories or histories)[m] for m in members])
            try:
                ranked = rank_batch(self.model, self.tokenizer, self.trie, self.template, examples, settings,
                                    guidance=guidance)
            except PromptError:
                self._raise_for_unfit(members, examples, settings, first_index)
                raise
            except NonFiniteLogitsError as e:
                # Its rows are those of this width group of this chunk ("row 0" for the third history of a call):
                # name the histories as given to the call, which the CLI maps to its input lines.
                raise NonFiniteLogitsError([first_index + members[r] for r in e.rows], e.step,
                                           "histories (0-based, in the order given)") from None
            for m, (titles, items, scores) in zip(members, ranked):
                score_of = dict(zip(titles, scores))
                seen = excluded[m] if excluded else set()
                recs = []
                for item in items:
                    if item in seen:
                        continue
                    title = self.catalog.title(item)
                    recs.append(Recommendation(int(item), title, float(score_of[title])))
                    if len(recs) == k:
                        break
                out[m] = recs
        return out

    def _raise_for_unfit(self, members: list[int], examples: list[dict], settings, first_index: int) -> None:
        """Name the first history of a failed batch whose prompt cannot be rendered within the token budget."""
        from llmrec.decoding.search import answer_budget, render_prompts
        from llmrec.prompts import PromptError

        budget = answer_budget(self.trie, self.model)
        for m, example in zip(members, examples):
            try:
                render_prompts(self.template, self.tokenizer, [example], settings, budget)
            except PromptError as e:
                index = first_index + m
                latents = " and the latent tokens" if getattr(self.model, "num_latent_tokens", 0) else ""
                raise PromptFitError(
                    f"history {index} (newest item {example['history_titles'][-1]!r}): {e} (the prompt's budget is "
                    f"max_prompt_length {settings.max_prompt_length} minus {budget} tokens kept for the catalogue's "
                    f"longest answer{latents}; raise "
                    f"max_prompt_length)", index) from None


class _SeqRecBackend:
    kind = "seqrec"

    def __init__(self, model, catalog, max_history: int, device: torch.device, batch_size: int) -> None:
        self.model, self.catalog, self.max_history = model, catalog, max_history
        self.device, self.batch_size = device, batch_size

    def scores(self, histories: list[list[int]], excluded: list[set[int]] | None = None) -> torch.Tensor:
        """``[B, N]`` full-catalogue scores (column ``j`` = item ``j + 1``) for left-padded histories.

        ``excluded``: per history, item ids that score -inf (the whole given history, which may be longer than
        the part the model reads).
        """
        from llmrec.seqrec.scoring import history_keys, mask_items, score_histories

        # Keyed by the history's content: a LARES with a random initial state gives one history the same
        # recommendations alone, in any batch and on every call.
        keys = history_keys(histories, self.max_history)
        return mask_items(score_histories(self.model, histories, self.max_history, self.device, keys=keys),
                          excluded or [])

    def recommend(self, histories: list[list[int]], k: int, excluded: list[set[int]] | None,
                  first_index: int = 0, whole_histories: list[list[int]] | None = None) -> list[list[Recommendation]]:
        from llmrec.seqrec.scoring import top_k

        values, order = top_k(self.scores(histories, excluded), k)
        values, order = values.cpu(), order.cpu()
        out = []
        for vs, cols in zip(values.tolist(), order.tolist()):
            out.append([Recommendation(c + 1, self.catalog.title(c + 1), float(v))
                        for v, c in zip(vs, cols) if v != float("-inf")])
        return out


# ------------------------------------------------------------------------------------------- loading


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...): {e}") from None
        # Said now, not as an assertion deep in torch after the model has loaded.
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} usable CUDA devices")
        if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {device!r}: MPS is not available on this machine")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_dataset(dataset: str | os.PathLike | None, recorded: str | None, source: str) -> Path:
    from llmrec.data.samples import resolve_dataset_dir

    if dataset is None and not recorded:
        raise ValueError(f"{source} records no dataset: pass dataset=<prepared dataset directory> (--dataset)")
    try:
        return resolve_dataset_dir(dataset if dataset is not None else recorded)
    except FileNotFoundError as e:
        if dataset is None:
            raise FileNotFoundError(
                f"{e} -- this is the dataset recorded by {source}; pass dataset=<prepared directory> "
                "(--dataset) if it moved"
            ) from None
        raise


def _read_json_object(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file as a mapping; a damaged one (bad bytes, invalid JSON, not an object) raises a
    :class:`~llmrec.data.canonical.DataFormatError` naming the file (a bare JSON error names nothing)."""
    from llmrec.data.canonical import read_stats

    return read_stats(path)  # not only for stats.json: any JSON-object file, {} when absent


def _load_catalog(data_dir: Path):
    from llmrec.data.canonical import CATALOG_FILE
    from llmrec.data.catalog import ItemCatalog

    return ItemCatalog.load(data_dir / CATALOG_FILE)


def is_seqrec_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ``llmrec seqrec train`` run directory (finished or not)."""
    from llmrec.seqrec.models import MODEL_NAMES

    path = Path(path)
    if (path / "train" / "best.safetensors").exists():
        return True
    results = path / SEQREC_RESULTS
    if not results.is_file():
        return False
    try:
        cfg = _read_json_object(results).get("config")
    except ValueError:  # damaged: not recognisable as a seqrec run here
        return False
    return isinstance(cfg, dict) and cfg.get("model") in MODEL_NAMES


def _load_seqrec(path: Path, dataset, device: torch.device, history_length: int | None,
                 remedy: str = "pass the dataset the run was trained on"):
    from llmrec.data.canonical import DataFormatError
    from llmrec.safetensors_io import load_safetensors
    from llmrec.seqrec.config import SeqRecConfig
    from llmrec.seqrec.models import build_model

    results_path = path / SEQREC_RESULTS
    if not results_path.exists():
        raise FileNotFoundError(
            f"{path} is a seqrec run without {SEQREC_RESULTS}: the run has not finished (rerun "
            "`llmrec seqrec train` with the same output_dir to resume it)"
        )
    res = _read_json_object(results_path)
    stored = res.get("config")
    if not isinstance(stored, dict):
        raise ValueError(f"{results_path}: no 'config' mapping (not written by `llmrec seqrec train`?)")
    known = {f.name for f in dataclasses.fields(SeqRecConfig)}
    unknown = sorted(set(stored) - known)
    if unknown:
        logger.warning("%s: ignoring config keys this llmrec does not know: %s", results_path, unknown)
    try:
        cfg = SeqRecConfig(**{k: v for k, v in stored.items() if k in known})
    except (TypeError, ValueError) as e:  # a hand-edited value ("16" for 16) fails deep in SeqRecConfig's checks
        raise DataFormatError(results_path, None, "config", f"not a valid seqrec config: {e}") from None
    data_dir = _resolve_dataset(dataset, cfg.dataset_dir, str(results_path))
    catalog = _load_catalog(data_dir)
    phase = "rpt" if res.get("selected_phase") == "rpt" else "train"
    weights = path / phase / "best.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{path}: the selected weights {phase}/best.safetensors are missing")
    state = load_safetensors(weights)
    key = "backbone.item_emb.weight"
    if key in state and state[key].shape[0] - 1 != len(catalog):
        raise ValueError(
            f"{weights} was trained on a catalogue of {state[key].shape[0] - 1} items, but {data_dir} has "
            f"{len(catalog)}: {remedy}"
        )
    from llmrec.decoding.guidance import check_trained_catalog

    # Same size is not enough: another catalogue of as many items would give the right ids the wrong titles.
    check_trained_catalog(cfg.dataset_dir, data_dir, f"seqrec run {path}",
                          (res.get("data_sha256") or {}).get("catalog.jsonl"))
    model = build_model(cfg, len(catalog))
    model.load_state_dict(state)
    model.eval().to(device)
    if history_length is not None and not 1 <= history_length <= cfg.max_history:
        raise ValueError(f"history_length must be in 1..{cfg.max_history} (the model's max_history), "
                         f"got {history_length}")
    info = {"kind": "seqrec", "source": "seqrec-run", "checkpoint": str(path), "model": cfg.model,
            "weights": str(weights), "dataset": str(data_dir), "mask_history": cfg.mask_history}
    return model, catalog, cfg, info


def _check_model_name(name: str) -> None:
    """Refuse a missing local path before it is mistaken for a hub id (``runs/sft`` looks like ``org/name``)."""
    from llmrec.models.backbone import _looks_like_path, known_aliases

    if name in known_aliases():
        return
    path = Path(name).expanduser()
    if path.exists() or _looks_like_path(name) or (path.parent != Path(".") and path.parent.is_dir()):
        raise FileNotFoundError(
            f"checkpoint directory not found: {name} (not a directory, and not a model alias: "
            f"{', '.join(known_aliases())})"
        )


def _read_llmrec_config(path: Path) -> dict[str, Any]:
    from llmrec.training.sft import LLMREC_CONFIG_NAME

    return _read_json_object(path / LLMREC_CONFIG_NAME)


# ------------------------------------------------------------------------------------------- recommender


class Recommender:
    """Top-k recommendations for item histories with a trained model (see the module docstring).

    Build one with :meth:`from_pretrained`; call :meth:`recommend`. Attributes:

    * ``kind`` -- ``"llm"`` or ``"seqrec"``;
    * ``catalog`` -- the :class:`~llmrec.data.catalog.ItemCatalog` items are drawn from;
    * ``history_length`` -- most recent history items the model sees;
    * ``info`` -- where the model came from and the settings in use (printed by the CLI);
    * ``last_skipped`` -- per history of the last :meth:`recommend` call, the entries dropped by
      ``on_unknown="skip"`` (empty lists when nothing was skipped).
    """

    def __init__(self, backend: _LLMBackend | _SeqRecBackend, catalog, *, history_length: int,
                 batch_size: int, on_unknown: str = "error", exclude_history: bool = False,
                 info: dict[str, Any] | None = None) -> None:
        if on_unknown not in ON_UNKNOWN:
            raise ValueError(f"on_unknown must be one of {ON_UNKNOWN}, got {on_unknown!r}")
        if history_length < 1:
            raise ValueError(f"history_length must be >= 1, got {history_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._backend = backend
        self.kind: str = backend.kind
        self.catalog = catalog
        self.history_length = history_length
        self.batch_size = batch_size
        self.on_unknown = on_unknown
        self.exclude_history = exclude_history
        self.info: dict[str, Any] = dict(info or {}, history_length=history_length,
                                         exclude_history=exclude_history)
        self.last_skipped: list[list[SkippedItem]] = []
        self._titles = _TitleIndex(catalog)

    def __repr__(self) -> str:
        return (f"Recommender(kind={self.kind!r}, model={self.info.get('model')!r}, "
                f"checkpoint={self.info.get('checkpoint')!r}, items={len(self.catalog)})")

    @property
    def model(self) -> torch.nn.Module:
        """The underlying model (a causal LM / LatentReasoningLM, or a seqrec model), in eval mode."""
        return self._backend.model

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        checkpoint_dir: str | os.PathLike,
        dataset: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        *,
        base_model: str | None = None,
        dtype: str | None = None,
        prompt: str | None = None,
        noun: str | None = None,
        history_length: int | None = None,
        max_prompt_length: int | None = None,
        num_beams: int | None = None,
        length_penalty: float | None = None,
        early_stopping: bool | None = None,
        tokenization: str | None = None,
        use_chat_template: bool | None = None,
        batch_size: int | None = None,
        on_unknown: str = "error",
        exclude_history: bool | None = None,
        guidance_checkpoint: str | os.PathLike | None = None,
        guidance_weight: float | None = None,
    ) -> Recommender:
        """Load a trained model (or a base model for zero-shot use) with its catalogue.

        Args:
            checkpoint_dir: an llmrec SFT checkpoint, another causal-LM checkpoint (full model or peft
                adapter), a ``llmrec seqrec train`` run directory, or a base model name (alias, hub id or
                model directory) -- see the module docstring.
            dataset: prepared dataset directory (or embedded sample name) whose catalogue is ranked.
                Default: the one recorded by the checkpoint; required for base models and plain checkpoints.
            device: where the model runs (default: CUDA if available, else CPU).
            base_model: base LM of an adapter checkpoint (default: the one it records).
            dtype: LLM dtype (default: the SFT checkpoint's ``model_dtype``, else ``bfloat16``); ID models
                run in float32.
            prompt, noun, history_length, max_prompt_length, tokenization: prompt settings of LLMs
                (default: those recorded in the SFT checkpoint's ``llmrec_config.json``, else
                ``llmrec evaluate``'s defaults). ``history_length`` also applies to ID models (default and
                maximum: the run's ``max_history``).
            num_beams: LLM beam width (default ``k``; never fewer than ``k``, nor more than the catalogue's
                distinct titles). Fix it (e.g. to the evaluation's ``num_beams``) for rankings that do not
                depend on ``k``.
            length_penalty: LLM beam score = log-prob sum / length**length_penalty (default 1.0; between -10 and
                10).
            early_stopping: transformers' beam-search flag, as ``llmrec evaluate --early_stopping`` (default True;
                False is ``generate``'s default, which the papers' code ran).
            use_chat_template: wrap LLM prompts in the tokenizer's chat template (default False).
            batch_size: histories per forward batch (default 8 for LLMs, 256 for ID models).
            on_unknown: ``"error"`` or ``"skip"`` for history titles not in the catalogue.
            exclude_history: remove the whole given history's items from the recommendations (default: no
                for LLMs, the run's ``mask_history`` for ID models, whose evaluation masks only the
                ``max_history`` items the model reads).
            guidance_checkpoint: (LLMs) D3 decoding: a ``llmrec seqrec train`` run (e.g. SASRec) on the same
                catalogue whose item probabilities guide the beam search, as ``llmrec evaluate
                --guidance_checkpoint`` does; it reads each given history up to its own ``max_history``.
            guidance_weight: weight of the guidance (required with ``guidance_checkpoint``: use the one selected
                on validation, e.g. by ``llmrec bench pipeline``; 0 turns it off). D3 decodes with
                ``length_penalty=0``.

        Raises:
            FileNotFoundError: missing checkpoint files or dataset (the message says which).
            ValueError: unusable settings or a checkpoint/dataset mismatch.
        """
        if on_unknown not in ON_UNKNOWN:
            raise ValueError(f"on_unknown must be one of {ON_UNKNOWN}, got {on_unknown!r}")
        _check_option_types(
            {"history_length": history_length, "max_prompt_length": max_prompt_length, "num_beams": num_beams,
             "batch_size": batch_size},
            {"exclude_history": exclude_history, "early_stopping": early_stopping, "use_chat_template": use_chat_template})
        if length_penalty is not None:
            from llmrec.decoding.beam_search import check_length_penalty

            # NaN beam scores rank titles arbitrarily (an empty list), inf makes every score -0.0, and beyond
            # |10| the length normaliser overflows (700) or empties the rankings (-700)
            check_length_penalty(length_penalty)
        if guidance_checkpoint is not None:
            if guidance_weight is None:
                raise ValueError("guidance_checkpoint needs guidance_weight (the D3 weight selected on validation)")
            if isinstance(guidance_weight, bool) or not math.isfinite(float(guidance_weight)) or guidance_weight < 0:
                raise ValueError(f"guidance_weight must be a finite number >= 0, got {guidance_weight!r}")
        elif guidance_weight is not None:
            raise ValueError("guidance_weight is given without guidance_checkpoint (the ID model that guides)")
        dev = _default_device(device)
        path = Path(checkpoint_dir)
        if path.is_dir() and is_seqrec_run(path):
            if guidance_checkpoint is not None:
                raise ValueError(f"{path} is an ID-model run: guidance_checkpoint guides an LLM's beam search")
            llm_only = {"base_model": base_model, "dtype": dtype, "prompt": prompt, "noun": noun,
                        "max_prompt_length": max_prompt_length, "num_beams": num_beams,
                        "length_penalty": length_penalty, "early_stopping": early_stopping,
                        "tokenization": tokenization, "use_chat_template": use_chat_template}
            ignored = sorted(k for k, v in llm_only.items() if v is not None)
            if ignored:
                logger.warning("%s is an ID-model run: ignoring LLM-only options %s", path, ignored)
            model, catalog, cfg, info = _load_seqrec(path, dataset, dev, history_length)
            if cfg.model == "lares" and cfg.state_init == "normal":
                logger.warning("%s draws a random initial state (state_init: normal): recommend keys it by each "
                               "history's content, the evaluator by the split row, so its lists can differ from the "
                               "evaluation's rankings of the same histories", path)
            length = history_length or cfg.max_history
            # `batch_size or default` would turn 0 into the default silently; 0 is refused by __init__, as for LLMs.
            size = SEQREC_BATCH_SIZE if batch_size is None else batch_size
            backend = _SeqRecBackend(model, catalog, cfg.max_history, dev, size)
            exclude = cfg.mask_history if exclude_history is None else exclude_history
            return cls(backend, catalog, history_length=length, batch_size=backend.batch_size,
                       on_unknown=on_unknown, exclude_history=exclude, info=info)
        return cls._from_llm(
            path, str(checkpoint_dir), dataset, dev, base_model=base_model, dtype=dtype, prompt=prompt,
            noun=noun, history_length=history_length, max_prompt_length=max_prompt_length,
            num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
            tokenization=tokenization, use_chat_template=use_chat_template, batch_size=batch_size, on_unknown=on_unknown,
            exclude_history=exclude_history, guidance_checkpoint=guidance_checkpoint, guidance_weight=guidance_weight,
        )

    @classmethod
    def _from_llm(cls, path: Path, name: str, dataset, device: torch.device, **opts: Any) -> Recommender:
        from llmrec.models.checkpoint import CheckpointError, checkpoint_kind, load_for_inference

        if opts.get("num_beams") is not None and opts["num_beams"] < 1:
            raise ValueError(f"num_beams must be >= 1, got {opts['num_beams']}")
        meta: dict[str, Any] = {}
        if path.is_dir():
            meta = _read_llmrec_config(path)
            if meta:
                # GRPO writes the SFT layout, plus a "grpo" record in llmrec_config.json.
                source = "llmrec GRPO checkpoint" if "grpo" in meta else "llmrec SFT checkpoint"
            else:
                try:
                    source = f"checkpoint ({checkpoint_kind(path)})"
                except CheckpointError as e:
                    raise CheckpointError(
                        f"{e}; nor is it a `llmrec seqrec train` run (results.json + train/best.safetensors)"
                    ) from None
        else:
            _check_model_name(name)
            source = "base model"

        def setting(key: str, meta_key: str | None = None) -> Any:
            if opts.get(key) is not None:
                return opts[key]
            return meta.get(meta_key or key, LLM_DEFAULTS[key])

        from llmrec.models.backbone import checked_dtype_name

        # Checked before anything loads, and recorded as the dtype used ("fast" is bfloat16 or float32 here).
        dtype = checked_dtype_name(setting("dtype", "model_dtype"), "dtype")
        data_dir = _resolve_dataset(dataset, meta.get("dataset"), f"{name} ({source})")
        if dataset is not None and meta.get("dataset"):
            from llmrec.evaluation.evaluator import _same_dataset

            if not _same_dataset(str(meta["dataset"]), str(dataset)):  # as the evaluator warns
                logger.warning("%s was trained on %s and ranks the catalogue of %s (another catalogue: leave the "
                               "dataset unset to rank its own)", name, meta["dataset"], dataset)
        catalog = _load_catalog(data_dir)
        base = opts.get("base_model")
        if meta:
            from llmrec.training.sft import load_sft_checkpoint

            model, tokenizer, meta = load_sft_checkpoint(path, base, dtype=dtype, device=device)
            base = base or meta.get("model_name_or_path")
        elif path.is_dir():
            if checkpoint_kind(path) == "adapter" and base is None:
                adapter_cfg = _read_json_object(path / "adapter_config.json")
                base = adapter_cfg.get("base_model_name_or_path")
                if not base:
                    raise ValueError(f"{path}: the adapter records no base model; pass base_model (--base-model)")
            model, tokenizer = load_for_inference(base or str(path), str(path), dtype, device)
        else:
            model, tokenizer = load_for_inference(name, None, dtype, device)
            base = name
        max_prompt_length = int(setting("max_prompt_length", "max_length"))
        backend = _LLMBackend(
            model, tokenizer, catalog, prompt=setting("prompt"), noun=setting("noun"),
            use_chat_template=bool(setting("use_chat_template")), tokenization=setting("tokenization"),
            max_prompt_length=max_prompt_length, num_beams=opts.get("num_beams"),
            length_penalty=float(setting("length_penalty")), batch_size=int(setting("batch_size")),
            early_stopping=bool(setting("early_stopping")),
        )
        info = {
            "kind": "llm", "source": source, "checkpoint": str(path) if path.is_dir() else None, "model": base,
            "dataset": str(data_dir), "dtype": dtype, "prompt": backend.template.name, "noun": backend.noun,
            "num_beams": opts.get("num_beams"), "length_penalty": backend.length_penalty,
            "early_stopping": backend.early_stopping,
            "max_prompt_length": max_prompt_length, "tokenization": setting("tokenization"),
            "use_chat_template": backend.use_chat_template, "num_latent_tokens": backend.num_latent_tokens,
        }
        guide = opts.get("guidance_checkpoint")
        if guide is not None and opts["guidance_weight"] == 0:
            logger.warning("guidance_weight is 0: guidance_checkpoint %s is not used", guide)
        elif guide is not None:
            if not Path(guide).is_dir() or not is_seqrec_run(guide):
                raise FileNotFoundError(f"guidance_checkpoint {guide} is not a `llmrec seqrec train` run directory "
                                        "(results.json + train/best.safetensors)")
            # Checked against this catalogue by its recorded digest (item ids must mean the same items).
            id_model, _, id_cfg, id_info = _load_seqrec(
                Path(guide), data_dir, device, None,
                remedy=f"guide with an ID model trained on {data_dir}, the catalogue the LLM ranks "
                       "(`llmrec seqrec train ... --dataset_dir` it)")
            if id_cfg.model == "lares" and id_cfg.state_init == "normal":
                logger.warning("guidance_checkpoint %s draws a random initial state (state_init: normal): recommend "
                               "keys it by each history's content, the evaluator by the split row, so guided "
                               "rankings can differ from the evaluation's", guide)
            backend.guide_with(_SeqRecBackend(id_model, catalog, id_cfg.max_history, device, backend.batch_size),
                               float(opts["guidance_weight"]))
            info["guidance"] = {"checkpoint": str(guide), "weight": float(opts["guidance_weight"]),
                                "id_model": id_info["model"], "id_max_history": id_cfg.max_history}
        # The evaluator never masks history items (protocol: history_masked False).
        exclude = bool(opts.get("exclude_history") or False)
        return cls(backend, catalog, history_length=int(setting("history_length")), batch_size=backend.batch_size,
                   on_unknown=opts["on_unknown"], exclude_history=exclude, info=info)

    # -- histories -----------------------------------------------------------------------------------

    def resolve_history(self, history: Sequence[str | int], on_unknown: str | None = None,
                        label: str = "history") -> ResolvedHistory:
        """Map one history (titles and/or item ids, oldest first) to catalogue item ids.

        Titles are matched exactly, then normalised (:func:`normalize_title`); ``on_unknown`` (default: the
        recommender's) decides whether an unmatched title raises :class:`UnknownItemError` or is skipped
        with a warning (and listed in the result). Ids outside the catalogue and empty histories always
        raise. ``label`` names the history in messages (``""``: positions only). The whole history is
        resolved (not only the ``history_length`` most recent items), so every problem is reported.
        """
        on_unknown = on_unknown or self.on_unknown
        if on_unknown not in ON_UNKNOWN:
            raise ValueError(f"on_unknown must be one of {ON_UNKNOWN}, got {on_unknown!r}")
        if isinstance(history, (str, bytes)) or not isinstance(history, Iterable):
            raise TypeError(f"{label or 'history'}: a history is a list of item titles or ids, "
                            f"got {type(history).__name__}")
        _check_ordered(history, label or "history")
        history = list(history)
        if not history:
            raise HistoryError(f"{label or 'history'} is empty: give at least one item title or catalogue id")
        at = f"{label}, " if label else ""
        n = len(self.catalog)
        ids: list[int] = []
        skipped: list[SkippedItem] = []
        shared: list[SharedTitle] = []
        for pos, value in enumerate(history, start=1):
            # numpy datetimes and timedeltas count as integers (and their .item() can be an int): not ids
            is_time = getattr(getattr(value, "dtype", None), "kind", "") in ("M", "m")
            if getattr(value, "ndim", None) == 0 and hasattr(value, "item") and not is_time:
                # an entry of a tensor / array history: a 0-d tensor or numpy scalar
                try:
                    value = value.item()
                except (RuntimeError, ValueError):  # e.g. a meta tensor: reported below as what it is
                    pass
            if isinstance(value, numbers.Integral) and not isinstance(value, bool) and not is_time:
                if not 1 <= int(value) <= n:
                    raise UnknownItemError(
                        f"{at}position {pos}: item id {int(value)} is not in the catalogue (ids 1..{n})")
                ids.append(int(value))
                continue
            if not isinstance(value, str):
                raise HistoryError(f"{at}position {pos}: expected an item title (str) or id (int), "
                                   f"got {type(value).__name__} {value!r}")
            item, reason = self._titles.lookup(value)
            if item is not None:
                ids.append(item)
                sharing = self._titles.items[self.catalog.title(item)]
                if len(sharing) > 1:
                    logger.warning("%sposition %d: title %r is shared by items %s; it stands for item %d (give an "
                                   "item id to choose another)", at, pos, value, sharing, item)
                    shared.append(SharedTitle(pos, value, sharing))
                continue
            if on_unknown == "skip":
                logger.warning("%sposition %d: skipping title %r: %s", at, pos, value, reason)
                skipped.append(SkippedItem(pos, value, reason))
                continue
            hint = self._titles.suggestions(value) if reason.startswith("is not in") else []
            more = f"; closest titles: {', '.join(repr(s) for s in hint)}" if hint else ""
            if value.strip().isascii() and value.strip().isdigit() and 1 <= int(value) <= n:
                # the CLI's --history 12 40 without --item-ids, or ids read from text; --item-ids is refused with
                # --input, whose files give ids as JSON numbers (pointing a file's user to it led nowhere)
                more += (f"; to give item id {int(value)}, pass an int (CLI: --item-ids with --history; in an "
                         f"--input file, the JSON number {int(value)} without quotes)")
            raise UnknownItemError(f"{at}position {pos}: title {value!r} {reason}{more} "
                                   "(on_unknown='skip' / --on-unknown skip drops such titles)")
        if not ids:
            raise EmptiedHistoryError(f"{label or 'history'}: all {len(history)} of its items were unknown titles "
                                      "and were skipped; nothing to recommend from", skipped)
        return ResolvedHistory(ids, skipped, shared)

    @staticmethod
    def _as_batch(histories: Any) -> tuple[list, bool]:
        if hasattr(histories, "tolist") and not isinstance(histories, (str, bytes, list, tuple)):
            # a torch tensor or numpy array of ids: iterating a tensor gives 0-d tensors, not ints
            histories = histories.tolist()
        if isinstance(histories, (str, bytes)):
            raise TypeError("histories must be one history (a list of titles / ids) or a list of histories, "
                            "got a single string: wrap it in a list")
        _check_ordered(histories, "histories")
        if not isinstance(histories, Sequence):
            if not isinstance(histories, Iterable):
                raise TypeError(f"histories must be a list, got {type(histories).__name__}")
            histories = list(histories)
        if len(histories) == 0:
            raise HistoryError("history is empty: give at least one item title or catalogue id")
        first = histories[0]
        # One history unless its first entry is itself a list of entries: `[None, 1]` or `[2.5, 3]` is one history
        # with a bad entry (reported at its position), not a batch whose "history 0" is not a list.
        single = (isinstance(first, (str, bytes)) or not isinstance(first, Iterable)
                  or getattr(first, "ndim", None) == 0)  # [tensor(3), tensor(5)]: one history of 0-d tensors
        return ([histories] if single else list(histories)), single

    # -- recommending --------------------------------------------------------------------------------

    def recommend(
        self,
        histories: Sequence[str | int] | Sequence[Sequence[str | int]],
        k: int = 10,
        *,
        on_unknown: str | None = None,
        exclude_history: bool | None = None,
        progress: bool = False,
    ) -> list[Recommendation] | list[list[Recommendation]]:
        """Top-``k`` items for one history or a batch of histories.

        Args:
            histories: one history -- a list of item titles (``str``) and/or catalogue ids (``int``), oldest
                first -- or a list of such histories. Only the ``history_length`` most recent items are used.
            k: number of items per history (fewer only if the catalogue, minus excluded items, has fewer).
            on_unknown: override the recommender's ``"error"`` / ``"skip"`` for this call.
            exclude_history: override whether history items are removed from the recommendations.
            progress: show a progress bar over batches.

        Returns:
            For one history, a list of :class:`Recommendation`, best first; for a batch, one such list per
            history, in order. What was skipped is in :attr:`last_skipped`.

        Raises:
            UnknownItemError: an unknown item id, or an unknown title with ``on_unknown="error"``.
            HistoryError: an empty history (or one emptied by skipping), or an entry of the wrong type.
            TypeError: a history (or the batch) that is a set or mapping (no oldest-first order), or an
                ``exclude_history`` that is not a bool.
            PromptFitError: (LLMs) a history whose prompt cannot fit the token budget even with its newest item
                alone (``index`` names it).
        """
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.last_skipped = []  # a call that fails below must not leave the previous call's entries here
        _check_option_types({}, {"exclude_history": exclude_history})
        batch, single = self._as_batch(histories)
        resolved = [self.resolve_history(h, on_unknown, label="history" if single else f"history {i}")
                    for i, h in enumerate(batch)]
        self.last_skipped = [r.skipped for r in resolved]
        out = self.rank_resolved(resolved, k, exclude_history=exclude_history, progress=progress)
        return out[0] if single else out

    def rank_resolved(self, resolved: list[ResolvedHistory], k: int, *, exclude_history: bool | None = None,
                      progress: bool = False) -> list[list[Recommendation]]:
        """Top-``k`` items for histories already resolved by :meth:`resolve_history` (one list per history);
        :meth:`recommend` is this after resolving. With ``exclude_history``, a title given in a history that
        several items share excludes all of them (:meth:`ResolvedHistory.excluded_ids`)."""
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        _check_option_types({}, {"exclude_history": exclude_history})
        exclude = self.exclude_history if exclude_history is None else exclude_history
        n_items = len(self.catalog)
        for i, r in enumerate(resolved):  # built by hand, not by resolve_history: checked as it checks
            if not r.item_ids:
                raise HistoryError(f"history {i} has no item ids (an empty history has nothing to recommend from)")
            bad = next((x for x in r.item_ids if not isinstance(x, numbers.Integral) or isinstance(x, bool)
                        or not 1 <= x <= n_items), None)
            if bad is not None:
                raise HistoryError(f"history {i}: item id {bad!r} is not a catalogue id (1..{n_items})")
        kept = [r.item_ids[-self.history_length:] for r in resolved]  # what the model reads
        # Exclusion covers the whole given history, not only the part the model reads.
        excluded = [r.excluded_ids() for r in resolved] if exclude else None
        starts = range(0, len(kept), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="recommend", unit="batch")
        out: list[list[Recommendation]] = []
        for lo in starts:
            hi = lo + self.batch_size
            out.extend(self._backend.recommend(kept[lo:hi], int(k), excluded[lo:hi] if excluded else None, lo,
                                               whole_histories=[r.item_ids for r in resolved[lo:hi]]))
        return out


# ------------------------------------------------------------------------------------------------- CLI


INPUT_FIELDS = frozenset({"history", "user"})  # what an --input line is read for


def _read_input(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of every non-blank line of a histories JSONL file, shape-checked."""
    from llmrec.data.canonical import DataFormatError, jsonl_records

    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    rows = []
    ignored: dict[str, tuple[int, int]] = {}  # field -> (first line, lines)
    # jsonl_records names the file and line of undecodable bytes, invalid JSON and non-object lines
    for n, row in jsonl_records(path):
        if "history" not in row:
            raise DataFormatError(path, n, "history", "missing")
        if not isinstance(row["history"], list):
            raise DataFormatError(path, n, "history", "expected a list of item titles or ids")
        if "user" in row:
            try:  # echoed into the output: Python's json reads NaN and Infinity, which no JSON reader accepts back
                json.dumps(row["user"], allow_nan=False)
            except ValueError:
                raise DataFormatError(path, n, "user", "holds NaN or Infinity, which is not JSON (RFC 8259)") from None
        for key in row.keys() - INPUT_FIELDS:
            first, count = ignored.get(key, (n, 0))
            ignored[key] = (first, count + 1)
        rows.append((n, row))
    if not rows:  # an empty output "succeeding" would hide a wrong or truncated input file
        raise DataFormatError(path, None, None, "no histories (the file is empty or has only blank lines)")
    if ignored:
        # Read but not used: a misspelt "user" ("users", "user_id") would otherwise vanish from the output unnoticed.
        logger.warning("%s: ignoring field(s) an input line does not have: %s (a line holds %s)", path,
                       ", ".join(f"{k!r} on {c} line(s), first line {f}" for k, (f, c) in sorted(ignored.items())),
                       " and ".join(repr(k) for k in sorted(INPUT_FIELDS)))
    return rows


def _table(recs: list[Recommendation]) -> str:
    width = max([len(str(r.item_id)) for r in recs] + [7])
    lines = [f"{'rank':>4}  {'item_id':>{width}}  {'score':>10}  title"]
    for rank, r in enumerate(recs, start=1):
        lines.append(f"{rank:>4}  {r.item_id:>{width}}  {r.score:>10.4f}  {r.title}")
    return "\n".join(lines)


def cmd_recommend(args: argparse.Namespace) -> int:
    """``llmrec recommend``: see :func:`register_cli`."""
    from llmrec.data.canonical import DataFormatError, atomic_write_text, dumps_line
    from llmrec.decoding.beam_search import NonFiniteLogitsError

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.output is not None:
        from llmrec.data.canonical import check_file_path

        # Checked before loading the model: the atomic write would fail only after every history was ranked.
        check_file_path(args.output, "--output")
    if args.item_ids and args.input is not None:
        # Ignoring it would keep the file's JSON strings as titles (and titles such as "1942" exist).
        raise ValueError("--item-ids applies to --history only: in an --input file, give item ids as JSON integers "
                         "(a JSON string is always a title)")
    if args.input is not None:
        input_path = Path(args.input)
        rows = _read_input(input_path)
    else:
        input_path = None
        history: list[str | int] = list(args.history)
        if args.item_ids:
            try:
                history = [int(x) for x in history]
            except ValueError:
                raise ValueError(f"--item-ids: every --history value must be an integer id, got {args.history}") from None
        rows = [(0, {"history": history})]
    rec = Recommender.from_pretrained(
        args.checkpoint, args.dataset, args.device, base_model=args.base_model, dtype=args.dtype,
        prompt=args.prompt, noun=args.noun, history_length=args.history_length, num_beams=args.num_beams,
        length_penalty=args.length_penalty, early_stopping=args.early_stopping, max_prompt_length=args.max_prompt_length,
        use_chat_template=args.use_chat_template, tokenization=args.tokenization,
        batch_size=args.batch_size, on_unknown=args.on_unknown, exclude_history=args.exclude_history,
        guidance_checkpoint=args.guidance_checkpoint, guidance_weight=args.guidance_weight,
    )
    resolved = []
    for n, row in rows:
        label = "--history" if input_path is None else ""
        try:
            resolved.append(rec.resolve_history(row["history"], label=label))
        except EmptiedHistoryError as e:
            if input_path is None:
                raise
            # --on-unknown skip over a file: a row with no known item gets no recommendations, listed and
            # counted like its skipped titles, instead of stopping the whole file at its first such row.
            logger.warning("%s, row %d: %s", input_path, n, e)
            resolved.append(ResolvedHistory([], e.skipped))
        except (HistoryError, TypeError) as e:
            if input_path is None:
                raise
            raise DataFormatError(input_path, n, "history", str(e)) from None
    usable = [i for i, r in enumerate(resolved) if r.item_ids]
    recs: list[list[Recommendation]] = [[] for _ in resolved]
    try:
        if usable:
            batch = rec.rank_resolved([resolved[i] for i in usable], k=args.k, progress=input_path is not None)
            for i, items in zip(usable, batch):
                recs[i] = items
    except PromptFitError as e:
        if input_path is None:
            raise
        raise DataFormatError(input_path, rows[usable[e.index]][0], "history", str(e)) from None
    except NonFiniteLogitsError as e:
        if input_path is None:
            raise
        raise NonFiniteLogitsError([rows[usable[i]][0] for i in e.rows], e.step, f"{input_path} line(s)") from None
    n_skipped = sum(len(r.skipped) for r in resolved)
    n_emptied = len(resolved) - len(usable)
    if input_path is None and args.output is None:
        src = rec.info.get("checkpoint") or rec.info.get("model")
        print(f"top {args.k} for a history of {len(resolved[0].item_ids)} items "
              f"({rec.kind} model {src}, catalogue {rec.info['dataset']}):")
        print(_table(recs[0]))
        for s in resolved[0].skipped:
            print(f"skipped position {s.position}: {s.value!r} ({s.reason})", file=sys.stderr)
        for t in resolved[0].shared_titles:
            print(f"position {t.position}: title {t.value!r} is shared by items {t.item_ids} (read as item "
                  f"{t.item_ids[0]})", file=sys.stderr)
        return 0
    lines = []
    for (line, row), r, items in zip(rows, resolved, recs):
        # "line": blank input lines are skipped, so the output's position alone could not be joined back to the
        # input row (a row without "user" had nothing else to join on)
        out: dict[str, Any] = {"line": line, "recommendations": [x.to_dict() for x in items],
                               "skipped": [s.to_dict() for s in r.skipped]}
        if r.shared_titles:  # only where it happens: the documented line shape stays as it was
            out["shared_titles"] = [t.to_dict() for t in r.shared_titles]
        if "user" in row:
            out["user"] = row["user"]
        lines.append(dumps_line(out))
    if args.output is None:
        sys.stdout.write("".join(lines))
    else:
        atomic_write_text(args.output, "".join(lines))
        print(f"wrote {len(lines)} lines to {args.output} (k={args.k}; {n_skipped} unknown titles skipped"
              + (f"; {n_emptied} histories with no known item, given no recommendations)" if n_emptied else ")"))
    if n_skipped:
        logger.warning("skipped %d unknown history titles in %d histories (listed under 'skipped')",
                       n_skipped, sum(bool(r.skipped) for r in resolved))
    return 0


def register_cli(subparsers) -> None:
    """Add the ``recommend`` command (each option also under its underscore spelling, as the config commands
    accept ``--max_prompt_length`` and ``--max-prompt-length``)."""
    p = subparsers.add_parser(
        "recommend",
        help="top-k items for user histories with a trained model (table, or JSONL in/out)",
        description="llmrec recommend --checkpoint DIR --history 'title 1' 'title 2' --k 10   (prints a table)\n"
                    "llmrec recommend --checkpoint DIR --input histories.jsonl --output recs.jsonl\n\n"
                    'Input lines: {"history": [titles or item ids], "user": optional}; output lines: '
                    '{"user", "line", "recommendations": [{"item_id", "title", "score"}], "skipped": [...]}, same '
                    'order (line: the input line answered; blank input lines are skipped).',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True,
                   help="llmrec SFT checkpoint, causal-LM checkpoint, `llmrec seqrec train` run directory, "
                        "or a base model (alias / hub id) for zero-shot use")
    p.add_argument("--dataset", default=None,
                   help="prepared dataset directory or sample name (default: the one the checkpoint records)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--history", nargs="+", metavar="ITEM", help="one history, oldest first (titles)")
    src.add_argument("--input", metavar="JSONL", help="histories, one JSON object per line")
    p.add_argument("--output", metavar="JSONL", default=None,
                   help="where recommendations go, written atomically (default: stdout / a table for --history)")
    p.add_argument("--k", type=int, default=10, help="recommendations per history (default 10)")
    p.add_argument("--item-ids", "--item_ids", action="store_true",
                   help="--history values are catalogue item ids, not titles (--input files: JSON integers are ids)")
    p.add_argument("--on-unknown", "--on_unknown", choices=ON_UNKNOWN, default="error",
                   help="a history title not in the catalogue: error (default) or skip it with a warning")
    p.add_argument("--exclude-history", "--exclude_history", action=argparse.BooleanOptionalAction, default=None,
                   help="remove the whole given history's items from the recommendations (default: no for LLMs, "
                        "the run's mask_history for ID models, whose evaluation masks only the max_history items "
                        "the model reads)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="LLM dtype (default: the checkpoint's, else bfloat16)")
    p.add_argument("--base-model", "--base_model", default=None, help="base LM of an adapter checkpoint (default: recorded)")
    p.add_argument("--num-beams", "--num_beams", type=int, default=None, help="LLM beams (default and minimum: --k)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=None, help="histories per batch")
    p.add_argument("--prompt", default=None, help="LLM prompt template (default: the checkpoint's, else d3)")
    p.add_argument("--noun", default=None, help="LLM item noun (default: the checkpoint's, else 'video games')")
    p.add_argument("--history-length", "--history_length", type=int, default=None,
                   help="most recent history items used (default: the checkpoint's)")
    p.add_argument("--length-penalty", "--length_penalty", type=float, default=None,
                   help="LLM beam score = log-prob sum / length**penalty (default 1.0; 0 as D3 decoding)")
    p.add_argument("--early-stopping", "--early_stopping", action=argparse.BooleanOptionalAction, default=None,
                   help="LLM beam search stops a history at num_beams finished titles (default; --no-early-stopping: "
                        "generate's default, which the papers' code ran, as `llmrec evaluate --early_stopping false`)")
    p.add_argument("--max-prompt-length", "--max_prompt_length", type=int, default=None,
                   help="LLM prompt + answer token budget (default: the checkpoint's max_length, else 512)")
    p.add_argument("--use-chat-template", "--use_chat_template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap LLM prompts in the tokenizer's chat template (default: off)")
    p.add_argument("--tokenization", choices=("separate", "joint"), default=None,
                   help="LLM prompt/answer tokenization (default: the checkpoint's, else separate)")
    p.add_argument("--guidance-checkpoint", "--guidance_checkpoint", default=None, metavar="SEQREC_RUN",
                   help="LLM D3 decoding: a `llmrec seqrec train` run on the same catalogue guides the beam search "
                        "(with --guidance-weight and, as D3, --length-penalty 0)")
    p.add_argument("--guidance-weight", "--guidance_weight", type=float, default=None,
                   help="weight of the ID model's log title mass (the one selected on validation)")
    p.set_defaults(func=cmd_recommend)
