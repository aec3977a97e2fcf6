"""``llmrec bench pipeline``: every method of the package on one protocol, one table, one plot.

One fixed protocol: a prepared split (the Games time split by default), a train subset drawn with each
seed for the LLMs (the ID models train on the whole train split: they are cheap), and ONE test subset
(``--test-rows`` rows drawn with ``--row-seed``) shared by every method and every seed, so all
differences are paired. Methods:

=========================  ====================================================================
popularity                 most frequent training targets
zero-shot                  the base LM, constrained beam search over the catalogue's titles
bigrec-sft                 BIGRec-style SFT (LoRA, the title only), recipes/games/sft_bigrec.yaml
bigrec-sft+d3              the same checkpoint, D3 decoding (length_penalty 0 + SASRec guidance)
latent-sft                 latent-reasoning SFT, recipes/games/sft_latent.yaml
latent-sft+grpo            latent GRPO from it, recipes/games/grpo_latent.yaml
latent-sft+grpo+d3         the GRPO checkpoint with D3 decoding
sasrec, rearec-erl,        ID models (recipes/seqrec/<model>_games.yaml), evaluated by full
rearec-prl, lares          ranking over all items (``llmrec evaluate --method seqrec``)
=========================  ====================================================================

Every stage writes its own directory and is skipped when its output exists (training resumes from
its last checkpoint, evaluation from its finished rows), so a long report can be completed over
several runs; ``--report-only`` builds the report from whatever has finished. A finished training stage is reused
only if it was made with what the pipeline would ask for now (otherwise an error names the field): the SFT and
ID-model runs field by field against the config built now, an edited recipe included (an SFT run older than its
``training_args.json`` only on model, data, rows, seed and dtype); the GRPO runs field by field as well (seeds > 0
train with seed 0's settings), except seed 0's run in a ``--grpo-stage`` of its own, which may come from a sweep and
is checked on the ``--grpo`` keys, its prompts and dtype; an ID model's run is not compared on the fields it does
not read (``--id`` applies to every ID model). ``--sft``, ``--grpo`` and ``--id`` refuse the keys the pipeline sets
itself (seed, dataset, rows, dtype, output directory, ...). Stages and evaluations
are locked (``<output-dir>/.locks/``): several processes on one output directory, each with its own
``--methods``, can run side by side (one per core on a CPU) and share the stages they have in common;
run them with ``--no-report`` and write the report of all of them with a final ``--report-only``.
Each training run and evaluation runs in a fresh process of its own (:mod:`llmrec.isolation`; ``--in-process``
turns this off), so memory does not pile up across stages.

The small files a report needs -- each test evaluation's ``results.json`` and its rankings (item ids and
ranks; titles and beam scores left out), the D3 selections, the training summaries -- are also copied to
``<results-dir>/<name>_runs/`` (same layout as ``--output-dir``), which is meant to be committed: a
checkout without the run directory (another machine, a later session) still reports every finished
method, and ``run`` skips a method whose test evaluation is there, so the report grows across machines
without retraining what it already holds. Such an archived method is checked first, as a finished stage in the run
directory is (its archived training summaries; its recorded evaluation protocol against the evaluation asked for
now, but for the checkpoints' digests), and refused on a mismatch. The report labels every evaluation with this
invocation's settings, so it checks each one it holds the same way, the run directory's too (``--report-only``
passes none of them through the evaluator). The checks read the prepared dataset (``--dataset``). Weights are never
copied. A D3 weight selection records the protocol of its validation evaluations (the checkpoints' digests
included) and is reused only with the same weights and decoding settings (the stages' weights in a run, the test
evaluation's in the report), else refused, naming the file to remove; one written before it recorded them is
checked against its per-weight evaluations, or without them selected again by a run and reported as it is. Seed
0's stages sit at the top of ``--output-dir`` (the layout of ``scripts/games_sft_comparison.sh``, whose finished
runs are thus reused), seed ``s > 0``'s under ``seed<s>/``. The seed-independent evaluations (popularity,
zero-shot) are shared by all seeds.

The report (``<results-dir>/<name>.md``, ``.json`` and ``.png``): per method HR@K / NDCG@K (K = 1, 5,
10; 20 where the ranked list is long enough) as mean +- std over the finished seeds, title-level
NDCG@10, training and evaluation time (evaluations of one beam-search setting only: history length and length
penalty included, D3's length penalty of 0 apart), and the paired bootstrap 95% intervals of the differences the
LatentR3 claims are about (per-row metrics averaged over seeds first) and, with two seeds or more, the interval that
counts the spread between training runs too (:func:`llmrec.evaluation.metrics.seed_row_ci`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmrec.config import mismatches
from llmrec.training.neutral_fields import SFT_RESULT_NEUTRAL_FIELDS, SFT_RESUME_ONLY_FIELDS

if TYPE_CHECKING:
    from llmrec.evaluation.evaluator import EvalConfig
    from llmrec.training.grpo import LatentGRPOConfig
    from llmrec.training.sft import LatentSFTConfig

logger = logging.getLogger(__name__)

ID_MODELS = ("sasrec", "rearec-erl", "rearec-prl", "lares")
# The beam search never masks history items (nor the papers' ID models): one table, one notion of a hit.
MASKED_ID_MODELS = ("the table's rows rank history items like any other (the papers' protocol, and the beam search's); "
                    "an ID model ranking them last would count other hits on the same rows")
METHODS = ("popularity", "zero-shot", "bigrec-sft", "bigrec-sft+d3", "latent-sft", "latent-sft+grpo",
           "latent-sft+grpo+d3", *ID_MODELS)
LABELS = {
    "popularity": "Popularity", "zero-shot": "Zero-shot LM", "bigrec-sft": "BIGRec SFT",
    "bigrec-sft+d3": "BIGRec SFT + D3", "latent-sft": "Latent SFT", "latent-sft+grpo": "Latent SFT + GRPO",
    "latent-sft+grpo+d3": "Latent SFT + GRPO + D3", "sasrec": "SASRec", "rearec-erl": "ReaRec-ERL",
    "rearec-prl": "ReaRec-PRL", "lares": "LARES",
}
# (name, treatment, baseline): the differences the targets of the report name.
DIFFERENCES = (
    ("latent+GRPO vs BIGRec SFT", "latent-sft+grpo", "bigrec-sft"),
    ("latent+GRPO+D3 vs BIGRec SFT+D3", "latent-sft+grpo+d3", "bigrec-sft+d3"),
    ("latent+GRPO vs best ID model", "latent-sft+grpo", "best-id"),
    ("latent+GRPO vs latent SFT", "latent-sft+grpo", "latent-sft"),
    ("latent SFT vs BIGRec SFT", "latent-sft", "bigrec-sft"),
    ("BIGRec SFT+D3 vs BIGRec SFT", "bigrec-sft+d3", "bigrec-sft"),
)
REPORT_KS = (1, 5, 10, 20)
SEED_INDEPENDENT = ("popularity", "zero-shot")
# SFT_RESULT_NEUTRAL_FIELDS / SFT_RESUME_ONLY_FIELDS: settings that change nothing trained, so a finished stage is
# reused whatever they were (shared with the resume check of `llmrec sft` / `llmrec grpo`). The same for GRPO; ``max_train_rows`` is checked as the number of prompts the run drew (``prompts``).
GRPO_RESULT_NEUTRAL_FIELDS = SFT_RESULT_NEUTRAL_FIELDS | {"max_train_rows"}


def sft_run_differences(results: dict, args: dict, cfg: LatentSFTConfig, n_train: int | None,
                        data_dir: Path | None = None) -> dict[str, tuple[Any, Any]]:
    """``{setting: (found, asked)}`` where a finished SFT run differs from ``cfg``, the config a rerun would train.

    ``results`` and ``args``: the run's ``train_results.json`` and ``training_args.json`` (``{}`` for a run older
    than that file); ``n_train``: the rows of the train split (a subset asked larger than the split is the split),
    None if unknown. Model, data, rows, seed and the concrete dtype are read from the results; with ``args`` every
    other field too (an edited recipe included), except those that change nothing trained
    (:data:`SFT_RESULT_NEUTRAL_FIELDS`) and, for a run that never resumed, those that act only on resume.
    ``data_dir``: the prepared dataset now, compared by content with the digests the run recorded (None: not
    compared; runs before 2026-12-05 recorded none).
    """
    from llmrec.models.backbone import concrete_dtype_name

    rows = cfg.max_train_rows
    if n_train:
        rows = n_train if rows is None else min(rows, n_train)
    recorded = results.get("config", {})
    wanted = {"model": cfg.model_name_or_path, "dataset": os.path.normpath(cfg.dataset) if cfg.dataset else cfg.dataset,
              "train_rows": rows, "seed": cfg.seed, "model_dtype": concrete_dtype_name(cfg.model_dtype)}
    found = {"model": recorded.get("model_name_or_path"),
             "dataset": os.path.normpath(recorded["dataset"]) if recorded.get("dataset") else recorded.get("dataset"),
             # the rows drawn (runs before 2026-12-06 recorded only those kept after skipping rows too long)
             "train_rows": results.get("drawn_train_rows", results.get("num_train_rows")),
             "seed": args.get("seed", cfg.seed),
             "model_dtype": recorded.get("model_dtype")}
    if args:  # recorded by every SFT run: the full config, so recipe edits are caught too
        from llmrec.config import config_differences
        from llmrec.training.sft import LatentSFTConfig

        ignore = SFT_RESULT_NEUTRAL_FIELDS | (SFT_RESUME_ONLY_FIELDS if results.get("resumed_from") is None else set())
        # A field the run did not record takes its default as a built config holds it (after
        # TrainingArguments.__post_init__, which rewrites some, e.g. report_to "none" -> []).
        diff = config_differences(args, cfg.to_dict(), LatentSFTConfig().to_dict(), ignore=ignore, paths=("dataset",))
        found.update({k: f for k, (f, _) in diff.items()})
        wanted.update({k: w for k, (_, w) in diff.items()})
    if data_dir is not None and results.get("data_sha256") is not None:
        from llmrec.data.identity import data_difference

        data = data_difference(results, data_dir)
        if data:
            found["data"], wanted["data"] = data, f"the files in {data_dir}"
    return mismatches(found, wanted)


def grpo_config_differences(args: dict, cfg: LatentGRPOConfig, resumed_from: str | None) -> dict[str, tuple[Any, Any]]:
    """``{field: (found, asked)}`` where a finished GRPO run's recorded config (``training_args.json``) differs from
    ``cfg``, the config a rerun would train, leaving out what changes nothing trained
    (:data:`GRPO_RESULT_NEUTRAL_FIELDS`) and, for a run that never resumed, what acts only on resume."""
    from llmrec.config import config_differences
    from llmrec.training.grpo import LatentGRPOConfig, inert_fields

    wanted = cfg.to_dict()
    ignore = (GRPO_RESULT_NEUTRAL_FIELDS | (SFT_RESUME_ONLY_FIELDS if resumed_from is None else set())
              | inert_fields(args, wanted))
    return config_differences(args, wanted, LatentGRPOConfig().to_dict(), ignore=ignore,
                              paths=("dataset", "sft_checkpoint"))


def eval_protocol_differences(proto: dict, cfg: EvalConfig) -> dict[str, tuple[Any, Any]]:
    """``{setting: (found, asked)}`` where a finished evaluation's recorded protocol (its ``results.json``'s
    ``protocol``) differs from ``cfg``, the evaluation the pipeline would run now: the evaluator's fingerprint check,
    but for the checkpoints' paths and digests (an archive holds no weights, and a run directory may have moved)."""
    from llmrec.evaluation.evaluator import UNRECORDED_BEAM_DEFAULTS

    wanted: dict[str, Any] = {"dataset": os.path.normpath(cfg.dataset), "split": cfg.split,
                              "max_rows": cfg.max_rows, "row_seed": cfg.row_seed, "method": cfg.method,
                              "ks": list(cfg.ks)}
    if cfg.method != "seqrec":  # an ID model reads its own history length
        wanted["history_length"] = cfg.history_length
    if cfg.method == "beam":
        wanted.update({k: getattr(cfg, k) for k in (
            "dtype", "prompt", "noun", "use_chat_template", "tokenization", "num_beams", "length_penalty",
            "max_prompt_length", "batch_size", "prompt_fit", "early_stopping", "batch_order")}, model=cfg.model_name_or_path,
            guidance_weight=cfg.guidance_weight if cfg.guided else None)
    got = {k: proto.get(k) for k in wanted}
    got["dataset"] = os.path.normpath(proto["dataset"]) if proto.get("dataset") else proto.get("dataset")
    if cfg.method == "beam":  # recorded only when not the default / only when guided
        got.update({k: proto.get(k, default) for k, default in UNRECORDED_BEAM_DEFAULTS.items()})
        got["guidance_weight"] = (proto.get("guidance") or {}).get("weight")
    return mismatches(got, wanted)


def recorded_d3_digests(proto: dict) -> dict[str, str | None]:
    """The digests of the weights a D3 evaluation decoded, as its recorded ``protocol`` holds them: the LM
    checkpoint's and the guiding ID model's (None where not recorded)."""
    return {"checkpoint_sha256": proto.get("checkpoint_sha256"),
            "guidance_sha256": (proto.get("guidance") or {}).get("id_weights_sha256")}


def _evaluated_weights(proto: dict, cfg: EvalConfig) -> dict[str, tuple[str | None, str | None]]:
    """``{what: (digest the evaluation recorded, digest of the weights cfg points to now)}`` for the LM checkpoint,
    an ID model's weights and a D3 guide's (None where not recorded or not on disk)."""
    from llmrec.evaluation.evaluator import weights_sha256

    out: dict[str, tuple[str | None, str | None]] = {}
    if proto.get("checkpoint_sha256") is not None and cfg.checkpoint:
        out["checkpoint"] = (proto["checkpoint_sha256"], weights_sha256(cfg.checkpoint))
    if proto.get("id_weights_sha256") is not None and proto.get("id_weights") and cfg.checkpoint:
        now = Path(cfg.checkpoint) / proto["id_weights"]
        out["ID model"] = (proto["id_weights_sha256"], weights_sha256(now) if now.is_file() else None)
    guide = proto.get("guidance") or {}
    if guide.get("id_weights_sha256") is not None and guide.get("id_weights") and cfg.guidance_checkpoint:
        now = Path(cfg.guidance_checkpoint) / guide["id_weights"]
        out["D3 guide"] = (guide["id_weights_sha256"], weights_sha256(now) if now.is_file() else None)
    return out


def _unused_seqrec_fields(config: dict[str, Any]) -> set[str]:
    """The fields an ID-model run with ``config`` does not read (:meth:`SeqRecConfig.unused_fields`), or none if
    ``config`` is not a valid config (then nothing is left out of a comparison)."""
    from llmrec.seqrec.config import SeqRecConfig

    try:
        return set(SeqRecConfig(**config).unused_fields())
    except (TypeError, ValueError, ImportError):
        return set()


def _refuse_own_keys(overrides: dict[str, Any], flag: str, own: dict[str, str]) -> None:
    """Refuse an override of a setting the pipeline sets itself (``own``: key -> what sets it)."""
    for key in overrides:
        if key in own:
            raise ValueError(f"{flag} {key}: the pipeline sets it ({own[key]})")


@dataclass
class PipelineOptions:
    """What ``llmrec bench pipeline`` runs (the command-line flags, one to one)."""

    dataset: str = "data/games"
    model: str = "smollm2-135m"
    seeds: int = 1
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    output_dir: str = "runs/games-cmp"
    results_dir: str = "benchmarks/results"
    name: str = "pipeline_games_smollm2"
    train_rows: int = 1024
    test_rows: int = 500
    row_seed: int = 0
    grpo_rows: int = 64
    dtype: str = "bfloat16"
    grpo_stage: str = "grpo_latent"
    grpo_overrides: dict[str, Any] = field(default_factory=dict)
    sft_overrides: dict[str, Any] = field(default_factory=dict)
    d3_weights: list[float] = field(default_factory=lambda: [1.0])
    d3_valid_rows: int = 200
    id_overrides: dict[str, Any] = field(default_factory=dict)
    eval_overrides: dict[str, Any] = field(default_factory=dict)
    recipes: str | None = None
    report_only: bool = False
    no_report: bool = False
    in_process: bool = False

    def __post_init__(self) -> None:
        from llmrec.models.backbone import checked_dtype_name

        if self.report_only and self.no_report:
            raise ValueError("report_only and no_report exclude each other")
        # Canonical ("bf16" -> "bfloat16"), as every config records it: an alias no longer refuses finished stages.
        self.dtype = checked_dtype_name(self.dtype, "--dtype")
        if not self.methods:
            raise ValueError(f"methods is empty; choose from {', '.join(METHODS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.train_rows < 1 or self.grpo_rows < 1:
            raise ValueError("train_rows and grpo_rows must be >= 1")
        if self.test_rows < 2:  # the report's paired bootstrap intervals need two rows (it failed after all the work)
            raise ValueError(f"--test-rows must be >= 2 (the report's paired intervals resample rows), got "
                             f"{self.test_rows}")
        if not self.d3_weights or not all(w > 0 for w in self.d3_weights):
            raise ValueError(f"d3_weights must be > 0 (D3 without guidance is not D3), got {self.d3_weights}")
        # The selection keys its scores and evaluation directories by f"{w:g}": a weight given twice (or two that
        # print alike) would run the sweep, then fail to match the grid it recorded on every later run.
        keys = [f"{w:g}" for w in self.d3_weights]
        repeated = sorted({k for k in keys if keys.count(k) > 1}, key=float)
        if repeated:
            raise ValueError(f"--d3-weight: weight(s) {', '.join(repeated)} given more than once "
                             f"({','.join(keys)}); give each weight once")
        if self.d3_valid_rows < 1:
            raise ValueError(f"d3_valid_rows must be >= 1, got {self.d3_valid_rows}")


class Pipeline:
    """Runs the stages of :class:`PipelineOptions` (skipping finished ones) and writes the report."""

    def __init__(self, opts: PipelineOptions):
        from llmrec.config import coerce_fields
        from llmrec.resources import resource_dir

        # Typed and checked at once (YAML reads 1e-5 as a string; a wrong key should fail before hours of work),
        # so the finished-stage checks compare numbers with numbers.
        if opts.grpo_overrides:
            from llmrec.training.grpo import LatentGRPOConfig

            # Set by the pipeline for every seed and checked as such (the prompts against --grpo-rows, the dtype
            # against --dtype, ...): a --grpo value would win over them in training and then fail that check.
            _refuse_own_keys(opts.grpo_overrides, "--grpo", {
                "max_train_rows": "use --grpo-rows", "model_dtype": "use --dtype", "seed": "use --seeds",
                "output_dir": "use --output-dir and --grpo-stage", "dataset": "use --dataset",
                "sft_checkpoint": "the latent SFT stage of the same seed"})
            opts = replace(opts, grpo_overrides=coerce_fields([LatentGRPOConfig], opts.grpo_overrides, "--grpo"))
        if opts.sft_overrides:
            from llmrec.training.sft import LatentSFTConfig

            _refuse_own_keys(opts.sft_overrides, "--sft", {
                "dataset": "use --dataset", "model_name_or_path": "use --model", "model_dtype": "use --dtype",
                "max_train_rows": "use --train-rows", "seed": "use --seeds", "output_dir": "use --output-dir",
                "max_eval_rows": "the protocol's 200 validation rows"})
            opts = replace(opts, sft_overrides=coerce_fields([LatentSFTConfig], opts.sft_overrides, "--sft"))
        if opts.id_overrides:
            from llmrec.seqrec.config import SeqRecConfig

            # Set per stage after the overrides (_seqrec_fields): a --id value would be dropped without a word.
            _refuse_own_keys(opts.id_overrides, "--id", {
                "model": "use --methods", "seed": "use --seeds", "output_dir": "use --output-dir",
                "dataset_dir": "use --dataset", "mask_history": MASKED_ID_MODELS})
            opts = replace(opts, id_overrides=coerce_fields([SeqRecConfig], opts.id_overrides, "--id"))
        if opts.eval_overrides:
            from llmrec.evaluation.evaluator import EvalConfig

            _refuse_own_keys(opts.eval_overrides, "--eval", {
                "dataset": "use --dataset", "split": "the protocol's test split", "max_rows": "use --test-rows",
                "row_seed": "use --row-seed", "output_dir": "use --output-dir", "model_name_or_path": "use --model",
                "dtype": "use --dtype", "method": "use --methods", "checkpoint": "each method's trained stage",
                "guidance_checkpoint": "the SASRec stage of the same seed", "guidance_weight": "use --d3-weight"})
            opts = replace(opts, eval_overrides=coerce_fields([EvalConfig], opts.eval_overrides, "--eval"))
            # The differences and the D3 weight selection compare NDCG@10 and HR@10: refused now, not after training.
            ev = opts.eval_overrides
            if "ks" in ev and 10 not in ev["ks"]:
                raise ValueError(f"--eval ks={ev['ks']}: the report needs 10 among the cut-offs (its differences and "
                                 "the D3 weight selection compare NDCG@10)")
            if ev.get("num_beams", 10) < 10:
                raise ValueError(f"--eval num_beams={ev['num_beams']}: the report needs at least 10 beams (a beam "
                                 "search ranks num_beams titles; its differences compare NDCG@10)")
        self.opts = opts
        self.out = Path(opts.output_dir)
        self.recipes = Path(opts.recipes) if opts.recipes else resource_dir("recipes")
        self.data_dir = Path(opts.dataset)
        self._checked: set[tuple[str, int]] = set()  # (method, seed) of the archived evaluations checked
        self._train_targets: list[int] | None = None  # the train split's targets, read once (popularity's check)

    # ------------------------------------------------------------------ layout

    @property
    def archive_dir(self) -> Path:
        """The committed mirror of the report's small files (see the module docstring)."""
        return Path(self.opts.results_dir) / f"{self.opts.name}_runs"

    def _mirror(self, path: Path) -> Path:
        """The archived copy of ``path`` (a path under ``--output-dir``)."""
        return self.archive_dir / path.relative_to(self.out)

    def _find(self, path: Path) -> Path:
        """``path`` (under ``--output-dir``) if it exists, else its archived copy if that exists, else ``path``."""
        if path.exists():
            return path
        mirror = self._mirror(path)
        return mirror if mirror.exists() else path

    def _finished_eval_dir(self, d: Path) -> Path | None:
        """Where the finished evaluation ``d`` is (the run directory first, then the archive), or None."""
        for cand in (d, self._mirror(d)):
            if (cand / "results.json").exists() and (cand / "rankings.jsonl").exists():
                return cand
        return None

    def seed_dir(self, seed: int) -> Path:
        return self.out if seed == 0 else self.out / f"seed{seed}"

    def stage_dir(self, stage: str, seed: int) -> Path:
        # The GRPO run's directory is selectable, so a run chosen by a validation sweep can be reported.
        return self.seed_dir(seed) / (self.opts.grpo_stage if stage == "grpo_latent" else stage)

    def eval_dir(self, method: str, seed: int, d3_weight: float | None = None) -> Path:
        """Test evaluation directory; a D3 method's depends on its guidance weight (1.0: no suffix)."""
        if method in SEED_INDEPENDENT:
            return self.out / ("eval_popularity" if method == "popularity" else "eval_zero_shot")
        names = {"bigrec-sft": "eval_sft_bigrec", "bigrec-sft+d3": "eval_sft_bigrec_d3",
                 "latent-sft": "eval_sft_latent", "latent-sft+grpo": f"eval_{self.opts.grpo_stage}",
                 "latent-sft+grpo+d3": f"eval_{self.opts.grpo_stage}_d3"}
        name = names.get(method, f"eval_{method}")
        if method.endswith("+d3"):
            w = self.d3_weight(method, seed) if d3_weight is None else d3_weight
            name += "" if w == 1.0 else f"_w{w:g}"
        return self.stage_dir(name, seed)

    def d3_selection_file(self, method: str, seed: int) -> Path:
        return self.seed_dir(seed) / "d3_selection" / f"{self._d3_name(method, seed)}.json"

    def _d3_name(self, method: str, seed: int) -> str:
        """The stem of a D3 method's weight selection and of its per-weight validation evaluations. The GRPO
        method's depends on ``--grpo-stage`` (the default keeps the plain name): a selection decodes that stage's
        weights, and one shared by every stage made reporting a second stage refuse the first one's (review). A
        selection made before (plain name, in the run directory or the archive; the committed reports') is still
        read where the stage has none of its own and it does not name the stage it was made for (those made since
        do): it is checked against the stage's weights as before."""
        if method != "latent-sft+grpo+d3" or self.opts.grpo_stage == "grpo_latent":
            return method
        own = f"{method}.{self.opts.grpo_stage}"
        folder = self.seed_dir(seed) / "d3_selection"
        plain = self._find(folder / f"{method}.json")
        if (not self._find(folder / f"{own}.json").exists() and plain.exists()
                and "grpo_stage" not in json.loads(plain.read_text())):
            return method
        return own

    def d3_weight(self, method: str, seed: int) -> float:
        """The guidance weight of a D3 method: the only one given, or the one selected on validation rows."""
        if len(self.opts.d3_weights) == 1:
            return self.opts.d3_weights[0]
        f = self._find(self.d3_selection_file(method, seed))
        if not f.exists():
            raise FileNotFoundError(f"{f}: the D3 weight of {method} (seed {seed}) has not been selected yet")
        sel = json.loads(f.read_text())
        grid, asked = sorted(float(w) for w in sel["valid_ndcg@10"]), sorted(self.opts.d3_weights)
        # The grid's keys are written with :g (6 significant digits): compare at that precision.
        same_grid = len(grid) == len(asked) and all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(grid, asked))
        same_rows = (sel.get("rows"), sel.get("row_seed")) == (self.opts.d3_valid_rows, self.opts.row_seed)
        if not (same_grid and same_rows):
            raise ValueError(f"{f} selected among weights {grid} on {sel.get('rows')} validation rows (row seed "
                             f"{sel.get('row_seed')}), asked: {asked} on {self.opts.d3_valid_rows} rows (row seed "
                             f"{self.opts.row_seed}); remove it to select again")
        return float(sel["chosen"])

    def needs(self, method: str) -> list[str]:
        """Training stages a method's evaluation needs, in order."""
        return {
            "bigrec-sft": ["sft_bigrec"], "bigrec-sft+d3": ["sft_bigrec", "seqrec_sasrec"],
            "latent-sft": ["sft_latent"], "latent-sft+grpo": ["sft_latent", "grpo_latent"],
            "latent-sft+grpo+d3": ["sft_latent", "grpo_latent", "seqrec_sasrec"],
        }.get(method, [f"seqrec_{method}"] if method in ID_MODELS else [])

    # ------------------------------------------------------------------ stages

    def _call(self, fn: Callable[..., Any], cfg: Any) -> Any:
        """``fn(cfg)``: in a fresh process per stage (see :mod:`llmrec.isolation`), unless ``in_process`` or
        under a multi-process launch (whose process group a child cannot join)."""
        from llmrec.isolation import in_distributed_launch, run_isolated

        if self.opts.in_process or in_distributed_launch():
            return fn(cfg)
        return run_isolated(fn, cfg)

    def _sft_config(self, kind: str, seed: int) -> LatentSFTConfig:
        """The :class:`~llmrec.training.sft.LatentSFTConfig` of one SFT stage: the Games recipe, then the settings of
        scripts/games_sft_comparison.sh (model selection on 200 validation rows), then ``--sft``."""
        from llmrec.config import parse_config
        from llmrec.training.sft import LatentSFTConfig

        o = self.opts
        (cfg,) = parse_config([LatentSFTConfig], self.recipes / "games" / f"sft_{kind}.yaml", extra=dict(
            dataset=str(self.data_dir), model_name_or_path=o.model, model_dtype=o.dtype,
            max_train_rows=o.train_rows, max_eval_rows=200, per_device_train_batch_size=8,
            gradient_accumulation_steps=2, eval_steps=16, save_steps=16, logging_steps=4, num_train_epochs=1,
            seed=seed, output_dir=str(self.stage_dir(f"sft_{kind}", seed))) | o.sft_overrides)
        return cfg

    def _sft(self, kind: str, seed: int) -> Path:
        from llmrec.training.sft import run_sft

        cfg = self._sft_config(kind, seed)
        self._call(run_sft, cfg)
        return Path(cfg.output_dir)

    def _grpo_config(self, seed: int, follow_seed0: bool = True) -> LatentGRPOConfig:
        """The :class:`~llmrec.training.grpo.LatentGRPOConfig` of one GRPO stage: the Games recipe, the pipeline's
        batch layout, for seeds > 0 the settings of seed 0's run (which a sweep may have chosen; not with
        ``follow_seed0=False``), then ``--grpo``."""
        from llmrec.config import parse_config
        from llmrec.training.grpo import LatentGRPOConfig

        o = self.opts
        extra = dict(sft_checkpoint=str(self.stage_dir("sft_latent", seed)), dataset=str(self.data_dir),
                     model_dtype=o.dtype, max_train_rows=o.grpo_rows, per_device_train_batch_size=8,
                     gradient_accumulation_steps=4, save_steps=4, seed=seed,
                     output_dir=str(self.stage_dir("grpo_latent", seed)))
        if seed > 0 and follow_seed0:
            extra.update(self._grpo_settings(0, for_training=True))
        extra.update(o.grpo_overrides)
        (cfg,) = parse_config([LatentGRPOConfig], self.recipes / "games" / "grpo_latent.yaml", extra=extra)
        return cfg

    def _grpo(self, seed: int) -> Path:
        from llmrec.training.grpo import run_grpo

        cfg = self._grpo_config(seed)
        self._call(run_grpo, cfg)
        return Path(cfg.output_dir)

    def _seqrec_fields(self, model: str, seed: int) -> dict[str, Any]:
        from llmrec.config import coerce_fields, read_recipe
        from llmrec.seqrec.config import SeqRecConfig

        recipe = self.recipes / "seqrec" / f"{model}_games.yaml"
        fields = coerce_fields([SeqRecConfig], {**read_recipe(recipe, keep_number_text=True), **self.opts.id_overrides},
                               f"{recipe} + --id")
        fields.update(model=model, dataset_dir=str(self.data_dir), output_dir=str(self.stage_dir(f"seqrec_{model}", seed)),
                      seed=42 + seed)
        if fields.get("mask_history"):
            raise ValueError(f"{recipe}: mask_history true: {MASKED_ID_MODELS}")
        return fields

    def _seqrec(self, model: str, seed: int) -> Path:
        from llmrec.seqrec.config import SeqRecConfig
        from llmrec.seqrec.run import run_seqrec

        fields = self._seqrec_fields(model, seed)
        self._call(run_seqrec, SeqRecConfig(**fields))  # resumes a cut run
        return Path(fields["output_dir"])

    def _grpo_settings(self, seed: int, for_training: bool = False) -> dict[str, Any]:
        """The settings a finished GRPO run recorded (``llmrec_config.json``), or {} if it has not finished."""
        d = self.stage_dir("grpo_latent", seed)
        results_file, config_file = self._find(d / "grpo_results.json"), self._find(d / "llmrec_config.json")
        if not (results_file.exists() and config_file.exists()):
            return {}
        g = dict(json.loads(config_file.read_text()).get("grpo", {}))
        args_file = self._find(d / "training_args.json")
        args = json.loads(args_file.read_text()) if args_file.exists() else {}
        if "advantage_mode" in args:
            # The run's full LatentGRPOConfig, so any --grpo key can be checked (runs before this file was written
            # by GRPO hold a copy of the SFT's training args instead: those lack the GRPO fields and are ignored).
            g = {**args, **g}
        if for_training and "advantage_mode" in args:
            # Every trained field in which seed 0's run differs from what the recipe and the pipeline give (a sweep
            # may have changed any: batch layout, schedule, loss type...). Not the per-seed fields, nor
            # max_train_rows: every seed draws --grpo-rows prompts (the protocol), whatever seed 0's sweep used.
            from llmrec.config import config_differences, field_defaults
            from llmrec.training.grpo import (
                IGNORED_TRL_FIELDS,
                NO_EFFECT_FIELDS,
                NON_DEFAULT_REFUSED_FIELDS,
                LatentGRPOConfig,
                inert_fields,
            )

            base = self._grpo_config(0, follow_seed0=False).to_dict()
            per_seed = {"seed", "sft_checkpoint", "dataset", "max_train_rows", "model_dtype"}
            # Nor what latent GRPO never reads (recorded as TrainingArguments left them; refused if set).
            unread = set(NO_EFFECT_FIELDS) | set(IGNORED_TRL_FIELDS) | set(NON_DEFAULT_REFUSED_FIELDS) \
                | inert_fields(args, base)
            diff = config_differences(args, base, field_defaults(LatentGRPOConfig),
                                      ignore=GRPO_RESULT_NEUTRAL_FIELDS | SFT_RESUME_ONLY_FIELDS | per_seed | unread)
            return {k: found for k, (found, _) in diff.items()}
        if for_training:  # a run before GRPO recorded its full config: the settings its llmrec_config.json holds
            keys = ("advantage_mode", "reward_funcs", "reward_weights", "noise_scale", "noise_mode", "learning_rate",
                    "train_lora", "num_generations", "policy_logprob", "antithetic_noise", "num_iterations", "beta",
                    "rank_candidates", "rank_negatives")
            return {k: g[k] for k in keys if g.get(k) is not None}
        res = json.loads(results_file.read_text())
        g["prompts"] = res.get("drawn_prompts", res.get("prompts"))  # drawn, before skipping those too long
        return g

    def _stage_summary(self, stage: str, seed: int) -> Path:
        """The file that marks a training stage finished (in the run directory, else its archived copy)."""
        name = {"grpo_latent": "grpo_results.json"}.get(stage, "train_results.json" if stage.startswith("sft_")
                                                       else "results.json")
        return self._find(self.stage_dir(stage, seed) / name)

    def _train_rows(self, split: str = "train") -> int | None:
        """The rows of a split of the dataset (its ``stats.json``), or None if it does not say."""
        from llmrec.data.canonical import read_stats

        return read_stats(self.data_dir / "stats.json").get("rows", {}).get(split)

    def _grpo_prompts(self, seed: int) -> int:
        """The prompts a GRPO stage draws: ``--grpo-rows``, or every row it may draw from if there are fewer (its
        train split, less the SFT's own rows with ``exclude_sft_rows``), as the SFT check caps ``--train-rows``."""
        cfg = self._grpo_config(seed)
        asked = cfg.max_train_rows if cfg.max_train_rows is not None else self.opts.grpo_rows
        n = self._train_rows(cfg.train_split)
        if n is None:
            return asked
        if cfg.exclude_sft_rows:
            sft = self._sft_config("latent", seed)
            if sft.train_split == cfg.train_split:
                n -= n if sft.max_train_rows is None else min(sft.max_train_rows, n)
        return min(asked, n)

    def _moved(self, path: str, recorded_dir: str, stage: str, seed: int) -> str:
        """``path``, recorded by a run made in ``recorded_dir`` (that run's directory for ``stage`` and ``seed``,
        under the output directory it was made in), as the same path under this ``--output-dir``; unchanged if it
        is not under that output directory."""
        rel_stage = self.stage_dir(stage, seed).relative_to(self.out).parts
        rec = Path(os.path.normpath(recorded_dir)).parts
        if len(rec) < len(rel_stage) or rec[len(rec) - len(rel_stage):] != rel_stage:
            return path
        try:
            rel = Path(os.path.normpath(path)).relative_to(Path(*rec[:len(rec) - len(rel_stage)]))
        except ValueError:
            return path
        return os.path.normpath(self.out / rel)

    def _check_finished(self, stage: str, seed: int) -> None:
        """A finished training stage is reused only if it was made with what this pipeline asks for (read from the
        run directory, else from the archive: a method found only there is checked the same way)."""
        d = self.stage_dir(stage, seed)
        where = self._stage_summary(stage, seed).parent
        o = self.opts
        wanted: dict[str, Any] = {}
        found: dict[str, Any] = {}
        if stage.startswith("sft_"):
            res = json.loads(self._find(d / "train_results.json").read_text())
            args_file = self._find(d / "training_args.json")
            args = json.loads(args_file.read_text()) if args_file.exists() else {}
            sft_cfg = self._sft_config(stage[4:], seed)  # its own train split (--sft train_split=...), capped there
            diff = sft_run_differences(res, args, sft_cfg, self._train_rows(sft_cfg.train_split), self.data_dir)
            found, wanted = {k: f for k, (f, _) in diff.items()}, {k: w for k, (_, w) in diff.items()}
        elif stage == "grpo_latent":
            from llmrec.training.finished_runs import grpo_start_differences

            g = self._grpo_settings(seed)
            args_file = self._find(d / "training_args.json")
            args = json.loads(args_file.read_text()) if args_file.exists() else {}
            if where != d and args.get("output_dir"):
                # An archived run records the paths of the machine and output directory it was made in: its SFT
                # checkpoint is compared as a path in this output directory (the same seed's sft_latent).
                for rec in (g, args):
                    if rec.get("sft_checkpoint"):
                        rec["sft_checkpoint"] = self._moved(rec["sft_checkpoint"], args["output_dir"], stage, seed)
            wanted = {"sft_checkpoint": os.path.normpath(self.stage_dir("sft_latent", seed)), **o.grpo_overrides}
            # every seed's run, seed 0's in a --grpo-stage of its own (a sweep's) too: the seeds' mean is over runs
            # that drew the same number of prompts (a sweep's run of 8 was averaged with seeds of --grpo-rows 4)
            wanted["prompts"] = self._grpo_prompts(seed)
            if g.get("model_dtype") is not None:  # recorded by every run since GRPO wrote its own training args
                wanted["model_dtype"] = o.dtype
            found = {"prompts": g.get("prompts"), **{k: g.get(k) for k in wanted if k != "prompts"}}
            if found["sft_checkpoint"]:  # "runs/x/" and "runs/x" are one directory
                found["sft_checkpoint"] = os.path.normpath(found["sft_checkpoint"])
            # By content too: the same seed's sft_latent retrained after this run trained on it. Not for an archived
            # run (its SFT's weights are not in the archive, and the archived latent-sft evaluation is reported as it
            # is): only its data is compared.
            results = json.loads(self._find(d / "grpo_results.json").read_text())
            sft_dir = self.stage_dir("sft_latent", seed)
            start = grpo_start_differences(results, str(sft_dir) if where == d and sft_dir.is_dir() else None,
                                           self.data_dir)
            found.update(start)
            wanted.update({k: "what it holds now" for k in start})
            if seed > 0 and self._find(self.stage_dir("grpo_latent", 0) / "grpo_results.json").exists():
                ref = self._grpo_settings(0, for_training=True)
                wanted.update({k: v for k, v in ref.items() if k not in o.grpo_overrides})
                found.update({k: g.get(k) for k in ref if k not in found})
            if "advantage_mode" in args and (o.grpo_stage == "grpo_latent" or seed > 0):
                # The run's full config against the one built now, so recipe edits are caught too. Not for seed 0
                # in a --grpo-stage of its own: that run may come from a sweep with settings of its own.
                resumed = json.loads(self._find(d / "grpo_results.json").read_text()).get("resumed_from")
                diff = grpo_config_differences(args, self._grpo_config(seed), resumed)
                found.update({k: f for k, (f, _) in diff.items()})
                wanted.update({k: w for k, (_, w) in diff.items()})
        elif stage.startswith("seqrec_"):
            from llmrec.config import to_dict
            from llmrec.data.identity import data_difference
            from llmrec.seqrec.config import SeqRecConfig, training_field_differences

            # Every field that decides what was trained (recipe edits included), not only the --id keys; but not
            # the fields this model does not read (another model's, or one another setting turns off: --id applies
            # to every ID model), which change nothing trained.
            res = json.loads(self._find(d / "results.json").read_text())
            cfg = SeqRecConfig(**self._seqrec_fields(stage[len("seqrec_"):], seed))
            diff = training_field_differences(res.get("config", {}), to_dict(cfg))
            unused = set(cfg.unused_fields()) | _unused_seqrec_fields(
                {**to_dict(cfg), **{k: f for k, (f, _) in diff.items()}})
            diff = {k: v for k, v in diff.items() if k not in unused}
            found, wanted = {k: f for k, (f, _) in diff.items()}, {k: w for k, (_, w) in diff.items()}
            # The same dataset path may hold other files now (re-prepared or edited): the run records their digests.
            data = data_difference(res, self.data_dir)
            if data:
                found["data"], wanted["data"] = data, "the files in " + str(self.data_dir)
        bad = mismatches(found, wanted)
        if bad:
            details = ", ".join(f"{k}={f!r} (asked: {w!r})" for k, (f, w) in bad.items())
            remedy = (f"rerun with the settings it was made with, use another --name, or remove it from "
                      f"{self.archive_dir}" if where != d else
                      f"use another --output-dir{' or --grpo-stage' if stage == 'grpo_latent' else ''}, or remove "
                      "the run")
            raise ValueError(f"{where}{' (archived)' if where != d else ''} holds a finished run made with {details}; "
                             f"{remedy}")

    def _lock(self, name: str, seed: int):
        """An exclusive file lock on one stage or evaluation of one seed.

        Two pipeline processes on the same ``--output-dir`` (e.g. two lanes with disjoint ``--methods`` whose D3
        methods both need SASRec) thus never train or evaluate the same thing at once: the second waits, then
        finds the work finished and reuses it.
        """
        from filelock import FileLock

        d = self.seed_dir(seed) / ".locks"
        d.mkdir(parents=True, exist_ok=True)
        return FileLock(str(d / f"{name}.lock"))

    def _train(self, stage: str, seed: int) -> None:
        done = {"sft_bigrec": "train_results.json", "sft_latent": "train_results.json",
                "grpo_latent": "grpo_results.json"}.get(stage, "results.json")
        with self._lock(stage, seed):
            if (self.stage_dir(stage, seed) / done).exists():
                self._check_finished(stage, seed)
                return
            print(f"== seed {seed}: train {stage}", flush=True)
            if stage.startswith("sft_"):
                self._sft(stage[4:], seed)
            elif stage == "grpo_latent":
                self._grpo(seed)
            else:
                self._seqrec(stage[len("seqrec_"):], seed)

    def _select_d3_weight(self, method: str, seed: int) -> None:
        """Evaluate a D3 method with every weight of the grid on ``d3_valid_rows`` validation rows; keep the best.

        Selection by NDCG@10 (ties: the smaller weight), written to ``d3_selection/<method>.json`` of the seed;
        the test rows are never looked at.
        """
        from llmrec.data.canonical import atomic_write_json

        o = self.opts
        f = self.d3_selection_file(method, seed)
        if len(o.d3_weights) == 1:
            return
        if self._find(f).exists():
            # Reused only if chosen on the weights this seed's stages hold now (retrained: refused, as a stale
            # finished stage is) and with the decoding settings asked for now; one that cannot be checked (written
            # before selections recorded that, its per-weight evaluations gone) is stale: selected again.
            if self._check_d3_selection(method, seed, self._current_d3_digests(method, seed)):
                return
            print(f"== seed {seed}: {self._find(f)} does not say which checkpoints it was selected on: selecting "
                  "again", flush=True)
        scores: dict[str, float] = {}
        protocol: dict[str, Any] = {}
        for w in o.d3_weights:
            out = f.parent / f"{self._d3_name(method, seed)}_w{w:g}"
            self._evaluate(method, seed, split="valid", max_rows=o.d3_valid_rows, d3_weight=w, out=out)
            res = json.loads((out / "results.json").read_text())
            scores[f"{w:g}"] = float(res["metrics"]["item"]["ndcg@10"])
            # What the choice depends on: every weight's evaluation passed the evaluator's fingerprint check with
            # this seed's weights and settings, so their protocols differ in the guidance weight only.
            protocol = {**res["protocol"], "guidance": {k: v for k, v in res["protocol"]["guidance"].items()
                                                        if k != "weight"}}
        chosen = max(o.d3_weights, key=lambda w: (scores[f"{w:g}"], -w))
        print(f"== seed {seed}: {method} D3 weight {chosen:g} (validation NDCG@10 "
              + ", ".join(f"{k}: {v:.4f}" for k, v in scores.items()) + ")", flush=True)
        edge = grid_edge(chosen, o.d3_weights)
        if edge:
            # A best weight on the grid's edge says the optimum may lie beyond it: the per-weight evaluations are
            # kept, so a wider grid (after removing the selection file) only evaluates the new weights.
            print(f"WARNING: the D3 weight chosen for {method} (seed {seed}) is the grid's {edge}; consider a wider "
                  "--d3-weight grid", file=sys.stderr, flush=True)
        stage = {"grpo_stage": o.grpo_stage} if method == "latent-sft+grpo+d3" else {}  # whose weights it decoded
        atomic_write_json(f, {"method": method, "seed": seed, "split": "valid", "rows": o.d3_valid_rows,
                              "row_seed": o.row_seed, "valid_ndcg@10": scores, "chosen": chosen,
                              "protocol": protocol, **stage})

    def _current_d3_digests(self, method: str, seed: int) -> dict[str, str | None]:
        """The digests of the weights a D3 evaluation of ``method`` would decode now, as the evaluator records them
        (:func:`recorded_d3_digests`); None where the run directory holds no such weights."""
        from llmrec.decoding.guidance import guidance_weights_path
        from llmrec.evaluation.evaluator import weights_sha256

        cfg = self._eval_config(method, seed, "valid", self.opts.d3_valid_rows, self.opts.d3_weights[0],
                                self.d3_selection_file(method, seed).parent)
        guide, guide_results = Path(cfg.guidance_checkpoint), Path(cfg.guidance_checkpoint) / "results.json"
        return {"checkpoint_sha256": weights_sha256(cfg.checkpoint),
                "guidance_sha256": weights_sha256(guidance_weights_path(guide, json.loads(guide_results.read_text())))
                if guide_results.exists() else None}

    def _check_d3_selection(self, method: str, seed: int, digests: dict[str, str | None]) -> bool:
        """Refuse a D3 weight selection unless its validation evaluations decoded the weights whose ``digests`` are
        given (those the stages hold now, or those the test evaluation recorded; None: unknown, not compared) with
        the settings asked for now (:func:`eval_protocol_differences`, the guidance weight aside). False if it
        cannot be checked.

        The selection records the evaluations' protocol. One written before it did is checked against the
        per-weight evaluations' ``results.json`` still in the run directory; with none of them (e.g. a committed
        archive holds only the selection file) it cannot be checked.
        """
        f = self.d3_selection_file(method, seed)
        where = self._find(f)
        if len(self.opts.d3_weights) == 1 or not where.exists():  # one weight: used as it is, nothing selected
            return True
        sel = json.loads(where.read_text())
        if "protocol" in sel:
            records = {where: sel["protocol"]}
        else:
            stem = self._d3_name(method, seed)
            results = [f.parent / f"{stem}_w{w}" / "results.json" for w in sel.get("valid_ndcg@10", {})]
            records = {r.parent: json.loads(r.read_text())["protocol"] for r in results if r.exists()}
            if not records:
                return False
        cfg = self._eval_config(method, seed, "valid", self.opts.d3_valid_rows, self.opts.d3_weights[0], f.parent)
        for source, proto in records.items():
            bad = {k: v for k, v in eval_protocol_differences(proto, cfg).items() if k != "guidance_weight"}
            recorded = recorded_d3_digests(proto)
            known = [k for k, v in recorded.items() if v is not None and digests.get(k) is not None]
            bad |= mismatches({k: recorded[k] for k in known}, {k: digests[k] for k in known})
            if bad:
                details = ", ".join(f"{k}={got!r} (asked: {want!r})" for k, (got, want) in bad.items())
                remedy = (f"remove it from {self.archive_dir}" if where != f else
                          f"remove it and the evaluations {f.parent / (self._d3_name(method, seed) + '_w*')} to select "
                          "again, or use another --output-dir")
                raise ValueError(f"{where}{' (archived)' if where != f else ''}: the D3 weight of {method} (seed "
                                 f"{seed}) was selected on validation evaluations"
                                 + (f" ({source})" if source != where else "") + f" made with {details}; {remedy}")
        return True

    def _eval_config(self, method: str, seed: int, split: str, max_rows: int | None, d3_weight: float | None,
                     out: Path) -> EvalConfig:
        """The :class:`~llmrec.evaluation.evaluator.EvalConfig` of one evaluation: recipes/games/eval.yaml, then the
        protocol (dataset, rows, row seed, dtype), the method and its checkpoints."""
        from llmrec.config import parse_config
        from llmrec.evaluation.evaluator import EvalConfig

        extra: dict[str, Any] = dict(dataset=str(self.data_dir), split=split,
                                     max_rows=max_rows or self.opts.test_rows, row_seed=self.opts.row_seed,
                                     output_dir=str(out))
        extra["model_name_or_path"] = self.opts.model
        extra["dtype"] = self.opts.dtype
        if method not in ID_MODELS and method != "popularity":
            # Decoding settings of every LM evaluation (D3's length penalty 0 set below wins: D3 is defined by it).
            extra.update(self.opts.eval_overrides)
        if method == "popularity":
            extra["method"] = "popularity"
        elif method in ID_MODELS:
            extra.update(method="seqrec", checkpoint=str(self.stage_dir(f"seqrec_{method}", seed)))
        elif method != "zero-shot":
            ckpt = "sft_bigrec" if method.startswith("bigrec") else (
                "grpo_latent" if "grpo" in method else "sft_latent")
            extra["checkpoint"] = str(self.stage_dir(ckpt, seed))
            if method.endswith("+d3"):
                extra.update(length_penalty=0.0, guidance_checkpoint=str(self.stage_dir("seqrec_sasrec", seed)),
                             guidance_weight=d3_weight)
        (cfg,) = parse_config([EvalConfig], self.recipes / "games" / "eval.yaml", extra=extra)
        return cfg

    def _evaluate(self, method: str, seed: int, split: str = "test", max_rows: int | None = None,
                  d3_weight: float | None = None, out: Path | None = None) -> dict:
        from llmrec.evaluation.evaluator import evaluate

        if method.endswith("+d3") and d3_weight is None:
            self._select_d3_weight(method, seed)
            d3_weight = self.d3_weight(method, seed)
        out = out or self.eval_dir(method, seed, d3_weight)
        # A finished evaluation is still passed to the evaluator: it returns the stored results when their
        # protocol fingerprint (rows, checkpoint, decoding) is this one, and refuses a different protocol.
        if not (out / "results.json").exists():
            print(f"== seed {seed}: evaluate {method} ({split}) -> {out}", flush=True)
        cfg = self._eval_config(method, seed, split, max_rows, d3_weight, out)
        if (out / "results.json").exists():
            # Finished: the evaluator only checks the protocol fingerprint and returns the stored results (no LM
            # is loaded), so no fresh process is needed (a rerun of a long report spawned one per evaluation).
            return evaluate(cfg)
        return self._call(evaluate, cfg)

    def run(self) -> dict:
        """Run what is missing (unless ``report_only``), then write and return the report (unless ``no_report``:
        then ``{}``)."""
        o = self.opts
        if not o.report_only:
            self._ensure_data()
            self._check_stage_configs()
            for seed in range(o.seeds):
                for method in o.methods:
                    if seed > 0 and method in SEED_INDEPENDENT:
                        continue
                    if self._archived_only(method, seed):
                        self._check_evaluation(method, seed)
                        print(f"== seed {seed}: {method} finished in {self.archive_dir} (skipped)", flush=True)
                        continue
                    for stage in self.needs(method):
                        self._train(stage, seed)
                    with self._lock(f"eval_{method}", seed):
                        self._evaluate(method, seed)
                        self._archive(method, seed, self.eval_dir(method, seed))  # now, not at the end: runs get cut
        if o.no_report:
            return {}
        return self.report()

    def _check_stage_configs(self) -> None:
        """Build (and so check) the config of every training stage the methods need before the first one runs: a
        wrong --sft, --grpo or --id value (``n_heads`` not dividing ``hidden_size``, a negative learning rate) failed
        only when its stage started, after the stages before it had trained (review)."""
        from llmrec.seqrec.config import SeqRecConfig

        for stage in dict.fromkeys(s for m in self.opts.methods for s in self.needs(m)):
            if stage.startswith("sft_"):
                self._sft_config(stage.removeprefix("sft_"), 0)
            elif stage == "grpo_latent":
                self._grpo_config(0, follow_seed0=False)
            elif stage.startswith("seqrec_"):
                SeqRecConfig(**self._seqrec_fields(stage.removeprefix("seqrec_"), 0))

    def _ensure_data(self) -> None:
        if not (self.data_dir / "stats.json").exists():
            raise FileNotFoundError(
                f"{self.data_dir} is not a prepared dataset; prepare it first, e.g. `llmrec data prepare --format "
                f"seq-txt --input ../shared/data/amazon_games_dealrec --output {self.data_dir}`")

    # ------------------------------------------------------------------ report

    def _archived_only(self, method: str, seed: int) -> bool:
        """True if the method's test evaluation is in the archive but not in the run directory."""
        try:
            d = self.eval_dir(method, seed)
        except FileNotFoundError:
            return False
        found = self._finished_eval_dir(d)
        return found is not None and found != d

    def _check_evaluation(self, method: str, seed: int) -> None:
        """A finished test evaluation is skipped (found only in the archive) or reported under this invocation's
        flags only if it was made with what this invocation asks for, wherever it is (run directory or archive):
        each training stage it needs is checked as :meth:`_check_finished` checks a finished stage (in the run
        directory, else from its archived summary), its recorded protocol against the evaluation the pipeline would
        run now (:func:`eval_protocol_differences`), and a D3 method's weight selection against the weights the
        evaluation decoded (:meth:`_check_d3_selection`). One in the run directory that ``run`` evaluated in this
        invocation passed the evaluator's fingerprint check, so it passes these (which leave out the checkpoints'
        paths)."""
        if (method, seed) in self._checked:
            return
        d = self.eval_dir(method, seed)
        found = self._finished_eval_dir(d)
        if found is None:
            return
        what = f"{'an archived' if found != d else 'a finished'} evaluation of {method} (seed {seed})"
        if self.needs(method):
            self._ensure_data()  # the stage checks read the data's size and digests
        for stage in self.needs(method):
            if not self._stage_summary(stage, seed).exists():
                raise ValueError(
                    f"{found} holds {what} but neither {self.stage_dir(stage, seed)} nor "
                    f"{self._mirror(self.stage_dir(stage, seed))} holds the finished {stage} it needs: what it was "
                    f"trained with cannot be checked; " + ("copy that stage's summary into the archive, or remove "
                                                           "the evaluation from it" if found != d else
                                                           "restore that stage, or remove the evaluation"))
            self._check_finished(stage, seed)
        recorded = json.loads((found / "results.json").read_text())
        self._check_evaluated_data(method, found, recorded, what, archived=found != d)
        proto = recorded["protocol"]
        cfg = self._eval_config(method, seed, "test", None, self.d3_weight(method, seed) if method.endswith("+d3")
                                else None, d)
        bad = eval_protocol_differences(proto, cfg)
        # Where the stage's weights are on disk here: a stage retrained since the evaluation (same path, other
        # weights) makes it another model's result, which the evaluator would refuse too. An archived evaluation
        # as well: beside a retrained stage it was reported as that stage's result (review).
        bad |= {f"{name} weights": (recorded[:12], now[:12])
                for name, (recorded, now) in _evaluated_weights(proto, cfg).items()
                if recorded is not None and now is not None and recorded != now}
        if bad:
            details = ", ".join(f"{k}={f!r} (asked: {w!r})" for k, (f, w) in bad.items())
            remedy = (f"remove it from {self.archive_dir}" if found != d else "remove it")
            raise ValueError(f"{found} holds {what} made with {details}; rerun with the settings it was made with, "
                             f"use another --{'name' if found != d else 'output-dir'}, or {remedy}")
        # The weight it was tested with must have been selected on the weights it decoded. A selection that cannot
        # be checked (the committed archives' older ones) is reported as it is: nothing here could select again.
        if method.endswith("+d3") and not self._check_d3_selection(method, seed, recorded_d3_digests(proto)):
            logger.warning("%s does not say which checkpoints it was selected on (written before selections recorded "
                           "it): not checked against %s", self._find(self.d3_selection_file(method, seed)), found)
        self._checked.add((method, seed))

    def _check_evaluated_data(self, method: str, found: Path, recorded: dict, what: str, archived: bool) -> None:
        """An evaluation is reported only over the data there is now: the catalogue it recorded
        (``catalog_sha256``; not compared for evaluations from before it was recorded) and, for popularity, the
        list the training split gives now. The evaluator checks both when it runs; an evaluation that is only
        reported (archived, or ``--report-only``) was not checked, and popularity and zero-shot have no training
        stage whose data digests would catch a dataset prepared again in place (review)."""
        from llmrec.evaluation.evaluator import catalog_sha256, popularity_ranking

        self._ensure_data()
        remedy = f"remove it from {self.archive_dir}" if archived else "remove it to evaluate again"
        digest = recorded.get("catalog_sha256")
        if digest is not None and digest != catalog_sha256(self.data_dir):
            raise ValueError(f"{found} holds {what} ranked over another catalogue than {self.data_dir} holds now "
                             f"(prepared again since?); {remedy}")
        if method == "popularity":
            from llmrec.data.canonical import jsonl_records

            first = next((rec for _, rec in jsonl_records(found / "rankings.jsonl")), None)
            if first is None:  # no ranked row: no list to compare
                return
            if self._train_targets is None:
                self._train_targets = [r["target_item_id"] for _, r in jsonl_records(self.data_dir / "train.jsonl")]
            now = popularity_ranking(self._train_targets, len(first["item_ranking"]))
            if first["item_ranking"] != now:
                raise ValueError(f"{found} holds {what} whose list (top items {first['item_ranking'][:3]}) is not the "
                                 f"one {self.data_dir / 'train.jsonl'} gives now (top items {now[:3]}); {remedy}")

    def _finished(self) -> dict[str, dict[int, Path]]:
        runs: dict[str, dict[int, Path]] = {}
        for method in self.opts.methods:
            for seed in range(self.opts.seeds if method not in SEED_INDEPENDENT else 1):
                try:
                    d = self.eval_dir(method, seed)
                except FileNotFoundError:  # a D3 weight not selected yet: its test evaluation cannot exist
                    continue
                found = self._finished_eval_dir(d)
                if found is not None:
                    runs.setdefault(method, {})[seed] = found
        return runs

    def _archive(self, method: str, seed: int, eval_dir: Path) -> None:
        """Copy what the report needs of one finished evaluation (from the run directory) into the archive."""
        from llmrec.data.canonical import atomic_write_text, read_jsonl

        def put(src: Path, text: str | None = None) -> None:
            dst = self._mirror(src)
            text = src.read_text(encoding="utf-8") if text is None else text
            if not dst.exists() or dst.read_text(encoding="utf-8") != text:
                dst.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(dst, text)

        put(eval_dir / "results.json")
        keep = ("row", "user_id", "target_item_id", "item_ranking", "item_rank", "title_rank")
        # read_jsonl splits at "\n" only: str.splitlines() also breaks at U+0085, U+2028 and U+2029, which
        # `llmrec evaluate` writes raw inside strings (a title holding one)
        lines = list(read_jsonl(eval_dir / "rankings.jsonl"))
        put(eval_dir / "rankings.jsonl",
            "".join(json.dumps({k: r[k] for k in keep if k in r}) + "\n" for r in sorted(lines, key=lambda r: r["row"])))
        for stage in self.needs(method):
            for name in ("train_results.json", "training_args.json", "grpo_results.json", "llmrec_config.json",
                         "results.json"):
                if (self.stage_dir(stage, seed) / name).exists():
                    put(self.stage_dir(stage, seed) / name)
        if method.endswith("+d3") and self.d3_selection_file(method, seed).exists():
            put(self.d3_selection_file(method, seed))

    def _train_seconds(self, method: str, seed: int) -> float | None:
        total, any_found = 0.0, False
        for stage in self.needs(method):
            d = self.stage_dir(stage, seed)
            sft, grpo, seqrec = (self._find(d / n) for n in ("train_results.json", "grpo_results.json", "results.json"))
            if stage.startswith("sft_") and sft.exists():
                total += json.loads(sft.read_text())["timings_s"]["train"]
            elif stage == "grpo_latent" and grpo.exists():
                total += json.loads(grpo.read_text())["train_seconds_this_run"]
            elif stage.startswith("seqrec_") and seqrec.exists():
                t = json.loads(seqrec.read_text()).get("timings", {})
                total += float(t.get("train_total_s", 0.0))
            else:
                continue
            any_found = True
        return round(total, 1) if any_found else None

    def report(self) -> dict:
        """Collect the finished evaluations into ``<results_dir>/<name>.{json,md,png}``."""
        import numpy as np

        from llmrec.data.canonical import atomic_write_json, atomic_write_text
        from llmrec.evaluation.compare import load_rankings, seed_level_difference
        from llmrec.evaluation.evaluator import UNRECORDED_BEAM_DEFAULTS
        from llmrec.evaluation.metrics import paired_bootstrap_ci, per_row_metrics

        o = self.opts
        finished = self._finished()
        if not finished:
            raise FileNotFoundError(f"no finished evaluation under {self.out}: nothing to report")
        rankings = {m: {s: load_rankings(d) for s, d in seeds.items()} for m, seeds in finished.items()}
        protocols = {(m, s): json.loads((d / "results.json").read_text())["protocol"]
                     for m, seeds in finished.items() for s, d in seeds.items()}
        rows = sorted(set.intersection(*(set(r) for seeds in rankings.values() for r in seeds.values())))
        sizes = {len(r) for seeds in rankings.values() for r in seeds.values()}
        if not rows or sizes != {len(rows)}:
            detail = "; ".join(f"{finished[m][s]}: {p.get('rows')} rows (max_rows {p.get('max_rows')}, row_seed "
                               f"{p.get('row_seed')})" for (m, s), p in protocols.items())
            raise ValueError(f"the finished evaluations are not on the same test rows ({len(rows)} shared): {detail}")
        self._check_same_protocol(protocols, finished)
        # The same row index must be the same example (user, target) in every run.
        ref_method, ref_seeds = next(iter(rankings.items()))
        some = next(iter(ref_seeds.values()))
        for m, seeds in rankings.items():
            for s, recs in seeds.items():
                for r in rows:
                    if (recs[r]["user_id"], recs[r]["target_item_id"]) != (some[r]["user_id"], some[r]["target_item_id"]):
                        raise ValueError(f"row {r} is user {recs[r]['user_id']} -> {recs[r]['target_item_id']} in "
                                         f"{finished[m][s]} but user {some[r]['user_id']} -> "
                                         f"{some[r]['target_item_id']} in {finished[ref_method][min(ref_seeds)]}")
        # The report labels every evaluation with this invocation's settings (the protocol line, "Reproduce:", the SFT
        # and GRPO text) and copies it into the archive: each must have been made with them, the run directory's
        # (which --report-only never passes through the evaluator) as well as the archive's. Checked after the
        # runs are compared with each other, whose messages name both sides of a difference.
        for m, seeds in finished.items():
            for s in seeds:
                self._check_evaluation(m, s)
        methods: dict[str, dict] = {}
        per_row: dict[str, dict[int, dict[str, np.ndarray]]] = {}  # method -> seed -> metric -> per-row values
        for method, seeds in rankings.items():
            first = protocols[(method, min(seeds))]
            # K up to the list length: the beams, and the longest cut-off the evaluation kept a list for.
            max_k = min((first.get("num_beams") or math.inf) if first["method"] == "beam" else math.inf,
                        max(first.get("ks") or REPORT_KS))
            ks = [k for k in REPORT_KS if k <= max_k]
            per_seed: dict[str, list[float]] = {}
            for seed, recs in sorted(seeds.items()):
                for level in ("item", "title"):
                    vals = per_row_metrics([recs[r][f"{level}_rank"] for r in rows], ks)
                    for name, v in vals.items():
                        if name.startswith("mrr"):
                            continue
                        key = name if level == "item" else f"title_{name}"
                        per_seed.setdefault(key, []).append(float(v.mean()))
                        per_row.setdefault(method, {}).setdefault(seed, {})[key] = v
            train_s = [self._train_seconds(method, s) for s in sorted(seeds)]
            eval_s = [json.loads((finished[method][s] / "results.json").read_text()).get("eval_seconds_this_run")
                      for s in sorted(seeds)]
            methods[method] = {
                "label": LABELS[method], "seeds": sorted(seeds), "ks": ks,
                "mean": {k: statistics.fmean(v) for k, v in per_seed.items()},
                "std": {k: (statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in per_seed.items()},
                "per_seed": per_seed, "train_seconds": train_s, "eval_seconds": eval_s,
                "history_length": None if method == "popularity" else first.get("history_length"),
                "runs": [str(finished[method][s]) for s in sorted(seeds)],
            }
        id_full_test = self._id_full_test(finished)
        best_id = self._best_id_model([m for m in ID_MODELS if m in methods], id_full_test)
        diffs = []
        for label, treat, base in DIFFERENCES:
            base = best_id if base == "best-id" else base
            if base is None or treat not in per_row or base not in per_row:
                continue
            # Pair on the seeds both have (a seed-independent baseline pairs with every seed).
            shared = sorted(per_row[treat]) if base in SEED_INDEPENDENT else sorted(set(per_row[treat]) & set(per_row[base]))
            if not shared:
                continue
            entry = {"name": label, "treatment": treat, "baseline": base, "seeds": shared, "metrics": {}}
            for metric in ("ndcg@10", "hr@10"):
                t_seeds = np.stack([per_row[treat][s][metric] for s in shared])
                b_seeds = np.stack([per_row[base][s if s in per_row[base] else min(per_row[base])][metric]
                                    for s in shared])
                t, b = t_seeds.mean(axis=0), b_seeds.mean(axis=0)
                d, lo, hi = paired_bootstrap_ci(t, b, seed=0)
                rel = d / float(b.mean()) if float(b.mean()) > 0 else math.nan
                entry["metrics"][metric] = {"diff": d, "ci95": [lo, hi], "relative": rel,
                                            "excludes_zero": bool(lo > 0 or hi < 0),
                                            **seed_level_difference(t_seeds, b_seeds)}
            diffs.append(entry)
        # The protocol as the runs recorded it (not as this invocation's flags say).
        beam = [(m, s) for (m, s), p in protocols.items() if p["method"] == "beam"]
        llm_proto = protocols[beam[0]] if beam else {}
        guided = [p for p in protocols.values() if p.get("guidance")]
        sft = [self._find(self.stage_dir(st, 0) / "train_results.json") for st in ("sft_latent", "sft_bigrec")]
        sft = [json.loads(f.read_text()) for f in sft if f.exists()]
        any_proto = next(iter(protocols.values()))
        result = {
            "name": o.name,
            "protocol": {
                "dataset": any_proto["dataset"], "test_split": any_proto["split"], "test_rows": len(rows),
                "row_seed": any_proto["row_seed"],
                "test_row_ids": [[r, some[r]["user_id"], some[r]["target_item_id"]] for r in rows],
                "llm": llm_proto.get("model"), "llm_train_rows": sft[0]["num_train_rows"] if sft else None,
                "llm_train_dtype": sft[0].get("config", {}).get("model_dtype") if sft else None,
                "llm_train_subset": "rows drawn from the train split with the seed (random.Random(seed).sample)",
                "grpo_run": o.grpo_stage, "grpo_settings": self._grpo_settings(0),
                "d3_weight": guided[0]["guidance"]["weight"] if guided else None,
                "d3_weights": {m: {s: protocols[(m, s)]["guidance"]["weight"] for s in seeds}
                               for m, seeds in finished.items() if m.endswith("+d3")},
                "d3_selection": self._d3_selections(finished),
                "llm_sft_overrides": o.sft_overrides,
                "id_models_train_on": "the whole train split", "id_overrides": o.id_overrides,
                "llm_eval_overrides": o.eval_overrides,
                "matching": "item level (title level reported too); items absent from a ranked list are misses",
                "llm_eval": {**{k: llm_proto.get(k) for k in ("num_beams", "prompt", "dtype")},
                             "early_stopping": llm_proto.get("early_stopping", UNRECORDED_BEAM_DEFAULTS["early_stopping"])
                             if llm_proto else None},
                "seeds": o.seeds,
                "best_id_model_selection": "highest mean validation NDCG@10 (each run's own model selection "
                                           "split; never the test rows)",
            },
            "methods": methods, "best_id_model": best_id, "differences": diffs,
            "id_models_full_test": id_full_test,
            "missing": [m for m in o.methods if m not in methods],
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        results_dir = Path(o.results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        for m, seeds in finished.items():
            for s, d in seeds.items():
                if d == self.eval_dir(m, s):  # from the run directory (not already the archived copy)
                    self._archive(m, s, d)
        # The table and plot first, the JSON last (as a run's results.json): a report cut after the JSON left the
        # previous .md, which update_readme_results.py copies into the README (a review).
        md = report_markdown(result, command=self.command())
        atomic_write_text(results_dir / f"{o.name}.md", md)
        plot_report(result, results_dir / f"{o.name}.png")
        atomic_write_json(results_dir / f"{o.name}.json", result)
        print(md, end="")
        return result

    @staticmethod
    def _best_id_model(ids: list[str], id_full_test: dict[str, dict[int, dict]]) -> str | None:
        """The ID model the LLM is compared with: the highest mean validation NDCG@10 over its seeds (the same
        validation split each run selected its epoch on). Choosing on the test rows would compare against the
        luckiest of several noisy test estimates. None when a model's validation score is missing."""
        valid: dict[str, float] = {}
        for m in ids:
            scores = [r.get("valid_ndcg@10") for r in id_full_test.get(m, {}).values()]
            if not scores or any(v is None for v in scores):
                logger.warning("no validation NDCG@10 for %s: no 'best ID model' difference is reported", m)
                return None
            valid[m] = statistics.fmean(scores)
        return max(ids, key=lambda m: valid[m]) if ids else None

    def _id_full_test(self, finished: dict[str, dict[int, Path]]) -> dict[str, dict[int, dict]]:
        """Each finished ID model's own evaluation on the WHOLE test split (its training run's results.json), beside
        the table's shared subset: the numbers the ID-model benchmark (``llmrec bench seqrec``) reports."""
        out: dict[str, dict[int, dict]] = {}
        for m in ID_MODELS:
            for s in finished.get(m, {}):
                f = self._find(self.stage_dir(f"seqrec_{m}", s) / "results.json")
                if not f.exists():
                    continue
                r = json.loads(f.read_text())
                out.setdefault(m, {})[s] = {
                    "test": {k: r["test"][k] for k in ("ndcg@10", "hr@10", "ndcg@20", "hr@20") if k in r["test"]},
                    "valid_ndcg@10": r.get("valid", {}).get("ndcg@10"), "best_epoch": r.get("best_epoch"),
                    "epochs": r.get("timings", {}).get("epochs"), "epoch_s": r.get("timings", {}).get("epoch_s"),
                    "test_rows": r.get("protocol", {}).get("rows", {}).get("test"),
                }
        return out

    @staticmethod
    def _check_same_protocol(protocols: dict[tuple[str, int], dict], finished: dict[str, dict[int, Path]]) -> None:
        """One test set for every run, and one LM setting for every beam-search run (history length included; the
        length penalty within the D3 rows and within the others: D3 sets it to 0; guidance aside), so a finished run
        made with other options cannot slip into the table, nor seeds of one method made under different ones."""
        from llmrec.evaluation.evaluator import UNRECORDED_BEAM_DEFAULTS

        shared = ("dataset", "split", "row_seed")
        # batch_size too: in bfloat16 a row's batch-mates move its beam scores (experiment log)
        beam = ("model", "dtype", "prompt", "noun", "use_chat_template", "tokenization", "num_beams",
                "max_prompt_length", "prompt_fit", "early_stopping", "history_length", "batch_size", "batch_order")
        ref: dict[tuple[str, bool], tuple[tuple[str, int], Any]] = {}
        for (m, s), p in protocols.items():
            keys = [(k, False) for k in shared]
            if p["method"] == "beam":
                keys += [(k, False) for k in beam] + [("length_penalty", m.endswith("+d3"))]
            for key, d3 in keys:
                value = p.get(key, UNRECORDED_BEAM_DEFAULTS.get(key)) if p["method"] == "beam" else p.get(key)
                first = ref.setdefault((key, d3), ((m, s), value))
                if value != first[1]:
                    (m0, s0), v0 = first
                    among = (" (among the D3 rows)" if d3 else " (among the rows without D3)") \
                        if key == "length_penalty" else ""
                    raise ValueError(f"the finished evaluations differ in {key}{among}: {v0!r} in {finished[m0][s0]}, "
                                     f"{value!r} in {finished[m][s]}; rerun one of them or report them apart")
        # A D3 row and its plain row decode the same checkpoint (a stage retrained on another machine may not be
        # bitwise the same; evaluations made before the digest was recorded are not checked).
        for (m, s), p in protocols.items():
            plain = protocols.get((m.removesuffix("+d3"), s)) if m.endswith("+d3") else None
            if plain and None not in (plain.get("checkpoint_sha256"), p.get("checkpoint_sha256")) and \
                    plain["checkpoint_sha256"] != p["checkpoint_sha256"]:
                raise ValueError(f"{finished[m][s]} decoded other weights than {finished[m.removesuffix('+d3')][s]} "
                                 "(checkpoint digests differ): D3 must be compared on the same checkpoint; rerun one")

    def _d3_selections(self, finished: dict[str, dict[int, Path]]) -> dict[str, dict[int, dict]]:
        out: dict[str, dict[int, dict]] = {}
        for m, seeds in finished.items():
            for s in seeds:
                f = self._find(self.d3_selection_file(m, s))
                if len(self.opts.d3_weights) > 1 and m.endswith("+d3") and f.exists():
                    out.setdefault(m, {})[s] = json.loads(f.read_text())
        return out

    def command(self) -> str:
        """The command line that reproduces this report (options that differ from the defaults)."""
        o, d = self.opts, PipelineOptions()
        from shlex import quote  # a value with a space (noun=board games, a path) stays one argument

        parts = ["llmrec bench pipeline", f"--dataset {quote(o.dataset)}", f"--model {quote(o.model)}",
                 f"--seeds {o.seeds}"]
        flags = {"methods": "--methods", "output_dir": "--output-dir", "results_dir": "--results-dir", "name": "--name",
                 "recipes": "--recipes",
                 "train_rows": "--train-rows", "test_rows": "--test-rows", "row_seed": "--row-seed",
                 "grpo_rows": "--grpo-rows", "grpo_stage": "--grpo-stage", "d3_weights": "--d3-weight",
                 "d3_valid_rows": "--d3-valid-rows", "dtype": "--dtype"}
        for field_name, flag in flags.items():
            value = getattr(o, field_name)
            if value != getattr(d, field_name):
                text = ",".join(f"{v:g}" if isinstance(v, float) else v for v in value) if isinstance(value, list) \
                    else str(value)
                parts.append(f"{flag} {quote(text)}")
        for flag, pairs in (("--sft", o.sft_overrides), ("--grpo", o.grpo_overrides), ("--id", o.id_overrides),
                            ("--eval", o.eval_overrides)):
            if pairs:
                # Lists and dicts as JSON, which parses back as YAML: 'reward_funcs=["a","b"]'
                parts.append(flag + " " + " ".join(
                    quote(f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (list, dict)) else v}")
                    for k, v in pairs.items()))
        return " ".join(parts)


def _grpo_text(g: dict) -> str:
    if not g:
        return "-"
    return (f"{g.get('prompts')} prompts, {g.get('steps')} steps, lr {g.get('learning_rate'):g}, "
            f"{g.get('advantage_mode')} advantages, noise {g.get('noise_scale'):g} {g.get('noise_mode')}, "
            f"rewards {','.join(g.get('reward_funcs') or [])}")


def _fmt(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.4f} ± {std:.4f}" if seeds > 1 else f"{mean:.4f}"


def grid_edge(chosen: float, grid: list[float]) -> str | None:
    """``"largest"`` / ``"smallest"`` when ``chosen`` is on the edge of a grid of several weights, else None."""
    if len(grid) < 2:
        return None
    return "largest" if chosen == max(grid) else "smallest" if chosen == min(grid) else None


def report_markdown(result: dict, command: str = "") -> str:
    """The report as Markdown: protocol line, metrics table, differences table, missing methods."""
    from llmrec.evaluation.metrics import SEED_ROW_COVERAGE_NOTE

    p = result["protocol"]
    text = (f"{p['test_rows']} test rows of {p['dataset']} (the same rows, seed {p['row_seed']}, for every method), "
            "item-level matching, items missing from a list count as misses.")
    if p.get("llm"):
        sft = p.get("llm_sft_overrides")
        rows = f"{p['llm_train_rows']} train rows per seed, " if p.get("llm_train_rows") is not None else ""
        text += (f" LLMs: {p['llm']} {p['llm_eval'].get('dtype')}, {rows}"
                 + (f"SFT with {', '.join(f'{k}={v}' for k, v in sft.items())}, " if sft else "")
                 + f"{p['llm_eval'].get('num_beams')} beams"
                 + (" with early_stopping false (generate's default, the papers' decoding)"
                    if p['llm_eval'].get('early_stopping') is False else "")
                 + (f" ({', '.join(f'{k}={v}' for k, v in ev.items() if k != 'early_stopping')})"
                    if (ev := p.get("llm_eval_overrides")) and set(ev) != {"early_stopping"} else "")
                 + f"; GRPO: {_grpo_text(p['grpo_settings'])}.")
    selections = p.get("d3_selection") or {}
    if selections:
        first = next(iter(next(iter(selections.values())).values()))
        def _chosen(seeds: dict[int, dict]) -> str:
            """The chosen weights of one method, seeds with the same choice together: "100 (seeds 0, 1; the grid's
            largest)"; one seed: "100, the grid's largest"."""
            groups: dict[tuple[float, str | None], list[int]] = {}
            for s, sel in sorted(seeds.items()):
                edge = grid_edge(sel["chosen"], [float(w) for w in sel["valid_ndcg@10"]])
                groups.setdefault((sel["chosen"], edge), []).append(s)
            if len(seeds) == 1:
                ((w, edge),) = groups
                return f"{w:g}" + (f", the grid's {edge}" if edge else "")
            parts = []
            for (w, edge), ss in groups.items():
                notes = [("seed " if len(ss) == 1 else "seeds ") + ", ".join(map(str, ss))]
                notes += [f"the grid's {edge}"] if edge else []
                parts.append(f"{w:g} ({'; '.join(notes)})")
            return ", ".join(parts)

        chosen = "; ".join(f"{LABELS[m]}: {_chosen(seeds)}" for m, seeds in selections.items())
        text += (f" D3 = length penalty 0 + SASRec guidance, its weight selected per method and seed by NDCG@10 on "
                 f"{first['rows']} validation rows among "
                 f"{', '.join(sorted(first['valid_ndcg@10'], key=float))} ({chosen}).")
    elif p.get("d3_weight") is not None:
        text += f" D3 = length penalty 0 + SASRec guidance (weight {p['d3_weight']:g})."
    text += (" ID models: the whole train split, full ranking over all items. Values: mean ± sample std (n - 1) over seeds (seeds "
             "column); hist = history length read; times are wall seconds of each stage's last (possibly resumed) "
             "invocation on a shared 2-core CPU (training: all stages the method needs).")
    lines = [text, ""]
    if command:
        lines += [f"Reproduce: `{command}`", ""]
    ks = [1, 5, 10, 20]
    head = "| method | seeds | hist | " + " | ".join(f"HR@{k}" for k in ks) + " | " + " | ".join(
        f"NDCG@{k}" for k in ks) + " | title NDCG@10 | train s | eval s |"
    lines += [head, "|" + "---|" * (3 + 2 * len(ks) + 3)]
    for m in result["methods"].values():
        n = len(m["seeds"])
        cells = []
        for kind in ("hr", "ndcg"):
            for k in ks:
                key = f"{kind}@{k}"
                cells.append(_fmt(m["mean"][key], m["std"][key], n) if key in m["mean"] else "-")
        title = _fmt(m["mean"]["title_ndcg@10"], m["std"]["title_ndcg@10"], n) if "title_ndcg@10" in m["mean"] else "-"
        train = [t for t in m["train_seconds"] if t is not None]
        evals = [t for t in m["eval_seconds"] if t is not None]
        times = [f"{statistics.fmean(ts):.0f}" if ts else "-" for ts in (train, evals)]
        hist = m["history_length"] if m["history_length"] is not None else "-"
        lines.append(f"| {m['label']} | {n} | {hist} | " + " | ".join(cells) + f" | {title} | "
                     + " | ".join(times) + " |")
    lines += ["", "Differences (paired bootstrap 95% intervals over the test rows, on the seeds both methods have, "
              "per-row metrics averaged over those seeds first: these trained models on other rows; with 2 or more "
              "seeds, \"seeds+rows\" counts the seeds' spread too, seed s paired with seed s (crossed random effects, t with "
              f"Satterthwaite df; {SEED_ROW_COVERAGE_NOTE}): other training runs as well. "
              "The best ID model is the one with the highest mean validation NDCG@10, never chosen on the test "
              "rows):", "", "| difference | seeds | NDCG@10 diff [95% CI] | rel. | NDCG@10 seeds+rows [95% CI] | "
              "HR@10 diff [95% CI] |", "|---|---|---|---|---|---|"]

    def interval(ci: list[float] | None) -> str:
        return "-" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"

    for d in result["differences"]:
        n, h = d["metrics"]["ndcg@10"], d["metrics"]["hr@10"]
        name = d["name"]
        if d["baseline"] in ID_MODELS and d["treatment"] not in ID_MODELS:
            name += f" ({result['methods'][d['baseline']]['label']})"
        rel = f"{n['relative'] * 100:+.0f}%" if math.isfinite(n["relative"]) else "-"
        lines.append(f"| {name} | {len(d['seeds'])} | {n['diff']:+.4f} {interval(n['ci95'])} | {rel} | "
                     f"{interval(n.get('ci95_seeds_rows'))} | {h['diff']:+.4f} {interval(h['ci95'])} |")
    full = result.get("id_models_full_test") or {}
    if full:
        n_rows = {r["test_rows"] for seeds in full.values() for r in seeds.values()}
        lines += ["", f"ID models on the whole test split ({', '.join(str(n) for n in sorted(n_rows, key=str))} rows; "
                  "each run's own evaluation after selection on the whole validation split, as `llmrec bench seqrec` "
                  "reports it):", "", "| model | seed | valid NDCG@10 | test NDCG@10 | test HR@10 | test NDCG@20 | "
                  "best epoch / epochs run | s/epoch |", "|---|---|---|---|---|---|---|---|"]
        for m, seeds in full.items():
            for s, r in sorted(seeds.items()):
                t = r["test"]
                lines.append(f"| {LABELS[m]} | {s} | {_num(r['valid_ndcg@10'], 4)} | {t['ndcg@10']:.4f} | "
                             f"{t['hr@10']:.4f} | {t.get('ndcg@20', math.nan):.4f} | {r['best_epoch']} / {r['epochs']} | "
                             f"{_num(r['epoch_s'], 0)} |")
    if result["missing"]:
        lines += ["", "Not finished yet (no evaluation): " + ", ".join(LABELS[m] for m in result["missing"]) + "."]
    return "\n".join(lines) + "\n"


def ndcg_bars(methods: list[tuple[str, dict]], k: int) -> tuple[list[float], list[float]]:
    """The bar heights (means over seeds) and error bars (stds) of NDCG@``k`` per method; NaN (no bar, not a bar
    at 0 that reads as a measured zero) where a method has no NDCG@``k`` (an evaluation with fewer beams), and no
    error bar for a method of one seed (its std is unknown, not 0: a zero-length bar read as no spread)."""
    nan = float("nan")
    return ([m["mean"].get(f"ndcg@{k}", nan) for _, m in methods],
            [m["std"].get(f"ndcg@{k}", nan) if len(m.get("seeds", (0, 1))) > 1 else nan for _, m in methods])


def _num(value: float | None, digits: int) -> str:
    """``value`` with ``digits`` decimals, "-" when a run did not record it (an ID-model run without a validation
    score: the report ended in a TypeError, after its JSON was written)."""
    return "-" if value is None else f"{value:.{digits}f}"


def plot_report(result: dict, path: Path) -> None:
    """NDCG@K by method (bars = mean over seeds, error bars = std), written atomically as PNG."""
    from llmrec.plotting import pyplot, save_figure

    plt = pyplot()
    methods = list(result["methods"].items())
    ks = [1, 5, 10]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(methods) + 2), 4.0))
    width = 0.8 / len(ks)
    for j, k in enumerate(ks):
        xs = [i + (j - (len(ks) - 1) / 2) * width for i in range(len(methods))]
        means, stds = ndcg_bars(methods, k)
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=f"NDCG@{k}")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([m["label"] for _, m in methods], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("NDCG@K")
    p = result["protocol"]
    ax.set_title(f"{Path(p['dataset']).name}: {p['test_rows']} test rows, LLM {p['llm']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _pairs(values: list[str], what: str) -> dict[str, Any]:
    from llmrec.config import load_yaml_text

    out: dict[str, Any] = {}
    for v in values:
        if "=" not in v:
            raise ValueError(f"{what}: expected key=value, got {v!r}")
        k, raw = v.split("=", 1)
        if k.strip() in out:  # the last value won without a word (a review), as a key given twice in a recipe is refused
            raise ValueError(f"{what}: {k.strip()} given twice ({k.strip()}={out[k.strip()]!r} and {v!r})")
        out[k.strip()] = load_yaml_text(raw)  # typed by coerce_fields, as a recipe's values
    return out


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in str(text).split(",") if w.strip()]
    except ValueError:
        raise ValueError(f"--d3-weight: expected numbers separated by commas (e.g. 0.3,1,3), got {text!r}") from None


def options_from_args(args: argparse.Namespace) -> PipelineOptions:
    if args.methods is not None and not args.methods.strip(" ,"):
        # "" selected every method (hours of work) and "," none (failing only at the end)
        raise ValueError(f"--methods {args.methods!r} names no method; leave it out for all of them, or choose from "
                         f"{','.join(METHODS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(METHODS)
    return PipelineOptions(
        dataset=args.dataset, model=args.model, seeds=args.seeds, methods=methods, output_dir=args.output_dir,
        results_dir=args.results_dir, name=args.name, train_rows=args.train_rows, test_rows=args.test_rows,
        row_seed=args.row_seed, grpo_rows=args.grpo_rows, dtype=args.dtype, grpo_stage=args.grpo_stage, grpo_overrides=_pairs(args.grpo, "--grpo"),
        sft_overrides=_pairs(args.sft, "--sft"),
        d3_weights=_weights(args.d3_weight),
        d3_valid_rows=args.d3_valid_rows, id_overrides=_pairs(args.id, "--id"), eval_overrides=_pairs(args.eval, "--eval"),
        recipes=args.recipes,
        report_only=args.report_only, no_report=args.no_report, in_process=args.in_process)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="data/games", help="prepared dataset directory (the Games time split)")
    p.add_argument("--model", default="smollm2-135m", help="LLM backbone (alias, hub id or local dir)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds 0..N-1 (the test rows stay the same)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of: {','.join(METHODS)}")
    p.add_argument("--output-dir", default="runs/games-cmp", help="where the stages write (resumable)")
    p.add_argument("--results-dir", default="benchmarks/results", help="where the report is written")
    p.add_argument("--name", default="pipeline_games_smollm2", help="report file name (no extension)")
    p.add_argument("--train-rows", type=int, default=1024, help="LLM SFT train rows per seed")
    p.add_argument("--test-rows", type=int, default=500, help="test rows shared by every method")
    p.add_argument("--row-seed", type=int, default=0, help="seed of the test rows")
    p.add_argument("--grpo-rows", type=int, default=64, help="GRPO prompts per seed")
    p.add_argument("--dtype", default="bfloat16",
                   help="dtype of every LM stage (SFT, GRPO, beam search); the committed report used bfloat16 on a "
                        "CPU with native bf16. 'fast': bfloat16 where the hardware computes it natively, else float32 "
                        "(on an AVX2-only CPU bfloat16 is ~20x slower). A finished stage made in another dtype is "
                        "refused, and the report refuses evaluations of different dtypes")
    p.add_argument("--grpo-stage", default="grpo_latent",
                   help="directory name of the GRPO run (e.g. the run a validation sweep selected)")
    p.add_argument("--sft", nargs="*", default=[], metavar="KEY=VALUE",
                   help="LatentSFTConfig overrides for both SFT runs (latent and BIGRec), e.g. head_output_norm=true "
                        "learning_rate=1e-4; a finished SFT stage made without them is refused")
    p.add_argument("--grpo", nargs="*", default=[], metavar="KEY=VALUE",
                   help="LatentGRPOConfig overrides, e.g. noise_mode=relative noise_scale=0.3")
    p.add_argument("--id", nargs="*", default=[], metavar="KEY=VALUE",
                   help="SeqRecConfig overrides for every ID model, e.g. epochs=10 patience=3")
    p.add_argument("--eval", nargs="*", default=[], metavar="KEY=VALUE",
                   help="EvalConfig overrides for every LM evaluation (zero-shot, BIGRec, latent, their D3 rows), e.g. "
                        "early_stopping=false (the papers' decoding: generate's default) or num_beams=20; D3 rows keep "
                        "length penalty 0; a finished evaluation made with other settings is refused")
    p.add_argument("--d3-weight", default="1", help="weight of the SASRec guidance in D3 decoding; a comma list "
                   "(e.g. 0.3,1,3) selects one per D3 method and seed on --d3-valid-rows validation rows")
    p.add_argument("--d3-valid-rows", type=int, default=200, help="validation rows of the D3 weight selection")
    p.add_argument("--recipes", default=None, help="recipe directory (default: the shipped recipes)")
    p.add_argument("--report-only", action="store_true", help="run nothing; report the finished evaluations")
    p.add_argument("--no-report", action="store_true",
                   help="run the stages, write no report (for lanes run side by side: a lane's report would hold "
                   "only its own --methods; finish with --report-only)")
    p.add_argument("--in-process", action="store_true",
                   help="run every stage in this process instead of a fresh process per stage (the default, which "
                   "returns each stage's memory: one process running them all grew to ~12 GB on Games)")


def cmd_pipeline(args: argparse.Namespace) -> dict:
    result = Pipeline(options_from_args(args)).run()
    return {m: {k: round(v, 6) for k, v in r["mean"].items() if k in ("ndcg@10", "hr@10")}
            for m, r in result.get("methods", {}).items()}
