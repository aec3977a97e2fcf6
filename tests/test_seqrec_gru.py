"""The GRU backbone (GRU4Rec's encoder) and ReaRec reasoning on it: exactness against the plain forms."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llmrec.seqrec.config import SeqRecConfig
from llmrec.seqrec.models import LARES, GRU4Rec, ReaRec, backbone_of, build_model
from llmrec.seqrec.modules import Backbone, GRUBackbone


def _gru(n_items: int = 30, L: int = 7, layers: int = 2, dropout: float = 0.0) -> GRUBackbone:
    torch.manual_seed(0)
    return GRUBackbone(n_items, L, hidden=16, n_layers=layers, dropout=dropout)


@pytest.mark.parametrize("layers", [1, 2])
def test_left_padding_leaves_the_gru_where_the_unpadded_history_leaves_it(layers):
    """A GRU has no mask: a left-padded history must give exactly the unpadded history's outputs, whatever the
    padding row of the item table holds (the models' weight init overwrites it)."""
    model = GRU4Rec(_gru(layers=layers)).eval()
    with torch.no_grad():
        model.backbone.item_emb.weight[0] = torch.randn(16)  # a nonzero padding row must not leak in
        padded = torch.tensor([[0, 0, 0, 5, 3, 8, 2], [0, 0, 0, 0, 0, 0, 9]])
        h, cache, valid = model.backbone.encode(padded)
        for b, real in enumerate(([5, 3, 8, 2], [9])):
            alone, alone_cache, _ = model.backbone.encode(torch.tensor([real]))
            n = len(real)
            torch.testing.assert_close(h[b, -n:], alone[0], atol=1e-6, rtol=1e-5)
            for states, own in zip(cache, alone_cache, strict=True):
                torch.testing.assert_close(states[b, -n:], own[0], atol=1e-6, rtol=1e-5)
                assert states[b, :-n].abs().max() == 0  # the state stays exactly zero over the padding
        torch.testing.assert_close(model.user_vectors(padded)[0], model.user_vectors(torch.tensor([[5, 3, 8, 2]]))[0],
                                   atol=1e-6, rtol=1e-5)


def test_gru4rec_per_position_loss_equals_per_prefix_forwards_in_value_and_gradient():
    """Training every prefix of a window in one pass (per-position loss) is the sum of each prefix encoded alone."""
    from llmrec.seqrec.models import LossContext

    model = GRU4Rec(_gru(layers=2))
    ids = torch.tensor([[0, 0, 4, 7, 1, 3, 9], [2, 6, 5, 5, 8, 1, 4]])
    tgt = torch.tensor([[0, 0, 7, 1, 3, 9, 11], [6, 5, 5, 8, 1, 0, 12]])  # 0: no target at that position
    loss, _ = model.loss({"input_ids": ids, "target_ids": tgt}, LossContext(denom=1.0))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = 0.0
    for b, p in (tgt > 0).nonzero().tolist():
        prefix = ids[b : b + 1, : p + 1]
        h, _, _ = model.backbone.encode(prefix)
        ref = ref + F.cross_entropy(model.backbone.item_logits(h[:, -1]), tgt[b, p : p + 1] - 1, reduction="sum")
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mode", ["erl", "prl"])
def test_rearec_on_the_gru_reasons_as_recomputing_each_prefixs_extended_sequence(mode):
    """ReaRec's K steps continue each prefix's recurrent state (the cache): equal to running the GRU over the
    prefix's items and its reasoning tokens from scratch, for every prefix at once and for the last position."""
    torch.manual_seed(0)
    model = ReaRec(_gru(layers=2), mode=mode, reason_steps=3).eval()
    ids = torch.tensor([[0, 0, 3, 4, 5, 6, 7], [1, 2, 3, 9, 8, 7, 6], [0, 0, 0, 0, 0, 0, 11]])
    with torch.no_grad():
        h, cache, valid = model.backbone.encode(ids)
        last = model.reason(h, cache, valid, torch.full((3,), 6))
        torch.testing.assert_close(last, model.reason_recompute(ids), atol=1e-6, rtol=1e-5)
        rows, pos = (ids > 0).nonzero(as_tuple=True)
        order = torch.randperm(len(rows))  # prefixes may come in any order
        pairs = model.reason(h, cache, valid, pos[order], rows[order])
        for n, (b, p) in enumerate(zip(rows[order].tolist(), pos[order].tolist(), strict=True)):
            single = model.reason_recompute(ids[b : b + 1, : p + 1])[0]
            torch.testing.assert_close(pairs[n], single, atol=1e-6, rtol=1e-5)
    assert model.user_vectors(ids).shape == (3, 16)


def test_rearec_training_loss_on_the_gru_equals_per_prefix_reasoning():
    """ERL's CE of the mean state (KL off) over every target prefix of a batch, in one pass, equals the sum over
    the prefixes reasoned one by one (no cache, no batching)."""
    from llmrec.seqrec.models import LossContext

    torch.manual_seed(0)
    model = ReaRec(_gru(layers=1), mode="erl", reason_steps=2, kl_weight=0.0).eval()
    ids = torch.tensor([[0, 0, 4, 7, 1, 3, 9], [2, 6, 5, 5, 8, 1, 4]])
    tgt = torch.tensor([[0, 0, 7, 1, 3, 9, 11], [6, 5, 5, 8, 1, 0, 12]])
    with torch.no_grad():
        loss, _ = model.loss({"input_ids": ids, "target_ids": tgt}, LossContext(denom=1.0))
        ref = sum(F.cross_entropy(model.backbone.item_logits(model.reason_recompute(ids[b : b + 1, : p + 1]).mean(1)),
                                  tgt[b, p : p + 1] - 1, reduction="sum")
                  for b, p in (tgt > 0).nonzero().tolist())
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_the_every_position_reference_form_is_the_transformers_only():
    model = ReaRec(_gru(), reason_steps=2)
    model.reasoning_layout = "dense"
    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6]])
    with pytest.raises(ValueError, match="needs the Transformer backbone"):
        from llmrec.seqrec.models import LossContext

        model.loss({"input_ids": ids, "target_ids": ids.roll(-1, 1)}, LossContext())


def test_backbone_choice_per_model():
    def cfg(**kw) -> SeqRecConfig:
        return SeqRecConfig(dataset_dir="x", hidden_size=8, inner_size=8, **kw)

    assert backbone_of(cfg(model="gru4rec")) == "gru" and backbone_of(cfg(model="sasrec")) == "transformer"
    assert backbone_of(cfg(model="rearec-erl")) == "transformer"
    assert backbone_of(cfg(model="rearec-erl", backbone="gru")) == "gru"
    assert backbone_of(cfg(model="gru4rec", backbone="gru")) == "gru"
    # a config recorded before the field existed: the model's own backbone
    assert backbone_of(SimpleNamespace(model="gru4rec")) == "gru"
    assert backbone_of(SimpleNamespace(model="rearec-prl")) == "transformer"
    assert isinstance(build_model(cfg(model="gru4rec"), 10).backbone, GRUBackbone)
    assert isinstance(build_model(cfg(model="rearec-prl", backbone="gru"), 10).backbone, GRUBackbone)
    assert isinstance(build_model(cfg(model="rearec-prl"), 10).backbone, Backbone)
    for model, backbone, match in (("sasrec", "gru", "gru4rec is the plain model on the GRU"),
                                   ("gru4rec", "transformer", "sasrec is the plain model on the Transformer"),
                                   ("lares", "gru", "Transformer layers")):
        with pytest.raises(ValueError, match=f"backbone '{backbone}' with model {model}") as err:
            cfg(model=model, backbone=backbone)
        assert match in str(err.value)
    with pytest.raises(ValueError, match="backbone must be one of"):
        cfg(model="rearec-erl", backbone="lstm")
    with pytest.raises(ValueError, match="Transformer backbone"):
        LARES(_gru())
    with pytest.raises(TypeError, match="GRUBackbone"):
        GRU4Rec(Backbone(10, 5, hidden=8, heads=2, inner=8))
    # A GRU reads no attention setting: set away from their defaults they are named as unused (the CLI refuses
    # them); its hidden size need not be a multiple of the (unused) number of heads.
    def unused(**kw) -> dict:
        return SeqRecConfig(dataset_dir="x", **kw).unused_fields()

    assert unused(model="gru4rec", n_heads=4, attn_dropout=0.1) == {"attn_dropout": 0.1, "n_heads": 4}
    assert unused(model="rearec-erl", backbone="gru", inner_size=32) == {"inner_size": 32}
    assert unused(model="rearec-erl", inner_size=32) == {}
    SeqRecConfig(dataset_dir="x", model="gru4rec", hidden_size=10, n_heads=4)
    # the GRU's dropout is its input dropout: input_dropout, when set, replaces dropout
    assert build_model(cfg(model="gru4rec", dropout=0.3), 10).backbone.in_drop.p == 0.3
    assert build_model(cfg(model="gru4rec", dropout=0.3, input_dropout=0.1), 10).backbone.in_drop.p == 0.1
    # ... so a dropout beside an input_dropout is never read on the GRU (on the Transformer it is, in its layers)
    assert unused(model="gru4rec", dropout=0.3, input_dropout=0.1) == {"dropout": 0.3}
    assert unused(model="rearec-erl", backbone="gru", dropout=0.3, input_dropout=0.1) == {"dropout": 0.3}
    assert unused(model="gru4rec", dropout=0.3) == {} and unused(model="sasrec", dropout=0.3, input_dropout=0.1) == {}


def test_a_run_resumes_whether_its_backbone_was_named_or_left_auto():
    """"auto" is the model's own backbone: naming it is the same run (a resume or a benchmark's reuse was refused
    over the spelling); another backbone is still a difference."""
    from llmrec.config import to_dict
    from llmrec.seqrec.config import training_field_differences

    def diff(model: str, found: str, wanted: str) -> dict:
        return training_field_differences(to_dict(SeqRecConfig(dataset_dir="x", model=model, backbone=found)),
                                          to_dict(SeqRecConfig(dataset_dir="x", model=model, backbone=wanted)))

    assert diff("gru4rec", "auto", "gru") == {} and diff("sasrec", "transformer", "auto") == {}
    assert diff("rearec-erl", "auto", "gru") == {"backbone": ("auto", "gru")}
    found = to_dict(SeqRecConfig(dataset_dir="x", model="gru4rec"))
    del found["backbone"]  # recorded before the field existed
    assert training_field_differences(found, to_dict(SeqRecConfig(dataset_dir="x", model="gru4rec",
                                                                   backbone="gru"))) == {}
