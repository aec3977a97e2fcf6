"""Optional TensorBoard scalars for llmrec's own training loops.

``llmrec sft`` trains through transformers' ``Trainer``, whose ``report_to`` already covers TensorBoard. The
latent GRPO trainer and the ID-model trainer (``llmrec seqrec train``) run loops of their own and log through
:class:`ScalarLog`. TensorBoard is an optional dependency (``pip install "llmrec[tensorboard]"``): asking for it
without the package fails when the run is configured, before any work, not after the first step.

    >>> from llmrec.tensorboard_log import flat_scalars
    >>> flat_scalars({"loss": 0.5, "valid": {"ndcg@10": 0.06}, "note": "text", "skipped": float("nan")})
    {'loss': 0.5, 'valid/ndcg@10': 0.06}
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from pathlib import Path

__all__ = ["REPORT_TO_CHOICES", "wants_tensorboard", "require_tensorboard", "flat_scalars", "ScalarLog"]

REPORT_TO_CHOICES = ("none", "tensorboard")


def wants_tensorboard(report_to: str | list[str] | None, owner: str) -> bool:
    """True if ``report_to`` asks for TensorBoard; a clear error for integrations ``owner`` does not implement.

    Accepts the shapes a ``TrainingArguments``-style field takes (``None``, ``"none"``, a name, a list); an
    integration other than TensorBoard is refused rather than silently not logged to.
    """
    names = [] if report_to is None else [report_to] if isinstance(report_to, str) else list(report_to)
    names = [n for n in names if n != "none"]
    other = sorted(set(names) - {"tensorboard"})
    if other:
        raise ValueError(f"{owner}: report_to {other} is not supported; use 'tensorboard' or 'none'")
    if names:
        require_tensorboard()
    return bool(names)


class MissingPackageError(ImportError):
    """An optional package a requested feature needs is not installed (the message says what to install);
    ``llmrec`` prints it as one line."""


def require_tensorboard() -> None:
    """Raise a clear :class:`MissingPackageError` if the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as e:
        raise MissingPackageError('report_to tensorboard needs the tensorboard package: pip install '
                                  '"llmrec[tensorboard]"') from e


def flat_scalars(values: Mapping, prefix: str = "") -> dict[str, float]:
    """The finite real numbers of a (nested) mapping, keys joined with ``/``; booleans, text and NaN are left out."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_scalars(value, prefix=f"{name}/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


class ScalarLog:
    """A TensorBoard event writer for scalars, or a no-op (``log_dir=None``, e.g. on non-main processes).

    Args:
        log_dir: directory of the event files (created); ``None`` disables logging.
        purge_step: a run resumed from its checkpoint at step ``T`` passes ``T + 1``: the points the cut run wrote
            after its checkpoint (steps >= T + 1, written again by the resumed run) are hidden in TensorBoard
            rather than shown twice (``SummaryWriter``'s ``purge_step``).
    """

    def __init__(self, log_dir: str | Path | None, purge_step: int | None = None):
        self.writer = None
        if log_dir is not None:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def add(self, tag: str, values: Mapping, step: int) -> None:
        """Write every finite number of ``values`` (nested mappings flattened) as ``tag/<key>`` at ``step``."""
        if self.writer is None:
            return
        for name, value in flat_scalars(values, prefix=f"{tag}/").items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a run cut at any time keeps what it logged

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> ScalarLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
