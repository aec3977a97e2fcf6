"""Every process that imports llmrec ends its process group before interpreter finalisation (a gloo group left
alive until then can abort the process with "terminate called without an active exception")."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_importing_llmrec_ends_the_process_group_at_exit(tmp_path):
    script = textwrap.dedent(
        f"""
        import atexit
        import torch.distributed as dist

        # registered before llmrec's hook, so it runs after it (atexit is last in, first out)
        atexit.register(lambda: print("initialized at exit:", dist.is_initialized()))
        import llmrec  # noqa: F401

        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        print("initialized in run:", dist.is_initialized())
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["initialized in run: True", "initialized at exit: False"]


def test_exit_hook_is_a_no_op_without_a_process_group():
    proc = subprocess.run(
        [sys.executable, "-c", "import llmrec, torch.distributed as d; print(d.is_initialized())"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
