"""Evaluate a recommender on a split with constrained beam search (or a popularity ranking).

Protocol, written into every ``results.json``: split, rows (a fixed, seeded subset or all), history
length, prompt, beams, length penalty, matching level, model and checkpoint, and
(only when it is on) the D3 guidance: ``protocol["guidance"]`` holds the ID model's run directory,
weight, model name and history length; no ``guidance`` key means plain LM scores. The package versions are
recorded beside the protocol (``results.json``'s ``versions``).

D3 guidance (``guidance_checkpoint``, ``guidance_weight``): a trained ``llmrec seqrec train`` run on the
same prepared dataset scores every row from its history ids (cut to the ID model's own ``max_history``,
not the prompt's ``history_length``; unmasked even for a run trained with ``mask_history``, as
the beam search itself never masks the history); the softmax over its N items guides the beam search (see
:mod:`llmrec.decoding.guidance`): a title's beam score becomes ``(log p_LM(title) + w * log
P_ID(title)) / L ** length_penalty``, and ``w`` also steers which beams survive each step.

How the work is shared: rows are cut into batches in one global order, and batch ``b`` goes to
process ``b % world_size``. A batch therefore holds the same rows (and the same padding) whatever the
number of processes, so one process and several give the same rankings. Each process appends its
finished rows to ``rankings/part-<rank>.jsonl`` as it goes; a rerun reads every part file and skips
finished rows, so an interrupted evaluation resumes where it stopped (the output directory must be on
a filesystem all processes share, as it is on one machine). Finished or partial rows are reused only under the
same protocol fingerprint (the dataset compared by its resolved path: ``data/games`` and its absolute path are one
dataset), only while their users and targets are still the split's rows, and only while the catalogue is the one they
were ranked over (``catalog_sha256``, the SHA-256 of ``catalog.jsonl``, recorded beside the fingerprint in
``protocol.json`` and ``results.json`` but not part of it, so results recorded before it stay valid; those are not
compared); a start that failed before ranking any row does not hold its directory against a corrected rerun. The main
process then merges the parts in row order, computes the metrics and writes ``rankings.jsonl``, ``results.json`` and
``results.md`` atomically (a finished run whose ``results.md`` is missing gets it written again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmrec.data.canonical import (
    DataFormatError,
    atomic_write_json,
    atomic_write_text,
    dumps_line,
    jsonl_records,
    load_prepared,
    parse_jsonl_lines,
    read_stats,
)
from llmrec.evaluation.compare import _is_rank
from llmrec.evaluation.metrics import compute_metrics

logger = logging.getLogger(__name__)

METHODS = ("beam", "popularity", "seqrec")
PROMPT_FITS = ("own_answer", "longest_answer")
BATCH_ORDERS = ("rows", "length")


@dataclass
class EvalConfig:
    """Options of ``llmrec evaluate`` (recipe keys and ``--name value`` overrides)."""

    dataset: str | None = field(
        default=None,
        metadata={"help": "Prepared dataset directory or embedded sample name (default: the dataset the checkpoint "
                  "records it was trained on; without a checkpoint, the embedded games-sample)."},
    )
    split: str = field(default="test", metadata={"help": "Split to evaluate: valid or test."})
    max_rows: int = field(default=0, metadata={"help": "Evaluate a seeded random subset of this many rows (0 = all)."})
    row_seed: int = field(default=0, metadata={"help": "Seed of the row subset."})
    method: str = field(default="beam", metadata={"help": "beam (constrained beam search with the LM), popularity, or seqrec (full ranking by the ID model of a `llmrec seqrec train` run given as checkpoint)."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id, local dir, or alias (smollm2-135m, "
                                                                    "qwen2.5-coder-0.5b, tiny-qwen2, tiny-llama); "
                                                                    "default: the base model a checkpoint records, "
                                                                    "else smollm2-135m."})
    checkpoint: str | None = field(default=None, metadata={"help": "Trained checkpoint directory to evaluate instead of the base model (method=seqrec: the seqrec run directory)."})
    dtype: str = field(default="bfloat16", metadata={"help": "Model dtype: bfloat16, float32, float16, or fast (bfloat16 where the hardware "
                                              "computes it natively, else float32)."})
    prompt: str | None = field(default=None, metadata={"help": "Prompt template name (prompts/) or path (default: the one "
                                                        "the checkpoint was trained with, else d3)."})
    noun: str | None = field(default=None, metadata={"help": "Item noun used by the prompt (default: the checkpoint's, else "
                                                      "'video games', D3's for Games)."})
    use_chat_template: bool = field(default=False, metadata={"help": "Wrap the prompt in the tokenizer's chat template."})
    history_length: int | None = field(default=None, metadata={"help": "Most recent history items shown in the prompt "
                                                                "(default: the checkpoint's, else 10 as D3)."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Token budget of prompt + answer; longer histories "
                                                                   "are cut from the left (see prompt_fit; default: the "
                                                                   "checkpoint's max_length, else 512)."})
    prompt_fit: str = field(default="own_answer", metadata={"help": "What a prompt leaves room for within max_prompt_length: own_answer (the row's "
                                                                    "true answer and the latent tokens, as in SFT and GRPO; then how much history a row keeps depends on its "
                                                                    "answer's length: 3 of the Games report's 500 test rows at 512 tokens) or "
                                                                    "longest_answer (the longest catalogue answer + the latent tokens: never reads "
                                                                    "the answer; what `llmrec recommend` does). own_answer is the default so that "
                                                                    "finished evaluations stay comparable."})
    num_beams: int = field(default=10, metadata={"help": "Beams (and returned titles) per row."})
    tokenization: str | None = field(default=None, metadata={"help": "separate (D3: prompt and answer tokenized apart, ids "
                                                              "concatenated) or joint (one string; titles checked at the "
                                                              "boundary); default: the checkpoint's, else separate."})
    length_penalty: float = field(default=1.0, metadata={"help": "Beam score = logprob sum / length**penalty (1.0 BIGRec/LatentR3, 0.0 D3; between -10 and 10)."})
    early_stopping: bool = field(default=True, metadata={"help": "transformers' beam-search flag: true stops a row at num_beams finished titles "
                                                         "(the committed evaluations); false (generate's default, which the BIGRec/D3/"
                                                         "LatentR3 code ran) searches on while a running beam may still beat the worst "
                                                         "finished title. They differ with fewer beams than titles, then on many rows (other top-1 on 79 of "
                                                         "200 quickstart rows: benchmarks/results/early_stopping_quickstart_grpo.md)."})
    guidance_checkpoint: str | None = field(default=None, metadata={"help": "D3 text-free assistant: a `llmrec seqrec train` output_dir (same prepared dataset) whose ID model guides the beam search (None = off)."})
    guidance_weight: float = field(default=1.0, metadata={"help": "Weight w of the guidance: each step adds w * log P_ID(token | prefix), so a title gains w * log P_ID(title) (0 = off)."})
    batch_size: int = field(default=8, metadata={"help": "Rows per batch (per process)."})
    batch_order: str = field(default="rows", metadata={"help": "Which rows share a batch (method beam): rows (in the "
                                                       "order drawn; the committed evaluations) or length (rows of similar prompt length, "
                                                       "longest first: less left padding to prefill and attend over, so faster; in float32 the "
                                                       "same rankings, in bfloat16 a row's batch-mates move its scores, so it is part of the "
                                                       "protocol). Results are written in row order either way."})
    ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20], metadata={"help": "Cut-offs K of HR@K, NDCG@K, MRR@K."})
    output_dir: str = field(default="runs/eval", metadata={"help": "Where rankings and results are written."})
    seed: int = field(default=0, metadata={"help": "Random seed (evaluation is deterministic; kept for the record)."})

    def __post_init__(self) -> None:
        from llmrec.models.backbone import checked_dtype_name

        self.dtype = checked_dtype_name(self.dtype, "dtype")
        if self.dataset is None:
            # Not silently the embedded sample for a model trained on another dataset.
            recorded = recorded_dataset(self.checkpoint) if self.checkpoint else None
            self.dataset = recorded or DEFAULT_DATASET
            if recorded:
                logger.info("dataset: %s (recorded by %s; --dataset overrides)", recorded, self.checkpoint)
            elif self.checkpoint and Path(self.checkpoint).is_dir():
                logger.warning("%s records no dataset: evaluating on the embedded %s (give --dataset)",
                               self.checkpoint, DEFAULT_DATASET)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        self._resolve_prompt_settings()
        if self.split not in ("train", "valid", "test"):
            raise ValueError(f"split must be train, valid or test, got {self.split!r}")
        if self.prompt_fit not in PROMPT_FITS:
            raise ValueError(f"prompt_fit must be one of {PROMPT_FITS}, got {self.prompt_fit!r}")
        from llmrec.decoding.search import TOKENIZATIONS

        if self.tokenization not in TOKENIZATIONS:  # checked here, not after the output directory is claimed
            raise ValueError(f"tokenization must be one of {TOKENIZATIONS}, got {self.tokenization!r}")
        for name in ("length_penalty", "guidance_weight"):
            # As floats: `length_penalty=1` from Python would otherwise be "1" in the protocol, not "1.0", another
            # fingerprint than the same setting from a recipe or the command line (which give floats).
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        from llmrec.decoding.beam_search import check_length_penalty

        check_length_penalty(self.length_penalty)  # NaN, inf or beyond 10: arbitrary, overflowing or empty rankings
        if self.batch_order not in BATCH_ORDERS:
            raise ValueError(f"batch_order must be one of {BATCH_ORDERS}, got {self.batch_order!r}")
        for name in ("num_beams", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.row_seed < 0:  # numpy's seeds are unsigned
            raise ValueError(f"row_seed must be >= 0, got {self.row_seed}")
        if not (math.isfinite(self.guidance_weight) and self.guidance_weight >= 0):  # inf * 0 = NaN beam scores
            raise ValueError(f"guidance_weight must be a finite number >= 0, got {self.guidance_weight}")
        if self.guidance_checkpoint is not None and self.method != "beam":
            raise ValueError("guidance_checkpoint only applies to method=beam")
        if self.method == "popularity" and self.checkpoint:
            raise ValueError(f"method=popularity ranks items by training counts: it reads no checkpoint (got "
                             f"{self.checkpoint}); drop --checkpoint or use method beam / seqrec")
        if self.method == "seqrec" and not self.checkpoint:
            raise ValueError("method=seqrec needs checkpoint: a `llmrec seqrec train` output_dir")
        if not self.ks or any(int(k) < 1 for k in self.ks):
            # checked here, not after the beam search over every row
            raise ValueError(f"ks must be a non-empty list of cut-offs >= 1, got {self.ks}")
        self.ks = sorted({int(k) for k in self.ks})
        if self.method == "beam" and self.ks[0] > self.num_beams:
            raise ValueError(f"no cut-off in ks {self.ks} is <= num_beams ({self.num_beams}): a beam search ranks "
                             f"num_beams titles; lower ks or raise num_beams")
        beyond = [k for k in self.ks if k > self.num_beams] if self.method == "beam" else []
        if beyond:
            # info, not a warning: the defaults (ks up to 20, 10 beams) do this on purpose for the ID models' @20
            logger.info("ks %s exceed num_beams %d: not reported for this run (a beam search ranks num_beams titles)",
                        beyond, self.num_beams)
        if self.history_length < 1:
            raise ValueError(f"history_length must be >= 1, got {self.history_length}")
        if self.max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 (0 = all rows), got {self.max_rows}")
        from llmrec.data.canonical import check_directory_path

        check_directory_path(self.output_dir, "output_dir")

    def _resolve_prompt_settings(self) -> None:
        """Fill the prompt settings left unset: an LLM checkpoint is evaluated on the prompts it learnt (the
        values its ``llmrec_config.json`` records), anything else with :data:`PROMPT_DEFAULTS`. A value given
        explicitly is kept (``run`` warns when it differs from the checkpoint's)."""
        recorded = recorded_prompt_settings(self.checkpoint) if self.method == "beam" and self.checkpoint else {}
        if self.model_name_or_path is None:
            base = _recorded_base_or_none(self.checkpoint) if self.method == "beam" and self.checkpoint else None
            self.model_name_or_path = base or DEFAULT_MODEL
            if base:
                logger.info("base model: %s (recorded by %s; --model_name_or_path overrides)", base, self.checkpoint)
        taken = []
        for name, default in PROMPT_DEFAULTS.items():
            if getattr(self, name) is None:
                if name in recorded:
                    taken.append(name)
                setattr(self, name, recorded.get(name, default))
        if taken:
            logger.info("prompt settings of %s: %s (options override)", self.checkpoint,
                        ", ".join(f"{k}={getattr(self, k)!r}" for k in taken))

    @property
    def guided(self) -> bool:
        """D3 guidance is on: a guidance checkpoint and a non-zero weight."""
        return self.method == "beam" and self.guidance_checkpoint is not None and self.guidance_weight != 0


DEFAULT_DATASET = "games-sample"
DEFAULT_MODEL = "smollm2-135m"
# Prompt settings of an evaluation whose checkpoint records none (base models, plain adapters, ID models).
PROMPT_DEFAULTS: dict[str, Any] = {
    "prompt": "d3", "noun": "video games", "history_length": 10, "max_prompt_length": 512, "tokenization": "separate",
}
# EvalConfig field -> the key `llmrec sft` / `llmrec grpo` record it under in llmrec_config.json.
_RECORDED_AS = {"prompt": "prompt", "noun": "noun", "history_length": "history_length",
                "max_prompt_length": "max_length", "tokenization": "tokenization"}


def _json_object_or_empty(path: Path) -> dict:
    """A JSON object file an llmrec run wrote, or {} when it is absent or not one (the loaders report damage)."""
    try:
        return read_stats(path) if path.is_file() else {}
    except DataFormatError:
        return {}


def recorded_dataset(checkpoint: str | Path) -> str | None:
    """The dataset a trained checkpoint records (``llmrec sft`` / ``llmrec grpo``: ``llmrec_config.json``;
    ``llmrec seqrec train``: ``results.json``), or None if it records none (or is not a trained checkpoint)."""
    from llmrec.training.sft import LLMREC_CONFIG_NAME

    d = Path(checkpoint)
    if (d / LLMREC_CONFIG_NAME).is_file():
        found = _json_object_or_empty(d / LLMREC_CONFIG_NAME).get("dataset")
        return str(found) if found else None
    res = _json_object_or_empty(d / "results.json")
    proto, cfg = res.get("protocol"), res.get("config")
    found = (proto.get("dataset_dir") if isinstance(proto, dict) else None) or (
        cfg.get("dataset_dir") if isinstance(cfg, dict) else None)
    return str(found) if found else None


def recorded_prompt_settings(checkpoint: str | Path) -> dict[str, Any]:
    """The prompt settings an ``llmrec sft`` / ``llmrec grpo`` checkpoint was trained with, under
    :class:`EvalConfig`'s names (``max_length`` -> ``max_prompt_length``); {} for anything else (a base model, a
    plain adapter, a file not written by llmrec: the loaders report what is wrong with those)."""
    from llmrec.training.sft import LLMREC_CONFIG_NAME

    meta = _json_object_or_empty(Path(checkpoint) / LLMREC_CONFIG_NAME)
    return {name: meta[key] for name, key in _RECORDED_AS.items() if meta.get(key) is not None}


def prompt_setting_differences(config: EvalConfig) -> dict[str, tuple[Any, Any]]:
    """``{setting: (trained with, here)}``: the prompt settings of ``config`` that differ from the ones its checkpoint
    was trained with (:func:`recorded_prompt_settings`). ``llmrec sft`` / ``llmrec grpo`` train on plain prompts and
    record no chat-template setting: ``use_chat_template`` on their checkpoints is a difference too."""
    from llmrec.training.sft import LLMREC_CONFIG_NAME

    recorded = recorded_prompt_settings(config.checkpoint) if config.checkpoint else {}
    other = {k: (v, getattr(config, k)) for k, v in recorded.items() if getattr(config, k) != v}
    if config.use_chat_template and config.checkpoint and (Path(config.checkpoint) / LLMREC_CONFIG_NAME).is_file():
        other["use_chat_template"] = (False, True)
    return other


def _recorded_base_or_none(checkpoint: str | Path) -> str | None:
    """The base model a checkpoint records (:func:`llmrec.models.checkpoint.recorded_base`), or None when it records
    none or its files are unreadable (the loaders report those)."""
    from llmrec.models.checkpoint import recorded_base

    try:
        return recorded_base(checkpoint)[0]
    except (OSError, ValueError, AttributeError):
        return None


def _read_json_file(path: Path) -> dict:
    """A JSON object written by an earlier evaluation; a damaged one is named (it is not ours to repair)."""
    try:
        return read_stats(path)  # any JSON-object file, damage named
    except DataFormatError as e:
        raise ValueError(f"{path} is damaged ({e.problem}): remove it, or choose another output_dir") from None


# Beam-search settings a protocol records only when they differ from these (so earlier fingerprints stay valid).
UNRECORDED_BEAM_DEFAULTS: dict[str, Any] = {"prompt_fit": "own_answer", "early_stopping": True, "batch_order": "rows"}


def _protocol_changes(found: Any, wanted: dict, limit: int = 6) -> str:
    """What differs between a recorded evaluation protocol and this one, for an error message."""
    from llmrec.config import mismatches

    if not isinstance(found, dict):
        return "it records no protocol"
    found, wanted = json.loads(json.dumps(found, default=str)), json.loads(json.dumps(wanted, default=str))
    # Beam settings recorded only when not the default (protocol()): show the default, not None.
    if found.get("method") == "beam" == wanted.get("method"):
        for key, default in UNRECORDED_BEAM_DEFAULTS.items():
            found.setdefault(key, default)
            wanted.setdefault(key, default)
    diff = mismatches(found, wanted)
    diff.update({k: (v, None) for k, v in found.items() if k not in wanted})
    parts = [f"{k}={f!r} (here {w!r})" for k, (f, w) in sorted(diff.items())]
    if not parts:
        return "recorded by another version of llmrec"
    return ", ".join(parts[:limit]) + (f" and {len(parts) - limit} more" if len(parts) > limit else "")


def _same_dataset(a: str, b: str) -> bool:
    """Two names of one prepared dataset (paths normalised, embedded sample names resolved)."""
    from llmrec.data.samples import SAMPLES, sample_cache_dir

    def where(name: str) -> str:  # without preparing a sample that is not there yet
        path = sample_cache_dir(name) if name in SAMPLES and not Path(name).exists() else Path(name)
        return str(path.resolve()) if path.exists() else os.path.normpath(name)

    return a == b or where(a) == where(b)


def rows_by_length(rows: list[int], lengths: list[int]) -> list[int]:
    """``rows`` longest prompt first, ties in their given order (``batch_order: length``).

    Longest first as the trainers' length grouping does: a batch too large for the device fails at once, not at
    the end of a long evaluation."""
    if len(rows) != len(lengths):
        raise ValueError(f"{len(rows)} rows but {len(lengths)} lengths")
    at = sorted(range(len(rows)), key=lambda i: (-lengths[i], i))
    return [rows[i] for i in at]


def select_rows(n: int, max_rows: int, seed: int) -> list[int]:
    """Row indices of the evaluated subset: all rows, or ``max_rows`` drawn with ``seed`` (sorted)."""
    if max_rows <= 0 or max_rows >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=max_rows, replace=False).tolist())


def weights_sha256(path: str | Path) -> str | None:
    """Content identity of trained weights: the digest of a weights file, or of a checkpoint directory's top-level
    ``*.safetensors`` files (adapter, latent head, full weights) in name order; None if there are none.

    Part of an evaluation's protocol, so a stage retrained in the same directory is not matched with the
    results of its previous weights.
    """
    from llmrec.models.backbone import sha256_of_files

    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    return sha256_of_files(files) if files else None


def protocol_fingerprint(protocol: dict) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:16]


def _as_recorded(record: dict, protocol: dict, fp: str) -> tuple[dict, str] | None:
    """``(protocol, fingerprint)`` to go on with if ``record`` (a ``results.json`` or ``protocol.json``) was made
    under ``protocol`` (fingerprint ``fp``), else None.

    The protocol names the dataset directory as it was given, so ``data/games`` and its absolute path give two
    fingerprints for one dataset. A record that differs only in that spelling is the same protocol: its own protocol
    and fingerprint are kept, so the fingerprints already recorded stay what they are.
    """
    if record.get("fingerprint") == fp:
        return protocol, fp
    found = record.get("protocol")
    named = found.get("dataset") if isinstance(found, dict) else None
    if not isinstance(named, str) or named == protocol.get("dataset"):
        return None
    respelled = {**protocol, "dataset": named}
    if protocol_fingerprint(respelled) == record.get("fingerprint") and _same_dataset(named, protocol["dataset"]):
        return respelled, record["fingerprint"]
    return None


def catalog_sha256(dataset_dir: str | Path) -> str:
    """SHA-256 of a prepared dataset's ``catalog.jsonl``: the value :func:`llmrec.data.identity.data_sha256` gives
    for that file (what training runs record), without reading the splits too."""
    from llmrec.data.canonical import CATALOG_FILE
    from llmrec.models.backbone import sha256_of_files

    return sha256_of_files([Path(dataset_dir) / CATALOG_FILE])


def _check_ranking_record(rec: dict, path: Path, line: int, remedy: str) -> int:
    """The row of a ranking record read back (a part file, or a finished ``rankings.jsonl``), after checking the
    fields reuse, the metrics and the merged ``rankings.jsonl`` read: a damaged record is a
    :class:`DataFormatError` naming the file, line (its ``row``) and field, ending with ``remedy``, not a bare
    KeyError or TypeError later."""

    def bad(name: str, expected: str) -> DataFormatError:
        found = json.dumps(rec[name], ensure_ascii=False)[:40] if name in rec else "nothing"
        return DataFormatError(path, line, name, f"expected {expected}, got {found} (a damaged record); {remedy}")

    row = rec.get("row")
    if isinstance(row, bool) or not isinstance(row, int) or row < 0:
        raise bad("row", "a row index (an int >= 0)")
    user = rec.get("user_id")
    if isinstance(user, bool) or not isinstance(user, (str, int)):
        raise bad("user_id", "a string or integer id")
    target = rec.get("target_item_id")
    if isinstance(target, bool) or not isinstance(target, int):
        raise bad("target_item_id", "an item id (an int)")
    for name in ("item_rank", "title_rank"):
        if name not in rec or not _is_rank(rec[name]):
            raise bad(name, "an int >= 0 or null")
    for name in ("item_ranking", "title_ranking", "scores"):
        if not isinstance(rec.get(name), list):
            raise bad(name, "a list")
    return row


def rank_of(ranking: list, target) -> int | None:
    try:
        return ranking.index(target)
    except ValueError:
        return None


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("llmrec", "torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def popularity_ranking(train_targets: list[int], k: int | None = None) -> list[int]:
    """The ``k`` (all when None) most frequent training targets, ties by ascending item id."""
    counts = Counter(train_targets)
    return [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def distinct_titles(ranked_items: Iterable[int], title_of: Callable[[int], str], k: int) -> list[str]:
    """The first ``k`` distinct titles of an item ranking (a title ranks where its best item does).

    Read from the whole ranking, not only its first ``k`` items: items sharing a title would otherwise leave
    fewer than ``k`` titles and count a target title ranked ``<= k`` among titles as a miss.

    >>> distinct_titles([4, 7, 5, 9], {4: "a", 7: "a", 5: "b", 9: "c"}.get, 2)
    ['a', 'b']
    """
    titles: dict[str, None] = {}
    for item in ranked_items:
        titles.setdefault(title_of(item))
        if len(titles) == k:
            break
    return list(titles)


def markdown_table(rows: list[dict], ks: list[int], level: str = "item") -> str:
    """A markdown table of HR@K / NDCG@K per evaluated method."""
    metric_names = [f"{m}@{k}" for m in ("hr", "ndcg") for k in ks]
    header = "| method | rows | " + " | ".join(n.upper() if n.startswith("hr") else n.replace("ndcg", "NDCG") for n in metric_names) + " |"
    lines = [header, "|" + "---|" * (2 + len(metric_names))]
    for r in rows:
        m = r["metrics"][level]
        cells = [f"{m[n]:.4f}" if n in m else "-" for n in metric_names]
        lines.append(f"| {r['name']} | {r['protocol']['rows']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class Evaluator:
    """Runs one evaluation described by an :class:`EvalConfig` (see the module docstring)."""

    def __init__(self, config: EvalConfig):
        self.config = config
        from llmrec.distributed import distributed_state

        self.state = distributed_state()
        self.out = Path(config.output_dir)
        self.guidance_model = None
        self.guidance_info: dict | None = None
        self.seqrec_model = None
        self.seqrec_info: dict | None = None

    # ------------------------------------------------------------------ setup

    def _protocol(self, data, rows: list[int]) -> dict:
        c = self.config
        p = {
            "dataset": str(data.directory), "split": c.split, "rows": len(rows), "max_rows": c.max_rows,
            "row_seed": c.row_seed, "method": c.method, "history_length": c.history_length,
            "ks": c.ks, "matching": ["item", "title"], "history_masked": False,
        }
        if c.method == "seqrec":
            g = self.seqrec_info
            p.update({
                "checkpoint": c.checkpoint, "id_model": g["model"], "id_weights": g["weights"],
                "id_weights_sha256": weights_sha256(Path(c.checkpoint) / g["weights"]),
                "history_length": g["max_history"], "history_masked": g["mask_history"],
                "ranking": "full catalogue by the ID model's scores, ties by the smaller item id; the list keeps "
                           "the top max(ks) items, the item rank is the target's full-catalogue rank",
            })
            # The title list is the first max(ks) distinct titles of the whole ranking. Until 2026-12-03 it was
            # the titles of the top max(ks) items (fewer when items share a title); not part of the fingerprint,
            # so finished evaluations stay valid: on the committed Games rows the two agree at K <= 10.
        if c.method == "beam":
            p.update({
                "model": c.model_name_or_path, "checkpoint": c.checkpoint, "dtype": c.dtype, "prompt": c.prompt,
                "noun": c.noun, "use_chat_template": c.use_chat_template, "tokenization": c.tokenization, "num_beams": c.num_beams,
                "length_penalty": c.length_penalty, "max_prompt_length": c.max_prompt_length,
                "batch_size": c.batch_size,
                "ranking": "beams in score order; item level expands each title to its items in ascending id order",
            })
            if c.checkpoint:
                p["checkpoint_sha256"] = weights_sha256(c.checkpoint)
            else:
                from llmrec.models.backbone import alias_conversion_version

                # The base model's converted copy (a checkpoint carries its own tokenizer): recorded once a correction
                # changed it, so results of the copy before (SmolLM2's digit split) are not taken for its results.
                version = alias_conversion_version(c.model_name_or_path)
                if version is not None and version > 1:
                    p["backbone_conversion_version"] = version
            # Only when not the default: earlier fingerprints stay what they were.
            p.update({k: getattr(c, k) for k, default in UNRECORDED_BEAM_DEFAULTS.items() if getattr(c, k) != default})
            if c.guided:
                # Only when on, so the fingerprints of unguided evaluations stay what they were.
                g = self.guidance_info
                p["guidance"] = {
                    "checkpoint": c.guidance_checkpoint, "weight": c.guidance_weight, "id_model": g["model"],
                    "id_max_history": g["max_history"], "id_weights": g["weights"],
                    "id_weights_sha256": weights_sha256(Path(c.guidance_checkpoint) / g["weights"]),
                    "score": "(LM logprob + weight * log P_ID(title)) / length**length_penalty; "
                             "P_ID = ID-model softmax mass of the title's items",
                }
        return p

    def _load_guidance(self, data) -> None:
        """Load the ID model (every process; it is small) and check it against the catalogue."""
        from llmrec.decoding.guidance import load_guidance_model

        c = self.config
        if not c.guided:
            if c.guidance_checkpoint is not None:
                logger.warning("guidance_weight is 0: guidance_checkpoint %s is not used", c.guidance_checkpoint)
            return
        self.guidance_model, self.guidance_info = load_guidance_model(
            c.guidance_checkpoint, self.state.device, num_items=data.num_items)
        self._check_catalog(data, data.num_items, self.guidance_info, f"guidance checkpoint {c.guidance_checkpoint}")

    @staticmethod
    def _check_catalog(data, num_items: int, info: dict, what: str) -> None:
        """An ID model's item ids only mean something on the catalogue it was trained on (``info``:
        :func:`~llmrec.decoding.guidance.load_guidance_model`'s)."""
        if num_items != data.num_items:
            raise ValueError(f"{what}: the ID model was trained on {num_items} items, {data.directory} has "
                             f"{data.num_items}")
        from llmrec.decoding.guidance import check_trained_catalog

        check_trained_catalog(info["dataset_dir"], data.directory, what, info.get("catalog_sha256"))

    def _load_seqrec(self) -> int:
        """Load the evaluated ID model (method=seqrec); returns its history length."""
        from llmrec.decoding.guidance import load_guidance_model

        c = self.config
        self.seqrec_model, self.seqrec_info = load_guidance_model(c.checkpoint, self.state.device)
        return int(self.seqrec_info["max_history"])

    def _check_rows(self, data, split) -> None:
        # Ids outside the catalogue were refused by load_prepared; a row without history has no prompt.
        for i, hist in enumerate(split["history_item_ids"]):
            if not hist:
                raise data.row_error(self.config.split, i, "history_item_ids", "empty history")

    def _done_rows(self) -> dict[int, dict]:
        """The rows finished so far (every process's part file).

        A kill in the middle of :meth:`_append` can leave a partial last line: it is dropped (its rows are
        evaluated again) and this process truncates its own part file to the last complete line, so the next
        append does not glue a record onto it. A malformed complete line is still an error.
        """
        done: dict[int, dict] = {}
        for part in sorted((self.out / "rankings").glob("part-*.jsonl")):
            raw = part.read_bytes()
            complete = raw[: raw.rfind(b"\n") + 1]
            if len(complete) < len(raw):
                logger.warning("%s: dropping a partial last record (%d bytes; an interrupted write); its rows are "
                               "evaluated again", part, len(raw) - len(complete))
                if part.name == f"part-{self.state.process_index}.jsonl":
                    with open(part, "r+b") as f:
                        f.truncate(len(complete))
            try:
                text = complete.decode("utf-8")
            except UnicodeDecodeError as e:  # a bare UnicodeDecodeError named neither the file nor the line
                raise DataFormatError(part, complete.count(b"\n", 0, e.start) + 1, None,
                                      f"bytes that are not UTF-8 at offset {e.start}") from None
            # split at "\n" only: str.splitlines() also breaks at U+0085, U+2028 and U+2029, which dumps_line
            # leaves raw inside strings (a title holding one would cut its record in two)
            lines = text.split("\n")
            # parse_jsonl_lines skips blank lines: the line number of each record it yields, for the field checks
            numbers = (n for n, line in enumerate(lines, start=1) if line.strip())
            remedy = "remove this part file to rank its rows again"
            for n, rec in zip(numbers, parse_jsonl_lines(lines, part), strict=True):
                done[_check_ranking_record(rec, part, n, remedy)] = rec
        return done

    def _has_records(self) -> bool:
        """Some part file holds a complete record: a row was ranked under the protocol in ``protocol.json``."""
        return any(b"\n" in part.read_bytes() for part in (self.out / "rankings").glob("part-*.jsonl"))

    def _check_done_rows(self, done: dict[int, dict], split, source: Path | None = None,
                         what: str = "partial evaluation") -> None:
        """Records of a partial (or finished) evaluation are reused only for the rows they were made for: the
        fingerprint names the dataset directory, not its contents, and a dataset prepared again in place may have
        other rows."""
        if not done:
            return
        source = self.out / "rankings" if source is None else source
        users, targets = list(split["user_id"]), list(split["target_item_id"])
        for row, rec in sorted(done.items()):
            ex = (users[row], targets[row]) if 0 <= row < len(users) else None
            if ex is None or (rec["user_id"], rec["target_item_id"]) != ex:
                found = "no such row" if ex is None else f"user {ex[0]!r}, target {ex[1]}"
                raise ValueError(
                    f"{source}: the {what}'s row {row} is user {rec['user_id']!r}, target "
                    f"{rec['target_item_id']}, but {self.config.split} row {row} of {self.config.dataset} has "
                    f"{found} (was the dataset prepared again?); remove {self.out} or choose another output_dir")

    def _check_popularity_list(self, data, done: dict[int, dict], source: Path, what: str) -> None:
        """Popularity records are reused only while they hold the list the training split gives now: the
        fingerprint names the test rows, and train.jsonl prepared again (another cut-off, more users) changes the
        counts without changing the fingerprint."""
        if self.config.method != "popularity" or not done:
            return
        k = max(self.config.ks)
        items = popularity_ranking(list(data.splits["train"]["target_item_id"]), k)
        _, rec = min(done.items())
        if rec["item_ranking"] != items:  # one list for every row: the first record tells
            raise ValueError(
                f"{source}: the {what}'s popularity list (top items {rec['item_ranking'][:3]}) is not the one "
                f"{Path(data.directory) / 'train.jsonl'} gives now (top items {items[:3]}): the training split "
                f"changed since; remove {self.out} or choose another output_dir")

    def _check_catalog_digest(self, data, record: dict, digest: str, source: Path, what: str) -> None:
        """Rankings are reused only over the catalogue they were ranked over: the fingerprint names the dataset
        directory, and a catalogue prepared again in place (another title-cleaning rule, say) changes the titles
        (and what a title rank means) without changing the fingerprint or the split's rows. ``record``: the
        ``results.json`` or ``protocol.json`` that recorded ``catalog_sha256`` (none before it was recorded: not
        compared)."""
        recorded = record.get("catalog_sha256")
        if recorded is not None and recorded != digest:
            raise ValueError(
                f"{source}: the {what} was ranked over another catalogue than {Path(data.directory) / 'catalog.jsonl'} "
                f"holds now (SHA-256 {str(recorded)[:12]}..., now {digest[:12]}...): the catalogue was prepared again "
                f"since; remove {self.out} or choose another output_dir")

    # ------------------------------------------------------------------ run

    def _warn_on_other_prompt_settings(self) -> None:
        """Say so when the checkpoint was trained on other prompts than this evaluation builds (settings given
        explicitly that differ from the ones the checkpoint records; unset ones were taken from it)."""
        c = self.config
        other = prompt_setting_differences(c)
        if other and self.state.is_main_process:
            logger.warning("%s was trained with %s: this evaluation builds its prompts otherwise (leave these "
                           "options unset to evaluate it on the prompts it learnt)", c.checkpoint,
                           ", ".join(f"{k}={f!r} (here {v!r})" for k, (f, v) in other.items()))
        trained_on = recorded_dataset(c.checkpoint)
        if trained_on and self.state.is_main_process and not _same_dataset(trained_on, c.dataset):
            logger.warning("%s was trained on %s and is evaluated on %s (another catalogue: leave dataset unset to "
                           "evaluate it on its own)", c.checkpoint, trained_on, c.dataset)

    def run(self) -> dict | None:
        """Evaluate (resuming if possible); returns the results dict on the main process."""
        c = self.config
        if c.method == "beam" and c.checkpoint is not None:
            from llmrec.models.checkpoint import adapter_base, checkpoint_kind

            ckpt = Path(c.checkpoint)
            if (ckpt / "results.json").is_file() and (ckpt / "train" / "best.safetensors").is_file():
                raise ValueError(f"{ckpt} is a `llmrec seqrec train` run (an ID model): evaluate it with "
                                 f"--method seqrec")
            checkpoint_kind(c.checkpoint)  # fail before anything is written: not a checkpoint, or another base model
            adapter_base(c.checkpoint, c.model_name_or_path)
            self._warn_on_other_prompt_settings()
        # Popularity needs the training targets; the LM path only the evaluated split.
        wanted = sorted({c.split, "train"}) if c.method == "popularity" else [c.split]
        history_length = c.history_length
        if c.method == "seqrec":
            history_length = self._load_seqrec()  # the ID model reads its own history length
        data = load_prepared(c.dataset, splits=wanted, max_history=history_length)
        split = data.splits[c.split]
        for name in wanted:  # checked before anything is written (metrics over no row, popularity of nothing)
            if len(data.splits[name]) == 0:
                raise ValueError(f"{Path(data.directory) / (name + '.jsonl')} has no rows: nothing to "
                                 f"{'count popularity from' if name != c.split else 'evaluate'}")
        self._check_rows(data, split)
        self._load_guidance(data)  # fail before anything is written
        if c.method == "seqrec":
            self._check_catalog(data, self.seqrec_info["num_items"], self.seqrec_info, c.checkpoint)
        rows = select_rows(len(split), c.max_rows, c.row_seed)
        protocol = self._protocol(data, rows)
        fp = protocol_fingerprint(protocol)
        catalog_digest = catalog_sha256(data.directory)
        results_path = self.out / "results.json"
        if results_path.exists():
            prev = _read_json_file(results_path)
            if _as_recorded(prev, protocol, fp) is not None:
                # Same protocol, but maybe not the same rows or titles: the dataset may have been prepared again in
                # place.
                rankings = self.out / "rankings.jsonl"
                if not rankings.exists():  # `compare`, the report and its archive read the rankings, not only metrics
                    raise ValueError(f"{rankings} is missing beside the finished {results_path}: remove "
                                     f"{results_path} to rank the rows again")
                # jsonl_records splits lines at "\n" only
                remedy = f"remove {results_path} to merge the part files again (or {self.out} to rank every row again)"
                finished = {_check_ranking_record(rec, rankings, n, remedy): rec for n, rec in jsonl_records(rankings)}
                self._check_done_rows(finished, split, rankings, "finished evaluation")
                self._check_popularity_list(data, finished, rankings, "finished evaluation")
                self._check_catalog_digest(data, prev, catalog_digest, results_path, "finished evaluation")
                lost = [r for r in rows if r not in finished]
                if lost:  # a damaged copy would otherwise pass for the finished evaluation its results describe
                    raise ValueError(f"{rankings} lacks {len(lost)} of the {len(rows)} rows {results_path} was "
                                     f"computed from (first: row {lost[0]}): remove {results_path} to rank them again")
                table = self.out / "results.md"
                if self.state.is_main_process and not table.exists():
                    # `llmrec evaluate` prints it, and the report copies it: written again from the finished results
                    logger.warning("%s is missing beside the finished %s: writing it again", table, results_path)
                    atomic_write_text(table, self._markdown(prev))
                logger.info("%s is complete for this protocol; nothing to do", results_path)
                return prev
            if (self.out / "run_config.json").exists() and "phases" in prev:
                # not an evaluation at all: listing every protocol field as "changed" hid the point (a review)
                raise ValueError(f"{self.out} holds an `llmrec seqrec train` run, not an evaluation; choose another "
                                 f"output_dir (evaluate the run with --method seqrec --checkpoint {self.out})")
            raise ValueError(f"{self.out} holds results of a different protocol "
                             f"({_protocol_changes(prev.get('protocol'), protocol)}); choose another output_dir, "
                             f"or remove {self.out} to evaluate again")
        proto_path = self.out / "protocol.json"
        if self.state.is_main_process:
            old = _read_json_file(proto_path) if proto_path.exists() else None
            matched = _as_recorded(old, protocol, fp) if old is not None else None
            if old is not None and matched is None:
                # A start that failed before ranking any row (a typo in the prompt or model name, say) left only
                # protocol.json: nothing to reuse or to protect, so the corrected run takes the directory.
                if self._has_records():
                    raise ValueError(f"{self.out} holds a partial evaluation of a different protocol "
                                     f"({_protocol_changes(old.get('protocol'), protocol)}); choose another "
                                     "output_dir")
                logger.warning("%s: replacing the protocol of a start that ranked no row", proto_path)
            elif matched is not None:
                protocol, fp = matched  # the dataset as the partial evaluation named it
                if self._has_records():
                    self._check_catalog_digest(data, old, catalog_digest, self.out / "rankings", "partial evaluation")
            (self.out / "rankings").mkdir(parents=True, exist_ok=True)
            atomic_write_json(proto_path, {"fingerprint": fp, "protocol": protocol, "catalog_sha256": catalog_digest})
        self.state.wait_for_everyone()

        done = self._done_rows()
        self._check_done_rows(done, split)
        self._check_popularity_list(data, done, self.out / "rankings", "partial evaluation")
        start = time.perf_counter()
        if c.method == "popularity":
            new = self._run_popularity(data, split, rows, done)
        elif c.method == "seqrec":
            new = self._run_seqrec(data, split, rows, done)
        else:
            new = self._run_beam(data, split, rows, done)
        elapsed = time.perf_counter() - start
        self.state.wait_for_everyone()
        if not self.state.is_main_process:
            return None
        del new
        records = self._done_rows()
        missing = [r for r in rows if r not in records]
        if missing:
            raise RuntimeError(f"{len(missing)} rows have no ranking after evaluation (e.g. row {missing[0]})")
        ordered = [records[r] for r in rows]
        max_k = c.num_beams if c.method == "beam" else None
        metrics = {
            "item": compute_metrics([rec["item_rank"] for rec in ordered], c.ks, max_k=max_k),
            "title": compute_metrics([rec["title_rank"] for rec in ordered], c.ks, max_k=max_k),
        }
        if c.method == "popularity":
            name = "popularity"
        elif c.method == "seqrec":
            name = f"{Path(c.checkpoint).name} ({self.seqrec_info['model']})"
        else:
            name = (f"{Path(c.checkpoint).name} ({c.model_name_or_path})" if c.checkpoint
                    else f"zero-shot {c.model_name_or_path}")
        if c.guided:
            name += f" + D3 guidance ({self.guidance_info['model']}, w={c.guidance_weight:g})"
        results = {
            "name": name, "fingerprint": fp, "protocol": protocol, "catalog_sha256": catalog_digest,
            "metrics": metrics, "primary_matching": "item", "num_processes": self.state.num_processes,
            "eval_seconds_this_run": round(elapsed, 2), "versions": package_versions(),
        }
        atomic_write_text(self.out / "rankings.jsonl", "".join(dumps_line(rec) for rec in ordered))
        atomic_write_text(self.out / "results.md", self._markdown(results))
        atomic_write_json(results_path, results)
        return results

    def _markdown(self, results: dict) -> str:
        """``results.md``: the metrics table at the cut-offs the run reports (a beam search's up to num_beams)."""
        c = self.config
        max_k = c.num_beams if c.method == "beam" else None
        return markdown_table([results], [k for k in c.ks if max_k is None or k <= max_k])

    def _append(self, records: list[dict]) -> None:
        path = self.out / "rankings" / f"part-{self.state.process_index}.jsonl"
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(dumps_line(r) for r in records))
            f.flush()

    def _record(self, data, split, row: int, titles: list[str], items: list[int], scores: list[float]) -> dict:
        ex = split[row]
        target = ex["target_item_id"]
        return {
            "row": row, "user_id": ex["user_id"], "target_item_id": target,
            "item_ranking": items, "title_ranking": titles, "scores": scores,
            "item_rank": rank_of(items, target), "title_rank": rank_of(titles, data.catalog.title(target)),
        }

    def _run_popularity(self, data, split, rows, done) -> list[dict]:
        k = max(self.config.ks)
        ranking = popularity_ranking(list(data.splits["train"]["target_item_id"]))
        items, titles = ranking[:k], distinct_titles(ranking, data.catalog.title, k)
        mine = [r for r in rows[self.state.process_index::self.state.num_processes] if r not in done]
        recs = [self._record(data, split, r, titles, items, []) for r in mine]
        if recs:
            self._append(recs)
        return recs

    def _run_seqrec(self, data, split, rows, done) -> list[dict]:
        """Full-catalogue ranking by the ID model; rows in batches of 256 (a forward is cheap)."""
        from tqdm.auto import tqdm

        from llmrec.decoding.guidance import eval_keys
        from llmrec.evaluation.metrics import ranks_from_scores
        from llmrec.seqrec.scoring import score_histories, top_k

        info, model = self.seqrec_info, self.seqrec_model
        k = max(self.config.ks)
        # Batches of the protocol's row list, dealt to the processes, as _run_beam does: a row is scored in the same
        # batch on any number of processes and after any resume (each process striding the rows and batching its own
        # put a row in batches of other sizes, whose float sums differ in the last bits: the stored scores differed)
        batches = [rows[i:i + 256] for i in range(0, len(rows), 256)]
        mine = [b for i, b in enumerate(batches) if i % self.state.num_processes == self.state.process_index]
        recs_all = []
        for batch in tqdm([b for b in mine if not all(r in done for r in b)],
                          desc=f"evaluate {self.config.split} ({info['model']})",
                          disable=not self.state.is_main_process, unit="batch"):
            histories = [list(split[r]["history_item_ids"]) for r in batch]
            scores = score_histories(model, histories, int(info["max_history"]), self.state.device,
                                     bool(info["mask_history"]), keys=eval_keys(batch, info))
            targets = torch.tensor([split[r]["target_item_id"] for r in batch], device=scores.device)
            full_ranks = ranks_from_scores(scores, targets - 1).tolist()
            values, order = top_k(scores, scores.shape[1])
            values = values[:, :k].tolist()
            recs = []
            for j, r in enumerate(batch):
                if r in done:  # ranked before a resume: scored again only to keep the batch as it was
                    continue
                items = [c + 1 for c in order[j, :k].tolist()]
                # Read further down the ranking in blocks only while shared titles leave fewer than k.
                ranked = (c + 1 for at in range(0, order.shape[1], 4 * k) for c in order[j, at:at + 4 * k].tolist())
                titles = distinct_titles(ranked, data.catalog.title, k)
                rec = self._record(data, split, r, titles, items, [round(v, 6) for v in values[j]])
                rec["item_rank"] = int(full_ranks[j])  # beyond the list too: the metrics need only K <= max(ks)
                recs.append(rec)
            self._append(recs)
            recs_all.extend(recs)
        return recs_all

    def _run_beam(self, data, split, rows, done) -> list[dict]:
        from tqdm.auto import tqdm

        from llmrec.decoding.beam_search import NonFiniteLogitsError
        from llmrec.decoding.search import build_catalog_trie, prompt_lengths, rank_batch
        from llmrec.models.checkpoint import load_for_inference
        from llmrec.prompts import PromptError, PromptTemplate

        c = self.config
        template = PromptTemplate.load(c.prompt)

        def my_unfinished_batches(order: list[int]) -> list[list[int]]:
            batches = [order[i:i + c.batch_size] for i in range(0, len(order), c.batch_size)]
            mine = [b for i, b in enumerate(batches) if i % self.state.num_processes == self.state.process_index]
            return [b for b in mine if not all(r in done for r in b)]

        # Batches by length need the tokenizer and the trie (a prompt's room for the answer) before they are known.
        todo = my_unfinished_batches(rows) if c.batch_order == "rows" else [r for r in rows if r not in done]
        if not todo:
            return []
        model, tokenizer = load_for_inference(c.model_name_or_path, c.checkpoint, c.dtype, self.state.device)
        trie = build_catalog_trie(data.catalog, tokenizer, template, c.use_chat_template, c.tokenization)
        if c.batch_order == "length":
            # Every process computes the same order, so the batches are split between them as in row order.
            try:  # one call: each call scans the catalogue's titles for the answer budget
                lengths = prompt_lengths(model, tokenizer, trie, template, [split[r] for r in rows], c)
            except PromptError:
                for r in rows:  # only on failure: find the row, named as rank_batch's are
                    try:
                        prompt_lengths(model, tokenizer, trie, template, [split[r]], c)
                    except PromptError as e:
                        raise PromptError(f"{Path(data.directory) / (c.split + '.jsonl')} row {r} (0-based): {e} "
                                          f"(max_prompt_length {c.max_prompt_length})") from None
                raise
            todo = my_unfinished_batches(rows_by_length(rows, lengths))
            if not todo:
                return []
        guide = self._guidance_source(trie) if c.guided else None
        recs_all = []
        # The main process's share times the processes estimates what is left (its batches may hold a row more
        # than others': never below 0, which showed as "-4/500")
        bar = tqdm(total=len(rows), initial=max(0, len(rows) - sum(len(b) for b in todo) * self.state.num_processes),
                   desc=f"evaluate {c.split}", disable=not self.state.is_main_process, unit="row")
        for batch in todo:
            examples = [split[r] for r in batch]
            try:
                ranked = rank_batch(model, tokenizer, trie, template, examples, c,
                                    guidance=guide(batch) if guide is not None else None)
            except PromptError as e:  # name where: the split's file and the batch's rows
                raise PromptError(f"{Path(data.directory) / (c.split + '.jsonl')} rows {batch[0]}..{batch[-1]} "
                                  f"(0-based): {e} (max_prompt_length {c.max_prompt_length})") from None
            except NonFiniteLogitsError as e:  # the split's rows, not the batch's
                raise NonFiniteLogitsError([batch[i] for i in e.rows], e.step,
                                           f"{Path(data.directory) / (c.split + '.jsonl')} row(s) (0-based)") from None
            recs = [self._record(data, split, r, t, i, s) for r, (t, i, s) in zip(batch, ranked)]
            self._append(recs)
            recs_all.extend(recs)
            bar.update(len(batch) * self.state.num_processes)
        bar.close()
        return recs_all

    def _guidance_source(self, trie):
        """A function ``rows -> TitleGuidance`` scoring the rows' histories with the ID model."""
        from llmrec.decoding.guidance import (
            ItemMassIndex,
            TitleGuidance,
            eval_keys,
            item_log_probs_from_scores,
        )
        from llmrec.seqrec.scoring import score_histories

        c = self.config
        length = int(self.guidance_info["max_history"])
        # The prompt's rows were cut to history_length; the ID model reads up to its own max_history.
        hist_data = load_prepared(c.dataset, splits=[c.split], max_history=length, with_titles=False)
        histories = list(hist_data.splits[c.split]["history_item_ids"])
        index = ItemMassIndex(trie)
        device = self.state.device

        def guide(rows: list[int]) -> TitleGuidance:
            scores = score_histories(self.guidance_model, [list(histories[r]) for r in rows], length, device,
                                     keys=eval_keys(rows, self.guidance_info))
            return TitleGuidance.from_item_log_probs(index, item_log_probs_from_scores(scores), c.guidance_weight)

        return guide


def evaluate(config: EvalConfig) -> dict | None:
    """Run an evaluation; the results dict on the main process (None on the others)."""
    torch.manual_seed(config.seed)
    return Evaluator(config).run()


def asdict_config(config: EvalConfig) -> dict:
    return asdict(config)
