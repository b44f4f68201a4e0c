"""`linear(mod, x)`: what `mod(x)` computes, through the fastest routine for the shape, for plain fp32 linears on CPU.

Decoding reads every weight once per token, so its speed is how fast a matrix streams from memory. Measured on
the 2-core AMD EPYC we benchmark on (a 65024 x 1024 fp32 matrix, 2 threads):

    rows  F.linear (MKL)   gyrfalcon gemv_f32 (kernels/gemv_f32.c)
    1     ~18 GB/s         ~33 GB/s   (a plain read of memory: ~30 GB/s)
    2-8   3-6 GB/s         (one pass over the weight for all rows)

The kernel takes 9-16 rows too (a server's decode batch: the rows in groups over one pass of the weights); on the
250M model's 65 matrices, 16 rows took 72 ms against 97 ms with oneDNN on an AVX-512 EPYC (and more with MKL, `W @
x^T`: 35 ms for 9 rows of the head alone, oneDNN 17), 112 against 126 ms on an AVX2 one (Zen 3). Above that
(prefill) oneDNN's fp32 GEMM, which beats MKL's. Everything else (another dtype or device, a quantized/LoRA/hooked
module, autograd through the weight or the input) is plain `mod(x)`, which is also the reference path: set `FAST =
False` (or GYRFALCON_KERNELS=0 for the compiled kernel alone) and every call is `mod(x)`. tests/test_fast_linear.py
holds the two together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu as cpu_kernels

FAST = True  # False: every call is `mod(x)` (the reference path, for comparisons)


def _onednn_ok() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch built without oneDNN
        return False


_ONEDNN = _onednn_ok()


def _compiling() -> bool:
    """Inside torch.compile tracing: the ctypes kernel would break the graph, so the module call is traced."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch without torch.compiler
        return False


def no_grad_needed(t: torch.Tensor) -> bool:
    """True when `t` can be updated in place: autograd is off, or nothing tracks it."""
    return not (torch.is_grad_enabled() and t.requires_grad)


_F32 = torch.float32


def linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`mod(x)` for any module; for a plain fp32 `nn.Linear` on CPU, the same product by the fastest routine."""
    # Decoding: a contiguous fp32 input of 1..8 rows without autograd goes straight to the kernel. A 250M model
    # makes 65 of these calls per token, so the general checks below (~8 us a call) were ~2% of a decode step.
    if FAST and type(mod) is nn.Linear and not torch.is_grad_enabled() and x.dtype is _F32 and x.is_cpu:
        params = mod._parameters
        w = params["weight"]
        k = x.shape[-1]
        rows = x.numel() // k if k else 0
        if (0 < rows <= cpu_kernels.F32_MAX_ROWS and w.dtype is _F32 and w.is_cpu and x.is_contiguous()
                and w.is_contiguous() and not mod._forward_hooks and not mod._forward_pre_hooks
                and cpu_kernels.available() and not _compiling()):
            bias = params["bias"]
            if bias is None or (bias.dtype is _F32 and bias.is_contiguous() and bias.is_cpu):
                y = torch.empty(*x.shape[:-1], w.shape[0])
                cpu_kernels.gemv_f32_unchecked(x, w, bias, rows, y)
                return y
    if (not FAST or type(mod) is not nn.Linear or x.device.type != "cpu" or x.dtype != torch.float32
            or mod._forward_hooks or mod._forward_pre_hooks or _compiling()):
        return mod(x)
    w, bias = mod.weight, mod.bias
    tracked = x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)
    if w.dtype != torch.float32 or w.device.type != "cpu" or (tracked and torch.is_grad_enabled()):
        return mod(x)
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if rows == 0:
        return mod(x)
    x2 = x.reshape(rows, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if rows <= cpu_kernels.F32_MAX_ROWS and w.is_contiguous() and cpu_kernels.available():
        y = cpu_kernels.gemv_f32(x2, w, bias)
    elif _ONEDNN and w.is_contiguous():  # (a strided weight sends oneDNN down a path ~1000x slower)
        y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), w, bias, "none", [], "")
    else:
        y = F.linear(x2, w, bias)
    return y.view(*x.shape[:-1], w.shape[0])
