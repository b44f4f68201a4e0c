"""`linear(mod, x)`: what `mod(x)` computes, through the fastest routine for the shape, for plain fp32 linears on CPU.

Decoding reads every weight once per token, so its speed is how fast a matrix streams from memory. Measured on
the 2-core AMD EPYC we benchmark on (a 65024 x 1024 fp32 matrix, 2 threads):

    rows  F.linear (MKL)   gyrfalcon gemv_f32 (kernels/gemv_f32.c)
    1     ~18 GB/s         ~33 GB/s   (a plain read of memory: ~30 GB/s)
    2-8   3-6 GB/s         (one pass over the weight for all rows)

The kernel takes 9-16 rows too (a server's decode batch: the rows in groups over one pass of the weights); on the
250M model's 65 matrices, 16 rows took 72 ms against 97 ms with oneDNN on an AVX-512 EPYC (and more with MKL, `W @
x^T`: 35 ms for 9 rows of the head alone, oneDNN 17), 112 against 126 ms on an AVX2 one (Zen 3). Above that
(prefill, scoring) a GEMM: oneDNN's on CPUs with AVX-512, where it beat MKL's; MKL's (F.linear) elsewhere: on the AVX2
Zen 3 a 250M model's scoring-sized forwards ran 1.04x (4 x 512 tokens) to 1.13x (8 x 1090) faster with MKL
(benchmarks/prefill_choices.py; 1 x 128 from 0.86x to 1.02x, within that host's noise).
Everything else (another dtype or device, a quantized/LoRA/hooked
module, autograd through the weight or the input) is plain `mod(x)`, which is also the reference path: set `FAST =
False` (or GYRFALCON_KERNELS=0 for the compiled kernel alone) and every call is `mod(x)`. tests/test_fast_linear.py
holds the two together.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu as cpu_kernels

FAST = True  # False: every call is `mod(x)` (the reference path, for comparisons)
PAIRS = True  # False: a parallel layer's decode step calls its four linears one by one (comparisons)


def _onednn_ok() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch built without oneDNN
        return False


_ONEDNN = _onednn_ok()
# The GEMM for more rows than the gemv kernel takes (prefill, scoring): "onednn" or "mkl" (torch's F.linear), chosen
# per CPU at first use (`_prefill_gemm`, see the module docstring); GYRFALCON_PREFILL_GEMM=onednn|mkl overrides.
PREFILL_GEMM: str | None = os.environ.get("GYRFALCON_PREFILL_GEMM") or None


def _compiling() -> bool:
    """Inside torch.compile tracing: the ctypes kernel would break the graph, so the module call is traced."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch without torch.compiler
        return False


def _prefill_gemm() -> str:
    global PREFILL_GEMM
    if PREFILL_GEMM is None:
        PREFILL_GEMM = "onednn" if cpu_kernels.isa() == "avx512-vnni" else "mkl"
    if PREFILL_GEMM not in ("onednn", "mkl"):
        raise ValueError(f"GYRFALCON_PREFILL_GEMM must be 'onednn' or 'mkl', got {PREFILL_GEMM!r}")
    return PREFILL_GEMM


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
    elif _ONEDNN and w.is_contiguous() and _prefill_gemm() == "onednn":  # (a strided weight: ~1000x slower there)
        y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), w, bias, "none", [], "")
    else:
        y = F.linear(x2, w, bias)
    return y.view(*x.shape[:-1], w.shape[0])


def _kernel_weight(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a plain fp32 CPU nn.Linear that the gemv kernels can read in place, else None."""
    if type(mod) is not nn.Linear or mod._forward_hooks or mod._forward_pre_hooks:
        return None
    params = mod._parameters
    w, bias = params["weight"], params["bias"]
    if not (w.dtype is _F32 and w.is_cpu and w.is_contiguous()):
        return None
    if bias is not None and not (bias.dtype is _F32 and bias.is_cpu and bias.is_contiguous()):
        return None
    return w, bias


def decode_rows(x: torch.Tensor) -> int:
    """Rows of a decode-sized contiguous fp32 CPU input the kernels take, or 0 (then the caller's path is torch)."""
    if not (FAST and not torch.is_grad_enabled() and x.dtype is _F32 and x.is_cpu and x.is_contiguous()):
        return 0
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if not (0 < rows <= cpu_kernels.F32_MAX_ROWS) or _compiling() or not cpu_kernels.available():
        return 0
    return rows


def _quant():
    """gyrfalcon.quant.linear (its quantized linears have pair and sum kernels too), imported at first use."""
    from ..quant import linear as quant_linear

    return quant_linear


def linear_pair(mod1: nn.Module, mod2: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(`linear(mod1, x)`, `linear(mod2, x)`) in one kernel call when both go to the fp32 gemv kernel, or both to the
    quantized ones (the same numbers as two calls), else None. A parallel Falcon layer's query_key_value and
    dense_h_to_4h share their input."""
    rows = decode_rows(x)
    if not rows:
        return None
    p1 = _kernel_weight(mod1)
    p2 = _kernel_weight(mod2) if p1 is not None else None
    if p2 is None:
        return _quant().decode_pair(mod1, mod2, x)
    (w1, b1), (w2, b2) = p1, p2
    if w1.shape[1] != x.shape[-1] or w2.shape[1] != x.shape[-1]:
        return None
    lead = x.shape[:-1]
    y1, y2 = torch.empty(*lead, w1.shape[0]), torch.empty(*lead, w2.shape[0])
    cpu_kernels.gemv_f32_pair_unchecked(x, w1, b1, w2, b2, rows, y1, y2)
    return y1, y2


def linear_sum(mod1: nn.Module, x1: torch.Tensor, mod2: nn.Module, x2: torch.Tensor,
               residual: torch.Tensor) -> torch.Tensor | None:
    """`linear(mod1, x1) + linear(mod2, x2) + residual`, added in that order, in one kernel call when both products go
    to the fp32 gemv kernel, or both to the quantized ones (the same numbers as the separate calls and adds), else
    None. A parallel Falcon layer ends with (mlp + attention) + x, mlp and attention each ending in a linear."""
    rows = decode_rows(x1)
    if not rows or decode_rows(x2) != rows or x1.shape[:-1] != x2.shape[:-1]:
        return None
    if residual.dtype is not _F32 or not residual.is_contiguous() or not residual.is_cpu:
        return None
    p1 = _kernel_weight(mod1)
    p2 = _kernel_weight(mod2) if p1 is not None else None
    if p2 is None:
        return _quant().decode_sum(mod1, x1, mod2, x2, residual)
    (w1, b1), (w2, b2) = p1, p2
    n = w1.shape[0]
    shape = (*x1.shape[:-1], n)
    if w2.shape[0] != n or w1.shape[1] != x1.shape[-1] or w2.shape[1] != x2.shape[-1] or residual.shape != shape:
        return None
    y = torch.empty(shape)
    cpu_kernels.gemv_f32_sum_unchecked(x1, w1, b1, x2, w2, b2, residual, rows, y)
    return y
