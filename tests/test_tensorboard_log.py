"""Optional TensorBoard scalars of llmrec's own training loops (llmrec.tensorboard_log)."""

from __future__ import annotations

import sys

import pytest
from conftest import read_scalars

from llmrec.tensorboard_log import ScalarLog, flat_scalars, wants_tensorboard


def test_flat_scalars_keeps_finite_numbers_and_flattens_nested_dicts():
    values = {"loss": 0.5, "steps": 3, "valid": {"ndcg@10": 0.06, "hr@10": float("inf")}, "note": "text",
              "skipped": float("nan"), "resumed": True}
    assert flat_scalars(values, prefix="train/") == {"train/loss": 0.5, "train/steps": 3.0,
                                                     "train/valid/ndcg@10": 0.06}


@pytest.mark.parametrize("report_to, wanted", [(None, False), ("none", False), ([], False), (["none"], False),
                                               ("tensorboard", True), (["tensorboard"], True)])
def test_wants_tensorboard_reads_every_report_to_shape(report_to, wanted):
    assert wants_tensorboard(report_to, "test") is wanted


def test_other_integrations_are_refused_not_silently_skipped():
    with pytest.raises(ValueError, match=r"latent GRPO: report_to \['wandb'\] is not supported"):
        wants_tensorboard(["tensorboard", "wandb"], "latent GRPO")


def test_missing_package_is_a_clear_error_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(ImportError, match=r"pip install \"llmrec\[tensorboard\]\""):
        wants_tensorboard("tensorboard", "test")
    with pytest.raises(ImportError, match="llmrec\\[tensorboard\\]"):
        ScalarLog(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()
    assert wants_tensorboard("none", "test") is False  # not asked for: no import at all


def test_the_cli_says_the_missing_package_in_one_line(monkeypatch, tmp_path, capsys):
    """It was a chained two-exception traceback."""
    from llmrec.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(["seqrec", "train", "--dataset_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                 "--report_to", "tensorboard"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmrec: error: report_to tensorboard needs the tensorboard package") and "Traceback" not in err


def test_sft_says_the_missing_package_in_one_line_before_loading_anything(monkeypatch, tmp_path, capsys):
    """``llmrec sft --report_to tensorboard`` without tensorboard: transformers' callback raised a RuntimeError
    traceback once training started (review)."""
    from llmrec.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(["sft", "--dataset", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                 "--report_to", "tensorboard"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmrec: error: report_to tensorboard needs the tensorboard package") and "Traceback" not in err


def test_scalar_log_writes_readable_events_and_disabled_log_writes_nothing(tmp_path):
    with ScalarLog(tmp_path / "tb") as log:
        log.add("train", {"loss": 2.0, "valid": {"ndcg@10": 0.1}}, 1)
        log.add("train", {"loss": 1.5, "valid": {"ndcg@10": 0.2}, "note": "x"}, 2)
    assert read_scalars(tmp_path / "tb") == {"train/loss": [(1, 2.0), (2, 1.5)],
                                             "train/valid/ndcg@10": [(1, pytest.approx(0.1)), (2, pytest.approx(0.2))]}
    off = ScalarLog(None)
    off.add("train", {"loss": 1.0}, 1)
    off.close()
    assert off.writer is None
