"""Tests of the ID-based recommenders (llmrec.seqrec): tiny synthetic data, CPU, seconds each."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from llmrec.data.canonical import write_jsonl
from llmrec.data.catalog import ItemCatalog
from llmrec.seqrec.config import SeqRecConfig
from llmrec.seqrec.data import build_chains, chain_windows, load_seqrec_data
from llmrec.seqrec.models import LARES, ReaRec, build_model
from llmrec.seqrec.modules import Backbone


def write_successor_dataset(
    root: Path, num_items: int = 12, users: int = 16, length: int = 9, max_history: int = 50
) -> Path:
    """Users whose sequences follow the rule "item i is always followed by item i+1" (N by 1).

    User u starts at item ``1 + u % num_items``, so every transition appears in some user's training
    rows; its items form train prefix rows (history -> next), then one valid row and one test row
    (leave-one-out), histories cut to ``max_history``.
    """
    root.mkdir(parents=True, exist_ok=True)
    ItemCatalog(
        [str(i) for i in range(1, num_items + 1)], [f"item {i}" for i in range(1, num_items + 1)]
    ).save(root / "catalog.jsonl")
    train, valid, test = [], [], []
    for u in range(users):
        seq = [1 + (u + j) % num_items for j in range(length)]
        for t in range(1, length - 2):
            train.append(
                {
                    "user_id": f"u{u}",
                    "history_item_ids": seq[:t][-max_history:],
                    "target_item_id": seq[t],
                    "timestamp": t,
                }
            )
        valid.append(
            {
                "user_id": f"u{u}",
                "history_item_ids": seq[: length - 2],
                "target_item_id": seq[-2],
                "timestamp": 100,
            }
        )
        test.append(
            {
                "user_id": f"u{u}",
                "history_item_ids": seq[: length - 1],
                "target_item_id": seq[-1],
                "timestamp": 101,
            }
        )
    for name, rows in (("train", train), ("valid", valid), ("test", test)):
        write_jsonl(root / f"{name}.jsonl", rows)
    return root


def tiny_cfg(tmp_path: Path, data_dir: Path, **kw) -> SeqRecConfig:
    base = dict(
        dataset_dir=str(data_dir),
        output_dir=str(tmp_path / "run"),
        max_history=10,
        hidden_size=32,
        n_layers=1,
        n_heads=2,
        inner_size=64,
        dropout=0.0,
        attn_dropout=0.0,
        epochs=60,
        batch_size=8,
        eval_batch_size=16,
        lr=1e-2,
        patience=60,
        eval_every=60,  # validate once at the end: the overfit test wants the trained model, not the first perfect epoch
        progress=False,
        num_threads=1,
    )
    base.update(kw)
    return SeqRecConfig(**base)


# -- data -------------------------------------------------------------------------------------------


def test_chains_regroup_prefix_rows_with_truncated_histories():
    seq = list(range(1, 12))
    users, hists, targets = [], [], []
    for t in range(1, len(seq)):
        users.append("a")
        hists.append(seq[:t][-4:])  # histories cut to 4 at preparation
        targets.append(seq[t])
    chains = build_chains(users, hists, targets)
    assert len(chains) == 1 and chains[0][0] == seq
    inputs, tgts, rows = chain_windows(chains, 4)
    # every row's target lands on exactly one loss position
    assert int((tgts > 0).sum()) == len(targets)
    assert sorted(tgts[tgts > 0].tolist()) == sorted(targets)
    assert inputs[0].tolist() == seq[-5:-1] and tgts[0].tolist() == seq[-4:]


def test_sequence_mode_warns_when_chains_give_more_context_than_any_row(tmp_path, caplog):
    """Rows prepared with a 3-item history: chains rebuild 6-item contexts that no train, valid or test row reads."""
    d = write_successor_dataset(tmp_path / "d", max_history=3)
    for split in ("valid", "test"):  # as `data prepare --max-history 3` writes them (the helper cuts train only)
        rows = [json.loads(line) for line in (d / f"{split}.jsonl").read_text().splitlines()]
        write_jsonl(d / f"{split}.jsonl", [dict(r, history_item_ids=r["history_item_ids"][-3:]) for r in rows])
    with caplog.at_level("WARNING", logger="llmrec.seqrec.data"):
        load_seqrec_data(d, max_history=10)
    assert "contexts of up to 6 items, but no row's history holds more than 3" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="llmrec.seqrec.data"):
        load_seqrec_data(d, max_history=3)
        load_seqrec_data(d, max_history=10, train_mode="rows")
        load_seqrec_data(write_successor_dataset(tmp_path / "full"), max_history=10)
    assert "contexts of up to" not in caplog.text


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_window_stride_trains_each_row_once_with_enough_context(stride):
    """Every row's target is one loss position exactly once, with its full history when the chain has it
    (``length - stride`` earlier items at least) and the right items as that context; stride = length is the
    non-overlapping default and stride = 1 is one window per prefix (RecBole's samples)."""
    seq = list(range(1, 15))
    users = ["a"] * (len(seq) - 1)
    hists = [seq[:t][-4:] for t in range(1, len(seq))]
    targets = seq[1:]
    chains = build_chains(users, hists, targets)
    length = 4
    inputs, tgts, _ = chain_windows(chains, length, stride)
    assert sorted(tgts[tgts > 0].tolist()) == sorted(targets)
    assert all(int((row > 0).sum()) <= stride for row in tgts)
    for inp, tgt in zip(inputs.tolist(), tgts.tolist()):
        for j, t in enumerate(tgt):
            if t:
                context = [x for x in inp[: j + 1] if x]
                # the window holds the true preceding items, at least length - stride of them (or all there are)
                assert context == seq[: seq.index(t)][-len(context):]
                assert len(context) >= min(length - stride + 1, seq.index(t))
    if stride == length:
        ref = chain_windows(chains, length)
        assert all((a == b).all() for a, b in zip(ref, (inputs, tgts, _)))
    if stride == 1:
        assert len(inputs) == len(targets)
    with pytest.raises(ValueError, match="window stride"):
        chain_windows(chains, length, length + 1)


def test_load_sequence_and_rows_modes(tmp_path):
    d = write_successor_dataset(tmp_path / "d")
    seq = load_seqrec_data(d, max_history=10, train_mode="sequence")
    rows = load_seqrec_data(d, max_history=10, train_mode="rows")
    assert seq.train.num_targets == rows.train.num_targets == len(seq.train_rows)
    assert len(seq.train) == 16  # one window per user
    assert rows.train.targets[:, :-1].eq(0).all()
    assert seq.valid.inputs.shape == (16, 10) and seq.valid.inputs[0, 0] == 0  # left padding


# -- bad input --------------------------------------------------------------------------------------


def test_history_id_outside_catalogue_is_a_clear_error(tmp_path):
    d = write_successor_dataset(tmp_path / "d")
    rows = [json.loads(line) for line in (d / "valid.jsonl").read_text().splitlines()]
    rows[2]["history_item_ids"].append(999)
    write_jsonl(d / "valid.jsonl", rows)
    with pytest.raises(ValueError, match=r"valid\.jsonl, row 3, field 'history_item_ids': item (id )?999"):
        load_seqrec_data(d)


def test_empty_evaluation_history_is_a_clear_error(tmp_path):
    d = write_successor_dataset(tmp_path / "d")
    rows = [json.loads(line) for line in (d / "test.jsonl").read_text().splitlines()]
    rows[1]["history_item_ids"] = []
    write_jsonl(d / "test.jsonl", rows)
    with pytest.raises(ValueError, match=r"test\.jsonl, row 2, field 'history_item_ids': empty history"):
        load_seqrec_data(d)
    # the file's line is named, not the row's position: two blank lines first put that row on line 4
    (d / "test.jsonl").write_text("\n\n" + (d / "test.jsonl").read_text())
    with pytest.raises(ValueError, match=r"test\.jsonl, row 4, field 'history_item_ids': empty history"):
        load_seqrec_data(d)


def test_empty_split_is_a_clear_error(tmp_path):
    d = write_successor_dataset(tmp_path / "d")
    (d / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match="split 'test' is empty"):
        load_seqrec_data(d)


def test_a_bad_dataset_fails_before_the_run_directory_is_claimed(tmp_path):
    """A missing or empty dataset failed only after run_config.json was written into output_dir."""
    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    (d / "test.jsonl").write_text("")
    for data in (d, tmp_path / "missing"):
        with pytest.raises((ValueError, FileNotFoundError)):
            run_seqrec(tiny_cfg(tmp_path, data))
        assert not (tmp_path / "run").exists()


def test_negative_k_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="reason_steps"):
        SeqRecConfig(dataset_dir="x", model="rearec-erl", reason_steps=-1)
    with pytest.raises(ValueError, match="must be >= 0"):
        ReaRec(Backbone(10, 5, hidden=8, inner=8), reason_steps=-1)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        SeqRecConfig(dataset_dir="x", model="bert4rec")


# -- reasoning exactness ----------------------------------------------------------------------------


def _rearec(mode="erl", K=3, L=7, n=30):
    torch.manual_seed(0)
    bb = Backbone(n, L, hidden=16, n_layers=2, heads=2, inner=32, dropout=0.0, attn_dropout=0.0)
    return ReaRec(bb, mode=mode, reason_steps=K).eval()


def test_kv_cached_reasoning_equals_recomputing_the_extended_sequence():
    model = _rearec()
    ids = torch.tensor([[0, 0, 3, 4, 5, 6, 7], [1, 2, 3, 9, 8, 7, 6], [0, 0, 0, 0, 0, 0, 11]])
    with torch.no_grad():
        h, cache, valid = model.backbone.encode(ids)
        cached = model.reason(h, cache, valid, torch.full((len(ids),), 6))
    full = model.reason_recompute(ids)
    assert torch.allclose(cached, full, atol=1e-5), (cached - full).abs().max()


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_attention_over_cache_blocks_equals_attention_over_the_concatenated_cache(dropout_p):
    """Same outputs and gradients as concatenating the blocks first (dropout: same random stream, as the
    weights tensor has the same shape either way)."""
    from llmrec.seqrec.modules import attention, attention_over_blocks

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 4, 8, generator=g, requires_grad=True)
    ks = [torch.randn(3, 2, n, 8, generator=g, requires_grad=True) for n in (6, 4, 4)]
    vs = [torch.randn(3, 2, n, 8, generator=g, requires_grad=True) for n in (6, 4, 4)]
    mask = torch.rand(3, 1, 4, 14, generator=g) > 0.3
    mask[..., 0] = True
    outs, grads = [], []
    for blocks in (True, False):
        torch.manual_seed(1)
        if blocks:
            o = attention_over_blocks(q, tuple(ks), tuple(vs), mask, dropout_p)
        else:
            o = attention(q, torch.cat(ks, 2), torch.cat(vs, 2), mask, dropout_p)
        outs.append(o)
        grads.append(torch.autograd.grad((o * torch.arange(o.numel()).view_as(o).sin()).sum(), [q, *ks, *vs]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_prefix_cache_attention_equals_attention_over_each_prefixs_copied_keys(dropout_p):
    """Two reasoning steps of PrefixCache (the rows' item keys read in place, queries laid out per row) give the
    outputs and gradients of attention over each prefix's own copy of its row's keys plus its earlier tokens
    (dropout: the same random stream, as the weights have the same elements in the same order)."""
    from llmrec.seqrec.modules import PrefixCache, attention_over_blocks

    g = torch.Generator().manual_seed(0)
    B, h, L, dh = 3, 2, 6, 4
    keys = torch.randn(B, h, L, dh, generator=g, requires_grad=True)
    values = torch.randn(B, h, L, dh, generator=g, requires_grad=True)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, :3] = False
    rows, pos = torch.tensor([0, 0, 1, 1, 1, 2]), torch.tensor([3, 5, 0, 2, 5, 4])
    steps = [tuple(torch.randn(len(rows), h, 1, dh, generator=g, requires_grad=True) for _ in range(3))
             for _ in range(2)]
    item_allow = valid[rows] & (torch.arange(L)[None] <= pos[:, None])
    outs, grads = [], []
    for prefix_cache in (True, False):
        torch.manual_seed(1)
        got = []
        if prefix_cache:
            cache = PrefixCache.for_prefixes([((keys,), (values,))], valid, rows, pos)[0]
            for q, k, v in steps:
                o, cache = cache.attend(q, k, v, dropout_p)
                got.append(o)
        else:
            ks, vs = (keys[rows],), (values[rows],)
            for i, (q, k, v) in enumerate(steps):
                ks, vs = (*ks, k), (*vs, v)
                mask = torch.cat([item_allow, torch.ones(len(rows), i + 1, dtype=torch.bool)], -1)[:, None, None]
                got.append(attention_over_blocks(q, ks, vs, mask, dropout_p))
        out = torch.cat(got, -1)
        outs.append(out)
        leaves = [keys, values, *(t for step in steps for t in step)]
        grads.append(torch.autograd.grad((out * torch.arange(out.numel()).view_as(out).cos()).sum(), leaves))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_batched_prefix_reasoning_equals_per_prefix_forwards():
    """Every prefix's reasoning, run together (the prefixes read in training, and the every-position reference
    form), equals encoding that prefix alone and reasoning from its last position."""
    model = _rearec(K=2)
    ids = torch.tensor([[0, 0, 5, 3, 8, 2, 9], [4, 4, 1, 7, 6, 2, 3], [0, 0, 0, 0, 0, 0, 6]])
    L = ids.shape[1]
    rows, pos = (ids > 0).nonzero(as_tuple=True)
    keep = torch.arange(len(rows)) % 3 != 1  # a subset too: prefixes are read independently of each other
    with torch.no_grad():
        h, cache, valid = model.backbone.encode(ids)
        pairs = model.reason(h, cache, valid, pos, rows)  # [N, K+1, d]
        subset = model.reason(h, cache, valid, pos[keep], rows[keep])
        dense = model.reason_dense(h, cache, valid, torch.arange(L))  # [B, K+1, L, d]
        for n, (b, p) in enumerate(zip(rows.tolist(), pos.tolist(), strict=True)):
            prefix = torch.zeros(1, L, dtype=torch.long)
            prefix[0, L - p - 1 :] = ids[b, : p + 1]  # the prefix alone, left-padded
            h1, c1, v1 = model.backbone.encode(prefix)
            single = model.reason(h1, c1, v1, torch.tensor([L - 1]))[0]
            assert torch.allclose(pairs[n], single, atol=1e-5), (b, p)
            assert torch.allclose(dense[b, :, p], single, atol=1e-5), (b, p)
    torch.testing.assert_close(subset, pairs[keep], atol=1e-6, rtol=1e-5)


def test_prefix_reasoning_follows_a_given_base_and_takes_prefixes_in_any_order():
    """PRL's noisy view builds step k's token from ``base`` (here random, so it differs from the chain's own states):
    the same as the every-position form given the same base; prefixes may come in any order, rows may have none,
    and there may be no prefix at all."""
    model = _rearec(K=2, L=8)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 30, (4, 8), generator=g)
    ids[0, :5] = 0
    ids[1, :7] = 0
    with torch.no_grad():
        h, cache, valid = model.backbone.encode(ids)
        rows, pos = (ids > 0).nonzero(as_tuple=True)
        base = torch.randn(len(rows), 3, 16, generator=g)
        dense_base = base.new_zeros(4, 3, 8, 16)
        dense_base[rows, :, pos] = base
        got = model.reason(h, cache, valid, pos, rows, base=base)
        want = model.reason_dense(h, cache, valid, torch.arange(8), base=dense_base)[rows, :, pos]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert (got[:, 1:] - model.reason(h, cache, valid, pos, rows)[:, 1:]).abs().max() > 1e-3
        shuffled = torch.randperm(len(rows), generator=g)
        torch.testing.assert_close(model.reason(h, cache, valid, pos[shuffled], rows[shuffled], base=base[shuffled]),
                                   got[shuffled], atol=1e-6, rtol=1e-5)
        some_rows, some_pos = torch.tensor([3, 1, 3]), torch.tensor([2, 7, 7])  # rows 0 and 2 have none
        torch.testing.assert_close(model.reason(h, cache, valid, some_pos, some_rows),
                                   model.reason_dense(h, cache, valid, torch.arange(8))[some_rows, :, some_pos],
                                   atol=1e-6, rtol=1e-5)
        none = torch.zeros(0, dtype=torch.long)
        assert model.reason(h, cache, valid, none, none).shape == (0, 3, 16)
        with pytest.raises(ValueError, match=r"pos must have shape \(4,\)"):
            model.reason(h, cache, valid, torch.tensor([7]))  # one position for every row is not this call


@pytest.mark.parametrize("mode", ["erl", "prl"])
def test_a_batch_without_targets_gives_a_zero_loss_not_nan(mode):
    from llmrec.seqrec.models import LossContext

    torch.manual_seed(0)
    model = ReaRec(Backbone(30, 6, hidden=16, inner=32, dropout=0.0, attn_dropout=0.0), mode=mode, warmup_epochs=0)
    ids = torch.tensor([[0, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]])
    loss, logs = model.loss({"input_ids": ids, "target_ids": torch.zeros_like(ids)}, LossContext(epoch=3))
    loss.backward()
    assert loss.item() == 0.0 and all(v == v for v in logs.values()), logs  # no NaN in the loss or the logs
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.reasoning_layout = "pair"
    with pytest.raises(ValueError, match="reasoning_layout must be 'pairs' or 'dense'"):
        model.loss({"input_ids": ids, "target_ids": ids}, LossContext(epoch=3))


@pytest.mark.parametrize("mode", ["erl", "prl"])
def test_training_loss_over_target_prefixes_equals_the_every_position_form(mode):
    """The loss reasons only over the prefixes that have a target; the reference reasons over every position of
    every row: the same loss and gradients (dropout off, PRL's noisy view on with noise 0 so both views agree)."""
    from llmrec.seqrec.models import LossContext

    torch.manual_seed(0)
    bb = Backbone(30, 8, hidden=16, n_layers=2, heads=2, inner=32, dropout=0.0, attn_dropout=0.0)
    model = ReaRec(bb, mode=mode, reason_steps=2, noise_std=0.0, warmup_epochs=0)
    model.noise_std = 1e-30  # switches the contrastive view on; adds nothing representable to a token
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 31, (5, 8), generator=g)
    ids[0, :5] = 0  # short histories: left padding, as on Games
    ids[1, :7] = 0
    tgt = torch.randint(1, 31, (5, 8), generator=g) * (ids > 0)
    tgt[2, :4] = 0  # a window whose first positions are context only (window_stride)
    batch = {"input_ids": ids, "target_ids": tgt}
    out = {}
    for layout in ("pairs", "dense"):
        model.reasoning_layout = layout
        model.zero_grad(set_to_none=True)
        loss, logs = model.loss(batch, LossContext(denom=float((tgt > 0).sum()), epoch=5))
        loss.backward()
        out[layout] = (loss.detach(), logs, {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(out["pairs"][0], out["dense"][0], atol=1e-6, rtol=1e-5)
    assert out["pairs"][1].keys() == out["dense"][1].keys() and ("rcl" in out["pairs"][1]) == (mode == "prl")
    for name, grad in out["dense"][2].items():
        torch.testing.assert_close(out["pairs"][2][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_lares_recurrence_is_deterministic_at_eval_with_zero_state():
    torch.manual_seed(0)
    model = LARES(Backbone(20, 6, hidden=16, inner=32), inner=32, dropout=0.1, attn_dropout=0.1).eval()
    ids = torch.tensor([[0, 1, 2, 3, 4, 5]])
    assert torch.equal(model.score(ids), model.score(ids))
    model.train()
    depths = {model.sample_depth() for _ in range(200)}
    assert min(depths) >= 1 and max(depths) <= 12 and len(depths) > 3


# -- end-to-end: overfit "i -> i+1" -----------------------------------------------------------------


@pytest.mark.parametrize(
    "model,extra",
    [
        ("sasrec", {}),
        ("sasrec", {"train_mode": "rows"}),
        ("gru4rec", {}),
        ("rearec-erl", {"reason_steps": 2}),
        ("rearec-erl", {"reason_steps": 2, "backbone": "gru"}),
        (
            "rearec-prl",
            {"reason_steps": 2, "warmup_epochs": 5, "temperature": 0.2},
        ),  # PTA at tau=1 needs more epochs
        ("lares", {"mean_recurrence": 2, "rpt_epochs": 2, "rpt_batch_size": 16, "rpt_lr": 1e-3}),
    ],
)
def test_each_model_overfits_the_successor_pattern(tmp_path, model, extra):
    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, model=model, **extra)
    res = run_seqrec(cfg)
    assert res["test"]["hr@1"] == 1.0, res["test"]
    out = Path(cfg.output_dir)
    assert (out / "results.json").exists() and (out / "results.md").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["protocol"]["max_history"] == 10 and saved["protocol"]["mask_history"] is False
    assert saved["timings"]["epoch_s"] > 0 and saved["timings"]["infer_ms_per_row"] > 0
    if model.startswith("rearec"):
        assert saved["protocol"]["reason_steps_K"] == 2
    # The best epoch is counted within the phase whose weights were selected (LARES: SPT "train" or "rpt").
    phase = next(p for p in saved["phases"] if p["name"] == saved["best_phase"])
    assert saved["best_epoch"] == phase["best_epoch"] and saved["valid"] == phase["best_valid"]
    if model == "lares":
        assert saved["best_phase"] == saved["selected_phase"].replace("spt", "train")


def trained_batches(monkeypatch) -> list[tuple[str, int]]:
    """``(phase, epoch)`` of every training batch the trainer runs from now on: a resumed or finished run's rerun
    must train only what is left (equal results alone cannot tell a resume from a seeded retrain from scratch)."""
    from llmrec.seqrec import trainer as T

    seen: list[tuple[str, int]] = []
    real = T.LossContext

    def counting(**kw):
        seen.append((kw["extra"].get("phase"), kw["epoch"]))
        return real(**kw)

    monkeypatch.setattr(T, "LossContext", counting)
    return seen


def test_resume_skips_finished_phase(tmp_path, monkeypatch):
    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, epochs=3, eval_every=1)
    first = run_seqrec(cfg)
    seen = trained_batches(monkeypatch)
    again = run_seqrec(cfg)  # finished phase: loads best weights, does not retrain
    assert again["test"] == first["test"] and again["timings"]["epochs"] == first["timings"]["epochs"]
    assert seen == []


def test_a_killed_and_resumed_run_reports_the_training_time_of_every_invocation(tmp_path, monkeypatch):
    """train_total_s (the pipeline report's training time) counted only the last invocation (a review)."""
    import time

    from llmrec.seqrec.run import run_seqrec
    from llmrec.seqrec.trainer import SeqRecTrainer

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, epochs=4, eval_every=1, patience=10)
    real_evaluate = SeqRecTrainer.evaluate
    calls = []

    def slow_then_killed(self, *args, **kwargs):  # 0.5 s per validation; killed in epoch 3's
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        time.sleep(0.5)
        return real_evaluate(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(SeqRecTrainer, "evaluate", slow_then_killed)
        with pytest.raises(KeyboardInterrupt):
            run_seqrec(cfg)
    before = json.loads((Path(cfg.output_dir) / "train_seconds.json").read_text())["seconds"]
    assert before >= 1.0  # epochs 1 and 2
    res = run_seqrec(cfg)
    assert res["timings"]["epochs"] == 4 and res["timings"]["train_total_s"] > before
    fresh = run_seqrec(dataclasses.replace(cfg, resume=False))  # from scratch: the earlier time is not counted
    assert fresh["timings"]["train_total_s"] < before


def test_a_checkpoint_of_another_process_count_resumes_with_a_warning_and_is_recorded(tmp_path, monkeypatch, caplog):
    """Resuming under another process layout (same global batch) is allowed, but with dropout the masks are drawn per
    process: the run is neither layout's uninterrupted run. It went unsaid, and results.json recorded only the last
    invocation's count (a review)."""
    import logging

    from llmrec.seqrec.run import run_seqrec
    from llmrec.seqrec.trainer import SeqRecTrainer

    d = write_successor_dataset(tmp_path / "d")
    real_evaluate = SeqRecTrainer.evaluate
    for dropout in (0.1, 0.0):  # said only with dropout on (without, the resumed run is the same run); recorded both
        cfg = tiny_cfg(tmp_path / str(dropout), d, epochs=3, eval_every=1, patience=10, dropout=dropout)
        calls: list[int] = []

        def killed_in_the_second_validation(self, *args, calls=calls, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real_evaluate(self, *args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(SeqRecTrainer, "evaluate", killed_in_the_second_validation)
            with pytest.raises(KeyboardInterrupt):
                run_seqrec(cfg)
        state_file = Path(cfg.output_dir) / "train" / "state.json"
        state = json.loads(state_file.read_text())
        assert state["epoch"] == 0 and state["num_processes"] == 1
        state_file.write_text(json.dumps(dict(state, num_processes=2)))  # as if epoch 1 had run on 2 processes
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="llmrec.seqrec.trainer"):
            res = run_seqrec(cfg)
        assert ("resuming a checkpoint trained on 2 process(es) on 1" in caplog.text) == (dropout > 0)
        assert res["timings"]["num_processes"] == 1 and res["timings"]["num_processes_before_resume"] == [2]
    again = run_seqrec(dataclasses.replace(cfg, resume=False, output_dir=str(tmp_path / "plain")))
    assert "num_processes_before_resume" not in again["timings"]


def test_tensorboard_logs_each_epochs_losses_and_validation_metrics(tmp_path, monkeypatch):
    import sys

    from conftest import read_scalars

    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    res = run_seqrec(tiny_cfg(tmp_path, d, epochs=3, eval_every=1, report_to="tensorboard"))
    scalars = read_scalars(Path(res["config"]["output_dir"]) / "tensorboard")
    history = res["phases"][0]["history"]
    assert len(history) == 3
    assert scalars["train/loss"] == [(e["epoch"], pytest.approx(e["loss"])) for e in history]
    assert scalars["train/valid/ndcg@10"] == [(e["epoch"], pytest.approx(e["valid"]["ndcg@10"])) for e in history]
    assert [step for step, _ in scalars["train/seconds"]] == [1, 2, 3]
    assert not [t for t in scalars if "test" in t]  # the test split is never logged
    # Asked for without the package: refused when the run starts, before any work; but a finished run's config
    # (evaluate, D3 guidance, recommend rebuild it) still loads.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match="llmrec\\[tensorboard\\]"):
        run_seqrec(tiny_cfg(tmp_path / "other", d, report_to="tensorboard"))
    assert not (tmp_path / "other").exists()
    from llmrec.recommend import Recommender

    assert Recommender.from_pretrained(res["config"]["output_dir"]).recommend([1, 2], k=2)
    with pytest.raises(ValueError, match="report_to must be one of"):
        tiny_cfg(tmp_path / "other", d, report_to="wandb")


def test_num_threads_applies_to_the_run_only(tmp_path, monkeypatch):
    """Several stages in one process (the pipeline's --in-process, the tests): a run's thread count ends with it."""
    import torch

    from llmrec.seqrec import run as run_module

    seen = []
    real = run_module._run_seqrec
    monkeypatch.setattr(run_module, "_run_seqrec", lambda cfg, *a: seen.append(torch.get_num_threads()) or real(cfg, *a))
    before = torch.get_num_threads()
    d = write_successor_dataset(tmp_path / "d")
    wanted = 2 if before == 1 else 1
    run_module.run_seqrec(tiny_cfg(tmp_path, d, epochs=1, num_threads=wanted))
    assert seen == [wanted] and torch.get_num_threads() == before


def test_resume_after_an_early_stop_trains_no_extra_epoch(tmp_path, monkeypatch):
    """Cut after the early stop's checkpoint but before done.json: the rerun finishes without another epoch."""
    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, epochs=40, eval_every=1, patience=1)
    first = run_seqrec(cfg)
    assert first["timings"]["epochs"] < 40  # it did stop early
    out = Path(cfg.output_dir)
    (out / "train" / "done.json").unlink()
    (out / "results.json").unlink()
    seen = trained_batches(monkeypatch)
    again = run_seqrec(cfg)
    assert again["timings"]["epochs"] == first["timings"]["epochs"] and again["test"] == first["test"]
    assert seen == []  # resumed at its stop: no batch trained


def test_lares_resumed_after_spt_filters_and_trains_rpt_as_an_uninterrupted_run(tmp_path, monkeypatch):
    import shutil

    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, model="lares", epochs=2, mean_recurrence=2, rpt_epochs=1, rpt_batch_size=16,
                   rpt_lr=1e-3, dropout=0.1, attn_dropout=0.1)
    first = run_seqrec(cfg)
    out = Path(cfg.output_dir)
    shutil.rmtree(out / "rpt")  # cut right after SPT
    (out / "results.json").unlink()
    seen = trained_batches(monkeypatch)
    again = run_seqrec(cfg)
    assert again["rpt_rows_kept"] == first["rpt_rows_kept"]
    assert again["test"] == first["test"]
    assert seen and {phase for phase, _ in seen} == {"rpt"}  # SPT's finished phase is not trained again


def test_lares_trained_from_zero_states_is_filtered_and_post_trained_from_zero_states(tmp_path, monkeypatch):
    """``state_init: zero``: the between-phase filter (one pass: the passes would agree) and the RPT rollouts with
    their frozen reference start from T0 = 0, the state SPT trained on; they drew 3 * truncnorm before."""
    from llmrec.seqrec import models as M
    from llmrec.seqrec.run import run_seqrec

    seen, real = [], M.LARES.states

    def spy(self, ids, depth, T0=None, collect=None, keys=None):
        used = self.initial_state(self.backbone.embed(ids), keys=keys) if T0 is None else T0
        seen.append(float(used.abs().max()))
        return real(self, ids, depth, T0=T0, collect=collect, keys=keys)

    monkeypatch.setattr(M.LARES, "states", spy)
    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, model="lares", epochs=1, mean_recurrence=2, rpt_epochs=1, rpt_batch_size=16,
                   rpt_lr=1e-3, state_init="zero", filter_passes=3)
    result = run_seqrec(cfg)
    assert result["rpt_rows_kept"] > 0 and len(seen) > 0
    assert max(seen) == 0.0


def test_a_run_cut_while_writing_its_checkpoint_resumes_from_the_previous_complete_one(tmp_path, monkeypatch):
    """Killed after an epoch's weights were written but before its state.json: the rerun resumes from the previous
    epoch's complete checkpoint (slot and best file named by the state) and ends as an uninterrupted run."""
    import dataclasses

    from safetensors.torch import load_file

    from llmrec.seqrec import trainer as T
    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, epochs=3, eval_every=1, patience=5, dropout=0.1, attn_dropout=0.1)
    whole = run_seqrec(dataclasses.replace(cfg, output_dir=str(tmp_path / "whole")))

    real, calls = T.atomic_write_json, []

    def dies_at_second_state(path, obj, *a, **kw):
        if Path(path).name == "state.json":
            calls.append(path)
            if len(calls) == 2:
                raise KeyboardInterrupt("killed")
        return real(path, obj, *a, **kw)

    monkeypatch.setattr(T, "atomic_write_json", dies_at_second_state)
    with pytest.raises(KeyboardInterrupt):
        run_seqrec(cfg)
    monkeypatch.setattr(T, "atomic_write_json", real)
    seen = trained_batches(monkeypatch)
    resumed = run_seqrec(cfg)
    assert resumed["test"] == whole["test"] and resumed["best_epoch"] == whole["best_epoch"]
    # killed writing epoch 1's state: epoch 0's complete checkpoint is resumed, epochs 1 and 2 trained
    assert sorted({epoch for _, epoch in seen}) == [1, 2]
    a, b = (load_file(str(Path(o) / "train" / "best.safetensors")) for o in (tmp_path / "whole", cfg.output_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_checkpoints_of_other_settings(tmp_path):
    """A rerun in the same output_dir with another training setting must not load (and report) the old weights;
    settings that do not change training (progress, eval batch, extra test depths) still resume."""
    import dataclasses

    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, epochs=2, eval_every=1)
    first = run_seqrec(cfg)
    again = run_seqrec(dataclasses.replace(cfg, progress=not cfg.progress, eval_batch_size=3))
    assert again["test"] == first["test"]
    with pytest.raises(ValueError, match=r"holds a run made with lr=.*\(asked: 0\.5\)"):
        run_seqrec(dataclasses.replace(cfg, lr=0.5))
    # From scratch there (resume off), cut in its first epoch, then resumed: the old run's state is gone, so the
    # result is that of an uninterrupted lr-0.5 run, not of the old run's checkpoints trained on.
    from llmrec.seqrec import trainer as T

    real_eval = T.SeqRecTrainer.evaluate

    def killed(*a, **kw):
        raise KeyboardInterrupt("killed")

    T.SeqRecTrainer.evaluate = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            run_seqrec(dataclasses.replace(cfg, lr=0.5, resume=False))
    finally:
        T.SeqRecTrainer.evaluate = real_eval
    fresh = run_seqrec(dataclasses.replace(cfg, lr=0.5))
    alone = run_seqrec(dataclasses.replace(cfg, lr=0.5, output_dir=str(tmp_path / "alone")))
    assert fresh["test"] == alone["test"] and fresh["best_epoch"] == alone["best_epoch"]
    assert json.loads((Path(cfg.output_dir) / "run_config.json").read_text())["config"]["lr"] == 0.5
    assert fresh["config"]["lr"] == 0.5
    with pytest.raises(ValueError, match="holds a run made with lr="):
        run_seqrec(cfg)


@pytest.mark.parametrize("bad,match", [
    (dict(temperature=0.0), "temperature"), (dict(dropout=1.0), "dropout"), (dict(valid_metric="ndcg@50"), "valid_metric"),
    (dict(valid_metric="auc@10"), "valid_metric"), (dict(test_depths=[0, 2]), "test_depths"),
    (dict(valid_metric="ndcg@010"), "valid_metric"),  # passed, then failed at the first validation
    (dict(model="lares", rpt_epochs=1, rpt_group=1), "rpt_group"),
    # patience 0 trained nothing and wrote the untrained model's results; eval_every 0 divided by zero
    (dict(patience=0), "patience"), (dict(epochs=0), "epochs"), (dict(eval_every=0), "eval_every"),
    (dict(hidden_size=-8), "hidden_size"), (dict(n_layers=-1), "n_layers"),
    (dict(max_train_batches=-5), "max_train_batches"), (dict(lr=0.0), "lr"), (dict(kl_weight=-0.1), "kl_weight"),
    (dict(hidden_size=10, n_heads=4), "divisible"), (dict(ks=[0, 10]), "ks"),
])
def test_bad_settings_are_refused_at_once(bad, match):
    with pytest.raises(ValueError, match=match):
        SeqRecConfig(dataset_dir="x", **bad)


def test_build_model_names(tmp_path):
    for name in ("sasrec", "gru4rec", "rearec-erl", "rearec-prl", "lares"):
        m = build_model(SeqRecConfig(dataset_dir="x", model=name, hidden_size=8, inner_size=8), 10)
        assert m.score(torch.tensor([[0, 1, 2]])).shape == (1, 10)


def test_validation_curve_counts_the_phases_on_and_finds_the_selected_epoch():
    from llmrec.seqrec.bench import validation_curve

    def entry(epoch, ndcg=None):
        return {"epoch": epoch, **({"valid": {"ndcg@10": ndcg}} if ndcg is not None else {})}

    # LARES: 3 SPT epochs (the second not evaluated, eval_every 2 style), then 2 RPT epochs; RPT's first selected
    lares = {"best_phase": "rpt", "best_epoch": 1, "phases": [
        {"name": "train", "history": [entry(1, 0.1), entry(2), entry(3, 0.3)]},
        {"name": "rpt", "history": [entry(1, 0.4), entry(2, 0.35)]}]}
    assert validation_curve(lares) == ([1, 3, 4, 5], [0.1, 0.3, 0.4, 0.35], 4)
    sasrec = {"best_phase": "train", "best_epoch": 2, "phases": [{"name": "train", "history": [entry(1, .2), entry(2, .3)]}]}
    assert validation_curve(sasrec) == ([1, 2], [0.2, 0.3], 2)
    assert validation_curve({"best_epoch": 1}) == ([], [], None)  # recorded without phases: nothing to draw


def test_benchmark_is_resumable_and_summarises(tmp_path, capsys):
    from llmrec.seqrec.bench import run_seqrec_benchmark

    d = write_successor_dataset(tmp_path / "d")
    kw = dict(
        max_history=10, hidden_size=16, n_layers=1, inner_size=32, epochs=2, batch_size=8, progress=False
    )
    out = tmp_path / "bench"
    summary = run_seqrec_benchmark(d, ["sasrec", "rearec-erl"], 2, out, **kw)
    assert set(summary) == {"sasrec", "rearec-erl"} and summary["sasrec"]["seeds"] == 2
    for key in ("ndcg@10", "hr@10", "epoch_s", "infer_ms_per_row", "ndcg@10_std"):
        assert key in summary["sasrec"]
    assert "± " in capsys.readouterr().out
    assert (out / "seqrec_bench.json").exists() and (out / "seqrec_bench.md").exists()
    assert (out / "seqrec_bench.png").read_bytes().startswith(b"\x89PNG")
    # every model beside the first gets its paired interval over the test rows, seeds averaged per row first
    from llmrec.evaluation.compare import compare_runs

    r = out / "runs"
    want = compare_runs([r / "sasrec_seed0/test_eval", r / "sasrec_seed1/test_eval", r / "rearec-erl_seed0/test_eval",
                         r / "rearec-erl_seed1/test_eval"], ["ndcg@10"], seeds_per_run=2)["differences"]["ndcg@10"][0]
    paired = json.loads((out / "seqrec_bench.json").read_text())["paired"]
    assert set(paired) == {"rearec-erl"} and paired["rearec-erl"]["seeds"] == [42, 43]
    assert paired["rearec-erl"]["ndcg@10"]["ci95"] == want["ci95"]
    assert summary["rearec-erl"]["ndcg@10_diff"] == pytest.approx(
        summary["rearec-erl"]["ndcg@10"] - summary["sasrec"]["ndcg@10"])
    assert "NDCG@10 vs sasrec [95% CI]" in (out / "seqrec_bench.md").read_text()
    assert paired["rearec-erl"]["ndcg@10"]["ci95_seeds_rows"] == want["ci95_seeds_rows"]
    lo, hi = want["ci95_seeds_rows"]
    assert f"; seeds+rows [{lo:+.4f}, {hi:+.4f}]" in (out / "seqrec_bench.md").read_text()
    stamp = (out / "runs" / "sasrec_seed0" / "results.json").stat().st_mtime_ns
    import llmrec.seqrec.bench as bench_module

    written = []
    with pytest.MonkeyPatch.context() as m:
        seen = trained_batches(m)
        for name in ("atomic_write_json", "atomic_write_text", "plot_seqrec_benchmark"):
            real = getattr(bench_module, name)
            m.setattr(bench_module, name, lambda *a, _real=real, **k: written.append(
                next(Path(x).name for x in a if isinstance(x, (str, Path)))) or _real(*a, **k))
        again = run_seqrec_benchmark(d, ["sasrec", "rearec-erl"], 2, out, **kw)  # every run is skipped
    assert again == summary and seen == []
    # the JSON last: a summary cut after it left the previous table for the README (a review)
    assert written == ["seqrec_bench.md", "seqrec_bench.png", "seqrec_bench.json"]
    partial = run_seqrec_benchmark(d, ["sasrec", "lares"], 3, out, report_only=True, **kw)  # trains nothing
    assert set(partial) == {"sasrec"} and partial["sasrec"]["seeds"] == 2
    assert not (out / "runs" / "lares_seed0").exists()
    assert (out / "runs" / "sasrec_seed0" / "results.json").stat().st_mtime_ns == stamp
    # a finished run made with other settings is not reported as if made with these
    with pytest.raises(ValueError, match=r"sasrec_seed0.*results.json.*epochs=2 \(asked: 1\); remove it"):
        run_seqrec_benchmark(d, ["sasrec"], 1, out, **{**kw, "epochs": 1})
    with pytest.raises(ValueError, match=r"hidden_size=16 \(asked: 8\)"):
        run_seqrec_benchmark(d, ["sasrec"], 1, out, report_only=True, **{**kw, "hidden_size": 8})
    assert run_seqrec_benchmark(d, ["sasrec"], 1, out, **{**kw, "progress": True})["sasrec"]["seeds"] == 1
    # a test_eval whose metrics are not the run's own (e.g. left from an earlier run there) is refused, not paired
    stale = r / "rearec-erl_seed0/test_eval/results.json"
    res = json.loads(stale.read_text())
    res["metrics"]["item"]["ndcg@10"] += 0.01
    stale.write_text(json.dumps(res))
    with pytest.raises(ValueError, match=r"rearec-erl_seed0/test_eval: test ndcg@10 .* is not the run's own"):
        run_seqrec_benchmark(d, ["sasrec", "rearec-erl"], 2, out, **kw)
    # Larger stopping rules: --report-only refuses to report the shorter run, a benchmark trains it on (its test rows
    # ranked again), ending as the longer run from scratch.
    with pytest.raises(ValueError, match=r"epochs=2 \(asked: 3\); run without --report-only to train it on"):
        run_seqrec_benchmark(d, ["sasrec"], 1, out, report_only=True, **{**kw, "epochs": 3})
    longer = run_seqrec_benchmark(d, ["sasrec"], 1, out, **{**kw, "epochs": 3})
    scratch = run_seqrec_benchmark(d, ["sasrec"], 1, tmp_path / "scratch", **{**kw, "epochs": 3})
    assert longer["sasrec"]["ndcg@10"] == scratch["sasrec"]["ndcg@10"]
    res = json.loads((r / "sasrec_seed0/results.json").read_text())
    assert res["timings"]["epochs"] == 3 and res["config"]["epochs"] == 3
    ranked = json.loads((r / "sasrec_seed0/test_eval/results.json").read_text())["metrics"]["item"]
    assert ranked["ndcg@10"] == pytest.approx(res["test"]["ndcg@10"], abs=1e-6)


def test_benchmark_jobs_train_runs_at_once_with_the_results_of_one_job(tmp_path, monkeypatch):
    """--jobs 2 trains two runs at once, each in its own process and log, and ends with what one job gives: the same
    metrics, epochs and weights per run; each run's share of the threads is recorded where none was asked."""
    from safetensors.torch import load_file

    from llmrec.seqrec.bench import run_seqrec_benchmark

    d = write_successor_dataset(tmp_path / "d")
    kw = dict(max_history=10, hidden_size=16, n_layers=1, inner_size=32, epochs=2, batch_size=8, progress=False)
    models = ["sasrec", "rearec-erl"]
    # the same threads per run both ways (float32 sums' last bits depend on them on some CPUs)
    one = run_seqrec_benchmark(d, models, 2, tmp_path / "one", num_threads=2, **kw)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        two = run_seqrec_benchmark(d, models, 2, tmp_path / "two", jobs=2, **kw)
    finally:
        torch.set_num_threads(before)
    for m in models:
        assert two[m]["ndcg@10"] == one[m]["ndcg@10"] and two[m]["hr@10"] == one[m]["hr@10"]
        for s in range(2):
            a, b = (tmp_path / w / "runs" / f"{m}_seed{s}" for w in ("one", "two"))
            ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
            assert (ra["valid"], ra["test"], ra["best_epoch"]) == (rb["valid"], rb["test"], rb["best_epoch"])
            assert rb["config"]["num_threads"] == 2  # 4 threads over 2 jobs
            wa, wb = (load_file(str(r / "train" / "best.safetensors")) for r in (a, b))
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
            assert (b / "train.log").exists() and not (a / "train.log").exists()
    assert json.loads((tmp_path / "two" / "seqrec_bench.json").read_text())["jobs"] == 2
    # a rerun finds every run finished: nothing is trained again
    stamps = {r: r.stat().st_mtime_ns for r in (tmp_path / "two" / "runs").glob("*/results.json")}
    again = run_seqrec_benchmark(d, models, 2, tmp_path / "two", jobs=2, num_threads=2, **kw)
    assert again["sasrec"]["seeds"] == 2 and len(stamps) == 4
    assert {r: r.stat().st_mtime_ns for r in stamps} == stamps
    # the runs' timings were made two at a time: recorded so, and reported only beside runs made so
    assert all(json.loads(r.read_text())["timings"]["concurrent_runs"] == 2 for r in stamps)
    assert again["sasrec"]["timing_runs"] == 2
    assert run_seqrec_benchmark(d, models, 2, tmp_path / "two", report_only=True, num_threads=2,
                                **kw)["sasrec"]["timing_runs"] == 0
    with pytest.raises(ValueError, match="jobs must be an integer >= 1"):
        run_seqrec_benchmark(d, models, 1, tmp_path / "x", jobs=0, **kw)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="accelerate launch"):
        run_seqrec_benchmark(d, models, 1, tmp_path / "x", jobs=2, **kw)


def test_benchmark_jobs_more_than_the_cpus_warns(tmp_path, monkeypatch, caplog):
    """More jobs than usable CPUs still trains (a thread each) but says the runs will share cores."""
    import llmrec.seqrec.bench as bench

    d = write_successor_dataset(tmp_path / "d")
    kw = dict(max_history=10, hidden_size=16, n_layers=1, inner_size=32, epochs=1, batch_size=8, progress=False)
    monkeypatch.setattr(bench, "_usable_cpus", lambda: 1)
    with caplog.at_level("WARNING", logger="llmrec.seqrec.bench"):
        bench.run_seqrec_benchmark(d, ["sasrec"], 1, tmp_path / "out", jobs=2, report_only=True, **kw)
    assert "jobs 2 is more than the 1 CPU(s)" in caplog.text
    caplog.clear()
    monkeypatch.setattr(bench, "_usable_cpus", lambda: 2)
    with caplog.at_level("WARNING", logger="llmrec.seqrec.bench"):
        bench.run_seqrec_benchmark(d, ["sasrec"], 1, tmp_path / "out", jobs=2, report_only=True, **kw)
    assert "CPU(s)" not in caplog.text


def test_benchmark_jobs_a_failing_run_lets_the_others_finish(tmp_path, capsys):
    """The queued run after a failing one still trains; the failure is raised as its run raised it (so the CLI
    prints one line), named with its log when it happens; the log holds the run's records and the traceback."""
    from llmrec.seqrec.bench import _train_in_parallel

    d = write_successor_dataset(tmp_path / "d")
    kw = dict(max_history=10, hidden_size=16, n_layers=1, inner_size=32, epochs=1, batch_size=8, progress=False,
              num_threads=1, model="sasrec", seed=42)
    good, bad = tmp_path / "good", tmp_path / "bad"
    pending = [("sasrec", 0, bad, {**kw, "dataset_dir": str(tmp_path / "missing"), "output_dir": str(bad)}),
               ("sasrec", 1, good, {**kw, "dataset_dir": str(d), "output_dir": str(good)})]
    with pytest.raises(FileNotFoundError, match="missing"):
        _train_in_parallel(pending, 1)
    assert (good / "results.json").exists()
    assert re.search(r"sasrec seed 0 failed: FileNotFoundError: .*missing.* \(log: .*bad/train.log\)",
                     "".join(capsys.readouterr()))
    assert "Traceback" in (bad / "train.log").read_text()
    good_log = (good / "train.log").read_text()
    assert "INFO llmrec.seqrec" in good_log and json.loads((good / "results.json").read_text())["timings"][
        "concurrent_runs"] == 1


def test_benchmark_jobs_interrupted_stops_its_runs_and_starts_no_other(tmp_path, monkeypatch):
    import concurrent.futures
    import multiprocessing
    import time

    from llmrec.seqrec.bench import _train_in_parallel

    d = write_successor_dataset(tmp_path / "d")
    kw = dict(max_history=10, hidden_size=16, n_layers=1, inner_size=32, epochs=200, batch_size=8, progress=False,
              num_threads=1, model="sasrec", dataset_dir=str(d))
    dirs = [tmp_path / f"run{i}" for i in range(3)]
    pending = [("sasrec", i, r, {**kw, "seed": 42 + i, "output_dir": str(r)}) for i, r in enumerate(dirs)]

    def ctrl_c_once_the_first_run_trains(futures):
        deadline = time.monotonic() + 120
        while not (dirs[0] / "train.log").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        raise KeyboardInterrupt

    monkeypatch.setattr(concurrent.futures, "as_completed", ctrl_c_once_the_first_run_trains)
    with pytest.raises(KeyboardInterrupt):
        _train_in_parallel(pending, 1)
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("llmrec:")]
    assert (dirs[0] / "train.log").exists() and not (dirs[0] / "results.json").exists()
    assert not (dirs[1] / "train.log").exists() and not (dirs[2] / "train.log").exists()


def test_benchmark_reads_each_models_own_recipe(tmp_path):
    from llmrec.config import ConfigError
    from llmrec.seqrec.bench import run_seqrec_benchmark

    d = write_successor_dataset(tmp_path / "d")
    for model, steps in (("sasrec", ""), ("rearec-erl", "reason_steps: 1\n")):
        (tmp_path / f"{model}_x.yaml").write_text(
            f"model: {model}\nmax_history: 10\nhidden_size: 16\nn_layers: 1\nepochs: 1\nbatch_size: 8\n{steps}")
    out = tmp_path / "bench"
    run_seqrec_benchmark(d, ["sasrec", "rearec-erl"], 1, out, config=str(tmp_path / "{model}_x.yaml"), progress=False)
    cfg = json.loads((out / "runs" / "rearec-erl_seed0" / "results.json").read_text())["config"]
    assert cfg["reason_steps"] == 1 and cfg["hidden_size"] == 16
    (tmp_path / "lares_x.yaml").write_text("model: lares\nhidden_sise: 16\n")
    with pytest.raises(ConfigError, match="hidden_sise"):  # checked before any training starts
        run_seqrec_benchmark(d, ["sasrec", "lares"], 1, tmp_path / "b2", config=str(tmp_path / "{model}_x.yaml"))
    assert not (tmp_path / "b2").exists()


def test_cli_train_writes_results(tmp_path):
    from llmrec.cli import main

    d = write_successor_dataset(tmp_path / "d")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: sasrec\ndataset_dir: {d}\nmax_history: 10\nhidden_size: 16\nn_layers: 1\nepochs: 2\n"
    )
    out = tmp_path / "out"
    assert (
        main(["seqrec", "train", "--config", str(recipe), "--output_dir", str(out), "--progress", "false"])
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["split"] in ("unknown", "loo") and "ndcg@10" in res["test"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: sasrec\ndataset_dir: {d}\nreason_step: 2\n")
    assert main(["seqrec", "train", "--config", str(bad)]) == 1


def test_training_field_differences_names_changed_fields_and_reads_missing_ones_as_defaults():
    from llmrec.config import to_dict
    from llmrec.seqrec.config import training_field_differences

    asked = to_dict(SeqRecConfig(dataset_dir="x", lr=1e-3, test_depths=[1, 2]))
    finished = {**asked, "lr": 1e-3 * (1 + 1e-14), "output_dir": "elsewhere", "test_depths": [], "dataset_dir": "x/"}
    assert training_field_differences(finished, asked) == {}  # float noise and result-neutral fields
    finished["hidden_size"] = 32
    del finished["sla_exclude_final"]  # a field the run's code did not have yet: its default
    assert training_field_differences(finished, asked) == {"hidden_size": (32, asked["hidden_size"])}
    assert training_field_differences(finished, {**asked, "sla_exclude_final": True}) == {
        "hidden_size": (32, asked["hidden_size"]), "sla_exclude_final": (False, True)}


def test_benchmark_table_says_one_seed_instead_of_a_zero_spread():
    from llmrec.seqrec.bench import benchmark_table

    row = {"ndcg@10": 0.05, "hr@10": 0.1, "epoch_s": 9.0, "infer_ms_per_row": 0.4}
    one = dict(row, seeds=1, **{f"{k}_std": 0.0 for k in row})
    three = dict(row, seeds=3, **{f"{k}_std": 0.01 for k in row})
    table = benchmark_table({"sasrec": three, "lares": one}, "t")
    assert "| sasrec | 3 | 0.0500 ± 0.0100 |" in table
    assert "| lares | 1 | 0.0500 (1 seed) | 0.1000 (1 seed) | - | 9.00 (1 seed) | 0.400 (1 seed) |" in table


def test_benchmark_timings_are_over_the_runs_made_with_this_invocations_settings(tmp_path):
    """A resumed benchmark reuses a finished run whatever threads and eval batch size it ran with (its metrics do not
    depend on them), but its timings do: epoch_s and infer_ms_per_row average only the runs made with this
    invocation's threads, eval batch size and processes, and the table and JSON say over how many."""
    from llmrec.seqrec.bench import run_seqrec_benchmark

    d = write_successor_dataset(tmp_path / "d")
    kw = dict(max_history=10, hidden_size=16, n_layers=1, inner_size=32, epochs=1, batch_size=8, progress=False)
    out = tmp_path / "bench"
    run_seqrec_benchmark(d, ["sasrec"], 1, out, num_threads=1, eval_batch_size=1, **kw)
    summary = run_seqrec_benchmark(d, ["sasrec"], 2, out, num_threads=2, eval_batch_size=8, **kw)["sasrec"]
    saved = json.loads((out / "seqrec_bench.json").read_text())
    first, second = (r["timings"] for r in saved["runs"]["sasrec"])
    assert (first["torch_threads"], first["eval_batch_size"], second["torch_threads"], second["eval_batch_size"]) == (
        1, 1, 2, 8)
    assert summary["seeds"] == 2 and summary["timing_runs"] == 1  # the metrics over both seeds, the timings not
    assert summary["ndcg@10"] == pytest.approx(sum(r["test"]["ndcg@10"] for r in saved["runs"]["sasrec"]) / 2)
    assert (summary["epoch_s"], summary["infer_ms_per_row"]) == (second["epoch_s"], second["infer_ms_per_row"])
    assert saved["summary"]["sasrec"]["timing_runs"] == 1
    assert saved["timing_settings"] == {"sasrec": {"torch_threads": 2, "eval_batch_size": 8, "num_processes": 1,
                                                   "concurrent_runs": 1}}
    md = (out / "seqrec_bench.md").read_text()
    assert f"| {second['epoch_s']:.2f} (1 of 2 runs) | {second['infer_ms_per_row']:.3f} (1 of 2 runs) |" in md
    assert "only over the runs made with this invocation's torch threads, eval batch size and processes" in md
    # the first session's settings again: its run's timings
    again = run_seqrec_benchmark(d, ["sasrec"], 2, out, report_only=True, num_threads=1, eval_batch_size=1, **kw)
    assert again["sasrec"]["timing_runs"] == 1 and again["sasrec"]["infer_ms_per_row"] == first["infer_ms_per_row"]
    # none made with these: no timing, the metrics still reported
    none = run_seqrec_benchmark(d, ["sasrec"], 2, out, report_only=True, num_threads=1, eval_batch_size=8, **kw)
    assert none["sasrec"]["timing_runs"] == 0 and none["sasrec"]["epoch_s"] is None
    assert none["sasrec"]["ndcg@10"] == summary["ndcg@10"]
    assert f"| {summary['hr@10']:.4f} ± {summary['hr@10_std']:.4f} | - | - | - |" in (out / "seqrec_bench.md").read_text()


def test_inference_bench_times_each_model_on_its_own_max_history(tmp_path, monkeypatch):
    """Each model is timed on the split's rows as its own max_history cuts them (loaded once per distinct value)."""
    import llmrec.seqrec.data
    import llmrec.seqrec.models
    from llmrec.seqrec.bench import measure_inference

    d = write_successor_dataset(tmp_path / "d")
    widths: dict[str, set[int]] = {}
    loads: list[int] = []
    build, load = llmrec.seqrec.models.build_model, llmrec.seqrec.data.load_seqrec_data

    def spy_build(cfg, n):
        m = build(cfg, n)
        score = m.score

        def timed_score(x, _score=score, _h=cfg.max_history):
            widths.setdefault(_h, set()).add(x.shape[1])
            return _score(x)

        m.score = timed_score
        return m

    def spy_load(dataset_dir, max_history, *a, **k):
        loads.append(max_history)
        return load(dataset_dir, max_history, *a, **k)

    monkeypatch.setattr(llmrec.seqrec.models, "build_model", spy_build)
    monkeypatch.setattr(llmrec.seqrec.data, "load_seqrec_data", spy_load)
    small = dict(model="sasrec", hidden_size=16, n_layers=1, n_heads=2, inner_size=32)
    res = measure_inference(d, {"h3": {**small, "max_history": 3}, "h6": {**small, "max_history": 6},
                                "h3-again": {**small, "max_history": 3}}, repeats=1)
    assert set(res) == {"h3", "h6", "h3-again"}
    assert widths == {3: {3}, 6: {6}} and loads == [3, 6]


def test_benchmark_table_says_over_how_many_seeds_a_difference_is_paired():
    from llmrec.seqrec.bench import benchmark_table

    row = {"ndcg@10": 0.05, "hr@10": 0.1, "epoch_s": 9.0, "infer_ms_per_row": 0.4}
    three = dict(row, seeds=3, **{f"{k}_std": 0.01 for k in row})
    diff = {"ndcg@10_diff": 0.001, "ndcg@10_diff_lo": -0.002, "ndcg@10_diff_hi": 0.004, "paired_rows": 10}
    one = dict(row, seeds=1, **{f"{k}_std": 0.0 for k in row}, **diff, paired_seeds=1)
    both = dict(three, **diff, paired_seeds=3)
    table = benchmark_table({"sasrec": three, "prl": one, "erl": both}, "t", baseline="sasrec")
    # the NDCG@10 columns are over 3 seeds and 1; the difference only over the one seed both have
    assert "| prl | 1 | 0.0500 (1 seed) | 0.1000 (1 seed) | +0.0010 [-0.0020, +0.0040] (1 paired seed) |" in table
    assert "| erl | 3 | 0.0500 ± 0.0100 | 0.1000 ± 0.0100 | +0.0010 [-0.0020, +0.0040] |" in table


def _rcl_by_hand(clean: torch.Tensor, noisy: torch.Tensor, sequence: torch.Tensor, tau: float, same_ok: bool):
    """The contrastive term written out anchor by anchor: -log softmax of the positive over the kept negatives."""
    total = 0.0
    K = clean.shape[1] - 1
    for k in range(1, K + 1):
        terms = []
        for i in range(clean.shape[0]):
            keep = [j for j in range(clean.shape[0]) if j == i or same_ok or sequence[j] != sequence[i]]
            logits = torch.stack([noisy[i, k] @ clean[j, k] / tau for j in keep])
            terms.append(-torch.log_softmax(logits, 0)[keep.index(i)])
        total = total + torch.stack(terms).mean()
    return total / K


@pytest.mark.parametrize("negatives", ["batch", "other_sequences"])
def test_prl_contrastive_negatives_equal_the_anchor_by_anchor_form(negatives):
    """``cl_negatives="other_sequences"`` leaves out of each prefix's softmax the other prefixes of its own training
    sequence (in sequence mode they share most of its history); ``"batch"`` keeps every other prefix."""
    torch.manual_seed(0)
    model = ReaRec(Backbone(30, 6, hidden=16, inner=32), mode="prl", reason_steps=2, cl_negatives=negatives)
    model.backbone.temperature = 0.7
    g = torch.Generator().manual_seed(3)
    clean, noisy = torch.randn(7, 3, 16, generator=g), torch.randn(7, 3, 16, generator=g)
    sequence = torch.tensor([0, 0, 0, 1, 1, 2, 3])
    got = model._rcl(clean, noisy, sequence)
    want = _rcl_by_hand(clean, noisy, sequence, 0.7, same_ok=negatives == "batch")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # One prefix per sequence (rows mode): nothing to leave out, both settings give the same term.
    one_each = torch.arange(7)
    torch.testing.assert_close(model._rcl(clean, noisy, one_each), _rcl_by_hand(clean, noisy, one_each, 0.7, True))
    with pytest.raises(ValueError, match="cl_negatives must be"):
        ReaRec(Backbone(30, 6, hidden=16, inner=32), mode="prl", cl_negatives="others")


def test_prl_loss_masks_same_sequence_negatives_through_the_training_loss():
    """Through ``loss``: the masked setting changes only the contrastive term, and by as much as the by-hand form."""
    from llmrec.seqrec.models import LossContext

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 31, (3, 6), generator=g)
    batch = {"input_ids": ids, "target_ids": torch.randint(1, 31, (3, 6), generator=g)}
    logs, seen = {}, {}
    for negatives in ("batch", "other_sequences"):
        torch.manual_seed(0)
        model = ReaRec(Backbone(30, 6, hidden=16, inner=32, dropout=0.0, attn_dropout=0.0), mode="prl",
                       warmup_epochs=0, cl_negatives=negatives)
        real = model._rcl
        model._rcl = lambda Rm, R2m, sequence, real=real, n=negatives: seen.setdefault(n, (Rm, R2m, sequence)) and \
            real(Rm, R2m, sequence)
        torch.manual_seed(1)  # the noisy view's draws
        _, logs[negatives] = model.loss(batch, LossContext(epoch=1))
    assert logs["batch"]["ce"] == logs["other_sequences"]["ce"] and logs["batch"]["pta"] == logs["other_sequences"]["pta"]
    # Each anchor competes with 12 others of other rows instead of 17: the term falls.
    assert logs["other_sequences"]["rcl"] < logs["batch"]["rcl"]
    # ... and by as much as the by-hand form on the states the loss built, with each prefix's own batch row as its
    # sequence (the loss passing other ids, e.g. the positions, masked other negatives and still fell: a review)
    rows = (batch["target_ids"] > 0).nonzero(as_tuple=True)[0]
    for negatives in ("batch", "other_sequences"):
        clean, noisy, sequence = seen[negatives]
        assert torch.equal(sequence, rows)
        want = _rcl_by_hand(clean.detach(), noisy.detach(), rows, 1.0, same_ok=negatives == "batch")
        assert logs[negatives]["rcl"] == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="cl_negatives"):
        SeqRecConfig(dataset_dir="x", model="rearec-prl", cl_negatives="other")
    assert SeqRecConfig(dataset_dir="x", model="sasrec", cl_negatives="other_sequences").unused_fields() == {
        "cl_negatives": "other_sequences"}


def test_a_finished_run_continued_with_more_patience_equals_that_patience_from_scratch(tmp_path, monkeypatch):
    """The trainer resumes weights, optimiser, RNG state and the early-stopping counter: a run stopped at patience 1,
    continued (its done.json removed, patience and epochs raised in run_config.json), ends as the run with the larger
    patience and epochs trained from scratch -- how the Beauty runs were taken from patience 4 to 10 (experiment log).
    PRL with dropout and the noisy view on, so every RNG stream must continue where it stopped."""
    import shutil

    from safetensors.torch import load_file

    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d", num_items=30, users=40, length=12)
    kw = dict(model="rearec-prl", eval_every=1, lr=3e-3, dropout=0.3, attn_dropout=0.2, batch_size=16)
    short = run_seqrec(tiny_cfg(tmp_path / "p1", d, patience=1, epochs=12, **kw))
    assert short["timings"]["epochs"] < 12  # it stopped early
    full = run_seqrec(tiny_cfg(tmp_path / "p3", d, patience=3, epochs=16, **kw))
    src, dst = tmp_path / "p1" / "run", tmp_path / "cont" / "run"
    shutil.copytree(src, dst)
    for name in ("train/done.json", "results.json", "results.md"):
        (dst / name).unlink(missing_ok=True)
    shutil.rmtree(dst / "test_eval", ignore_errors=True)
    recorded = json.loads((dst / "run_config.json").read_text())
    recorded["config"].update(patience=3, epochs=16, output_dir=str(dst))
    (dst / "run_config.json").write_text(json.dumps(recorded))
    with monkeypatch.context() as m:
        seen = trained_batches(m)
        cont = run_seqrec(tiny_cfg(tmp_path / "cont", d, patience=3, epochs=16, **kw))
    # continued after the short run's last epoch, not retrained from epoch 0
    assert min(epoch for _, epoch in seen) == short["phases"][0]["epochs_run"]
    assert cont["phases"][0]["epochs_run"] == full["phases"][0]["epochs_run"] > short["phases"][0]["epochs_run"]
    assert cont["test"] == full["test"] and cont["best_epoch"] == full["best_epoch"]
    a, b = load_file(str(tmp_path / "p3/run/train/best.safetensors")), load_file(str(dst / "train/best.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The supported form: the same config with the larger stopping rules, in the finished run's own directory.
    ext = tmp_path / "ext" / "run"
    shutil.copytree(src, ext)
    extended = run_seqrec(tiny_cfg(tmp_path / "ext", d, patience=3, epochs=16, **kw))
    assert extended["test"] == full["test"] and _trajectory(extended) == _trajectory(full)
    b = load_file(str(ext / "train/best.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((ext / "run_config.json").read_text())["config"]["patience"] == 3


def _trajectory(res: dict) -> list[dict]:
    """Each phase's epochs, losses and validations, without their seconds."""
    return [{**{k: v for k, v in p.items() if k != "epoch_seconds"},
             "history": [{k: v for k, v in e.items() if k != "seconds"} for e in p["history"]]} for p in res["phases"]]


def _same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_lares_extended_trains_spt_on_and_redoes_rpt_as_the_larger_run_from_scratch(tmp_path, monkeypatch):
    """Raising SPT's patience reopens SPT; RPT, which started from SPT's old best weights, is trained again from the
    new ones (its old checkpoints are not resumed), also when the extension is cut between the phases: the result is
    the larger run from scratch. Raising only rpt_patience reopens RPT alone."""
    import shutil

    from llmrec.seqrec.run import run_seqrec
    from llmrec.seqrec.trainer import SeqRecTrainer

    d = write_successor_dataset(tmp_path / "d", num_items=20, users=16, length=10)
    kw = dict(model="lares", eval_every=1, lr=1e-2, dropout=0.2, attn_dropout=0.1, batch_size=16, mean_recurrence=2,
              rpt_epochs=3, rpt_batch_size=16, rpt_lr=1e-3, epochs=10)
    short = run_seqrec(tiny_cfg(tmp_path / "p1", d, patience=1, rpt_patience=1, **kw))
    assert short["phases"][0]["epochs_run"] < 10 and short["phases"][1]["epochs_run"] < 3
    shutil.copytree(tmp_path / "p1", tmp_path / "ext")
    full = run_seqrec(tiny_cfg(tmp_path / "p3", d, patience=3, rpt_patience=1, **kw))
    assert full["phases"][0]["epochs_run"] > short["phases"][0]["epochs_run"]
    with monkeypatch.context() as m:  # cut after SPT trained on, before RPT starts
        m.setattr(SeqRecTrainer, "lares_filter", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            run_seqrec(tiny_cfg(tmp_path / "ext", d, patience=3, rpt_patience=1, **kw))
    extended = run_seqrec(tiny_cfg(tmp_path / "ext", d, patience=3, rpt_patience=1, **kw))
    assert _trajectory(extended) == _trajectory(full) and extended["test"] == full["test"]
    assert extended["selected_phase"] == full["selected_phase"]
    for phase in ("train", "rpt"):
        assert _same_weights(tmp_path / f"p3/run/{phase}/best.safetensors", tmp_path / f"ext/run/{phase}/best.safetensors")
    # RPT alone: SPT stays finished, RPT trains on from its last epoch.
    rpt_full = run_seqrec(tiny_cfg(tmp_path / "r3", d, patience=3, rpt_patience=3, **kw))
    seen = trained_batches(monkeypatch)
    rpt_ext = run_seqrec(tiny_cfg(tmp_path / "ext", d, patience=3, rpt_patience=3, **kw))
    assert _trajectory(rpt_ext) == _trajectory(rpt_full) and rpt_ext["test"] == rpt_full["test"]
    assert {phase for phase, _ in seen} <= {"rpt"}
    assert min((epoch for _, epoch in seen), default=None) in (None, extended["phases"][1]["epochs_run"])


def test_split_extension_separates_raised_stopping_rules_and_frees_rpts_settings_when_rpt_is_added():
    from llmrec.seqrec.config import split_extension

    diff = {"epochs": (40, 60), "patience": (10, 4), "lr": (1e-3, 2e-3)}
    assert split_extension(diff) == ({"epochs": (40, 60)}, {"patience": (10, 4), "lr": (1e-3, 2e-3)})
    # RPT added to a run made without it: RPT's settings were never read, so any may be chosen ...
    added = {"rpt_epochs": (0, 2), "rpt_patience": (3, 1), "rpt_lr": (5e-4, 1e-3), "filter_topk": (100, 50)}
    assert split_extension(added) == ({"rpt_epochs": (0, 2)}, {})
    # ... but not once RPT has run.
    assert split_extension({"rpt_epochs": (1, 2), "rpt_patience": (3, 1)}) == (
        {"rpt_epochs": (1, 2)}, {"rpt_patience": (3, 1)})


def test_a_run_resumed_with_smaller_stopping_rules_is_refused_and_left_as_it_was(tmp_path):
    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    cfg = tiny_cfg(tmp_path, d, epochs=4, eval_every=1, patience=3)
    first = run_seqrec(cfg)
    out = Path(cfg.output_dir)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for field, value in (("epochs", 3), ("patience", 2)):
        with pytest.raises(ValueError, match=rf"{field}=\d+ \(asked: {value}\) \({field} can be raised on a run, "
                                              "not lowered"):
            run_seqrec(tiny_cfg(tmp_path, d, **{**dict(epochs=4, eval_every=1, patience=3), field: value}))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # A larger value whose phase lost its last checkpoint cannot train on: refused before anything changes.
    slot = json.loads((out / "train" / "state.json").read_text())["slot"]
    weights = out / "train" / f"last-{slot}.safetensors"
    kept = weights.read_bytes()
    weights.unlink()
    with pytest.raises(ValueError, match=rf"cannot train on: its last checkpoint \(last-{slot}.safetensors"):
        run_seqrec(tiny_cfg(tmp_path, d, epochs=6, eval_every=1, patience=5))
    weights.write_bytes(kept)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # A larger value with another change is refused as before, for the other change.
    with pytest.raises(ValueError, match=r"holds a run made with lr=.*asked: 0\.5\)"):
        run_seqrec(tiny_cfg(tmp_path, d, epochs=6, eval_every=1, patience=3, lr=0.5))
    assert run_seqrec(cfg)["test"] == first["test"]


def test_raising_the_epochs_of_a_run_that_validated_its_last_epoch_off_schedule_is_refused(tmp_path):
    """With eval_every 2, a 5-epoch run validated epoch 5 only because it was its last; a 7-epoch run does not, so
    its early-stopping state is not the one the longer run has: refused before anything is changed."""
    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    run_seqrec(tiny_cfg(tmp_path, d, epochs=5, eval_every=2, patience=50))
    with pytest.raises(ValueError, match="epochs cannot be raised from 5 to 7: the train phase ran all 5 epochs"):
        run_seqrec(tiny_cfg(tmp_path, d, epochs=7, eval_every=2, patience=50))
    assert (Path(tmp_path) / "run" / "results.json").exists()
    # ... also when that validation ended the run by early stopping (patience 1, epoch 3 worse than epoch 2): the
    # longer run never makes it and trains on, so "the new rules stop it where it stopped" does not hold (this was
    # taken as a finished extension: the 3-epoch trajectory recorded under epochs 8).
    stopped = Path(tmp_path) / "stopped"
    kw = dict(eval_every=2, patience=1, lr=0.2, dropout=0.5, attn_dropout=0.5, batch_size=16, hidden_size=16, seed=46)
    d2 = write_successor_dataset(tmp_path / "d2", num_items=30, users=40, length=12)
    short = run_seqrec(tiny_cfg(stopped, d2, epochs=3, **kw))
    valid = [e.get("valid", {}).get("ndcg@10") for e in short["phases"][0]["history"]]
    with pytest.raises(ValueError, match="epochs cannot be raised from 3 to 8: the train phase ran all 3 epochs"):
        run_seqrec(tiny_cfg(stopped, d2, epochs=8, **kw))
    assert valid[0] is None and valid[2] < valid[1], valid  # the case above: epoch 3 counted as bad
    # On its schedule (4 epochs, validated at 2 and 4) the run extends, as the 6-epoch run from scratch.
    first = run_seqrec(tiny_cfg(tmp_path / "a", d, epochs=4, eval_every=2, patience=50))
    # ... also when cut after the last epoch's checkpoint, before the phase's done.json.
    from llmrec.seqrec import trainer

    write = trainer.atomic_write_json

    def cut_at_done(path, obj):
        if Path(path).name == "done.json":
            raise KeyboardInterrupt
        write(path, obj)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(trainer, "atomic_write_json", cut_at_done)
        with pytest.raises(KeyboardInterrupt):
            run_seqrec(tiny_cfg(tmp_path / "a", d, epochs=6, eval_every=2, patience=50))
    ext = run_seqrec(tiny_cfg(tmp_path / "a", d, epochs=6, eval_every=2, patience=50))
    # its training time: the finished run's, then the extension's
    assert ext["timings"]["train_total_s"] > first["timings"]["train_total_s"]
    full = run_seqrec(tiny_cfg(tmp_path / "b", d, epochs=6, eval_every=2, patience=50))
    assert _trajectory(ext) == _trajectory(full) and ext["test"] == full["test"]
    # A finished phase without its last state cannot be trained on: refused, not reported under the new rules.
    (tmp_path / "a" / "run" / "train" / "state.json").unlink()
    with pytest.raises(ValueError, match="the train phase is finished but has no state.json"):
        run_seqrec(tiny_cfg(tmp_path / "a", d, epochs=8, eval_every=2, patience=50))


def test_lares_rpt_logs_reward_and_kl_over_the_real_rows_only():
    """A 2-process run pads the last batch with filler rows (target 0): the logged reward and kl must be the real
    rows' means, as 1 process logs them. They averaged the fillers in (a review: kl 0.00134 vs 0.00101)."""
    from llmrec.seqrec.models import LARES, Backbone, LossContext

    torch.manual_seed(0)
    model = LARES(Backbone(20, 6, hidden=8, n_layers=1, heads=2, inner=16, dropout=0.0, attn_dropout=0.0),
                  heads=2, inner=16, dropout=0.0, attn_dropout=0.0, mean_recurrence=3, tla_weight=0.5,
                  sla_weight=0.5)
    model.rpt = {"group": 3, "beta": 1.0, "reward_k": 5}
    model.make_reference()
    with torch.no_grad():  # the policy moves away from its reference, so the kl is not 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    ids = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 7, 8, 9, 10]])
    tgt = torch.tensor([[0, 2, 3, 4, 5, 6], [0, 0, 8, 9, 10, 11]])
    real = {"input_ids": ids, "target_ids": tgt, "row_index": torch.tensor([1, 4])}
    padded = {"input_ids": torch.cat([ids, ids[:1].flip(1)]), "target_ids": torch.cat([tgt, torch.zeros_like(tgt[:1])]),
              "row_index": torch.tensor([1, 4, 7])}
    ctx = {"denom": 2.0, "epoch": 1, "seed": 5, "step": 3, "extra": {"phase": "rpt"}}
    loss_real, logs_real = model.loss(real, LossContext(**ctx))
    loss_padded, logs_padded = model.loss(padded, LossContext(**ctx))
    assert logs_real["kl"] > 0
    assert logs_padded["kl"] == pytest.approx(logs_real["kl"], rel=1e-5)
    assert logs_padded["reward"] == pytest.approx(logs_real["reward"], rel=1e-5)
    assert loss_padded.item() == pytest.approx(loss_real.item(), rel=1e-5)  # the loss already masked them


def test_a_directory_holding_another_kind_of_run_is_refused(tmp_path):
    """An `llmrec evaluate` output (results.json + rankings.jsonl, no run_config.json) had its results.json replaced
    by the training's, with the evaluation's rankings left beside it (a review); an LLM checkpoint likewise."""
    from llmrec.seqrec.run import run_seqrec

    d = write_successor_dataset(tmp_path / "d")
    for name, files in (("eval", ("rankings.jsonl", "results.json")), ("ckpt", ("llmrec_config.json",))):
        cfg = tiny_cfg(tmp_path / name, d, epochs=1)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True)
        for f in files:
            (out / f).write_text('{"method": "popularity"}\n')
        for resume in (True, False):
            with pytest.raises(ValueError, match=rf"holds {files[0]}: an .*, not a `llmrec seqrec train` run; use"):
                run_seqrec(dataclasses.replace(cfg, resume=resume))
        assert (out / files[-1]).read_text() == '{"method": "popularity"}\n'
    cfg = tiny_cfg(tmp_path / "own", d, epochs=1)
    assert run_seqrec(cfg)["test"] == run_seqrec(cfg)["test"]  # its own finished run is still reused


def test_each_process_restores_its_own_generator_state():
    """state.json holds every process's generator state; a process restores its own (rank 0's alone, restored on
    every GPU, reset the other devices' CUDA generators to the seed's start), rank 0's under another process
    count, and a state written before 2026-12-07 as it was read then."""
    import torch

    from llmrec.seqrec.trainer import _restore_rng

    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append({"torch_rng": torch.get_rng_state().tolist(), "cuda_rng": None})
    for index, want in ((0, 0), (1, 1), (2, 0)):
        torch.manual_seed(99)
        _restore_rng({"rng_by_process": states}, index)
        assert torch.get_rng_state().tolist() == states[want]["torch_rng"], index
    torch.manual_seed(99)
    _restore_rng({"torch_rng": states[1]["torch_rng"], "cuda_rng": None}, 0)
    assert torch.get_rng_state().tolist() == states[1]["torch_rng"]
