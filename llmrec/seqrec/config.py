"""Configuration of ``llmrec seqrec train`` (one flat dataclass; recipe YAML keys = field names)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# Fields that do not change what a run trains or selects: a resumed or reused run may differ in them.
RESULT_NEUTRAL_FIELDS = ("output_dir", "resume", "progress", "num_threads", "eval_batch_size", "test_depths",
                         "report_to")

# Stopping rules a run may be resumed with larger values of, finished or not ("extending" it): the trainer restores
# the weights, optimiser, RNG state and early-stopping counter of the last epoch, so a run trained on to a later epoch
# or with more patience is the run those settings make from scratch (as transformers' Trainer resumes with a larger
# num_train_epochs). Smaller values are refused: the run may have trained past where they would have stopped it.
EXTENDABLE_FIELDS = ("epochs", "patience", "rpt_epochs", "rpt_patience")

_REAREC_FIELDS = ("reason_steps",)
_ERL_FIELDS = ("kl_weight", "kl_cap")
_PRL_FIELDS = ("pta_alpha", "pl_weight", "cl_weight", "noise_std", "warmup_epochs", "cl_max_rows", "cl_negatives")
_LARES_FIELDS = ("n_pre_layers", "n_core_layers", "mean_recurrence", "depth_sampling", "state_init", "state_std",
                 "state_scale", "fuse", "tla_weight", "sla_weight", "align_tau", "align_sim", "sla_exclude_final",
                 "filter_topk", "filter_passes", "rpt_epochs", "rpt_max_rows", "rpt_lr", "rpt_batch_size", "rpt_group",
                 "rpt_beta", "rpt_reward", "rpt_reward_k", "rpt_dropout", "rpt_patience", "test_depths")
# LARES fields read only when RPT runs (rpt_epochs > 0): the between-phase filter and RPT itself.
_RPT_FIELDS = ("filter_topk", "filter_passes", "rpt_max_rows", "rpt_lr", "rpt_batch_size", "rpt_group", "rpt_beta",
               "rpt_reward", "rpt_reward_k", "rpt_dropout", "rpt_patience")
# The fields only some models read (every other field is read by all of them: LARES too builds, then replaces, the
# n_layers encoder, which moves the random initialisation of its own layers; a GRU backbone reads no attention field,
# see SeqRecConfig.unused_fields).
MODEL_FIELDS: dict[str, tuple[str, ...]] = {
    "sasrec": (),
    "gru4rec": (),
    "rearec-erl": _REAREC_FIELDS + _ERL_FIELDS,
    "rearec-prl": _REAREC_FIELDS + _PRL_FIELDS,
    "lares": _LARES_FIELDS,
}
# Values of the string fields that name a choice: anything else is refused (rpt_reward "NDCG" trained with the
# recall reward, as the model tests only for "ndcg").
CHOICES: dict[str, tuple[str, ...]] = {
    "train_mode": ("sequence", "rows"),
    "backbone": ("auto", "transformer", "gru"),
    "depth_sampling": ("poisson-lognormal", "constant"),
    "cl_negatives": ("batch", "other_sequences"),
    "state_init": ("normal", "normal_zero", "zero"),
    "fuse": ("add", "concat", "linear"),
    "align_sim": ("dot", "cos"),
    "rpt_reward": ("recall", "ndcg"),
    "report_to": ("none", "tensorboard"),
}


def training_fields(config: dict) -> dict:
    """The fields of a config dict (``to_dict(SeqRecConfig)``) that decide what a run trains and selects."""
    return {k: v for k, v in config.items() if k not in RESULT_NEUTRAL_FIELDS}


def training_field_differences(found: dict, wanted: dict) -> dict[str, tuple[Any, Any]]:
    """``{field: (found, wanted)}`` for the training fields where a finished run's config (``found``, as read back
    from its ``results.json``) differs from the config asked for now (``wanted``, a ``to_dict`` of a config); see
    :func:`llmrec.config.config_differences`."""
    from llmrec.config import config_differences, to_dict
    from llmrec.seqrec.models import backbone_of

    defaults = to_dict(SeqRecConfig())
    diff = config_differences(found, wanted, defaults, ignore=RESULT_NEUTRAL_FIELDS, paths=("dataset_dir",))
    if "backbone" in diff:  # "auto" and the backbone it stands for are one model ("gru" for gru4rec)
        resolved = {backbone_of(SimpleNamespace(**{k: c.get(k, defaults[k]) for k in ("model", "backbone")}))
                    for c in (found, wanted)}
        if len(resolved) == 1:
            del diff["backbone"]
    return diff


def split_extension(diff: dict[str, tuple[Any, Any]]) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """``(raised, other)``: the differences of :func:`training_field_differences` split into the stopping rules
    asked for with larger values than the run was made with (:data:`EXTENDABLE_FIELDS`: a resume extends the run)
    and every other difference (a resume would mix two configurations), leaving out RPT's settings when RPT is
    added to a run made without it."""
    raised = {k: (f, w) for k, (f, w) in diff.items()
              if k in EXTENDABLE_FIELDS and isinstance(f, int) and isinstance(w, int) and w > f}
    # A run without RPT never read RPT's settings: adding RPT to it may choose them.
    unread = _RPT_FIELDS if raised.get("rpt_epochs", (None,))[0] == 0 else ()
    return raised, {k: v for k, v in diff.items() if k not in raised and k not in unread}


@dataclass
class SeqRecConfig:
    """Everything one ID-model training run needs."""

    dataset_dir: str = _f("", "prepared dataset directory (`llmrec data prepare` output)")
    output_dir: str = _f("runs/seqrec", "run directory: checkpoints, results.json, results.md")
    model: str = _f("sasrec", "sasrec | gru4rec | rearec-erl | rearec-prl | lares")
    seed: int = _f(42, "random seed (model init, shuffling, dropout, depth sampling)")
    # data
    max_history: int = _f(50, "history length L (most recent items kept; pad id 0, left padding)")
    train_mode: str = _f(
        "sequence",
        "sequence: group a user's prefix rows into one sequence and train every prefix in one causal "
        "pass (per-position loss); rows: one example per train row, last-position loss",
    )
    window_stride: int = _f(
        0,
        "sequence mode: a window ends every window_stride positions and trains its last window_stride "
        "positions, so each of them sees >= max_history - window_stride earlier items (0 = max_history: "
        "non-overlapping windows, the first positions of a window see few items; 1 = every prefix with its "
        "full history, as RecBole's samples, at up to max_history times the windows: one per train row; ~40x on "
        "ML-100K, ~6x on Beauty and Games, whose sequences are short)",
    )
    # backbone
    backbone: str = _f(
        "auto",
        "the encoder: auto (the model's own: a GRU for gru4rec, the causal Transformer for the others) | transformer "
        "| gru (ReaRec on GRU4Rec's encoder; sasrec and lares run on the Transformer only, gru4rec on the GRU only)",
    )
    hidden_size: int = _f(64, "embedding / hidden size d")
    n_layers: int = _f(2, "Transformer layers (SASRec / ReaRec encoder), or GRU layers on the GRU backbone")
    n_heads: int = _f(2, "attention heads")
    inner_size: int = _f(256, "feed-forward inner size")
    dropout: float = _f(0.5, "hidden dropout (GRU backbone: the dropout on the item embeddings, its only one)")
    attn_dropout: float = _f(0.5, "attention dropout")
    input_dropout: float | None = _f(
        None, "dropout after the input LayerNorm (None = dropout; ReaRec code uses 0.2; GRU backbone: replaces "
        "dropout when set)"
    )
    temperature: float = _f(1.0, "logits = h.E^T / temperature (ReaRec code: 0.07; RecBole SASRec: 1)")
    # optimisation
    epochs: int = _f(
        200, "maximum training epochs (phase 1); raised on a run directory that holds a run (finished or not), the "
        "run trains on from its last epoch (so does a raised patience, rpt_epochs or rpt_patience)")
    batch_size: int = _f(256, "global training batch (examples; split across processes)")
    eval_batch_size: int = _f(256, "evaluation batch (rows)")
    lr: float = _f(1e-3, "Adam learning rate")
    weight_decay: float = _f(0.0, "Adam weight decay")
    patience: int = _f(10, "early stopping: validations (every eval_every epochs) without a better metric")
    valid_metric: str = _f("ndcg@10", "validation metric for early stopping and model selection")
    eval_every: int = _f(1, "validate every N epochs")
    ks: list[int] = _f([1, 5, 10, 20], "cut-offs K of the reported metrics (10 among them)")
    mask_history: bool = _f(
        False, "set the scores of the history items the model reads (the last max_history) to -inf at evaluation, "
        "in the trainer and in `llmrec evaluate --method seqrec` alike (default: no masking)"
    )
    resume: bool = _f(True, "resume from the run directory's checkpoints if present")
    max_train_batches: int = _f(0, "stop an epoch after N batches (0 = all; for smoke tests)")
    progress: bool = _f(True, "tqdm progress bars on the main process")
    report_to: str = _f(
        "none", "none | tensorboard: each epoch's training losses, validation metrics and seconds as scalars "
        "under output_dir/tensorboard, tagged by phase (pip install 'llmrec[tensorboard]')"
    )
    num_threads: int = _f(0, "torch intra-op threads per process (0 = torch's default)")
    # ReaRec
    reason_steps: int = _f(2, "ReaRec: reasoning steps K (same in training and inference)")
    kl_weight: float = _f(0.05, "ERL: weight lambda of the KL diversity term (subtracted); the term is the mean over "
                          "ordered step pairs of KL(p_j || sg p_i), as the ReaRec code, which at K=2 is ~1/3 of the "
                          "paper's sum over pairs (its gradient ~1/6): lambda here ~ 3x the paper's by value")
    kl_cap: float = _f(1.0, "ERL: cap on the per-row mean pairwise KL, above which a row's KL has no gradient "
                       "(ours, neither the paper's nor the code's: the subtracted term is unbounded; 0 = no cap)")
    pl_weight: float = _f(1.0, "PRL: weight of the mean CE of the earlier steps (the code's form; the paper sums "
                          "every step's CE: pl_weight = K gives the paper's loss)")
    pta_alpha: float = _f(5.0, "PRL: temperature annealing alpha >= 1 (step k at tau*alpha^(K-k))")
    cl_weight: float = _f(1.0, "PRL: weight of the reasoning-aware contrastive loss")
    noise_std: float = _f(0.01, "PRL: std of the Gaussian noise on reasoning tokens of the noisy view (0: no noisy "
                                "view and no contrastive term; cl_weight then unused)")
    warmup_epochs: int = _f(2, "PRL: epochs before the noisy view and the contrastive loss start")
    cl_max_rows: int = _f(1024, "PRL: max rows in one contrastive similarity matrix (random subset)")
    cl_negatives: str = _f(
        "batch",
        "PRL: the contrastive negatives of a prefix: 'batch' (every other prefix in the batch) or 'other_sequences' "
        "(not the other prefixes of its own training sequence). In sequence mode a batch row holds many prefixes of "
        "one user, which share most of their history and carry most of the negatives' softmax mass; the ReaRec "
        "code's batches of random rows rarely hold two of one user. In rows mode the two are the same.",
    )
    # LARES
    n_pre_layers: int = _f(1, "LARES: pre-block layers")
    n_core_layers: int = _f(1, "LARES: shared recurrent core layers")
    mean_recurrence: int = _f(4, "LARES: mean training depth mu, and the evaluation depth")
    depth_sampling: str = _f("poisson-lognormal", "LARES: poisson-lognormal | constant")
    state_init: str = _f(
        "normal_zero", "LARES: normal (random also at eval) | normal_zero (zeros at eval) | zero"
    )
    state_std: float = _f(1.0, "LARES: initial-state truncated-normal std")
    state_scale: float = _f(3.0, "LARES: initial-state scale omega")
    fuse: str = _f("add", "LARES: how the core's input joins the state T and the pre-block's H: add (their average) | "
                   "concat (a linear map of [T, H]) | linear (sigmoid(g) T + (1 - sigmoid(g)) H with a learned gate g "
                   "per dimension; the LARES code's gate is one scalar)")
    tla_weight: float = _f(0.1, "LARES SPT: trajectory-level alignment weight alpha. In train_mode sequence the "
                           "alignment terms use each window's last position only (2.5% of ML-100K's train rows, NCE "
                           "over the batch's windows); the paper aligns every train row (rows mode, batch 1024)")
    sla_weight: float = _f(0.5, "LARES SPT: step-level alignment weight gamma (the same positions as tla_weight)")
    align_tau: float = _f(1.0, "LARES SPT: alignment NCE temperature")
    align_sim: str = _f("dot", "LARES SPT: similarity of the alignment NCE, dot | cos (only the alignment's; the "
                               "official sem_func cos also normalises the recommendation scores, this does not)")
    sla_exclude_final: bool = _f(False, "LARES SPT: never draw the final step for SLA")
    filter_topk: int = _f(100, "LARES: keep a train row for RPT if its target is in the top-k in any pass")
    filter_passes: int = _f(3, "LARES: filter passes (random initial state each)")
    rpt_epochs: int = _f(0, "LARES: RPT epochs (0 = skip RPT)")
    rpt_max_rows: int = _f(0, "LARES RPT: train on a random subset of at most this many kept rows (0 = all)")
    rpt_lr: float = _f(5e-4, "LARES RPT: learning rate")
    rpt_batch_size: int = _f(400, "LARES RPT: rows per batch")
    rpt_group: int = _f(4, "LARES RPT: rollouts G per row")
    rpt_beta: float = _f(1.0, "LARES RPT: KL weight beta")
    rpt_reward: str = _f("recall", "LARES RPT: recall | ndcg")
    rpt_reward_k: int = _f(10, "LARES RPT: reward cut-off k")
    rpt_dropout: float = _f(0.1, "LARES RPT: dropout of the policy")
    rpt_patience: int = _f(3, "LARES RPT: early-stopping patience (validations without a better metric)")
    test_depths: list[int] = _f([], "LARES: extra test depths to report (e.g. 1 2 4 8 12)")

    def __post_init__(self) -> None:
        from llmrec.seqrec.models import MODEL_NAMES

        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; choose one of {MODEL_NAMES}")
        self._check_types()
        from llmrec.data.canonical import check_directory_path

        check_directory_path(self.output_dir, "output_dir")
        if self.reason_steps < 0:
            raise ValueError(f"reason_steps (K) must be >= 0, got {self.reason_steps}")
        own = {"sasrec": "transformer", "lares": "transformer", "gru4rec": "gru"}.get(self.model)
        if own and self.backbone not in ("auto", own):
            other = {"sasrec": "gru4rec is the plain model on the GRU", "gru4rec": "sasrec is the plain model on the "
                     "Transformer", "lares": "its pre-block and recurrent core are Transformer layers"}[self.model]
            raise ValueError(f"backbone {self.backbone!r} with model {self.model}: {self.model} runs on the {own} "
                             f"backbone only ({other}); ReaRec runs on either")
        # NaN passes every range check below (nan < 0 and nan <= 0 are False) and inf is no setting either: a NaN
        # kl_weight silently trained without the KL term (its "> 0" test is False) and was recorded as NaN.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        # Sizes and counts: 0 or less would build no layer, run no epoch (patience 0 trained nothing and still
        # wrote results of the untrained model) or divide by zero (eval_every); refused here, at the start.
        for name in ("max_history", "hidden_size", "n_layers", "n_heads", "inner_size", "epochs", "patience",
                     "eval_every", "n_pre_layers", "n_core_layers", "mean_recurrence", "filter_topk", "filter_passes",
                     "rpt_batch_size", "rpt_reward_k", "rpt_patience", "cl_max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_batches", "num_threads", "rpt_epochs", "rpt_max_rows", "warmup_epochs",
                     "weight_decay", "kl_weight", "kl_cap", "pl_weight", "cl_weight", "noise_std", "tla_weight",
                     "sla_weight", "rpt_beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pta_alpha < 1:
            # The spec's tau_k = tau * alpha^(K-k) with alpha >= 1: below 1 the earliest steps get the sharpest
            # targets and the annealing runs backwards (review)
            raise ValueError(f"pta_alpha must be >= 1 (step k trains at tau * alpha^(K-k)), got {self.pta_alpha}")
        for name in ("lr", "rpt_lr", "align_tau", "state_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        from llmrec.seqrec.models import backbone_of

        if backbone_of(self) == "transformer" and self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by n_heads ({self.n_heads})")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be a non-empty list of cut-offs >= 1, got {self.ks}")
        if 10 not in self.ks:  # the run's summary, markdown and `bench seqrec` report NDCG@10 and HR@10
            raise ValueError(f"ks must include 10 (NDCG@10 and HR@10 are reported by every run), got {self.ks}")
        if not 0 <= self.window_stride <= self.max_history:
            raise ValueError(f"window_stride must be in 0..max_history ({self.max_history}), got {self.window_stride}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("dropout", "attn_dropout", "input_dropout", "rpt_dropout"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < 1:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        metric, _, k = self.valid_metric.partition("@")
        # str(int(k)) == k: the metrics are keyed "ndcg@10"; "ndcg@010" passed here and failed at the first validation
        if metric not in ("hr", "ndcg", "mrr") or not k.isdigit() or str(int(k)) != k or int(k) not in self.ks:
            raise ValueError(f"valid_metric must be hr|ndcg|mrr@K with K in ks {self.ks}, got {self.valid_metric!r}")
        if any(d < 1 for d in self.test_depths):
            raise ValueError(f"test_depths must be >= 1, got {self.test_depths}")
        if self.rpt_epochs > 0 and self.rpt_group < 2:
            # one rollout has no group spread: its standardised advantage is 0/0
            raise ValueError(f"rpt_group (G) must be >= 2 for RPT, got {self.rpt_group}")

    def _check_types(self) -> None:
        """Each field's value of its declared type (a bool 0/1 becomes False/True, as "0"/"1" on the command line).

        Recipes and command lines are converted by the parser, but values reach the config from Python as well (the
        benchmark, the pipeline, scripts): ``mask_history="false"`` was true, ``mask_history=2`` too, and
        ``max_train_batches=1.5`` ran two batches.
        """
        # The declared annotations, as text: HfArgumentParser replaces a field's .type with the resolved type.
        hints = {name: str(t).replace("<class '", "").replace("'>", "")
                 for name, t in typing.get_type_hints(SeqRecConfig).items()}
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), hints[f.name]
            if kind == "bool":
                if isinstance(v, numbers.Integral) and not isinstance(v, bool) and v in (0, 1):
                    setattr(self, f.name, bool(v))
                elif not isinstance(v, bool):
                    raise ValueError(f"{f.name} must be true or false, got {v!r}")
            elif kind == "int" and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise ValueError(f"{f.name} must be an integer, got {v!r}")
            elif kind in ("float", "float | None") and not (v is None and kind != "float") and (
                    isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise ValueError(f"{f.name} must be a number, got {v!r}")
            elif kind == "str" and not isinstance(v, str):
                raise ValueError(f"{f.name} must be a string, got {v!r}")
            elif kind == "list[int]" and (not isinstance(v, list) or any(
                    isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in v)):
                raise ValueError(f"{f.name} must be a list of integers, got {v!r}")

    def unused_fields(self) -> dict[str, Any]:
        """``{field: value}`` of the fields set away from their default that this run does not read.

        Those are the fields of other models (``pta_alpha`` for SASRec, ``test_depths`` for ReaRec) and the fields
        another setting turns off (``window_stride`` with ``train_mode: rows``; the filter and RPT fields of a LARES
        with ``rpt_epochs: 0``, its alignment settings with both alignment weights 0; a loss term's settings when
        its weight is 0, every ReaRec field with ``reason_steps: 0``). Such a value changes nothing yet is recorded in the run's config as if it had been
        used. ``llmrec seqrec train`` refuses them; a benchmark's shared settings (applied to every model) may hold
        them.
        """
        from llmrec.config import field_defaults
        from llmrec.seqrec.models import backbone_of

        defaults = field_defaults(type(self))
        others = {name for fields in MODEL_FIELDS.values() for name in fields} - set(MODEL_FIELDS[self.model])
        if backbone_of(self) == "gru":  # no attention: a GRU reads neither its heads, its FFN nor its dropout
            others.update(("n_heads", "inner_size", "attn_dropout"))
            if self.input_dropout is not None:  # its one dropout is on the input, where input_dropout replaces it
                others.add("dropout")
        if self.train_mode == "rows":
            others.add("window_stride")
        if self.model == "lares" and self.rpt_epochs == 0:
            others.update(_RPT_FIELDS)
        if self.model in ("rearec-erl", "rearec-prl") and self.reason_steps == 0:  # no reasoning step: SASRec
            others.update(_ERL_FIELDS if self.model == "rearec-erl" else _PRL_FIELDS)
        if self.model == "rearec-erl" and self.kl_weight == 0:  # the KL term is off, and its cap with it
            others.add("kl_cap")
        if self.model == "rearec-prl":
            if self.pl_weight == 0:  # no progressive-temperature loss: its annealing alpha is not read
                others.add("pta_alpha")
            if self.noise_std == 0 or self.cl_weight == 0:  # the contrastive term (noisy view) is off
                others.update(("cl_max_rows", "warmup_epochs", "cl_negatives"))
                if self.noise_std == 0 and self.cl_weight != 0:
                    others.add("cl_weight")
                if self.cl_weight == 0 and self.noise_std != 0:
                    others.add("noise_std")
        if self.model == "lares":
            if self.tla_weight == 0 and self.sla_weight == 0:  # no alignment term: its NCE settings are not read
                others.update(("align_tau", "align_sim", "sla_exclude_final"))
            elif self.sla_weight == 0:
                others.add("sla_exclude_final")
        return {name: getattr(self, name) for name in sorted(others) if getattr(self, name) != defaults[name]}
