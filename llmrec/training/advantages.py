"""Advantages of latent GRPO, computed on the whole optimiser batch gathered from every process.

Rewards arrive as ``[num_groups, G]`` (member 0 of each group is the noise-free latent). Groups whose
rewards are not all finite (or beyond +-1e300, taken as an overflow) are *skipped*: their advantages are 0 and they take no part in any baseline
or normalisation, so one bad group cannot poison the batch.
"""

from __future__ import annotations

import torch

__all__ = ["ADVANTAGE_MODES", "batch_advantages", "compute_advantages", "group_advantages"]


def batch_advantages(rewards: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LatentR3's batch advantage: ``A = s - b`` with ``b`` the mean noise-free reward over the batch's groups,
    then ``A / (||A||_2 + eps)`` with the L2 norm over the whole batch (not a standard deviation).

    >>> r = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # baseline (1 + 3) / 2 = 2 -> A = [-1, 0, 1, -2]
    >>> batch_advantages(r, torch.tensor([True, True]))
    tensor([[-0.4082,  0.0000],
            [ 0.4082, -0.8165]])
    """
    out = torch.zeros_like(rewards)
    if not bool(valid.any()):
        return out
    r = rewards[valid]
    a = r - r[:, 0].mean()
    # The norm of a / max|a|, times max|a|: a.norm() squares first, and one member ~1e154 off the baseline (a
    # perplexity reward of a very unlikely title) would make it inf and every advantage of the batch 0.
    scale = a.abs().max()
    norm = scale * (a / scale).norm() if scale > 0 else scale
    out[valid] = a / (norm + eps)
    return out


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Standard GRPO: z-score within each group, ``(s - mean_g) / (std_g + eps)`` (unbiased std, as TRL).

    >>> group_advantages(torch.tensor([[1.0, 3.0], [5.0, 5.0]]), torch.tensor([True, True]))
    tensor([[-0.7071,  0.7071],
            [ 0.0000,  0.0000]])
    """
    out = torch.zeros_like(rewards)
    if not bool(valid.any()):
        return out
    r = rewards[valid]
    d = r - r.mean(dim=1, keepdim=True)
    # the std of d / max|d|, times max|d|: as the batch norm, so that squaring cannot overflow
    scale = d.abs().amax(dim=1, keepdim=True)
    std = scale * (d / torch.where(scale > 0, scale, 1.0)).std(dim=1, keepdim=True)
    out[valid] = d / (std + eps)
    return out


ADVANTAGE_MODES = {"batch": batch_advantages, "group": group_advantages}
MAX_ABS_REWARD = 1e300


def compute_advantages(rewards: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages [num_groups, G], valid [num_groups])``; invalid groups (non-finite rewards) get 0."""
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"advantage mode must be one of {sorted(ADVANTAGE_MODES)}, got {mode!r}")
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_groups, G >= 2], got {tuple(rewards.shape)}")
    rewards = rewards.double()
    # A reward beyond +-1e300 is taken as an overflow (differences of such rewards would not be finite).
    valid = (torch.isfinite(rewards) & (rewards.abs() <= MAX_ABS_REWARD)).all(dim=1)
    safe = torch.where(valid[:, None], rewards, torch.zeros_like(rewards))
    return ADVANTAGE_MODES[mode](safe, valid), valid
