"""SFT with latent tokens (llmrec.training.sft): tiny models in float32, a handful of steps each."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmrec.config import ConfigError, parse_config
from llmrec.training.sft import (
    LatentSFTCollator,
    LatentSFTConfig,
    build_model,
    encode_example,
    last_complete_checkpoint,
    load_sft_weights,
    run_sft,
)


def make_config(out: Path, data: Path, **kw) -> LatentSFTConfig:
    base = dict(
        output_dir=str(out), model_name_or_path="tiny-qwen2", model_dtype="float32", dataset=str(data),
        max_train_rows=4, eval_split=None, max_length=384, history_length=2, learning_rate=1e-2, warmup_steps=0,
        per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=8, logging_steps=1,
        save_strategy="no", lora_dropout=0.0, lora_r=4, lora_alpha=8, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return LatentSFTConfig(**base)


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("n_latent", [0, 1])
def test_loss_decreases_lora(tmp_path, prepared_dir, n_latent):
    cfg = make_config(tmp_path / "run", prepared_dir, num_latent_tokens=n_latent, max_steps=16)
    res = run_sft(cfg)
    losses = [r["loss"] for r in res["train_losses"]]
    assert len(losses) == 16
    assert mean(losses[-3:]) < mean(losses[:3]) - 0.3, losses
    assert json.loads((tmp_path / "run" / "train_results.json").read_text())["global_step"] == 16


def test_checkpoint_contents_and_reload(tmp_path, prepared_dir):
    out = tmp_path / "run"
    cfg = make_config(out, prepared_dir, num_latent_tokens=1, max_steps=2, save_strategy="steps", save_steps=2,
                      eval_split="valid", max_eval_rows=4, eval_strategy="steps", eval_steps=2)
    res = run_sft(cfg)
    assert res["eval_losses"] and res["best_checkpoint"].endswith("checkpoint-2")
    final = {p.name for p in out.iterdir() if p.is_file()}
    for name in ("adapter_config.json", "adapter_model.safetensors", "latent_config.json", "latent_head.safetensors",
                 "tokenizer_config.json", "tokenizer.json", "llmrec_config.json", "train_results.json"):
        assert name in final, (name, final)
    assert not [n for n in final if n.endswith((".bin", ".pt", ".pth", ".pkl"))], final
    ckpt = Path(last_complete_checkpoint(out))
    weights = {p.name for p in ckpt.iterdir()} - {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    assert not [n for n in weights if n.endswith((".bin", ".pt", ".pth", ".pkl"))], weights
    meta = json.loads((out / "llmrec_config.json").read_text())
    assert meta["num_latent_tokens"] == 1 and meta["prompt"] == "d3" and meta["tokenization"] == "separate"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
    # A fresh model + the checkpoint reproduces the trained adapter and head.
    model, tok = build_model(make_config(tmp_path / "other", prepared_dir, num_latent_tokens=1))
    load_sft_weights(model, out)
    assert tok.convert_tokens_to_ids("<|Thought|>") == meta["latent_token_ids"][0]
    saved = load_file(str(out / "adapter_model.safetensors"))
    from peft import get_peft_model_state_dict

    now = get_peft_model_state_dict(model.model)
    assert set(saved) == set(now)
    for k in saved:
        assert torch.equal(saved[k], now[k]), k
    head = load_file(str(out / "latent_head.safetensors"))
    for k, v in model.latent_head.state_dict().items():
        assert torch.equal(head[k], v), k
    # A checkpoint whose save was cut before llmrec_config.json (written last) is refused: it loaded as a plain
    # adapter, without the latent token the model was trained with.
    import shutil

    from llmrec.models.checkpoint import CheckpointError, checkpoint_kind, load_for_inference

    cut = tmp_path / "cut" / "checkpoint-4"
    shutil.copytree(ckpt, cut)
    for name in ("llmrec_config.json", "trainer_state.json", "latent_config.json", "latent_head.safetensors"):
        (cut / name).unlink(missing_ok=True)
    assert checkpoint_kind(ckpt) == "adapter"
    with pytest.raises(CheckpointError, match="save was interrupted"):
        load_for_inference(None, str(cut), dtype="float32")
    # A hand-deleted latent_config.json (the rest complete) loaded as the plain LM (N=0), silently.
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / "latent_config.json").unlink()
    with pytest.raises(CheckpointError, match="latent_config.json .* is missing"):
        load_for_inference(None, str(bare), dtype="float32")
    (bare / "latent_head.safetensors").unlink()  # the recorded latent token alone is enough to refuse
    with pytest.raises(CheckpointError, match="latent_config.json .* is missing"):
        checkpoint_kind(bare)


def test_a_save_cut_after_the_adapter_is_refused_not_evaluated_as_a_plain_adapter(tmp_path, prepared_dir, monkeypatch):
    """peft writes a complete-looking adapter first; a kill before the latent files left a folder that evaluate and
    recommend loaded as a plain LoRA model, without the latent token it was trained with (a review)."""
    import safetensors.torch

    from llmrec.models.checkpoint import CheckpointError, checkpoint_kind, load_for_inference
    from llmrec.training.sft import LATENT_EMBEDDINGS_NAME

    real = safetensors.torch.save_file

    def killed_at_the_latent_rows(tensors, filename, *a, **k):
        if str(filename).endswith(LATENT_EMBEDDINGS_NAME):
            raise KeyboardInterrupt
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", killed_at_the_latent_rows)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_sft(make_config(out, prepared_dir, num_latent_tokens=1, max_steps=1))
    assert (out / "adapter_model.safetensors").exists() and not (out / "latent_config.json").exists()
    with pytest.raises(CheckpointError, match="an llmrec save that was interrupted"):
        checkpoint_kind(out)
    with pytest.raises(CheckpointError, match="interrupted"):
        load_for_inference(None, str(out), dtype="float32")
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    run_sft(make_config(out, prepared_dir, num_latent_tokens=1, max_steps=1))  # the rerun saves it whole
    assert checkpoint_kind(out) == "adapter" and (out / "latent_config.json").exists()


@pytest.mark.parametrize("concat", [True, False])
def test_eval_loss_is_the_token_mean_over_every_validation_row(tmp_path, prepared_dir, concat):
    # The plain form: each validation row alone through the trained model, completion-token cross-entropy
    # summed, over all rows / all their completion tokens. 5 rows in eval batches of 2: a partial last batch.
    from llmrec.models.latent import completion_cross_entropy
    from llmrec.training.sft import LatentSFTCollator, build_dataset

    kw = dict(num_latent_tokens=1, max_steps=2, save_strategy="steps", save_steps=2, eval_strategy="steps",
              eval_steps=2, eval_split="valid", max_eval_rows=5, per_device_eval_batch_size=2,
              eval_do_concat_batches=concat)
    res = run_sft(make_config(tmp_path / "run", prepared_dir, **kw))
    model, tok = build_model(make_config(tmp_path / "other", prepared_dir, **kw))
    load_sft_weights(model, tmp_path / "run")
    model.eval()
    rows = build_dataset(make_config(tmp_path / "other", prepared_dir, **kw), tok, "valid", 5)
    assert len(rows) == 5
    collate = LatentSFTCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(rows)):
            batch = collate([rows[i]])
            labels = batch.pop("labels")
            out = model(**batch)
            total += completion_cross_entropy(out.logits, out.labels, reduction="sum").item()
            tokens += int((labels != -100).sum())
    assert res["eval_losses"][-1]["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)


@pytest.mark.parametrize("option, value", [("batch_eval_metrics", True), ("eval_use_gather_object", True),
                                           ("include_for_metrics", ["inputs"])])
def test_eval_options_that_would_break_eval_loss_are_refused_at_config_time(tmp_path, option, value):
    with pytest.raises(ConfigError, match=option):
        make_config(tmp_path / "run", tmp_path, **{option: value})


class _Killed(RuntimeError):
    pass


def test_resume_matches_uninterrupted(tmp_path, prepared_dir):
    from transformers import TrainerCallback

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise _Killed

    # Two saves after the resume (steps 4 and 6): with save_total_limit 2 the rotation deletes checkpoint-2, which
    # the run resumed from (its step was read from it again after training, and the run crashed there).
    kw = dict(num_latent_tokens=1, max_steps=6, save_strategy="steps", save_steps=2, lora_dropout=0.1,
              learning_rate=5e-3, warmup_steps=2, save_total_limit=2)
    full = run_sft(make_config(tmp_path / "a", prepared_dir, **kw))
    with pytest.raises(_Killed):
        run_sft(make_config(tmp_path / "b", prepared_dir, **kw), callbacks=[KillAfterSave()])
    assert last_complete_checkpoint(tmp_path / "b").endswith("checkpoint-2")
    assert not (tmp_path / "b" / "train_results.json").exists()
    resumed = run_sft(make_config(tmp_path / "b", prepared_dir, **kw))
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == 6
    assert "layout_before_resume" not in resumed  # the same layout
    assert not (tmp_path / "b" / "checkpoint-2").exists()  # rotated away during the resumed run
    for name in ("adapter_model.safetensors", "latent_head.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert set(a) == set(b)
        for k in a:
            assert (a[k] - b[k]).abs().max().item() <= 1e-6, (name, k)
    la = {r["step"]: r["loss"] for r in full["train_losses"]}
    lb = {r["step"]: r["loss"] for r in resumed["train_losses"]}
    for step in (3, 4, 5, 6):
        assert abs(la[step] - lb[step]) <= 1e-6
    # the mean over all 6 steps, not this invocation's 4 steps' sum over 6 (the logged losses have 4 decimals)
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], abs=1e-4)


def test_a_checkpoint_between_two_logs_closes_a_log_so_the_resumed_run_logs_as_the_uninterrupted_one(
        tmp_path, prepared_dir):
    """Checkpoints every 3 steps, logs every 2: resumed at step 3, transformers' next log (step 4) averaged step 4
    alone under the uninterrupted run's label, train_loss was unknown and metrics.train_loss was steps 4-5's mean
    (a review). Every checkpoint is now also a log."""
    from transformers import TrainerCallback

    class KillAfterSave(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(0.3)  # the cut invocation's training time, which the resumed run's timings_s.train includes

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Killed

    kw = dict(num_latent_tokens=1, max_steps=5, save_strategy="steps", save_steps=3, logging_steps=2,
              lora_dropout=0.0, learning_rate=5e-3, warmup_steps=0)
    full = run_sft(make_config(tmp_path / "a", prepared_dir, **kw))
    with pytest.raises(_Killed):
        run_sft(make_config(tmp_path / "b", prepared_dir, **kw), callbacks=[KillAfterSave()])
    resumed = run_sft(make_config(tmp_path / "b", prepared_dir, **kw))
    assert resumed["resumed_from"].endswith("checkpoint-3")
    assert [r["step"] for r in full["train_losses"]] == [r["step"] for r in resumed["train_losses"]] == [2, 3, 4, 5]
    assert [r["loss"] for r in resumed["train_losses"]] == pytest.approx([r["loss"] for r in full["train_losses"]],
                                                                         abs=1e-6)
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], abs=1e-4)
    assert resumed["metrics"]["train_loss"] == resumed["train_loss"]
    # timings_s.train counted the last invocation only (a review)
    assert resumed["timings_s"]["train"] > resumed["timings_s"]["train_before_resume"] >= 0.9


def test_the_mean_train_loss_of_a_run_resumed_between_two_logs_is_unknown():
    """Resumed at step 3 with logs every 2 steps: the step-4 log averages step 4 only, and step 3's loss is in no
    log; weighting that log by 2 steps gave a wrong train_loss (review). At a logged step the mean is exact."""
    from types import SimpleNamespace

    from llmrec.training.sft import _mean_train_loss

    history = [{"step": 2, "loss": 6.0}, {"step": 4, "loss": 4.0}, {"step": 6, "loss": 5.0}]
    assert _mean_train_loss(None, history, 6, resumed_at=3) is None
    assert _mean_train_loss(None, history, 6, resumed_at=4) == pytest.approx(5.0)
    assert _mean_train_loss(SimpleNamespace(training_loss=4.9), history, 6, resumed_at=None) == 4.9
    assert _mean_train_loss(None, history[:2], 6, resumed_at=4) is None  # the logs do not reach the last step


def test_a_checkpoint_with_a_cut_trainer_state_is_not_resumed_from(tmp_path):
    # transformers writes trainer_state.json in place: a kill during the write left it empty, and every rerun
    # failed on it (a bare JSON error) instead of resuming from the checkpoint before.
    for step, text in ((2, '{"global_step": 2}'), (4, "")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(text)
    assert last_complete_checkpoint(tmp_path).endswith("checkpoint-2")


def test_a_run_killed_at_its_early_stop_finishes_without_training_on(tmp_path, prepared_dir):
    # Killed after the checkpoint at which early stopping ended the run, before the final save: the rerun
    # trained on past the stop (transformers does not honour a saved stop) and picked a later best checkpoint.
    kw = dict(num_latent_tokens=1, max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps",
              eval_steps=2, eval_split="valid", max_eval_rows=4, load_best_model_at_end=True,
              metric_for_best_model="eval_loss", early_stopping_patience=1)
    cfg = make_config(tmp_path / "a", prepared_dir, **kw)
    assert cfg.restore_callback_states_from_checkpoint  # the early-stopping counter survives a resume
    first = run_sft(cfg)
    out = tmp_path / "a"
    state_path = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["stateful_callbacks"]["TrainerControl"]["args"]["should_training_stop"] = True  # the stop at step 2
    state_path.write_text(json.dumps(state))
    import shutil

    shutil.rmtree(out / "checkpoint-4")
    (out / "train_results.json").unlink()
    again = run_sft(make_config(out, prepared_dir, **kw))
    assert again["global_step"] == 2 and again["resumed_from"].endswith("checkpoint-2")
    assert again["best_checkpoint"] == state["best_model_checkpoint"]
    assert not (out / "checkpoint-4").exists()  # trained on past the stop, it would have saved checkpoint-4 again
    head = load_file(str(out / "latent_head.safetensors"))
    best = load_file(str(Path(state["best_model_checkpoint"]) / "latent_head.safetensors"))
    assert all(torch.equal(head[k], best[k]) for k in head) and first["global_step"] == 4


def test_tokenizer_already_has_latent_token(tmp_path, prepared_dir):
    from llmrec.models.backbone import load_backbone
    from llmrec.models.latent import LatentConfig, add_latent_tokens

    base, tok = load_backbone("tiny-qwen2", dtype="float32")
    add_latent_tokens(tok, base, LatentConfig(num_latent_tokens=1))
    tid = tok.convert_tokens_to_ids("<|Thought|>")
    rows = base.get_input_embeddings().weight.shape[0]
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    cfg = make_config(tmp_path / "run", prepared_dir, model_name_or_path=str(tmp_path / "base"), max_steps=1)
    model, tok2 = build_model(cfg)
    assert tok2.convert_tokens_to_ids("<|Thought|>") == tid and len(tok2) == len(tok)
    assert model.config.latent_token_ids == [tid]
    assert model.embed_tokens.weight.shape[0] == rows
    res = run_sft(cfg)
    assert res["global_step"] == 1


@pytest.mark.parametrize("kind", ["tiny-qwen2", "tiny-llama"])
def test_truncates_history_from_left_never_answer(kind):
    from llmrec.models.backbone import load_backbone
    from llmrec.prompts import PromptTemplate

    _, tok = load_backbone(kind, dtype="float32")
    template = PromptTemplate.load("d3")
    history = [f"Super Mario {i} Deluxe Edition" for i in range(40)]
    target = "Halo Gold Collection"
    p, c, dropped = encode_example(template, tok, history, target, 330, "video games", 1)
    assert dropped > 0
    assert len(p) + 1 + len(c) <= 330
    assert c == tok(template.render_completion(target), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    text = tok.decode(p)
    assert "Super Mario 39 Deluxe" in text and "Super Mario 0 Deluxe" not in text
    if tok.bos_token_id is not None and kind == "tiny-llama":
        assert p[0] == tok.bos_token_id and c[0] != tok.bos_token_id
    # The collator: prompts left-padded, completions right-padded, labels = completion (-100 on padding).
    p2, c2, _ = encode_example(template, tok, history[-1:], "Tetris", 330, "video games", 1)
    batch = LatentSFTCollator(tok.pad_token_id)([{"prompt_ids": p, "completion_ids": c},
                                                 {"prompt_ids": p2, "completion_ids": c2}])
    assert batch["prompt_attention_mask"][:, -1].all() and batch["completion_attention_mask"][:, 0].all()
    assert batch["prompt_attention_mask"][1, 0] == 0 and batch["prompt_input_ids"][1, -len(p2):].tolist() == p2
    assert batch["labels"][1, : len(c2)].tolist() == c2 and (batch["labels"][1, len(c2):] == -100).all()


def test_unknown_recipe_key_is_config_error(tmp_path):
    from llmrec.cli import main

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_name_or_path: tiny-qwen2\nlora_rank: 8\n")
    with pytest.raises(ConfigError, match="lora_rank"):
        parse_config([LatentSFTConfig], recipe)
    assert main(["sft", "--config", str(recipe)]) == 1


@pytest.mark.parametrize("bad", [dict(history_length=-1), dict(history_length=0), dict(max_train_rows=-5),
                                 dict(label_smoothing_factor=0.1), dict(per_device_train_batch_size=0),
                                 dict(num_train_epochs=0, max_steps=-1), dict(lora_r=0), dict(lora_dropout=2.0),
                                 dict(early_stopping_patience=-1), dict(head_dim=7), dict(head_num_heads=0),
                                 dict(neftune_noise_alpha=5.0), dict(average_tokens_across_devices=False),
                                 dict(save_only_model=True, save_strategy="steps")])
def test_bad_sizes_are_config_errors(tmp_path, prepared_dir, bad):
    # history_length <= 0 meant the whole history and was recorded as given; max_train_rows -5 crashed in sampling;
    # batch 0 was a ZeroDivisionError; 0 epochs wrote a finished-looking checkpoint of step 0; the head's settings
    # failed only once the model was loaded; lora_r 0, dropout 2 and patience -1 were accepted; NEFTune crashed at
    # the start of training; per-process token means weighted filler-only processes as full ones; save_only_model
    # checkpoints resumed silently with a fresh optimiser and the warmup restarted (review)
    with pytest.raises(ConfigError, match=next(iter(bad))):
        make_config(tmp_path / "o", prepared_dir, **bad)


def test_an_output_dir_under_a_file_is_a_config_error(tmp_path, prepared_dir):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="lies under .*afile, which is a file"):
        make_config(tmp_path / "afile" / "run", prepared_dir)


def test_an_empty_history_is_an_error_naming_the_row(tmp_path, prepared_dir):
    # It was skipped and counted as "answer does not fit max_length"; evaluate and seqrec refuse it.
    from llmrec.models.tiny import build_tiny_tokenizer
    from llmrec.training.sft import build_dataset

    path = prepared_dir / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["history_item_ids"] = []
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))  # a blank first line: the row is on line 3
    with pytest.raises(ValueError, match=r"train.jsonl, row 3, field 'history_item_ids': empty history"):
        build_dataset(make_config(tmp_path / "o", prepared_dir, max_train_rows=None), build_tiny_tokenizer("tiny-qwen2"),
                      "train", None)


@pytest.mark.parametrize("special", ["<|endoftext|>", "<|Thought|>"])
def test_a_title_holding_a_special_token_is_refused_before_training(prepared_dir, tmp_path, special):
    """Tokenizing the text read it as the control token: an EOS (or a latent position) in mid-history, an EOS
    inside the answer; the trie refused it only at evaluation, after SFT had trained on it."""
    from llmrec.data.catalog import ItemCatalog
    from llmrec.decoding.search import build_catalog_trie
    from llmrec.models.tiny import build_tiny_tokenizer
    from llmrec.prompts import PromptError, PromptTemplate
    from llmrec.training.sft import build_dataset

    tok = build_tiny_tokenizer("tiny-qwen2")
    if special not in tok.all_special_tokens:  # the latent token, as a latent model registers it
        tok.add_special_tokens({"additional_special_tokens": [special]})
    path = prepared_dir / "catalog.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[3]["title"] = f"Beta {special} Edition"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config(tmp_path / "o", prepared_dir, max_train_rows=None)
    want = rf"catalog.jsonl: item 4's title 'Beta {re.escape(special)} Edition' contains the tokenizer's special token"
    with pytest.raises(PromptError, match=want):
        build_dataset(cfg, tok, "train", None)
    with pytest.raises(PromptError, match=want):
        build_catalog_trie(ItemCatalog.load(path), tok, PromptTemplate.load("d3"))


def test_shipped_recipes_parse():
    root = Path(__file__).resolve().parents[1] / "recipes" / "games"
    (lat,) = parse_config([LatentSFTConfig], root / "sft_latent.yaml")
    (big,) = parse_config([LatentSFTConfig], root / "sft_bigrec.yaml")
    assert lat.num_latent_tokens == 1 and big.num_latent_tokens == 0
    assert lat.dataset == big.dataset == "games-sample" and lat.model_name_or_path == "smollm2-135m"
    assert "accelerate launch" in (root / "sft_latent.yaml").read_text().splitlines()[1]


@pytest.mark.parametrize("kind, model_dtype", [("tiny-qwen2", "float32"), ("tiny-llama", "float32"),
                                               ("tiny-qwen2", "bfloat16")])
def test_qlora_trains_on_a_4bit_base_and_reloads_as_trained(tmp_path, prepared_dir, kind, model_dtype):
    """finetune=qlora: the base's linear layers are bitsandbytes 4-bit (on a CPU too, by bitsandbytes' portable
    code), LoRA trains, and load_sft_checkpoint applies the adapter to the same 4-bit base, unmerged: the first
    answer token's logits are the training model's. It merged the adapter into the unquantised base (~1e-2 away).
    In bfloat16 it ran the layers training had in float32 (peft's kbit preparation) in bfloat16 (~3e-3 away), and
    "auto" quantised the base from its stored float32 instead of the trained dtype (~4e-2 away) (review)."""
    import bitsandbytes as bnb

    from llmrec.training.sft import load_sft_checkpoint

    out = tmp_path / "run"
    res = run_sft(make_config(out, prepared_dir, model_name_or_path=kind, finetune="qlora", num_latent_tokens=1,
                              max_steps=2, model_dtype=model_dtype))
    assert all(math.isfinite(r["loss"]) for r in res["train_losses"])
    trained, tok = build_model(make_config(tmp_path / "x", prepared_dir, model_name_or_path=kind, finetune="qlora",
                                           num_latent_tokens=1, model_dtype=model_dtype))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trained.causal_lm.modules())
    # Gradient checkpointing as configured (off here), not peft's kbit default (on).
    assert not any(getattr(m, "gradient_checkpointing", False) for m in trained.modules())
    load_sft_weights(trained, out)
    trained.eval()
    model, _, meta = load_sft_checkpoint(out, dtype=model_dtype)
    assert meta["finetune"] == "qlora"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.causal_lm.modules())
    ids = torch.tensor([tok("Halo Gold")["input_ids"]])
    with torch.no_grad():
        got = model.prefill_with_latents(ids, torch.ones_like(ids))[1].float()
        want = trained.prefill_with_latents(ids, torch.ones_like(ids))[1].float()
    assert (got - want).abs().max().item() < 1e-4
    # dtype "auto" (the evaluator accepts it) computes in the dtype the adapter was trained in.
    auto, _, _ = load_sft_checkpoint(out, dtype="auto")
    with torch.no_grad():
        assert (auto.prefill_with_latents(ids, torch.ones_like(ids))[1].float() - want).abs().max().item() < 1e-4


def test_qlora_trains_on_after_a_validation_pass(tmp_path, prepared_dir):
    """A validation pass (eval mode, no gradients) between QLoRA steps: on a CPU with AVX512-BF16 bitsandbytes
    repacked the 4-bit weights for its inference kernel there, which has no backward, so the next step failed."""
    res = run_sft(make_config(tmp_path / "run", prepared_dir, finetune="qlora", num_latent_tokens=1, max_steps=3,
                              eval_split="valid", max_eval_rows=2, eval_strategy="steps", eval_steps=1,
                              load_best_model_at_end=False))
    assert len(res["train_losses"]) == 3 and all(math.isfinite(r["loss"]) for r in res["train_losses"])


def test_report_to_null_and_a_non_positive_learning_rate(tmp_path, prepared_dir):
    """``report_to: null`` means no integration (TrainingArguments kept [None], which the Trainer refused after the
    model was loaded; GRPO refused it as "[None] is not supported"); a learning rate <= 0 is refused when the config
    is read (AdamW refused it only after loading; the dry run said READY)."""
    from llmrec.training.grpo import LatentGRPOConfig

    assert make_config(tmp_path / "a", prepared_dir, report_to=None).report_to == []
    assert LatentGRPOConfig(output_dir=str(tmp_path / "g"), sft_checkpoint="s", report_to=None).report_to == []
    with pytest.raises(ConfigError, match="num_train_epochs must be > 0 and finite"):  # a traceback in the dry run
        make_config(tmp_path / "c", prepared_dir, max_steps=-1, num_train_epochs=float("inf"))
    for lr in (-3e-4, 0.0, float("nan")):
        with pytest.raises(ConfigError, match="learning_rate must be > 0"):
            make_config(tmp_path / "b", prepared_dir, learning_rate=lr)
        with pytest.raises(ConfigError, match="learning_rate must be > 0"):
            LatentGRPOConfig(output_dir=str(tmp_path / "g"), sft_checkpoint="s", learning_rate=lr)


def test_qlora_without_bitsandbytes_is_a_clear_error(tmp_path, prepared_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="qlora needs bitsandbytes"):
        build_model(make_config(tmp_path / "q", prepared_dir, finetune="qlora"))


@pytest.mark.parametrize("dtype,want", [("bf16", torch.bfloat16), ("float32", torch.float32), ("auto", None)])
def test_qlora_compute_dtype_reads_every_dtype_name(tmp_path, prepared_dir, monkeypatch, dtype, want):
    """getattr(torch, model_dtype) failed on "bf16"/"fp32" (names every other path accepts) with an AttributeError."""
    import llmrec.models.backbone as backbone
    from llmrec.training.sft import _load_base

    seen = {}

    class Stop(Exception):
        pass

    def fake_load(name, dtype=None, quantization_config=None, **kw):
        seen["compute"] = quantization_config.bnb_4bit_compute_dtype
        raise Stop

    monkeypatch.setattr(backbone, "load_backbone", fake_load)
    cfg = make_config(tmp_path / "q", prepared_dir, finetune="qlora", model_dtype=dtype)
    with pytest.raises(Stop if want else ConfigError, **({} if want else {"match": "must name a dtype"})):
        _load_base(cfg)
    assert seen.get("compute") == want


def test_cli_sft_in_process(tmp_path, prepared_dir, capsys):
    from llmrec.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model_name_or_path: tiny-qwen2\nmodel_dtype: float32\ndataset: {prepared_dir}\nmax_train_rows: 2\n"
        "eval_split: none\nhistory_length: 2\nmax_length: 384\nper_device_train_batch_size: 2\n"
        f"save_strategy: 'no'\ndisable_tqdm: true\noutput_dir: {tmp_path / 'out'}\n"
    )
    assert main(["sft", "--config", str(recipe), "--max_steps", "1", "--num_latent_tokens", "0"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.rindex('{\n  "output_dir"'):])["global_step"] == 1
    assert json.loads((tmp_path / "out" / "llmrec_config.json").read_text())["num_latent_tokens"] == 0
    assert not (tmp_path / "out" / "latent_head.safetensors").exists()


DIST_SCRIPT = """
import sys
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback
from llmrec.config import parse_config
from llmrec.training.sft import LatentSFTConfig, _latent_lm, run_sft

torch.set_num_threads(1)
recipe, out, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
(cfg,) = parse_config([LatentSFTConfig], recipe, ["--output_dir", out] + rest)


class DumpRank(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        m = _latent_lm(model)
        sd = {k: v.detach().contiguous() for k, v in m.named_parameters() if v.requires_grad}
        save_file(sd, f"{out}/rank{args.process_index}.safetensors")


run_sft(cfg, callbacks=[DumpRank()])
"""


def test_two_processes_match_one_process(tmp_path, prepared_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model_name_or_path: tiny-qwen2\nmodel_dtype: float32\ndataset: {prepared_dir}\nmax_train_rows: 8\n"
        "eval_split: none\nhistory_length: 2\nmax_length: 384\nlora_dropout: 0.0\nlora_r: 4\nlora_alpha: 8\n"
        "num_latent_tokens: 1\nlearning_rate: 5.0e-3\nwarmup_steps: 0\nmax_steps: 3\nlogging_steps: 2\n"
        "per_device_train_batch_size: 2\nsave_strategy: 'no'\ndisable_tqdm: true\nseed: 0\n"
    )
    from tests.launching import accelerate_launch, assert_ranks_equal_single, run_script_here

    script = tmp_path / "dist_sft.py"
    script.write_text(DIST_SCRIPT)
    # Same global batch (4 rows/step): 1 process x 2 accumulation steps vs 2 processes x 1.
    run_script_here(script, recipe, tmp_path / "one", "--gradient_accumulation_steps", "2")
    accelerate_launch(2, [script, recipe, tmp_path / "two", "--gradient_accumulation_steps", "1"])
    assert_ranks_equal_single(tmp_path / "two", tmp_path / "one")
    one = json.loads((tmp_path / "one" / "train_results.json").read_text())
    two = json.loads((tmp_path / "two" / "train_results.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    l1 = [r["loss"] for r in one["train_losses"]]
    l2 = [r["loss"] for r in two["train_losses"]]
    assert len(l1) == len(l2) == 1  # step 2; step 3 is in no log
    assert l1 == pytest.approx(l2, abs=1e-5)
    # train_loss over all 3 steps: the unlogged step 3 was added from rank 0's own share of the loss (review)
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)


@pytest.mark.parametrize("kind", ["tiny-qwen2", "tiny-llama"])
def test_inference_loading_matches_training_model(tmp_path, prepared_dir, kind):
    """What the evaluator needs for N>=1: load_sft_checkpoint -> prefill_with_latents -> beam search."""
    from llmrec.data.canonical import load_prepared
    from llmrec.decoding.beam_search import PromptState, constrained_beam_search_from_state
    from llmrec.decoding.search import build_catalog_trie, encode_prompts
    from llmrec.prompts import PromptTemplate
    from llmrec.training.sft import load_sft_checkpoint

    out = tmp_path / "run"
    cfg = make_config(out, prepared_dir, model_name_or_path=kind, num_latent_tokens=1, max_steps=2)
    run_sft(cfg)
    trained, tok = build_model(make_config(tmp_path / "x", prepared_dir, model_name_or_path=kind, num_latent_tokens=1))
    load_sft_weights(trained, out)
    trained.eval()
    model, tok2, meta = load_sft_checkpoint(out)
    assert meta["num_latent_tokens"] == 1 and model.config.latent_token_ids == trained.config.latent_token_ids
    template = PromptTemplate.load("d3")
    data = load_prepared(prepared_dir, splits=["valid"], max_history=2)
    rows = [data.splits["valid"][i] for i in range(3)]
    feats = [dict(zip(("prompt_ids", "completion_ids"), encode_example(
        template, tok, r["history_titles"], r["target_title"], 384, "video games", 1)[:2])) for r in rows]
    batch = LatentSFTCollator(tok.pad_token_id)(feats)
    batch.pop("labels")
    with torch.no_grad():
        want = trained(**batch).logits[:, 0]
        cache, logits, mask, pos = model.prefill_with_latents(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    assert (logits - want).abs().max().item() < 1e-4
    prompts = [template.render_prompt(r["history_titles"], "video games") for r in rows]
    ids, pmask = encode_prompts(tok2, prompts, "cpu")
    assert torch.equal(ids, batch["prompt_input_ids"])
    trie = build_catalog_trie(data.catalog, tok2, template)
    cache, logits, mask, pos = model.prefill_with_latents(ids, pmask)
    outs = constrained_beam_search_from_state(model.causal_lm, trie, PromptState(logits, cache, mask, pos), num_beams=3)
    assert len(outs) == 3 and all(len(o.item_ranking) >= 1 for o in outs)


def test_full_finetune_checkpoint(tmp_path, prepared_dir):
    from llmrec.training.sft import load_sft_checkpoint

    out = tmp_path / "run"
    cfg = make_config(out, prepared_dir, model_name_or_path="tiny-llama", finetune="full", num_latent_tokens=1,
                      max_steps=2, learning_rate=1e-3)
    run_sft(cfg)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "latent_head.safetensors", "llmrec_config.json",
            "tokenizer_config.json"} <= files
    assert "adapter_config.json" not in files and not [n for n in files if n.endswith((".bin", ".pt", ".pth"))]
    trained, tok = build_model(make_config(tmp_path / "x", prepared_dir, model_name_or_path="tiny-llama",
                                           finetune="full", num_latent_tokens=1))
    load_sft_weights(trained, out)
    model, _, _ = load_sft_checkpoint(out)
    ids = torch.tensor([tok("Halo Gold")["input_ids"]])
    with torch.no_grad():
        a = model.prefill_with_latents(ids, torch.ones_like(ids))[1]
        b = trained.eval().prefill_with_latents(ids, torch.ones_like(ids))[1]
    assert (a - b).abs().max().item() < 1e-5
    # Another base named for it is refused, as for an adapter (the evaluator labelled its results with that name).
    with pytest.raises(ValueError, match="trained on base model 'tiny-llama'"):
        load_sft_checkpoint(out, "tiny-qwen2")
    # An untied LM head missing from the checkpoint (here: a tied model's save, which holds the head once, as the
    # embedding) is named; it was skipped for every model, so an untied one kept its base head silently.
    untied, _ = build_model(make_config(tmp_path / "y", prepared_dir, model_name_or_path="tiny-llama",
                                        finetune="full", num_latent_tokens=1))
    lm = untied.causal_lm
    lm.config.tie_word_embeddings = False
    lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.detach().clone())
    lm._tied_weights_keys, lm.all_tied_weights_keys = [], {}
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        load_sft_weights(untied, out)


def test_retrain_trains_a_finished_run_again_from_the_start(tmp_path, prepared_dir):
    """``retrain: true`` on a finished run: its checkpoints are removed and training starts at step 0 (resuming
    from the finished run's last checkpoint would train nothing)."""
    out = tmp_path / "run"
    first = run_sft(make_config(out, prepared_dir, max_steps=4, save_strategy="steps", save_steps=2))
    assert (out / "checkpoint-4").is_dir()
    again = run_sft(make_config(out, prepared_dir, max_steps=2, save_strategy="steps", save_steps=2,
                                learning_rate=5e-3, retrain=True))
    assert again["resumed_from"] is None and again["global_step"] == 2
    assert not (out / "checkpoint-4").exists() and (out / "checkpoint-2").is_dir()
    from llmrec.models.checkpoint import remove_saved_model

    # retrain first removes the finished run's top-level model (a retrain cut short before its final save left it
    # readable as the new run's); the new run's final save wrote it again
    assert (out / "llmrec_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert "adapter_model.safetensors" in remove_saved_model(out) and not (out / "llmrec_config.json").exists()
    assert again["train_loss"] != first["train_loss"]
    # Without retrain, the finished run is returned only for the settings it was made with: another learning rate
    # is refused with the difference named (it returned the other run's results before), the same one is skipped
    with pytest.raises(ValueError, match=r"holds a finished SFT run made with learning_rate=0\.005 \(asked: 0\.05\)"):
        run_sft(make_config(out, prepared_dir, max_steps=2, save_strategy="steps", save_steps=2, learning_rate=5e-2))
    assert run_sft(make_config(out, prepared_dir, max_steps=2, save_strategy="steps", save_steps=2,
                               learning_rate=5e-3)) == again


@pytest.mark.parametrize("n_latent", [0, 1])
def test_gradient_checkpointing_trains_as_without_it(tmp_path, prepared_dir, n_latent):
    """activation_checkpointing (transformers 5's name of gradient_checkpointing, a deprecated alias) recomputes
    activations in the backward pass: same losses and weights, and the LoRA adapter gets gradients also without a
    latent token (no input of a layer then requires grad)."""
    from transformers import TrainerCallback

    class SeeCheckpointing(TrainerCallback):
        on = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.on.append(any(getattr(m, "gradient_checkpointing", False) for m in model.modules()))

    runs = {}
    for gc in (False, True):
        out = tmp_path / f"gc{gc}"
        seen = SeeCheckpointing()
        seen.on = []
        res = run_sft(make_config(out, prepared_dir, max_steps=2, num_latent_tokens=n_latent,
                                  activation_checkpointing=gc), callbacks=[seen])
        assert seen.on == [gc, gc]  # the decoder layers do checkpoint (or not)
        runs[gc] = res, load_file(str(out / "adapter_model.safetensors"))
    (plain, w_plain), (ckpt, w_ckpt) = runs[False], runs[True]
    assert [r["loss"] for r in ckpt["train_losses"]] == pytest.approx([r["loss"] for r in plain["train_losses"]],
                                                                      abs=1e-5)
    assert w_plain.keys() == w_ckpt.keys()
    for k in w_plain:
        assert (w_plain[k] - w_ckpt[k]).abs().max().item() <= 1e-5, k


def test_initial_weights_do_not_depend_on_what_loading_drew_from_the_generator(tmp_path, prepared_dir, monkeypatch):
    # A GGUF alias's first use converts it inside the loading call, building a randomly initialised model first:
    # that run's LoRA and pooling-head initialisation (drawn after loading) differed from every later run's.
    import llmrec.training.sft as sft

    cfg = make_config(tmp_path / "out", prepared_dir)
    reference, _ = build_model(cfg)
    real_load = sft._load_base

    def load_that_draws(config):
        loaded = real_load(config)  # (the tiny builder seeds itself, so draw after it)
        torch.randn(1000)  # what a conversion's random init consumes
        return loaded

    monkeypatch.setattr(sft, "_load_base", load_that_draws)
    other, _ = build_model(cfg)
    ref_params, other_params = dict(reference.named_parameters()), dict(other.named_parameters())
    trained = [n for n, p in ref_params.items() if p.requires_grad]
    assert any("lora_A" in n for n in trained) and any("latent_head" in n for n in trained)
    for n in trained:
        assert torch.equal(ref_params[n], other_params[n]), n


def test_filler_rows_add_no_loss_and_no_gradient(tmp_path, prepared_dir):
    """fill_global_batches completes the last global batch with loss-free copies of a row: the loss and the
    gradients of a batch with fillers equal those of the batch without them."""
    from llmrec.training.sft import LatentSFTModule, LatentSFTTrainer, build_dataset, fill_global_batches

    cfg = make_config(tmp_path / "o", prepared_dir, num_latent_tokens=1, max_train_rows=3)
    model, tok = build_model(cfg)
    ds = build_dataset(cfg, tok, "train", 3)
    filled = fill_global_batches(ds, 4)
    assert len(filled) == 4 and filled.rows[3] == dict(ds.rows[0], no_loss=True)
    assert fill_global_batches(filled, 4) is filled and len(fill_global_batches(ds, 3)) == 3
    collate = LatentSFTCollator(tok.pad_token_id)
    trainer = LatentSFTTrainer(model=LatentSFTModule(model), args=cfg, train_dataset=ds, data_collator=collate,
                               processing_class=tok, sft_config=cfg)

    def loss_and_grads(rows):
        batch = collate(rows)
        tokens = int((batch["labels"] != -100).sum())
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(tokens))
        loss.backward()
        return loss.detach(), tokens, [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]

    plain, filled_ = loss_and_grads(ds.rows), loss_and_grads(filled.rows)
    assert plain[1] == filled_[1] and torch.allclose(plain[0], filled_[0], atol=1e-6)
    assert len(plain[2]) == len(filled_[2]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain[2], filled_[2]))


def test_early_stopping_without_reloading_the_best_model(tmp_path, prepared_dir):
    """early_stopping_patience was silently ignored when load_best_model_at_end was false."""
    kw = dict(eval_split="valid", max_eval_rows=4, max_train_rows=8, per_device_eval_batch_size=2,
              eval_strategy="steps", eval_steps=1, save_strategy="no", early_stopping_patience=1, max_steps=6,
              learning_rate=0.05)
    stopped = run_sft(make_config(tmp_path / "a", prepared_dir, load_best_model_at_end=False, **kw))
    assert stopped["global_step"] < 6
    losses = [e["eval_loss"] for e in stopped["eval_losses"]]
    assert min(losses) < losses[-1]  # it stopped because the eval loss rose


def test_a_resume_with_other_settings_is_refused(tmp_path, prepared_dir, caplog):
    """A run cut after a checkpoint and restarted with another learning rate resumed from it, trained its last
    steps with the new one, and recorded only the new one."""
    kw = dict(num_latent_tokens=1, max_steps=4, save_strategy="steps", save_steps=2, lora_dropout=0.1)
    out = tmp_path / "run"
    run_sft(make_config(out, prepared_dir, **kw))
    (out / "train_results.json").unlink()  # as if killed after checkpoint-4... resume from the last checkpoint
    with pytest.raises(ConfigError, match=r"checkpoint-4 was trained with learning_rate=0.01 \(asked: 0.05\)"):
        run_sft(make_config(out, prepared_dir, learning_rate=0.05, **kw))
    # The same global batch on another layout, or where it logs, is no change.
    # But with lora_dropout the masks are drawn per micro-batch and process: said, and recorded (a review).
    with caplog.at_level(logging.WARNING, logger="llmrec.training.sft"):
        again = run_sft(make_config(out, prepared_dir, logging_steps=2, per_device_train_batch_size=1,
                                    gradient_accumulation_steps=2, **kw))
    assert again["resumed_from"].endswith("checkpoint-4")
    assert again["layout_before_resume"] == {"world_size": 1, "per_device_train_batch_size": 2,
                                             "gradient_accumulation_steps": 1}
    assert "trained with 1 process(es) x 2 rows x accumulation 1, as 1 process(es) x 1 rows x accumulation 2" \
        in caplog.text
    with pytest.raises(ConfigError, match=r"global_train_batch_size=2 \(asked: 4\)"):
        (out / "train_results.json").unlink()
        run_sft(make_config(out, prepared_dir, per_device_train_batch_size=4, **kw))


def test_a_cut_run_resumes_only_on_its_data_and_retrain_starts_it_over(tmp_path, prepared_dir):
    """A cut run resumed silently on a dataset prepared again in place (steps on both, only the new digests
    recorded); and `retrain: true`, which the refusal of a changed setting recommends, still resumed a cut run
    (only a finished run's checkpoints were removed)."""
    from conftest import write_prepared

    kw = dict(num_latent_tokens=1, max_steps=4, save_strategy="steps", save_steps=2)
    out = tmp_path / "run"
    run_sft(make_config(out, prepared_dir, **kw))
    (out / "train_results.json").unlink()  # as if killed after checkpoint-4
    # retrain with another setting: trained from the start, not refused as a resume with other settings
    again = run_sft(make_config(out, prepared_dir, learning_rate=0.05, retrain=True, **kw))
    assert again["resumed_from"] is None and again["global_step"] == 4
    (out / "train_results.json").unlink()
    write_prepared(prepared_dir, seed=1)  # same directory, other rows
    with pytest.raises(ConfigError, match=r"checkpoint-4 was trained on another dataset .*set retrain: true"):
        run_sft(make_config(out, prepared_dir, learning_rate=0.05, **kw))
    fresh = run_sft(make_config(out, prepared_dir, learning_rate=0.05, retrain=True, **kw))
    assert fresh["resumed_from"] is None


def test_filler_rows_are_left_out_with_drop_last_and_for_older_checkpoints(tmp_path, prepared_dir):
    """drop_last drops the partial batch as asked (filling it added a step); a checkpoint written before the
    fillers existed resumes over the rows alone (fillers would redraw the epoch's order)."""
    from llmrec.training.sft import TRAINING_ARGS_JSON, _fills_global_batches

    assert _fills_global_batches(make_config(tmp_path / "a", prepared_dir), None)
    assert not _fills_global_batches(make_config(tmp_path / "a", prepared_dir, dataloader_drop_last=True), None)
    old = tmp_path / "checkpoint-2"
    old.mkdir()
    (old / TRAINING_ARGS_JSON).write_text(json.dumps({"learning_rate": 0.01}))
    assert not _fills_global_batches(make_config(tmp_path / "a", prepared_dir), str(old))
    (old / TRAINING_ARGS_JSON).write_text(json.dumps({"learning_rate": 0.01, "global_train_batch_size": 2}))
    assert _fills_global_batches(make_config(tmp_path / "a", prepared_dir), str(old))


def test_evaluation_switched_off_with_an_eval_split_trains(tmp_path, prepared_dir):
    """early_stopping_patience (default 1) with eval_strategy no: transformers' callback asserted at train start."""
    res = run_sft(make_config(tmp_path / "o", prepared_dir, eval_split="valid", eval_strategy="no",
                              load_best_model_at_end=False, max_steps=2))
    assert res["global_step"] == 2


def test_a_damaged_weights_file_of_a_checkpoint_is_named(tmp_path, prepared_dir):
    """A truncated latent_head / adapter file gave safetensors' "incomplete metadata" with no file named."""
    from llmrec.safetensors_io import SafetensorsFileError
    from llmrec.training.sft import load_sft_checkpoint

    out = tmp_path / "run"
    run_sft(make_config(out, prepared_dir, max_steps=1, num_latent_tokens=1))
    for name in ("latent_head.safetensors", "adapter_model.safetensors"):
        path = out / name
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        with pytest.raises(SafetensorsFileError, match=rf"{name}: damaged or not a safetensors file"):
            load_sft_checkpoint(out, dtype="float32")
        path.write_bytes(whole)
    load_sft_checkpoint(out, dtype="float32")


def test_no_eval_split_says_which_asked_settings_it_turns_off(tmp_path, caplog):
    """--eval_split none turned a recipe's early stopping off without a word."""
    with caplog.at_level("WARNING", logger="llmrec.training.sft"):
        cfg = LatentSFTConfig(output_dir=str(tmp_path / "o"), eval_split="none", early_stopping_patience=2)
    assert cfg.early_stopping_patience == 0 and not cfg.load_best_model_at_end
    assert "eval_split is none: early_stopping_patience turned off" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="llmrec.training.sft"):
        LatentSFTConfig(output_dir=str(tmp_path / "o"), eval_split=None)  # the defaults: nothing asked, nothing said
    assert "turned off" not in caplog.text


def test_model_selection_on_the_test_or_training_split_is_said(tmp_path, caplog):
    """eval_split test (or the training split) selects the model on the rows it is reported on (or trained on):
    accepted without a word before (review)."""
    for split, rows in (("test", "test rows"), ("train", "its own training rows")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="llmrec.training.sft"):
            LatentSFTConfig(output_dir=str(tmp_path / "o"), eval_split=split)
        assert f"eval_split is '{split}': model selection then reads {rows}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="llmrec.training.sft"):
        LatentSFTConfig(output_dir=str(tmp_path / "o"))
    assert "eval_split" not in caplog.text


@pytest.mark.parametrize("dtype, warned", [("bfloat16", True), ("float32", False)])
def test_full_finetune_in_half_precision_warns(tmp_path, prepared_dir, caplog, dtype, warned):
    """finetune=full on half-precision weights has no float32 master copy: AdamW's small updates are rounded away
    (norm weights near 1.0 never move), which the default model_dtype (bfloat16) did silently."""
    cfg = make_config(tmp_path / "run", prepared_dir, finetune="full", model_dtype=dtype, num_latent_tokens=1)
    with caplog.at_level("WARNING", logger="llmrec.training.sft"):
        build_model(cfg)
    assert ("finetune=full trains the weights in bfloat16" in caplog.text) == warned
    if warned:
        assert "model_dtype: float32 and bf16: true" in caplog.text


def test_drop_last_is_refused_where_what_it_drops_depends_on_the_layout(tmp_path, prepared_dir):
    """With accumulation (or processes) and rows that are not whole global batches, 1 process x accumulation 2
    dropped the short micro-batch and took a half step, 2 processes the whole round: other weights (a review)."""
    from llmrec.config import ConfigError

    with pytest.raises(ConfigError, match="depend on the process layout"):
        run_sft(make_config(tmp_path / "a", prepared_dir, dataloader_drop_last=True, gradient_accumulation_steps=2,
                            max_train_rows=7))
    # one process without accumulation drops the short global batch itself: allowed, as are whole global batches
    res = run_sft(make_config(tmp_path / "b", prepared_dir, dataloader_drop_last=True, max_train_rows=7,
                              max_steps=-1, num_train_epochs=1))
    assert res["global_step"] == 3
    res = run_sft(make_config(tmp_path / "c", prepared_dir, dataloader_drop_last=True, gradient_accumulation_steps=2,
                              max_train_rows=8, max_steps=-1, num_train_epochs=1))
    assert res["global_step"] == 2


def test_a_directory_holding_another_kind_of_run_is_refused(tmp_path, prepared_dir):
    """SFT into an `llmrec evaluate` output or a seqrec run's directory put its checkpoints beside the other run's
    files (a review); refused before any work, nothing written."""
    for name, kind in (("rankings.jsonl", "an `llmrec evaluate` output"), ("run_config.json", "an `llmrec seqrec train` run")):
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_text("{}\n")
        with pytest.raises(ValueError, match=rf"holds {name}: {kind}, not a `llmrec sft` run; use another output_dir"):
            run_sft(make_config(out, prepared_dir, num_latent_tokens=1, max_steps=1))
        assert sorted(p.name for p in out.iterdir()) == [name]
