"""Stages in their own process (llmrec.isolation) and the pipeline's use of them."""

from __future__ import annotations

import json
import operator
import os
import signal

import pytest

from llmrec.isolation import StageProcessError, run_isolated


def _pid_and_env(_cfg=None) -> tuple[int, str | None]:
    return os.getpid(), os.environ.get("LLMREC_ISOLATION_PROBE")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _die_by_a_realtime_signal() -> None:
    os.kill(os.getpid(), signal.SIGRTMIN + 6)  # terminates by default; signal.Signals has no member for it


def test_returns_the_value_computed_in_another_process_with_the_same_environment(monkeypatch):
    monkeypatch.setenv("LLMREC_ISOLATION_PROBE", "inherited")
    assert run_isolated(operator.add, 2, 3) == 5
    pid, env = run_isolated(_pid_and_env)
    assert pid != os.getpid() and env == "inherited"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def test_the_stage_computes_on_the_parents_torch_thread_count(monkeypatch):
    """torch.set_num_threads is no environment variable: without passing it on, a stage under a parent that set 1
    thread ran on every core, and on AVX2 CPUs float32 sums differ in their last bits with the thread count (the
    pipeline's in-process and own-process SFT eval_loss differed by 6e-8)."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child's default, unlike the parent's setting below
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert run_isolated(_torch_threads) == 3
    finally:
        torch.set_num_threads(before)


class _Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def _raise_unpicklable() -> None:
    raise _Unpicklable(1, 2)


def _raise_bad_row() -> None:
    from pathlib import Path

    from llmrec.data.canonical import DataFormatError

    raise DataFormatError(Path("data/x/train.jsonl"), 12, "history_item_ids", "unknown item id 99")


def test_an_exception_in_the_stage_is_raised_in_the_parent_as_itself_with_its_traceback():
    with pytest.raises(json.JSONDecodeError, match="Expecting property name") as e:
        run_isolated(json.loads, "{")
    cause = e.value.__cause__
    assert isinstance(cause, StageProcessError) and "Traceback" in str(cause) and "json" in str(cause)
    # one that cannot be rebuilt from its pickle comes back as text
    with pytest.raises(StageProcessError, match="_Unpicklable: 1 and 2") as e2:
        run_isolated(_raise_unpicklable)
    assert "In the stage's process" in str(e2.value)
    # ... or, when it is a standard error (the package's DataFormatError is a ValueError), as that, with its message:
    # the CLI's one-line "llmrec: error: ..." (it was a StageProcessError, a RuntimeError: a two-process traceback)
    with pytest.raises(ValueError, match="train.jsonl, row 12, field 'history_item_ids': unknown item id 99") as e3:
        run_isolated(_raise_bad_row)
    assert isinstance(e3.value.__cause__, StageProcessError) and "DataFormatError" in str(e3.value.__cause__)


def _return_a_lambda():
    return lambda: None


def test_a_return_value_that_cannot_be_pickled_is_named_not_reported_as_a_crash():
    with pytest.raises(StageProcessError, match="return value \\(function\\) cannot be pickled"):
        run_isolated(_return_a_lambda)


def test_a_stage_killed_by_a_signal_is_reported_not_taken_for_success():
    with pytest.raises(StageProcessError, match="SIGKILL.*out of memory"):
        run_isolated(_die)


def test_a_stage_killed_by_a_signal_without_a_name_is_still_reported_as_a_dead_stage():
    """signal.Signals(40) raised ValueError('40 is not a valid Signals') in the parent instead of the
    StageProcessError that says the stage died."""
    with pytest.raises(StageProcessError, match=f"signal {int(signal.SIGRTMIN) + 6}\\)"):
        run_isolated(_die_by_a_realtime_signal)


def test_pipeline_runs_stages_in_their_own_process_unless_asked_or_distributed(tmp_path, monkeypatch):
    from llmrec.bench_pipeline import Pipeline, PipelineOptions

    isolated = Pipeline(PipelineOptions(dataset=str(tmp_path), output_dir=str(tmp_path / "runs")))
    assert isolated._call(_pid_and_env, None)[0] != os.getpid()
    here = Pipeline(PipelineOptions(dataset=str(tmp_path), output_dir=str(tmp_path / "runs"), in_process=True))
    assert here._call(_pid_and_env, None)[0] == os.getpid()
    monkeypatch.setenv("WORLD_SIZE", "2")  # under accelerate launch: a child cannot join the process group
    assert isolated._call(_pid_and_env, None)[0] == os.getpid()


_PARENT = """
import multiprocessing, threading, time
from llmrec.isolation import run_isolated

def report_child():
    while not multiprocessing.active_children():
        time.sleep(0.05)
    print(multiprocessing.active_children()[0].pid, flush=True)

threading.Thread(target=report_child, daemon=True).start()
run_isolated(time.sleep, 120)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie nobody reaped has ended too
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_the_stage_process_ends_when_its_parent_is_killed():
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.send_signal(signal.SIGTERM)  # Python's default SIGTERM: the parent dies without cleaning up
        parent.wait(timeout=30)
        deadline = time.monotonic() + 15
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(child), "the stage process outlived its parent"
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.parametrize("variable", ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"])
def test_every_launcher_counts_as_a_distributed_launch(monkeypatch, variable):
    # accelerate sizes an MPI launch from PMI_SIZE / OMPI_COMM_WORLD_SIZE; only WORLD_SIZE was read (review)
    from llmrec.distributed import launched_processes
    from llmrec.isolation import in_distributed_launch

    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launched_processes() == 1 and not in_distributed_launch()
    monkeypatch.setenv(variable, "4")
    assert launched_processes() == 4 and in_distributed_launch()
