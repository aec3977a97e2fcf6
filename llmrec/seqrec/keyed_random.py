"""Random numbers that depend only on a key (seed, stream, epoch, row, ...), never on the process layout.

A training row split onto another process, or batched with other rows, draws from the global generator at
another point of its stream, so a model whose training draws random states (LARES's initial state, its random
depth) trains differently on 2 processes than on 1 with the same global batch, and a resumed run differs
from an uninterrupted one unless every generator state is restored. Draws keyed by what they belong to (the
row's index, the epoch, the global step) are the same whatever the layout.

Row draws are counter-based: SplitMix64 (Steele, Lea and Flood, 2014) seeded by the row's key, vectorised on
the keys' device with int64 arithmetic (wrap-around multiplication; logical shifts emulated with masks), then
mapped to a truncated normal through the inverse CDF. Scalar draws (one per batch, e.g. a depth) use a
``torch.Generator`` seeded from the mixed key.
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _signed(v: int) -> int:
    """An unsigned 64-bit integer as the int64 with the same bits."""
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _mix64(x: int) -> int:
    """SplitMix64's finaliser on a Python int (unsigned 64-bit arithmetic)."""
    x = ((x ^ (x >> 30)) * _MUL1) & _MASK64
    x = ((x ^ (x >> 27)) * _MUL2) & _MASK64
    return x ^ (x >> 31)


def mix(*key: int) -> int:
    """One 63-bit seed from a tuple of integers; different tuples give unrelated seeds.

    >>> mix(42, 1, 0) != mix(42, 0, 1)
    True
    """
    h = 0
    for v in key:
        h = _mix64((h + _GAMMA + (int(v) & _MASK64)) & _MASK64)
    return h >> 1


def keyed_generator(*key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from ``key`` (e.g. ``(seed, stream, epoch, step)``): for per-batch scalar draws.

    On CPU only the low 32 bits of the seed reach the generator (torch seeds its mt19937 from them), so among
    ~10^5 keys a few pairs draw the same numbers (3 pairs among (42, 1, epoch < 200, step < 1000)): harmless for
    a scalar draw per batch, not for per-row draws (use :func:`row_keys`). Seeding from all 64 bits would change
    every existing key's draws, hence the results of finished runs.
    """
    return torch.Generator(device=device).manual_seed(mix(*key))


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic: mask the sign-extended bits to get the logical shift.
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64_t(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on an int64 tensor, in place (returns ``x``)."""
    t = torch.empty_like(x)

    def xorshift(s: int) -> None:
        torch.bitwise_right_shift(x, s, out=t)
        x.bitwise_xor_(t.bitwise_and_((1 << (64 - s)) - 1))

    xorshift(30)
    x.mul_(_signed(_MUL1))
    xorshift(27)
    x.mul_(_signed(_MUL2))
    xorshift(31)
    return x


def row_keys(rows: torch.Tensor, *key: int) -> torch.Tensor:
    """Per-row int64 keys from row indices and a shared key (e.g. ``(seed, stream, epoch)``)."""
    return _mix64_t(rows.long() * _signed(_GAMMA) + _signed(mix(*key)))


def keyed_uniform(keys: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform floats in (0, 1), ``[len(keys), *shape]``; row ``i`` depends on ``keys[i]`` only.

    Row ``i`` reads the outputs ``z_1, z_2, ...`` of SplitMix64 seeded with ``keys[i]``, two 23-bit fields of
    each (bits 41-63, then bits 0-22), at the middle of their bin: ``(b + 0.5) / 2^23``, exact in float32,
    never 0 or 1. In-place int64 arithmetic: cheaper than ``torch.randn`` of the same size here.
    """
    n = math.prod(shape)
    half = (n + 1) // 2
    counters = torch.arange(1, half + 1, device=keys.device, dtype=torch.long).mul_(_signed(_GAMMA))
    bits = _mix64_t(counters[None, :] + keys.long()[:, None])
    u = torch.empty(len(keys), 2 * half, device=keys.device)
    u[:, 0::2] = _shr(bits, 41)
    u[:, 1::2] = bits.bitwise_and_((1 << 23) - 1)
    u.add_(0.5).mul_(2.0**-23)
    return u[:, :n].reshape(len(keys), *shape)


def keyed_trunc_normal(keys: torch.Tensor, shape: tuple[int, ...], std: float = 1.0, bound: float = 3.0) -> torch.Tensor:
    """Normal(0, std) truncated to ``[-bound * std, bound * std]``, ``[len(keys), *shape]``, row-keyed.

    The same law as ``torch.nn.init.trunc_normal_(t, 0, std, -bound * std, bound * std)`` (inverse CDF of the
    uniform draws of :func:`keyed_uniform`).
    """
    cdf_lo = 0.5 * (1.0 + math.erf(-bound / math.sqrt(2.0)))
    u = cdf_lo + keyed_uniform(keys, shape) * (1.0 - 2.0 * cdf_lo)
    z = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
    return z.clamp(-bound, bound) * std
