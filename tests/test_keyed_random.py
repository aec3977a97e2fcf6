"""Keyed random draws: SplitMix64 exactly, a row's draw independent of its batch, the truncated-normal law."""

from __future__ import annotations

import math

import pytest
import torch

from llmrec.seqrec.keyed_random import keyed_generator, keyed_trunc_normal, keyed_uniform, mix, row_keys

M64 = (1 << 64) - 1


def splitmix64_reference(seed: int, n: int) -> list[int]:
    """The published SplitMix64 generator, written out on Python ints (unsigned)."""
    out, state = [], seed & M64
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def test_uniforms_are_splitmix64_outputs():
    keys = torch.tensor([0, 1, -5, 2**62 + 7, -(2**63), 2**63 - 1])
    u = keyed_uniform(keys, (7,))
    for row, key in enumerate(keys.tolist()):
        fields = [f for z in splitmix64_reference(key, 4) for f in (z >> 41, z & ((1 << 23) - 1))]
        expected = [(f + 0.5) * 2.0**-23 for f in fields[:7]]
        assert u[row].tolist() == expected


def test_a_rows_draw_depends_on_its_key_only():
    rows = torch.tensor([3, 7, 9, 12])
    batch = keyed_trunc_normal(row_keys(rows, 42, 8, 1), (5, 4))
    # the same rows one at a time, in another order, or in another batch: the same numbers
    for i, r in enumerate(rows.tolist()):
        alone = keyed_trunc_normal(row_keys(torch.tensor([r]), 42, 8, 1), (5, 4))[0]
        assert torch.equal(alone, batch[i])
    shuffled = keyed_trunc_normal(row_keys(rows.flip(0), 42, 8, 1), (5, 4))
    assert torch.equal(shuffled.flip(0), batch)
    # another seed, stream or epoch: other numbers
    for key in ((43, 8, 1), (42, 9, 1), (42, 8, 2)):
        assert not torch.allclose(keyed_trunc_normal(row_keys(rows, *key), (5, 4)), batch)
    assert mix(42, 1, 0) != mix(42, 0, 1) and 0 <= mix(2**70, -1) < 2**63


def test_truncated_normal_law_matches_torch_init():
    torch.manual_seed(0)
    std = 0.7
    ours = keyed_trunc_normal(row_keys(torch.arange(4000), 1, 2), (64,), std=std).flatten()
    ref = torch.nn.init.trunc_normal_(torch.empty(ours.numel()), 0.0, std, -3 * std, 3 * std)
    assert ours.abs().max() <= 3 * std
    # the truncated normal's std at 3 sigma: sqrt(1 - 6 phi(3) / (2 Phi(3) - 1))
    phi3 = math.exp(-4.5) / math.sqrt(2 * math.pi)
    big_phi3 = 0.5 * (1 + math.erf(3 / math.sqrt(2)))
    law_std = std * math.sqrt(1 - 6 * phi3 / (2 * big_phi3 - 1))
    assert ours.std().item() == pytest.approx(law_std, rel=0.01)
    assert ours.mean().item() == pytest.approx(0.0, abs=0.01)
    # every decile within 0.01 std of torch's sampler (256,000 draws each)
    q = torch.linspace(0.1, 0.9, 9)
    assert torch.allclose(torch.quantile(ours[:100_000], q), torch.quantile(ref[:100_000], q), atol=0.02 * std)
    # neighbouring rows and neighbouring elements are uncorrelated
    grid = ours.view(4000, 64)
    assert abs(torch.corrcoef(grid[:, :2].T)[0, 1].item()) < 0.05
    assert abs(torch.corrcoef(torch.stack([grid[:-1, 0], grid[1:, 0]]))[0, 1].item()) < 0.05


def test_keyed_generator_repeats_its_draws():
    a = torch.randn(3, generator=keyed_generator(42, 1, 0, 5))
    b = torch.randn(3, generator=keyed_generator(42, 1, 0, 5))
    c = torch.randn(3, generator=keyed_generator(42, 1, 0, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_lares_training_draws_do_not_use_the_global_generator():
    """Depth and initial states come from (seed, epoch, step, row): the loss does not change with the global
    generator's state (dropout off), and changes with the step."""
    from llmrec.seqrec.models import LARES, LossContext
    from llmrec.seqrec.modules import Backbone

    torch.manual_seed(0)
    model = LARES(Backbone(20, 6, hidden=8, n_layers=1, heads=2, inner=16, dropout=0.0, attn_dropout=0.0),
                  heads=2, inner=16, dropout=0.0, attn_dropout=0.0, mean_recurrence=3, tla_weight=0.0,
                  sla_weight=0.0)
    model.train()
    batch = {"input_ids": torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 7, 8, 9, 10]]),
             "target_ids": torch.tensor([[0, 2, 3, 4, 5, 6], [0, 0, 8, 9, 10, 11]]),
             "row_index": torch.tensor([4, 9])}
    ctx = LossContext(denom=10.0, epoch=1, seed=5, step=3)
    losses = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        losses.append(model.loss(batch, ctx)[0].item())
    assert losses[0] == losses[1]
    other = [model.loss(batch, LossContext(denom=10.0, epoch=1, seed=5, step=s))[0].item() for s in range(4, 8)]
    assert any(v != losses[0] for v in other)
    # a row's state does not depend on the other rows of its batch
    T_both, _ = model.states(batch["input_ids"], 2, keys=row_keys(batch["row_index"], 5, 2, 1))
    T_one, _ = model.states(batch["input_ids"][1:], 2, keys=row_keys(batch["row_index"][1:], 5, 2, 1))
    assert torch.allclose(T_both[1], T_one[0], atol=1e-6)


def test_lares_alignment_partner_is_a_keyed_draw():
    """The same-target partner of the alignment terms (TLA/SLA) came from the global generator: a row's partner
    depended on the other rows of its batch (so on the number of processes) and on the global state (review)."""
    import numpy as np

    from llmrec.seqrec.data import SameTargetPool, SplitRows, left_pad
    from llmrec.seqrec.models import LARES, LossContext
    from llmrec.seqrec.modules import Backbone

    hists = [[i % 9 + 1, i % 7 + 2] for i in range(24)]
    pool = SameTargetPool(SplitRows("train", left_pad(hists, 6), np.array([6, 11] * 12), hists,
                                    [str(i) for i in range(24)]))
    seen: list[torch.Tensor] = []
    real_sample = pool.sample

    def sample(targets, exclude_rows, generator=None, own_inputs=None, uniforms=None):
        out = real_sample(targets, exclude_rows, generator, own_inputs,
                          **({"uniforms": uniforms} if uniforms is not None else {}))
        seen.append(out)
        return out

    pool.sample = sample
    torch.manual_seed(0)
    model = LARES(Backbone(20, 6, hidden=8, n_layers=1, heads=2, inner=16, dropout=0.0, attn_dropout=0.0),
                  heads=2, inner=16, dropout=0.0, attn_dropout=0.0, mean_recurrence=3, tla_weight=0.5,
                  sla_weight=0.5)
    model.train()
    batch = {"input_ids": torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 7, 8, 9, 10], [0, 0, 0, 3, 4, 5]]),
             "target_ids": torch.tensor([[0, 2, 3, 4, 5, 6], [0, 0, 8, 9, 10, 11], [0, 0, 0, 4, 5, 6]]),
             "row_index": torch.tensor([1, 4, 9])}
    for global_seed, rows in ((1, slice(None)), (2, slice(1, None)), (3, slice(1, None))):
        torch.manual_seed(global_seed)
        model.loss({k: v[rows] for k, v in batch.items()}, LossContext(denom=10.0, epoch=1, seed=5, step=3,
                                                                        aug_pool=pool))
    assert torch.equal(seen[0][1:], seen[1]) and torch.equal(seen[1], seen[2])
