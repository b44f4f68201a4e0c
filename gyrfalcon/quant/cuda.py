"""The CUDA fast path for quantized linears: bitsandbytes' kernels when it is installed.

Our 4-bit tensors are bitsandbytes' format byte for byte (codes, packing, double-quantized absmax with its
dynamic map), so they are handed to `bitsandbytes.matmul_4bit` as they are, with no copy. An int8 weight is
multiplied as (x @ q^T) * scale: the int8 codes cast exactly to the compute dtype, the per-row scale applied to the
output, never to a dequantized copy of the weight. Without bitsandbytes (or for anything it does not cover) the
caller uses the reference path. Returning None means "not handled here".
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=1)
def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional as bf

        return bitsandbytes, bf
    except Exception:  # noqa: BLE001 - ImportError, or a broken CUDA setup inside bitsandbytes
        return None


def bitsandbytes_available() -> bool:
    return _bnb() is not None


def _quant_state(w, dtype: torch.dtype):
    cached = getattr(w, "_bnb_state", None)
    if cached is not None and cached[0] == dtype and cached[1] == w.q.data_ptr():
        return cached[2]
    bnb, bf = _bnb()
    from . import int4

    dev = w.q.device
    state2 = None
    if w.double_quant:
        state2 = bf.QuantState(absmax=w.absmax2, code=int4.code_book("dynamic", dev), blocksize=int4.NESTED_BLOCKSIZE,
                               dtype=torch.float32)
    state = bf.QuantState(absmax=w.absmax.reshape(-1), shape=torch.Size((w.shape[0], w.kp)),
                          code=int4.code_book(w.quant_type, dev), blocksize=int4.BLOCKSIZE, quant_type=w.quant_type,
                          dtype=dtype, offset=None if w.offset is None else w.offset.reshape(()), state2=state2)
    w._bnb_state = (dtype, w.q.data_ptr(), state)
    return state


def linear(w, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    from .linear import Int4Weight, Int8Weight

    dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else w.dtype
    if isinstance(w, Int8Weight) and w.threshold is None:
        y = F.linear(x.to(dtype), w.q.to(dtype)) * w.scale.to(dtype)
        return y if bias is None else y + bias.to(dtype)
    if isinstance(w, Int4Weight) and _bnb() is not None:
        bnb, _ = _bnb()
        k = w.shape[1]
        xx = x.to(dtype)
        if w.kp != k:
            xx = F.pad(xx, (0, w.kp - k))
        y = bnb.matmul_4bit(xx, w.q.reshape(-1, 1).t(), quant_state=_quant_state(w, dtype))
        return y if bias is None else y + bias.to(dtype)
    return None
