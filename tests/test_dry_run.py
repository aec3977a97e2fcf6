"""``--dry-run`` of ``llmrec sft`` / ``grpo`` / ``evaluate`` (llmrec.dry_run): every shipped GPU and Games recipe
resolves in-process, parameter counts on the meta device match the real models, missing inputs are reported with
the command that makes them, config errors stay errors, and nothing is written. No download, no real weights."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from llmrec.cli import main
from llmrec.dry_run import (
    EXIT_INVALID,
    EXIT_MISSING,
    EXIT_READY,
    count_parameters,
    grpo_steps_per_epoch,
    known_config_path,
    resolve_accelerate_plan,
    resolve_architecture,
    trainer_steps_per_epoch,
)
from llmrec.resources import resource_dir

RECIPES = resource_dir("recipes")
GPU_RECIPES = sorted((RECIPES / "gpu").glob("*.yaml"))
GAMES_RECIPES = sorted((RECIPES / "games").glob("*.yaml"))
QWEN = "Qwen/Qwen2.5-1.5B"
QWEN_PARAMS = 1_543_714_304  # tied embeddings: 151,936 x 1,536 counted once
QWEN_HEAD = 3 * (1536 * 1536 + 1536)  # the pooling head: full-width Q, K, V with bias


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """One thread; the hub unreachable (offline mode) and an empty HF cache; a private llmrec cache; the test's own
    cwd; no launcher env."""
    from huggingface_hub import constants

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("LLMREC_CACHE", str(tmp_path / "llmrec_cache"))
    for k in ("ACCELERATE_MIXED_PRECISION", "WORLD_SIZE", "LOCAL_RANK", "RANK", "ACCELERATE_USE_FSDP",
              "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(k, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    yield
    torch.set_num_threads(old)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def dry(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv + ["--dry-run"])
    out = capsys.readouterr().out
    return code, out


def number(out: str, key: str) -> int:
    m = re.search(rf"^  {re.escape(key)}: ([\d,]+)", out, flags=re.M)
    assert m, f"no '{key}' line in:\n{out}"
    return int(m.group(1).replace(",", ""))


def stage_of(path: Path) -> str:
    return "evaluate" if path.name.startswith("eval") else path.name.split("_")[0]


# ------------------------------------------------------------------------------------------------ recipes


def test_gpu_recipes_exist():
    names = {p.name for p in GPU_RECIPES}
    assert {"sft_bigrec_lora.yaml", "sft_latent_lora.yaml", "sft_latent_full.yaml", "grpo_latent.yaml", "eval.yaml",
            "eval_d3.yaml"} <= names


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_gpu_recipe_dry_run(path, tmp_path, capsys):
    before = tree(tmp_path)
    label = f"recipes/gpu/{path.name}"
    code, out = dry([stage_of(path), "--config", label], capsys)
    assert tree(tmp_path) == before, "a dry run wrote files"
    # The full category is not prepared here: a missing input, reported with the amazon2018 prepare command.
    assert code == EXIT_MISSING, out
    assert "MISSING dataset data/Video_Games" in out
    assert "llmrec data prepare --format amazon2018 --input raw/amazon2018 --category Video_Games " \
           "--output data/Video_Games" in out
    assert "  model: Qwen/Qwen2.5-1.5B in " in out
    assert "known_configs/Qwen__Qwen2.5-1.5B.json (the hub is unreachable: offline mode" in out
    # The recipe's own launch command gives the plan: recipes/accelerate/ddp.yaml, 2 processes, bf16.
    assert "accelerate launch --config_file recipes/accelerate/ddp.yaml" in out
    assert "  processes: 2" in out and "  distributed type: MULTI_GPU" in out
    assert f"exit code {EXIT_MISSING}" in out.splitlines()[-1]
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    launch = [line for line in header if line.startswith("#   accelerate launch")]
    assert launch[0].startswith("#   accelerate launch --config_file recipes/accelerate/ddp.yaml -m llmrec.cli ")
    assert launch[0].endswith(f" --config {label}")


def test_gpu_sft_recipes_follow_the_paper(capsys):
    code, out = dry(["sft", "--config", "recipes/gpu/sft_latent_full.yaml"], capsys)
    assert code == EXIT_MISSING
    for line in ("finetune: full", "learning_rate: 0.0003", "num_train_epochs: 3", "early_stopping_patience: 1",
                 "max_length: 512", "global batch: 128 rows = 4 x 16 x 2 processes", "mixed precision: bf16"):
        assert line in out, line
    assert number(out, "parameters total") == QWEN_PARAMS + QWEN_HEAD
    assert number(out, "parameters trainable") == QWEN_PARAMS + QWEN_HEAD
    code, out = dry(["sft", "--config", "recipes/gpu/sft_latent_lora.yaml"], capsys)
    assert "global batch: 128 rows" in out and "finetune: lora" in out
    assert number(out, "parameters trainable") < 0.02 * QWEN_PARAMS
    code, out = dry(["sft", "--config", "recipes/gpu/sft_bigrec_lora.yaml"], capsys)
    assert "num_latent_tokens: 0" in out and "latent pooling head" not in out


def test_gpu_grpo_recipe_is_head_only_on_ddp(capsys):
    code, out = dry(["grpo", "--config", "recipes/gpu/grpo_latent.yaml"], capsys)
    assert code == EXIT_MISSING
    for line in ("num_generations: 8", "noise_scale: 1.5", "advantage_mode: batch", "lr_scheduler_type: cosine",
                 "learning_rate: 0.0001", "train_lora: False", "num_train_epochs: 1",
                 "global batch: 256 rows = 16 x 8 x 2 processes = 32 prompts"):
        assert line in out, line
    # The SFT checkpoint it starts from is missing: the SFT recipe that writes it is named.
    assert "MISSING SFT checkpoint runs/gpu/sft_latent_full" in out
    assert "-m llmrec.cli sft --config recipes/gpu/sft_latent_full.yaml" in out
    assert number(out, "parameters trainable") == QWEN_HEAD
    assert "FSDP" in (RECIPES / "gpu" / "grpo_latent.yaml").read_text().split("\nsft_checkpoint")[0]


def test_gpu_eval_recipes(capsys):
    code, out = dry(["evaluate", "--config", "recipes/gpu/eval.yaml"], capsys)
    assert code == EXIT_MISSING
    assert "num_beams: 10" in out and "length_penalty: 1.0" in out
    assert "MISSING checkpoint runs/gpu/grpo_latent" in out and "grpo --config recipes/gpu/grpo_latent.yaml" in out
    # The checkpoint is not there yet; its shape comes from the recipes that make it (GRPO <- full latent SFT).
    assert "recipes/gpu/sft_latent_full.yaml (via recipes/gpu/grpo_latent.yaml)" in out
    assert number(out, "parameters total") == QWEN_PARAMS + QWEN_HEAD
    code, out = dry(["evaluate", "--config", "recipes/gpu/eval_d3.yaml"], capsys)
    assert "length_penalty: 0.0" in out
    assert "MISSING guidance run runs/gpu/sasrec_Video_Games" in out
    assert "llmrec seqrec train --config recipes/seqrec/sasrec_games.yaml --dataset_dir data/Video_Games " \
           "--output_dir runs/gpu/sasrec_Video_Games" in out


@pytest.mark.parametrize("path", GAMES_RECIPES, ids=lambda p: p.name)
def test_games_recipe_dry_run(path, tmp_path, capsys):
    from llmrec.models.backbone import alias_is_installed

    before = tree(tmp_path)
    code, out = dry([stage_of(path), "--config", f"recipes/games/{path.name}"], capsys)
    assert tree(tmp_path) == before, "a dry run wrote files (the embedded sample must not be prepared)"
    assert "model (meta device" in out and "parameters total" in out
    alias_ok = alias_is_installed("smollm2-135m")
    if path.name.startswith("sft"):
        # games-sample is embedded: present. The model alias is the only possible missing input.
        assert "dataset: games-sample (embedded sample)" in out
        assert code == (EXIT_READY if alias_ok else EXIT_MISSING), out
        assert "  processes: 2" in out  # the recipe's launch command: --multi_gpu --num_processes 2
    else:
        assert code == EXIT_MISSING, out  # data/games or runs/games/sft_latent is not in this empty cwd
    if path.name.startswith("grpo"):
        assert "-m llmrec.cli sft --config recipes/games/sft_latent.yaml" in out
    if path.name == "eval.yaml":
        assert "llmrec data prepare --format seq-txt --input ../shared/data/amazon_games_dealrec --output data/games" in out


def test_latent_rows_of_an_unconverted_alias_come_from_the_shipped_tokenizer_length(capsys):
    # The alias is not converted in this test's private cache, so its tokenizer cannot be read; the shipped
    # config records len(tokenizer). SmolLM2's 49,152 rows are all taken: the latent token adds one tied row
    # of 576, as the real run's resize does. Qwen2.5 pads its vocabulary (151,936 rows for 151,665 tokens):
    # no row is added there.
    code, out = dry(["sft", "--config", "recipes/games/sft_latent.yaml"], capsys)
    assert "added embedding rows 576," in out, out
    assert "assumed to fit" not in out
    code, out = dry(["sft", "--config", "recipes/gpu/sft_latent_lora.yaml"], capsys)
    assert "parameters total" in out and "added embedding rows" not in out, out


# ------------------------------------------------------------------------------------------------- models


def test_qwen_meta_model_parameter_count():
    arch = resolve_architecture(QWEN)
    assert "known_configs/Qwen__Qwen2.5-1.5B.json" in arch.source and "unreachable" in arch.source
    cfg = arch.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.tie_word_embeddings) == (1536, 28, 151936, True)
    counts = count_parameters(cfg, "bfloat16")
    assert counts.total == QWEN_PARAMS and counts.total == pytest.approx(1.54e9, rel=0.01)
    assert counts.weight_bytes == 2 * QWEN_PARAMS
    from llmrec.models.latent import LatentConfig

    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"]}
    c = count_parameters(cfg, "bfloat16", lora=lora, latent=LatentConfig(num_latent_tokens=1), train_lora=True)
    # LoRA r: r * (in + out) per adapted matrix, 7 per layer, 28 layers
    per_layer = 8 * ((1536 + 1536) * 2 + (1536 + 256) * 2 + (1536 + 8960) * 3)
    assert c.parts["LoRA adapters"] == 28 * per_layer
    assert c.parts["latent pooling head"] == QWEN_HEAD
    assert c.trainable == 28 * per_layer + QWEN_HEAD
    with pytest.raises(ValueError):
        count_parameters(cfg, lora={**lora, "target_modules": ["no_such_proj"]})


def test_lora_on_the_embeddings_counts_the_rows_the_latent_tokens_add(tmp_path):
    """LoRA targets that include the embedding and the LM head: the dry run counts what build_model trains (it
    wrapped the matrices at their size before the latent token's row was added: 12,672 against 12,688)."""
    from llmrec.models.latent import LatentConfig
    from llmrec.models.tiny import build_tiny
    from llmrec.training.sft import LatentSFTConfig, build_model

    targets = ["embed_tokens", "lm_head", "q_proj"]
    cfg = LatentSFTConfig(output_dir=str(tmp_path / "o"), model_name_or_path="tiny-qwen2", model_dtype="float32",
                          lora_target_modules=targets, num_latent_tokens=1)
    model, tok = build_model(cfg)
    real = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    base, _ = build_tiny("tiny-qwen2")
    added = len(tok) - base.get_input_embeddings().weight.shape[0]
    assert added == 1
    counts = count_parameters(base.config, "float32", extra_embedding_rows=added, latent=LatentConfig(num_latent_tokens=1),
                              lora={"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "target_modules": targets},
                              train_lora=True)
    assert counts.parts["LoRA adapters"] == real


def test_architecture_from_hf_cache_and_local_dir(tmp_path, monkeypatch):
    from huggingface_hub import constants

    shipped = json.loads(known_config_path(QWEN).read_text())
    cache = tmp_path / "hf"
    snap = cache / "models--Qwen--Qwen2.5-1.5B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (cache / "models--Qwen--Qwen2.5-1.5B" / "refs").mkdir()
    (cache / "models--Qwen--Qwen2.5-1.5B" / "refs" / "main").write_text("abc123")
    (snap / "config.json").write_text(json.dumps({**shipped, "num_hidden_layers": 2}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    arch = resolve_architecture(QWEN)
    assert arch.source.startswith("Hugging Face cache") and arch.config.num_hidden_layers == 2
    local = tmp_path / "local_model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({**shipped, "num_hidden_layers": 3}))
    assert resolve_architecture(str(local)).config.num_hidden_layers == 3
    assert resolve_architecture(str(local / "config.json")).source.startswith("local config file")
    with pytest.raises(ValueError, match="not a model directory"):
        resolve_architecture(str(tmp_path / "nope" / "x"))


def test_architecture_from_the_hub_and_refusals(monkeypatch):
    import llmrec.dry_run as dr

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(dr, "_hub_unreachable_reason", lambda: None)
    shipped = json.loads(known_config_path(QWEN).read_text())
    monkeypatch.setattr(dr, "_fetch_hub_config", lambda repo: {**shipped, "num_hidden_layers": 4})
    arch = resolve_architecture(QWEN)
    assert arch.source.startswith("the Hugging Face Hub") and arch.config.num_hidden_layers == 4

    def refused(repo):
        raise dr._HubAnswered("the hub answered HTTP 404")

    monkeypatch.setattr(dr, "_fetch_hub_config", refused)
    with pytest.raises(ValueError, match="404"):  # reached but refused: no shipped fallback
        resolve_architecture(QWEN)

    def unreachable(repo):
        raise ConnectionError("timed out")

    monkeypatch.setattr(dr, "_fetch_hub_config", unreachable)
    assert "unreachable: ConnectionError: timed out" in resolve_architecture(QWEN).source
    with pytest.raises(ValueError, match="unreachable"):  # no shipped config for this one
        resolve_architecture("someone/unknown-model")


# ------------------------------------------------------------------------- tiny models, real checkpoints


def sft_args(data: Path, out: Path, **kw: str) -> list[str]:
    args = {"model_name_or_path": "tiny-qwen2", "model_dtype": "float32", "dataset": str(data),
            "output_dir": str(out), "lora_r": "4", "lora_alpha": "8", "per_device_train_batch_size": "2",
            "gradient_accumulation_steps": "3", "eval_strategy": "no", "save_strategy": "no",
            "load_best_model_at_end": "false", **kw}
    return [x for k, v in args.items() for x in (f"--{k}", v)]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_sft_ready_counts_match_the_real_model(finetune, tmp_path, prepared_dir, capsys):
    from llmrec.config import parse_config
    from llmrec.training.sft import LatentSFTConfig, build_model

    before = tree(tmp_path)
    argv = ["sft"] + sft_args(prepared_dir, tmp_path / "out", finetune=finetune, num_latent_tokens="1")
    code, out = dry(argv + ["--num-processes", "2"], capsys)
    assert code == EXIT_READY, out
    assert tree(tmp_path) == before
    assert out.splitlines()[-1] == f"dry run: READY; exit code {EXIT_READY}"
    assert "global batch: 12 rows = 2 x 3 x 2 processes" in out
    train_rows = json.loads((prepared_dir / "stats.json").read_text())["rows"]["train"]
    assert number(out, "steps per epoch") == trainer_steps_per_epoch(train_rows, 2, 2, 3)
    # The meta-device counts are those of the model the trainer builds (latent token row added to the vocabulary).
    (config,) = parse_config([LatentSFTConfig], None, argv[1:])
    model, _ = build_model(config)
    assert number(out, "parameters total") == sum(p.numel() for p in model.parameters())
    assert number(out, "parameters trainable") == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_steps_per_epoch_formulas():
    # Trainer + accelerate: 100 rows / 4 per device = 25 batches, 13 per process; 3 full steps of 4 + 1 partial.
    assert trainer_steps_per_epoch(100, 4, 2, 4) == 4
    assert trainer_steps_per_epoch(3, 4, 2, 4) == 1
    # GRPO: 16 rows x 2 processes x 8 accumulation / G 8 = 32 prompts per step; the last partial batch is dropped.
    assert grpo_steps_per_epoch(1000, 16, 2, 8, 8) == 31


@pytest.fixture
def sft_checkpoint(tmp_path, prepared_dir) -> Path:
    """A real (tiny, untrained) latent SFT adapter checkpoint on ``prepared_dir``."""
    from llmrec.training.sft import LatentSFTConfig, build_model, save_sft_checkpoint

    cfg = LatentSFTConfig(model_name_or_path="tiny-qwen2", model_dtype="float32", dataset=str(prepared_dir),
                          output_dir=str(tmp_path / "sft"), num_latent_tokens=1, lora_r=4, lora_alpha=8,
                          history_length=3, max_length=256, eval_split=None)
    model, tok = build_model(cfg)
    save_sft_checkpoint(model, tok, tmp_path / "sft", cfg.checkpoint_fields())
    return tmp_path / "sft"


def test_grpo_ready_matches_the_trainer(sft_checkpoint, tmp_path, capsys):
    from llmrec.config import parse_config
    from llmrec.training.grpo import LatentGRPOConfig, LatentGRPOTrainer

    argv = ["grpo", "--sft_checkpoint", str(sft_checkpoint), "--output_dir", str(tmp_path / "grpo"),
            "--num_generations", "4", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
            "--model_dtype", "float32"]
    before = tree(tmp_path)
    code, out = dry(argv, capsys)
    assert code == EXIT_READY, out
    assert tree(tmp_path) == before
    assert "finetune lora, 1 latent token(s)" in out
    trainer = LatentGRPOTrainer(parse_config([LatentGRPOConfig], None, argv[1:])[0])
    assert number(out, "steps per epoch") == trainer.steps_per_epoch
    assert number(out, "total steps") == trainer.max_steps
    model = trainer.latent_lm
    assert number(out, "parameters total") == sum(p.numel() for p in model.parameters())
    assert number(out, "parameters trainable") == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_evaluate_ready_with_checkpoint(sft_checkpoint, prepared_dir, tmp_path, capsys):
    from llmrec.training.sft import load_sft_checkpoint

    before = tree(tmp_path)
    code, out = dry(["evaluate", "--dataset", str(prepared_dir), "--model_name_or_path", "tiny-qwen2",
                     "--checkpoint", str(sft_checkpoint), "--output_dir", str(tmp_path / "ev"), "--batch_size", "2",
                     "--accelerate-config", "recipes/accelerate/cpu_2proc.yaml"], capsys)
    assert code == EXIT_READY, out
    assert tree(tmp_path) == before
    test_rows = json.loads((prepared_dir / "stats.json").read_text())["rows"]["test"]
    assert f"{test_rows:,} of {test_rows:,} test rows in {-(-test_rows // 2):,} batches" in out
    assert "from: accelerate config recipes/accelerate/cpu_2proc.yaml" in out
    model, _, _ = load_sft_checkpoint(sft_checkpoint, "tiny-qwen2")
    assert number(out, "parameters total") == sum(p.numel() for p in model.parameters())


def test_a_checkpoint_on_another_base_model_is_an_error_as_in_the_run(sft_checkpoint, prepared_dir, tmp_path, capsys):
    """The run refuses an adapter checkpoint on a base other than its recorded one; so does the dry run (it used
    to report READY with the named model's architecture and counts)."""
    for argv in (["evaluate", "--dataset", str(prepared_dir), "--checkpoint", str(sft_checkpoint),
                  "--output_dir", str(tmp_path / "ev")],
                 ["grpo", "--sft_checkpoint", str(sft_checkpoint), "--output_dir", str(tmp_path / "grpo"),
                  "--num_generations", "4", "--per_device_train_batch_size", "8", "--model_dtype", "float32"]):
        code, out = dry([*argv, "--model_name_or_path", "tiny-llama"], capsys)
        assert code == EXIT_INVALID, out
        assert "was trained on base model 'tiny-qwen2' (llmrec_config.json), not 'tiny-llama'" in out


# ---------------------------------------------------------------------------------------- inputs, errors


def test_missing_dataset_is_reported_and_other_checks_still_run(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "data"
    code, out = dry(["sft", "--model_name_or_path", "tiny-qwen2", "--dataset", str(missing)], capsys)
    assert code == EXIT_MISSING
    assert f"MISSING dataset {missing} (directory not found)" in out
    assert f"llmrec data prepare --format <format> --input <raw dir> --output {missing}" in out
    assert "parameters total" in out and "global batch" in out and "steps per epoch: unknown" in out
    assert not missing.exists()


@pytest.mark.parametrize("error", [OSError("cached config.json is not a valid JSON file"),
                                   RuntimeError("the GGUF file has sha256 2f8d...")])
def test_an_unreadable_model_is_reported_not_raised(prepared_dir, capsys, monkeypatch, error):
    """A corrupt cached config (OSError) or a GGUF with a bad checksum (a ConversionError, a RuntimeError) ended
    the dry run with a traceback and no report."""
    import llmrec.dry_run as dr

    def unreadable(name):
        raise error

    monkeypatch.setattr(dr, "resolve_architecture", unreadable)
    code, out = dry(["sft", "--model_name_or_path", "tiny-qwen2", "--dataset", str(prepared_dir)], capsys)
    assert code == EXIT_INVALID and f"ERROR {type(error).__name__}: {error}" in out and "accelerate plan" in out


def test_missing_split_is_reported(prepared_dir, capsys):
    (prepared_dir / "valid.jsonl").unlink()
    code, out = dry(["sft", "--model_name_or_path", "tiny-qwen2", "--dataset", str(prepared_dir)], capsys)
    assert code == EXIT_MISSING and "MISSING split 'valid'" in out


def test_unknown_key_is_still_a_config_error(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("# llmrec sft --config bad.yaml\nmodel_name_or_path: tiny-qwen2\nlearning_rat: 1.0e-4\n")
    assert main(["sft", "--config", str(recipe), "--dry-run"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "unknown option(s) 'learning_rat' (did you mean 'learning_rate'?)" in err
    assert main(["grpo", "--config", "recipes/gpu/grpo_latent.yaml", "--noise_scal", "2", "--dry-run"]) == EXIT_INVALID
    assert "noise_scal" in capsys.readouterr().err


def test_prepared_sample_gives_steps(tmp_path, capsys):
    from llmrec.data.samples import resolve_dataset_dir, sample_cache_dir

    assert resolve_dataset_dir("games-sample") == sample_cache_dir("games-sample")  # the real run prepares it here
    code, out = dry(["sft", "--config", "recipes/games/sft_latent.yaml"], capsys)
    # 2,000 rows (max_train_rows) / (4 per device x 2 processes) = 250 batches per process / 4 accumulation
    assert "steps per epoch: 63 (2,000 training rows)" in out
    assert "validation loss: every 25 steps on 200 valid rows" in out


def test_without_dry_run_the_command_runs(prepared_dir, tmp_path, capsys):
    out_dir = tmp_path / "pop"
    assert main(["evaluate", "--method", "popularity", "--dataset", str(prepared_dir), "--output_dir", str(out_dir)]) == 0
    assert (out_dir / "results.json").exists()


def test_a_finished_evaluation_of_another_protocol_is_invalid_in_the_dry_run(prepared_dir, tmp_path, capsys):
    """The dry run said READY where the real run refuses the directory (a review): it now compares the finished
    evaluation's protocol as the real run does, and names a seqrec training run's directory as such."""
    out_dir = tmp_path / "pop"
    args = ["evaluate", "--method", "popularity", "--dataset", str(prepared_dir), "--output_dir", str(out_dir)]
    assert main([*args, "--max_rows", "5"]) == 0
    capsys.readouterr()
    code, out = dry([*args, "--max_rows", "5"], capsys)
    assert code == 0 and "holds results.json of this protocol: the real run does nothing" in out
    code, out = dry([*args, "--max_rows", "6"], capsys)
    assert code == EXIT_INVALID and "holds results of a different protocol (max_rows=5 (here 6))" in out
    assert main([*args, "--max_rows", "6"]) == 1  # as the real run says
    (out_dir / "results.json").write_text('{"phases": [], "model": "sasrec"}')
    (out_dir / "run_config.json").write_text("{}")
    code, out = dry([*args, "--max_rows", "5"], capsys)
    assert code == EXIT_INVALID and "holds an `llmrec seqrec train` run, not an evaluation" in out


def test_a_finished_evaluation_of_weights_retrained_in_place_is_invalid_in_the_dry_run(prepared_dir, tmp_path, capsys):
    """The dry run compared the settings only: an ID model retrained in the same directory (same paths, other
    weights) was READY, where the real run refuses the finished evaluation (its fingerprint records the digest)."""
    from conftest import train_tiny_sasrec
    from safetensors.torch import load_file, save_file

    run = train_tiny_sasrec(prepared_dir, tmp_path / "sasrec")
    out_dir = tmp_path / "eval"
    args = ["evaluate", "--method", "seqrec", "--checkpoint", str(run), "--dataset", str(prepared_dir),
            "--output_dir", str(out_dir)]
    assert main(args) == 0
    capsys.readouterr()
    code, out = dry(args, capsys)
    assert code == 0 and "holds results.json of this protocol" in out
    weights = run / "train" / "best.safetensors"  # the file the evaluation read (its protocol names it)
    save_file({k: v + 1 for k, v in load_file(weights).items()}, weights)
    code, out = dry(args, capsys)
    assert code == EXIT_INVALID and "holds results of other weights: the ID model weights changed" in out
    assert main(args) == 1  # as the real run says


def test_a_finished_evaluation_of_a_moved_checkpoint_is_invalid_in_the_dry_run(prepared_dir, tmp_path, capsys):
    """The real run's fingerprint records the checkpoint's path as given: a copy elsewhere (same weights) is another
    protocol there, and the dry run said "the real run does nothing" (a review)."""
    import shutil

    from conftest import train_tiny_sasrec

    run = train_tiny_sasrec(prepared_dir, tmp_path / "sasrec")
    out_dir = tmp_path / "eval"
    args = ["evaluate", "--method", "seqrec", "--dataset", str(prepared_dir), "--output_dir", str(out_dir)]
    assert main([*args, "--checkpoint", str(run)]) == 0
    moved = shutil.copytree(run, tmp_path / "moved")
    capsys.readouterr()
    code, out = dry([*args, "--checkpoint", str(moved)], capsys)
    assert code == EXIT_INVALID and "holds results of a different protocol (checkpoint=" in out
    assert main([*args, "--checkpoint", str(moved)]) == 1  # as the real run says


def test_dry_run_only_flags_need_dry_run(capsys):
    for stage in ("sft", "grpo", "evaluate"):
        assert main([stage, "--num-processes", "2"]) == EXIT_INVALID
        assert "only apply with --dry-run" in capsys.readouterr().err


def test_grpo_refuses_fsdp_and_deepspeed_plans(capsys):
    for cfg in ("recipes/accelerate/fsdp.yaml", "recipes/accelerate/zero2.yaml"):
        code, out = dry(["grpo", "--config", "recipes/gpu/grpo_latent.yaml", "--accelerate-config", cfg], capsys)
        assert code == EXIT_INVALID, out
        assert "ERROR latent GRPO runs on one device or with DDP" in out


def test_accelerate_plan_sources(monkeypatch, capsys):
    plan = resolve_accelerate_plan("recipes/accelerate/single_gpu.yaml")
    assert (plan.num_processes, plan.distributed_type, plan.mixed_precision) == (1, "NO", "bf16")
    plan = resolve_accelerate_plan("recipes/accelerate/ddp.yaml", num_processes=8)
    assert (plan.num_processes, plan.distributed_type) == (8, "MULTI_GPU")
    # accelerate launches a NO config or --cpu as one process whatever --num_processes says (simple launcher): the
    # plan said 2 MULTI_GPU processes, halving the steps
    plan = resolve_accelerate_plan("recipes/accelerate/single_gpu.yaml", num_processes=2)
    assert (plan.num_processes, plan.distributed_type) == (1, "NO") and "--num-processes 2 ignored" in plan.source
    from llmrec.dry_run import _plan_from_launch_command

    for command in ("accelerate launch --cpu --num_processes 2 -m llmrec.cli sft",
                    "accelerate launch --num_processes 2 --cpu -m llmrec.cli sft"):
        plan = _plan_from_launch_command(command, "r")
        assert (plan.num_processes, plan.distributed_type) == (1, "NO"), command
    plan = _plan_from_launch_command("accelerate launch --multi_gpu --num_processes 2 -m llmrec.cli sft", "r")
    assert (plan.num_processes, plan.distributed_type) == (2, "MULTI_GPU")
    plan = resolve_accelerate_plan(num_processes=2)  # no type set: accelerate's promotion on a multi-GPU machine
    assert (plan.num_processes, plan.distributed_type) == (2, "MULTI_GPU")
    assert resolve_accelerate_plan().source.startswith("no accelerate config")
    code, out = dry(["sft", "--config", "recipes/gpu/sft_latent_full.yaml", "--accelerate-config",
                     "recipes/accelerate/single_gpu.yaml", "--gradient_accumulation_steps", "32"], capsys)
    assert "global batch: 128 rows = 4 x 32 x 1 processes" in out
    # Under `accelerate launch` the plan is the launcher's, and only rank 0 prints.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    plan = resolve_accelerate_plan()
    assert (plan.num_processes, plan.distributed_type, plan.mixed_precision) == (4, "MULTI_GPU", "bf16")
    for k in ("ACCELERATE_MIXED_PRECISION", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k)  # parsing a TrainingArguments under a fake launcher env would try to rendezvous
    monkeypatch.setenv("RANK", "1")
    code, out = dry(["sft", "--config", "recipes/gpu/sft_latent_full.yaml"], capsys)
    assert code == EXIT_MISSING and out == ""  # same verdict, printed by rank 0 only
    from llmrec.config import ConfigError

    with pytest.raises(ConfigError, match="accelerate config"):
        resolve_accelerate_plan("recipes/accelerate/no_such.yaml")




@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_num_processes_must_be_a_positive_integer(value, capsys):
    """-2 planned a global batch of -8 rows and said READY; 0 was ignored."""
    with pytest.raises(SystemExit) as info:
        main(["sft", "--config", "recipes/games/sft_latent.yaml", "--dry-run", "--num-processes", value])
    assert info.value.code == 2 and "--num-processes" in capsys.readouterr().err


def test_zero2_config_leaves_accumulation_and_clipping_to_the_recipe():
    """A fixed gradient_accumulation_steps: 1 / gradient_clipping: 1.0 there made the Trainer refuse every shipped
    SFT recipe (accumulation 8 or 16) under DeepSpeed: left out, DeepSpeed reads TrainingArguments' values."""
    import yaml

    path = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "zero2.yaml"
    ds = yaml.safe_load(path.read_text())["deepspeed_config"]
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds


def test_an_uninstalled_qwen_alias_is_a_missing_input_with_its_install_command(capsys):
    """It was INVALID (exit 1: "architecture unknown until converted"); its shipped config makes it exit 3."""
    from llmrec.models import backbone

    if backbone.alias_is_installed("qwen2.5-coder-0.5b"):
        pytest.skip("the alias is installed here")
    code, out = dry(["sft", "--config", "recipes/games/sft_latent.yaml", "--model_name_or_path",
                     "qwen2.5-coder-0.5b"], capsys)
    assert code == EXIT_MISSING, out
    assert "shape: layers 24, hidden 896, intermediate 4864, heads 14 (kv 2), vocab 151936" in out
    assert "make it with: llmrec models install qwen2.5-coder-0.5b" in out
    # len(tokenizer) 151,936 fills the vocabulary: the latent token adds a row to the embedding and the untied head
    assert "added embedding rows 1,792," in out and "base LM 630,167,424" in out


def test_lora_all_linear_shorthand_trains_and_counts_every_linear_layer(tmp_path):
    """``lora_target_modules: [all-linear]`` (peft's shorthand, which peft knows only as a string): SFT wraps every
    linear layer but the output head, and the dry run counts the same adapters (in a list, peft looked for a module
    called 'all-linear' and failed)."""
    from llmrec.models.latent import LatentConfig
    from llmrec.models.tiny import build_tiny
    from llmrec.training.sft import LatentSFTConfig, build_model

    cfg = LatentSFTConfig(output_dir=str(tmp_path / "o"), model_name_or_path="tiny-qwen2", model_dtype="float32",
                          lora_target_modules=["all-linear"], num_latent_tokens=1)
    model, tok = build_model(cfg)
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    real = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    base, _ = build_tiny("tiny-qwen2")
    counts = count_parameters(base.config, "float32", extra_embedding_rows=len(tok) - base.get_input_embeddings().weight.shape[0],
                              latent=LatentConfig(num_latent_tokens=1), train_lora=True,
                              lora={"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "target_modules": ["all-linear"]})
    assert counts.parts["LoRA adapters"] == real


@pytest.mark.parametrize("targets", [[], ["null"], ["None"], [""], ["all-linear", "q_proj"]])
def test_lora_target_modules_peft_would_misread_are_refused(tmp_path, targets):
    from llmrec.config import ConfigError
    from llmrec.training.sft import LatentSFTConfig

    with pytest.raises(ConfigError, match="lora_target_modules"):
        LatentSFTConfig(output_dir=str(tmp_path / "o"), model_name_or_path="tiny-qwen2", lora_target_modules=targets)


def test_lora_target_modules_as_one_string_from_python(tmp_path):
    """peft's own form from Python (``"all-linear"``, one module name): one item, not a list of characters; a full
    fine-tune does not read the field, so it is not checked there."""
    from llmrec.training.sft import LatentSFTConfig

    cfg = LatentSFTConfig(output_dir=str(tmp_path / "o"), model_name_or_path="tiny-qwen2",
                          lora_target_modules="all-linear")
    assert cfg.lora_target_modules == ["all-linear"]
    LatentSFTConfig(output_dir=str(tmp_path / "o"), model_name_or_path="tiny-qwen2", finetune="full",
                    lora_target_modules=[])


# ------------------------------------------------------------------- checks the real run makes (review fixes)


def _grpo_argv(sft: Path, out: Path, *extra: str) -> list[str]:
    return ["grpo", "--sft_checkpoint", str(sft), "--output_dir", str(out), "--num_generations", "4",
            "--per_device_train_batch_size", "8", "--model_dtype", "float32", *extra]


def _sft_trained_on(sft: Path, rows: int, seed: int = 42) -> None:
    """Record, as a real SFT run does, that ``sft`` trained on a seeded subset of ``rows`` train rows."""
    (sft / "training_args.json").write_text(json.dumps({"train_split": "train", "max_train_rows": rows, "seed": seed}))


def test_grpo_exclude_sft_rows_counts_steps_from_the_rows_left(sft_checkpoint, prepared_dir, tmp_path, capsys):
    """exclude_sft_rows: the trainer draws the prompts from the rows the SFT did not train on; the dry run counted
    steps over the whole split (READY where the trainer refused: too few rows left)."""
    from llmrec.config import parse_config
    from llmrec.training.grpo import LatentGRPOConfig, LatentGRPOTrainer

    n = json.loads((prepared_dir / "stats.json").read_text())["rows"]["train"]
    _sft_trained_on(sft_checkpoint, n // 2)
    argv = _grpo_argv(sft_checkpoint, tmp_path / "grpo", "--gradient_accumulation_steps", "1",
                      "--exclude_sft_rows", "true")
    code, out = dry(argv, capsys)
    assert code == EXIT_READY, out
    assert f"exclude_sft_rows: {n // 2:,} of {n:,} train rows were the SFT's" in out
    trainer = LatentGRPOTrainer(parse_config([LatentGRPOConfig], None, argv[1:])[0])
    assert number(out, "steps per epoch") == trainer.steps_per_epoch == (n - n // 2) // 2
    # two rows left, four prompts a step: the trainer has no step to take
    _sft_trained_on(sft_checkpoint, n - 2)
    code, out = dry(_grpo_argv(sft_checkpoint, tmp_path / "grpo", "--gradient_accumulation_steps", "2",
                               "--exclude_sft_rows", "true"), capsys)
    assert code == EXIT_INVALID and "an optimiser step needs 4 prompts, exclude_sft_rows leaves 2" in out


def test_grpo_exclude_sft_rows_without_the_sfts_training_args_is_an_error(sft_checkpoint, tmp_path, capsys):
    code, out = dry(_grpo_argv(sft_checkpoint, tmp_path / "grpo", "--exclude_sft_rows", "true"), capsys)
    assert code == EXIT_INVALID, out
    assert "ERROR exclude_sft_rows:" in out and "training_args.json is missing" in out


def test_grpo_eval_split_is_checked_when_eval_rows_is_set(sft_checkpoint, prepared_dir, tmp_path, capsys):
    """The held-out check reads eval_split at the start of the run; the dry run checked the train split only."""
    (prepared_dir / "valid.jsonl").unlink()
    code, out = dry(_grpo_argv(sft_checkpoint, tmp_path / "grpo"), capsys)
    assert code == EXIT_READY, out  # no held-out check: valid is not read
    code, out = dry(_grpo_argv(sft_checkpoint, tmp_path / "grpo", "--eval_rows", "4"), capsys)
    assert code == EXIT_MISSING, out
    assert "MISSING split 'valid'" in out


def test_evaluate_seqrec_checks_the_id_model_run(prepared_dir, tmp_path, capsys, monkeypatch):
    """--method seqrec: the dry run checked nothing and described the popularity baseline (READY for a run directory
    that does not exist)."""
    from tests.conftest import train_tiny_sasrec

    argv = ["evaluate", "--dataset", str(prepared_dir), "--method", "seqrec", "--output_dir", str(tmp_path / "ev")]
    code, out = dry([*argv, "--checkpoint", str(tmp_path / "no_such_run")], capsys)
    assert code == EXIT_MISSING, out
    assert f"MISSING ID-model run {tmp_path / 'no_such_run'} (directory not found)" in out
    assert "llmrec seqrec train" in out and "popularity" not in out
    # a missing run that a shipped recipe writes: that recipe's command (GRU4Rec's was SASRec's fallback)
    monkeypatch.chdir(tmp_path)  # the recipe's relative output_dir, missing here
    code, out = dry([*argv, "--checkpoint", "runs/seqrec/gru4rec_games"], capsys)
    assert code == EXIT_MISSING and "--config recipes/seqrec/gru4rec_games.yaml" in out, out

    run = train_tiny_sasrec(prepared_dir, tmp_path / "sasrec")
    before = tree(tmp_path)
    code, out = dry([*argv, "--checkpoint", str(run)], capsys)
    assert code == EXIT_READY, out
    assert tree(tmp_path) == before
    items = len((prepared_dir / "catalog.jsonl").read_text().splitlines())
    assert "model: sasrec (ID model)" in out and f"trained on {items:,} items" in out
    assert "popularity" not in out

    (run / "train" / "best.safetensors").write_bytes(b"not a safetensors file")
    code, out = dry([*argv, "--checkpoint", str(run)], capsys)
    assert code == EXIT_INVALID and "ERROR ID-model weights:" in out and "best.safetensors" in out

    other = tmp_path / "other"
    from tests.conftest import write_prepared

    write_prepared(other, n_items=25)
    run = train_tiny_sasrec(prepared_dir, tmp_path / "sasrec2")
    code, out = dry(["evaluate", "--dataset", str(other), "--method", "seqrec", "--checkpoint", str(run),
                     "--output_dir", str(tmp_path / "ev")], capsys)
    assert code == EXIT_INVALID and f"trained on {items:,} items" in out and "has 25" in out


def test_a_full_checkpoint_without_its_model_weights_is_not_full(tmp_path, prepared_dir, capsys):
    """checkpoint_kind called a folder "full" for config.json and any *.safetensors: a full latent checkpoint whose
    model.safetensors is gone (latent_head.safetensors left) passed the dry run, and the load failed."""
    from llmrec.models.checkpoint import CheckpointError, checkpoint_kind
    from llmrec.training.sft import LatentSFTConfig, build_model, save_sft_checkpoint

    cfg = LatentSFTConfig(model_name_or_path="tiny-llama", model_dtype="float32", dataset=str(prepared_dir),
                          finetune="full", output_dir=str(tmp_path / "sft"), num_latent_tokens=1, history_length=3,
                          max_length=256, eval_split=None)
    model, tok = build_model(cfg)
    save_sft_checkpoint(model, tok, tmp_path / "sft", cfg.checkpoint_fields())
    assert checkpoint_kind(tmp_path / "sft") == "full"
    (tmp_path / "sft" / "model.safetensors").rename(tmp_path / "sft" / "model-00001-of-00001.safetensors")
    assert checkpoint_kind(tmp_path / "sft") == "full"  # a shard of the model's weights
    (tmp_path / "sft" / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint_kind(tmp_path / "sft")
    code, out = dry(["evaluate", "--dataset", str(prepared_dir), "--checkpoint", str(tmp_path / "sft"),
                     "--output_dir", str(tmp_path / "ev")], capsys)
    assert code == EXIT_INVALID and "is not a usable checkpoint" in out


@pytest.mark.parametrize("missing,extra,message", [
    ("bitsandbytes", ["--finetune", "qlora"], "finetune=qlora needs bitsandbytes"),
    ("tensorboard", ["--report_to", "tensorboard"], "report_to tensorboard needs the tensorboard package"),
])
def test_sft_needing_a_missing_optional_package_is_invalid(missing, extra, message, prepared_dir, tmp_path, capsys,
                                                           monkeypatch):
    """The dry run said READY; the real run refuses (QLoRA when it loads the model; tensorboard now when the SFT
    config is built, so the dry run fails there too, as an `llmrec: error:` line)."""
    import importlib

    try:  # imported whole first, so that the module itself (not a fresh re-import) is what comes back after
        importlib.import_module(missing)
    except ImportError:
        pass
    argv = ["sft"] + sft_args(prepared_dir, tmp_path / "out", num_latent_tokens="1") + extra
    # a bare delitem afterwards made the next import a fresh module beside the old submodules (no bitsandbytes.nn)
    with monkeypatch.context() as blocked:
        blocked.setitem(sys.modules, missing, None)  # `import missing` fails as if it were not installed
        code = main(argv + ["--dry-run"])
    captured = capsys.readouterr()
    assert code == EXIT_INVALID, captured.out
    assert f"ERROR {message}" in captured.out or f"llmrec: error: {message}" in captured.err
    code, out = dry(argv, capsys)
    assert code == EXIT_READY, out


def test_grpo_and_evaluate_of_a_qlora_checkpoint_need_bitsandbytes(sft_checkpoint, prepared_dir, tmp_path, capsys,
                                                                   monkeypatch):
    """A QLoRA adapter is loaded onto the 4-bit base it was trained on: without bitsandbytes the run fails."""
    meta_path = sft_checkpoint / "llmrec_config.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "finetune": "qlora"}))
    try:  # imported whole first: the blocked import below left half-imported submodules behind for later tests
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    for argv in (_grpo_argv(sft_checkpoint, tmp_path / "grpo"),
                 ["evaluate", "--dataset", str(prepared_dir), "--checkpoint", str(sft_checkpoint),
                  "--output_dir", str(tmp_path / "ev")]):
        code, out = dry(argv, capsys)
        assert code == EXIT_INVALID and "ERROR finetune=qlora needs bitsandbytes" in out, out


@pytest.mark.parametrize("text,expected", [
    ("a: [\n", "accelerate config bad.yaml: while parsing a flow node"),  # not YAML: was a yaml traceback
    (None, "accelerate config bad.yaml: [Errno 21]"),  # a directory: was an IsADirectoryError traceback
])
def test_an_unreadable_accelerate_config_is_a_config_error(text, expected, capsys):
    bad = Path("bad.yaml")
    if text is None:
        bad.mkdir()
    else:
        bad.write_text(text)
    assert main(["sft", "--config", "recipes/games/sft_latent.yaml", "--dry-run", "--accelerate-config",
                 "bad.yaml"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert f"llmrec: error: {expected}" in err and "Traceback" not in err


def test_an_output_dir_the_run_would_refuse_to_resume_or_skip_is_an_error(sft_checkpoint, prepared_dir, tmp_path,
                                                                          capsys):
    """The dry run said READY ("resume from checkpoint-4", "the real run skips it") where the real run refuses: a
    checkpoint or a finished run made with other settings (a review)."""
    from llmrec.config import parse_config
    from llmrec.training.grpo import STATE_NAME, LatentGRPOConfig, resume_settings
    from llmrec.training.sft import TRAINING_ARGS_JSON, LatentSFTConfig

    out = tmp_path / "sft_out"
    argv = ["sft"] + sft_args(prepared_dir, out, num_latent_tokens="1", learning_rate="3e-4")
    (cfg,) = parse_config([LatentSFTConfig], None, argv[1:])
    ckpt = out / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (ckpt / TRAINING_ARGS_JSON).write_text(json.dumps({**cfg.to_dict(), "learning_rate": 1e-3}, default=str))
    code, out_text = dry(argv, capsys)
    assert code == EXIT_INVALID and "checkpoint-4 was trained with learning_rate=0.001 (asked: 0.0003)" in out_text
    (ckpt / TRAINING_ARGS_JSON).write_text(json.dumps(cfg.to_dict(), default=str))  # the same settings: resumed
    code, out_text = dry(argv, capsys)
    assert code == EXIT_READY and f"resume: from {ckpt}" in out_text, out_text

    done = tmp_path / "sft_done"
    argv = ["sft"] + sft_args(prepared_dir, done, num_latent_tokens="1", learning_rate="3e-4")
    (cfg,) = parse_config([LatentSFTConfig], None, argv[1:])
    done.mkdir()
    (done / TRAINING_ARGS_JSON).write_text(json.dumps({**cfg.to_dict(), "learning_rate": 1e-3}, default=str))
    rows = json.loads((prepared_dir / "stats.json").read_text())["rows"]["train"]
    (done / "train_results.json").write_text(json.dumps(
        {"config": {**cfg.checkpoint_fields(), "learning_rate": 1e-3}, "num_train_rows": rows,
         "drawn_train_rows": rows}, default=str))
    code, out_text = dry(argv, capsys)
    assert code == EXIT_INVALID and "holds a finished SFT run made with learning_rate=0.001 (asked: 0.0003)" in out_text

    grpo = tmp_path / "grpo"
    argv = _grpo_argv(sft_checkpoint, grpo, "--gradient_accumulation_steps", "1", "--learning_rate", "1e-4")
    (gcfg,) = parse_config([LatentGRPOConfig], None, argv[1:])
    (grpo / "checkpoint-2").mkdir(parents=True)
    (grpo / "checkpoint-2" / STATE_NAME).write_text(json.dumps(
        {"config": {**resume_settings(gcfg, 1), "learning_rate": 5e-5}}))
    code, out_text = dry(argv, capsys)
    assert code == EXIT_INVALID and "checkpoint-2 was trained with learning_rate=5e-05 (asked: 0.0001)" in out_text
    code, out_text = dry(argv + ["--num-processes", "2"], capsys)  # and the global batch over the planned processes
    assert code == EXIT_INVALID and "global_train_batch_size=8 (asked: 16)" in out_text, out_text


def test_d3_guidance_run_gets_the_checks_the_evaluator_makes(prepared_dir, tmp_path, capsys):
    """A guidance run trained on another catalogue was READY (only its results.json was looked for) and the run
    refused it; with guidance_weight 0 the run never reads it, yet the dry run demanded it (a review)."""
    from tests.conftest import train_tiny_sasrec, write_prepared

    other = write_prepared(tmp_path / "other", n_items=25)
    run = train_tiny_sasrec(other, tmp_path / "sasrec")
    argv = ["evaluate", "--dataset", str(prepared_dir), "--model_name_or_path", "tiny-qwen2", "--dtype", "float32",
            "--history_length", "3", "--num_beams", "2", "--ks", "1", "2", "--length_penalty", "0.0",
            "--output_dir", str(tmp_path / "ev")]
    code, out = dry([*argv, "--guidance_checkpoint", str(run), "--guidance_weight", "1.0"], capsys)
    assert code == EXIT_INVALID and "D3 guidance (weight 1" in out and "has 30" in out, out
    code, out = dry([*argv, "--guidance_checkpoint", str(tmp_path / "nowhere"), "--guidance_weight", "0"], capsys)
    assert code == EXIT_READY and "weight 0: off, the run does not read it" in out, out
    code, out = dry([*argv, "--guidance_checkpoint", str(tmp_path / "nowhere"), "--guidance_weight", "1.0"], capsys)
    assert code == EXIT_MISSING and "MISSING guidance run" in out, out
    good = train_tiny_sasrec(prepared_dir, tmp_path / "sasrec_here")
    code, out = dry([*argv, "--guidance_checkpoint", str(good), "--guidance_weight", "1.0"], capsys)
    assert code == EXIT_READY and "model: sasrec (ID model)" in out, out


def test_sft_validation_drop_last_and_grpo_warmup_lines_say_what_the_run_does(sft_checkpoint, prepared_dir,
                                                                               tmp_path, capsys):
    """A review: eval_strategy no still printed "every N steps"; early stopping was left out without
    load_best_model_at_end (run_sft stops early anyway); dataloader_drop_last counted the dropped batch as a step;
    GRPO's warmup with num_iterations 2 was printed in steps but counts optimiser updates."""
    base = ["sft"] + sft_args(prepared_dir, tmp_path / "out", eval_split="valid")
    code, out = dry(base, capsys)  # sft_args: eval_strategy no
    assert code == EXIT_READY and "validation loss: none (eval_strategy: no" in out, out
    stepped = ["sft"] + sft_args(prepared_dir, tmp_path / "out", eval_split="valid", eval_strategy="steps",
                                 eval_steps="1", early_stopping_patience="2")
    code, out = dry(stepped, capsys)
    assert "early stopping after 2 evaluation(s)" in out and "the last weights are kept" in out, out
    train_rows = json.loads((prepared_dir / "stats.json").read_text())["rows"]["train"]
    one = ["sft"] + sft_args(prepared_dir, tmp_path / "out", gradient_accumulation_steps="1",
                             dataloader_drop_last="true")
    code, out = dry(one, capsys)
    assert code == EXIT_READY and number(out, "steps per epoch") == train_rows // 2, out
    # with accumulation (or processes) the rows dropped depend on the layout: refused, as the run refuses it
    code, out = dry(base + ["--dataloader_drop_last", "true", "--max_train_rows", "35"], capsys)  # 35 % 6 rows left
    assert code == EXIT_INVALID and "what is dropped would depend on the process layout" in out, out
    code, out = dry(base + ["--dataloader_drop_last", "true", "--max_train_rows", "30"], capsys)  # whole batches
    assert code == EXIT_READY and number(out, "steps per epoch") == 5, out
    assert trainer_steps_per_epoch(33, 4, 1, 8, drop_last=True) == 1  # 8 full batches: one step, not two
    assert trainer_steps_per_epoch(33, 4, 1, 8) == 2
    code, out = dry(_grpo_argv(sft_checkpoint, tmp_path / "grpo", "--gradient_accumulation_steps", "1",
                               "--num_iterations", "2", "--warmup_steps", "10"), capsys)
    assert "warmup: 10 optimiser updates (2 per step)" in out, out


def test_dtype_auto_is_sized_in_the_stored_dtype(prepared_dir, tmp_path, capsys):
    """dtype auto loads the weights in the dtype they are stored in; the dry run sized them as bfloat16 (a review:
    ~0.3 GB for SmolLM2's ~0.5 GB of float32 weights)."""
    from llmrec.models.backbone import load_backbone

    for stored in ("float32", "bfloat16"):
        lm, tok = load_backbone("tiny-llama", dtype=stored)
        lm.save_pretrained(tmp_path / stored)
        tok.save_pretrained(tmp_path / stored)
        lines = {}
        for dtype in (stored, "auto"):
            code, out = dry(["evaluate", "--dataset", str(prepared_dir), "--model_name_or_path", str(tmp_path / stored),
                             "--dtype", dtype, "--output_dir", str(tmp_path / "ev"), "--ks", "1", "--num_beams", "2"],
                            capsys)
            lines[dtype] = [line for line in out.splitlines() if "memory per process" in line]
        assert lines["auto"] == lines[stored], lines
        assert f"in auto = {stored} (the stored weights' dtype)" in out
    code, out = dry(["evaluate", "--dataset", str(prepared_dir), "--model_name_or_path", "tiny-qwen2", "--dtype", "auto",
                     "--output_dir", str(tmp_path / "ev"), "--ks", "1", "--num_beams", "2"], capsys)
    assert "tiny-qwen2 in auto = float32" in out


def test_qlora_weights_are_sized_as_the_runs_hold_them(prepared_dir, tmp_path, capsys):
    """QLoRA: the 4-bit linear weights at half a byte, every other parameter upcast to float32 (the SFT's
    prepare_model_for_kbit_training, the loader's upcast); a QLoRA checkpoint's GRPO and evaluation keep the adapter
    unmerged on its 4-bit base. The dry run sized the rest in the model dtype and left the adapter out (a review)."""
    pytest.importorskip("bitsandbytes")
    from llmrec.dry_run import count_parameters, resolve_architecture
    from llmrec.training.sft import LatentSFTConfig, build_model, load_sft_checkpoint, save_sft_checkpoint

    cfg = LatentSFTConfig(model_name_or_path="tiny-qwen2", model_dtype="bfloat16", dataset=str(prepared_dir),
                          finetune="qlora", output_dir=str(tmp_path / "sft"), num_latent_tokens=1, lora_r=4,
                          lora_alpha=8, history_length=3, max_length=256, eval_split=None)
    model, tok = build_model(cfg)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    counts = count_parameters(resolve_architecture("tiny-qwen2").config, "bfloat16", latent=cfg.latent_config(),
                              lora={"r": 4, "lora_alpha": 8, "target_modules": cfg.lora_target_modules},
                              extra_embedding_rows=1, train_lora=True, quantized_4bit=True)
    assert counts.weight_bytes == held
    save_sft_checkpoint(model, tok, tmp_path / "sft", cfg.checkpoint_fields())
    loaded, _, _ = load_sft_checkpoint(tmp_path / "sft", None, dtype="bfloat16")
    assert sum(p.numel() * p.element_size() for p in loaded.parameters()) == held
    for argv in (_grpo_argv(tmp_path / "sft", tmp_path / "grpo"),
                 ["evaluate", "--dataset", str(prepared_dir), "--checkpoint", str(tmp_path / "sft"),
                  "--output_dir", str(tmp_path / "ev")]):
        code, out = dry(argv, capsys)
        assert "LoRA adapters 8,192" in out, out
