"""One full-ranking trainer for SASRec, GRU4Rec, ReaRec and LARES, on accelerate.

* Any number of processes (``accelerate launch``): the loader is prepared with ``split_batches=True``
  so ``batch_size`` is the GLOBAL batch, each process sees its slice, and the prepared (DDP) model
  averages gradients. Summed per-position losses are divided by the global number of loss positions
  divided by the number of processes, so 2 processes give the same update as 1 with the same batch.
  In-batch negatives of the contrastive terms (PRL RCL, LARES TLA/SLA) are NOT gathered across
  processes: each process contrasts within its own slice (documented deviation; with one process
  nothing changes). LARES's random depths and initial states (SPT, the filter, RPT) are keyed draws
  (seed, epoch, global step, row), so with dropout off its phases give the same weights on any number
  of processes; dropout masks are drawn per process.
* Early stopping on a validation metric (``ndcg@10`` by default); the best weights of a phase are
  kept as ``<phase>/best.safetensors``; ``<phase>/last.safetensors`` + ``last_optim.pt`` +
  ``state.json`` are written every epoch so an interrupted run resumes where it stopped.
* Evaluation ranks ALL items for every row (no sampled negatives), does not mask history items unless
  ``mask_history``; metrics come from :mod:`llmrec.evaluation.metrics` (ties: smaller id first).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from llmrec.data.canonical import atomic_write_json, give_saved_weights_default_permissions, replace_durably
from llmrec.safetensors_io import load_safetensors
from llmrec.seqrec.data import EvalRows, SameTargetPool, SeqRecData, SplitRows
from llmrec.seqrec.keyed_random import row_keys
from llmrec.seqrec.models import EVAL_STATE, FILTER_STATE, LARES, LossContext, SeqRecModel
from llmrec.tensorboard_log import ScalarLog

logger = logging.getLogger(__name__)


@dataclass
class PhaseResult:
    """Outcome of one training phase."""

    name: str
    best_epoch: int = -1
    best_valid: dict[str, float] = field(default_factory=dict)
    epochs_run: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


def make_accelerator(seed: int):
    """An Accelerator whose loaders split each global batch across processes."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from llmrec.distributed import accelerator_kwargs

    # cpu=True when there is no accelerator: accelerate then turns a multi-process launch (WORLD_SIZE > 1)
    # into gloo MULTI_CPU; without it the launched processes would each train alone.
    acc = Accelerator(
        **accelerator_kwargs(),
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
    )
    set_seed(seed)
    return acc


def _without_loader_padding(batch: dict, remainder: int, process_index: int) -> dict:
    """The epoch's short last batch without the rows accelerate adds to it.

    With several processes (``split_batches``, even batches) accelerate completes a short last batch of
    ``remainder`` examples with examples from the start of the epoch, so that every process gets the same number
    of rows; process ``p`` holds the global rows ``p * local .. (p + 1) * local - 1``. Those beyond ``remainder``
    get no target (no loss position, not counted in the loss normaliser; the models' row-level terms skip rows
    without a last target), so every train row is still one loss position exactly once, as on one process.
    """
    tgt = batch["target_ids"]
    position = process_index * len(tgt) + torch.arange(len(tgt), device=tgt.device)
    added = position >= remainder
    if not bool(added.any()):
        return batch
    return dict(batch, target_ids=tgt.masked_fill(added[:, None], 0))


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    give_saved_weights_default_permissions(tmp)
    replace_durably(tmp, path)


def _last_paths(pdir: Path, slot: int | None) -> tuple[Path, Path]:
    """The weights and optimiser files of checkpoint slot 0/1 (None: the single files of the older layout)."""
    suffix = "" if slot is None else f"-{slot}"
    return pdir / f"last{suffix}.safetensors", pdir / f"last_optim{suffix}.pt"


def checkpoint_remedy(output_dir: Path) -> str:
    """The way out of a damaged checkpoint of the run in ``output_dir``: it cannot be resumed, only retrained."""
    return (f"it is a checkpoint of the run in {output_dir}: train the run again from scratch (resume: false, "
            "i.e. --resume false) or in another output_dir")


def _load_weights(model: torch.nn.Module, path: Path, remedy: str | None = None) -> None:
    """Load ``path`` into ``model``; a damaged file is a ``SafetensorsFileError`` naming it (and ``remedy``)."""
    model.load_state_dict(load_safetensors(path, remedy=remedy))


def _load_optimizer_state(path: Path, remedy: str) -> dict:
    """The optimiser state saved beside a ``last-*.safetensors``; a damaged file is a ``ValueError`` naming it.

    torch.load reports a truncated or foreign file as a bare RuntimeError ("failed finding central directory"),
    EOFError, KeyError or OSError ("Invalid argument"), naming no file.
    """
    import pickle

    if not path.is_file():
        raise FileNotFoundError(f"{path}: optimiser checkpoint not found; {remedy}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, pickle.UnpicklingError) as e:
        # (OSError: a short file can make torch's zip reader fail with EINVAL, naming no file)
        first = str(e).split(". ")[0][:160]  # torch's RuntimeError goes on for several sentences about trust
        problem = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise ValueError(f"{path}: damaged or not an optimiser checkpoint ({problem}); {remedy}") from None


def _restore_rng(state: dict[str, Any], process_index: int) -> None:
    """Set this process's generators to those a checkpoint's ``state.json`` recorded for it: its own entry of
    ``rng_by_process`` (rank 0's under another process count, a resume that is warned about); older states hold
    rank 0's CPU state and its process's CUDA generators of every device."""
    import torch

    if "rng_by_process" in state:
        entries = state["rng_by_process"]
        own = entries[process_index] if len(entries) > process_index else entries[0]
        torch.set_rng_state(torch.tensor(own["torch_rng"], dtype=torch.uint8))
        if own.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(own["cuda_rng"], dtype=torch.uint8))  # the current device's
        return
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    if state.get("cuda_rng") and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(g, dtype=torch.uint8) for g in state["cuda_rng"]])


# The config's dropout rates of the supervised phase (any of them above 0: the masks are drawn per process).
DROPOUT_FIELDS = ("dropout", "attn_dropout", "input_dropout")


class SeqRecTrainer:
    """Trains one model in one or more phases and evaluates it with full ranking."""

    def __init__(self, cfg: Any, data: SeqRecData, model: SeqRecModel, accelerator, output_dir: Path):
        self.cfg, self.data, self.acc, self.out = cfg, data, accelerator, Path(output_dir)
        self.model = model
        self.wrapped = accelerator.prepare(model)
        self.is_main = accelerator.is_main_process
        self.eval_seconds = 0.0
        self.epochs_trained = 0  # by this process's fit calls (a rerun of a finished run trains none)
        # Process counts of the checkpoints this invocation resumed that differ from its own (see fit).
        self.resumed_from_num_processes: set[int] = set()
        self.eval_rows = 0
        # (file, seconds trained before this invocation, this invocation's start): the run's training time so far is
        # written there after every epoch, so a run killed and resumed reports the whole time (set by run_seqrec)
        self.training_clock: tuple[Path, float, float] | None = None
        tensorboard = self.is_main and getattr(cfg, "report_to", "none") == "tensorboard"
        self.scalars = ScalarLog(self.out / "tensorboard" if tensorboard else None)

    @property
    def checkpoint_remedy(self) -> str:
        """What to do about a damaged checkpoint of this run (appended to the error naming it)."""
        return checkpoint_remedy(self.out)

    @property
    def unwrapped(self) -> SeqRecModel:
        return self.acc.unwrap_model(self.wrapped)

    def _bar(self, it, **kw):
        from tqdm.auto import tqdm

        return tqdm(
            it, disable=not (self.is_main and self.cfg.progress), leave=False, dynamic_ncols=True, **kw
        )

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def ranks(
        self,
        rows: SplitRows,
        depth: int | None = None,
        desc: str = "eval",
        state_key: tuple[int, ...] = (EVAL_STATE,),
        mask_history: bool | None = None,
    ) -> torch.Tensor:
        """0-based full-ranking rank of every row's target (in row order, gathered across processes).

        A LARES initial state that is random at evaluation (``state_init: normal``) is drawn per row from the
        seed, ``state_key`` and the row's index, so the ranks do not depend on the number of processes.
        ``mask_history`` (default: the config's) ranks the row's history items last.
        """
        if mask_history is None:
            mask_history = self.cfg.mask_history
        from llmrec.evaluation.metrics import ranks_from_scores

        model = self.unwrapped
        was_training = model.training
        model.eval()
        loader = self.acc.prepare(
            DataLoader(EvalRows(rows), batch_size=self.cfg.eval_batch_size, shuffle=False)
        )
        all_ranks, all_idx = [], []
        for batch in self._bar(loader, desc=desc):
            ids = batch["input_ids"]
            t0 = time.perf_counter()
            if isinstance(model, LARES):
                scores = model.score(ids, depth, keys=row_keys(batch["index"], self.cfg.seed, *state_key))
            else:
                scores = model.score(ids)
            self.eval_seconds += time.perf_counter() - t0
            self.eval_rows += len(ids)
            # ranks_from_scores never counts a NaN item as higher, so a model scoring NaN (diverged, or NaN weights)
            # got optimistic metrics; evaluate and recommend refuse NaN scores too (scoring.top_k). Such rows are
            # refused after the gather below, on every process at once (one process raising alone would leave the
            # others waiting in the gather); a placeholder score keeps ranks_from_scores from raising first.
            nan_rows = torch.isnan(scores).any(dim=1).long()  # long: gathered over gloo too
            if bool(nan_rows.any()):  # masked_fill, not nan_to_num, which would also make -inf finite
                scores = scores.masked_fill(torch.isnan(scores), 0.0)
            if mask_history:
                hist = torch.zeros_like(scores, dtype=torch.bool)
                valid = ids > 0
                rows_i = torch.arange(len(ids), device=ids.device)[:, None].expand_as(ids)[valid]
                hist[rows_i, ids[valid] - 1] = True
                scores = scores.masked_fill(hist, float("-inf"))
            r = ranks_from_scores(scores, batch["target"] - 1)
            r, idx, nan_rows = self.acc.gather_for_metrics((r, batch["index"], nan_rows))
            if bool(nan_rows.any()):
                bad = idx[nan_rows > 0].tolist()
                raise ValueError(f"the model scored NaN for some items of {rows.name} rows {bad[:5]}"
                                 f"{' ...' if len(bad) > 5 else ''} ({len(bad)} in this batch): its ranks would be "
                                 f"meaningless (diverged training or NaN weights)")
            all_ranks.append(r.cpu())
            all_idx.append(idx.cpu())
        model.train(was_training)
        ranks = torch.cat(all_ranks)
        order = torch.cat(all_idx).argsort()
        return ranks[order]

    def evaluate(self, rows: SplitRows, depth: int | None = None, desc: str = "eval") -> dict[str, float]:
        from llmrec.evaluation.metrics import compute_metrics

        ranks = self.ranks(rows, depth, desc)
        m = compute_metrics(ranks, ks=tuple(self.cfg.ks))
        return {k: float(v) for k, v in m.items()}

    # -- training ----------------------------------------------------------------------------------
    def fit(
        self,
        phase: str,
        examples: Dataset,
        lr: float,
        epochs: int,
        patience: int,
        batch_size: int,
        extra: dict | None = None,
        aug_pool: SameTargetPool | None = None,
    ) -> PhaseResult:
        """Train until ``epochs`` or early stopping; leave the best weights loaded; resumable."""
        cfg, acc = self.cfg, self.acc
        pdir = self.out / phase
        done_file, state_file = pdir / "done.json", pdir / "state.json"
        best_path = pdir / "best.safetensors"  # the phase's result, written when it ends
        # Per-epoch checkpoints alternate between two slots and state.json, written last, names the slot and best
        # file it goes with: a run cut while writing them resumes from the previous complete set, never from new
        # weights with an old state.
        slot: int | None = None
        best_file: str | None = None
        if not cfg.resume and self.is_main:  # training from scratch: an older run's state must not be resumed later
            for f in (done_file, state_file):
                f.unlink(missing_ok=True)
        acc.wait_for_everyone()
        if cfg.resume and done_file.exists() and best_path.exists():
            res = PhaseResult(**json.loads(done_file.read_text()))
            _load_weights(self.unwrapped, best_path, self.checkpoint_remedy)
            logger.info(
                "phase %s already finished (best epoch %d); loaded its best weights", phase, res.best_epoch
            )
            return res
        if batch_size % acc.num_processes:
            raise ValueError(f"batch size {batch_size} is not divisible by {acc.num_processes} processes")
        optim = torch.optim.Adam(self.wrapped.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(examples, batch_size=batch_size, shuffle=True, generator=gen)
        remainder, last_batch = len(examples) % batch_size, -(-len(examples) // batch_size) - 1
        optim, loader = acc.prepare(optim, loader)
        res = PhaseResult(name=phase)
        start_epoch, bad = 0, 0
        if cfg.resume and state_file.exists():
            st = json.loads(state_file.read_text())
            slot, best_file = st.get("slot"), st.get("best_file", "best.safetensors")  # absent: the older layout
            last_path, optim_path = _last_paths(pdir, slot)
            _load_weights(self.unwrapped, last_path, self.checkpoint_remedy)
            optim.load_state_dict(_load_optimizer_state(optim_path, self.checkpoint_remedy))
            res = PhaseResult(**st["result"])
            start_epoch, bad = st["epoch"] + 1, st["bad"]
            before = st.get("num_processes")  # recorded since 2026-12-07
            if before is not None and before != acc.num_processes:
                # Allowed (the global batch is the same), but with dropout each process draws the masks of its share
                # of the batch: the result is neither layout's uninterrupted run (without dropout it is, up to the
                # order of float sums). Said here and recorded in results.json.
                self.resumed_from_num_processes.add(int(before))
                rates = ("rpt_dropout",) if phase == "rpt" else DROPOUT_FIELDS  # LARES's RPT policy has its own
                if any((getattr(cfg, name, None) or 0) > 0 for name in rates):
                    logger.warning("phase %s: resuming a checkpoint trained on %d process(es) on %d: with dropout on, "
                                   "the masks are drawn per process, so the run is neither layout's uninterrupted run",
                                   phase, before, acc.num_processes)
            _restore_rng(st, acc.process_index)
            logger.info("phase %s: resuming at epoch %d", phase, start_epoch)
        metric = cfg.valid_metric
        extra = dict(extra or {}, phase=phase)
        # A run cut between its early stop and done.json resumes to the end, not into one more epoch.
        for epoch in range(start_epoch, epochs if bad < patience else start_epoch):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            self.wrapped.train()
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            n_batches = 0
            bar = self._bar(loader, desc=f"{phase} epoch {epoch + 1}/{epochs}")
            for batch in bar:
                if n_batches == last_batch and remainder:
                    batch = _without_loader_padding(batch, remainder, acc.process_index)
                local = (batch["target_ids"] > 0).sum().float()
                # The global count's floor of 1 before the split over processes: a short last batch with fewer
                # loss positions than processes (rows mode, RPT) had its gradient scaled down by the floor (review).
                denom = acc.reduce(local, reduction="sum").clamp_min(1.0) / acc.num_processes
                # This process's part of the batch's loss positions: its logged terms (means over its own rows) are
                # weighted by it, so their sum over processes is the batch's mean that 1 process logs.
                share = float(local) / float(denom * acc.num_processes) if acc.num_processes > 1 else 1.0
                ctx = LossContext(
                    denom=denom,
                    epoch=epoch,
                    aug_pool=aug_pool,
                    extra=extra,
                    seed=cfg.seed,
                    step=n_batches,
                )
                loss, logs = self.wrapped(batch, ctx)
                acc.backward(loss)
                optim.step()
                optim.zero_grad(set_to_none=True)
                logs["loss"] = loss.detach().item()
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + (v if k == "loss" else v * share)
                n_batches += 1
                if self.is_main and cfg.progress:
                    bar.set_postfix(loss=f"{logs['loss']:.4f}")
                if cfg.max_train_batches and n_batches >= cfg.max_train_batches:
                    break
            secs = time.perf_counter() - t0
            if acc.num_processes > 1 and sums:
                # Each process's loss is its share of the batch loss (local sum over global count / processes):
                # their mean is the batch loss 1 process computes. Every other term was weighted by the process's
                # share of the loss positions above: their sum is the batch's mean (exact for the means over loss
                # positions, as CE; a weighted mean of the processes' values for the others). Logged was rank 0's
                # value alone (reviews).
                # The union of the processes' keys: a process whose rows were all the loader's filler (an epoch of
                # one short batch) logs no alignment terms, and lists of other lengths hung the reduce (a review).
                # Its share of those terms is 0, which is what it adds.
                from accelerate.utils import gather_object

                keys = sorted(set().union(*gather_object([sorted(sums)])))
                summed = acc.reduce(torch.tensor([sums.get(k, 0.0) for k in keys], device=acc.device),
                                    reduction="sum").tolist()
                sums = {k: v / acc.num_processes if k == "loss" else v for k, v in zip(keys, summed)}
            res.epoch_seconds.append(secs)
            res.epochs_run = epoch + 1
            self.epochs_trained += 1
            entry: dict[str, Any] = {"epoch": epoch + 1, "seconds": round(secs, 3)}
            entry.update({k: round(v / max(n_batches, 1), 5) for k, v in sums.items()})
            improved = False
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == epochs:
                valid = self.evaluate(self.data.valid, desc="valid")
                entry["valid"] = valid
                if metric not in valid:
                    raise ValueError(f"valid_metric {metric!r} not among the metrics {sorted(valid)}")
                if not res.best_valid or valid[metric] > res.best_valid[metric]:
                    res.best_valid, res.best_epoch, bad, improved = valid, epoch + 1, 0, True
                else:
                    bad += 1
            res.history.append(entry)
            self.scalars.add(phase, {k: v for k, v in entry.items() if k != "epoch"}, epoch + 1)
            # Each process's own generators, which its dropout draws from (on a GPU, its device's CUDA generator):
            # gathered, so that each process resumes its own. Rank 0's alone, restored everywhere, reset the other
            # GPUs' generators to the seed's start (rank 0's process never draws on them; a review).
            rng = {"torch_rng": torch.get_rng_state().tolist(),
                   "cuda_rng": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}
            if acc.num_processes > 1:
                from accelerate.utils import gather_object

                rng_by_process = gather_object([rng])
            else:
                rng_by_process = [rng]
            if self.is_main:
                logger.info(
                    "%s epoch %d: loss %.4f  valid %s %.4f  (%.1fs)%s",
                    phase,
                    epoch + 1,
                    entry.get("loss", float("nan")),
                    metric,
                    entry.get("valid", {}).get(metric, float("nan")),
                    secs,
                    "  *best*" if improved else "",
                )
                if improved:  # into the file the current state does not name
                    best_file = "best-1.safetensors" if best_file == "best-0.safetensors" else "best-0.safetensors"
                    _save_weights(self.unwrapped, pdir / best_file)
                slot = 0 if slot != 0 else 1
                last_path, optim_path = _last_paths(pdir, slot)
                _save_weights(self.unwrapped, last_path)
                tmp = optim_path.with_name(optim_path.name + ".tmp")
                torch.save(optim.state_dict(), tmp)
                replace_durably(tmp, optim_path)
                if self.training_clock is not None:  # before the state that marks the epoch finished: a run cut
                    # between the two retrains the epoch and counts its time twice (time spent), never zero times
                    clock_file, before, started = self.training_clock
                    atomic_write_json(clock_file, {"seconds": before + time.perf_counter() - started})
                atomic_write_json(
                    state_file,
                    {
                        "epoch": epoch,
                        "bad": bad,
                        "slot": slot,
                        "best_file": best_file,
                        "result": res.__dict__,
                        "num_processes": acc.num_processes,
                        "rng_by_process": rng_by_process,
                    },
                )
            acc.wait_for_everyone()
            if bad >= patience:
                logger.info("%s: early stop after epoch %d (best epoch %d)", phase, epoch + 1, res.best_epoch)
                break
        acc.wait_for_everyone()
        # Rank 0 wrote the checkpoints: every rank reads which best file its last state names.
        if state_file.exists():
            best_file = json.loads(state_file.read_text()).get("best_file", "best.safetensors")
        if best_file and (pdir / best_file).exists():
            _load_weights(self.unwrapped, pdir / best_file, self.checkpoint_remedy)
            if self.is_main:
                _save_weights(self.unwrapped, best_path)
        if self.is_main:
            atomic_write_json(done_file, res.__dict__)
        acc.wait_for_everyone()
        return res

    # -- LARES between-phase filter ----------------------------------------------------------------
    @torch.no_grad()
    def lares_filter(self, candidates: np.ndarray | None = None) -> np.ndarray:
        """Keep a train row if its target is in the top-``filter_topk`` in ANY of ``filter_passes``
        eval-mode passes with a random initial state (the official filter); returns a row mask. A model
        trained with ``state_init: zero`` is filtered in one pass from zeros, the state it knows.

        ``candidates`` (row indices) restricts the passes to those rows (others are not kept): with an
        RPT row budget, filtering a random candidate subset costs a fraction of all train rows.
        """
        model = self.unwrapped
        assert isinstance(model, LARES)
        tr = self.data.train_rows
        idx = np.arange(len(tr)) if candidates is None else np.sort(candidates)
        sub = SplitRows(
            "train",
            tr.inputs[idx],
            tr.targets[idx],
            [tr.histories[i] for i in idx],
            [tr.user_ids[i] for i in idx],
        )
        saved = model.state_init
        # Random T0 even in eval mode: the passes differ through it. A model trained from zeros
        # ('zero') is filtered from zeros, as it was trained; its passes would all agree, so one runs.
        passes = 1 if saved == "zero" else self.cfg.filter_passes
        if saved != "zero":
            model.state_init = "normal"
        try:
            hit = torch.zeros(len(idx), dtype=torch.bool)
            for p in range(passes):
                # Unmasked, as RPT's rank reward is (mask_history is an evaluation choice): masked, every row
                # whose target repeats a history item was dropped from RPT (review).
                ranks = self.ranks(sub, desc=f"filter pass {p + 1}", state_key=(FILTER_STATE, p), mask_history=False)
                hit |= ranks < self.cfg.filter_topk
        finally:
            model.state_init = saved
        keep = np.zeros(len(tr), dtype=bool)
        keep[idx[hit.numpy()]] = True
        return keep
