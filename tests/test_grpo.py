"""Latent GRPO (llmrec.training.grpo): rewards, advantages, the shared-prefix form against the naive
per-member form, config errors, NaN groups, resume, checkpoints, and 1 vs 2 processes. Tiny models, float32."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmrec.config import ConfigError
from llmrec.training.advantages import batch_advantages, compute_advantages, group_advantages
from llmrec.training.grpo import (
    LatentGRPOConfig,
    LatentGRPOModule,
    LatentGRPOTrainer,
    _collate,
    _seed_for,
    candidate_items,
    member_noise,
    run_grpo,
    score_candidates,
)
from llmrec.training.rewards import (
    REWARD_FUNCTIONS,
    RewardInputs,
    candidate_log_softmax,
    combine_rewards,
    log_likelihood,
    neg_ppl,
    reciprocal_rank,
    token_f1,
)
from llmrec.training.sft import LatentSFTConfig, run_sft

# ------------------------------------------------------------------------------------------------ rewards


def test_neg_ppl_and_log_likelihood_hand_computed():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 1.0, 1.0]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    inputs = RewardInputs(lp, mask)
    # member 0: mean log p = (log .5 + log .25) / 2 = log(1/sqrt(8)) -> ppl sqrt(8); member 1: ppl 10
    assert neg_ppl(inputs).tolist() == pytest.approx([-math.sqrt(8), -10.0], rel=1e-6)
    assert log_likelihood(inputs).tolist() == pytest.approx([math.log(1 / math.sqrt(8)), math.log(0.1)], rel=1e-6)
    with pytest.raises(ValueError, match="no target tokens"):
        neg_ppl(RewardInputs(lp, torch.zeros_like(mask)))


def test_reciprocal_rank_hand_computed_with_ties():
    scores = torch.tensor([[-1.0, -0.5, -3.0, -0.2],   # target (col 0) beaten by 2 -> rank 3
                           [-1.0, -1.0, -1.0, -1.0],   # all tied: ties count against the target -> rank 4
                           [0.0, -1.0, -2.0, -3.0]])   # best -> rank 1
    rr = reciprocal_rank(RewardInputs(torch.zeros(3, 1), torch.ones(3, 1), scores, torch.zeros(3, dtype=torch.long)))
    assert rr.tolist() == pytest.approx([1 / 3, 1 / 4, 1.0])
    with pytest.raises(ValueError, match="candidate_scores"):
        reciprocal_rank(RewardInputs(torch.zeros(1, 1), torch.ones(1, 1)))


def test_reciprocal_rank_of_a_member_with_a_nan_score_is_nan():
    """A NaN competitor must not rank below the target (NaN >= x is False, which improved the rank to 1/2 here),
    nor a NaN target give inf: the member's reward is NaN, so the trainer skips and counts its group."""
    nan = float("nan")
    scores = torch.tensor([[-1.0, nan, -0.2],    # true rank unknown (2 or 3); was 1/2
                           [nan, -0.5, -0.2],    # NaN target; was inf
                           [-1.0, -0.5, -0.2]])  # finite: rank 3
    rr = reciprocal_rank(RewardInputs(torch.zeros(3, 1), torch.ones(3, 1), scores, torch.zeros(3, dtype=torch.long)))
    assert math.isnan(rr[0]) and math.isnan(rr[1]) and rr[2].item() == pytest.approx(1 / 3)
    _, valid = compute_advantages(torch.stack([rr, torch.tensor([0.5, 0.5, 0.5])]), "group")
    assert valid.tolist() == [False, True]


def test_candidate_log_softmax_hand_computed():
    # target col 0 with probabilities 0.5 / 0.25 / 0.25 -> log 0.5; target col 1 of [1, 1, 1, 1] -> log 1/4
    scores = torch.stack([torch.log(torch.tensor([0.5, 0.25, 0.25, 1e-30])), torch.zeros(4)])
    out = candidate_log_softmax(RewardInputs(torch.zeros(2, 1), torch.ones(2, 1), scores, torch.tensor([0, 1])))
    assert out.dtype == torch.float64
    assert out.tolist() == pytest.approx([math.log(0.5), math.log(0.25)], rel=1e-6)
    # Shifting every score by a constant changes nothing; raising the target's score raises the reward even where
    # the reciprocal rank (already 1) stays put.
    shifted = candidate_log_softmax(RewardInputs(torch.zeros(2, 1), torch.ones(2, 1), scores - 7.0, torch.tensor([0, 1])))
    assert shifted.tolist() == pytest.approx(out.tolist(), rel=1e-6)
    up = scores.clone()
    up[0, 0] += 0.1
    assert candidate_log_softmax(RewardInputs(torch.zeros(2, 1), torch.ones(2, 1), up, torch.tensor([0, 1])))[0] > out[0]
    with pytest.raises(ValueError, match="candidate_scores"):
        candidate_log_softmax(RewardInputs(torch.zeros(1, 1), torch.ones(1, 1)))


def test_docstring_examples_hold():
    import doctest

    import llmrec.training.advantages as advantages
    import llmrec.training.rewards as rewards

    for mod in (rewards, advantages):
        assert doctest.testmod(mod).failed == 0, mod.__name__


def test_combine_rewards_weighted_sum_and_registry():
    total = combine_rewards({"neg_ppl": torch.tensor([-2.0, -4.0]), "log_likelihood": torch.tensor([-1.0, 0.0])},
                            {"neg_ppl": 0.5, "log_likelihood": 2.0})
    assert total.tolist() == [-3.0, -2.0]
    assert {"neg_ppl", "log_likelihood", "reciprocal_rank", "candidate_log_softmax"} <= set(REWARD_FUNCTIONS)


# --------------------------------------------------------------------------------------------- advantages


def test_batch_advantage_hand_computed():
    r = torch.tensor([[1.0, 2.0, 0.0], [3.0, 3.0, 6.0]], dtype=torch.float64)
    a = batch_advantages(r, torch.tensor([True, True]))
    raw = torch.tensor([[-1.0, 0.0, -2.0], [1.0, 1.0, 4.0]], dtype=torch.float64)  # baseline (1 + 3) / 2 = 2
    assert torch.allclose(a, raw / (raw.norm() + 1e-6))


def test_group_advantage_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]], dtype=torch.float64)
    a = group_advantages(r, torch.tensor([True, True]))
    assert a[0].tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001])  # std (unbiased) of 1,2,3 is 1
    assert a[1].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("mode", ["batch", "group"])
def test_non_finite_group_is_skipped(mode):
    r = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, float("inf")], [0.0, 5.0]])
    adv, valid = compute_advantages(r, mode)
    assert valid.tolist() == [True, False, False, True]
    assert adv[1].tolist() == [0.0, 0.0] and adv[2].tolist() == [0.0, 0.0]
    ref, _ = compute_advantages(r[[0, 3]], mode)  # the bad groups take no part in the baseline or the norm
    assert torch.allclose(adv[[0, 3]], ref)
    assert torch.isfinite(adv).all()


def test_batch_advantage_of_a_huge_but_finite_reward_is_not_zeroed():
    """||A|| squared its entries: one member ~1e200 off the baseline made it inf and every advantage 0."""
    r = torch.tensor([[-50.0, -40.0, -60.0, -1e200], [-30.0, -20.0, -35.0, -25.0]], dtype=torch.float64)
    adv, valid = compute_advantages(r, "batch")
    assert valid.all()
    a = r - r[:, 0].mean()
    assert torch.allclose(adv, a / (a / 1e200).norm() / 1e200)  # the huge member -> ~-1, the others ~1e-199
    assert adv[0, 3] == pytest.approx(-1.0) and bool((adv[1] != 0).all())


@pytest.mark.parametrize("mode", ["batch", "group"])
def test_a_group_whose_advantages_would_overflow_is_skipped(mode):
    r = torch.tensor([[-1.7e308, 1.7e308], [1.0, 3.0], [2.0, 2.5]], dtype=torch.float64)  # differences: inf
    adv, valid = compute_advantages(r, mode)
    assert valid.tolist() == [False, True, True] and torch.isfinite(adv).all()
    assert adv[0].tolist() == [0.0, 0.0]
    assert torch.allclose(adv[1:], compute_advantages(r[1:], mode)[0])
    # rewards up to 1e300 apart: a group std that squared them overflowed, NaN advantages in a "valid" group
    r = torch.tensor([[-1e300, 1e300, 0.0], [1.0, 3.0, 2.0]], dtype=torch.float64)
    adv, valid = compute_advantages(r, mode)
    assert valid.all() and torch.isfinite(adv).all() and adv[0, 1] > 0 > adv[0, 0]


def test_advantage_errors():
    with pytest.raises(ValueError, match="advantage mode"):
        compute_advantages(torch.zeros(2, 2), "nope")
    with pytest.raises(ValueError, match="G >= 2"):
        compute_advantages(torch.zeros(2, 1), "group")


# ------------------------------------------------------------------------------------------------- noise


def test_noise_depends_on_seed_epoch_row_only():
    a = member_noise(0, 0, 7, 4, 16)
    assert torch.equal(a, member_noise(0, 0, 7, 4, 16))
    assert a[0].abs().sum() == 0 and a[1:].abs().sum() > 0
    assert not torch.equal(a, member_noise(0, 0, 8, 4, 16))
    assert not torch.equal(a, member_noise(0, 1, 7, 4, 16))
    assert not torch.equal(a, member_noise(1, 0, 7, 4, 16))
    # rows past the linear key's span do not repeat a row of the next epoch (they did: row 1_000_033 of epoch 0
    # drew row 0 of epoch 1's noise); below it the seeds are the ones earlier runs drew
    assert not torch.equal(member_noise(0, 0, 1_000_033, 4, 16), member_noise(0, 1, 0, 4, 16))
    assert not torch.equal(member_noise(0, 0, 2_000_066, 4, 16), member_noise(0, 2, 0, 4, 16))
    assert _seed_for(42, 3, 17, 1) == ((42 * 1_000_003 + 3) * 1_000_033 + 17) * 31 + 1
    m = member_noise(0, 0, 7, 5, 16, antithetic=True)
    assert m[0].abs().sum() == 0 and torch.equal(m[2], -m[1]) and torch.equal(m[4], -m[3])
    assert not torch.equal(m[1].abs(), m[3].abs())
    with pytest.raises(ValueError, match="even number"):
        member_noise(0, 0, 7, 4, 16, antithetic=True)
    c = candidate_items(0, 0, 3, target=5, num_items=20, k=6)
    assert c[0] == 5 and len(set(c)) == 6 and all(1 <= i <= 20 for i in c)
    with pytest.raises(ValueError, match="exceeds"):
        candidate_items(0, 0, 3, target=5, num_items=4, k=6)


def test_popularity_candidates_follow_the_weights():
    """rank_negatives=popularity: others drawn without replacement in proportion to the weights, never the target
    or an excluded item, the same draw for the same (seed, epoch, row)."""
    w = torch.ones(20)
    w[[1, 2]] = 200.0  # items 2 and 3: ~20x the mass of the other 18 together
    draws = [candidate_items(0, 0, r, target=7, num_items=20, k=3, exclude=frozenset({7, 9}), weights=w)
             for r in range(200)]
    for c in draws:
        assert c[0] == 7 and len(set(c)) == 3 and 9 not in c[1:] and all(1 <= i <= 20 for i in c)
    both = sum(set(c[1:]) == {2, 3} for c in draws)
    assert 150 < both < 200  # 16 others of weight 1: P(both) = 400/416 * 200/216 ~ 0.89
    assert draws[5] == candidate_items(0, 0, 5, target=7, num_items=20, k=3, exclude=frozenset({7, 9}), weights=w)
    assert draws[5] != candidate_items(0, 1, 5, target=7, num_items=20, k=3, exclude=frozenset({7, 9}), weights=w) \
        or draws[6] != candidate_items(0, 1, 6, target=7, num_items=20, k=3, exclude=frozenset({7, 9}), weights=w)
    # A target with all the mass still gets k - 1 others.
    heavy = torch.ones(20)
    heavy[6] = 1e9
    assert len(set(candidate_items(0, 0, 1, target=7, num_items=20, k=20, weights=heavy))) == 20
    with pytest.raises(ValueError, match="positive"):
        candidate_items(0, 0, 1, target=7, num_items=20, k=3, weights=torch.zeros(20))


# ------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw, match", [
    (dict(rank_chunk_rows=0), "rank_chunk_rows"),
    (dict(reward_weights=[float("nan")]), "reward_weights must be finite"),
    (dict(beta=-0.5), "beta"),
    (dict(epsilon=1.5), "epsilon must be"),
    (dict(epsilon_high=-0.1), "epsilon_high"),
    (dict(max_length=0), "max_length"),
])
def test_config_values_refused_at_start(tmp_path, kw, match):
    """Accepted before, then failing after the model loaded (rank_chunk_rows), training nothing (a NaN weight),
    silently dropping the KL (beta < 0), a negative clip bound, or a max_length 0 silently taken as the SFT's."""
    with pytest.raises(ConfigError, match=match):
        LatentGRPOConfig(output_dir=str(tmp_path / "o"), sft_checkpoint=str(tmp_path / "s"), num_generations=4,
                         per_device_train_batch_size=4, **kw)


def test_config_errors(tmp_path):
    base = dict(output_dir=str(tmp_path / "o"), sft_checkpoint=str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="num_generations"):
        LatentGRPOConfig(**base, num_generations=1, per_device_train_batch_size=4)
    with pytest.raises(ConfigError, match="multiple of"):
        LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=6)
    with pytest.raises(ConfigError, match="noise_scale"):
        LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=4, noise_scale=0.0)
    with pytest.raises(ConfigError, match="noise_scale"):
        LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=4, noise_scale=-1.0)
    with pytest.raises(ConfigError, match="num_generations must be odd"):
        LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=4, antithetic_noise=True)
    with pytest.raises(ConfigError, match="unknown reward"):
        LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=4, reward_funcs=["bleu"])
    with pytest.raises(ConfigError, match="reward_weights"):
        LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=4, reward_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match=r"\['neg_ppl'\] named more than once"):  # weights and rewards misaligned
        LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=4,
                         reward_funcs=["neg_ppl", "neg_ppl"], reward_weights=[1.0, 1.0])
    for bad in (dict(history_length=0), dict(max_train_rows=-5), dict(eval_rows=-1),
                dict(gradient_accumulation_steps=0), dict(num_train_epochs=0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=4, **bad)
    with pytest.raises(ConfigError, match="per_device_train_batch_size must be >= 1"):  # a ZeroDivisionError before
        LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=0)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):  # found at the final save, after training
        LatentGRPOConfig(**{**base, "output_dir": str(tmp_path / "afile")}, num_generations=4,
                         per_device_train_batch_size=4)
    with pytest.raises(ConfigError, match="output_dir must differ"):
        LatentGRPOConfig(output_dir=str(tmp_path / "s"), sft_checkpoint=str(tmp_path / "s"), num_generations=4,
                         per_device_train_batch_size=4)
    # TRL options this trainer does not implement are refused rather than silently ignored
    for name, value in (("scale_rewards", "batch"), ("importance_sampling_level", "sequence"), ("delta", 2.0),
                        ("use_vllm", True), ("optim", "adafactor"), ("entropy_coef", 0.5),
                        ("multi_objective_aggregation", "normalize_then_sum"), ("shuffle_dataset", False),
                        ("min_p", 0.2), ("generation_kwargs", {"top_k": 3}), ("use_adaptive_entropy", True),
                        ("max_completion_length", 16), ("cast_lm_head_to_fp32", True)):
        with pytest.raises(ConfigError, match=f"{name}=.*does not implement"):
            LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=4, **{name: value})
    for name, value in (("save_strategy", "no"), ("per_device_eval_batch_size", 64), ("dataloader_num_workers", 4),
                        ("eval_strategy", "steps"), ("load_best_model_at_end", True), ("resume_from_checkpoint", "x")):
        with pytest.raises(ConfigError, match=f"{name}=.*does not implement"):
            LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=4, **{name: value})
    with pytest.raises(ConfigError, match="output_dir is required"):  # was a TypeError from Path(None)
        LatentGRPOConfig(sft_checkpoint=str(tmp_path / "s"), num_generations=4, per_device_train_batch_size=4)
    # TrainingArguments fields the HF Trainer acts on and this trainer does not read (review)
    for name in ("bf16", "fp16", "gradient_checkpointing", "activation_checkpointing"):
        with pytest.raises(ConfigError, match=f"{name}=True has no effect in latent GRPO"):
            LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=4, **{name: True})
    # ... and fields inherited from TRL / TrainingArguments that were accepted and ignored (review, 2026-12-05):
    # torch_compile_backend even turned torch_compile on behind the torch_compile refusal; fsdp ran plain DDP
    for name, value in (("torch_compile_backend", "inductor"), ("torch_compile_mode", "max-autotune"),
                        ("fsdp", "full_shard"), ("fsdp_config", {"min_num_params": 10}), ("deepspeed", "ds.json"),
                        ("ddp_backend", "gloo"), ("accelerator_config", {"split_batches": True}),
                        ("model_init_kwargs", {"attn_implementation": "eager"}),
                        ("num_generations_eval", 4), ("bf16_full_eval", True), ("log_completions", True),
                        ("enable_jit_checkpoint", True), ("optim_args", "foo=1"), ("torch_empty_cache_steps", 5)):
        with pytest.raises(ConfigError, match=f"{name}=.* has no effect in latent GRPO"):
            LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=4, **{name: value})
    # accelerator_config always holds one: its default, also in the dict form a recorded config has, is accepted
    for default in (None, {}, {"split_batches": False, "even_batches": True}):
        LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=4, accelerator_config=default)
    with pytest.raises(ConfigError, match="train_sampling_strategy=.*does not implement"):
        LatentGRPOConfig(**base, num_generations=4, per_device_train_batch_size=4, train_sampling_strategy="sequential")


# ----------------------------------------------------------------------------------------- tiny SFT start


def _sft(root: Path, data: Path, model: str = "tiny-qwen2", n_latent: int = 1, lora_dropout: float = 0.0,
         head_output_norm: bool = False) -> Path:
    out = root / f"sft-{model}-{n_latent}" if lora_dropout == 0 else root / f"sft-{model}-{n_latent}-d{lora_dropout}"
    out = out.with_name(out.name + "-norm") if head_output_norm else out
    if not (out / "train_results.json").exists():
        run_sft(LatentSFTConfig(
            output_dir=str(out), model_name_or_path=model, dataset=str(data), max_train_rows=8, eval_split=None,
            max_length=384, history_length=2, learning_rate=1e-2, per_device_train_batch_size=2, max_steps=2,
            save_strategy="no", lora_r=4, lora_alpha=8, lora_dropout=lora_dropout, num_latent_tokens=n_latent,
            disable_tqdm=True, seed=0, head_output_norm=head_output_norm,
        ))
    return out


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    from conftest import write_prepared

    root = tmp_path_factory.mktemp("grpo")
    data = write_prepared(root / "data")
    return _sft(root, data), data, root


class _Stop(Exception):
    pass


def _train_until(config: LatentGRPOConfig, step: int) -> None:
    """Train and stop (as a kill would) right after optimiser step ``step`` and its checkpoint."""

    def stop(trainer, stats):
        if trainer.global_step == step:
            raise _Stop

    with pytest.raises(_Stop):
        LatentGRPOTrainer(config, callbacks=[stop]).train()


def grpo_config(out: Path, sft: Path, **kw) -> LatentGRPOConfig:
    base = dict(output_dir=str(out), sft_checkpoint=str(sft), num_generations=4, per_device_train_batch_size=4,
                gradient_accumulation_steps=2, max_steps=3, learning_rate=5e-3, save_steps=100, seed=0,
                warmup_steps=0, lr_scheduler_type="constant", disable_tqdm=True)
    base.update(kw)
    return LatentGRPOConfig(**base)


def _fast_vs_naive(trainer: LatentGRPOTrainer):
    """Token log-probs and head/LoRA gradients of one micro-batch under both forms, same noise."""
    batch = trainer.local_micro_batches(0)[0]
    module = trainer.accelerator.unwrap_model(trainer.module)
    t = {k: getattr(batch, k) for k in ("prompt_input_ids", "prompt_attention_mask", "completion_input_ids",
                                         "completion_attention_mask")}
    g = module.group_size
    torch.manual_seed(3)
    noise = torch.randn(len(batch.rows) * g, module.latent_lm.lm_config.hidden_size) * 0.7
    noise[::g] = 0
    weights = torch.randn(len(batch.rows) * g, t["completion_input_ids"].shape[1])
    mask = t["completion_attention_mask"].repeat_interleave(g, 0)
    results = []
    for naive, rows_per_pass in ((False, 1), (True, 1), (True, 3)):
        module.naive, module.naive_rows_per_pass = naive, rows_per_pass
        module.zero_grad(set_to_none=True)
        res = module(**t, noise=noise)
        lp, latent = res.logprobs, res.latent
        (lp * weights * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((lp.detach() * mask, latent.detach(), grads))
    module.naive = False
    return results


@pytest.mark.parametrize("model,n_latent,train_lora,head_output_norm", [
    ("tiny-qwen2", 1, False, False), ("tiny-llama", 1, True, False), ("tiny-qwen2", 2, True, False),
    ("tiny-llama", 2, False, False), ("tiny-qwen2", 2, False, True),
])
def test_shared_prefix_equals_naive_per_member_form(tmp_path, sft_dir, model, n_latent, train_lora, head_output_norm):
    _, data, root = sft_dir
    sft = _sft(root, data, model, n_latent, head_output_norm=head_output_norm)
    trainer = LatentGRPOTrainer(grpo_config(tmp_path / "o", sft, train_lora=train_lora, per_device_train_batch_size=8))
    (lp_a, lat_a, g_a), (lp_b, lat_b, g_b), (lp_c, _, g_c) = _fast_vs_naive(trainer)
    assert (lp_b - lp_c).abs().max().item() < 1e-5  # naive, member by member vs 3 rows per pass (padded)
    for k in g_b:
        assert torch.allclose(g_b[k], g_c[k], atol=1e-6, rtol=1e-4), k
    assert (lp_a - lp_b).abs().max().item() < 1e-4
    assert (lat_a - lat_b).abs().max().item() < 1e-5
    assert g_a.keys() == g_b.keys() and g_a
    assert any("lora_" in k for k in g_a) == train_lora
    assert any("latent_head" in k for k in g_a)
    assert any("output_norm_weight" in k for k in g_a) == head_output_norm
    for k in g_a:
        rel = (g_a[k] - g_b[k]).abs().max().item() / max(g_b[k].abs().max().item(), 1e-30)
        assert rel < 1e-4, (k, rel)


def test_candidate_log_softmax_reward_trains_with_an_advantage_in_every_group(tmp_path, sft_dir):
    """A continuous reward differs between the members of every group, so no group is left without advantages;
    the reciprocal rank among a few candidates under small noise often is the same for a whole group."""
    sft, _, _ = sft_dir
    kw = dict(rank_candidates=5, advantage_mode="group", policy_logprob="gaussian", noise_mode="relative",
              noise_scale=0.01, max_train_rows=16)
    zero_groups = {}
    for reward in ("candidate_log_softmax", "reciprocal_rank"):
        t = LatentGRPOTrainer(grpo_config(tmp_path / reward, sft, reward_funcs=[reward], **kw))
        zero_groups[reward] = 0
        for step in range(2):
            batches = t.local_micro_batches(step)
            t.score(step, batches)
            for b in batches:
                zero_groups[reward] += int((b.advantages.view(-1, 4).abs().sum(1) == 0).sum())
    assert zero_groups["candidate_log_softmax"] == 0
    assert zero_groups["reciprocal_rank"] > 0
    res = run_grpo(grpo_config(tmp_path / "g", sft, reward_funcs=["candidate_log_softmax"], **kw))
    for entry in res["log_history"]:
        reward = entry["rewards/candidate_log_softmax/mean"]
        assert math.isfinite(reward) and reward < 0 and entry["grad_norm"] > 0


def test_popularity_negatives_count_the_train_split_targets(tmp_path, sft_dir):
    sft, data, _ = sft_dir
    t = LatentGRPOTrainer(grpo_config(tmp_path / "p", sft, reward_funcs=["candidate_log_softmax"], rank_candidates=4,
                                      rank_negatives="popularity", max_train_rows=4))
    counts = torch.zeros(t.num_items, dtype=torch.float64)
    for line in (Path(data) / "train.jsonl").read_text().splitlines():  # every train row, not the 4 prompts
        counts[json.loads(line)["target_item_id"] - 1] += 1
    assert counts.sum() > 4
    assert torch.equal(t.candidate_weights, counts + 1)
    assert LatentGRPOTrainer(grpo_config(tmp_path / "u", sft, reward_funcs=["candidate_log_softmax"],
                                         rank_candidates=4)).candidate_weights is None
    res = run_grpo(grpo_config(tmp_path / "r", sft, reward_funcs=["candidate_log_softmax"], rank_candidates=4,
                               rank_negatives="popularity", max_steps=1, eval_rows=3))
    assert math.isfinite(res["log_history"][0]["rewards/candidate_log_softmax/mean"])
    assert 0 < res["eval_before"]["reciprocal_rank"] <= 1
    with pytest.raises(ConfigError, match="rank_negatives"):
        grpo_config(tmp_path / "x", sft, rank_negatives="hard")
    # A target whose title another item shares has one candidate fewer: too many candidates are refused at start
    # (a run died at the first such target, and again at every resume).
    twins = dict(t.candidate_completions)
    twins[2] = list(twins[1])
    kw = dict(model=t.latent_lm, tokenizer=t.tokenizer, meta=t.meta, rows=t.rows, num_items=t.num_items,
              candidate_completions=twins)
    with pytest.raises(ConfigError, match=f"rank_candidates={t.num_items} exceeds the {t.num_items - 1} candidates"):
        LatentGRPOTrainer(grpo_config(tmp_path / "w", sft, reward_funcs=["candidate_log_softmax"],
                                      rank_candidates=t.num_items), **kw)
    LatentGRPOTrainer(grpo_config(tmp_path / "w", sft, reward_funcs=["candidate_log_softmax"],
                                  rank_candidates=t.num_items - 1), **kw)
    rows = [dict(r) for r in t.rows]
    for r in rows:
        r.pop("row_index")
    with pytest.raises(ConfigError, match="title trie"):
        LatentGRPOTrainer(grpo_config(tmp_path / "y", sft, reward_funcs=["candidate_log_softmax"], rank_candidates=4,
                                      rank_negatives="beam"), model=t.latent_lm, tokenizer=t.tokenizer, meta=t.meta,
                          rows=rows, num_items=t.num_items, candidate_completions=t.candidate_completions)
    with pytest.raises(ConfigError, match="row_index"):
        LatentGRPOTrainer(grpo_config(tmp_path / "z", sft, reward_funcs=["candidate_log_softmax"], rank_candidates=4,
                                      rank_negatives="beam"), model=t.latent_lm, tokenizer=t.tokenizer, meta=t.meta,
                          rows=rows, num_items=t.num_items, candidate_completions=t.candidate_completions,
                          title_trie=object())


def test_candidate_items_take_the_first_items_then_draw():
    # the target (3), an excluded item (5) and a repeat are left out of ``first``; draws fill the rest
    items = candidate_items(0, 0, 0, 3, 20, 5, frozenset({5}), first=[7, 3, 5, 7, 9])
    assert items[:3] == [3, 7, 9] and len(set(items)) == 5 and 5 not in items
    assert candidate_items(0, 0, 0, 3, 20, 3, first=[7, 9, 11, 12]) == [3, 7, 9]  # only the first k - 1
    assert candidate_items(0, 0, 0, 3, 20, 4, first=[]) == candidate_items(0, 0, 0, 3, 20, 4)
    with pytest.raises(ValueError, match="not both"):
        candidate_items(0, 0, 0, 3, 20, 4, weights=torch.ones(20), first=[7])


def test_beam_negatives_are_the_starting_models_beam_search(tmp_path, sft_dir, monkeypatch):
    """rank_negatives=beam: each prompt's negatives are the items a plain (one prompt, unpadded) constrained beam
    search of the starting model ranks, in order, and they open the prompt's candidate list in training and held
    out; mined for the train prompts and the held-out rows before training, kept in output_dir, found there again
    by a resumed run (not mined by its own head), and mined before the resume loads its checkpoint without it."""
    import llmrec.training.grpo as grpo_module
    from llmrec.decoding.beam_search import PromptState, constrained_beam_search_from_state

    sft, _, _ = sft_dir
    kw = dict(reward_funcs=["candidate_log_softmax"], rank_candidates=4, rank_negatives="beam", max_train_rows=8,
              eval_rows=3, max_steps=2, save_steps=1, advantage_mode="group", learning_rate=5e-2)
    t = LatentGRPOTrainer(grpo_config(tmp_path / "b", sft, **kw))
    t.mine_beam_negatives("train", t.rows)
    lm = t.latent_lm
    for row in t.rows:
        ids = torch.tensor([row["prompt_ids"]])
        with torch.no_grad():
            cache, logits, mask, pos = lm.prefill_with_latents(ids, torch.ones_like(ids))
            out = constrained_beam_search_from_state(lm.causal_lm, t.title_trie, PromptState(
                next_token_logits=logits.float(), past_key_values=cache, attention_mask=mask, next_position_ids=pos),
                num_beams=4, length_penalty=1.0)[0]
        assert t.beam_negatives_for("train", row) == list(out.item_ranking)
    start = {k: v for k, v in t.beam_negatives.items()}

    # the mined items open every candidate list the rewards score (training and held out)
    seen = []
    real = grpo_module.candidate_items

    def spy(*args, **kwargs):
        items = real(*args, **kwargs)
        seen.append((args[3], args[8] if len(args) > 8 else kwargs.get("first"), items))
        return items

    monkeypatch.setattr(grpo_module, "candidate_items", spy)
    t.score(0, t.local_micro_batches(0))
    t.evaluate_rewards()
    assert len(seen) == t.prompts_per_step + 3
    for target, first, items in seen:
        assert first is not None and target not in items[1:]
        hard = [i for i in dict.fromkeys(first) if i != target and i in items]
        assert items[1 : 1 + len(hard)] == hard
    monkeypatch.setattr(grpo_module, "candidate_items", real)

    _train_until(grpo_config(tmp_path / "r", sft, **kw), 1)
    saved = json.loads((tmp_path / "r" / "beam_negatives.json").read_text())
    assert set(saved["rows"]) == {"train", "valid"} and len(saved["rows"]["valid"]) == 3
    assert {(int(r), e["prompt"]): e["items"] for r, e in saved["rows"]["train"].items()} == {
        (k[1], k[2]): v for k, v in start.items()}
    resumed = LatentGRPOTrainer(grpo_config(tmp_path / "r", sft, **kw))
    with torch.no_grad():  # a head unlike the starting one: mining again would give other items (checked below)
        for p in resumed.latent_lm.latent_head.parameters():
            p.add_(torch.randn_like(p))
    res = resumed.train()
    assert res["resumed_from"].endswith("checkpoint-1")
    assert {k: v for k, v in resumed.beam_negatives.items() if k[0] == "train"} == start
    assert math.isfinite(res["log_history"][-1]["rewards/candidate_log_softmax/mean"])
    assert 0 < res["eval_after"]["reciprocal_rank"] <= 1
    other = LatentGRPOTrainer(grpo_config(tmp_path / "other", sft, **kw))
    other.latent_lm.latent_head.load_state_dict(resumed.latent_lm.latent_head.state_dict())
    other.mine_beam_negatives("train", other.rows)
    assert other.beam_negatives != start  # so the perturbed head, had it mined, would have been seen
    # after a step, rows without negatives are an error, never mined by the trained model
    other.global_step = 1
    with pytest.raises(RuntimeError, match="starting model"):
        other.mine_beam_negatives("valid", other._encode_split(other.latent_lm, "valid", 2)[0])

    # Without the file, a resume mines before loading its checkpoint: the starting model's items again.
    (tmp_path / "r" / "beam_negatives.json").unlink()
    (tmp_path / "r" / "grpo_results.json").unlink()
    again = LatentGRPOTrainer(grpo_config(tmp_path / "r", sft, **kw))
    again.train()
    assert {k: v for k, v in again.beam_negatives.items() if k[0] == "train"} == start


def test_beam_current_negatives_follow_the_trained_head(tmp_path, sft_dir, monkeypatch):
    """rank_negatives=beam_current: each step's train prompts get the beam-search items of the head as it is at
    that step (not the starting model's), while the held-out check keeps the starting model's items, mined once
    before training; the log reports how often the target is among the current items."""
    import llmrec.training.grpo as grpo_module

    sft, _, _ = sft_dir
    kw = dict(reward_funcs=["candidate_log_softmax"], rank_candidates=4, rank_negatives="beam_current",
              max_train_rows=8, eval_rows=3, max_steps=1, advantage_mode="group")
    t = LatentGRPOTrainer(grpo_config(tmp_path / "c", sft, **kw))
    start = [t.beam_search_items(row) for row in t.rows]
    held = t._encode_split(t.latent_lm, "valid", 3)[0]
    t.mine_beam_negatives("valid", held)  # what train() does before its first step
    held_start = [t.beam_negatives_for("valid", row) for row in held]
    assert not any(k[0] == "train" for k in t.beam_negatives)  # train prompts are not mined ahead
    t.global_step = 1
    # The head after some training: its beam search ranks other items. A seeded draw: on this tiny model most draws
    # move no row's items, and the global RNG's state here is whatever loading left (a tiny model's build reseeded
    # it to 0 until it stopped touching it).
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in t.latent_lm.latent_head.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    assert [t.beam_search_items(row) for row in t.rows] != start

    seen = []
    real = grpo_module.candidate_items

    def spy(*args, **kwargs):
        seen.append(kwargs.get("first", args[8] if len(args) > 8 else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo_module, "candidate_items", spy)
    for step in range(t.steps_per_epoch):  # every prompt once
        stats = t.score(step, t.local_micro_batches(step))
        step_rows = [t.rows[r] for b in t.local_micro_batches(step) for r in b.rows]
        hits = [row["target_item_id"] in t.beam_search_items(row) for row in step_rows]
        assert stats["beam_current/target_in_beam"] == pytest.approx(sum(hits) / len(hits))
    order = [t.rows[r] for step in range(t.steps_per_epoch) for b in t.local_micro_batches(step) for r in b.rows]
    assert seen == [t.beam_search_items(row) for row in order]
    seen.clear()
    t._eval_rows = held
    searched = t.beam_search_items

    def no_search(row):
        raise AssertionError("the held-out check searched with the current head")

    monkeypatch.setattr(t, "beam_search_items", no_search)
    t.evaluate_rewards()  # held out: the starting model's items, not the perturbed head's
    assert seen == held_start
    monkeypatch.setattr(t, "beam_search_items", searched)
    monkeypatch.setattr(grpo_module, "candidate_items", real)

    # the search runs without dropout and gives the policy back in the mode it trains in
    import llmrec.decoding.beam_search as beam_module

    modes = []
    with_dropout = LatentGRPOTrainer(grpo_config(tmp_path / "d", sft, disable_dropout=False, **kw))
    real_search = beam_module.constrained_beam_search_from_state

    def watch(causal_lm, *args, **kwargs):
        modes.append(causal_lm.training)
        return real_search(causal_lm, *args, **kwargs)

    monkeypatch.setattr(beam_module, "constrained_beam_search_from_state", watch)
    assert with_dropout.latent_lm.training
    with_dropout.score(0, with_dropout.local_micro_batches(0))
    assert modes and not any(modes) and with_dropout.latent_lm.training
    monkeypatch.setattr(beam_module, "constrained_beam_search_from_state", real_search)

    res = run_grpo(grpo_config(tmp_path / "r", sft, **kw))
    saved = json.loads((tmp_path / "r" / "beam_negatives.json").read_text())
    assert set(saved["rows"]) == {"valid"}  # only the held-out rows are mined ahead
    assert 0.0 <= res["log_history"][0]["beam_current/target_in_beam"] <= 1.0
    assert 0 < res["eval_after"]["reciprocal_rank"] <= 1


def test_absolute_noise_on_normalised_latents_is_warned_about(tmp_path, sft_dir, caplog):
    _, data, root = sft_dir
    sft = _sft(root, data, "tiny-qwen2", 2, head_output_norm=True)
    with caplog.at_level(logging.WARNING, logger="llmrec.training.grpo"):
        LatentGRPOTrainer(grpo_config(tmp_path / "a", sft, noise_mode="absolute", noise_scale=1.5))
    assert "normalises its latents" in caplog.text and "noise_mode=relative" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmrec.training.grpo"):
        LatentGRPOTrainer(grpo_config(tmp_path / "r", sft, noise_mode="relative", noise_scale=0.3))
        LatentGRPOTrainer(grpo_config(tmp_path / "p", _sft(root, data), noise_mode="absolute", noise_scale=1.5))
    assert "normalises its latents" not in caplog.text


def test_training_runs_and_checkpoint_evaluates(tmp_path, sft_dir):
    sft, data, _ = sft_dir
    out = tmp_path / "grpo"
    kw = dict(reward_funcs=["neg_ppl", "reciprocal_rank"], reward_weights=[1.0, 1.0], rank_candidates=5)
    res = run_grpo(grpo_config(out, sft, **kw))
    assert res["global_step"] == 3 and len(res["log_history"]) == 3
    last = res["log_history"][-1]
    for key in ("rewards/neg_ppl/mean", "rewards/reciprocal_rank/mean", "advantage/abs_mean", "latent_norm",
                "noise_norm", "clip_ratio", "loss", "skipped_groups_total"):
        assert key in last, key
    names = {p.name for p in out.iterdir() if p.is_file()}
    assert {"latent_head.safetensors", "adapter_model.safetensors", "llmrec_config.json", "grpo_results.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    # The head changed and the (frozen) adapter did not.
    assert not torch.equal(load_file(str(out / "latent_head.safetensors"))["q_proj.weight"],
                           load_file(str(sft / "latent_head.safetensors"))["q_proj.weight"])
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(sft / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((out / "llmrec_config.json").read_text())
    assert meta["grpo"]["steps"] == 3
    # training_args.json is this run's GRPO configuration, not a copy of the SFT checkpoint's.
    args = json.loads((out / "training_args.json").read_text())
    assert args["output_dir"] == str(out) and args["reward_funcs"] == ["neg_ppl", "reciprocal_rank"]
    assert args["advantage_mode"] and args["policy_logprob"] == "target"
    # `llmrec evaluate --checkpoint` reads it.
    from llmrec.evaluation.evaluator import EvalConfig, evaluate

    r = evaluate(EvalConfig(dataset=str(data), model_name_or_path="tiny-qwen2", checkpoint=str(out), max_rows=4,
                            num_beams=3, ks=[1, 3], history_length=2, output_dir=str(tmp_path / "eval")))
    assert r["protocol"]["checkpoint"] == str(out)
    from llmrec.training.sft import load_sft_checkpoint

    loaded, _, _ = load_sft_checkpoint(out)
    trained = load_file(str(out / "latent_head.safetensors"))
    for k, v in loaded.latent_head.state_dict().items():
        assert torch.equal(v, trained[k]), k
    # A finished run is skipped on a rerun with its settings; with others it is refused, naming them.
    assert run_grpo(grpo_config(out, sft, **kw))["train_seconds_this_run"] == res["train_seconds_this_run"]
    with pytest.raises(ValueError, match=r"holds a finished GRPO run made with .*noise_scale=1\.5 \(asked: 3\.0\)"):
        run_grpo(grpo_config(out, sft, **kw, noise_scale=3.0))
    with pytest.raises(ValueError, match=r"reward_funcs=\['neg_ppl', 'reciprocal_rank'\] \(asked: \['neg_ppl'\]\)"):
        run_grpo(grpo_config(out, sft))
    with pytest.raises(ValueError, match=rf"prompts={res['prompts']} \(asked: 4\)"):
        run_grpo(grpo_config(out, sft, **kw, max_train_rows=4))


def test_tensorboard_logs_every_step_and_the_held_out_check(tmp_path, sft_dir):
    from conftest import read_scalars

    from llmrec.tensorboard_log import flat_scalars

    sft, _, _ = sft_dir
    res = run_grpo(grpo_config(tmp_path / "grpo", sft, report_to="tensorboard", eval_rows=4))
    scalars = read_scalars(tmp_path / "grpo" / "runs")
    steps = res["log_history"]
    assert scalars["train/reward"] == [(s["step"], pytest.approx(s["reward"])) for s in steps]
    assert [step for step, _ in scalars["train/latent_norm"]] == [1, 2, 3]
    for when, step in (("eval_before", 0), ("eval_after", 3)):
        for name, value in flat_scalars(res[when], prefix="held_out/").items():
            assert (step, pytest.approx(value)) in scalars[name], name
    with pytest.raises(ConfigError, match="report_to .'wandb'. is not supported"):
        grpo_config(tmp_path / "other", sft, report_to="wandb")


def test_tensorboard_of_a_resumed_run_shows_each_step_once(tmp_path, sft_dir):
    """Cut after step 3 with its last checkpoint at step 2: the resumed run writes step 3 again, and TensorBoard
    showed both points (a review); the resumed writer purges the cut run's points after its checkpoint."""
    from conftest import read_scalars

    sft, _, _ = sft_dir
    kw = dict(report_to="tensorboard", max_steps=4, save_steps=2)
    full = run_grpo(grpo_config(tmp_path / "full", sft, **kw))
    _train_until(grpo_config(tmp_path / "cut", sft, **kw), 3)
    assert [step for step, _ in read_scalars(tmp_path / "cut" / "runs")["train/reward"]] == [1, 2, 3]
    run_grpo(grpo_config(tmp_path / "cut", sft, **kw))
    scalars = read_scalars(tmp_path / "cut" / "runs")
    assert scalars["train/reward"] == [(s["step"], pytest.approx(s["reward"], rel=1e-6)) for s in full["log_history"]]


def test_a_head_only_save_cut_while_copying_the_sft_files_is_refused(tmp_path, sft_dir, monkeypatch):
    """Head-only GRPO copies the SFT checkpoint's files first: cut after the adapter's, before the latent files, the
    folder loaded as a plain LoRA adapter (a review). The save-in-progress marker covers the whole save."""
    import llmrec.training.grpo as grpo
    from llmrec.models.checkpoint import SAVE_IN_PROGRESS, CheckpointError, checkpoint_kind

    sft, _, _ = sft_dir
    real_copy = grpo.shutil.copy2

    def cut_at_the_latent_files(src, dst, *a, **k):
        if Path(src).name.startswith("latent"):  # the adapter's two files copied first (the directory's order)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                real_copy(Path(src).parent / name, Path(dst).parent / name)
            raise KeyboardInterrupt
        return real_copy(src, dst, *a, **k)

    out = tmp_path / "grpo"
    with monkeypatch.context() as m:
        m.setattr(grpo.shutil, "copy2", cut_at_the_latent_files)
        with pytest.raises(KeyboardInterrupt):
            run_grpo(grpo_config(out, sft, max_steps=1))
    assert (out / "adapter_model.safetensors").exists() and not (out / "latent_config.json").exists()
    with pytest.raises(CheckpointError, match="interrupted"):
        checkpoint_kind(out)
    run_grpo(grpo_config(out, sft, max_steps=1))  # the rerun's save removes the marker it finds
    assert checkpoint_kind(out) == "adapter" and not (out / SAVE_IN_PROGRESS).exists()


def test_checkpoint_records_the_prompt_settings_grpo_trained_with(tmp_path, sft_dir):
    """GRPO may read another history length / token budget than its SFT start: its checkpoint says what it used."""
    from llmrec.recommend import Recommender

    sft, data, _ = sft_dir
    out = tmp_path / "grpo"
    run_grpo(grpo_config(out, sft, history_length=1, max_length=300, max_steps=1))
    meta = json.loads((out / "llmrec_config.json").read_text())
    assert (meta["history_length"], meta["max_length"], meta["dataset"]) == (1, 300, str(data))
    assert meta["grpo"]["sft_prompt_settings"] == {"dataset": str(data), "history_length": 2, "max_length": 384}
    rec = Recommender.from_pretrained(out, device="cpu")
    assert rec.history_length == 1 and rec.info["max_prompt_length"] == 300


def test_nan_reward_group_is_skipped_and_counted(tmp_path, sft_dir, monkeypatch):
    sft, _, _ = sft_dir
    import llmrec.training.grpo as grpo

    real = REWARD_FUNCTIONS["neg_ppl"]

    def poisoned(inputs):
        r = real(inputs).clone()
        r[1] = float("nan")  # one member of the first of the 2 groups of every micro-batch
        return r

    monkeypatch.setitem(grpo.REWARD_FUNCTIONS, "neg_ppl", poisoned)
    out = tmp_path / "o"
    res = run_grpo(grpo_config(out, sft, max_steps=2, per_device_train_batch_size=8))
    assert res["skipped_groups"] == 2 * 2 * 1  # 2 steps x 2 micro-batches x 1 poisoned group each
    assert res["nonfinite_grad_steps"] == 0 and all(math.isfinite(h["loss"]) for h in res["log_history"])
    head = load_file(str(out / "latent_head.safetensors"))
    before = load_file(str(sft / "latent_head.safetensors"))
    assert all(torch.isfinite(v).all() for v in head.values())
    assert not torch.equal(head["q_proj.weight"], before["q_proj.weight"])  # the valid groups trained it


def _train_with_a_nan_prompt(out: Path, sft: Path, **kw) -> tuple[LatentGRPOTrainer, dict, dict]:
    """One step on 2 prompts (G=4) where the first prompt's forward is NaN (here: a NaN input embedding); the
    trainer, its results and the weights before training."""
    trainer = LatentGRPOTrainer(grpo_config(out, sft, max_steps=1, **kw))
    used = {t for r in trainer.rows for t in r["prompt_ids"] + r["completion_ids"]}
    used |= {trainer.pad, trainer.tokenizer.eos_token_id, *trainer.latent_lm.config.latent_token_ids}  # padding too
    emb = trainer.latent_lm.embed_tokens
    bad = next(i for i in range(10, emb.weight.shape[0]) if i not in used)

    def nan_for_bad(module, args, output):  # the input embedding of `bad` is NaN (the tied LM head stays finite)
        return output.masked_fill((args[0] == bad)[..., None], float("nan"))

    emb.register_forward_hook(nan_for_bad)
    row = trainer.epoch_order(0)[0]
    trainer.rows[row] = dict(trainer.rows[row], prompt_ids=[bad] + trainer.rows[row]["prompt_ids"])
    before = {k: v.detach().clone() for k, v in trainer._trainable_state().items()}
    return trainer, trainer.train(), before


def test_nan_inside_the_model_skips_the_group_not_the_step(tmp_path, sft_dir):
    """A prompt whose forward is NaN gives NaN rewards; its group is skipped and never enters the loss pass, so
    the other group still trains and no NaN reaches the weights, whatever the micro-batch layout: with one prompt
    per micro-batch, the NaN prompt's micro-batch has no valid group and runs a zero-weight pass on a finite
    prompt instead (a pass on the NaN prompt itself made the gradient NaN and dropped the whole step). The logged
    latent and noise norms are over the valid group, like the rewards (relative noise: the NaN latent's is NaN)."""
    sft, _, _ = sft_dir
    after = {}
    for per_device, accum in ((8, 1), (4, 2)):
        trainer, res, before = _train_with_a_nan_prompt(tmp_path / f"o{per_device}", sft,
                                                        per_device_train_batch_size=per_device,
                                                        gradient_accumulation_steps=accum, noise_mode="relative")
        assert res["skipped_groups"] == 1 and res["nonfinite_grad_steps"] == 0, per_device
        step = res["log_history"][0]
        assert math.isfinite(step["latent_norm"]) and math.isfinite(step["noise_norm"]), step
        after[per_device] = trainer._trainable_state()
        assert all(torch.isfinite(v).all() for v in after[per_device].values())
        assert any(not torch.equal(before[k], after[per_device][k]) for k in before)
    for k, v in after[8].items():  # the same update from the same optimiser batch
        assert (v - after[4][k]).abs().max().item() <= 1e-5, k


def test_a_reward_that_ignores_nan_log_probs_still_skips_the_group(tmp_path, sft_dir, monkeypatch):
    """A reward that does not read the log-probs (here a constant, as a user's own reward may be) stayed finite for a
    NaN prompt: its group counted as valid and its NaN log-probs made the whole step's loss NaN (the step dropped)."""
    import llmrec.training.grpo as grpo

    sft, _, _ = sft_dir
    monkeypatch.setitem(grpo.REWARD_FUNCTIONS, "neg_ppl",
                        lambda inputs: torch.arange(inputs.token_mask.shape[0], dtype=torch.float64))
    trainer, res, before = _train_with_a_nan_prompt(tmp_path / "c", sft)
    assert res["skipped_groups"] == 1 and res["nonfinite_grad_steps"] == 0
    after = trainer._trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the other group trained
    assert all(bool(torch.isfinite(v).all()) for v in after.values())


def test_a_run_on_a_retrained_sft_checkpoint_or_other_data_is_neither_reused_nor_resumed(tmp_path, sft_dir):
    """GRPO records what it started from by content (the SFT checkpoint's weights, the prepared files): a finished
    run whose SFT checkpoint was retrained in place since is refused, not returned as done; a cut run is not resumed
    on other SFT weights or on a dataset prepared again (it compared only the SFT checkpoint's path)."""
    import shutil

    sft, data, _ = sft_dir
    own_sft, own_data = tmp_path / "sft", tmp_path / "data"
    shutil.copytree(sft, own_sft)
    shutil.copytree(data, own_data)
    cfg = grpo_config(tmp_path / "done", own_sft, max_steps=1, dataset=str(own_data))
    first = run_grpo(cfg)
    assert first["sft_weights_sha256"] and set(first["data_sha256"]) >= {"catalog.jsonl", "train.jsonl"}
    assert run_grpo(cfg)["global_step"] == 1  # the same start: reused
    head = own_sft / "latent_head.safetensors"
    original = head.read_bytes()
    retrained = {k: v + 1e-3 for k, v in load_file(str(head)).items()}  # other weights at the same path
    save_file(retrained, str(head))
    with pytest.raises(ValueError, match=r"holds a finished GRPO run made with sft weights='sha256 "):
        run_grpo(cfg)
    head.write_bytes(original)
    cut = grpo_config(tmp_path / "cut", own_sft, max_steps=3, save_steps=1, dataset=str(own_data))
    _train_until(cut, 1)
    save_file(retrained, str(head))
    with pytest.raises(ConfigError, match="was trained from other SFT weights than this run would start from"):
        run_grpo(cut)
    head.write_bytes(original)
    train = own_data / "train.jsonl"
    rows = train.read_text().splitlines()
    train.write_text("\n".join(rows[1:] + rows[:1]) + "\n")
    with pytest.raises(ConfigError, match="was trained from other data than"):
        run_grpo(cut)
    with pytest.raises(ValueError, match=r"made with data='other prepared files"):
        run_grpo(cfg)
    train.write_text("\n".join(rows) + "\n")
    # What is recorded is what the run loaded, even if the SFT directory changes while it trains.
    from llmrec.evaluation.evaluator import weights_sha256

    loaded = weights_sha256(own_sft)

    def retrain_sft(trainer, stats):
        if trainer.global_step == 1:
            save_file(retrained, str(head))

    res = LatentGRPOTrainer(grpo_config(tmp_path / "moving", own_sft, max_steps=2, dataset=str(own_data)),
                            callbacks=[retrain_sft]).train()
    assert res["sft_weights_sha256"] == loaded != weights_sha256(own_sft)


@pytest.mark.parametrize("train_lora", [False, True])
def test_grpo_trains_a_qlora_checkpoint(tmp_path, prepared_dir, train_lora):
    """A QLoRA SFT checkpoint (4-bit base): GRPO's scoring pass runs without gradients in eval mode, where
    bitsandbytes repacked the weights for a CPU kernel without backward and the loss pass then failed."""
    from llmrec.training.sft import LatentSFTConfig, run_sft

    sft = tmp_path / "sft"
    run_sft(LatentSFTConfig(output_dir=str(sft), model_name_or_path="tiny-qwen2", model_dtype="float32",
                            dataset=str(prepared_dir), finetune="qlora", max_train_rows=4, eval_split=None,
                            max_length=384, history_length=2, learning_rate=1e-2, per_device_train_batch_size=2,
                            max_steps=1, save_strategy="no", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                            num_latent_tokens=1, disable_tqdm=True, seed=0))
    out = tmp_path / "grpo"
    res = run_grpo(grpo_config(out, sft, max_steps=2, train_lora=train_lora))
    assert res["nonfinite_grad_steps"] == 0 and all(math.isfinite(h["loss"]) for h in res["log_history"])
    assert json.loads((out / "llmrec_config.json").read_text())["finetune"] == "qlora"


@pytest.mark.parametrize("scaled", [False, True])
def test_non_finite_gradient_skips_the_update_and_backs_off_the_loss_scale(tmp_path, sft_dir, monkeypatch, scaled):
    """A step whose gradient is not finite leaves the weights as they were (counted) and the next step trains. Under
    fp16 loss scaling (accelerate's GradScaler; GPU only, so the CPU accelerator is given one here) the scaler still
    sees the overflowing step and lowers its scale: skipped past it, the scale stayed where it overflowed and every
    later step overflowed too (review)."""
    import accelerate

    sft, _, _ = sft_dir
    if scaled:
        class ScaledAccelerator(accelerate.Accelerator):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

        monkeypatch.setattr(accelerate, "Accelerator", ScaledAccelerator)
    states = []
    trainer = LatentGRPOTrainer(grpo_config(tmp_path / "o", sft, max_steps=2, max_grad_norm=0.0),
                                callbacks=[lambda tr, stats: states.append(
                                    {k: v.detach().clone() for k, v in tr._trainable_state().items()})])
    before = {k: v.detach().clone() for k, v in trainer._trainable_state().items()}
    real_loss = trainer._loss

    def overflow_at_first_step(b):
        loss, s = real_loss(b)
        return (loss * float("inf") if trainer.global_step == 0 else loss), s

    monkeypatch.setattr(trainer, "_loss", overflow_at_first_step)
    res = trainer.train()
    assert res["nonfinite_grad_steps"] == 1
    assert all(torch.equal(before[k], v) for k, v in states[0].items())
    assert any(not torch.equal(states[0][k], v) for k, v in states[1].items())
    assert all(torch.isfinite(v).all() for v in states[1].values())
    if scaled:
        assert trainer.accelerator.scaler.get_scale() == 512.0


def test_a_resumed_run_keeps_the_loss_scale(tmp_path, sft_dir, monkeypatch):
    """The GradScaler's state is in the checkpoint: a resumed fp16 run restarted at the initial scale (review)."""
    import accelerate

    sft, _, _ = sft_dir

    class ScaledAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    monkeypatch.setattr(accelerate, "Accelerator", ScaledAccelerator)
    scales = {}

    def run(name: str, stop_at: int | None = None) -> None:
        trainer = LatentGRPOTrainer(grpo_config(tmp_path / name, sft, max_steps=3, save_steps=1, max_grad_norm=0.0))
        real_loss = trainer._loss

        def overflow_first(b):
            loss, s = real_loss(b)
            return (loss * float("inf") if trainer.global_step == 0 else loss), s

        def record(tr, stats):
            scales.setdefault(name, []).append(tr.accelerator.scaler.get_scale())
            if tr.global_step == stop_at:
                raise _Stop

        trainer._loss = overflow_first
        trainer.callbacks.append(record)
        if stop_at is None:
            trainer.train()
        else:
            with pytest.raises(_Stop):
                trainer.train()

    run("full")
    run("cut", stop_at=1)
    run("cut")
    assert scales["full"] == [512.0, 512.0, 512.0] and scales["cut"] == scales["full"]


@pytest.mark.parametrize("kw", [
    {"beta": 0.1},
    {"loss_type": "dapo", "advantage_mode": "group"},
    {"reward_funcs": ["neg_ppl", "reciprocal_rank"], "reward_weights": [1.0, 0.0]},  # weight 0: never computed
    {"save_steps": 0.5, "logging_steps": 0.5, "noise_mode": "relative"},
])
def test_options_train(tmp_path, sft_dir, kw):
    sft, _, _ = sft_dir
    out = tmp_path / "o"
    res = run_grpo(grpo_config(out, sft, max_steps=2, **kw))
    hist = res["log_history"]
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)
    if "beta" in kw:
        # the reference is the starting policy: no divergence before the first update, some after it
        assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-7) and hist[1]["kl"] > 0
    if "reward_weights" in kw:
        assert "rewards/reciprocal_rank/mean" not in hist[-1]
    if kw.get("save_steps") == 0.5:
        assert (out / "checkpoint-1" / "grpo_state.json").exists()


def test_bias_corrected_kl_changes_the_gradient_once_the_policy_moved(tmp_path, sft_dir):
    """use_bias_correction_kl (TRL's option; off by default here) multiplies the k3 term by the ratio: at the first
    step the policy is the reference (k3 = 0 and its gradient 0 either way), so the first update is the same; after
    it the ratio's gradient k3 * grad(logp) adds to the KL's and the second update differs."""
    sft, _, _ = sft_dir
    assert LatentGRPOConfig.__dataclass_fields__["use_bias_correction_kl"].default is False
    states = {}
    for flag in (False, True):
        for steps in (1, 2):
            trainer = LatentGRPOTrainer(grpo_config(tmp_path / f"{flag}{steps}", sft, max_steps=steps, beta=0.5,
                                                    learning_rate=0.05, use_bias_correction_kl=flag))
            trainer.train()
            states[flag, steps] = trainer._trainable_state()
    for k, v in states[False, 1].items():
        assert torch.allclose(v, states[True, 1][k], atol=1e-7), k
    assert any(not torch.allclose(v, states[True, 2][k], atol=1e-7) for k, v in states[False, 2].items())


@pytest.mark.parametrize("rollout", ["noise", "generate"])
def test_reference_is_scored_in_the_policys_mixed_precision(tmp_path, sft_dir, monkeypatch, rollout):
    """Under accelerate's bf16 mixed precision (the GPU recipes' accelerate configs) the prepared policy runs under
    autocast; the frozen reference must too: at the first step the policy is the reference, so their token log-probs
    are equal and the k3 term is 0. Scored in float32 beside a bf16 policy they differed by ~1e-3 (review)."""
    from accelerate.state import AcceleratorState

    sft, _, _ = sft_dir
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(True)  # the env is read when the state is first made
    try:
        kw = {"rollout": "generate", "reward_funcs": ["exact_match", "token_f1"]} if rollout == "generate" else {}
        trainer = LatentGRPOTrainer(grpo_config(tmp_path / "out", sft, max_steps=1, beta=0.5, **kw))
        assert trainer.accelerator.mixed_precision == "bf16"
        batches = trainer.local_micro_batches(0)
        trainer.score(0, batches)
        b = batches[0]
        mask = b.completion_attention_mask.bool()
        if len(mask) != len(b.old_logprobs):  # noise rollouts: one completion per prompt, shared by its members
            mask = mask.repeat_interleave(trainer.config.num_generations, 0)
        assert torch.equal(b.old_logprobs[mask], b.ref_logprobs[mask])
    finally:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
        AcceleratorState._reset_state(True)


def test_bias_correction_flag_is_inert_without_kl(tmp_path):
    """Runs recorded TRL's default use_bias_correction_kl=True before the option was implemented (and trained
    without it): without a KL term it changes nothing, so finished runs and checkpoints are not refused over it."""
    from llmrec.bench_pipeline import grpo_config_differences

    base = dict(output_dir=str(tmp_path / "o"), sft_checkpoint=str(tmp_path / "s"), num_generations=4,
                per_device_train_batch_size=4)
    cfg = LatentGRPOConfig(**base)
    assert grpo_config_differences({**cfg.to_dict(), "use_bias_correction_kl": True}, cfg, None) == {}
    # likewise TRL's gradient_checkpointing=True (mirrored to activation_checkpointing), never implemented here
    assert not cfg.gradient_checkpointing and not cfg.activation_checkpointing
    old_run = {**cfg.to_dict(), "gradient_checkpointing": True, "activation_checkpointing": True}
    assert grpo_config_differences(old_run, cfg, None) == {}
    with_kl = LatentGRPOConfig(**base, beta=0.1)
    assert grpo_config_differences({**with_kl.to_dict(), "use_bias_correction_kl": True}, with_kl, None) == {
        "use_bias_correction_kl": (True, False)}


def test_clip_acts_with_several_iterations(tmp_path, sft_dir):
    sft, _, _ = sft_dir
    res = run_grpo(grpo_config(tmp_path / "o", sft, max_steps=2, num_iterations=3, learning_rate=0.3,
                               epsilon=0.01, epsilon_high=0.01, advantage_mode="group"))
    assert max(h["clip_ratio"] for h in res["log_history"]) > 0
    res1 = run_grpo(grpo_config(tmp_path / "p", sft, max_steps=2, num_iterations=1, learning_rate=0.3,
                                epsilon=0.01, epsilon_high=0.01, advantage_mode="group"))
    assert all(h["clip_ratio"] == 0 for h in res1["log_history"])  # ratio == 1: the clip never fires


@pytest.mark.parametrize("noise_mode,scale,antithetic", [("absolute", 0.7, False), ("relative", 0.3, False),
                                                         ("relative", 0.3, True)])
def test_gaussian_policy_logprob_is_the_score_function_gradient(tmp_path, sft_dir, noise_mode, scale, antithetic):
    """policy_logprob=gaussian: the loss gradient equals that of -sum_k A_k (eps_k / std_k^2) . r_theta (the
    score-function / evolution-strategies estimator of grad E[reward]), normalised over the optimiser batch."""
    sft, _, _ = sft_dir
    group = dict(num_generations=5, per_device_train_batch_size=10, antithetic_noise=True) if antithetic else {}
    trainer = LatentGRPOTrainer(grpo_config(tmp_path / "g", sft, policy_logprob="gaussian", advantage_mode="group",
                                            noise_mode=noise_mode, noise_scale=scale, **group))
    batches = trainer.local_micro_batches(0)
    trainer.score(0, batches)
    params = [p for p in trainer.module.parameters() if p.requires_grad]
    b = batches[0]
    loss, stats = trainer._loss(b)
    got = torch.autograd.grad(loss, params)
    g = trainer.config.num_generations
    t = {k: getattr(b, k) for k in ("prompt_input_ids", "prompt_attention_mask", "completion_input_ids",
                                     "completion_attention_mask")}
    r = trainer.module(**t, noise=b.noise).latent.float()  # [B, H] with gradient
    std = trainer._noise_std(b.latent)
    if noise_mode == "absolute":
        assert torch.allclose(std, torch.full_like(std, scale))
    else:
        assert torch.allclose(std, scale * b.latent.norm(dim=-1) / math.sqrt(b.latent.shape[-1]))
    w = (b.advantages[:, None] * b.noise.float() / std.repeat_interleave(g)[:, None] ** 2)  # [B*G, H]
    surrogate = -(w * r.repeat_interleave(g, 0)).sum() * trainer.world / trainer._norm_members
    want = torch.autograd.grad(surrogate, params)
    for a, e in zip(got, want):
        # fp32 sums in another order: with antithetic pairs the members' terms cancel, so an element far below the
        # tensor's scale carries rounding of that scale (seen: 5.7e-6 on an element of 0.04 in a tensor up to 30).
        assert torch.allclose(a, e, rtol=1e-4, atol=1e-6 * float(e.abs().max()))
    assert stats["clipped_tokens"] == 0.0 and stats["tokens"] > 0
    # member 0 of each group carries no noise, hence no gradient; beta > 0 is refused in this mode
    per_group = b.noise.view(-1, g, b.noise.shape[-1])
    assert float(per_group[:, 0].abs().max()) == 0.0
    if antithetic:  # mirrored pairs (1, 2), (3, 4)
        assert torch.equal(per_group[:, 2], -per_group[:, 1]) and torch.equal(per_group[:, 4], -per_group[:, 3])
    with pytest.raises(ConfigError, match="beta > 0"):
        grpo_config(tmp_path / "h", sft, policy_logprob="gaussian", beta=0.1)


def test_held_out_rewards_before_and_after_training(tmp_path, sft_dir):
    """eval_rows: noise-free rewards on validation rows, the same under the naive per-member form, recorded
    before and after; a teacher-forced reference computed by hand from the SFT model gives the same value."""
    sft, data, _ = sft_dir
    res = run_grpo(grpo_config(tmp_path / "a", sft, eval_rows=5, max_steps=2, learning_rate=5e-2))
    before, after = res["eval_before"], res["eval_after"]
    assert before["rows"] == after["rows"] == 5 and before["split"] == "valid"
    for v in (before, after):
        assert math.isfinite(v["neg_ppl"]) and math.isfinite(v["log_likelihood"])
        assert v["neg_ppl"] <= -1.0  # a perplexity is >= 1
    assert after != before  # the head moved
    naive = LatentGRPOTrainer(grpo_config(tmp_path / "b", sft, eval_rows=5, naive_forward=True))
    fast = LatentGRPOTrainer(grpo_config(tmp_path / "c", sft, eval_rows=5))
    b_naive, b_fast = naive.evaluate_rewards(), fast.evaluate_rewards()
    assert b_fast == pytest.approx(before, abs=1e-6)
    per_row = fast.evaluate_rewards(per_row=True)["per_row"]
    rows = per_row["log_likelihood"]
    assert len(rows) == 5 and sum(rows) / 5 == pytest.approx(before["log_likelihood"], abs=1e-9)
    # which rows (scripts/grpo_heldout_rewards.py pairs checkpoints only on the same ones)
    assert per_row["row_index"] == [r["row_index"] for r in fast._eval_rows]
    assert per_row["target_title"] == [r["target_title"] for r in fast._eval_rows]
    assert b_naive["log_likelihood"] == pytest.approx(b_fast["log_likelihood"], abs=1e-5)
    assert b_naive["neg_ppl"] == pytest.approx(b_fast["neg_ppl"], rel=1e-5)
    # A held-out row's log-likelihood from the SFT forward: minus its mean completion-token cross-entropy.
    row = fast._eval_rows[0]
    with torch.no_grad():
        out = fast.latent_lm(torch.tensor([row["prompt_ids"]]), torch.ones(1, len(row["prompt_ids"]), dtype=torch.long),
                             torch.tensor([row["completion_ids"]]), return_loss=True)
    fast._eval_rows = [row]
    assert fast.evaluate_rewards()["log_likelihood"] == pytest.approx(-float(out.loss), abs=1e-4)


def test_held_out_candidate_rewards_match_plain_forwards(tmp_path, sft_dir):
    """With a candidate reward, eval_rows also reports the target's reciprocal rank and log-softmax among
    rank_candidates items drawn per held-out row (keyed by the row's index in its split); each candidate's score
    equals a plain teacher-forced forward of [prompt, latent, candidate title] (no cached prefix)."""
    sft, _, _ = sft_dir
    t = LatentGRPOTrainer(grpo_config(tmp_path / "a", sft, eval_rows=3, rank_candidates=4,
                                      reward_funcs=["neg_ppl", "candidate_log_softmax"]))
    res = t.evaluate_rewards(per_row=True)
    assert set(res["per_row"]) == {"neg_ppl", "log_likelihood", "reciprocal_rank", "candidate_log_softmax", "row_index",
                                   "target_title"}
    row = t._eval_rows[1]
    items = candidate_items(t.config.seed, -1, row["row_index"], row["target_item_id"], t.num_items, 4,
                            t.same_title.get(tuple(t.candidate_completions[row["target_item_id"]]), frozenset()))
    assert items[0] == row["target_item_id"] and len(set(items)) == 4
    scores = []
    with torch.no_grad():
        for it in items:
            comp = t.candidate_completions[it]
            out = t.latent_lm(torch.tensor([row["prompt_ids"]]), torch.ones(1, len(row["prompt_ids"]), dtype=torch.long),
                              torch.tensor([comp]), return_loss=True)
            scores.append(-float(out.loss))
    scores_t = torch.tensor(scores, dtype=torch.float64)
    rank = 1 + int((scores_t[1:] >= scores_t[0]).sum())
    assert res["per_row"]["reciprocal_rank"][1] == pytest.approx(1 / rank)
    assert res["per_row"]["candidate_log_softmax"][1] == pytest.approx(
        float(scores_t[0] - torch.logsumexp(scores_t, 0)), abs=1e-4)
    assert res["candidate_log_softmax"] == pytest.approx(sum(res["per_row"]["candidate_log_softmax"]) / 3)
    # Without a candidate reward the candidate metrics are not computed.
    plain = LatentGRPOTrainer(grpo_config(tmp_path / "b", sft, eval_rows=3)).evaluate_rewards()
    assert "reciprocal_rank" not in plain and plain["log_likelihood"] == pytest.approx(res["log_likelihood"], abs=1e-6)


@pytest.mark.parametrize(("dropout", "beam_current"), [(False, False), (True, False), (True, True), ("off", False)])
def test_resume_matches_uninterrupted(tmp_path, sft_dir, dropout, beam_current):
    sft, data, root = sft_dir
    kw: dict = dict(num_iterations=2)
    if dropout:  # LoRA dropout on during GRPO: the resumed run must draw the same masks
        sft = _sft(root, data, lora_dropout=0.3)
        kw = dict(train_lora=True, disable_dropout=False)
    if dropout == "off":  # an adapter with dropout, switched off by disable_dropout, and the held-out check before
        # step 1 (a resumed run skips it): the check left dropout on for the uninterrupted run's every step
        kw = dict(train_lora=True, disable_dropout=True, eval_rows=2)
    if beam_current:  # negatives searched by the current policy (dropout off for the search, back on after)
        kw.update(reward_funcs=["candidate_log_softmax"], rank_candidates=4, rank_negatives="beam_current")
    full = run_grpo(grpo_config(tmp_path / "full", sft, max_steps=4, **kw))

    _train_until(grpo_config(tmp_path / "cut", sft, max_steps=4, save_steps=2, **kw), 2)
    assert (tmp_path / "cut" / "checkpoint-2" / "grpo_state.json").exists()
    resumed = run_grpo(grpo_config(tmp_path / "cut", sft, max_steps=4, save_steps=2, **kw))
    assert resumed["resumed_from"].endswith("checkpoint-2")
    a = load_file(str(tmp_path / "full" / "latent_head.safetensors"))
    b = load_file(str(tmp_path / "cut" / "latent_head.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert [h["loss"] for h in full["log_history"]] == pytest.approx([h["loss"] for h in resumed["log_history"]],
                                                                      abs=1e-6)
    if beam_current:
        assert [h["beam_current/target_in_beam"] for h in full["log_history"]] == [
            h["beam_current/target_in_beam"] for h in resumed["log_history"]]


def test_a_resume_with_other_settings_is_refused_before_any_work(tmp_path, sft_dir, monkeypatch):
    """A cut run restarted with another learning rate resumed, mixed the two and recorded only the new one."""
    sft, _, _ = sft_dir
    _train_until(grpo_config(tmp_path / "cut", sft, max_steps=4, save_steps=2), 2)
    assert json.loads((tmp_path / "cut" / "checkpoint-2" / "grpo_state.json").read_text())["config"]["learning_rate"]
    monkeypatch.setattr(LatentGRPOTrainer, "load_checkpoint", lambda self, path: pytest.fail("loaded"))
    with pytest.raises(ConfigError, match=r"checkpoint-2 was trained with learning_rate=0.005 \(asked: 0.05\)"):
        run_grpo(grpo_config(tmp_path / "cut", sft, max_steps=4, save_steps=2, learning_rate=0.05))
    with pytest.raises(ConfigError, match=r"global_train_batch_size=8 \(asked: 4\)"):
        run_grpo(grpo_config(tmp_path / "cut", sft, max_steps=4, save_steps=2, gradient_accumulation_steps=1))


def test_score_candidates_matches_per_candidate_forward(sft_dir):
    sft, _, _ = sft_dir
    from llmrec.training.sft import load_sft_checkpoint

    model, tok, _ = load_sft_checkpoint(sft)
    torch.manual_seed(0)
    prompt = torch.randint(5, 100, (1, 9))
    cands = torch.randint(5, 100, (3, 4))
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    lat = torch.randn(2, model.lm_config.hidden_size)
    got = score_candidates(model, prompt, torch.ones_like(prompt), lat, cands, cmask, chunk_rows=4)
    module = LatentGRPOModule(model, group_size=1)
    for gi in range(2):
        for ci in range(3):
            with torch.no_grad():
                base = model.encode_prefix(prompt).latents[:, -1]
                lp = module(prompt, torch.ones_like(prompt), cands[ci : ci + 1], cmask[ci : ci + 1],
                            noise=lat[gi : gi + 1] - base).logprobs
            m = cmask[ci].float()
            want = (lp[0] * m).sum() / m.sum()
            assert abs(got[gi, ci].item() - want.item()) < 1e-4
    # Differentiable in the latents (the exact candidate-softmax bound trains through it): the same gradient as
    # the per-candidate forwards.
    weights = torch.randn(2, 3)
    lat_a = lat.clone().requires_grad_(True)
    (score_candidates(model, prompt, torch.ones_like(prompt), lat_a, cands, cmask, chunk_rows=4) * weights).sum().backward()
    lat_b = lat.clone().requires_grad_(True)
    with torch.no_grad():
        base = model.encode_prefix(prompt).latents[:, -1]
    total = 0.0
    for gi in range(2):
        for ci in range(3):
            lp = module(prompt, torch.ones_like(prompt), cands[ci : ci + 1], cmask[ci : ci + 1],
                        noise=lat_b[gi : gi + 1] - base).logprobs
            m = cmask[ci].float()
            total = total + weights[gi, ci] * (lp[0] * m).sum() / m.sum()
    total.backward()
    assert lat_a.grad.abs().max() > 0
    assert torch.allclose(lat_a.grad, lat_b.grad, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------- two processes

DIST_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from llmrec.training.grpo import LatentGRPOConfig, LatentGRPOTrainer
torch.set_num_threads(1)
sft, out, accum, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cfg = LatentGRPOConfig(output_dir=out, sft_checkpoint=sft, num_generations=4, per_device_train_batch_size=8,
                       gradient_accumulation_steps=accum, max_steps=3, learning_rate=5e-3, save_steps=100, seed=0,
                       warmup_steps=0, lr_scheduler_type="constant", disable_tqdm=True, advantage_mode=mode,
                       num_iterations=2)
t = LatentGRPOTrainer(cfg)
res = t.train()
state = {k: v.detach().contiguous() for k, v in t._trainable_state().items()}
save_file(state, f"{out}/rank{t.accelerator.process_index}.safetensors")
"""


@pytest.mark.parametrize("mode", ["batch", "group"])
def test_two_processes_match_one_process(tmp_path, sft_dir, mode):
    from tests.launching import accelerate_launch, assert_ranks_equal_single, run_script_here

    sft, _, _ = sft_dir
    script = tmp_path / "dist_grpo.py"
    script.write_text(DIST_SCRIPT)
    # Same optimiser batch (8 prompts x G=4, 2 prompts per micro-batch): 1 process x 4 accumulation steps vs
    # 2 processes x 2, so micro-batches hold different prompts in the two layouts. One training per launch: two
    # trainers in one launched process once ended in SIGABRT at exit ("terminate called without an active
    # exception") after both had finished.
    run_script_here(script, sft, tmp_path / "one", 4, mode)
    accelerate_launch(2, [script, sft, tmp_path / "two", 2, mode])
    assert_ranks_equal_single(tmp_path / "two", tmp_path / "one")
    one = json.loads((tmp_path / "one" / "grpo_results.json").read_text())
    two = json.loads((tmp_path / "two" / "grpo_results.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(one["log_history"]) == len(two["log_history"]) == 3
    for a, b in zip(one["log_history"], two["log_history"]):
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_cli_grpo_in_process(tmp_path, sft_dir, capsys):
    from llmrec.cli import main

    sft, _, _ = sft_dir
    recipe = tmp_path / "g.yaml"
    recipe.write_text(f"sft_checkpoint: {sft}\nnum_generations: 2\nper_device_train_batch_size: 2\nmax_steps: 2\n"
                      "reward_funcs: [log_likelihood]\nadvantage_mode: group\nnoise_mode: relative\nnoise_scale: 0.5\n"
                      "disable_tqdm: true\n")
    assert main(["grpo", "--config", str(recipe), "--output_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["global_step"] == 2 and "reward" in summary["last_step"]
    # a misspelt option is a clear error (exit 1, message names it), not a silently ignored value
    assert main(["grpo", "--config", str(recipe), "--output_dir", str(tmp_path / "o2"), "--noise_scal", "1"]) == 1
    assert "noise_scal" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-llama"])
def test_reused_prompt_state_equals_fresh_prompt_pass(tmp_path, sft_dir, model):
    _, data, root = sft_dir
    trainer = LatentGRPOTrainer(grpo_config(tmp_path / "o", _sft(root, data, model, 1), per_device_train_batch_size=8))
    module = trainer.accelerator.unwrap_model(trainer.module)
    assert module.prompt_state_reusable()
    batch = trainer.local_micro_batches(0)[0]
    t = {k: getattr(batch, k) for k in ("prompt_input_ids", "prompt_attention_mask", "completion_input_ids",
                                         "completion_attention_mask")}
    noise = torch.randn(len(batch.rows) * 4, module.latent_lm.lm_config.hidden_size)
    with torch.no_grad():
        state = module(**t, noise=noise, keep_prompt_state=True).prompt_state
    assert state is not None
    outs = []
    for kw in ({}, {"prompt_state": state}, {"prompt_state": state}):  # twice: the kept state is not consumed
        module.zero_grad(set_to_none=True)
        lp = module(**t, noise=noise, **kw).logprobs
        lp.sum().backward()
        outs.append((lp.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    for lp, grads in outs[1:]:
        assert torch.allclose(lp, outs[0][0], atol=1e-5, rtol=0)
        assert grads.keys() == outs[0][1].keys()
        for k in grads:
            assert torch.allclose(grads[k], outs[0][1][k], atol=1e-6, rtol=1e-5), k
    next(module.latent_lm.model.parameters()).requires_grad_(True)
    assert not module.prompt_state_reusable()  # a trainable LM weight makes the prompt pass depend on training
    with pytest.raises(ValueError, match="frozen LM"):
        module(**t, noise=noise, prompt_state=state)


@pytest.mark.parametrize("use_cpu", [True, False])
def test_use_cpu_reaches_the_trainers_accelerator_on_a_gpu_machine(tmp_path, sft_dir, monkeypatch, use_cpu):
    """use_cpu (a TrainingArguments field) is honoured by the SFT Trainer's Accelerator; GRPO builds its own, which
    looked only at the machine: use_cpu=true on a GPU machine trained on the GPU. (No GPU here: the machine says it
    has one, and the kwargs the trainer gives accelerate.Accelerator are recorded.)"""
    import accelerate

    import llmrec.distributed as distributed
    import llmrec.training.grpo as grpo_module

    monkeypatch.setattr(distributed, "has_accelerator", lambda: True)
    monkeypatch.setattr(grpo_module, "has_accelerator", lambda: True)
    seen = []
    real = accelerate.Accelerator

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **{**kwargs, "cpu": True})  # there is no GPU to run on here

    monkeypatch.setattr(accelerate, "Accelerator", recording)
    config = grpo_config(tmp_path / "o", sft_dir[0], use_cpu=use_cpu, max_train_rows=8, eval_rows=2)
    assert config.use_cpu is use_cpu
    LatentGRPOTrainer(config)
    assert [kw["cpu"] for kw in seen] == [use_cpu]


def test_exclude_sft_rows_draws_prompts_the_sft_never_saw(tmp_path, sft_dir):
    """The SFT fixture trained on a seeded subset of 8 train rows: by default GRPO with the same seed and 8 prompts
    gets exactly those rows back; exclude_sft_rows draws 8 others (and refuses a GRPO output as its source)."""
    from llmrec.training.sft import _subset

    sft, data, _ = sft_dir
    n_train = json.loads((data / "stats.json").read_text())["rows"]["train"]
    sft_rows = set(_subset(n_train, 8, 0))
    same = LatentGRPOTrainer(grpo_config(tmp_path / "a", sft, max_train_rows=8, eval_rows=4))
    assert {r["row_index"] for r in same.rows} == sft_rows
    fresh = LatentGRPOTrainer(grpo_config(tmp_path / "b", sft, max_train_rows=8, exclude_sft_rows=True, eval_rows=4))
    fresh_rows = {r["row_index"] for r in fresh.rows}
    assert len(fresh_rows) == 8 and not fresh_rows & sft_rows
    # the held-out rows come from another split and are not filtered
    fresh.evaluate_rewards(), same.evaluate_rewards()
    assert [r["row_index"] for r in fresh._eval_rows] == [r["row_index"] for r in same._eval_rows]
    run_grpo(grpo_config(tmp_path / "g", sft, max_steps=1))
    with pytest.raises(ConfigError, match="is a GRPO output"):
        LatentGRPOTrainer(grpo_config(tmp_path / "c", tmp_path / "g", exclude_sft_rows=True))


@pytest.mark.parametrize(("train_lora", "objective", "negatives"),
                         [(False, "likelihood", None), (True, "likelihood", None),
                          (False, "candidate_softmax", "uniform"), (False, "candidate_softmax", "beam_current")])
def test_head_bound_script_follows_the_exact_gradient(tmp_path, sft_dir, train_lora, objective, negatives):
    """scripts/grpo_head_likelihood_bound.py: one step is plain gradient ascent on the objective at the noise-free
    latent (same batch, checked against autograd on a plain form of it), on the head alone or (--train-lora) on the
    head and the LoRA adapter: the mean per-token log-likelihood of the true titles, or the true item's log-softmax
    among the step's sampled candidates (uniform, or led by the current head's beam-search items), each scored by its
    own teacher-forced forward."""
    from tests.conftest import load_script

    mod = load_script("grpo_head_likelihood_bound")
    sft, _, _ = sft_dir
    rank = dict(reward_funcs=["candidate_log_softmax"], rank_candidates=4,
                rank_negatives=negatives) if objective != "likelihood" else {}
    trainer = mod.make_trainer_class(objective)(grpo_config(
        tmp_path / "b", sft, num_generations=2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        max_train_rows=8, max_grad_norm=0.0, learning_rate=1e-3, train_lora=train_lora, **rank))
    b = trainer.local_micro_batches(0)[0]
    t = {k: getattr(b, k) for k in ("prompt_input_ids", "prompt_attention_mask", "completion_input_ids",
                                     "completion_attention_mask")}
    zeros = torch.zeros(2, trainer.latent_lm.lm_config.hidden_size)

    def mean_ll():
        res = trainer.module(**t, noise_fn=lambda r: torch.zeros(r.shape[0] * 2, r.shape[-1]))
        lp = res.logprobs.view(-1, 2, res.logprobs.shape[-1])[:, 0]
        m = t["completion_attention_mask"].float()
        return ((lp * m).sum(-1) / m.sum(-1)).mean()

    def mean_candidate_log_softmax():
        total = 0.0
        for i, row in enumerate(b.rows):
            target = trainer.rows[row]["target_item_id"]
            same = trainer.same_title.get(tuple(trainer.candidate_completions[target]), frozenset())
            scores = []
            first = trainer.beam_search_items(trainer.rows[row]) if negatives == "beam_current" else None
            for item in candidate_items(trainer.config.seed, 0, row, target, trainer.num_items, 4, same, first=first):
                comp = torch.tensor([trainer.candidate_completions[item]])
                lp = trainer.module(t["prompt_input_ids"][i : i + 1], t["prompt_attention_mask"][i : i + 1], comp,
                                    torch.ones_like(comp), noise=zeros).logprobs[0]  # member 0 of 2 identical
                scores.append(lp.mean())
            scores = torch.stack(scores)
            total = total + scores[0] - torch.logsumexp(scores, 0)
        return total / len(b.rows)

    objective_fn = mean_ll if objective == "likelihood" else mean_candidate_log_softmax
    params = [p for p in trainer.module.parameters() if p.requires_grad]
    names = [n for n, p in trainer.module.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) == train_lora
    want = torch.autograd.grad(-objective_fn(), params)
    before = objective_fn().item()
    trainer.optimizer.zero_grad(set_to_none=True)
    stats = trainer.train_step(0)
    # train_step stepped AdamW on exactly that gradient; its first step moves against the gradient's sign.
    assert stats["reward"] == pytest.approx(before, abs=1e-5)
    assert ("beam_current/target_in_beam" in stats) == (negatives == "beam_current")
    got = [p.grad for p in params]
    assert any(float(a.abs().max()) > 0 for a in got)
    for a, e in zip(got, want):
        assert torch.allclose(a, e, rtol=1e-4, atol=1e-7)
    assert objective_fn().item() > before


def test_head_bound_script_reuses_a_finished_run_only_with_its_settings(tmp_path, sft_dir, monkeypatch):
    """scripts/grpo_head_likelihood_bound.py: a finished run in ``<output-root>/head_ll_lr<lr>`` is reused only when
    it was made with the settings asked for now (SFT checkpoint, prompts, steps, held-out rows, seed, ...), read from
    the settings file the script writes, or for runs made before it from the trainer's own records; any difference
    is refused, naming the directory and what was found and asked."""
    from tests.conftest import load_script

    mod = load_script("grpo_head_likelihood_bound")
    sft, _, _ = sft_dir
    root = tmp_path / "root"
    base = [str(sft), "--lr", "1e-3", "--prompts", "4", "--steps", "2", "--eval-rows", "4", "--dtype", "float32",
            "--output-root", str(root), "--results", str(tmp_path / "res")]

    def run(*extra: str) -> dict:
        monkeypatch.setattr("sys.argv", ["grpo_head_likelihood_bound.py", *base, *extra])
        assert mod.main() == 0
        return json.loads((tmp_path / "res.json").read_text())

    first = run()
    out = root / "head_ll_lr0.001"
    assert json.loads((out / mod.SETTINGS_NAME).read_text())["prompts"] == 4
    stamp = (out / "per_row.json").stat().st_mtime_ns
    assert run()["runs"] == first["runs"]  # the same settings: reused, not measured again
    assert (out / "per_row.json").stat().st_mtime_ns == stamp
    refused = [(["--seed", "1"], "seed: found 0, asked 1"), (["--eval-rows", "3"], "eval_rows: found 4, asked 3"),
               (["--prompts", "8", "--steps", "4"], "prompts: found 4, asked 8; steps: found 2, asked 4"),
               (["--exclude-sft-rows"], "exclude_sft_rows: found False, asked True"),
               (["--dtype", "bfloat16"], "dtype: found 'float32', asked 'bfloat16'")]
    for extra, found in refused:
        with pytest.raises(SystemExit, match=f"{out}.*{found}"):
            run(*extra)
    base[0] = str(tmp_path / "other_sft")
    with pytest.raises(SystemExit, match=f"sft_checkpoint: found '{sft}', asked '{tmp_path / 'other_sft'}'"):
        run()
    base[0] = str(sft)
    # A run made before the settings file: the trainer's training_args.json, grpo_results.json and the count of
    # per-row values stand for it.
    (out / mod.SETTINGS_NAME).unlink()
    assert run()["runs"] == first["runs"]
    for extra, found in refused:
        with pytest.raises(SystemExit, match=f"{out}.*{found}"):
            run(*extra)
    assert (out / "per_row.json").stat().st_mtime_ns == stamp


def test_retrain_starts_over_without_the_earlier_runs_checkpoints(tmp_path, sft_dir):
    """retrain kept the earlier run's checkpoint-N: rotation (by step) deleted the new run's newer-looking ones
    first, and a later resume loaded the earlier run's weights."""
    sft, _, _ = sft_dir
    out = tmp_path / "grpo"
    run_grpo(grpo_config(out, sft, max_steps=4, save_steps=1, save_total_limit=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]

    def stop(trainer, stats):
        if trainer.global_step == 1:
            raise _Stop

    with pytest.raises(_Stop):
        run_grpo(grpo_config(out, sft, max_steps=4, save_steps=1, save_total_limit=2, retrain=True), callbacks=[stop])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "grpo_results.json").exists()
    # The earlier run's model is gone from the top too: evaluate read it as the new run's (review)
    from llmrec.models.checkpoint import CheckpointError, checkpoint_kind

    assert not (out / "latent_head.safetensors").exists() and not (out / "llmrec_config.json").exists()
    with pytest.raises(CheckpointError):
        checkpoint_kind(out)


def test_a_final_save_cut_short_is_not_taken_for_the_grpo_model(tmp_path, sft_dir, monkeypatch):
    """Head-only GRPO copied the SFT checkpoint's files, llmrec_config.json included, before writing its head: a
    kill in between left a folder evaluate and recommend read as the GRPO model with the SFT head (review)."""
    from llmrec.models.checkpoint import CheckpointError, checkpoint_kind
    from llmrec.models.latent import LatentReasoningLM

    sft, _, _ = sft_dir
    out = tmp_path / "grpo"

    def killed(self, directory):  # the process dies while the new head is written
        raise _Stop

    monkeypatch.setattr(LatentReasoningLM, "save_pretrained", killed)
    with pytest.raises(_Stop):
        run_grpo(grpo_config(out, sft, max_steps=1, save_steps=50))
    assert (out / "latent_config.json").exists() and not (out / "llmrec_config.json").exists()
    with pytest.raises(CheckpointError, match="save that was interrupted"):  # the save-in-progress marker
        checkpoint_kind(out)
    (out / ".llmrec_save_in_progress").unlink()  # and without it, the missing llmrec_config.json
    with pytest.raises(CheckpointError, match="no llmrec_config.json"):
        checkpoint_kind(out)


def test_scheduler_kwargs_reach_the_scheduler(tmp_path, sft_dir):
    sft, _, _ = sft_dir
    lrs = {}
    for cycles in (0.5, 2.0):
        t = LatentGRPOTrainer(grpo_config(tmp_path / f"c{cycles}", sft, max_steps=8, lr_scheduler_type="cosine",
                                          lr_scheduler_kwargs={"num_cycles": cycles}))
        lrs[cycles] = []
        for _ in range(8):
            lrs[cycles].append(t.scheduler.get_last_lr()[0])
            t.optimizer.step()
            t.scheduler.step()
    assert lrs[0.5] != lrs[2.0]


def test_held_out_check_runs_without_dropout(tmp_path, sft_dir):
    """With disable_dropout false the held-out "noise-free" rewards changed from one call to the next."""
    sft, data, root = sft_dir
    sft = _sft(root, data, lora_dropout=0.3)
    t = LatentGRPOTrainer(grpo_config(tmp_path / "g", sft, train_lora=True, disable_dropout=False, eval_rows=4))
    lm = t.accelerator.unwrap_model(t.module).latent_lm
    with torch.no_grad():  # a trained-looking adapter, so that its dropout matters
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    t.module.train()
    first, second = t.evaluate_rewards(), t.evaluate_rewards()
    assert first["neg_ppl"] == second["neg_ppl"] and t.module.training


def test_held_out_check_leaves_dropout_off_when_disable_dropout():
    """The wrapper module started in training mode over the eval-mode LM; the check restored the wrapper's flag on
    every submodule and so turned the LM's dropout on for the rest of the run."""
    from torch import nn

    from llmrec.training.grpo import _eval_mode

    outer = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2)))
    outer[1].eval()
    with _eval_mode(outer):
        assert not any(m.training for m in outer.modules())
    assert [m.training for m in outer.modules()] == [True, True, False, False, False]



# ------------------------------------------------------------------------------- generation mode (vanilla GRPO)


def test_title_rewards_hand_computed():
    from llmrec.training.rewards import exact_match

    inputs = RewardInputs(torch.zeros(4, 1), torch.ones(4, 1),
                          sampled_titles=["Halo 3", "halo 3", "Halo Wars 2", "Tetris"],
                          target_titles=["Halo 3", "Halo 3", "Halo 3", "Halo 3"])
    assert exact_match(inputs).tolist() == [1.0, 0.0, 0.0, 0.0]  # the trie's spelling, exactly
    # "Halo Wars 2" vs "Halo 3": 1 common word of 3 sampled / 2 true: P 1/3, R 1/2, F1 0.4
    assert token_f1(inputs).tolist() == pytest.approx([1.0, 1.0, 0.4, 0.0])
    # SQuAD's normalisation: punctuation breaks words, articles drop out ("Zelda (Gold Edition)" was 1/3, "Halo 3."
    # vs "Halo 3" 1/2 before); "Spider-Man" vs "Spider Man" are the same words; titles with no words left compare
    # whole; "Halo 3: ODST" vs "Halo 2": 1 common word of 3 / 2, F1 0.4
    marked = RewardInputs(torch.zeros(6, 1), torch.ones(6, 1),
                          sampled_titles=["Zelda (Gold Edition)", "Halo 3.", "The Spider-Man", "Halo 3: ODST", "!!", "?"],
                          target_titles=["Zelda Gold Edition", "Halo 3", "Spider Man", "Halo 2", "!!", "!"])
    assert token_f1(marked).tolist() == pytest.approx([1.0, 1.0, 1.0, 0.4, 1.0, 0.0])
    with pytest.raises(ValueError, match="rollout: generate"):
        token_f1(RewardInputs(torch.zeros(1, 1), torch.ones(1, 1)))
    # On the log-probs' device, as the likelihood rewards (here "meta" stands for a GPU): they were CPU tensors, and
    # combining or gathering them with device tensors failed on the first GRPO step on a GPU (a review).
    on_device = RewardInputs(torch.zeros(4, 1, device="meta"), torch.ones(4, 1, device="meta"),
                             sampled_titles=inputs.sampled_titles, target_titles=inputs.target_titles)
    assert exact_match(on_device).device.type == "meta" and token_f1(on_device).device.type == "meta"


def test_cached_constrained_sampling_equals_the_plain_recomputed_form(sft_dir):
    """The sampler with the prompt's KV cache and noised latents draws the titles the obviously-right form draws
    (every step recomputed from scratch on [prompt, noised latent, sampled prefix]), from the same uniforms."""
    from llmrec.data.canonical import load_prepared
    from llmrec.decoding.beam_search import PromptState
    from llmrec.decoding.sampling import constrained_sample_from_state, plain_constrained_sample
    from llmrec.decoding.search import build_catalog_trie
    from llmrec.prompts import PromptTemplate
    from llmrec.training.sft import load_sft_checkpoint

    sft, data, _ = sft_dir
    lm, tok, _ = load_sft_checkpoint(sft, dtype="float32")
    lm.eval()
    trie = build_catalog_trie(load_prepared(data, splits=["train"]).catalog, tok, PromptTemplate.load("d3"))
    t = LatentGRPOTrainer(grpo_config(Path(sft).parent / "unused", sft, rollout="generate",
                                      reward_funcs=["token_f1"]))
    b = t.local_micro_batches(0)[0]
    g, depth = 4, int(trie.depth.max())
    torch.manual_seed(0)
    noise = torch.randn(len(b.rows) * g, lm.lm_config.hidden_size) * 0.5
    for temperature in (1.0, 0.3):
        uniforms = torch.rand(len(b.rows) * g, depth, dtype=torch.float64)
        cache, logits, mask, pos = lm.prefill_with_latents(b.prompt_input_ids, b.prompt_attention_mask,
                                                           latent_noise=noise, repeats=g)
        fast = constrained_sample_from_state(lm.causal_lm, trie, PromptState(logits, cache, mask, pos), uniforms,
                                             temperature)

        def next_logits(r, toks, temperature=temperature):
            p = b.prompt_input_ids[r // g: r // g + 1]
            m = b.prompt_attention_mask[r // g: r // g + 1]
            prefix = lm.encode_prefix(p, m)
            last = prefix.latents[:, -1] + noise[r:r + 1]
            prefix = dataclasses.replace(prefix, latents=torch.cat([prefix.latents[:, :-1], last[:, None]], 1))
            ids = torch.tensor([toks + [0]])
            return lm.decode_completion(prefix, ids, torch.ones_like(ids)).logits[0, len(toks)].float()

        plain = plain_constrained_sample(next_logits, trie, uniforms, temperature)
        assert [(x.title_index, x.token_ids) for x in fast] == [(x.title_index, x.token_ids) for x in plain]
        assert all(x.token_ids == list(trie_path) for x, trie_path in
                   zip(fast, (trie.title_token_ids[x.title_index] for x in fast)))
    assert len({x.title_index for x in fast}) > 1  # the draws differ between members


def test_generation_mode_trains_on_sampled_titles(tmp_path, sft_dir):
    sft, _, _ = sft_dir
    out = tmp_path / "gen"
    cfg = grpo_config(out, sft, rollout="generate", reward_funcs=["exact_match", "token_f1"],
                      reward_weights=[1.0, 0.5], temperature=1.5, advantage_mode="group", eval_rows=4)
    trainer = LatentGRPOTrainer(cfg)
    # The held-out check reports what this mode trains on: the noise-free policy's rewards over G titles sampled
    # per row (keyed: the same values on every call), beside the true title's likelihood.
    held = trainer.evaluate_rewards(per_row=True)
    assert held == trainer.evaluate_rewards(per_row=True)
    assert held["rows"] == 4 and 0.0 <= held["token_f1"] <= 1.0 and held["exact_match"] in [x / 16 for x in range(17)]
    first = trainer._eval_rows[0]
    draws = trainer._draw_titles(trainer.latent_lm, _collate([first], trainer.pad),
                                 torch.zeros(4, trainer.latent_lm.lm_config.hidden_size),
                                 [(-1, first["row_index"], k) for k in range(4)])
    f1 = token_f1(RewardInputs(torch.zeros(4, 1), torch.ones(4, 1),
                               sampled_titles=[trainer.title_trie.titles[x.title_index] for x in draws],
                               target_titles=[first["target_title"]] * 4))
    assert held["per_row"]["token_f1"][0] == pytest.approx(float(f1.mean()))
    batches = trainer.local_micro_batches(0)
    trainer.score(0, batches)
    b = batches[0]
    g = cfg.num_generations
    assert b.completion_input_ids.shape[0] == len(b.rows) * g  # one sampled completion per member
    assert b.old_logprobs.shape == b.completion_input_ids.shape
    # the same keyed draws again (scoring is deterministic), other draws at another epoch
    again = trainer.local_micro_batches(0)
    trainer.score(0, again)
    assert torch.equal(again[0].completion_input_ids, b.completion_input_ids)
    res = run_grpo(cfg)
    last = res["log_history"][-1]
    for key in ("rewards/exact_match/mean", "rewards/token_f1/mean", "advantage/abs_mean", "loss"):
        assert key in last and math.isfinite(last[key]), key
    assert 0.0 <= last["rewards/token_f1/mean"] <= 1.0
    head = load_file(str(out / "latent_head.safetensors"))
    start = load_file(str(sft / "latent_head.safetensors"))
    assert any(not torch.equal(head[k], start[k]) for k in head)


def test_shared_prefix_equals_naive_on_per_member_completions(tmp_path, sft_dir):
    """Generation mode gives every member its own completion: both forms score [B * G, C] completions alike."""
    sft, _, _ = sft_dir
    fast_t = LatentGRPOTrainer(grpo_config(tmp_path / "f", sft, rollout="generate", reward_funcs=["token_f1"],
                                           temperature=1.7))
    naive_t = LatentGRPOTrainer(grpo_config(tmp_path / "n", sft, rollout="generate", reward_funcs=["token_f1"],
                                            naive_forward=True, temperature=1.7))
    fb, nb = fast_t.local_micro_batches(0), naive_t.local_micro_batches(0)
    fast_t.score(0, fb)
    naive_t.score(0, nb)
    for a, b in zip(fb, nb):
        assert torch.equal(a.completion_input_ids, b.completion_input_ids)
        mask = a.completion_attention_mask.bool()
        assert torch.allclose(a.old_logprobs[mask], b.old_logprobs[mask], atol=1e-4)
    # The ratio is over the distribution the titles were sampled from (generate_logprob constrained, the default):
    # the logits at the sampling temperature, softmaxed over the tokens the trie allows after each prefix. The plain
    # form: each member's logits recomputed on its own, log-softmax over the allowed tokens' logits / T.
    b = fb[0]
    module = fast_t.accelerator.unwrap_model(fast_t.module)
    lm, trie, g = module.latent_lm, fast_t.title_trie, fast_t.config.num_generations
    t = {k: getattr(b, k) for k in ("prompt_input_ids", "prompt_attention_mask", "completion_input_ids",
                                     "completion_attention_mask")}
    mask = b.completion_attention_mask.bool()
    forced = 0
    with torch.no_grad():
        for r in range(b.completion_input_ids.shape[0]):
            prefix = lm.encode_prefix(b.prompt_input_ids[r // g: r // g + 1], b.prompt_attention_mask[r // g: r // g + 1])
            last = prefix.latents[:, -1] + b.noise[r:r + 1]
            prefix = dataclasses.replace(prefix, latents=torch.cat([prefix.latents[:, :-1], last[:, None]], 1))
            n_tok = int(mask[r].sum())
            ids = b.completion_input_ids[r: r + 1, :n_tok]
            logits = lm.decode_completion(prefix, ids, torch.ones_like(ids)).logits[0].float()
            node = 0
            for j, tok in enumerate(ids[0].tolist()):
                allowed, children = trie.children(node)
                plain = torch.log_softmax(logits[j, allowed] / 1.7, -1)[allowed.index(tok)]
                assert b.completion_nodes[r, j] == node
                assert b.old_logprobs[r, j].item() == pytest.approx(plain.item(), abs=1e-5)
                if len(allowed) == 1:  # a forced token: the sampler had no choice, log-prob 0
                    assert b.old_logprobs[r, j].item() == 0.0
                    forced += 1
                node = children[allowed.index(tok)]
        assert forced > 0
        # vocab (TRL's convention): the whole vocabulary's softmax at the sampling temperature, not at 1
        at_t = module(**t, noise=b.noise, temperature=1.7).logprobs
        at_1 = module(**t, noise=b.noise).logprobs
    vocab_t = LatentGRPOTrainer(grpo_config(tmp_path / "v", sft, rollout="generate", reward_funcs=["token_f1"],
                                            temperature=1.7, generate_logprob="vocab"))
    vb = vocab_t.local_micro_batches(0)
    vocab_t.score(0, vb)
    assert vb[0].completion_nodes is None and torch.equal(vb[0].completion_input_ids, b.completion_input_ids)
    assert torch.allclose(vb[0].old_logprobs[mask], at_t[mask], atol=1e-5)
    assert not torch.allclose(vb[0].old_logprobs[mask], at_1[mask], atol=1e-3)
    assert (vb[0].old_logprobs[mask] < b.old_logprobs[mask] + 1e-6).all()  # restricting can only raise them


def test_generation_mode_config_errors(tmp_path):
    base = dict(output_dir=str(tmp_path / "o"), sft_checkpoint=str(tmp_path / "s"), num_generations=4,
                per_device_train_batch_size=4)
    with pytest.raises(ConfigError, match="need rollout: generate"):
        LatentGRPOConfig(**base, reward_funcs=["exact_match"])
    with pytest.raises(ConfigError, match="reward_funcs must be among"):
        LatentGRPOConfig(**base, rollout="generate", reward_funcs=["neg_ppl"])
    with pytest.raises(ConfigError, match="policy_logprob must be target"):
        LatentGRPOConfig(**base, rollout="generate", reward_funcs=["token_f1"], policy_logprob="gaussian")
    with pytest.raises(ConfigError, match="generate_logprob='vocab' applies to rollout: generate"):
        LatentGRPOConfig(**base, generate_logprob="vocab")
    with pytest.raises(ConfigError, match="generate_logprob must be one of"):
        LatentGRPOConfig(**base, rollout="generate", reward_funcs=["token_f1"], generate_logprob="full")
    with pytest.raises(ConfigError, match="temperature=0.5 applies to rollout: generate"):
        LatentGRPOConfig(**base, temperature=0.5)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        LatentGRPOConfig(**base, rollout="generate", reward_funcs=["token_f1"], temperature=0.0)
    with pytest.raises(ConfigError, match="rollout must be one of"):
        LatentGRPOConfig(**base, rollout="sample")


def test_generation_mode_resume_matches_uninterrupted(tmp_path, sft_dir):
    """The sampled titles are keyed by seed, epoch, row and member: a resumed run draws what an uninterrupted one
    draws and ends with the same weights."""
    sft, _, _ = sft_dir
    kw = dict(rollout="generate", reward_funcs=["token_f1"], advantage_mode="group", max_steps=4)
    full = run_grpo(grpo_config(tmp_path / "full", sft, **kw))
    _train_until(grpo_config(tmp_path / "cut", sft, save_steps=2, **kw), 2)
    resumed = run_grpo(grpo_config(tmp_path / "cut", sft, save_steps=2, **kw))
    assert resumed["resumed_from"].endswith("checkpoint-2")
    a = load_file(str(tmp_path / "full" / "latent_head.safetensors"))
    b = load_file(str(tmp_path / "cut" / "latent_head.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert [h["rewards/token_f1/mean"] for h in full["log_history"]] == pytest.approx(
        [h["rewards/token_f1/mean"] for h in resumed["log_history"]], abs=1e-9)


def test_a_step_whose_every_group_is_nan_is_skipped_once(tmp_path, sft_dir, recwarn):
    """Every prompt NaN inside the model: the step ran a zero-weight pass on a NaN prompt, logged loss NaN and was
    counted twice (skipped groups and a non-finite gradient). It is now skipped: loss 0, no gradient counted."""
    sft, _, _ = sft_dir
    trainer = LatentGRPOTrainer(grpo_config(tmp_path / "nan", sft, max_steps=1))
    trainer.latent_lm.embed_tokens.register_forward_hook(lambda m, a, o: o * float("nan"))
    before = {k: v.detach().clone() for k, v in trainer._trainable_state().items()}
    res = trainer.train()
    # the scheduler advancing past a skipped first update is intended: no torch warning saying otherwise
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    step = res["log_history"][0]
    assert res["skipped_groups"] == trainer.prompts_per_step and res["nonfinite_grad_steps"] == 0
    assert step["loss"] == 0.0 and step["skipped_groups"] == trainer.prompts_per_step
    assert all(torch.equal(v, before[k]) for k, v in trainer._trainable_state().items())


def test_a_resume_on_another_layout_of_the_same_global_batch_is_accepted(tmp_path, sft_dir, caplog):
    """TRL records steps_per_generation (= the accumulation steps) in the config: it must not block a resume with
    another split of the same global batch (8 rows as 4 x 2 accumulation, then as 8 x 1)."""
    sft, _, _ = sft_dir
    _train_until(grpo_config(tmp_path / "cut", sft, max_steps=4, save_steps=2), 2)
    with caplog.at_level(logging.WARNING, logger="llmrec.training.grpo"):
        resumed = run_grpo(grpo_config(tmp_path / "cut", sft, max_steps=4, save_steps=2,
                                       per_device_train_batch_size=8, gradient_accumulation_steps=1))
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == 4
    assert "neither layout" not in caplog.text  # dropout off (the default): the same run
    # With dropout on, the masks are drawn per step and process: said (a review).
    _train_until(grpo_config(tmp_path / "drop", sft, max_steps=4, save_steps=2, disable_dropout=False), 2)
    with caplog.at_level(logging.WARNING, logger="llmrec.training.grpo"):
        run_grpo(grpo_config(tmp_path / "drop", sft, max_steps=4, save_steps=2, disable_dropout=False,
                             per_device_train_batch_size=8, gradient_accumulation_steps=1))
    assert ("trained with 1 process(es) x 4 rows x accumulation 2, as 1 process(es) x 8 rows x accumulation 1: "
            "with dropout on") in caplog.text


def test_generation_mode_skips_a_nan_group_not_the_step(tmp_path, sft_dir):
    """A title sampled from NaN logits still gets a finite title reward: the member's NaN log-probs now make its
    group skipped (as in the latent mode) instead of dropping the whole update."""
    sft, _, _ = sft_dir
    trainer, res, before = _train_with_a_nan_prompt(tmp_path / "g", sft, rollout="generate",
                                                    reward_funcs=["token_f1"], advantage_mode="group")
    assert res["skipped_groups"] == 1 and res["nonfinite_grad_steps"] == 0
    after = trainer._trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(bool(torch.isfinite(v).all()) for v in after.values())


def test_every_refused_trl_field_exists_on_the_config():
    """A name in the refusal lists that the config does not have guards nothing (a misspelt or removed field)."""
    import dataclasses

    from llmrec.training.grpo import IGNORED_TRL_FIELDS, NO_EFFECT_FIELDS, NON_DEFAULT_REFUSED_FIELDS

    names = {f.name for f in dataclasses.fields(LatentGRPOConfig)}
    assert [n for n in (*IGNORED_TRL_FIELDS, *NO_EFFECT_FIELDS, *NON_DEFAULT_REFUSED_FIELDS) if n not in names] == []


def test_prompts_left_out_of_each_epoch_are_logged(tmp_path, sft_dir, caplog):
    """An epoch's last incomplete optimiser batch is dropped (dataloader_drop_last is not read): said at start."""
    sft = sft_dir[0]
    with caplog.at_level(logging.INFO, logger="llmrec.training.grpo"):
        LatentGRPOTrainer(grpo_config(tmp_path / "a", sft, max_train_rows=7))  # 2 prompts per step
    assert "7 prompts, 2 per optimiser step: 3 steps per epoch; the last 1 prompts" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llmrec.training.grpo"):
        LatentGRPOTrainer(grpo_config(tmp_path / "b", sft, max_train_rows=8))
    assert "left out" not in caplog.text


def test_a_finished_run_is_compared_by_the_prompts_it_drew_not_those_that_fit(tmp_path, sft_dir):
    """Rows whose answer does not fit max_length are skipped after the draw: an identical rerun is reused (it was
    refused: the prompts kept were compared with the rows asked), and a run asking for as many rows as the first
    one kept is refused (it draws another subset; it was reused)."""
    sft, data, _ = sft_dir
    base = dict(max_steps=1, max_length=138, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    res = run_grpo(grpo_config(tmp_path / "all", sft, **base))
    assert res["prompts"] < res["drawn_prompts"] == json.loads((data / "stats.json").read_text())["rows"]["train"]
    assert run_grpo(grpo_config(tmp_path / "all", sft, **base))["train_seconds_this_run"] == \
        res["train_seconds_this_run"]
    part = run_grpo(grpo_config(tmp_path / "part", sft, max_train_rows=12, **base))
    assert part["drawn_prompts"] == 12
    kept = part["prompts"]
    assert kept < 12, "max_length=138 must skip a row of this subset for the test to mean anything"
    with pytest.raises(ValueError, match=rf"prompts=12 \(asked: {kept}\)"):
        run_grpo(grpo_config(tmp_path / "part", sft, max_train_rows=kept, **base))


def test_a_finished_run_drawn_without_the_sft_rows_is_reused_on_an_identical_rerun(tmp_path, sft_dir):
    sft, _, _ = sft_dir
    cfg = dict(max_steps=1, exclude_sft_rows=True, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    res = run_grpo(grpo_config(tmp_path / "g", sft, **cfg))
    assert run_grpo(grpo_config(tmp_path / "g", sft, **cfg))["train_seconds_this_run"] == res["train_seconds_this_run"]
    with pytest.raises(ValueError, match=r"prompts=\d+ \(asked: 3\)"):
        run_grpo(grpo_config(tmp_path / "g", sft, max_train_rows=3, **cfg))


def test_a_directory_holding_another_kind_of_run_is_refused(tmp_path, sft_dir):
    """As for SFT: GRPO into an `llmrec evaluate` output put its checkpoints beside the evaluation's files."""
    sft, _, _ = sft_dir
    out = tmp_path / "eval"
    out.mkdir()
    (out / "protocol.json").write_text("{}\n")
    with pytest.raises(ValueError, match=r"holds protocol.json: an `llmrec evaluate` output, not a `llmrec grpo` run"):
        run_grpo(grpo_config(out, sft, max_steps=1))
    assert sorted(p.name for p in out.iterdir()) == ["protocol.json"]


@pytest.mark.parametrize("variant", ["paper", "gaussian_group"])
def test_gradient_direction_script_measures_the_trainers_gradient_and_the_exact_likelihood_one(tmp_path, sft_dir,
                                                                                             variant):
    """scripts/grpo_gradient_direction.py: its GRPO gradient is the one train_step hands to the optimiser, and its
    likelihood gradient equals autograd of minus the mean per-token log-likelihood, prompt by prompt; the script
    writes its table."""
    from tests.conftest import load_script

    mod = load_script("grpo_gradient_direction")
    sft, data, _ = sft_dir
    cfg = dict(num_generations=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_train_rows=8,
               max_grad_norm=0.0, reward_funcs=["neg_ppl"], reward_weights=[1.0], **mod.VARIANTS[variant])
    trainer = LatentGRPOTrainer(grpo_config(tmp_path / "a", sft, **cfg))
    g_grpo, g_nll, stats, prompts = mod.step_gradients(trainer, 0)
    assert prompts == 4 and float(g_grpo.norm()) > 0 and float(g_nll.norm()) > 0
    params = [p for p in trainer.module.parameters() if p.requires_grad]
    total = 0.0
    for row in trainer.step_rows(0):  # one prompt per forward: another batching than the script's micro-batches
        r = trainer.rows[row]
        p_ids = torch.tensor([r["prompt_ids"]])
        c_ids = torch.tensor([r["completion_ids"]])
        lp = trainer.module(p_ids, torch.ones_like(p_ids), c_ids, torch.ones_like(c_ids),
                            noise=torch.zeros(2, trainer.latent_lm.lm_config.hidden_size)).logprobs[0]
        total = total - lp.mean() / prompts
    want = torch.cat([g.flatten() for g in torch.autograd.grad(total, params)])
    assert torch.allclose(g_nll, want, rtol=1e-4, atol=1e-7)
    seen = {}
    trainer.optimizer.step = lambda *a, **k: seen.setdefault(
        "grad", torch.cat([p.grad.detach().flatten() for p in params]))
    trainer.train_step(0)
    assert torch.allclose(g_grpo, seen["grad"], rtol=1e-5, atol=1e-8)
    assert -1.0 <= mod.cosine(g_grpo, g_nll) <= 1.0
    out = tmp_path / "direction"
    import sys

    argv = [str(sft), "--variants", variant, "--prompts", "8", "--steps", "2", "--group-size", "2",
            "--prompts-per-micro-batch", "2", "--dataset", str(data), "--output", str(out)]
    old = sys.argv
    sys.argv = ["grpo_gradient_direction.py", *argv]
    try:
        assert mod.main() == 0
    finally:
        sys.argv = old
    record = json.loads(out.with_suffix(".json").read_text())
    assert [r["variant"] for r in record["results"]] == [variant] and len(record["results"][0]["steps"]) == 2
    assert f"| {variant} |" in out.with_suffix(".md").read_text()
