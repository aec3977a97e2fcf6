"""Train + select on validation + test one ID model; write ``results.json`` and ``results.md``."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from llmrec.config import to_dict
from llmrec.data.canonical import atomic_write_json, atomic_write_text
from llmrec.data.identity import data_difference, data_sha256
from llmrec.seqrec.config import (
    EXTENDABLE_FIELDS,
    SeqRecConfig,
    split_extension,
    training_field_differences,
    training_fields,
)
from llmrec.seqrec.data import SameTargetPool, load_seqrec_data
from llmrec.seqrec.models import LARES, ReaRec, build_model
from llmrec.seqrec.trainer import SeqRecTrainer, make_accelerator

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
# The run's test rows ranked by `llmrec evaluate --method seqrec` (``llmrec bench seqrec`` writes it for its paired
# intervals): made from the finished run's weights, so it goes with results.json.
TEST_EVAL_DIR = "test_eval"
# In run_config.json of an extended run: the finished run's training seconds, which its results then add to.
TRAIN_S_BEFORE = "train_s_before_extension"
TRAIN_SECONDS_JSON = "train_seconds.json"  # the run's training time up to its last finished epoch


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Set every dropout (hidden, input and attention) of ``model`` to ``p`` (LARES RPT uses 0.1)."""
    from llmrec.seqrec.modules import SelfAttention

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        elif isinstance(m, SelfAttention):
            m.attn_dropout = p


def _protocol(cfg: SeqRecConfig, data, model) -> dict[str, Any]:
    import json

    stats_file = data.directory / "stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    proto = data.protocol()
    proto.update(
        {
            "split": stats.get("options", {}).get("split_mode", "unknown"),
            "eval_rows": stats.get("options", {}).get("eval_rows"),
            "ranking": "full (all items), ties broken by smaller item id",
            "mask_history": cfg.mask_history,
            "valid_metric": cfg.valid_metric,
            "model_selection": "best validation epoch (test never used for selection)",
        }
    )
    if isinstance(model, ReaRec):
        proto["reason_steps_K"] = model.K
        proto["readout"] = "mean(r0..rK)" if model.mode == "erl" else "r_K"
    if isinstance(model, LARES):
        proto["eval_depth"] = model.mean_recurrence
        proto["eval_initial_state"] = "random" if model.state_init == "normal" else "zero"
    return proto


def results_markdown(res: dict[str, Any]) -> str:
    """A small Markdown table of one run's validation/test metrics and timings."""
    ks = [k for k in ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20") if k in res["test"]]
    lines = [
        f"# {res['model']} on {res['protocol']['dataset_dir']}",
        "",
        f"split: {res['protocol']['split']}, history {res['protocol']['max_history']}, "
        f"mask_history {res['protocol']['mask_history']}, train_mode {res['protocol']['train_mode']}",
        "",
        "| split | " + " | ".join(ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for split in ("valid", "test"):
        lines.append(f"| {split} | " + " | ".join(f"{res[split][k]:.4f}" for k in ks) + " |")
    t = res["timings"]
    lines += [
        "",
        f"epochs {t['epochs']} (best: epoch {res['best_epoch']} of phase {res.get('best_phase', 'train')}), {t['epoch_s']:.2f} s/epoch, "
        f"inference {t['infer_ms_per_row']:.3f} ms/row at eval batch {t['eval_batch_size']}",
    ]
    for depth, m in res.get("test_by_depth", {}).items():
        lines.append(f"- test at depth {depth}: ndcg@10 {m['ndcg@10']:.4f} hr@10 {m['hr@10']:.4f}")
    return "\n".join(lines) + "\n"


RUN_CONFIG_JSON = "run_config.json"
def _run_identity(cfg: SeqRecConfig) -> dict[str, Any]:
    """What a run directory's checkpoints were trained with: the training fields and the data (statistics, digest)."""
    stats = Path(cfg.dataset_dir) / "stats.json"
    return {"config": training_fields(to_dict(cfg)),
            "data_stats": json.loads(stats.read_text()) if stats.exists() else None,
            "data_sha256": data_sha256(cfg.dataset_dir)}


def _check_resumable(cfg: SeqRecConfig, out: Path, is_main: bool) -> dict[str, Any]:
    """Refuse to resume (or reuse) checkpoints trained with other settings or data; record this run's identity
    (config, data statistics and digests, :func:`data_sha256`).

    Without this a rerun with, say, another learning rate in the same ``output_dir`` would load the old run's
    weights and report them under the new config; or, with the dataset's files replaced, report weights trained
    on the old data as trained on the new.

    A run asked for with larger stopping rules (:data:`EXTENDABLE_FIELDS`) than it was made with is extended: its
    results are removed, and the trainer trains on from the last epoch of each phase the new rules reopen
    (:func:`plan_extension`).

    Returns the run's identity as recorded in ``run_config.json``.
    """
    path = out / RUN_CONFIG_JSON
    # Training there would replace an `llmrec evaluate` output's results.json (its rankings left beside), or mix
    # with an LLM checkpoint (a review).
    from llmrec.training.finished_runs import refuse_other_kind_of_run

    refuse_other_kind_of_run(out, "`llmrec seqrec train`", own=(RUN_CONFIG_JSON,))
    want = json.loads(json.dumps(_run_identity(cfg)))  # JSON round trip: compare like with like
    raised: dict[str, tuple[Any, Any]] = {}
    plan: dict[str, str] = {}
    if cfg.resume and path.exists():
        have = json.loads(path.read_text())
        # As a finished run is read back: "data/x/" is "data/x", a field newer than the run is its default.
        raised, diff = split_extension(training_field_differences(have["config"], to_dict(cfg)))
        details = [f"{k}={h!r} (asked: {w!r})" for k, (h, w) in diff.items()]
        data = data_difference(have, cfg.dataset_dir, want["data_sha256"])
        if data:
            details.append(data)
        if details:
            lowered = [k for k in diff if k in EXTENDABLE_FIELDS]
            hint = (f" ({', '.join(lowered)} can be raised on a run, not lowered: it may have trained past where the "
                    "smaller value stops)" if lowered else "")
            raise ValueError(f"{out} holds a run made with {', '.join(details)}{hint}; use another output_dir, set "
                             "resume: false to train from scratch there, or remove it")
        if raised:
            plan = plan_extension(out, have["config"], cfg)
        if raised and (out / RESULTS_JSON).exists():  # the finished run's training time, which the extension adds to
            timings = json.loads((out / RESULTS_JSON).read_text()).get("timings", {})
            want[TRAIN_S_BEFORE] = float(timings.get("train_total_s", 0.0))
        elif TRAIN_S_BEFORE in have:  # an extension cut and resumed (or extended again), or rerun when finished
            want[TRAIN_S_BEFORE] = have[TRAIN_S_BEFORE]
    if is_main:
        if not cfg.resume or raised:
            # Training from scratch: the old run's results must not outlive its weights (results.json marks the
            # directory a finished run; cut after a phase, it would stand beside the new run's best weights).
            # Extending: the results are the shorter run's, and its best weights may change.
            for name in (RESULTS_JSON, RESULTS_MD):
                (out / name).unlink(missing_ok=True)
            if (out / TEST_EVAL_DIR).is_dir():
                shutil.rmtree(out / TEST_EVAL_DIR)
        if raised:
            # On disk before any training, so an extension cut at any point resumes as one: a reopened phase is no
            # longer finished, a phase after it has no state to be taken up.
            for phase, how in plan.items():
                (out / phase / "done.json").unlink(missing_ok=True)
                if how == "start over":
                    (out / phase / "state.json").unlink(missing_ok=True)
            logger.info("%s: extending the run made with %s: %s", out,
                        ", ".join(f"{k} {h}" for k, (h, _) in raised.items()),
                        ", ".join(f"{p} {how}" for p, how in plan.items()) or "no phase trains further")
        if not cfg.resume:
            # ... nor its phases' states: each phase forgets its own when it starts, but a run cut before LARES's
            # RPT left the old run's finished RPT phase to be taken up by the next (resumed) run under this config.
            for phase_file in (*out.glob("*/done.json"), *out.glob("*/state.json")):
                phase_file.unlink()
            (out / TRAIN_SECONDS_JSON).unlink(missing_ok=True)
        atomic_write_json(path, want)
    return want


def plan_extension(out: Path, found: dict[str, Any], cfg: SeqRecConfig) -> dict[str, str]:
    """The phases a run asked for with larger stopping rules than ``found`` (its recorded config) reopens:
    ``{phase: "train on" | "start over"}``. A phase trains on from its last epoch when the new ``epochs``/``patience``
    no longer stop it where it stopped; every later phase (LARES's RPT after SPT) starts over, since it began from the
    weights that phase will change.

    Raises where training on would not give the run the larger rules make from scratch, or could not run: a phase
    that ran all its epochs validated the last because it was the last (off the ``eval_every`` schedule, a
    validation the longer run does not make, in its early-stopping state); a finished phase without its last
    state or checkpoint.
    """
    from llmrec.seqrec.trainer import _last_paths

    plan: dict[str, str] = {}
    for phase, epochs_field, patience_field in (("train", "epochs", "patience"), ("rpt", "rpt_epochs", "rpt_patience")):
        pdir = out / phase
        done, state = pdir / "done.json", pdir / "state.json"
        if plan:  # an earlier phase trains on
            if done.exists() or state.exists():
                plan[phase] = "start over"
            continue
        if not state.exists():
            if done.exists():
                raise ValueError(f"{out}: the {phase} phase is finished but has no {state.name} to train on from; "
                                 "train from scratch (resume: false) or in another output_dir")
            continue
        st = json.loads(state.read_text())
        epochs, patience = getattr(cfg, epochs_field), getattr(cfg, patience_field)
        old = found.get(epochs_field)
        # Checked before "the new rules stop it where it stopped": an early stop that this off-schedule validation
        # made (its bad count reaching patience) is one the longer run never makes, so it would train on.
        if isinstance(old, int) and epochs > old and st["epoch"] + 1 == old and old % cfg.eval_every:
            raise ValueError(f"{out}: {epochs_field} cannot be raised from {old} to {epochs}: the {phase} phase ran all "
                             f"{old} epochs and validated the last because it was the last (eval_every "
                             f"{cfg.eval_every}), which a run of {epochs} epochs does not, so its early-stopping state "
                             "is not that run's; train from scratch (resume: false) or in another output_dir")
        if st["bad"] >= patience or st["epoch"] + 1 >= epochs:
            continue  # the new rules stop it where it stopped
        missing = [p.name for p in _last_paths(pdir, st.get("slot")) if not p.exists()]
        if missing:
            raise ValueError(f"{out}: the {phase} phase cannot train on: its last checkpoint ({', '.join(missing)} in "
                             f"{pdir}) is missing; train from scratch (resume: false) or in another output_dir")
        plan[phase] = "train on"
    return plan


def run_seqrec(cfg: SeqRecConfig, *, concurrent_runs: int = 1) -> dict[str, Any]:
    """Run one configuration end to end (resumable); return the results dict (also written to disk).

    ``num_threads`` > 0 sets torch's intra-op threads for the run only: the caller's setting is restored after it
    (the pipeline's ``--in-process`` stages and the tests run several stages in one process). ``concurrent_runs``
    is recorded with the timings: how many runs the caller trains at once on this machine (``bench seqrec --jobs``).
    """
    if not cfg.dataset_dir:
        raise ValueError("dataset_dir is required (a directory written by `llmrec data prepare`)")
    if cfg.report_to == "tensorboard":  # here, not in the config: a finished run's config must load without it
        from llmrec.tensorboard_log import require_tensorboard

        require_tensorboard()
    if cfg.num_threads <= 0:
        return _run_seqrec(cfg, concurrent_runs)
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _run_seqrec(cfg, concurrent_runs)
    finally:
        torch.set_num_threads(previous)


def _run_seqrec(cfg: SeqRecConfig, concurrent_runs: int = 1) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    acc = make_accelerator(cfg.seed)
    # Every batch is split evenly over the processes: checked before any work (RPT's came after all of SPT).
    sizes = ["batch_size", "eval_batch_size"] + (["rpt_batch_size"] if cfg.model == "lares" and cfg.rpt_epochs else [])
    uneven = [f"{name} {getattr(cfg, name)}" for name in sizes if getattr(cfg, name) % acc.num_processes]
    if uneven:
        raise ValueError(f"{', '.join(uneven)}: not divisible by the {acc.num_processes} processes "
                         "(each batch is split evenly across them)")
    # The data first: a missing or bad dataset must fail before the run directory is claimed (run_config.json).
    data = load_seqrec_data(cfg.dataset_dir, cfg.max_history, cfg.train_mode, cfg.window_stride)
    identity = _check_resumable(cfg, out, acc.is_main_process)
    model = build_model(cfg, data.num_items)
    trainer = SeqRecTrainer(cfg, data, model, acc, out)
    t_start = time.perf_counter()
    # The training time of the invocations before this one (each epoch's end recorded it): a killed and resumed run
    # reported only its last invocation's time (a review). An extension made before the file existed has the
    # extended run's time in its identity.
    clock_file = out / TRAIN_SECONDS_JSON
    seconds_before = (float(json.loads(clock_file.read_text())["seconds"]) if cfg.resume and clock_file.exists()
                      else float(identity.get(TRAIN_S_BEFORE, 0.0)))
    trainer.training_clock = (clock_file, seconds_before, t_start)
    pool = SameTargetPool(data.train_rows) if isinstance(model, LARES) else None
    phases = [
        trainer.fit("train", data.train, cfg.lr, cfg.epochs, cfg.patience, cfg.batch_size, aug_pool=pool)
    ]
    extra: dict[str, Any] = {}
    if isinstance(model, LARES) and cfg.rpt_epochs > 0:
        import numpy as np

        rng = np.random.default_rng(cfg.seed)
        candidates = None
        n_rows = len(data.train_rows)
        if cfg.rpt_max_rows and 3 * cfg.rpt_max_rows < n_rows:
            # Budget cap (CPU): filter a random candidate subset (3x the budget) instead of every row.
            candidates = rng.choice(n_rows, 3 * cfg.rpt_max_rows, replace=False)
            extra["rpt_filter_candidates"] = len(candidates)
        # Seeded at each phase boundary: a run resumed after SPT filters the same rows, and starts RPT from the
        # same random state, as an uninterrupted one.
        torch.manual_seed(cfg.seed + 1)
        keep = trainer.lares_filter(candidates)
        extra["rpt_rows_kept"] = int(keep.sum())
        if cfg.rpt_max_rows and keep.sum() > cfg.rpt_max_rows:
            # Budget cap (CPU): a seeded random subset of the kept rows.
            kept = np.nonzero(keep)[0]
            chosen = rng.choice(kept, cfg.rpt_max_rows, replace=False)
            keep = np.zeros_like(keep)
            keep[chosen] = True
            extra["rpt_rows_used"] = int(keep.sum())
        extra["rpt_rows_total"] = len(keep)
        logger.info("LARES filter kept %d / %d train rows for RPT", keep.sum(), len(keep))
        if not keep.any():
            # Nothing to reinforce (a small filter_topk or candidate budget): the SPT model is the result. RPT's
            # loader failed on the empty set after the whole SPT phase, and again on every rerun (review).
            logger.warning("LARES filter kept no train row (filter_topk %d): RPT skipped, the SPT model is the result",
                           cfg.filter_topk)
            extra["selected_phase"] = "spt"
        else:
            model.rpt = {
                "group": cfg.rpt_group,
                "beta": cfg.rpt_beta,
                "reward": cfg.rpt_reward,
                "reward_k": cfg.rpt_reward_k,
            }
            model.make_reference()
            spt_valid = phases[0].best_valid
            set_dropout(model, cfg.rpt_dropout)
            torch.manual_seed(cfg.seed + 2)
            rpt = trainer.fit(
                "rpt", data.rows_examples(keep), cfg.rpt_lr, cfg.rpt_epochs, cfg.rpt_patience, cfg.rpt_batch_size
            )
            phases.append(rpt)
            # Model selection on validation only: keep the SPT weights if RPT never beat them.
            if not rpt.best_valid or rpt.best_valid[cfg.valid_metric] <= spt_valid[cfg.valid_metric]:
                from llmrec.seqrec.trainer import _load_weights

                _load_weights(trainer.unwrapped, out / "train" / "best.safetensors", trainer.checkpoint_remedy)
                extra["selected_phase"] = "spt"
            else:
                extra["selected_phase"] = "rpt"
    train_s = time.perf_counter() - t_start
    previous = out / RESULTS_JSON
    if trainer.epochs_trained == 0 and previous.exists():
        # A rerun of a finished run trains nothing: keep the training time it recorded (it was overwritten with
        # this rerun's ~0 s, which the pipeline report then showed as the model's training time; review)
        train_s = float(json.loads(previous.read_text()).get("timings", {}).get("train_total_s", train_s))
    else:  # the earlier invocations' (a resumed run) or the extended run's training time first
        train_s += seconds_before
    best = (
        max(phases, key=lambda p: p.best_valid.get(cfg.valid_metric, -1.0)) if len(phases) > 1 else phases[0]
    )
    if extra.get("selected_phase") == "spt":
        best = phases[0]
    trainer.scalars.close()  # training is over: the test split is not logged
    trainer.eval_seconds, trainer.eval_rows = 0.0, 0
    test = trainer.evaluate(data.test, desc="test")
    infer_ms = 1000 * trainer.eval_seconds / max(trainer.eval_rows, 1)
    res: dict[str, Any] = {
        "model": cfg.model,
        "seed": cfg.seed,
        "protocol": _protocol(cfg, data, model),
        "best_epoch": best.best_epoch,  # counted within best_phase
        "best_phase": best.name,
        "valid": best.best_valid,
        "test": test,
        "timings": {
            "epochs": sum(p.epochs_run for p in phases),
            # The first phase's (the supervised training every model has): LARES's RPT epochs are another kind of
            # work (rollouts over a capped row set) and are in epoch_s_by_phase. Until 2026-12-03 this averaged all.
            "epoch_s": sum(phases[0].epoch_seconds) / max(len(phases[0].epoch_seconds), 1),
            "epoch_s_by_phase": {p.name: sum(p.epoch_seconds) / max(len(p.epoch_seconds), 1) for p in phases},
            "train_total_s": train_s,
            "infer_ms_per_row": infer_ms,
            "eval_batch_size": cfg.eval_batch_size,
            "num_processes": acc.num_processes,
            # a checkpoint trained on other process counts was resumed (see SeqRecTrainer.fit)
            **({"num_processes_before_resume": sorted(trainer.resumed_from_num_processes)}
               if trainer.resumed_from_num_processes else {}),
            "torch_threads": torch.get_num_threads(),
            "concurrent_runs": concurrent_runs,
        },
        "phases": [p.__dict__ for p in phases],
        "config": to_dict(cfg),
        # the data the weights were trained and tested on: a finished run is reused only for the same files
        "data_sha256": identity["data_sha256"],
    }
    res.update(extra)
    if isinstance(model, LARES) and cfg.test_depths:
        res["test_by_depth"] = {
            str(d): trainer.evaluate(data.test, depth=d, desc=f"test depth {d}") for d in cfg.test_depths
        }
    if acc.is_main_process:
        markdown = results_markdown(res)  # rendered first: a failure must not leave a results.json behind
        # results.json last: it is what marks the run finished (a kill between the two left no results.md, and a
        # pipeline that found results.json never wrote it)
        atomic_write_text(out / RESULTS_MD, markdown)
        atomic_write_json(out / RESULTS_JSON, res)
        logger.info("test: %s", {k: round(v, 4) for k, v in test.items() if k.endswith("@10")})
    acc.wait_for_everyone()
    return res
