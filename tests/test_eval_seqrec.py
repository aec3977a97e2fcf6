"""``llmrec evaluate --method seqrec``: an ID model evaluated through the LLM path's evaluator.

The pipeline report puts ID models and LLMs in one table on the same test rows, so the evaluator's
full-ranking path must give exactly what the seqrec trainer's own test evaluation gives, and write
rankings that ``llmrec compare`` can pair with the LLM runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import train_tiny_sasrec, write_prepared


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prep", n_items=40, n_users=30, seed=3)


@pytest.fixture(scope="module")
def sasrec_run(data_dir, tmp_path_factory) -> Path:
    return train_tiny_sasrec(data_dir, tmp_path_factory.mktemp("runs") / "sasrec", max_history=6, ks=[1, 5, 10, 20])


def _config(data: Path, run: Path, out: Path, **kw):
    from llmrec.evaluation.evaluator import EvalConfig

    base = dict(dataset=str(data), split="test", method="seqrec", checkpoint=str(run), ks=[1, 5, 10, 20],
                output_dir=str(out))
    base.update(kw)
    return EvalConfig(**base)


def test_seqrec_method_equals_the_seqrec_test_metrics(data_dir, sasrec_run, tmp_path):
    from llmrec.evaluation.evaluator import evaluate

    res = evaluate(_config(data_dir, sasrec_run, tmp_path / "eval"))
    trained = json.loads((sasrec_run / "results.json").read_text())
    for k in ("hr@1", "hr@10", "ndcg@10", "ndcg@20", "mrr@10"):
        assert res["metrics"]["item"][k] == pytest.approx(trained["test"][k], abs=1e-9), k
    assert res["protocol"]["history_length"] == 6  # the ID model's own, not the prompt's 10
    assert res["protocol"]["id_model"] == "sasrec"
    # The run given to the LLM path (method beam, the default) is named as an ID model, before anything is written
    with pytest.raises(ValueError, match="is a `llmrec seqrec train` run .* --method seqrec"):
        evaluate(_config(data_dir, sasrec_run, tmp_path / "as_llm", method="beam", model_name_or_path="tiny-qwen2"))
    assert not (tmp_path / "as_llm").exists()


def test_lares_with_a_random_initial_state_gives_its_trainers_test_metrics(data_dir, tmp_path):
    """``state_init: normal`` draws LARES's initial state at evaluation too. The trainer draws it per row from the
    seed and the row's index; the evaluator now does the same (it drew from the global generator, so its metrics
    differed from the run's and from one evaluation to the next)."""
    import torch

    from llmrec.evaluation.evaluator import evaluate

    run = train_tiny_sasrec(data_dir, tmp_path / "lares", model="lares", state_init="normal", rpt_epochs=0,
                            max_history=6, ks=[1, 5, 10, 20], epochs=2)
    trained = json.loads((run / "results.json").read_text())
    torch.manual_seed(123)
    res = evaluate(_config(data_dir, run, tmp_path / "eval"))
    for k in ("hr@1", "hr@10", "ndcg@10", "ndcg@20", "mrr@10"):
        assert res["metrics"]["item"][k] == pytest.approx(trained["test"][k], abs=1e-9), k
    torch.manual_seed(7)
    again = evaluate(_config(data_dir, run, tmp_path / "eval2"))
    assert again["metrics"] == res["metrics"]


def test_mask_history_masks_the_same_items_in_training_and_evaluation(data_dir, tmp_path):
    """With mask_history the run's own test metrics (trainer) equal the evaluator's: both mask the history items
    the model reads (the last max_history), on rows where masking the whole history would differ."""
    from llmrec.data.canonical import load_prepared
    from llmrec.evaluation.evaluator import evaluate

    run = train_tiny_sasrec(data_dir, tmp_path / "masked", max_history=2, ks=[1, 5, 10, 20], mask_history=True)
    test = load_prepared(data_dir, splits=["test"]).splits["test"]
    # rows whose target is among the history items the model does not read: other maskings would differ there
    assert any(r["target_item_id"] in r["history_item_ids"][:-2] for r in test)
    res = evaluate(_config(data_dir, run, tmp_path / "eval"))
    trained = json.loads((run / "results.json").read_text())
    for k in ("hr@1", "hr@10", "ndcg@10", "ndcg@20"):
        assert res["metrics"]["item"][k] == pytest.approx(trained["test"][k], abs=1e-9), k


def test_seqrec_rankings_are_the_recommenders_top_k_and_full_ranks(data_dir, sasrec_run, tmp_path):
    from llmrec.data.canonical import load_prepared, read_jsonl
    from llmrec.evaluation.evaluator import evaluate
    from llmrec.recommend import Recommender

    out = tmp_path / "eval"
    evaluate(_config(data_dir, sasrec_run, out, max_rows=15, row_seed=1))
    recs = list(read_jsonl(out / "rankings.jsonl"))
    assert len(recs) == 15
    rec = Recommender.from_pretrained(sasrec_run, dataset=data_dir)
    split = load_prepared(data_dir, splits=["test"], max_history=6).splits["test"]
    lists = rec.recommend([list(split[r["row"]]["history_item_ids"]) for r in recs], k=40)  # the whole catalogue
    for r, whole in zip(recs, lists):
        expected = whole[:20]
        assert r["item_ranking"] == [e.item_id for e in expected]
        if r["item_rank"] < 20:
            assert r["item_ranking"][r["item_rank"]] == r["target_item_id"]
        else:  # a full-catalogue rank beyond the list
            assert r["target_item_id"] not in r["item_ranking"]
        # the first 20 distinct titles of the whole ranking (these titles are not all unique)
        assert r["title_ranking"] == list(dict.fromkeys(e.title for e in whole))[:20]


def test_seqrec_runs_pair_with_llm_runs_in_compare(data_dir, sasrec_run, tmp_path):
    from llmrec.evaluation.compare import compare_runs
    from llmrec.evaluation.evaluator import EvalConfig, evaluate

    evaluate(_config(data_dir, sasrec_run, tmp_path / "id"))
    evaluate(EvalConfig(dataset=str(data_dir), split="test", method="popularity", ks=[1, 5, 10, 20],
                        output_dir=str(tmp_path / "pop")))
    res = compare_runs([tmp_path / "pop", tmp_path / "id"], ["hr@10", "ndcg@20"])
    assert res["rows"] == len(load_rows(data_dir))


def load_rows(data_dir: Path) -> list:
    from llmrec.data.canonical import read_jsonl

    return list(read_jsonl(data_dir / "test.jsonl"))


def test_seqrec_method_errors(data_dir, sasrec_run, tmp_path):
    from llmrec.evaluation.evaluator import evaluate
    from llmrec.models.checkpoint import CheckpointError

    with pytest.raises(ValueError, match="method=seqrec needs checkpoint"):
        _config(data_dir, sasrec_run, tmp_path / "a", checkpoint=None)
    with pytest.raises(CheckpointError, match="not found"):
        evaluate(_config(data_dir, tmp_path / "missing", tmp_path / "b"))
    other = write_prepared(tmp_path / "other", n_items=25, n_users=10, seed=4)
    with pytest.raises(ValueError, match="trained on 40 items"):
        evaluate(_config(other, sasrec_run, tmp_path / "c"))
    assert not (tmp_path / "c" / "results.json").exists()
    # The run's own directory as output_dir: named as the training run it is, not as ~20 "changed" protocol fields.
    before = (sasrec_run / "results.json").read_text()
    with pytest.raises(ValueError, match=r"holds an `llmrec seqrec train` run, not an evaluation; choose another"):
        evaluate(_config(data_dir, sasrec_run, sasrec_run))
    assert (sasrec_run / "results.json").read_text() == before


def test_an_evaluation_is_not_reused_after_its_model_is_retrained(data_dir, tmp_path):
    """The protocol holds the weights' digest: retraining the model in the same run directory (other settings,
    resume off) makes the finished evaluation a different protocol, refused instead of silently reused."""
    from llmrec.evaluation.evaluator import evaluate, weights_sha256

    run = train_tiny_sasrec(data_dir, tmp_path / "run", max_history=6, ks=[1, 5, 10, 20])
    first = evaluate(_config(data_dir, run, tmp_path / "eval"))
    assert first["protocol"]["id_weights_sha256"] == weights_sha256(run / first["protocol"]["id_weights"])
    assert evaluate(_config(data_dir, run, tmp_path / "eval"))["metrics"] == first["metrics"]  # same weights
    train_tiny_sasrec(data_dir, run, max_history=6, ks=[1, 5, 10, 20], lr=0.05, resume=False)
    with pytest.raises(ValueError, match="different protocol"):
        evaluate(_config(data_dir, run, tmp_path / "eval"))


def test_title_metrics_read_past_items_that_share_a_title(tmp_path):
    """Items sharing a title: the title list is the first max(ks) distinct titles of the whole ranking, so a target
    title ranked within K among titles is a hit even when the top max(ks) items hold fewer than K titles."""
    from llmrec.data.catalog import ItemCatalog
    from llmrec.evaluation.evaluator import EvalConfig, evaluate
    from llmrec.recommend import Recommender

    data = write_prepared(tmp_path / "prep", n_items=40, n_users=30, seed=3)
    # 14 titles, three items each (the last one two): the top 20 items hold about 7 of them
    ItemCatalog([str(i) for i in range(1, 41)], [f"Game {(i - 1) // 3}" for i in range(1, 41)]).save(
        data / "catalog.jsonl")
    run = train_tiny_sasrec(data, tmp_path / "sasrec", max_history=6, ks=[1, 5, 10, 20])
    out = tmp_path / "eval"
    res = evaluate(_config(data, run, out))
    recs = [json.loads(x) for x in (out / "rankings.jsonl").read_text().splitlines()]
    from llmrec.data.canonical import load_prepared

    split = load_prepared(data, splits=["test"], max_history=6).splits["test"]
    full = Recommender.from_pretrained(run, dataset=data).recommend(
        [list(split[r["row"]]["history_item_ids"]) for r in recs], k=40)
    for r, ranked in zip(recs, full):
        titles = list(dict.fromkeys(e.title for e in ranked))
        assert len(titles) == 14 and r["title_ranking"] == titles
        assert r["title_rank"] == titles.index(f"Game {(r['target_item_id'] - 1) // 3}")
    assert res["metrics"]["title"]["hr@20"] == 1.0  # every title is within the first 20 titles
    assert res["metrics"]["title"]["hr@10"] == pytest.approx(sum(r["title_rank"] < 10 for r in recs) / len(recs))

    pop = evaluate(EvalConfig(dataset=str(data), split="test", method="popularity", ks=[1, 5, 10, 20],
                              output_dir=str(tmp_path / "pop")))
    assert pop["metrics"]["title"]["hr@20"] == 1.0


def test_score_histories_masks_only_the_items_the_model_reads():
    """Given a history longer than max_history, mask_history masks its last max_history items, as the trainer
    does (it masked the whole history given: the same only for the evaluator's rows, already cut)."""
    import torch

    from llmrec.seqrec.models import SASRec
    from llmrec.seqrec.modules import Backbone
    from llmrec.seqrec.scoring import score_histories

    torch.manual_seed(0)
    model = SASRec(Backbone(num_items=8, max_len=3, hidden=8, heads=2, inner=16)).eval()
    masked = score_histories(model, [[1, 2, 3, 4, 5]], 3, "cpu", mask_history=True)
    plain = score_histories(model, [[1, 2, 3, 4, 5]], 3, "cpu")
    assert torch.isinf(masked[0, 2:5]).all()  # items 3, 4, 5
    assert torch.equal(masked[0, [0, 1, 5, 6, 7]], plain[0, [0, 1, 5, 6, 7]])
