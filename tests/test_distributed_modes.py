"""1 vs 2 processes for the configurations the per-module distributed tests do not launch.

tests/test_grpo.py, test_sft.py and test_evaluator.py launch the default GRPO (neg_ppl reward, head only, batch/group
advantages), a LoRA SFT with one latent token and a zero-shot beam evaluation. Here: GRPO with the rank reward,
KL to the reference, LoRA trained, the dapo loss, clipping over several iterations, held-out rewards, a skipped
(NaN) group, the Gaussian policy and two latent tokens; SFT without latent tokens (BIGRec), with two, full
fine-tuning, a Llama-style model and eval-loss model selection with early stopping; evaluation of latent SFT and
GRPO checkpoints, D3 guidance by a seqrec model, ``method: seqrec``, popularity, joint tokenization.

One ``accelerate launch`` per group runs every configuration of the group in sequence (a launch costs ~10 s of
imports per process here); the 1-process reference runs the same script in this process (tests/launching.py).
Each configuration is then checked by its own parametrised test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import train_tiny_sasrec, write_prepared
from tests.launching import accelerate_launch, assert_ranks_equal_single, run_script_here

# Exiting the interpreter after several trainings once ended a launched process in SIGABRT ("terminate called
# without an active exception", tests/test_grpo.py): once every process is past the last barrier and the outputs
# are written, a launched process leaves without running the interpreter's teardown.
_LEAVE = """
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    from accelerate import PartialState

    PartialState().wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
"""


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, Path]:
    """A prepared dataset, SFT checkpoints (tiny-qwen2 with 1 and 2 latent tokens, tiny-llama with 1) and a SASRec run."""
    from llmrec.training.sft import LatentSFTConfig, run_sft

    root = tmp_path_factory.mktemp("dist_modes")
    out = {"root": root, "data": write_prepared(root / "data")}
    for name, model, n in (("sft1", "tiny-qwen2", 1), ("sft2", "tiny-qwen2", 2), ("sft_llama", "tiny-llama", 1)):
        out[name] = root / name
        run_sft(LatentSFTConfig(
            output_dir=str(out[name]), model_name_or_path=model, model_dtype="float32", dataset=str(out["data"]),
            max_train_rows=8, eval_split=None, max_length=384, history_length=2, learning_rate=1e-2,
            per_device_train_batch_size=2, max_steps=2, save_strategy="no", lora_r=4, lora_alpha=8,
            lora_dropout=0.0, num_latent_tokens=n, disable_tqdm=True, seed=0))
    out["sasrec"] = train_tiny_sasrec(out["data"], root / "sasrec")
    return out


def _resolve(configs: dict[str, dict], paths: dict[str, Path]) -> str:
    """The configurations as the scripts' JSON argument, with every ``"@name"`` value replaced by ``paths[name]``."""
    return json.dumps({name: {k: str(paths[v[1:]]) if isinstance(v, str) and v.startswith("@") else v
                              for k, v in kw.items()} for name, kw in configs.items()})


def _one_and_two(root: Path, script_text: str, one_args: list, two_args: list, port_offset: int) -> tuple[Path, Path]:
    script = root / "script.py"
    script.write_text(script_text)
    run_script_here(script, root / "one", *one_args)
    accelerate_launch(2, [script, root / "two", *two_args], port_offset=port_offset)
    return root / "one", root / "two"


# ---------------------------------------------------------------------------------------------------- GRPO

GRPO_SCRIPT = """
import json, os, sys
import torch
from safetensors.torch import save_file
from llmrec.training.grpo import LatentGRPOConfig, LatentGRPOTrainer

torch.set_num_threads(1)
out, accum, configs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
for name, kw in configs.items():
    kw = dict(kw)
    nan = kw.pop("nan_first_prompt", False)
    cfg = dict(output_dir=f"{out}/{name}", num_generations=4, per_device_train_batch_size=8,
               gradient_accumulation_steps=accum, max_steps=3, learning_rate=5e-3, save_steps=100, seed=0,
               warmup_steps=0, lr_scheduler_type="constant", disable_tqdm=True, adam_epsilon=1e-6)
    cfg.update(kw)
    t = LatentGRPOTrainer(LatentGRPOConfig(**cfg))
    if nan:  # as tests/test_grpo.py::_train_with_a_nan_prompt: the first prompt of step 0 is NaN inside the model
        used = {i for r in t.rows for i in r["prompt_ids"] + r["completion_ids"]}
        used |= {t.pad, t.tokenizer.eos_token_id, *t.latent_lm.config.latent_token_ids}
        bad = next(i for i in range(10, t.latent_lm.embed_tokens.weight.shape[0]) if i not in used)
        t.latent_lm.embed_tokens.register_forward_hook(
            lambda m, a, o: o.masked_fill((a[0] == bad)[..., None], float("nan")))
        row = t.epoch_order(0)[0]
        t.rows[row] = dict(t.rows[row], prompt_ids=[bad] + t.rows[row]["prompt_ids"])
    t.train()
    state = {k: v.detach().contiguous() for k, v in t._trainable_state().items()}
    save_file(state, f"{out}/{name}/rank{t.accelerator.process_index}.safetensors")
""" + _LEAVE

# Optimiser batch: 8 prompts x G = 4 (1 process x 4 accumulation steps vs 2 x 2), 2 prompts per micro-batch unless
# said otherwise. Adam turns the float noise of a near-zero gradient element (another summation order: the layouts'
# micro-batches hold other prompts) into a step of up to ~lr: at lr 5e-3 the Gaussian policy and two latent tokens
# differ by 1-8e-5 between 1 and 2 processes and as much between two micro-batch layouts of one process, hence
# their lower learning rates (a layout bug still moves the weights by ~lr). The script's adam_epsilon of 1e-6 (the
# default 1e-8) bounds it further: an element's step is ~lr * g / (|g| + eps), so the noise of a gradient below eps
# moves it by ~noise * lr / eps. With 1e-8, rank_popularity's key projection differed by 8.6e-5 between the layouts
# on one Xeon (2.8 GHz, AVX2; 13 of its 4096 elements above 1e-5, the code of several sessions), under 1e-5 on others;
# with 1e-6 every configuration is within 7e-6 there.
GRPO_CONFIGS = {
    "rank_reward": dict(reward_funcs=["neg_ppl", "reciprocal_rank", "candidate_log_softmax"],
                        reward_weights=[1.0, 0.5, 0.5], rank_candidates=5, eval_rows=5),
    "rank_popularity": dict(reward_funcs=["candidate_log_softmax"], rank_candidates=5, rank_negatives="popularity",
                            advantage_mode="group", learning_rate=5e-4),
    # negatives mined by each process's share of the beam searches, gathered: the same on both layouts
    "rank_beam": dict(reward_funcs=["candidate_log_softmax"], rank_candidates=4, rank_negatives="beam",
                      advantage_mode="group", eval_rows=5, learning_rate=5e-4),
    # each process searches its own prompts with the current (identical) weights at every step
    "rank_beam_current": dict(reward_funcs=["candidate_log_softmax"], rank_candidates=4,
                              rank_negatives="beam_current", advantage_mode="group", eval_rows=5,
                              learning_rate=5e-4),
    "kl": dict(beta=0.1),
    "kl_lora": dict(beta=0.1, train_lora=True),
    "dapo_cosine": dict(loss_type="dapo", lr_scheduler_type="cosine", warmup_steps=1),
    "clip_3_iterations": dict(num_iterations=3, epsilon=0.001, epsilon_high=0.001, advantage_mode="group"),
    "eval_rows": dict(eval_rows=5),
    # 1 prompt per micro-batch: the NaN prompt's micro-batch has no valid group and runs the zero-weight pass
    "nan_group": dict(nan_first_prompt=True, per_device_train_batch_size=4),
    "gaussian_antithetic": dict(policy_logprob="gaussian", noise_mode="relative", noise_scale=0.3,
                                antithetic_noise=True, num_generations=5, per_device_train_batch_size=10,
                                advantage_mode="group", learning_rate=5e-4),
    "two_latents_lora": dict(sft_checkpoint="@sft2", train_lora=True, learning_rate=1e-3),
    # vanilla GRPO: each member samples a title (draws keyed by seed, epoch, row and member), rewarded on it
    "generate": dict(rollout="generate", reward_funcs=["exact_match", "token_f1"], temperature=1.5,
                     advantage_mode="group", learning_rate=5e-3, eval_rows=5),
    "generate_lora_kl": dict(rollout="generate", reward_funcs=["token_f1"], train_lora=True, beta=0.1,
                             num_iterations=2),
}


@pytest.fixture(scope="module")
def grpo_runs(fx, tmp_path_factory) -> tuple[Path, Path]:
    arg = _resolve({name: {"sft_checkpoint": "@sft1", **kw} for name, kw in GRPO_CONFIGS.items()}, fx)
    return _one_and_two(tmp_path_factory.mktemp("grpo"), GRPO_SCRIPT, [4, arg], [2, arg], port_offset=101)


@pytest.mark.parametrize("name", list(GRPO_CONFIGS))
def test_grpo_two_processes_match_one_process(grpo_runs, name):
    one, two = (d / name for d in grpo_runs)
    assert_ranks_equal_single(two, one)
    a, b = (json.loads((d / "grpo_results.json").read_text()) for d in (one, two))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert len(a["log_history"]) == len(b["log_history"]) == 3
    for x, y in zip(a["log_history"], b["log_history"]):
        assert x["reward"] == pytest.approx(y["reward"], rel=1e-6)
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        # The member latents are pooled from left-padded prompt batches of another make-up on 2 processes: float32
        # noise of ~1e-7, which the small std of the candidate log-softmax (~0.03) turns into ~2e-6 relative.
        # A std's noise is that of the rewards it spreads, so its tolerance scales with their size: on an AVX2 CPU
        # the tiny model's neg_ppl rewards near -620 moved the mean by 1.6e-5 and the std of 21 by 2.6e-5 between layouts.
        for key in (k for k in x if k.startswith("rewards/")):
            rel = 1e-5 if key.startswith("rewards/candidate_log_softmax/") else 1e-6
            scale = abs(x[key.removesuffix("/std") + "/mean"]) if key.endswith("/std") else 0.0
            assert x[key] == pytest.approx(y[key], rel=rel, abs=max(rel * scale, 1e-9)), key
    trained = load_file(str(one / "rank0.safetensors"))
    assert any("lora_" in k for k in trained) == GRPO_CONFIGS[name].get("train_lora", False)
    # kl and clip_ratio are token means over the optimiser batch (they were means of per-micro-batch means,
    # which depended on how prompts fell into micro-batches and processes)
    for x, y in zip(a["log_history"], b["log_history"]):
        for key in ("kl", "clip_ratio"):
            assert (key in x) == (key in y)
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-9), key
    if name.startswith("kl"):
        assert a["log_history"][0]["kl"] == pytest.approx(0.0, abs=1e-7)
        assert a["log_history"][1]["kl"] > 0 and b["log_history"][1]["kl"] > 0
    if name == "clip_3_iterations":
        assert max(h["clip_ratio"] for h in a["log_history"]) > 0 and max(h["clip_ratio"] for h in b["log_history"]) > 0
    if name == "rank_reward":
        assert "rewards/reciprocal_rank/mean" in a["log_history"][-1]
        assert "rewards/candidate_log_softmax/mean" in a["log_history"][-1]
        for when in ("eval_before", "eval_after"):  # held-out candidate draws do not depend on the layout
            for k in ("reciprocal_rank", "candidate_log_softmax"):
                assert a[when][k] == pytest.approx(b[when][k], rel=1e-6), (when, k)
    if name == "rank_beam":  # one beam search per prompt, split over the processes, gathered whole
        mined = [json.loads((d / "beam_negatives.json").read_text())["rows"] for d in (one, two)]
        assert mined[0] == mined[1] and len(mined[0]["valid"]) == 5 and len(mined[0]["train"]) >= 8
        for when in ("eval_before", "eval_after"):
            assert a[when]["candidate_log_softmax"] == pytest.approx(b[when]["candidate_log_softmax"], rel=1e-5)
    if name == "rank_beam_current":  # train prompts searched at each step; only the held-out rows ahead
        mined = [json.loads((d / "beam_negatives.json").read_text())["rows"] for d in (one, two)]
        assert mined[0] == mined[1] and set(mined[0]) == {"valid"}
        for x, y in zip(a["log_history"], b["log_history"]):
            assert x["beam_current/target_in_beam"] == y["beam_current/target_in_beam"]
        for when in ("eval_before", "eval_after"):
            assert a[when]["candidate_log_softmax"] == pytest.approx(b[when]["candidate_log_softmax"], rel=1e-5)
    if name == "eval_rows":
        for when in ("eval_before", "eval_after"):
            assert a[when]["rows"] == b[when]["rows"] == 5
            for k in ("neg_ppl", "log_likelihood"):
                assert a[when][k] == pytest.approx(b[when][k], rel=1e-6), (when, k)
        assert a["eval_after"] != a["eval_before"]
    if name == "generate":  # held-out titles sampled per row and member, keyed: the same on any layout
        for when in ("eval_before", "eval_after"):
            for k in ("exact_match", "token_f1", "log_likelihood"):
                assert a[when][k] == pytest.approx(b[when][k], rel=1e-6), (when, k)
            assert 0.0 <= a[when]["token_f1"] <= 1.0
    if name == "nan_group":
        assert a["skipped_groups"] == b["skipped_groups"] == 1
        assert a["nonfinite_grad_steps"] == b["nonfinite_grad_steps"] == 0
        assert all(torch.isfinite(v).all() for v in trained.values())


# ----------------------------------------------------------------------------------------------------- SFT

SFT_SCRIPT = """
import json, os, sys
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback
from llmrec.training.sft import LatentSFTConfig, _latent_lm, run_sft

torch.set_num_threads(1)
out, accum, configs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])


class DumpRank(TrainerCallback):
    def __init__(self, directory):
        self.directory = directory

    def on_train_end(self, args, state, control, model=None, **kwargs):
        sd = {k: v.detach().contiguous() for k, v in _latent_lm(model).named_parameters() if v.requires_grad}
        save_file(sd, f"{self.directory}/rank{args.process_index}.safetensors")


for name, kw in configs.items():
    cfg = dict(output_dir=f"{out}/{name}", model_name_or_path="tiny-qwen2", model_dtype="float32",
               max_train_rows=8, eval_split=None, history_length=2, max_length=384, lora_dropout=0.0, lora_r=4,
               lora_alpha=8, num_latent_tokens=1, learning_rate=5e-3, warmup_steps=0, max_steps=3, logging_steps=1,
               per_device_train_batch_size=2, gradient_accumulation_steps=accum, save_strategy="no",
               disable_tqdm=True, seed=0)
    cfg.update(kw)
    run_sft(LatentSFTConfig(**cfg), callbacks=[DumpRank(f"{out}/{name}")])
""" + _LEAVE

_EVAL_SELECT = dict(eval_split="valid", per_device_eval_batch_size=2, eval_strategy="steps", eval_steps=1,
                    save_strategy="steps", save_steps=1, load_best_model_at_end=True, early_stopping_patience=1,
                    max_steps=5, learning_rate=0.05)
# Global batch 4 rows: 1 process x 2 accumulation steps vs 2 x 1.
SFT_CONFIGS = {
    "bigrec": dict(num_latent_tokens=0),
    "two_latents": dict(num_latent_tokens=2),
    "full": dict(finetune="full"),
    "llama": dict(model_name_or_path="tiny-llama"),
    # eval loss every step, best checkpoint reloaded, early stopping (the lr makes the eval loss rise at step 2);
    # 4 validation rows fill every eval batch of both layouts (2 rows x 2 processes)
    "eval_select": dict(_EVAL_SELECT, max_eval_rows=4),
    # 5 rows: on 2 processes accelerate completes the last eval batch with row 0 again; eval_loss is computed
    # from per-row sums that gather_for_metrics returns once per row (a batch-mean loss had the copy mixed in:
    # eval_loss, and so model selection, differed from 1 process: 6.32724 vs 6.32866)
    "eval_select_uneven": dict(_EVAL_SELECT, max_eval_rows=5),
    # 7 train rows, global batch 4: on 2 processes accelerate completed the last batch with a copy of an early row,
    # trained on twice (weights differed from 1 process by 4e-3); a loss-free filler row now completes it on both
    "train_uneven": dict(max_train_rows=7, max_steps=4),
}


@pytest.fixture(scope="module")
def sft_runs(fx, tmp_path_factory) -> tuple[Path, Path]:
    arg = _resolve({name: dict(kw, dataset="@data") for name, kw in SFT_CONFIGS.items()}, fx)
    return _one_and_two(tmp_path_factory.mktemp("sft"), SFT_SCRIPT, [2, arg], [1, arg], port_offset=202)


@pytest.mark.parametrize("name", list(SFT_CONFIGS))
def test_sft_two_processes_match_one_process(sft_runs, name):
    one, two = (d / name for d in sft_runs)
    a, b = (json.loads((d / "train_results.json").read_text()) for d in (one, two))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    if "eval_split" in SFT_CONFIGS[name]:
        assert len(a["eval_losses"]) >= 2
        assert [e["eval_loss"] for e in a["eval_losses"]] == pytest.approx([e["eval_loss"] for e in b["eval_losses"]],
                                                                           abs=1e-6)
        # early stopping ended both runs at the same step and reloaded the same best checkpoint
        assert a["global_step"] == b["global_step"] < SFT_CONFIGS[name]["max_steps"]
        assert Path(a["best_checkpoint"]).name == Path(b["best_checkpoint"]).name
    assert_ranks_equal_single(two, one)
    l1, l2 = ([r["loss"] for r in x["train_losses"]] for x in (a, b))
    assert len(l1) == len(l2) == a["global_step"]
    assert l1 == pytest.approx(l2, abs=1e-5)
    trained = load_file(str(one / "rank0.safetensors"))
    assert any("latent_head" in k for k in trained) == (SFT_CONFIGS[name].get("num_latent_tokens", 1) > 0)
    assert any("lora_" in k for k in trained) == (SFT_CONFIGS[name].get("finetune", "lora") == "lora")


# ------------------------------------------------------------------------------------------------ evaluate

EVAL_SCRIPT = """
import json, os, sys
import torch
from llmrec.evaluation.evaluator import EvalConfig, evaluate

torch.set_num_threads(1)
out, configs = sys.argv[1], json.loads(sys.argv[2])
for name, kw in configs.items():
    cfg = dict(split="test", method="beam", model_name_or_path="tiny-qwen2", dtype="float32", prompt="d3",
               noun="video games", num_beams=4, batch_size=2, ks=[1, 3], history_length=2, output_dir=f"{out}/{name}")
    cfg.update(kw)
    evaluate(EvalConfig(**cfg))
""" + _LEAVE


EVAL_CONFIGS = {
    "latent_sft": dict(checkpoint="@sft1"),
    "two_latents": dict(checkpoint="@sft2"),
    "latent_llama": dict(checkpoint="@sft_llama", model_name_or_path="tiny-llama"),
    "grpo_lora": dict(checkpoint="@grpo"),
    "d3_latent": dict(checkpoint="@sft1", guidance_checkpoint="@sasrec", guidance_weight=1.0, length_penalty=0.0),
    "d3_zero_shot_subset": dict(guidance_checkpoint="@sasrec", guidance_weight=0.5, max_rows=7, batch_size=3),
    "seqrec": dict(method="seqrec", checkpoint="@sasrec", ks=[1, 5, 10]),
    # rows split 2 + 1 over the processes: each process batched its own rows, so a row was scored in a batch of
    # another size than on 1 process and its stored score differed in the 6th decimal (a review); 3 subsets
    **{f"seqrec_three_rows_{seed}": dict(method="seqrec", checkpoint="@sasrec", ks=[1, 5, 10], max_rows=3,
                                         row_seed=seed) for seed in range(3)},
    "popularity": dict(method="popularity", ks=[1, 5]),
    "joint_longest_answer": dict(tokenization="joint", prompt_fit="longest_answer", max_rows=7, batch_size=3),
}


@pytest.fixture(scope="module")
def eval_runs(fx, tmp_path_factory) -> tuple[Path, Path]:
    from llmrec.training.grpo import LatentGRPOConfig, run_grpo

    root = tmp_path_factory.mktemp("eval")
    grpo = root / "grpo_lora"  # a GRPO checkpoint with its LoRA trained too (saved as a full SFT-layout checkpoint)
    run_grpo(LatentGRPOConfig(output_dir=str(grpo), sft_checkpoint=str(fx["sft1"]), num_generations=4,
                              per_device_train_batch_size=8, max_steps=1, learning_rate=5e-2, train_lora=True,
                              save_steps=100, seed=0, disable_tqdm=True))
    arg = _resolve({name: dict(kw, dataset="@data") for name, kw in EVAL_CONFIGS.items()}, dict(fx, grpo=grpo))
    return _one_and_two(root, EVAL_SCRIPT, [arg], [arg], port_offset=303)


@pytest.mark.parametrize("name", list(EVAL_CONFIGS))
def test_evaluate_two_processes_match_one_process(eval_runs, name):
    one, two = (d / name for d in eval_runs)
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert (a["num_processes"], b["num_processes"]) == (1, 2)
    assert a["fingerprint"] == b["fingerprint"]
    assert a["metrics"] == b["metrics"]
    ranked = (one / "rankings.jsonl").read_text()
    assert ranked == (two / "rankings.jsonl").read_text()  # rankings and scores, row by row
    rows = [json.loads(x) for x in ranked.splitlines()]
    assert len(rows) == a["protocol"]["rows"] > 0
    if name.startswith("d3"):
        assert "guidance" in a["protocol"]
    if name == "d3_latent":  # the guidance acts: the same checkpoint ranks otherwise without it
        plain = [json.loads(x) for x in (eval_runs[0] / "latent_sft" / "rankings.jsonl").read_text().splitlines()]
        assert [r["item_ranking"] for r in rows] != [r["item_ranking"] for r in plain]
