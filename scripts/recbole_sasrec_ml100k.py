"""Reference number for the ID baselines: RecBole 1.2's SASRec on ML-100K, the protocol of recipes/seqrec/*_ml100k.yaml.

Runs in its own virtual environment (RecBole pins old libraries; it is not a dependency of llmrec):

    python3 -m venv /work/recbole-venv
    /work/recbole-venv/bin/pip install torch==2.13.0 recbole==1.2.0
    /work/recbole-venv/bin/python scripts/recbole_sasrec_ml100k.py --data ../shared/data --seed 42 \
        --output benchmarks/results/recbole_sasrec_ml100k_seed42.json

Protocol (as llmrec's ML-100K recipes): leave-one-out by time (``LS: valid_and_test``, order ``TO``), history 50,
hidden 64, 2 layers, 2 heads, inner 256, dropout 0.5, full-softmax CE, full ranking over all items, selection on
validation NDCG@10 with patience 10. RecBole's full-ranking evaluation masks the items of the user's training
history; llmrec's protocol does not, so the masking is switched off here unless ``--mask-history`` is given (the
JSON records which). Writes one JSON object with the test metrics, the epochs run and the seconds per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
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
    args = ap.parse_args()

    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(tempfile.mkdtemp(prefix="recbole_"))
    # RecBole reads <data_path>/<dataset>/<dataset>.inter: point it at a link named ml-100k.
    (work / "ml-100k").symlink_to(Path(args.data).resolve() / "ml-100k_recbole")
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
    t0 = time.perf_counter()
    best_valid_score, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    train_s = time.perf_counter() - t0
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
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
        "train_seconds": round(train_s, 1), "epochs_run": epochs_run,
        "torch_threads": torch.get_num_threads(),
    }
    if epochs_run:
        out["epoch_s"] = round(train_s / epochs_run, 1)  # includes each epoch's validation
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, path)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
