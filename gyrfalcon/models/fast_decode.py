"""The small operations of a CPU decode step through the compiled kernels (kernels/decode_cpu.c), where they apply.

At one token a row the work between two linears is tiny, but in torch it is a dozen operator calls per layer, and
on a 250M Falcon those were 3-4 ms of a step (a quarter of a 4-bit decode step): see decode_cpu.c. Each function
here returns None (or leaves the work to its caller) whenever its fast path does not apply, and the caller then runs
the plain torch code, which is also the reference: `fast_linear.FAST = False` turns these off with the linears.
tests/test_decode_kernels.py holds the two together.

Cache protocol extension: a cache (or a per-pass view of one) that can say where it keeps each position has
`kv_layout() -> KVLayout | None`; see `KVLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import cpu as cpu_kernels
from . import fast_linear

_F32 = torch.float32
ENABLED = True  # False: these decode kernels off, the linears' kernels on (tests compare the two)
GELU_MAX_NUMEL = 1 << 16  # rows x width of a decode step's GELU through the kernel; larger ones go to torch


@dataclass(frozen=True)
class KVLayout:
    """Where a cache keeps position s of row b, KV head g (fp32, on the CPU): in k[layer] / v[layer] at float offset
    (tables[b, s // block_size] * block_size + s % block_size) * slot_stride + g * head_stride."""

    tables: torch.Tensor  # [B, W] int64, contiguous
    block_size: int
    slot_stride: int
    head_stride: int
    k: list[torch.Tensor]
    v: list[torch.Tensor]


def _on() -> bool:
    return (ENABLED and fast_linear.FAST and not torch.is_grad_enabled() and not fast_linear._compiling()
            and cpu_kernels.available())


def gelu_(h: torch.Tensor) -> torch.Tensor | None:
    """GELU of `h` ([B, 1, F]: one token a row) in place through the kernel, or None (the caller then runs torch's).

    Decode steps only, where the call is small and torch's erf is slow for its size; a prefill's GELU is large enough
    for torch's threaded kernel, and scoring (which compares with lm-eval's numbers) keeps torch's arithmetic."""
    if (h.dtype is _F32 and h.is_cpu and h.dim() == 3 and h.shape[1] == 1 and h.numel() <= GELU_MAX_NUMEL
            and h.is_contiguous() and _on() and not h.requires_grad):
        return cpu_kernels.gelu_(h)
    return None


def attention(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, rope: tuple | None, cache,
              layer: int) -> torch.Tensor | None:
    """One new token a row (qkv [B, 1, (H + 2G) d], queries before keys and values in each KV group): rotary, the
    cache write and the attention in one kernel call -> [B, 1, H d]; or None when the kernel does not apply (then
    nothing has been written and the caller runs the reference)."""
    if rope is None or cache is None or not _on():
        return None
    layout_of = getattr(cache, "kv_layout", None)
    if layout_of is None:
        return None
    lay = layout_of()
    if lay is None:
        return None
    k, v = lay.k[layer], lay.v[layer]
    cos, sin = rope
    lengths = cache.lengths
    if not (qkv.dtype is _F32 and qkv.is_cpu and qkv.is_contiguous() and k.dtype is _F32 and v.dtype is _F32
            and k.is_cpu and v.is_cpu and cos.dtype is _F32 and cos.is_cpu and lengths.is_cpu
            and lengths.dtype is torch.int64):
        return None
    b = qkv.shape[0]
    out = cpu_kernels.attn_decode(qkv.view(b, -1), num_heads, num_kv_heads, head_dim, cos, sin, lengths,
                                  lay.tables, lay.block_size, lay.slot_stride, lay.head_stride, k, v)
    return out.view(b, 1, num_heads * head_dim)
