"""Helpers of the distributed tests: N processes under ``accelerate launch``, and the 1-process reference run here.

Every "2 processes give what 1 process gives" test launches the 2-process run (gloo on CPU) and runs the same script
in the test's own process as the 1-process reference: a launch costs ~10 s of imports per process on these
machines, and one process under the launcher computes what it computes here (same script, same thread count).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import torch


def accelerate_launch(num_processes: int, target: list[str], port_offset: int = 0, timeout: int = 600) -> str:
    """``accelerate launch`` ``target`` (a script and its arguments, or ``-m module ...``) on ``num_processes``
    CPU processes (``--multi_gpu`` gives gloo when there is no GPU); its stdout. A failure shows the launch's stderr.
    """
    # Each pytest-xdist worker (gw0, gw1, ...) launches in its own 200-port range, so two workers' launches never meet
    # on one port; within a worker (tests run one after another) the pid varies the port from run to run.
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    port = str(29400 + 200 * worker + 2 * ((os.getpid() + port_offset) % 99) + num_processes)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MASTER_PORT=port)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--multi_gpu", "--num_processes", str(num_processes)] if num_processes > 1 else ["--num_processes", "1"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    proc = subprocess.run(cmd + [str(a) for a in target], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def run_script_here(script: Path, *argv: object) -> None:
    """Run ``script`` as ``__main__`` in this process with ``argv``, on one torch thread (as launched with
    OMP_NUM_THREADS=1); this process's argv and thread count are restored afterwards."""
    saved_argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = [str(script), *map(str, argv)]
    torch.set_num_threads(1)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved_argv
        torch.set_num_threads(threads)


def assert_ranks_equal_single(two: Path, one: Path, atol: float = 1e-5) -> None:
    """A 2-process run's saved weights (``rank0/1.safetensors`` in ``two``) are identical on both ranks and within
    ``atol`` of the 1-process run's (``rank0.safetensors`` in ``one``)."""
    from safetensors.torch import load_file

    r0 = load_file(str(two / "rank0.safetensors"))
    r1 = load_file(str(two / "rank1.safetensors"))
    single = load_file(str(one / "rank0.safetensors"))
    assert r0.keys() == r1.keys() == single.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert (r0[k] - single[k]).abs().max().item() <= atol, k
