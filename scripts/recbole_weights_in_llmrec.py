"""Load a RecBole 1.2 SASRec checkpoint into llmrec's SASRec: the check that the two models and evaluations agree.

If llmrec's SASRec computes the same function as RecBole's and llmrec's evaluator ranks like RecBole's, then RecBole's
trained weights, evaluated by llmrec, give RecBole's own validation and test numbers. Any gap between the libraries
that remains is then in training, not in the model or the metrics.

Runs in RecBole's venv (the one of ``scripts/recbole_sasrec_ml100k.py``, plus ``pip install safetensors``): it needs
RecBole to unpickle the checkpoint and to rebuild the dataset's token <-> id mapping. It writes an llmrec seqrec run
directory (``results.json`` with the recipe's config, ``train/best.safetensors``) that llmrec then evaluates:

    /path/to/recbole-venv/bin/python scripts/recbole_weights_in_llmrec.py runs/recbole_seed43/best.pth \\
        --dataset-dir data/ml100k --output runs/recbole_in_llmrec_seed43
    llmrec evaluate --config recipes/games/eval.yaml --method seqrec --checkpoint runs/recbole_in_llmrec_seed43 \\
        --dataset data/ml100k --split test --max_rows 0 --output_dir runs/recbole_in_llmrec_seed43/eval_test

Item ids: RecBole numbers items in its own order; each of llmrec's catalogue items (``raw_id``) takes the embedding
row of the same RecBole token. Attention: RecBole's separate query/key/value become llmrec's fused ``qkv``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

LAYER_KEYS = {  # llmrec name <- RecBole name, per Transformer layer
    "attn.out": "multi_head_attention.dense",
    "ln1": "multi_head_attention.LayerNorm",
    "fc1": "feed_forward.dense_1",
    "fc2": "feed_forward.dense_2",
    "ln2": "feed_forward.LayerNorm",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="RecBole's best.pth (scripts/recbole_sasrec_ml100k.py writes it)")
    ap.add_argument("--dataset-dir", required=True, help="llmrec's prepared ML-100K (its catalog.jsonl maps the ids)")
    ap.add_argument("--data", default="../shared/data", help="directory holding ml-100k_recbole/ (RecBole's input)")
    ap.add_argument("--recipe", default="recipes/seqrec/sasrec_ml100k.yaml", help="llmrec recipe of the same sizes")
    ap.add_argument("--output", required=True, help="the llmrec run directory to write")
    args = ap.parse_args()

    import torch
    import yaml
    from recbole.config import Config
    from recbole.data import create_dataset
    from safetensors.torch import save_file

    out = Path(args.output)
    if (out / "results.json").exists():
        sys.exit(f"{out} exists; remove it to convert again")
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)  # RecBole pickles its Config
    sd, rb_cfg = state["state_dict"], state["config"]
    cfg = yaml.safe_load(Path(args.recipe).read_text())
    for ours, theirs in (("hidden_size", "hidden_size"), ("n_layers", "n_layers"), ("n_heads", "n_heads"),
                         ("inner_size", "inner_size"), ("max_history", "MAX_ITEM_LIST_LENGTH")):
        if cfg[ours] != rb_cfg[theirs]:
            sys.exit(f"{args.recipe}: {ours} = {cfg[ours]} but the RecBole model has {theirs} = {rb_cfg[theirs]}")

    work = Path(tempfile.mkdtemp(prefix="recbole_"))
    (work / "ml-100k").symlink_to(Path(args.data).resolve() / "ml-100k_recbole")
    dataset = create_dataset(Config(model="SASRec", dataset="ml-100k", config_dict={
        "data_path": str(work), "dataset": "ml-100k", "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": rb_cfg["MAX_ITEM_LIST_LENGTH"], "train_neg_sample_args": None, "loss_type": "CE"}))
    token_to_id = dataset.field2token_id["item_id"]

    catalogue = [json.loads(line) for line in (Path(args.dataset_dir) / "catalog.jsonl").open(encoding="utf-8")]
    rb_emb = sd["item_embedding.weight"]
    emb = torch.zeros(len(catalogue) + 1, rb_emb.shape[1])
    emb[0] = rb_emb[0]  # padding row (never scored, never attended to)
    for item in catalogue:
        if item["raw_id"] not in token_to_id:
            sys.exit(f"{args.dataset_dir}/catalog.jsonl: item {item['raw_id']} is not in RecBole's dataset")
        emb[item["item_id"]] = rb_emb[token_to_id[item["raw_id"]]]
    weights = {"backbone.item_emb.weight": emb, "backbone.pos_emb.weight": sd["position_embedding.weight"],
               "backbone.in_ln.weight": sd["LayerNorm.weight"], "backbone.in_ln.bias": sd["LayerNorm.bias"]}
    for i in range(cfg["n_layers"]):
        theirs, ours = f"trm_encoder.layer.{i}.", f"backbone.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            weights[f"{ours}attn.qkv.{kind}"] = torch.cat(
                [sd[f"{theirs}multi_head_attention.{p}.{kind}"] for p in ("query", "key", "value")])
            for mine, rb in LAYER_KEYS.items():
                weights[f"{ours}{mine}.{kind}"] = sd[f"{theirs}{rb}.{kind}"]

    tmp = out.with_name(out.name + ".tmp")
    (tmp / "train").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "train" / "best.safetensors"))
    cfg.update(dataset_dir=str(args.dataset_dir), output_dir=str(out))
    results = {"config": cfg, "source": {"library": "recbole", "checkpoint": str(args.checkpoint), "seed": rb_cfg["seed"],
                                         "epoch": state.get("epoch"), "best_valid_score": state.get("best_valid_score")}}
    (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out} (RecBole epoch {state.get('epoch')}, its best valid score {state.get('best_valid_score')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
