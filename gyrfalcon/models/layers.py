"""Position encodings shared by the Falcon layouts: rotary (RoPE, NeoX half-rotation) and alibi."""

from __future__ import annotations

import math

import torch


class Rotary:
    """cos/sin tables for rotary embeddings, computed lazily per device and grown on demand.

    Kept out of the module's buffers so that a model built on the meta device loads with a strict
    `load_state_dict` and the tables are made where the weights land.
    """

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def _build(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
        freqs = torch.arange(n, device=device).float()[:, None] * inv_freq[None, :]  # [n, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, d]
        return emb.cos(), emb.sin()

    def table(self, needed: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, head_dim] for positions 0..n-1 with n >= needed (grown, by doubling, on demand)."""
        cos, sin, _ = self._get(needed, device, dtype)
        return cos, sin

    def rolled_table(self, needed: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and the sign-folded sin ([-sin_1, sin_2] over the two halves) for `apply_rotary_rolled`."""
        cos, _, sin_signed = self._get(needed, device, dtype)
        return cos, sin_signed

    def _get(self, needed: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        key = (device, dtype)
        tables = self._tables.get(key)
        if tables is None or tables[0].shape[0] < needed:
            have = 0 if tables is None else tables[0].shape[0]
            cos, sin = self._build(max(needed, 2048, 2 * have), device)
            cos, sin = cos.to(dtype), sin.to(dtype)
            half = self.head_dim // 2
            tables = (cos, sin, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))
            self._tables[key] = tables
        return tables


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding as the reference writes it (`Rotary.table`); the model runs `apply_rotary_rolled`."""
    return x * cos + rotate_half(x) * sin


def apply_rotary_rolled(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` with the sign of rotate_half folded into the table (`Rotary.rolled_table`): the same numbers,
    bit for bit (-(a*b) == a*(-b) in IEEE arithmetic), in three elementwise kernels instead of five."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The per-head alibi slopes (geometric sequence; interleaved extras when heads is not a power of two)."""
    # Computed in float32 torch arithmetic, as in the original Falcon code, so the bf16-rounded bias is identical.
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))])
    return slopes


def alibi_bias(slopes: torch.Tensor, key_len: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [1, H, 1, S] for keys at absolute positions 0..S-1.

    Falcon-RW was trained with the bias computed in bfloat16 (slope and product rounded to bf16), and
    transformers keeps that; we do the same so that logits match. The bias is scaled like q.k by 1/sqrt(d).
    """
    pos = torch.arange(key_len, device=slopes.device)
    bias = (slopes.to(torch.bfloat16)[:, None] * pos[None, :]).to(torch.float32) / math.sqrt(head_dim)
    return bias[None, :, None, :].to(dtype)
