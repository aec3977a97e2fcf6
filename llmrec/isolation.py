"""Run one long stage (a training run, an evaluation) in a fresh process.

A pipeline that trains and evaluates many models one after another in one Python process keeps growing:
what a stage frees is rarely handed back to the operating system (allocator caches, fragmentation, objects
kept alive by library-level caches), so by the fourth or fifth stage a process can hold several times what
any single stage needs. On a 24 GiB machine, of two such processes side by side one was killed by the OOM killer.
A stage run by :func:`run_isolated` starts from a clean process and returns all of its memory when it ends.

The child is started with the ``spawn`` method (no fork of a process that holds threads and torch state),
inherits the environment (``OMP_NUM_THREADS``, ``CUDA_VISIBLE_DEVICES``, ...), the parent's torch intra-op thread
count (``torch.set_num_threads``, which no environment variable carries: on AVX2 CPUs a float32 reduction's last bits
depend on it, so a stage in its own process computes exactly as it would in the parent) and the terminal, so its progress
bars show as usual; the function, its arguments and its return value must be picklable. The child ends itself
when the parent goes away however it ended (``kill``, SIGKILL, a scheduler's SIGTERM, where the parent has no
chance to stop it), so a stopped pipeline never leaves a stage training on its own in the background.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class StageProcessError(RuntimeError):
    """A stage run by :func:`run_isolated` raised, or its process died."""


def _exit_when_parent_ends(sentinel: int) -> None:
    from multiprocessing.connection import wait

    # multiprocessing's parent sentinel becomes ready when the parent process ends (its end of a pipe closes).
    wait([sentinel])
    os._exit(1)  # nobody waits for the result; a stage left running would go on writing its outputs


# Most specific first: the exception types the CLI and the callers tell apart.
_STANDARD_BASES = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
                   KeyError, IndexError, TypeError, ValueError, OSError, RuntimeError)


def _child(conn, fn: Callable[..., Any], args: tuple, kwargs: dict, torch_threads: int | None = None) -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_when_parent_ends, args=(parent.sentinel,), daemon=True,
                         name="llmrec-exit-with-parent").start()
    try:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        result = fn(*args, **kwargs)
    except BaseException as e:  # any failure, KeyboardInterrupt included, goes back to the parent
        tb = traceback.format_exc()
        try:  # the exception itself when it survives pickling (so callers can catch ValueError etc.)
            pickle.loads(pickle.dumps(e))
            conn.send(("raise", e, tb))
        except Exception:
            # One whose constructor takes other arguments than its args (DataFormatError(path, row, field,
            # problem)) cannot be rebuilt: send its nearest standard base class with its message, so the CLI still
            # prints "llmrec: error: ..." and callers still catch ValueError (it became a traceback; review).
            base = next((b for b in _STANDARD_BASES if isinstance(e, b)), None)
            if base is not None:
                conn.send(("raise", base(str(e)), tb))
            else:
                conn.send(("error", f"{type(e).__name__}: {e}", tb))
        conn.close()
        raise SystemExit(1) from None
    try:
        conn.send(("ok", result, ""))
    except Exception as e:  # the stage ran, but its value cannot come back: say so, not "exit code 1"
        conn.send(("error", f"its return value ({type(result).__name__}) cannot be pickled: {e}", ""))
        conn.close()
        raise SystemExit(1) from None
    conn.close()


def in_distributed_launch() -> bool:
    """True under ``accelerate launch``/``torchrun``/MPI with several processes (a child would join their group)."""
    from llmrec.distributed import launched_processes

    return launched_processes() > 1


def run_isolated(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a fresh spawned process; its return value.

    An exception in the stage is raised again here, as the same type (its cause: a :class:`StageProcessError`
    holding the traceback in the stage's process) when it can be pickled, else as a ``StageProcessError``; a
    stage process that dies without returning (killed, out of memory) raises ``StageProcessError``.

    >>> import operator
    >>> run_isolated(operator.add, 2, 3)
    5
    """
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    name = getattr(fn, "__qualname__", repr(fn))
    # The parent's thread count, if it set one (torch imported); a parent without torch leaves the child's default.
    torch_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    proc = ctx.Process(target=_child, args=(sender, fn, args, kwargs, torch_threads), name=f"llmrec:{name}")
    proc.start()
    sender.close()  # the child holds the only writer: recv() ends with EOFError if it dies without a word
    try:
        try:
            message = receiver.recv()
        except EOFError:
            message = None
        proc.join()
    except BaseException:  # interrupted while waiting: do not leave the stage running on its own
        proc.terminate()
        proc.join()
        raise
    finally:
        receiver.close()
    if message is None:
        code = proc.exitcode
        how = f"exit code {code}"
        if code is not None and code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:  # no name (e.g. SIGRTMIN+6 is 40): the number, not a ValueError hiding the death
                sig = str(-code)
            how = f"signal {sig}" + (" (out of memory? see `dmesg`)" if sig == "SIGKILL" else "")
        raise StageProcessError(f"{name} died in its own process ({how}) before returning")
    status, value, tb = message
    if status == "raise":
        raise value from StageProcessError(f"{name} failed in its own process:\n{tb}")
    if status != "ok":
        raise StageProcessError(f"{name} failed in its own process: {value}\n\nIn the stage's process:\n{tb}")
    return value
