"""Reference number for the ID baselines: RecBole 1.2's SASRec on ML-100K, the protocol of recipes/seqrec/*_ml100k.yaml.

Runs in its own virtual environment (RecBole pins old libraries; it is not a dependency of llmrec). RecBole 1.2.0
uses ``np.float_``, removed in NumPy 2, hence numpy < 2 and a pandas that accepts it; its model registry imports
kmeans_pytorch, which it does not declare:

    python3 -m venv /work/recbole-venv
    /work/recbole-venv/bin/pip install torch==2.13.0 recbole==1.2.0 "numpy<2" "pandas<2.3" kmeans-pytorch
    /work/recbole-venv/bin/python scripts/recbole_sasrec_ml100k.py --data ../shared/data --seed 42 \
        --output benchmarks/results/recbole_sasrec_ml100k_seed42.json

Protocol (as llmrec's ML-100K recipes): leave-one-out by time (``LS: valid_and_test``, order ``TO``), history 50,
hidden 64, 2 layers, 2 heads, inner 256, dropout 0.5, full-softmax CE, full ranking over all items, selection on
validation NDCG@10 with patience 10. RecBole's full-ranking evaluation masks the items of the user's training
history; llmrec's protocol does not, so the masking is switched off here unless ``--mask-history`` is given (the
JSON records which). Writes one JSON object with the test metrics, the epochs run and the seconds per epoch.

RecBole trains every prefix as its own sample (the issue quotes ~110 s per epoch; the recorded runs here took
250-390 s, their ``epoch_s`` including each epoch's validation and checkpoint, which llmrec's excludes: ~0.3% of
its epoch; often 50+ epochs), so the run is resumable:
after every epoch the model, optimiser, early-stopping state and all random states (global torch, numpy, python,
the training loader's shuffling generator) go to ``--work-dir/latest.pth`` (RecBole's own pickle format: this
script runs RecBole as a reference, in its own venv); a rerun with the same arguments continues from there with
that state restored (meant to match an uninterrupted run; not checked bitwise). A finished ``--output`` is not
redone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data", help="directory holding ml-100k_recbole/")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--stopping-step", type=int, default=10)
    ap.add_argument("--mask-history", action="store_true", help="RecBole's default: training items score -inf")
    ap.add_argument("--output", required=True)
    ap.add_argument("--work-dir", default=None,
                    help="checkpoints for resuming (default: <repo>/runs/recbole_sasrec_ml100k_seed<seed>)")
    args = ap.parse_args()
    if Path(args.output).exists():
        print(f"{args.output} exists: finished earlier, nothing to do")
        return 0
    default_work = Path(__file__).resolve().parent.parent / "runs" / f"recbole_sasrec_ml100k_seed{args.seed}"
    work_dir = Path(args.work_dir).resolve() if args.work_dir else default_work
    work_dir.mkdir(parents=True, exist_ok=True)
    output, data_dir = Path(args.output).resolve(), Path(args.data).resolve()
    # RecBole writes log/ and log_tensorboard/ into the working directory: keep them beside the checkpoints.
    os.chdir(work_dir)

    import numpy as np
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(tempfile.mkdtemp(prefix="recbole_"))
    # RecBole reads <data_path>/<dataset>/<dataset>.inter: point it at a link named ml-100k.
    (work / "ml-100k").symlink_to(data_dir / "ml-100k_recbole")
    cfg = {
        "data_path": str(work), "dataset": "ml-100k", "checkpoint_dir": str(work / "saved"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "MAX_ITEM_LIST_LENGTH": 50, "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2,
        "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        "initializer_range": 0.02, "loss_type": "CE", "train_neg_sample_args": None,
        "learning_rate": 0.001, "train_batch_size": 2048, "eval_batch_size": 4096, "epochs": args.epochs,
        "stopping_step": args.stopping_step, "metrics": ["Hit", "NDCG", "MRR"], "topk": [10, 20],
        "valid_metric": "NDCG@10", "seed": args.seed, "reproducibility": True, "device": "cpu",
        "show_progress": False, "log_wandb": False,
    }
    config = Config(model="SASRec", dataset="ml-100k", config_dict=cfg)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = SASRec(config, train_data.dataset).to(config["device"])
    class NoMaskTrainer(Trainer):
        """RecBole's trainer with the evaluation's history masking switched off (llmrec's protocol)."""

        def _full_sort_batch_eval(self, batched_data):
            interaction, _history_index, positive_u, positive_i = batched_data
            return super()._full_sort_batch_eval((interaction, None, positive_u, positive_i))

    trainer = (Trainer if args.mask_history else NoMaskTrainer)(config, model)
    trainer.saved_model_file = str(work_dir / "best.pth")  # RecBole saves the best-validation model here
    latest = work_dir / "latest.pth"
    setup = {"seed": args.seed, "stopping_step": args.stopping_step,
             "mask_history": bool(args.mask_history)}
    prior_s, resumed_at, stopped = 0.0, [], False
    if latest.exists():
        state = torch.load(latest, map_location="cpu", weights_only=False)
        if state["setup"] != setup:
            sys.exit(f"{latest} was written with {state['setup']}, this run asks for {setup}: "
                     "use another --work-dir or delete it")
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.start_epoch = state["epoch"] + 1
        trainer.cur_step, trainer.best_valid_score = state["cur_step"], state["best_valid_score"]
        trainer.best_valid_result = state["best_valid_result"]
        trainer.train_loss_dict = state["train_loss_dict"]
        train_data.generator.set_state(state["loader_rng"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        prior_s, resumed_at, stopped = state["train_s"], state["resumed_at"] + [trainer.start_epoch], state["stopped"]
        print(f"resuming from {latest} at epoch {trainer.start_epoch} (best valid NDCG@10 "
              f"{trainer.best_valid_score:.4f}, {trainer.cur_step} epochs without improvement)", flush=True)
    t0 = time.perf_counter()

    def save_latest(epoch_idx: int, valid_score: float) -> None:
        """After each epoch's validation: everything a rerun needs to continue exactly here (written atomically)."""
        state = {
            "setup": setup, "epoch": epoch_idx, "cur_step": trainer.cur_step,
            "best_valid_score": trainer.best_valid_score, "best_valid_result": trainer.best_valid_result,
            "train_loss_dict": trainer.train_loss_dict, "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(), "loader_rng": train_data.generator.get_state(),
            "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
            "train_s": prior_s + time.perf_counter() - t0, "resumed_at": resumed_at,
            "stopped": trainer.cur_step > trainer.stopping_step,  # RecBole's early_stopping rule
        }
        torch.save(state, work_dir / "latest.tmp")
        os.replace(work_dir / "latest.tmp", latest)
        print(f"epoch {epoch_idx}: valid NDCG@10 {valid_score:.4f} (best {trainer.best_valid_score:.4f}), "
              f"{state['train_s']:.0f} s so far", flush=True)

    if stopped or trainer.start_epoch >= args.epochs:
        best_valid_score, best_valid = trainer.best_valid_score, trainer.best_valid_result
    else:
        best_valid_score, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False,
                                                   callback_fn=save_latest)
    train_s = prior_s + time.perf_counter() - t0
    # RecBole's own load_best_model calls torch.load with torch's weights_only default, which refuses the pickled
    # config in its checkpoint (torch >= 2.6): load the best-validation weights here instead.
    best = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=False)
    trainer.model.load_state_dict(best["state_dict"])
    test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    epochs_run = len(trainer.train_loss_dict)  # one entry per trained epoch
    out = {
        "library": "recbole 1.2.0", "model": "SASRec", "dataset": "ml-100k", "seed": args.seed,
        "protocol": {k: cfg[k] for k in ("eval_args", "MAX_ITEM_LIST_LENGTH", "hidden_size", "inner_size", "n_layers",
                                         "n_heads", "hidden_dropout_prob", "loss_type", "learning_rate",
                                         "train_batch_size", "stopping_step", "valid_metric")},
        "history_masking": bool(args.mask_history),
        "users": int(dataset.user_num) - 1, "items": int(dataset.item_num) - 1,
        "test": {k.lower(): float(v) for k, v in test.items()},
        "best_valid": {k.lower(): float(v) for k, v in best_valid.items()}, "best_valid_ndcg@10": float(best_valid_score),
        "train_seconds": round(train_s, 1), "epochs_run": epochs_run, "resumed_at_epochs": resumed_at,
        "torch_threads": torch.get_num_threads(),
    }
    if epochs_run:
        out["epoch_s"] = round(train_s / epochs_run, 1)  # includes each epoch's validation
    path = output
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, path)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
